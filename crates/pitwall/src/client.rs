//! What every client command shares: connecting to a server (URL, TLS, token), and failures as
//! one line with an exit code.

use std::time::Duration;

use thiserror::Error;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::cli::ClientArgs;

/// How long a call may wait for the server's answer (for a stream, for it to be confirmed)
/// before the command gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a command failed; each prints as one line.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the Pitwall server at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error("{0}")]
    Refused(String),
    #[error("the server answered {code:?}: {message}")]
    Failed { code: Code, message: String },
    #[error("the server URL '{0}' is not valid; use e.g. http://127.0.0.1:13579")]
    BadUrl(String),
    #[error(
        "the server refused the token ({code:?}): {message}; pass --token or set PITWALL_TOKEN"
    )]
    Denied { code: Code, message: String },
    #[error("{0}")]
    Setup(String),
    #[error(
        "the server at {0} does not offer pitwall.v1.SessionFeed (an older Pitwall?); `list`, `tree` and `watch --all/--from` need it"
    )]
    NoFeed(String),
}

impl ClientError {
    /// 1: the server refused or failed the request; 3: the server could not be reached.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. } => 3,
            _ => 1,
        }
    }
}

/// Adds `authorization: Bearer …` to every call when a token is given.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Connects to the server `args` name, with its token and CA.
pub async fn connect(args: &ClientArgs) -> Result<(Channel, Bearer), ClientError> {
    let mut endpoint = Endpoint::from_shared(args.server.clone())
        .map_err(|_| ClientError::BadUrl(args.server.clone()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let tls = args.server.starts_with("https://");
    if tls {
        let path = args.ca_cert.as_ref().ok_or_else(|| {
            ClientError::Setup(format!(
                "{} uses TLS: pass --ca-cert with the CA that signed the server's certificate",
                args.server
            ))
        })?;
        let pem = std::fs::read(path).map_err(|e| {
            ClientError::Setup(format!(
                "cannot read CA certificate {}: {e}",
                path.display()
            ))
        })?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| ClientError::Setup(format!("TLS setup failed: {}", root_cause(&e))))?;
    }
    let bearer = match &args.token {
        None => Bearer(None),
        Some(token) => Bearer(Some(
            MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                ClientError::Setup("the token has characters a header cannot carry".into())
            })?,
        )),
    };
    let channel = endpoint.connect().await.map_err(|e| {
        let mut why = root_cause(&e);
        if tls {
            why.push_str(" (TLS: is --ca-cert the CA that signed the server's certificate?)");
        } else if why.contains("connection reset") || why.contains("protocol") {
            why.push_str(" (if the server uses TLS, use an https:// URL)");
        }
        ClientError::Unreachable {
            url: args.server.clone(),
            why,
        }
    })?;
    Ok((channel, bearer))
}

/// A failed call as one line: unreachable, token refused, or the server's status.
pub fn failure(url: &str, status: Status) -> ClientError {
    // A transport failure surfaces as UNAVAILABLE with the connection error as its source.
    if status.code() == Code::Unavailable && std::error::Error::source(&status).is_some() {
        return ClientError::Unreachable {
            url: url.to_owned(),
            why: root_cause(&status),
        };
    }
    if matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied
    ) {
        return ClientError::Denied {
            code: status.code(),
            message: status.message().to_owned(),
        };
    }
    ClientError::Failed {
        code: status.code(),
        message: status.message().to_owned(),
    }
}

/// The innermost cause of an error, which says what actually went wrong (refused, timed out).
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
