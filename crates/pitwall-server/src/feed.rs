//! The session feed: every change with its store sequence, kept for a window so a watcher can
//! resume where it left off, and delivered live to watchers.
//!
//! Watchers are a [`Fanout`]: publishing never waits, and a watcher whose queue of published
//! groups is full is cut off and told from which sequence to resume (nothing is lost: it resumes
//! from the history). History is the embedded store's feed table, or, with a shared broker
//! log, this instance's memory (the log itself holds records, not the sessions as they were
//! after each one).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{FutureExt, StreamExt};

use pitwall_core::EventKind;
use pitwall_core::lifecycle::{order, sub};
use pitwall_proto::feed::{self, EventKind as FeedKind, SessionEvent};
use pitwall_store::{EmbeddedStore, StoreError};
use prost::Message;
use prost::bytes::Bytes;
use prost_types::Timestamp;

use crate::board::events::BoardEvent;
use crate::fanout::{CutOffNotice, Fanout, Subscriber};
use crate::metrics::Metrics;

/// One published group: whole store positions, in sequence order.
pub type Published = Arc<[Arc<FeedItem>]>;

/// An event as the feed keeps it: encoded once, sent as these bytes to every watcher (and, on
/// the embedded store, stored as them), with what filtering and trimming need beside.
#[derive(Debug, Clone)]
pub struct FeedItem {
    pub sequence: u64,
    pub data_source: String,
    pub time: Option<Timestamp>,
    /// The encoded `pitwall.v1.SessionEvent`.
    pub bytes: Bytes,
    /// The event as board streams send it, made when the first one needs it.
    board: OnceLock<Arc<BoardEvent>>,
}

impl PartialEq for FeedItem {
    /// The event, not whether a board has rendered it yet.
    fn eq(&self, other: &Self) -> bool {
        self.sequence == other.sequence
            && self.data_source == other.data_source
            && self.time == other.time
            && self.bytes == other.bytes
    }
}

impl FeedItem {
    pub fn encode(event: &SessionEvent) -> FeedItem {
        FeedItem {
            sequence: event.sequence,
            data_source: event.data_source.clone(),
            time: event.time,
            bytes: Bytes::from(event.encode_to_vec()),
            board: OnceLock::new(),
        }
    }

    pub fn decode(bytes: Bytes) -> Result<FeedItem, prost::DecodeError> {
        let event = SessionEvent::decode(bytes.clone())?;
        Ok(FeedItem {
            sequence: event.sequence,
            data_source: event.data_source,
            time: event.time,
            bytes,
            board: OnceLock::new(),
        })
    }

    /// The event as the board's event stream sends it: rendered by the first stream that
    /// sends it, then shared by every other.
    pub fn board_event(&self) -> &BoardEvent {
        self.board.get_or_init(|| Arc::new(BoardEvent::of(self)))
    }
}

/// How much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedWindow {
    pub max_events: u64,
    pub max_age: Option<Duration>,
}

