//! The commands on `pitwall.v1.SessionFeed`: `list` (every page of `ListSessions`), `tree`
//! (`GetSessionTree`) and `watch --all`/`--from` (`Watch`, resumed after a cut-off).

use std::time::Duration;

use pitwall_proto::feed::{
    GetSessionTreeRequest, ListSessionsRequest, SessionEvent, SessionFilter, SessionNode,
    WatchRequest, WatchResponse,
};
use pitwall_proto::json::{self, kind_name};
use serde_json::Value;
use tonic::{Code, Status, Streaming};

use super::Session;
use crate::cli::Output;
use crate::client::{ClientError, root_cause};
use crate::output;
use crate::values::format_time;

/// Sessions asked for per `ListSessions` page (the server's cap).
const PAGE_SIZE: u32 = 1000;
/// First and longest wait before resuming a watch the server cut off without it having
/// received anything since the last (re)connect.
const RESUME_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

impl Session {
    pub(super) async fn list(&self, filter: SessionFilter) -> Result<(), ClientError> {
        let mut sessions = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .feed
                .clone()
                .list_sessions(ListSessionsRequest {
                    filter: Some(filter.clone()),
                    page_size: PAGE_SIZE,
                    page_token: page_token.clone(),
                })
                .await
                .map_err(|status| self.feed_failure(status))?
                .into_inner();
            sessions.extend(page.sessions);
            if page.next_page_token.is_empty() {
                break;
            }
            if page.next_page_token == page_token {
                return Err(ClientError::Setup(format!(
                    "the server returned page token '{page_token}' twice; the listing is incomplete"
                )));
            }
            page_token = page.next_page_token;
        }
        match self.output {
            Output::Table => {
                let rows: Vec<Vec<String>> = sessions
                    .into_iter()
                    .map(|session| {
                        vec![
                            session.session_key,
                            session.data_source,
                            session.identifier,
                            session.r#type,
                            session
                                .creation_time
                                .as_ref()
                                .map(format_time)
                                .unwrap_or_default(),
                            session
                                .termination_time
                                .as_ref()
                                .map(format_time)
                                .unwrap_or_else(|| "-".into()),
                            session.details.len().to_string(),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "KEY",
                        "DATA SOURCE",
                        "IDENTIFIER",
                        "TYPE",
                        "CREATED",
                        "ENDED",
                        "DETAILS",
                    ],
                    &rows,
                );
            }
            Output::Json => {
                output::json(&Value::Array(sessions.iter().map(json::session).collect()))
            }
        }
        Ok(())
    }

    pub(super) async fn tree(&self, session_key: &str, depth: u32) -> Result<(), ClientError> {
        let root = self
            .feed
            .clone()
            .get_session_tree(GetSessionTreeRequest {
                session_key: session_key.to_owned(),
                depth,
            })
            .await
            .map_err(|status| self.feed_failure(status))?
            .into_inner()
            .root
            .ok_or_else(|| {
                ClientError::Setup(format!(
                    "the server answered no tree for session '{session_key}'"
                ))
            })?;
        match self.output {
            Output::Json => output::json(&json::tree(&root)),
            Output::Table => {
                let mut lines = vec![node_label(&root)];
                section("associates", &root.children, |n| &n.children, &mut lines);
                section("parents", &root.parents, |n| &n.parents, &mut lines);
                for line in lines {
                    output::text(&line);
                }
            }
        }
        Ok(())
    }

