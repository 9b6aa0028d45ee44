//! The live session board, served on the admin port with no other server: the page and its
//! assets (embedded in the binary, so it works on a closed network), the JSON it lists
//! sessions and trees with, and its event stream (the feed as Server-Sent Events).
//!
//! - `GET /`, `/board/…`: the page and its assets; open, since they hold no session.
//! - `GET /api/board?data_source=…&identifier=GLOB&detail=key=value&ended=N`: data source
//!   counts, the live sessions matching the filter, the latest ends, and the feed sequence
//!   they reflect.
//! - `GET /api/tree?session_key=KEY`: a session with its associates and parents.
//! - `GET /api/telemetry?session_key=KEY`: the session's streams, the packets made durable on
//!   each since the server started, and their rate (the session page polls it while live).
//! - `GET /api/rates`: the packets per second of every session writing (the board's live
//!   table polls it).
//! - `GET /api/events?after=SEQ&…filter`: the event stream ([`events`]).
//! - `POST /board/sign-in` (`token=…`), `POST /board/sign-out`: with tokens configured, the
//!   page signs in once and the token travels in an `HttpOnly`, `SameSite=Strict` cookie
//!   scoped to `/api/`, never in a URL nor where the page's script can read it. The cookie
//!   holds the token itself, checked against the token file on every request like a bearer
//!   header: a restart keeps boards signed in, and a token removed from the file (SIGHUP)
//!   stops working at once.
//!
//! `/api/` needs the `read` role, by bearer header or by that cookie.

pub mod events;
mod params;

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pitwall_core::Limits;
use pitwall_core::query::{BoardListing, Query};
use pitwall_core::tree::{MAX_TREE_DEPTH, session_tree};
use pitwall_proto::json;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::auth::{Access, Denied, Role, Rule};
use crate::clock::Clock;
use crate::dataplane::rates::{Rates, StreamRate, WINDOW_SECONDS};
use crate::engine::Engine;
use crate::feed::Feed;
use crate::log::packets::PacketLog;
use events::EventStream;
use params::Params;

/// Live sessions a listing holds at most; the page says how many more there are.
const MAX_LIVE: usize = 1000;
/// Ended sessions a listing holds unless asked (`ended=N`), and at most.
const DEFAULT_ENDED: u64 = 20;
const MAX_ENDED: u64 = 200;
/// Sessions looked at per hold of the projection's read lock while listing: about a
/// millisecond, so a listing of a million sessions never holds up the writer for long.
const SCAN_STEP: usize = 10_000;

/// The board's cookie: the token, hex-encoded (a token may hold characters a cookie may not).
const COOKIE: &str = "pitwall_board";
/// Kept for 30 days: a pit-wall screen stays signed in across restarts of either side.
const COOKIE_MAX_AGE_SECONDS: u32 = 30 * 24 * 3600;
/// Header the page's sign-in sends: a form on another site cannot send it without a CORS
/// preflight, which this port does not answer, so no other site can sign a browser in.
const SIGN_IN_HEADER: &str = "x-pitwall-board";
/// Largest sign-in body.
const SIGN_IN_BYTES: usize = 4096;

const PAGE: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/board.js");
const STYLE: &str = include_str!("assets/board.css");
const ICON: &str = include_str!("assets/icon.svg");

/// Same-origin everything, nothing inline: session fields shown on the page can never run.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

/// What the board's endpoints read.
#[derive(Clone)]
pub struct Board {
    /// Set once startup has read the store; until then the API answers 503.
    pub engine: Arc<OnceLock<Engine>>,
    pub feed: Arc<Feed>,
    /// Owns every event stream's task: closed and awaited at shutdown, after the feed has
    /// ended them.
    pub calls: TaskTracker,
    pub access: Access,
    /// Data source names in filters follow the same rules as in writes.
    pub limits: Limits,
    pub clock: Clock,
    /// Whether the admin port is TLS: the cookie is then `Secure`.
    pub tls: bool,
    /// The data plane's packet log (the streams a session has written to), if the store has one.
    pub packets: Option<Arc<dyn PacketLog>>,
    /// Packets made durable per session and stream, as the data-plane writer counts them.
    pub rates: Arc<Rates>,
}