impl Default for FeedWindow {
    fn default() -> Self {
        FeedWindow {
            max_events: 100_000,
            max_age: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

impl FeedWindow {
    /// The oldest event time kept at `now`.
    pub fn oldest(&self, now: Timestamp) -> Option<Timestamp> {
        self.max_age.map(|age| sub(now, age))
    }
}

/// Events the embedded store also keeps in memory: recent enough for a watcher that fell a
/// little behind or reconnected at once to resume without reading the disk.
const RECENT_ON_DISK_STORE: usize = 4096;
/// Bytes of those at most (sessions may be large).
const RECENT_BYTES_ON_DISK_STORE: usize = 64 * 1024 * 1024;
/// Bytes of events a memory window (shared broker log) holds at most, whatever its count: with large
/// sessions the count alone would not bound memory.
const MEMORY_WINDOW_BYTES: usize = 256 * 1024 * 1024;

pub struct Feed {
    /// A `std` mutex: held to push a group or register a watcher, never across an await.
    /// Watchers register under it, so a watcher's tail and its first live group never overlap
    /// nor leave a gap.
    state: Mutex<FeedState>,
    watchers: Arc<Fanout<(), Published>>,
    /// Set when the embedded store is open; without it history is the memory window.
    disk: OnceLock<Arc<EmbeddedStore>>,
    /// Why the feed cannot be watched, if it cannot.
    unavailable: OnceLock<String>,
    window: FeedWindow,
    metrics: Metrics,
}

/// The kept window: what memory holds and where history starts.
struct FeedState {
    recent: Recent,
    /// Oldest sequence a watcher may still resume after (minus one).
    first_kept: u64,
    /// Newest sequence published.
    head: u64,
}

impl FeedState {
    /// Fails if the events after `after` are no longer all kept.
    fn check_kept(&self, after: u64) -> Result<(), Compacted> {
        if after.saturating_add(1) < self.first_kept {
            Err(Compacted {
                first_kept: self.first_kept,
            })
        } else {
            Ok(())
        }
    }
}

/// The history a resume asked for is no longer kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub first_kept: u64,
}

/// Where a watcher stands after asking to follow on from a sequence.
pub enum Follow {
    /// Registered: `tail` is what was kept after the sequence, then `live` carries the rest.
    Live {
        tail: Vec<Arc<FeedItem>>,
        live: Watcher,
    },
    /// The events after the sequence are older than memory holds: read them from the disk
    /// first ([`Feed::history_after`]).
    Behind,
}

/// A registered watcher's queue; dropping it unregisters.
pub struct Watcher {
    subscriber: Subscriber<(), Published>,
}

impl Watcher {
    /// The next group; `None` when the feed closed or this watcher was cut off (see
    /// [`Feed::is_closed`]).
    pub async fn recv(&mut self) -> Option<Published> {
        self.subscriber.next().await?.ok()
    }

    /// The next group if one is waiting; `None` otherwise (or at the end, which the next
    /// [`Watcher::recv`] reports again).
    pub fn try_recv(&mut self) -> Option<Published> {
        self.subscriber.next().now_or_never()??.ok()
    }
}

impl Feed {
    pub fn new(window: FeedWindow, queue: usize, metrics: Metrics) -> Arc<Feed> {
        let gauge = metrics.clone();
        // A cut-off watcher resumes from the last event it got, so it gets what is queued
        // first.
        let watchers = Fanout::new(queue, CutOffNotice::AfterQueued, move |_| {
            gauge.feed_watchers.dec()
        });
        Arc::new(Feed {
            state: Mutex::new(FeedState {
                recent: Recent::default(),
                first_kept: 1,
                head: 0,
            }),
            watchers,
            disk: OnceLock::new(),
            unavailable: OnceLock::new(),
            window,
            metrics,
        })
    }

    pub fn window(&self) -> FeedWindow {
        self.window
    }

    /// Makes the embedded store the history, starting from what it holds.
    pub fn use_disk(&self, store: Arc<EmbeddedStore>) -> Result<(), StoreError> {
        let bounds = store.feed_bounds()?;
        let mut recent = Recent::default();
        let from = bounds
            .next
            .saturating_sub(RECENT_ON_DISK_STORE as u64)
            .max(bounds.first_kept)
            .saturating_sub(1);
        for (_, bytes) in store.events_after(from, RECENT_ON_DISK_STORE)? {
            if let Ok(item) = FeedItem::decode(Bytes::from(bytes)) {
                recent.push(Arc::new(item));
                recent.shrink_to(RECENT_ON_DISK_STORE, RECENT_BYTES_ON_DISK_STORE);
            }
        }
        let mut state = self.lock();
        state.recent = recent;
        state.first_kept = bounds.first_kept;
        state.head = bounds.next - 1;
        drop(state);
        let _ = self.disk.set(store);
        self.metrics.feed_first_kept.set(bounds.first_kept as i64);
        self.metrics.feed_head.set(bounds.next as i64 - 1);
        Ok(())
    }

    /// Turns the feed off for this server (Watch answers `FAILED_PRECONDITION` with `reason`).
    pub fn disable(&self, reason: String) {
        let _ = self.unavailable.set(reason);
    }

    /// Why the feed cannot be watched, if it cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.get().map(String::as_str)
    }

    /// Publishes a group of events (whole store positions, in order). `first_kept` is the
    /// store's own account of its history (embedded); with a shared broker log the memory window
    /// decides it.
    pub fn publish(&self, events: Vec<FeedItem>, first_kept: Option<u64>, now: Timestamp) {
        if events.is_empty() {
            if let Some(first_kept) = first_kept {
                self.lock().first_kept = first_kept;
                self.metrics.feed_first_kept.set(first_kept as i64);
            }
            return;
        }
        if self.unavailable.get().is_some() {
            return;
        }
        let group: Published = events.into_iter().map(Arc::new).collect();
        let mut state = self.lock();
        if state.head == 0 && state.recent.is_empty() && first_kept.is_none() {
            // Memory history starts with the first event this instance saw.
            state.first_kept = group[0].sequence;
        }
        state.head = group[group.len() - 1].sequence;
        for event in group.iter() {
            state.recent.push(event.clone());
        }
        let on_disk = self.disk.get().is_some();
        let (capacity, max_bytes) = if on_disk {
            (RECENT_ON_DISK_STORE, RECENT_BYTES_ON_DISK_STORE)
        } else {
            (
                usize::try_from(self.window.max_events).unwrap_or(usize::MAX),
                MEMORY_WINDOW_BYTES,
            )
        };
        let oldest = if on_disk {
            None
        } else {
            self.window.oldest(now)
        };
        while let Some(front) = state.recent.front() {
            let too_many = state.recent.len() > capacity || state.recent.bytes > max_bytes;
            let too_old = oldest
                .zip(front.time)
                .is_some_and(|(oldest, time)| order(time) < order(oldest));
            if !(too_many || too_old) {
                break;
            }
            let evicted = front.sequence;
            state.recent.pop_front();
            if !on_disk {
                // Events sharing a sequence leave together, so a resume never splits one.
                while state.recent.front().is_some_and(|e| e.sequence == evicted) {
                    state.recent.pop_front();
                }
                state.first_kept = evicted + 1;
            }
        }
        if let Some(first_kept) = first_kept {
            state.first_kept = first_kept;
        }
        let events = group.len() as u64;
        let delivered = self.watchers.publish(&(), group);
        self.metrics.feed_watchers_cut_off.inc_by(delivered.cut_off);
        self.metrics.feed_events.inc_by(events);
        self.metrics.feed_first_kept.set(state.first_kept as i64);
        self.metrics.feed_head.set(state.head as i64);
    }

    /// The newest sequence published.
    pub fn head(&self) -> u64 {
        self.lock().head
    }

    /// Whether `sequence` is beyond `applied`, the newest position the sessions reflect, when
    /// this server can tell: the embedded store numbers every change itself; on a shared
    /// broker log another instance may be ahead of this one.
    pub fn is_unknown(&self, sequence: u64, applied: u64) -> Option<u64> {
        (self.disk.get().is_some() && sequence > applied).then_some(applied)
    }

    /// Fails if the events after `after` are no longer all kept.
    pub fn check_kept(&self, after: u64) -> Result<(), Compacted> {
        self.lock().check_kept(after)
    }

    /// Registers a watcher that has everything up to `after`, if memory holds every event
    /// after it.
    pub fn follow(&self, after: u64) -> Result<Follow, Compacted> {
        let state = self.lock();
        state.check_kept(after)?;
        // Memory history holds everything since `first_kept`; disk-backed memory only the
        // latest run of sequences.
        let in_memory = self.disk.get().is_none()
            || after >= state.head
            || state
                .recent
                .front()
                .is_some_and(|front| front.sequence <= after.saturating_add(1));
        if !in_memory {
            return Ok(Follow::Behind);
        }
        let tail = state
            .recent
            .iter()
            .skip_while(|event| event.sequence <= after)
            .cloned()
            .collect();
        let (subscriber, registered) = self.watchers.subscribe(());
        if registered {
            self.metrics.feed_watchers.inc();
        }
        drop(state);
        Ok(Follow::Live {
            tail,
            live: Watcher { subscriber },
        })
    }

    /// Up to `limit` events after `after` from the disk history (embedded store). Blocking.
    pub fn history_after(&self, after: u64, limit: usize) -> Result<Vec<FeedItem>, HistoryError> {
        let Some(store) = self.disk.get() else {
            return Ok(Vec::new());
        };
        let rows = store.events_after(after, limit)?;
        // Trimmed between the check and the read: the first event is not the next one.
        self.check_kept(after)?;
        // The store may already hold a batch whose commit is still being made durable; its
        // events go out once it is, with the batch.
        let head = self.head();
        rows.into_iter()
            .take_while(|(sequence, _)| *sequence <= head)
            .map(|(_, bytes)| FeedItem::decode(Bytes::from(bytes)).map_err(HistoryError::from))
            .collect()
    }

    /// Ends every watcher after what is queued for it (shutdown); later watchers end at once.
    pub fn close(&self) {
        let _state = self.lock();
        self.watchers.close();
    }

    pub fn is_closed(&self) -> bool {
        self.watchers.is_closed()
    }

    /// Groups a watcher may have waiting before it is cut off.
    pub fn queue(&self) -> usize {
        self.watchers.queue()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        // Every change under the lock is a push, a pop or a map update, so a poisoned lock
        // still holds a consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The events held in memory, oldest first, with their encoded size.
#[derive(Default)]
struct Recent {
    events: VecDeque<Arc<FeedItem>>,
    sizes: VecDeque<usize>,
    bytes: usize,
}

impl Recent {
    fn push(&mut self, event: Arc<FeedItem>) {
        let size = event.bytes.len();
        self.bytes += size;
        self.sizes.push_back(size);
        self.events.push_back(event);
    }

    fn pop_front(&mut self) {
        if self.events.pop_front().is_some() {
            self.bytes -= self.sizes.pop_front().unwrap_or(0);
        }
    }

    /// Drops the oldest until at most `count` events and `bytes` remain.
    fn shrink_to(&mut self, count: usize, bytes: usize) {
        while self.len() > count || self.bytes > bytes {
            self.pop_front();
        }
    }

    fn front(&self) -> Option<&Arc<FeedItem>> {
        self.events.front()
    }

    fn len(&self) -> usize {
        self.events.len()
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<FeedItem>> {
        self.events.iter()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history before sequence {} is no longer kept", .0.first_kept)]
    Compacted(Compacted),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a stored feed event cannot be decoded: {0}")]
    Corrupt(#[from] prost::DecodeError),
}

impl From<Compacted> for HistoryError {
    fn from(compacted: Compacted) -> Self {
        HistoryError::Compacted(compacted)
    }
}

/// The feed event of a change to a session (`session`: as it is after the change).
pub fn feed_event(
    sequence: u64,
    kind: EventKind,
    session: feed::Session,
    time: Timestamp,
) -> SessionEvent {
    SessionEvent {
        sequence,
        kind: match kind {
            EventKind::Started => FeedKind::Started,
            EventKind::Updated => FeedKind::Updated,
            EventKind::Ended => FeedKind::Ended,
            EventKind::Purged => FeedKind::Purged,
        } as i32,
        session_key: session.session_key.clone(),
        data_source: session.data_source.clone(),
        session: Some(session),
        time: Some(time),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, data_source: &str) -> FeedItem {
        FeedItem::encode(&SessionEvent {
            sequence,
            data_source: data_source.into(),
            time: Some(Timestamp {
                seconds: 100,
                nanos: 0,
            }),
            ..Default::default()
        })
    }

    fn memory_feed(max_events: u64) -> Arc<Feed> {
        let window = FeedWindow {
            max_events,
            max_age: None,
        };
        Feed::new(window, 4, Metrics::new())
    }

    const NOW: Timestamp = Timestamp {
        seconds: 100,
        nanos: 0,
    };

    #[tokio::test]
    async fn a_memory_window_drops_whole_positions_and_says_where_history_starts() {
        let feed = memory_feed(3);
        feed.publish(vec![event(1, "a"), event(1, "b")], None, NOW);
        feed.publish(vec![event(2, "a")], None, NOW);
        assert!(feed.check_kept(0).is_ok());
        feed.publish(vec![event(4, "a")], None, NOW);
        // Both events of position 1 left together.
        assert_eq!(feed.check_kept(0), Err(Compacted { first_kept: 2 }));
        assert!(feed.check_kept(1).is_ok());
        let Ok(Follow::Live { tail, .. }) = feed.follow(1) else {
            panic!("memory history is always live");
        };
        let sequences: Vec<u64> = tail.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, [2, 4]);
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_cut_off_and_others_are_not() {
        let feed = memory_feed(100);
        let Ok(Follow::Live { live: mut slow, .. }) = feed.follow(0) else {
            panic!("memory history is always live");
        };
        let Ok(Follow::Live { live: mut fast, .. }) = feed.follow(0) else {
            panic!("memory history is always live");
        };
        for sequence in 1..=5 {
            feed.publish(vec![event(sequence, "a")], None, NOW);
            assert_eq!(fast.recv().await.unwrap()[0].sequence, sequence);
        }
        // The queue holds 4 groups: the fifth cut the slow watcher off.
        for sequence in 1..=4 {
            assert_eq!(slow.recv().await.unwrap()[0].sequence, sequence);
        }
        assert!(slow.recv().await.is_none());
        assert!(!feed.is_closed());
    }
}
