//! The board's event stream: the session feed as Server-Sent Events.
//!
//! Each store position is one `change` message, `id` its sequence, so a browser that
//! reconnects sends it back as `Last-Event-ID` and resumes without a gap or a duplicate. Every
//! event is sent, whatever the board's filter (the data source counts need them all), with a
//! flag per event saying whether its session matches the filter. The stream is a feed watcher
//! like any other: bounded, and cut off with a reason when it falls behind. How it ends is the
//! last message: `closing` (shutdown), `cut-off`, `compacted`, `ahead` or `failed`.
//!
//! ```text
//! retry: 1000
//!
//! id: 12
//! event: change
//! data: {"sequence":12,"events":[{…}],"matching":[true]}
//!
//! id: 12
//! event: live
//! data: {"sequence":12}
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use pitwall_core::query::Query;
use pitwall_proto::feed::{Session, SessionEvent};
use pitwall_proto::json;
use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::debug;

use crate::feed::{Feed, FeedItem};
use crate::follow::{Ended, FeedSink, Gone, follow};

/// How long a browser waits before it reconnects (the SSE `retry` field).
const RECONNECT_MS: u64 = 1000;

/// A silent stream sends a comment this often, so that proxies keep it open and a browser that
/// went away is noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// A browser that takes nothing for this long, while there is something to send, is let go;
/// it reconnects and resumes. This also bounds how long shutdown waits for it.
const STALLED_AFTER: Duration = Duration::from_secs(10);

/// Chunks waiting to be written to one browser's connection; past them the stream stops
/// draining its feed queue, whose bound then decides how far it may fall behind. Few, since
/// each may hold [`COALESCE`] groups.
const CHUNKS_BUFFERED: usize = 2;

/// Published groups written in one chunk when more are waiting: under load a browser gets
/// one write for a burst instead of one per group.
const COALESCE: usize = 16;

/// A feed event as the board sends it: decoded once for filtering, and in JSON. Made by the
/// first stream that sends the event and shared by every other, so a thousand boards render
/// it once.
#[derive(Debug)]
pub struct BoardEvent {
    session: Option<Session>,
    json: Bytes,
}

impl BoardEvent {
    pub fn of(item: &FeedItem) -> BoardEvent {
        match SessionEvent::decode(item.bytes.clone()) {
            Ok(event) => BoardEvent {
                json: Bytes::from(json::event(&event).to_string()),
                session: event.session,
            },
            // Events are encoded by this server; one that does not decode is shown as its
            // position alone rather than stopping every board.
            Err(_) => BoardEvent {
                session: None,
                json: Bytes::from(json!({ "sequence": item.sequence }).to_string()),
            },
        }
    }
}

pub type Chunk = Result<Bytes, Infallible>;

/// One browser's stream.
pub struct EventStream {
    /// `None`: every session matches.
    query: Option<Query>,
    last: u64,
    sender: mpsc::Sender<Chunk>,
}

impl EventStream {
    /// A stream following on after `after`; the response body reads the other end.
    pub fn new(query: Query, after: u64) -> (EventStream, mpsc::Receiver<Chunk>) {
        let (sender, receiver) = mpsc::channel(CHUNKS_BUFFERED);
        let query = (!query.is_everything()).then_some(query);
        (
            EventStream {
                query,
                last: after,
                sender,
            },
            receiver,
        )
    }

    /// Follows the feed until the stream ends, and says why as its last message.
    pub async fn run(mut self, feed: Arc<Feed>) {
        if self
            .write(Bytes::from(format!("retry: {RECONNECT_MS}\n\n")))
            .await
            .is_err()
        {
            return;
        }
        let (name, data) = match follow(&feed, &mut self).await {
            Ended::Gone => return,
            Ended::Closed => (
                "closing",
                json!({"reason": "the server is shutting down; the board reconnects and resumes"}),
            ),
            Ended::CutOff { queue } => (
                "cut-off",
                json!({
                    "reason": format!(
                        "this board fell more than {queue} updates behind and was cut off; it \
                         resumes after sequence {}", self.last),
                    "resume_after": self.last,
                }),
            ),
            Ended::Compacted(e) => (
                "compacted",
                json!({
                    "reason": format!(
                        "the events after sequence {} are no longer kept (history starts at {}); \
                         list the sessions again", self.last, e.first_kept),
                    "first_kept": e.first_kept,
                }),
            ),
            Ended::Unavailable(reason) | Ended::Internal(reason) => {
                ("failed", json!({ "reason": reason }))
            }
        };
        debug!(event = name, "board stream ended");
        let _ = self.write(message(None, name, &data.to_string())).await;
    }

