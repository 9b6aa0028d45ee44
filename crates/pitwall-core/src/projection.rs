//! The sessions as the log says they are: records folded in log order.
//!
//! [`Projection::apply`] is the only place records change sessions, for live writes and for
//! replay alike, and it yields the events that notifications are made from, in log order.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use crate::record::Record;
use crate::session::Session;

/// What applying a record did to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Started,
    Updated,
    Ended,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub session_key: String,
    pub data_source: String,
}

/// Records held for keys whose `NewSession` has not been seen (other partitions, cut-off
/// history). Bounded so a stream of orphan records cannot grow memory without end.
pub const DEFAULT_HELD_RECORDS_LIMIT: usize = 100_000;

/// The sessions of one data source.
#[derive(Debug, Default)]
struct DataSourceSessions {
    /// Keys in creation order: `GetCurrentSessions` answers from here.
    keys: Vec<String>,
    completed: usize,
}

/// How many sessions a data source has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounts {
    pub total: usize,
    pub completed: usize,
}

/// Sessions are spread over this many maps: growing a map rehashes it while the projection is
/// locked, and a 64th of a million sessions rehashes in a fraction of a millisecond where the
/// whole map took seconds.
const SHARDS: usize = 64;

#[derive(Debug)]
pub struct Projection {
    /// Boxed, so a rehash moves pointers rather than whole sessions.
    shards: Vec<HashMap<String, Box<Session>>>,
    shard_hasher: RandomState,
    by_data_source: HashMap<String, DataSourceSessions>,
    held: HashMap<String, Vec<Record>>,
    held_count: usize,
    held_limit: usize,
    dropped_orphans: u64,
    next_sequence: u64,
}

impl Default for Projection {
    fn default() -> Self {
        Projection::with_held_limit(DEFAULT_HELD_RECORDS_LIMIT)
    }
}

impl Projection {
    pub fn with_held_limit(held_limit: usize) -> Self {
        Projection {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            shard_hasher: RandomState::new(),
            by_data_source: HashMap::new(),
            held: HashMap::new(),
            held_count: 0,
            held_limit,
            dropped_orphans: 0,
            next_sequence: 0,
        }
    }

    /// Applies one record and returns what it did. `NewSession` for a known key is ignored
    /// (the first wins), `SessionInfo` merges, `EndOfSession` completes a live session once,
    /// and records for unknown keys wait for their `NewSession`.
    pub fn apply(&mut self, record: Record) -> Vec<Event> {
        let mut events = Vec::new();
        self.apply_into(record, &mut events);
        events
    }

    fn apply_into(&mut self, record: Record, events: &mut Vec<Event>) {
        match record {
            Record::NewSession {
                session_key,
                packet,
            } => {
                if self.get(&session_key).is_some() {
                    return;
                }
                let session = Session::start(&session_key, self.next_sequence, &packet);
                self.insert(session);
                events.push(Event {
                    kind: EventKind::Started,
                    data_source: packet.data_source,
                    session_key: session_key.clone(),
                });
                if let Some(held) = self.held.remove(&session_key) {
                    self.held_count -= held.len();
                    for record in held {
                        self.apply_into(record, events);
                    }
                }
            }
            Record::SessionInfo {
                session_key,
                packet,
            } => match self.get_mut(&session_key) {
                Some(session) => {
                    if session.merge(&packet) {
                        events.push(Event {
                            kind: EventKind::Updated,
                            data_source: session.data_source.clone(),
                            session_key,
                        });
                    }
                }
                None => self.hold(Record::SessionInfo {
                    session_key,
                    packet,
                }),
            },
            Record::EndOfSession {
                session_key,
                packet,
            } => {
                let shard = self.shard_of(&session_key);
                match self.shards[shard].get_mut(&session_key) {
                    Some(session) => {
                        if session.complete(&packet) {
                            if let Some(sessions) =
                                self.by_data_source.get_mut(&session.data_source)
                            {
                                sessions.completed += 1;
                            }
                            events.push(Event {
                                kind: EventKind::Ended,
                                data_source: session.data_source.clone(),
                                session_key,
                            });
                        }
                    }
                    None => self.hold(Record::EndOfSession {
                        session_key,
                        packet,
                    }),
                }
            }
        }
    }

    fn hold(&mut self, record: Record) {
        if self.held_count >= self.held_limit {
            self.dropped_orphans += 1;
            return;
        }
        self.held_count += 1;
        self.held
            .entry(record.session_key().to_owned())
            .or_default()
            .push(record);
    }

