//! Applying records to the shared projection, then queuing their notifications and updating the
//! session gauges. Both stores go through here: the embedded writer after its commit, the Kafka
//! follower as it reads the topic (which also publishes the feed, as only it knows the offsets).

use std::collections::HashSet;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use pitwall_core::lifecycle::{END_REASON_DETAIL, add, order, retention_expired};
use pitwall_core::{Event, EventKind, Projection, Record, Session};
use prost_types::Timestamp;

use crate::feed::{Feed, FeedItem, feed_event};
use crate::metrics::Metrics;
use crate::notify::Hub;

/// The projection behind a `std` lock: held for map lookups and clones only, never across an
/// await; written only by [`Applier`], just long enough to apply a few records.
pub type SharedProjection = Arc<RwLock<Projection>>;

/// Sessions one retention pass removes at most, so a large backlog is purged over several
/// passes without holding the projection for long.
pub const MAX_PURGE_PER_PASS: usize = 1000;

#[derive(Clone)]
pub struct Applier {
    pub projection: SharedProjection,
    pub hub: Arc<Hub>,
    pub feed: Arc<Feed>,
    pub metrics: Metrics,
}

impl Applier {
    /// Applies records the store recorded at `at`, in order, then queues the notifications
    /// they cause (in that order). `position` is the feed sequence they bring the sessions to.
    pub fn apply(&self, records: impl IntoIterator<Item = Record>, at: Timestamp, position: u64) {
        let events = {
            let mut projection = write(&self.projection);
            let mut events = Vec::new();
            for record in records {
                events.extend(projection.apply(record, at));
            }
            projection.set_position(position);
            self.count(&projection, &events);
            events
        };
        self.hub.publish(&events);
    }

    /// Applies one record of the Kafka topic at feed sequence `sequence` and publishes its feed
    /// events. With `retention`, completed sessions older than it at the record's time leave
    /// too, so every instance reading the topic purges the same sessions at the same place.
    pub fn apply_logged(
        &self,
        record: Option<Record>,
        at: Timestamp,
        sequence: u64,
        retention: Option<&mut RetentionClock>,
    ) {
        let mut feed_events = Vec::new();
        let events = {
            let mut projection = write(&self.projection);
            let mut events = record
                .map(|record| projection.apply(record, at))
                .unwrap_or_default();
            for event in &events {
                if let Some(session) = projection.get(&event.session_key) {
                    feed_events.push(feed_event(sequence, event.kind, session.to_view(), at));
                }
            }
            if let Some(clock) = retention {
                for event in &events {
                    if event.kind == EventKind::Ended {
                        clock.ended_at(at);
                    }
                }
                if clock.due(at) {
                    let (expired, next) = expired(&projection, clock.completed_for, at);
                    clock.next_due = next;
                    for (session, event) in expired.iter().filter_map(|key| projection.purge(key)) {
                        feed_events.push(feed_event(
                            sequence,
                            EventKind::Purged,
                            session.to_view(),
                            at,
                        ));
                        events.push(event);
                    }
                }
            }
            projection.set_position(sequence);
            self.count(&projection, &events);
            events
        };
        self.metrics.sessions_purged.inc_by(
            events
                .iter()
                .filter(|e| e.kind == EventKind::Purged)
                .count() as u64,
        );
        self.hub.publish(&events);
        let items = feed_events.iter().map(FeedItem::encode).collect();
        self.feed.publish(items, None, at);
    }

