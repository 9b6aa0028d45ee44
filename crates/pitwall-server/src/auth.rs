//! Access control: bearer tokens with roles, checked on every gRPC call and admin HTTP request.
//!
//! Off unless a token file is configured. Tokens are kept only as SHA-256 hashes and compared
//! in constant time against every entry; they never appear in logs. The file can be reloaded
//! (SIGHUP) without dropping connections.

use std::future::{Ready, ready};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::Either;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;
use tonic::Status;
use tower::{Layer, Service};
use tracing::warn;

/// What a token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read sessions and follow notifications.
    Read,
    /// Read, and change sessions.
    Write,
    /// Write, and see metrics and administrative calls.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    fn parse(word: &str) -> Option<Role> {
        match word {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// No token needed: health checks that orchestrators make.
    Open,
    Needs(Role),
}

/// The rule of every gRPC method served. A method missing here needs `admin`, so a new RPC is
/// closed until it is given a rule.
pub const GRPC_RULES: &[(&str, Rule)] = &[
    (
        "/ma.streaming.api.v1.SessionManagementService/CreateSession",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.SessionManagementService/EndSession",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.SessionManagementService/GetCurrentSessions",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.SessionManagementService/GetSessionInfo",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.SessionManagementService/GetSessionStartNotification",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.SessionManagementService/GetSessionStopNotification",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.SessionManagementService/UpdateSessionIdentifier",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.SessionManagementService/AddAssociateSession",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.SessionManagementService/UpdateSessionDetails",
        Rule::Needs(Role::Write),
    ),
    ("/pitwall.v1.SessionFeed/Watch", Rule::Needs(Role::Read)),
    (
        "/pitwall.v1.SessionFeed/ListSessions",
        Rule::Needs(Role::Read),
    ),
    (
        "/pitwall.v1.SessionFeed/GetSessionTree",
        Rule::Needs(Role::Read),
    ),
    // The data plane: writing packets and allocating data format ids need `write`; reading
    // (and the read connections a read follows) need `read`.
    (
        "/ma.streaming.api.v1.PacketWriterService/WriteDataPacket",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.PacketWriterService/WriteDataPackets",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.PacketWriterService/WriteInfoPacket",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.PacketWriterService/WriteInfoPackets",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.PacketReaderService/ReadPackets",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.PacketReaderService/ReadEssentials",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.PacketReaderService/ReadDataPackets",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.ConnectionManagerService/NewConnection",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.ConnectionManagerService/GetConnection",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.ConnectionManagerService/CloseConnection",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.DataFormatManagerService/GetParameterDataFormatId",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.DataFormatManagerService/GetEventDataFormatId",
        Rule::Needs(Role::Write),
    ),
    (
        "/ma.streaming.api.v1.DataFormatManagerService/GetParametersList",
        Rule::Needs(Role::Read),
    ),
    (
        "/ma.streaming.api.v1.DataFormatManagerService/GetEvent",
        Rule::Needs(Role::Read),
    ),
    (
        "/pitwall.v1.ReadConnections/ListConnections",
        Rule::Needs(Role::Read),
    ),
    ("/grpc.health.v1.Health/Check", Rule::Open),
    ("/grpc.health.v1.Health/Watch", Rule::Open),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Rule::Needs(Role::Read),
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Rule::Needs(Role::Read),
    ),
];

/// The rule of every admin HTTP path; other paths need `admin`, unless a prefix rule applies.
pub const HTTP_RULES: &[(&str, Rule)] = &[
    ("/metrics", Rule::Needs(Role::Admin)),
    ("/healthz", Rule::Open),
    ("/readyz", Rule::Open),
    ("/", Rule::Open),
];

/// Rules of the admin HTTP paths under a prefix, where no exact rule applies: the board's
/// assets and sign-in are open (they hold no session); what it reads is under `/api/`.
pub const HTTP_PREFIX_RULES: &[(&str, Rule)] =
    &[("/board/", Rule::Open), ("/api/", Rule::Needs(Role::Read))];

pub fn grpc_rule(path: &str) -> Rule {
    find(GRPC_RULES, |method| method == path).unwrap_or(Rule::Needs(Role::Admin))
}