/// The board's routes, on the admin port's router (whose middleware checks access).
pub fn routes(board: Board) -> Router {
    Router::new()
        .route("/", get(page))
        .route(
            "/board/board.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route(
            "/board/board.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
        .route("/board/icon.svg", get(|| asset("image/svg+xml", ICON)))
        .route("/board/sign-in", post(sign_in))
        .route("/board/sign-out", post(sign_out))
        .route("/api/board", get(listing))
        .route("/api/tree", get(tree))
        .route("/api/telemetry", get(telemetry))
        .route("/api/rates", get(rates))
        .route("/api/events", get(events))
        .with_state(board)
}

/// Whether a path reads with the board's cookie as well as with a bearer header.
pub fn takes_cookie(path: &str) -> bool {
    path.starts_with("/api/")
}

/// The token the board's cookie holds, if the request has one.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|cookie| cookie.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .find_map(unhex)
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// A JSON answer.
fn answer(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// A refused request: its status, and the reason as `{"error": …}`.
struct Refused(StatusCode, String);

impl Refused {
    fn invalid(reason: impl Into<String>) -> Refused {
        Refused(StatusCode::BAD_REQUEST, reason.into())
    }

    fn unknown_session(session_key: &str) -> Refused {
        Refused(
            StatusCode::NOT_FOUND,
            format!(
                "session {} not found (ended and removed by retention, or never created)",
                pitwall_core::quote(session_key)
            ),
        )
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        answer(self.0, &json!({ "error": self.1 }))
    }
}

impl Board {
    fn engine(&self) -> Result<&Engine, Refused> {
        self.engine.get().ok_or_else(|| {
            Refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is starting (reading its store); try again shortly".into(),
            )
        })
    }

    fn query(&self, params: &Params) -> Result<Query, Refused> {
        let filter = params.filter(&self.limits).map_err(Refused::invalid)?;
        Query::new(filter).map_err(|rejection| Refused::invalid(rejection.to_string()))
    }
}

fn parse(uri: &Uri) -> Result<Params, Refused> {
    Params::parse(uri.query()).map_err(Refused::invalid)
}

/// Counts per data source, the live sessions matching the filter, the latest ends, and the
/// feed sequence all of it reflects (follow the event stream after it).
async fn listing(State(board): State<Board>, uri: Uri) -> Result<Response, Refused> {
    let params = parse(&uri)?;
    let query = board.query(&params)?;
    let ended = params
        .number("ended", DEFAULT_ENDED, MAX_ENDED)
        .map_err(Refused::invalid)?;
    board.engine()?;
    let cell = board.engine.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let engine = cell.get()?;
        let mut listing = BoardListing::new(query, MAX_LIVE, ended as usize);
        // Counts and the first step under one lock: the sequence is what they reflect, and
        // later steps see only what the events after it bring up to date.
        let (sequence, counts, mut done) = {
            let projection = engine.read();
            let mut counts: Vec<Value> = projection
                .counts_by_data_source()
                .map(|(data_source, counts)| {
                    json!({
                        "data_source": data_source,
                        "live": counts.total - counts.completed,
                        "completed": counts.completed,
                    })
                })
                .collect();
            counts.sort_by(|a, b| a["data_source"].as_str().cmp(&b["data_source"].as_str()));
            let done = listing.step(&projection, SCAN_STEP);
            (projection.position(), counts, done)
        };
        while !done {
            done = listing.step(&engine.read(), SCAN_STEP);
        }
        Some((sequence, counts, listing.finish()))
    })
    .await
    .map_err(|e| Refused(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // Checked above, and never unset once set.
    let Some((sequence, counts, sessions)) = listed else {
        return Err(Refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is starting".into(),
        ));
    };
    Ok(answer(
        StatusCode::OK,
        &json!({
            "sequence": sequence,
            "now": json::format_time(&board.clock.now()),
            "data_sources": counts,
            "live": sessions.live.iter().map(json::session).collect::<Vec<_>>(),
            "more_live": sessions.more_live,
            "ended": sessions.ended.iter().map(json::session).collect::<Vec<_>>(),
            "feed_unavailable": board.feed.unavailable(),
            "tokens": board.access.is_enabled(),
        }),
    ))
}

/// A session with its associates (children) and the sessions naming it (parents).
async fn tree(State(board): State<Board>, uri: Uri) -> Result<Response, Refused> {
    let params = parse(&uri)?;
    let session_key = params
        .one("session_key")
        .ok_or_else(|| Refused::invalid("session_key is missing; pass ?session_key=KEY"))?;
    let depth = params
        .number("depth", 0, u64::from(MAX_TREE_DEPTH))
        .map_err(Refused::invalid)?;
    let projection = board.engine()?.read();
    let root = session_tree(&projection, session_key, depth as u32)
        .ok_or_else(|| Refused::unknown_session(session_key))?;
    Ok(answer(
        StatusCode::OK,
        &json!({ "sequence": projection.position(), "root": json::tree(&root) }),
    ))
}

/// A session's streams with the packets made durable on each since counting began and their
/// rate: the streams the packet log knows the session wrote to (kept across restarts), and those
/// counted since. The main stream is `""`.
async fn telemetry(State(board): State<Board>, uri: Uri) -> Result<Response, Refused> {
    let params = parse(&uri)?;
    let session_key = params
        .one("session_key")
        .ok_or_else(|| Refused::invalid("session_key is missing; pass ?session_key=KEY"))?;
    let live = {
        let projection = board.engine()?.read();
        let session = projection
            .get(session_key)
            .ok_or_else(|| Refused::unknown_session(session_key))?;
        !session.is_complete()
    };
    let mut streams = board.rates.session(session_key);
    if let Some(packets) = &board.packets {
        for stream in packets.session_streams(session_key) {
            if let Err(at) = streams.binary_search_by(|counted| counted.stream.cmp(&stream)) {
                streams.insert(
                    at,
                    StreamRate {
                        stream,
                        packets: 0,
                        bytes: 0,
                        packets_per_second: 0.0,
                    },
                );
            }
        }
    }
    Ok(answer(
        StatusCode::OK,
        &json!({
            "session_key": session_key,
            "live": live,
            "streams": streams.iter().map(|rate| json!({
                "stream": rate.stream,
                "packets": rate.packets,
                "bytes": rate.bytes,
                "packets_per_second": rate.packets_per_second,
            })).collect::<Vec<_>>(),
            "counted_since": json::format_time(&board.rates.started()),
            "window_seconds": WINDOW_SECONDS,
            "at": json::format_time(&board.clock.now()),
        }),
    ))
}