    /// Removes sessions for retention (embedded store, after their rows were deleted and
    /// their feed events written); `position` is the feed sequence of the last of them.
    pub fn purge(&self, keys: &[String], position: u64) {
        let mut projection = write(&self.projection);
        let events: Vec<Event> = keys
            .iter()
            .filter_map(|key| projection.purge(key).map(|(_, event)| event))
            .collect();
        projection.set_position(position);
        self.count(&projection, &events);
        self.metrics.sessions_purged.inc_by(events.len() as u64);
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

/// Completed sessions older than `completed_for` at `now`, oldest end first (ties by creation),
/// at most [`MAX_PURGE_PER_PASS`]: the same answer on every instance with the same sessions.
/// Also when the next pass is due: when the next of the others expires (`now` again if the cap
/// left some behind).
fn expired(
    projection: &Projection,
    completed_for: Duration,
    now: Timestamp,
) -> (Vec<String>, Option<Timestamp>) {
    let mut expired: Vec<&Session> = Vec::new();
    let mut next: Option<Timestamp> = None;
    for session in projection.sessions().filter(|s| s.is_complete()) {
        if retention_expired(session, completed_for, now) {
            expired.push(session);
        } else if let Some(ended) = session.last_activity {
            let expires = add(ended, completed_for);
            if next.is_none_or(|n| order(expires) < order(n)) {
                next = Some(expires);
            }
        }
    }
    expired.sort_by_key(|session| (session.last_activity.map(order), session.sequence));
    if expired.len() > MAX_PURGE_PER_PASS {
        next = Some(now);
    }
    let keys = expired
        .into_iter()
        .take(MAX_PURGE_PER_PASS)
        .map(|session| session.key.clone())
        .collect();
    (keys, next)
}

/// When the Kafka follower purges: at the first record whose time (log time, the producer's
/// timestamp) has reached the moment the earliest completed session expires, but not within a
/// tenth of the retention (at most a minute) of log time after the last pass, since a pass scans
/// every session. Every instance reads the same records with the same times, so all purge the
/// same sessions at the same place.
pub struct RetentionClock {
    pub completed_for: Duration,
    next_due: Option<Timestamp>,
    last_pass: Option<Timestamp>,
}

/// Log time between two retention passes at most.
const MAX_PASS_SPACING: Duration = Duration::from_secs(60);

impl RetentionClock {
    pub fn new(completed_for: Duration) -> RetentionClock {
        RetentionClock {
            completed_for,
            next_due: None,
            last_pass: None,
        }
    }

    /// A session ended at log time `at`: it expires `completed_for` later.
    fn ended_at(&mut self, at: Timestamp) {
        let expires = add(at, self.completed_for);
        if self.next_due.is_none_or(|due| order(expires) < order(due)) {
            self.next_due = Some(expires);
        }
    }

    /// Whether a pass is due at `at`; if so, it counts as done.
    fn due(&mut self, at: Timestamp) -> bool {
        let spacing = (self.completed_for / 10).min(MAX_PASS_SPACING);
        let expired = self.next_due.is_some_and(|due| order(due) <= order(at));
        let spaced = self
            .last_pass
            .is_none_or(|last| order(add(last, spacing)) <= order(at));
        if expired && spaced {
            self.last_pass = Some(at);
        }
        expired && spaced
    }
}

// A panic while holding the projection lock would come from a bug in apply; the projection is
// then as the last complete apply left it, so reads may go on.
pub fn read(projection: &SharedProjection) -> RwLockReadGuard<'_, Projection> {
    projection.read().unwrap_or_else(|e| e.into_inner())
}

fn write(projection: &SharedProjection) -> RwLockWriteGuard<'_, Projection> {
    projection.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: i64) -> Timestamp {
        Timestamp {
            seconds: millis / 1000,
            nanos: ((millis % 1000) * 1_000_000) as i32,
        }
    }

    #[test]
    fn retention_passes_come_at_the_first_expiry_and_are_spaced() {
        let mut clock = RetentionClock::new(Duration::from_secs(10));
        assert!(!clock.due(at(50_000)), "nothing has ended");
        clock.ended_at(at(1_000));
        assert!(!clock.due(at(10_999)));
        assert!(clock.due(at(11_000)));
        // The pass found the next expiry 200 ms later; passes are a second (a tenth) apart.
        clock.next_due = Some(at(11_200));
        assert!(!clock.due(at(11_500)));
        assert!(clock.due(at(12_000)));
    }
}