pub fn http_rule(path: &str) -> Rule {
    find(HTTP_RULES, |exact| exact == path)
        .or_else(|| find(HTTP_PREFIX_RULES, |prefix| path.starts_with(prefix)))
        .unwrap_or(Rule::Needs(Role::Admin))
}

fn find(rules: &[(&str, Rule)], applies: impl Fn(&str) -> bool) -> Option<Rule> {
    rules
        .iter()
        .find(|(path, _)| applies(path))
        .map(|(_, rule)| *rule)
}

#[derive(Debug, Error)]
pub enum TokenFileError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "token file {path}, line {line}: {problem}; each line is 'ROLE TOKEN' with ROLE read, write or admin"
    )]
    Line {
        path: PathBuf,
        line: usize,
        problem: &'static str,
    },
}

/// The tokens of a token file, hashed.
#[derive(Debug, Default)]
pub struct Tokens {
    entries: Vec<([u8; 32], Role)>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Tokens::parse(&text, path)
    }

    /// `ROLE TOKEN` per line; `#` starts a comment; blank lines are skipped.
    pub fn parse(text: &str, path: &Path) -> Result<Tokens, TokenFileError> {
        let mut entries = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let content = line.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let error = |problem| TokenFileError::Line {
                path: path.to_owned(),
                line: number + 1,
                problem,
            };
            let mut words = content.split_whitespace();
            let role = words
                .next()
                .and_then(Role::parse)
                .ok_or_else(|| error("unknown role"))?;
            let token = words
                .next()
                .ok_or_else(|| error("no token after the role"))?;
            if words.next().is_some() {
                return Err(error("more than a role and a token"));
            }
            entries.push((hash(token), role));
        }
        Ok(Tokens { entries })
    }

    /// The role of `token`, comparing against every entry in constant time.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let presented = hash(token);
        let mut found = None;
        for (stored, role) in &self.entries {
            if bool::from(stored.ct_eq(&presented)) {
                found = found.max(Some(*role));
            }
        }
        found
    }

    /// Tokens per role: (read, write, admin).
    pub fn counts(&self) -> (usize, usize, usize) {
        let count = |role| self.entries.iter().filter(|(_, r)| *r == role).count();
        (count(Role::Read), count(Role::Write), count(Role::Admin))
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A refused request, with the reason the caller reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one that is not in the file: gRPC `UNAUTHENTICATED`, HTTP 401.
    Unauthenticated(String),
    /// A known token whose role is too low: gRPC `PERMISSION_DENIED`, HTTP 403.
    PermissionDenied(String),
}

impl Denied {
    pub fn message(&self) -> &str {
        match self {
            Denied::Unauthenticated(m) | Denied::PermissionDenied(m) => m,
        }
    }

    pub fn into_status(self) -> Status {
        match self {
            Denied::Unauthenticated(m) => Status::unauthenticated(m),
            Denied::PermissionDenied(m) => Status::permission_denied(m),
        }
    }
}

/// The access check shared by both ports; `None` inside means access control is off.
#[derive(Clone, Default)]
pub struct Access {
    /// A `std` lock: read for a hash comparison per request, written only on reload.
    tokens: Arc<RwLock<Option<Tokens>>>,
}