    /// Puts back a session read from a snapshot (embedded store startup). Sessions must come in
    /// `sequence` order so listings keep creation order.
    pub fn restore(&mut self, session: Session) {
        self.insert(session);
    }

    fn insert(&mut self, session: Session) {
        self.next_sequence = self.next_sequence.max(session.sequence + 1);
        let sessions = self
            .by_data_source
            .entry(session.data_source.clone())
            .or_default();
        sessions.keys.push(session.key.clone());
        if session.is_complete() {
            sessions.completed += 1;
        }
        let shard = self.shard_of(&session.key);
        self.shards[shard].insert(session.key.clone(), Box::new(session));
    }

    fn shard_of(&self, session_key: &str) -> usize {
        (self.shard_hasher.hash_one(session_key) % SHARDS as u64) as usize
    }

    /// Makes room for `additional` more sessions (startup knows how many it will restore).
    pub fn reserve(&mut self, additional: usize) {
        for shard in &mut self.shards {
            shard.reserve(additional / SHARDS + 1);
        }
    }

    pub fn get(&self, session_key: &str) -> Option<&Session> {
        self.shards[self.shard_of(session_key)]
            .get(session_key)
            .map(Box::as_ref)
    }

    fn get_mut(&mut self, session_key: &str) -> Option<&mut Session> {
        let shard = self.shard_of(session_key);
        self.shards[shard].get_mut(session_key).map(Box::as_mut)
    }

    /// Keys of every session of `data_source`, completed included, oldest first.
    pub fn keys_of(&self, data_source: &str) -> &[String] {
        self.by_data_source
            .get(data_source)
            .map(|sessions| sessions.keys.as_slice())
            .unwrap_or_default()
    }

    /// Sessions of `data_source`: all of them (completed included) and the completed ones.
    pub fn counts_of(&self, data_source: &str) -> SessionCounts {
        self.by_data_source
            .get(data_source)
            .map(|sessions| SessionCounts {
                total: sessions.keys.len(),
                completed: sessions.completed,
            })
            .unwrap_or_default()
    }

    /// Every data source with its session counts.
    pub fn counts_by_data_source(&self) -> impl Iterator<Item = (&str, SessionCounts)> {
        self.by_data_source
            .keys()
            .map(|data_source| (data_source.as_str(), self.counts_of(data_source)))
    }

    /// The sequence the next new session will get.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    /// Every session, in no particular order.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.shards
            .iter()
            .flat_map(|shard| shard.values().map(Box::as_ref))
    }

    /// Records waiting for their `NewSession`.
    pub fn held_records(&self) -> usize {
        self.held_count
    }

    /// Orphan records dropped because the hold was full.
    pub fn dropped_orphans(&self) -> u64 {
        self.dropped_orphans
    }
}

#[cfg(test)]
mod tests {
    use pitwall_proto::open_data::{EndOfSessionPacket, NewSessionPacket, SessionInfoPacket};

    use super::*;

