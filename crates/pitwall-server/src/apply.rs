//! Applying records to the shared projection, then queuing their notifications and updating the
//! session gauges. Both stores go through here: the embedded writer after its commit, the Kafka
//! follower as it reads the topic.

use std::collections::HashSet;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use pitwall_core::{Projection, Record};

use crate::metrics::Metrics;
use crate::notify::Hub;

/// The projection behind a `std` lock: held for map lookups and clones only, never across an
/// await; written only by [`Applier::apply`], just long enough to apply a few records.
pub type SharedProjection = Arc<RwLock<Projection>>;

#[derive(Clone)]
pub struct Applier {
    pub projection: SharedProjection,
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
}

impl Applier {
    /// Applies the records in order, then queues the notifications they cause (in that order).
    pub fn apply(&self, records: impl IntoIterator<Item = Record>) {
        let mut events = Vec::new();
        {
            let mut projection = write(&self.projection);
            for record in records {
                events.extend(projection.apply(record));
            }
            let mut counted = HashSet::new();
            for event in &events {
                if counted.insert(event.data_source.as_str()) {
                    let counts = projection.counts_of(&event.data_source);
                    self.metrics.set_session_counts(
                        &event.data_source,
                        counts.total,
                        counts.completed,
                    );
                }
            }
        }
        self.hub.publish(&events);
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
