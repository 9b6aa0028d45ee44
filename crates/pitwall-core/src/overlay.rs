//! Sessions as a batch of records will leave them, before the batch is durable.
//!
//! The writer decides each command of a batch against the sessions as the earlier commands of
//! the same batch leave them, and the embedded store persists those states. An [`Overlay`]
//! keeps the batch's changes on top of the projection and folds each record with the same
//! transition as [`Projection::apply`], so what it holds is what the projection holds once the
//! batch is applied.

use std::collections::HashMap;

use prost_types::Timestamp;

use crate::projection::Projection;
use crate::record::Record;
use crate::session::Session;
use crate::transition::EventKind;

/// A session changed by the batch: as it stands, or as it was when a `Purge` removed it.
#[derive(Debug, Clone, PartialEq)]
pub enum Changed {
    Live(Session),
    Purged(Session),
}

pub struct Overlay<'p> {
    base: &'p Projection,
    changed: HashMap<String, Changed>,
    next_sequence: u64,
}

impl<'p> Overlay<'p> {
    pub fn new(base: &'p Projection) -> Overlay<'p> {
        Overlay {
            base,
            changed: HashMap::new(),
            next_sequence: base.next_sequence(),
        }
    }

    /// The session with this key as the batch so far leaves it.
    pub fn get(&self, session_key: &str) -> Option<&Session> {
        match self.changed.get(session_key) {
            Some(Changed::Live(session)) => Some(session),
            Some(Changed::Purged(_)) => None,
            None => self.base.get(session_key),
        }
    }

    /// Folds `record` in, recorded at `at`; returns what it did with the session right after it
    /// (for a purge, the session as it left). Records for keys that are not here do nothing:
    /// the writer only appends them for sessions it found.
    pub fn apply(&mut self, record: &Record, at: Timestamp) -> Option<(EventKind, &Session)> {
        let session_key = record.session_key();
        if !matches!(self.changed.get(session_key), Some(Changed::Live(_))) {
            // First change in this batch (or a new life after a purge): start from the
            // projection's copy, or from the record itself.
            let slot = match self.get(session_key) {
                Some(current) => Changed::Live(current.clone()),
                None => {
                    let session = Session::begin(record, self.next_sequence, at)?;
                    self.next_sequence += 1;
                    let slot = self
                        .changed
                        .entry(session_key.to_owned())
                        .insert_entry(Changed::Live(session))
                        .into_mut();
                    return Some((EventKind::Started, slot.session()));
                }
            };
            self.changed.insert(session_key.to_owned(), slot);
        }
        let slot = self.changed.get_mut(session_key)?;
        let Changed::Live(session) = slot else {
            return None;
        };
        let kind = session.apply(record, at)?;
        if kind == EventKind::Purged {
            let session = std::mem::take(session);
            *slot = Changed::Purged(session);
        }
        Some((kind, slot.session()))
    }

    /// Every session the batch changed, in no particular order.
    pub fn into_changes(self) -> impl Iterator<Item = Changed> {
        self.changed.into_values()
    }
}

impl Changed {
    pub fn session(&self) -> &Session {
        match self {
            Changed::Live(session) | Changed::Purged(session) => session,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use pitwall_proto::api::{
        AddAssociateSessionRequest, CreateSessionRequest, EndSessionRequest,
        UpdateSessionDetailsRequest, UpdateSessionIdentifierRequest,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::command::{Command, Context, embedded_offsets};
    use crate::lifecycle::AutoEndPolicy;
    use crate::validate::Limits;

    const KEYS: [&str; 4] = ["a", "b", "c", "d"];

    /// One write, on one of a few keys, so that a batch often touches a session twice.
    fn command() -> impl Strategy<Value = Command> {
        let key = prop::sample::select(&KEYS[..]).prop_map(str::to_owned);
        let value = prop::sample::select(&["x", "y", "z"][..]).prop_map(str::to_owned);
        prop_oneof![
            (key.clone(), prop::sample::select(&["ds1", "ds2"][..])).prop_map(
                |(session_key, data_source)| Command::Create {
                    session_key,
                    request: CreateSessionRequest {
                        data_source: data_source.into(),
                        ..Default::default()
                    },
                }
            ),
            (key.clone(), value.clone()).prop_map(|(session_key, identifier)| {
                Command::UpdateIdentifier(UpdateSessionIdentifierRequest {
                    session_key,
                    identifier,
                })
            }),
            (key.clone(), value.clone(), value.clone()).prop_map(|(session_key, name, value)| {
                Command::UpdateDetails(UpdateSessionDetailsRequest {
                    session_key,
                    details: BTreeMap::from([(name, value)]),
                })
            }),
            (key.clone(), key.clone()).prop_map(|(session_key, associate_session_key)| {
                Command::AddAssociate(AddAssociateSessionRequest {
                    session_key,
                    associate_session_key,
                })
            }),
            key.clone()
                .prop_map(|session_key| Command::End(EndSessionRequest {
                    session_key,
                    ..Default::default()
                })),
            key.clone().prop_map(|session_key| Command::AutoEnd {
                session_key,
                policy: AutoEndPolicy {
                    idle_after: Some(Duration::from_secs(1)),
                    max_duration: None,
                },
            }),
            key.prop_map(|session_key| Command::Purge {
                session_key,
                completed_for: Duration::from_secs(1),
            }),
        ]
    }

    fn sorted(sessions: impl Iterator<Item = Session>) -> Vec<Session> {
        let mut sessions: Vec<Session> = sessions.collect();
        sessions.sort_by(|a, b| a.key.cmp(&b.key));
        sessions
    }

    proptest! {
        /// What the writer decides a batch leaves (and the embedded store persists) is what
        /// applying the batch's records leaves, and what a replay of every record rebuilds.
        #[test]
        fn state_decided_in_a_batch_is_the_state_after_a_replay(
            batches in prop::collection::vec(prop::collection::vec(command(), 1..8), 1..8)
        ) {
            let limits = Limits::default();
            let mut live = Projection::default();
            let mut log = Vec::new();
            for (n, batch) in batches.into_iter().enumerate() {
                // Two seconds between batches: auto-ends and purges come due.
                let now = prost_types::Timestamp { seconds: 1_700_000_000 + 2 * n as i64, nanos: 0 };
                let ctx = Context { now, limits: &limits, offsets: &embedded_offsets };
                let mut overlay = Overlay::new(&live);
                let mut records = Vec::new();
                for command in batch {
                    if command.validate(&limits).is_err() {
                        continue;
                    }
                    let current = overlay.get(command.session_key());
                    let Ok(decision) = command.decide(current, &ctx) else { continue };
                    for record in decision.records() {
                        overlay.apply(record, now);
                        records.push(record.clone());
                    }
                }
                let decided: Vec<Changed> = overlay.into_changes().collect();
                for record in &records {
                    live.apply(record.clone(), now);
                }
                for changed in decided {
                    match changed {
                        Changed::Live(session) => {
                            prop_assert_eq!(live.get(&session.key), Some(&session));
                        }
                        Changed::Purged(session) => {
                            prop_assert!(live.get(&session.key).is_none());
                        }
                    }
                }
                log.extend(records.into_iter().map(|record| (record, now)));
            }
            let mut replayed = Projection::default();
            for (record, at) in log {
                replayed.apply(record, at);
            }
            prop_assert_eq!(
                sorted(replayed.sessions().cloned()),
                sorted(live.sessions().cloned())
            );
        }
    }
}