/// The packets per second of every session with packets in the rate window, by session key.
/// Worked out once per second however many boards ask; at most one entry per counted pair.
async fn rates(State(board): State<Board>) -> Response {
    let sessions: serde_json::Map<String, Value> = board
        .rates
        .sessions()
        .iter()
        .map(|(session_key, rate)| (session_key.clone(), json!(rate)))
        .collect();
    answer(
        StatusCode::OK,
        &json!({
            "sessions": sessions,
            "window_seconds": WINDOW_SECONDS,
            "at": json::format_time(&board.clock.now()),
        }),
    )
}

/// The event stream after `Last-Event-ID` (a browser reconnecting), else `after`, else from
/// now.
async fn events(
    State(board): State<Board>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, Refused> {
    let params = parse(&uri)?;
    let query = board.query(&params)?;
    let engine = board.engine()?;
    if let Some(reason) = board.feed.unavailable() {
        return Err(Refused(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the feed is not available on this server: {reason}"),
        ));
    }
    let resume = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty());
    let after = match resume {
        Some(id) => id.parse::<u64>().map_err(|_| {
            Refused::invalid(format!(
                "Last-Event-ID '{id}' is not a sequence this server sent"
            ))
        })?,
        None => params
            .number("after", board.feed.head(), u64::MAX)
            .map_err(Refused::invalid)?,
    };
    let applied = engine.read().position();
    let (stream, chunks) = EventStream::new(query, after);
    match board.feed.is_unknown(after, applied) {
        Some(newest) => board.calls.spawn(stream.ahead(after, newest)),
        None => board.calls.spawn(stream.run(board.feed.clone())),
    };
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache, no-store"),
            // Proxies that buffer responses (nginx) would hold events back.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(ReceiverStream::new(chunks)),
    )
        .into_response())
}

async fn sign_in(
    State(board): State<Board>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refused> {
    if headers.get(SIGN_IN_HEADER).is_none() {
        return Err(Refused(
            StatusCode::FORBIDDEN,
            "sign in from the board's page (this request lacks its X-Pitwall-Board header)".into(),
        ));
    }
    let body = to_bytes(body, SIGN_IN_BYTES).await.map_err(|_| {
        Refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a sign-in is at most {SIGN_IN_BYTES} bytes"),
        )
    })?;
    let text =
        std::str::from_utf8(&body).map_err(|_| Refused::invalid("the sign-in is not UTF-8"))?;
    let params = Params::parse(Some(text)).map_err(Refused::invalid)?;
    let token = params.one("token").map(str::trim);
    if !board.access.is_enabled() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if let Err(denied) = board.access.check_token(Rule::Needs(Role::Read), token) {
        warn!(reason = denied.message(), "board sign-in refused");
        let status = match denied {
            Denied::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Denied::PermissionDenied(_) => StatusCode::FORBIDDEN,
        };
        return Err(Refused(status, denied.message().to_owned()));
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/api/; Max-Age={COOKIE_MAX_AGE_SECONDS}; HttpOnly; SameSite=Strict{}",
        hex(token.unwrap_or_default()),
        if board.tls { "; Secure" } else { "" }
    );
    set_cookie(cookie)
}

async fn sign_out(State(board): State<Board>) -> Result<Response, Refused> {
    let secure = if board.tls { "; Secure" } else { "" };
    set_cookie(format!(
        "{COOKIE}=; Path=/api/; Max-Age=0; HttpOnly; SameSite=Strict{secure}"
    ))
}

fn set_cookie(cookie: String) -> Result<Response, Refused> {
    let value = HeaderValue::from_str(&cookie)
        .map_err(|e| Refused(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, value)]).into_response())
}

fn hex(text: &str) -> String {
    text.bytes().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_carries_any_token_and_only_its_own_name_is_read() {
        let token = "dash; board=1 ✓";
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("other=1"));
        let cookie = format!("theme=dark; {COOKIE}={}", hex(token));
        headers.append(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert_eq!(cookie_token(&headers).as_deref(), Some(token));
        let mut lookalike = HeaderMap::new();
        lookalike.insert(
            header::COOKIE,
            HeaderValue::from_static("pitwall_boardx=61"),
        );
        assert_eq!(cookie_token(&lookalike), None);
        assert_eq!(unhex("6"), None);
        assert_eq!(unhex("zz"), None);
    }
}