    /// Tells the browser that `after` is beyond every sequence this server gave out (its store
    /// was replaced), so it lists the sessions again.
    pub async fn ahead(self, after: u64, newest: u64) {
        let data = json!({
            "reason": format!(
                "sequence {after} is ahead of the newest sequence {newest} (was the store \
                 replaced?); list the sessions again"),
            "newest": newest,
        });
        let _ = self.write(message(None, "ahead", &data.to_string())).await;
    }

    async fn write(&self, chunk: Bytes) -> Result<(), Gone> {
        match tokio::time::timeout(STALLED_AFTER, self.sender.send(Ok(chunk))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Gone),
            Err(_) => {
                debug!("a board took nothing for {STALLED_AFTER:?}; its stream is ended");
                Err(Gone)
            }
        }
    }

    /// One `change` message per store position after `last`, all in one chunk.
    fn changes(&mut self, events: &[Arc<FeedItem>]) -> Bytes {
        let mut chunk = BytesMut::new();
        let from = self.last;
        let mut events = events.iter().filter(|e| e.sequence > from).peekable();
        while let Some(first) = events.next() {
            let sequence = first.sequence;
            let mut data = BytesMut::new();
            let mut matching = Vec::new();
            for item in std::iter::once(first).chain(std::iter::from_fn(|| {
                events.next_if(|e| e.sequence == sequence)
            })) {
                let event = item.board_event();
                if !data.is_empty() {
                    data.put_u8(b',');
                }
                data.put_slice(&event.json);
                matching.push(if self.matches(event) { "true" } else { "false" });
            }
            chunk.put_slice(
                format!(
                    "id: {sequence}\nevent: change\ndata: {{\"sequence\":{sequence},\"events\":["
                )
                .as_bytes(),
            );
            chunk.put_slice(&data);
            chunk.put_slice(format!("],\"matching\":[{}]}}\n\n", matching.join(",")).as_bytes());
            self.last = sequence;
        }
        chunk.freeze()
    }

    fn matches(&self, event: &BoardEvent) -> bool {
        match (&self.query, &event.session) {
            (None, _) => true,
            (Some(query), Some(session)) => query.matches_view(session),
            (Some(_), None) => false,
        }
    }
}

impl FeedSink for EventStream {
    const COALESCE: usize = COALESCE;
    const KEEP_ALIVE: Option<Duration> = Some(KEEP_ALIVE);

    fn position(&self) -> u64 {
        self.last
    }

    async fn send(&mut self, events: &[Arc<FeedItem>]) -> Result<(), Gone> {
        let chunk = self.changes(events);
        if chunk.is_empty() {
            return Ok(());
        }
        self.write(chunk).await
    }

    async fn caught_up(&mut self) -> Result<(), Gone> {
        let data = json!({ "sequence": self.last }).to_string();
        self.write(message(Some(self.last), "live", &data)).await
    }

    async fn gone(&self) {
        self.sender.closed().await
    }

    async fn keep_alive(&mut self) -> Result<(), Gone> {
        self.write(Bytes::from_static(b": keep-alive\n\n")).await
    }
}

/// One SSE message; `data` holds no line break (compact JSON escapes them).
fn message(id: Option<u64>, event: &str, data: &str) -> Bytes {
    let id = id.map(|id| format!("id: {id}\n")).unwrap_or_default();
    Bytes::from(format!("{id}event: {event}\ndata: {data}\n\n"))
}
