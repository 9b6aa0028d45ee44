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

/// After a change, how long a stream waits for more before writing them in one chunk. The
/// page redraws at most every 250 ms, so this adds nothing a user sees, and it caps the writes
/// to each browser at 20 a second whatever the write rate: a thousand boards cost a thousand
/// writes every 50 ms, not a thousand per change.
const LINGER: Duration = Duration::from_millis(50);

/// Published groups written in one chunk at most (a linger's worth at a high write rate; a
/// browser that fell behind catches up in chunks of this many).
const COALESCE: usize = 256;

/// A feed event as the board sends it: decoded once for filtering, and in JSON. Made by the
/// first stream that sends the event and shared by every other, so a thousand boards render
/// it once.
#[derive(Debug)]
pub struct BoardEvent {
    session: Option<Session>,
    json: Bytes,
    /// The whole `change` message of a store position holding only this event, for a board
    /// it does not match and for one it does: what almost every board is sent, as is.
    alone: [Bytes; 2],
}

impl BoardEvent {
    pub fn of(item: &FeedItem) -> BoardEvent {
        let (session, json) = match SessionEvent::decode(item.bytes.clone()) {
            Ok(event) => {
                let text = json::event(&event).to_string();
                (event.session, text)
            }
            // Events are encoded by this server; one that does not decode is shown as its
            // position alone rather than stopping every board.
            Err(_) => (None, json!({ "sequence": item.sequence }).to_string()),
        };
        let alone = |matching: bool| {
            let mut message = BytesMut::new();
            change(&mut message, item.sequence, &[json.as_bytes()], &[matching]);
            message.freeze()
        };
        BoardEvent {
            alone: [alone(false), alone(true)],
            session,
            json: Bytes::from(json),
        }
    }
}

/// Writes the `change` message of store position `sequence`.
fn change(chunk: &mut BytesMut, sequence: u64, events: &[&[u8]], matching: &[bool]) {
    chunk.put_slice(
        format!("id: {sequence}\nevent: change\ndata: {{\"sequence\":{sequence},\"events\":[")
            .as_bytes(),
    );
    for (index, event) in events.iter().enumerate() {
        if index > 0 {
            chunk.put_u8(b',');
        }
        chunk.put_slice(event);
    }
    chunk.put_slice(b"],\"matching\":[");
    for (index, matches) in matching.iter().enumerate() {
        if index > 0 {
            chunk.put_u8(b',');
        }
        chunk.put_slice(if *matches { b"true" } else { b"false" });
    }
    chunk.put_slice(b"]}\n\n");
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

    /// One `change` message per store position after `last`, all in one chunk. A lone event
    /// (the usual case) is sent as the message every board shares, without rendering it
    /// again.
    fn changes(&mut self, events: &[Arc<FeedItem>]) -> Bytes {
        let from = self.last;
        let mut events = events.iter().filter(|e| e.sequence > from).peekable();
        let mut positions: Vec<Vec<&FeedItem>> = Vec::new();
        while let Some(first) = events.next() {
            let mut position = vec![first.as_ref()];
            while let Some(next) = events.next_if(|e| e.sequence == first.sequence) {
                position.push(next);
            }
            positions.push(position);
        }
        let Some(last) = positions.last().map(|position| position[0].sequence) else {
            return Bytes::new();
        };
        self.last = last;
        if let [position] = positions.as_slice()
            && let [item] = position.as_slice()
        {
            let event = item.board_event();
            return event.alone[usize::from(self.matches(event))].clone();
        }
        let mut chunk = BytesMut::new();
        for position in positions {
            if let [item] = position.as_slice() {
                let event = item.board_event();
                chunk.put_slice(&event.alone[usize::from(self.matches(event))]);
                continue;
            }
            let rendered: Vec<&BoardEvent> =
                position.iter().map(|item| item.board_event()).collect();
            let json: Vec<&[u8]> = rendered.iter().map(|event| event.json.as_ref()).collect();
            let matching: Vec<bool> = rendered.iter().map(|event| self.matches(event)).collect();
            change(&mut chunk, position[0].sequence, &json, &matching);
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
    const LINGER: Option<Duration> = Some(LINGER);

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

#[cfg(test)]
mod tests {
    use pitwall_proto::feed::{SessionFilter, SessionState};

    use super::*;

    fn item(sequence: u64, data_source: &str) -> Arc<FeedItem> {
        Arc::new(FeedItem::encode(&SessionEvent {
            sequence,
            data_source: data_source.into(),
            session: Some(Session {
                data_source: data_source.into(),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    fn data_lines(chunk: &Bytes) -> Vec<serde_json::Value> {
        std::str::from_utf8(chunk)
            .unwrap()
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(|data| serde_json::from_str(data).unwrap())
            .collect()
    }

    #[test]
    fn a_position_is_one_message_whatever_its_events_and_each_event_is_flagged() {
        let query = Query::new(SessionFilter {
            data_sources: vec!["Car1".into()],
            state: SessionState::All as i32,
            ..Default::default()
        })
        .unwrap();
        let (mut stream, _chunks) = EventStream::new(query, 1);
        let events = [
            item(1, "Car1"),
            item(2, "Car1"),
            item(3, "Car1"),
            item(3, "Car2"),
        ];
        let chunk = stream.changes(&events);
        let messages = data_lines(&chunk);
        assert_eq!(messages.len(), 2, "sequence 1 was sent before");
        assert_eq!(messages[0]["sequence"], 2);
        assert_eq!(messages[0]["matching"], serde_json::json!([true]));
        assert_eq!(messages[1]["sequence"], 3);
        assert_eq!(messages[1]["events"].as_array().unwrap().len(), 2);
        assert_eq!(messages[1]["matching"], serde_json::json!([true, false]));
        assert_eq!(stream.position(), 3);
        assert!(
            std::str::from_utf8(&chunk)
                .unwrap()
                .starts_with("id: 2\nevent: change\n")
        );

        // A lone event is the message every board shares.
        let lone = item(4, "Car2");
        let sent = stream.changes(std::slice::from_ref(&lone));
        assert_eq!(sent, lone.board_event().alone[0]);
        assert_eq!(data_lines(&sent)[0]["matching"], serde_json::json!([false]));
    }
}