impl Access {
    pub fn new(tokens: Option<Tokens>) -> Access {
        Access {
            tokens: Arc::new(RwLock::new(tokens)),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Replaces the tokens with the file's; on error the current tokens stay.
    pub fn reload(&self, path: &Path) -> Result<(usize, usize, usize), TokenFileError> {
        let tokens = Tokens::load(path)?;
        let counts = tokens.counts();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Some(tokens);
        Ok(counts)
    }

    /// Checks a request against `rule`, given its `authorization` header.
    pub fn check(&self, rule: Rule, authorization: Option<&HeaderValue>) -> Result<(), Denied> {
        let token = authorization
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        self.check_token(rule, token)
    }

    /// Checks a token, however it came (a bearer header, the board's cookie), against `rule`.
    pub fn check_token(&self, rule: Rule, token: Option<&str>) -> Result<(), Denied> {
        let Rule::Needs(needed) = rule else {
            return Ok(());
        };
        let guard = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let Some(tokens) = guard.as_ref() else {
            return Ok(());
        };
        let Some(token) = token else {
            return Err(Denied::Unauthenticated(format!(
                "a bearer token with role '{}' or higher is needed (authorization: Bearer …)",
                needed.name()
            )));
        };
        match tokens.role_of(token) {
            None => Err(Denied::Unauthenticated(format!(
                "the bearer token is not known; a token with role '{}' or higher is needed",
                needed.name()
            ))),
            Some(role) if role < needed => Err(Denied::PermissionDenied(format!(
                "this needs role '{}'; the token has role '{}'",
                needed.name(),
                role.name()
            ))),
            Some(_) => Ok(()),
        }
    }
}

/// Checks every gRPC call against [`GRPC_RULES`] before it reaches a service.
#[derive(Clone)]
pub struct GrpcAuthLayer {
    pub access: Access,
}

impl<S> Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcAuth {
            inner,
            access: self.access.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcAuth<S> {
    inner: S,
    access: Access,
}

impl<S, B> Service<http::Request<B>> for GrpcAuth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        match self.access.check(
            grpc_rule(path),
            request.headers().get(http::header::AUTHORIZATION),
        ) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(denied) => {
                warn!(rpc = path, reason = denied.message(), "request denied");
                Either::Left(ready(Ok(denied.into_status().into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::parse(
            "# operators\nread r-token\nwrite w-token # the logger\n\nadmin a-token\n",
            Path::new("tokens"),
        )
        .unwrap()
    }

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn the_token_file_gives_each_token_its_role() {
        let tokens = tokens();
        assert_eq!(tokens.role_of("r-token"), Some(Role::Read));
        assert_eq!(tokens.role_of("w-token"), Some(Role::Write));
        assert_eq!(tokens.role_of("a-token"), Some(Role::Admin));
        assert_eq!(tokens.role_of("other"), None);
        assert_eq!(tokens.counts(), (1, 1, 1));
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let err = Tokens::parse("read ok\nroot x\n", Path::new("t.txt")).unwrap_err();
        assert!(
            err.to_string().contains("t.txt, line 2: unknown role"),
            "{err}"
        );
        assert!(Tokens::parse("write\n", Path::new("t")).is_err());
        assert!(Tokens::parse("write a b\n", Path::new("t")).is_err());
    }

    #[test]
    fn roles_include_the_lower_ones() {
        let access = Access::new(Some(tokens()));
        let write = Rule::Needs(Role::Write);
        assert!(access.check(write, Some(&bearer("a-token"))).is_ok());
        assert!(access.check(write, Some(&bearer("w-token"))).is_ok());
        assert!(matches!(
            access.check(write, Some(&bearer("r-token"))),
            Err(Denied::PermissionDenied(m)) if m.contains("'write'")
        ));
    }

    #[test]
    fn missing_or_unknown_tokens_are_unauthenticated() {
        let access = Access::new(Some(tokens()));
        let read = Rule::Needs(Role::Read);
        assert!(matches!(
            access.check(read, None),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            access.check(read, Some(&bearer("nope"))),
            Err(Denied::Unauthenticated(_))
        ));
        let basic = HeaderValue::from_static("Basic cjpy");
        assert!(matches!(
            access.check(read, Some(&basic)),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(access.check(Rule::Open, None).is_ok());
    }

    #[test]
    fn without_a_token_file_everything_is_open() {
        let access = Access::new(None);
        assert!(access.check(Rule::Needs(Role::Admin), None).is_ok());
    }

    #[test]
    fn unknown_methods_and_paths_need_admin() {
        assert_eq!(grpc_rule("/some.New/Rpc"), Rule::Needs(Role::Admin));
        assert_eq!(http_rule("/debug"), Rule::Needs(Role::Admin));
        assert_eq!(http_rule("/healthz"), Rule::Open);
    }

    #[test]
    fn the_board_page_is_open_and_what_it_reads_needs_read() {
        assert_eq!(http_rule("/"), Rule::Open);
        assert_eq!(http_rule("/board/board.js"), Rule::Open);
        assert_eq!(http_rule("/api/events"), Rule::Needs(Role::Read));
        assert_eq!(http_rule("/api/board"), Rule::Needs(Role::Read));
        assert_eq!(http_rule("/apix"), Rule::Needs(Role::Admin));
        assert_eq!(http_rule("/metrics"), Rule::Needs(Role::Admin));
    }
}