    /// Every change of one data source (or of all when `data_source` is `None`) after
    /// `from` (0: from now), until Ctrl-C. When the server cuts the watch off, ends it (it is
    /// stopping) or the connection is lost (it was killed), the watch reconnects with back-off
    /// for up to `reconnect_for` and resumes after the last sequence it saw: nothing is printed
    /// twice or missed. It ends with an error only for a real one (a refused request, history
    /// no longer kept, a server gone for longer than `reconnect_for` after a lost connection).
    pub(super) async fn watch_feed(
        &self,
        data_source: Option<String>,
        from: u64,
        reconnect_for: Duration,
    ) -> Result<(), ClientError> {
        let data_source = data_source.unwrap_or_default();
        let mut stream = self.open_watch(&data_source, from).await?;
        // The subscription is registered: nothing from here on is missed.
        let scope = if data_source.is_empty() {
            "every data source".to_owned()
        } else {
            format!("data source '{data_source}'")
        };
        let start = if from == 0 {
            "from now".to_owned()
        } else {
            format!("after sequence {from}")
        };
        eprintln!("watching {scope} for session changes {start}; Ctrl-C to stop");
        // Resuming after this sequence misses nothing this watch would have printed.
        let mut resume = from;
        let mut received = false;
        let mut backoff = RESUME_BACKOFF.0;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = &mut ctrl_c => return Ok(()),
            };
            let interruption = match message {
                Ok(Some(WatchResponse {
                    events, sequence, ..
                })) => {
                    received = true;
                    for event in &events {
                        if self.print_event(event).is_err() {
                            // Nobody reads standard output any more.
                            return Ok(());
                        }
                        resume = resume.max(event.sequence);
                    }
                    resume = resume.max(sequence);
                    continue;
                }
                Ok(None) => Interruption::Ended,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    Interruption::CutOff(status)
                }
                Err(status) if is_lost(&status) => Interruption::Lost(status),
                Err(status) => return Err(self.feed_failure(status)),
            };
            if matches!(interruption, Interruption::Ended) && reconnect_for.is_zero() {
                return Ok(());
            }
            if received {
                backoff = RESUME_BACKOFF.0;
            }
            let what = match &interruption {
                Interruption::CutOff(status) => format!(
                    "the server cut this watch off ({})",
                    output::escape(status.message())
                ),
                Interruption::Ended => "the server ended the watch (is it restarting?)".to_owned(),
                Interruption::Lost(status) => format!(
                    "lost the connection to the server ({})",
                    output::escape(&root_cause(status))
                ),
            };
            if resume == 0 {
                eprintln!(
                    "pitwall: {what} before it reported a sequence; following from now, changes meanwhile may be missed"
                );
            } else {
                eprintln!("pitwall: {what}; resuming after sequence {resume}");
            }
            let reopened = tokio::select! {
                reopened = self.reopen_watch(&data_source, resume, &mut backoff, reconnect_for) => reopened,
                _ = &mut ctrl_c => return Ok(()),
            };
            stream = match reopened {
                Ok(stream) => stream,
                // Stopped and did not come back: the watch is over, but nothing went wrong.
                Err(_) if matches!(interruption, Interruption::Ended) => {
                    eprintln!(
                        "pitwall: the server did not come back within {}s; stopping (resume with --from {resume})",
                        reconnect_for.as_secs()
                    );
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            received = false;
        }
    }

    /// Opens the watch again after `resume`, retrying with back-off while the server cannot be
    /// reached or is starting, for up to `reconnect_for`.
    async fn reopen_watch(
        &self,
        data_source: &str,
        resume: u64,
        backoff: &mut Duration,
        reconnect_for: Duration,
    ) -> Result<Streaming<WatchResponse>, ClientError> {
        let deadline = tokio::time::Instant::now() + reconnect_for;
        let mut attempts = 0u32;
        loop {
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(RESUME_BACKOFF.1);
            attempts += 1;
            let opened = self
                .feed
                .clone()
                .watch(WatchRequest {
                    data_source: data_source.to_owned(),
                    from_sequence: resume,
                })
                .await;
            match opened {
                Ok(response) => {
                    if attempts > 1 {
                        eprintln!("pitwall: reconnected after {attempts} attempts");
                    }
                    return Ok(response.into_inner());
                }
                Err(status) if is_lost(&status) || status.code() == Code::ResourceExhausted => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(self.failure(status));
                    }
                    if attempts == 1 {
                        eprintln!(
                            "pitwall: the server is not answering yet ({}); retrying for up to {}s",
                            output::escape(&root_cause(&status)),
                            reconnect_for.as_secs()
                        );
                    }
                }
                Err(status) => return Err(self.feed_failure(status)),
            }
        }
    }

    async fn open_watch(
        &self,
        data_source: &str,
        from_sequence: u64,
    ) -> Result<Streaming<WatchResponse>, ClientError> {
        Ok(self
            .feed
            .clone()
            .watch(WatchRequest {
                data_source: data_source.to_owned(),
                from_sequence,
            })
            .await
            .map_err(|status| self.feed_failure(status))?
            .into_inner())
    }

    fn print_event(&self, event: &SessionEvent) -> std::io::Result<()> {
        let kind = kind_name(event.kind);
        match self.output {
            Output::Table => {
                let identifier = event
                    .session
                    .as_ref()
                    .map(|s| s.identifier.as_str())
                    .unwrap_or_default();
                output::line(
                    format!(
                        "{}  {kind:<7}  {}  {}  {identifier}",
                        event.sequence, event.session_key, event.data_source
                    )
                    .trim_end(),
                )
            }
            Output::Json => output::json_line(&json::event(event)),
        }
    }

    /// A failed feed call: the server's own message for what the request got wrong (unknown
    /// session, history no longer kept, malformed filter), as for a refused Stream API call.
    fn feed_failure(&self, status: Status) -> ClientError {
        match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::OutOfRange => ClientError::Refused(status.message().to_owned()),
            Code::Unimplemented => ClientError::NoFeed(self.url.clone()),
            _ => self.failure(status),
        }
    }
}

/// Why a watch stopped without the server refusing it.
enum Interruption {
    /// The server cut it off for falling behind.
    CutOff(Status),
    /// The server ended the stream (it is shutting down).
    Ended,
    /// The connection broke (the server was killed, the network failed).
    Lost(Status),
}

/// A failure of the connection or of a server that is not (yet) serving, as opposed to a
/// refusal of this request: worth reconnecting for.
fn is_lost(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted
    ) || std::error::Error::source(status).is_some()
}

/// `KEY  identifier (data_source, live|complete)`, `KEY  (unknown)` or `KEY  (cycle)`.
fn node_label(node: &SessionNode) -> String {
    let key = &node.session_key;
    if node.cycle {
        return format!("{key}  (cycle)");
    }
    let Some(session) = &node.session else {
        return format!("{key}  (unknown)");
    };
    let state = if session.is_complete {
        "complete"
    } else {
        "live"
    };
    let identifier = if session.identifier.is_empty() {
        String::new()
    } else {
        format!("{} ", session.identifier)
    };
    format!("{key}  {identifier}({}, {state})", session.data_source)
}

/// `title:` and the nodes under it, or `title: none`.
fn section(
    title: &str,
    nodes: &[SessionNode],
    next: fn(&SessionNode) -> &[SessionNode],
    lines: &mut Vec<String>,
) {
    if nodes.is_empty() {
        lines.push(format!("{title}: none"));
        return;
    }
    lines.push(format!("{title}:"));
    for node in nodes {
        indented(node, 1, next, lines);
    }
}

/// `node` indented two spaces per level, then the nodes `next` gives, one level deeper.
fn indented(
    node: &SessionNode,
    level: usize,
    next: fn(&SessionNode) -> &[SessionNode],
    lines: &mut Vec<String>,
) {
    lines.push(format!("{}{}", "  ".repeat(level), node_label(node)));
    for child in next(node) {
        indented(child, level + 1, next, lines);
    }
}
