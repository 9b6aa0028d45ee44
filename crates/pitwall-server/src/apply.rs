//! The one way the log's records reach the server's state: [`Applier::apply`] folds records,
//! in log order, into the shared projection, then queues their notifications and feed events
//! and updates the session gauges.
//!
//! Every log calls it: the embedded log right after its commit, a broker log's follower for
//! each record it reads (this instance's and every other's). Nothing else writes the
//! projection, the notification hub or the feed.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use pitwall_core::lifecycle::END_REASON_DETAIL;
use pitwall_core::{Event, EventKind, Projection, Record};
use prost_types::Timestamp;

use crate::feed::{Feed, FeedItem, feed_event};
use crate::log::Position;
use crate::metrics::Metrics;
use crate::notify::Hub;

/// The projection behind a `std` lock: held for map lookups and clones only, never across an
/// await; written only by [`Applier`], just long enough to apply a few records.
pub type SharedProjection = Arc<RwLock<Projection>>;

/// Dropped-associate notes kept for writers to pick up; older ones are forgotten.
const MAX_DROP_NOTES: usize = 10_000;

/// Records a log has made durable, to apply in order.
pub struct Applied {
    /// Each record with its position in the log.
    pub records: Vec<(Position, Record)>,
    /// The position the log stands at after them: at least each record's (a log may pass
    /// positions that hold nothing to apply).
    pub through: Position,
    /// When the log recorded them.
    pub at: Timestamp,
    /// Their feed events, encoded and stored by the log in the same commit; `None` to build
    /// them here from the sessions as applied.
    pub events: Option<Vec<FeedItem>>,
    /// The first position the log still keeps feed history for, when the log keeps it.
    pub first_kept: Option<u64>,
}

#[derive(Clone)]
pub struct Applier {
    pub projection: SharedProjection,
    pub hub: Arc<Hub>,
    pub feed: Arc<Feed>,
    pub metrics: Metrics,
    drops: Arc<Mutex<DropNotes>>,
}

/// Associates a `SessionInfo` dropped, by its position, for the writer of that record to put
/// back (a concurrent writer on another instance replaced the list without them). A `std`
/// mutex: pushed by the applier and taken by the writer, never held across an await.
type DropNotes = VecDeque<(Position, Vec<String>)>;

impl Applier {
    pub fn new(projection: Projection, hub: Arc<Hub>, feed: Arc<Feed>, metrics: Metrics) -> Self {
        Applier {
            projection: Arc::new(RwLock::new(projection)),
            hub,
            feed,
            metrics,
            drops: Arc::default(),
        }
    }

    /// Applies the records in order, then queues the notifications and feed events they cause
    /// (in that order).
    pub fn apply(&self, applied: Applied) {
        let Applied {
            records,
            through,
            at,
            events: stored,
            first_kept,
        } = applied;
        let mut built = Vec::new();
        let mut drops = Vec::new();
        let events = {
            let mut projection = write(&self.projection);
            let mut events = Vec::new();
            for (position, record) in records {
                if let Some(dropped) = dropped_associates(&projection, &record) {
                    drops.push((position, dropped));
                }
                projection.apply_with(record, at, &mut |event, session| {
                    if stored.is_none() {
                        let event = feed_event(position, event.kind, session.to_view(), at);
                        built.push(FeedItem::encode(&event));
                    }
                    events.push(event);
                });
            }
            projection.set_position(through);
            self.count(&projection, &events);
            events
        };
        if !drops.is_empty() {
            let mut notes = self.drops.lock().unwrap_or_else(|e| e.into_inner());
            for note in drops {
                if notes.len() >= MAX_DROP_NOTES {
                    notes.pop_front();
                }
                notes.push_back(note);
            }
        }
        self.metrics.sessions_purged.inc_by(
            events
                .iter()
                .filter(|e| e.kind == EventKind::Purged)
                .count() as u64,
        );
        self.hub.publish(&events);
        self.feed.publish(stored.unwrap_or(built), first_kept, at);
    }

    /// The associates that the `SessionInfo` at `position` dropped from its session's list, if
    /// it dropped any: a concurrent writer replaced the list without them.
    pub fn take_drops(&self, position: Position) -> Option<Vec<String>> {
        let mut notes = self.drops.lock().unwrap_or_else(|e| e.into_inner());
        let index = notes.iter().position(|(at, _)| *at == position)?;
        notes.remove(index).map(|(_, dropped)| dropped)
    }

    fn count(&self, projection: &Projection, events: &[Event]) {
        let mut counted = HashSet::new();
        for event in events {
            // Counted as the end is applied (not when the sweeper hears back), so the count is
            // current by the time anyone sees the end.
            if event.kind == EventKind::Ended
                && let Some(reason) = projection
                    .get(&event.session_key)
                    .and_then(|session| session.details.get(END_REASON_DETAIL))
            {
                self.metrics
                    .sessions_auto_ended
                    .with_label_values(&[reason.as_str()])
                    .inc();
            }
            if counted.insert(event.data_source.as_str()) {
                let counts = projection.counts_of(&event.data_source);
                self.metrics
                    .set_session_counts(&event.data_source, counts.total, counts.completed);
            }
        }
    }
}

/// Associates in the session's list that a `SessionInfo` replacing the list leaves out.
fn dropped_associates(projection: &Projection, record: &Record) -> Option<Vec<String>> {
    let Record::SessionInfo {
        session_key,
        packet,
    } = record
    else {
        return None;
    };
    if packet.associate_session_keys.is_empty() {
        return None;
    }
    let dropped: Vec<String> = projection
        .get(session_key)?
        .associates
        .iter()
        .filter(|a| !packet.associate_session_keys.contains(a))
        .cloned()
        .collect();
    (!dropped.is_empty()).then_some(dropped)
}

// A panic while holding the projection lock would come from a bug in apply; the projection is
// then as the last complete apply left it, so reads may go on.
pub fn read(projection: &SharedProjection) -> RwLockReadGuard<'_, Projection> {
    projection.read().unwrap_or_else(|e| e.into_inner())
}

fn write(projection: &SharedProjection) -> RwLockWriteGuard<'_, Projection> {
    projection.write().unwrap_or_else(|e| e.into_inner())
}