    fn new_session(key: &str, data_source: &str) -> Record {
        Record::NewSession {
            session_key: key.into(),
            packet: NewSessionPacket {
                data_source: data_source.into(),
                session_info: Some(SessionInfoPacket {
                    r#type: "Session".into(),
                    version: 1,
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }

    fn info(key: &str, packet: SessionInfoPacket) -> Record {
        Record::SessionInfo {
            session_key: key.into(),
            packet,
        }
    }

    fn end(key: &str, seconds: i64) -> Record {
        Record::EndOfSession {
            session_key: key.into(),
            packet: EndOfSessionPacket {
                termination_time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_new_session_starts_and_notifies() {
        let mut p = Projection::default();
        let events = p.apply(new_session("a", "ds"));
        assert_eq!(
            events,
            vec![Event {
                kind: EventKind::Started,
                session_key: "a".into(),
                data_source: "ds".into()
            }]
        );
        assert_eq!(p.get("a").unwrap().data_source, "ds");
    }

    #[test]
    fn the_first_new_session_for_a_key_wins() {
        let mut p = Projection::default();
        p.apply(new_session("a", "ds1"));
        assert!(p.apply(new_session("a", "ds2")).is_empty());
        assert_eq!(p.get("a").unwrap().data_source, "ds1");
        assert_eq!(p.keys_of("ds2"), &[] as &[String]);
    }

    #[test]
    fn listing_is_exact_match_in_creation_order_with_completed_sessions() {
        let mut p = Projection::default();
        p.apply(new_session("b", "ds"));
        p.apply(new_session("x", "DS"));
        p.apply(new_session("a", "ds"));
        p.apply(end("b", 1));
        assert_eq!(p.keys_of("ds"), &["b".to_owned(), "a".to_owned()]);
        assert_eq!(p.keys_of("DS"), &["x".to_owned()]);
        assert_eq!(p.keys_of(""), &[] as &[String]);
    }

    #[test]
    fn only_the_first_end_completes_and_notifies() {
        let mut p = Projection::default();
        p.apply(new_session("a", "ds"));
        assert_eq!(p.apply(end("a", 5))[0].kind, EventKind::Ended);
        assert!(p.apply(end("a", 9)).is_empty());
        assert_eq!(p.get("a").unwrap().termination_time().unwrap().seconds, 5);
    }

    #[test]
    fn ended_sessions_still_merge_updates() {
        let mut p = Projection::default();
        p.apply(new_session("a", "ds"));
        p.apply(end("a", 5));
        let events = p.apply(info(
            "a",
            SessionInfoPacket {
                identifier: "late".into(),
                ..Default::default()
            },
        ));
        assert_eq!(events[0].kind, EventKind::Updated);
        assert_eq!(p.get("a").unwrap().identifier, "late");
    }

    #[test]
    fn a_merge_that_changes_nothing_emits_no_event() {
        let mut p = Projection::default();
        p.apply(new_session("a", "ds"));
        let same_type = SessionInfoPacket {
            r#type: "Session".into(),
            ..Default::default()
        };
        assert!(p.apply(info("a", same_type)).is_empty());
    }

    #[test]
    fn records_for_unseen_keys_wait_for_their_new_session() {
        let mut p = Projection::default();
        assert!(
            p.apply(info(
                "a",
                SessionInfoPacket {
                    identifier: "early".into(),
                    ..Default::default()
                }
            ))
            .is_empty()
        );
        assert!(p.apply(end("a", 3)).is_empty());
        assert!(p.get("a").is_none());
        assert_eq!(p.held_records(), 2);
        let kinds: Vec<_> = p
            .apply(new_session("a", "ds"))
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![EventKind::Started, EventKind::Updated, EventKind::Ended]
        );
        let session = p.get("a").unwrap();
        assert_eq!(session.identifier, "early");
        assert!(session.is_complete());
        assert_eq!(p.held_records(), 0);
    }

    #[test]
    fn held_records_are_bounded() {
        let mut p = Projection::with_held_limit(2);
        for key in ["a", "b", "c"] {
            p.apply(end(key, 1));
        }
        assert_eq!(p.held_records(), 2);
        assert_eq!(p.dropped_orphans(), 1);
    }

    #[test]
    fn the_reference_replay_sequence_ends_in_the_expected_state() {
        let mut p = Projection::default();
        p.apply(new_session("s", "DS"));
        p.apply(info(
            "s",
            SessionInfoPacket {
                r#type: "T".into(),
                version: 3,
                ..Default::default()
            },
        ));
        p.apply(info(
            "s",
            SessionInfoPacket {
                identifier: "id".into(),
                ..Default::default()
            },
        ));
        let a1 = vec!["a1".to_owned()];
        let a12 = vec!["a1".to_owned(), "a2".to_owned()];
        for list in [a1, a12.clone(), a12.clone()] {
            p.apply(info(
                "s",
                SessionInfoPacket {
                    associate_session_keys: list,
                    ..Default::default()
                },
            ));
        }
        p.apply(end("s", 1));
        let s = p.get("s").unwrap();
        assert_eq!(
            (s.identifier.as_str(), s.session_type.as_str(), s.version),
            ("id", "T", 3)
        );
        assert_eq!(s.associates, a12);
        assert!(s.is_complete());
        assert_eq!(
            p.counts_by_data_source().collect::<Vec<_>>(),
            vec![(
                "DS",
                SessionCounts {
                    total: 1,
                    completed: 1
                }
            )]
        );
    }

    #[test]
    fn restored_sessions_keep_creation_order_and_sequence() {
        let mut live = Projection::default();
        for (key, ds) in [("c", "ds"), ("a", "ds"), ("b", "ds")] {
            live.apply(new_session(key, ds));
        }
        let mut snapshot: Vec<Session> = live.sessions().cloned().collect();
        snapshot.sort_by_key(|s| s.sequence);
        let mut restored = Projection::default();
        for s in snapshot {
            restored.restore(s);
        }
        assert_eq!(restored.keys_of("ds"), live.keys_of("ds"));
        assert_eq!(restored.next_sequence(), live.next_sequence());
        assert_eq!(restored.counts_of("ds"), live.counts_of("ds"));
    }
}
