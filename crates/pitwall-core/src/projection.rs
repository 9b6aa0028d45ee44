//! The sessions as the log says they are: records folded in log order.
//!
//! [`Projection::apply`] is the only place records change sessions, for live writes and for
//! replay alike, with the one transition of [`Session::apply`]; it yields the events that
//! notifications are made from, in log order. Sessions leave only by a `Purge` record
//! (retention).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::collections::{btree_map, hash_map};
use std::hash::{BuildHasher, RandomState};

use prost_types::Timestamp;

use crate::record::Record;
use crate::session::Session;
pub use crate::transition::{Event, EventKind};

/// Records held for keys whose `NewSession` has not been seen (other partitions, cut-off
/// history). Bounded so a stream of orphan records cannot grow memory without end.
pub const DEFAULT_HELD_RECORDS_LIMIT: usize = 100_000;

/// The sessions of one data source.
#[derive(Debug, Default)]
struct DataSourceSessions {
    /// Creation sequence → key: `GetCurrentSessions` and paged listings answer from here, and
    /// retention removes from the middle without shifting the rest.
    keys: BTreeMap<u64, String>,
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
/// whole map took seconds. Background scans also take the lock one shard at a time.
pub const SHARDS: usize = 64;

#[derive(Debug)]
pub struct Projection {
    /// Boxed, so a rehash moves pointers rather than whole sessions.
    shards: Vec<HashMap<String, Box<Session>>>,
    shard_hasher: RandomState,
    by_data_source: HashMap<String, DataSourceSessions>,
    /// Associate key → the sessions listing it, for associate trees. Only sessions with
    /// associates cost anything here.
    parents: HashMap<String, Vec<String>>,
    held: HashMap<String, Vec<Record>>,
    held_count: usize,
    held_limit: usize,
    dropped_orphans: u64,
    next_sequence: u64,
    /// The feed sequence of the last change applied: listings report it so a client can watch
    /// on from exactly what it read.
    position: u64,
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
            parents: HashMap::new(),
            held: HashMap::new(),
            held_count: 0,
            held_limit,
            dropped_orphans: 0,
            next_sequence: 0,
            position: 0,
        }
    }

    /// Applies one record, recorded by the store at `at`, and returns what it did.
    /// `NewSession` for a known key is ignored (the first wins), `SessionInfo` merges,
    /// `EndOfSession` completes a live session once, `Purge` removes it, and records for
    /// unknown keys wait for their `NewSession`.
    pub fn apply(&mut self, record: Record, at: Timestamp) -> Vec<Event> {
        let mut events = Vec::new();
        self.apply_with(record, at, &mut |event, _| events.push(event));
        events
    }

    /// [`Projection::apply`], handing each event to `on_event` with the session right after it
    /// (for `Purged`, the session as it left).
    pub fn apply_with(
        &mut self,
        record: Record,
        at: Timestamp,
        on_event: &mut dyn FnMut(Event, &Session),
    ) {
        let session_key = record.session_key().to_owned();
        let shard = self.shard_of(&session_key);
        let Some(session) = self.shards[shard].get_mut(&session_key) else {
            match Session::begin_owned(record, self.next_sequence, at) {
                Ok(session) => {
                    let event = Event {
                        kind: EventKind::Started,
                        session_key: session_key.clone(),
                        data_source: session.data_source.clone(),
                    };
                    self.insert(session);
                    if let Some(session) = self.get(&session_key) {
                        on_event(event, session);
                    }
                    if let Some(held) = self.held.remove(&session_key) {
                        self.held_count -= held.len();
                        for record in held {
                            self.apply_with(record, at, on_event);
                        }
                    }
                }
                // A purge of a session that is not here has nothing to wait for.
                Err(Record::Purge { .. }) => {}
                Err(record) => self.hold(record),
            }
            return;
        };
        let associates_before = match &record {
            Record::SessionInfo { packet, .. } if !packet.associate_session_keys.is_empty() => {
                Some(session.associates.clone())
            }
            _ => None,
        };
        let Some(kind) = session.apply(&record, at) else {
            return;
        };
        let event = Event {
            kind,
            session_key: session_key.clone(),
            data_source: session.data_source.clone(),
        };
        match kind {
            EventKind::Purged => {
                if let Some(session) = self.remove(&session_key) {
                    on_event(event, &session);
                }
                return;
            }
            EventKind::Ended => {
                if let Some(sessions) = self.by_data_source.get_mut(&session.data_source) {
                    sessions.completed += 1;
                }
            }
            EventKind::Updated => {
                if let Some(before) = associates_before {
                    let after = session.associates.clone();
                    self.unlink_parent(&session_key, &before);
                    self.link_parent(&session_key, &after);
                }
            }
            EventKind::Started => {}
        }
        if let Some(session) = self.get(&session_key) {
            on_event(event, session);
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

    /// Puts back a session read from a snapshot (embedded store startup).
    pub fn restore(&mut self, session: Session) {
        self.insert(session);
    }

    fn insert(&mut self, session: Session) {
        self.next_sequence = self.next_sequence.max(session.sequence + 1);
        let sessions = self
            .by_data_source
            .entry(session.data_source.clone())
            .or_default();
        sessions.keys.insert(session.sequence, session.key.clone());
        if session.is_complete() {
            sessions.completed += 1;
        }
        if !session.associates.is_empty() {
            let associates = session.associates.clone();
            self.link_parent(&session.key, &associates);
        }
        let shard = self.shard_of(&session.key);
        self.shards[shard].insert(session.key.clone(), Box::new(session));
    }

    /// Takes a session out with its entries in the indexes (a `Purge` record).
    fn remove(&mut self, session_key: &str) -> Option<Session> {
        let shard = self.shard_of(session_key);
        let session = *self.shards[shard].remove(session_key)?;
        if let hash_map::Entry::Occupied(mut entry) =
            self.by_data_source.entry(session.data_source.clone())
        {
            let sessions = entry.get_mut();
            sessions.keys.remove(&session.sequence);
            if session.is_complete() {
                sessions.completed -= 1;
            }
            if sessions.keys.is_empty() {
                entry.remove();
            }
        }
        self.unlink_parent(session_key, &session.associates);
        Some(session)
    }

    fn link_parent(&mut self, parent: &str, associates: &[String]) {
        for associate in associates {
            let parents = self.parents.entry(associate.clone()).or_default();
            if !parents.iter().any(|p| p == parent) {
                parents.push(parent.to_owned());
            }
        }
    }

    fn unlink_parent(&mut self, parent: &str, associates: &[String]) {
        for associate in associates {
            if let Some(parents) = self.parents.get_mut(associate) {
                parents.retain(|p| p != parent);
                if parents.is_empty() {
                    self.parents.remove(associate);
                }
            }
        }
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

    /// Keys of every session of `data_source`, completed included, oldest first.
    pub fn keys_of(&self, data_source: &str) -> impl Iterator<Item = &String> {
        self.by_data_source
            .get(data_source)
            .into_iter()
            .flat_map(|sessions| sessions.keys.values())
    }

    /// Sessions created after creation sequence `after` (all of them for `None`), oldest
    /// first, of the given data sources (every data source if none is given).
    pub fn in_creation_order<'a>(
        &'a self,
        data_sources: &[String],
        after: Option<u64>,
    ) -> impl Iterator<Item = &'a Session> + 'a {
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        let mut ranges: Vec<btree_map::Range<'a, u64, String>> = if data_sources.is_empty() {
            self.by_data_source
                .values()
                .map(|sessions| sessions.keys.range((start, std::ops::Bound::Unbounded)))
                .collect()
        } else {
            let mut wanted: Vec<&String> = data_sources.iter().collect();
            wanted.sort();
            wanted.dedup();
            wanted
                .into_iter()
                .filter_map(|data_source| self.by_data_source.get(data_source))
                .map(|sessions| sessions.keys.range((start, std::ops::Bound::Unbounded)))
                .collect()
        };
        // A k-way merge of the data sources' creation orders.
        let mut heads = BinaryHeap::new();
        for (index, range) in ranges.iter_mut().enumerate() {
            if let Some((sequence, key)) = range.next() {
                heads.push(Reverse((*sequence, index, key)));
            }
        }
        std::iter::from_fn(move || {
            loop {
                let Reverse((_, index, key)) = heads.pop()?;
                if let Some((sequence, next)) = ranges[index].next() {
                    heads.push(Reverse((*sequence, index, next)));
                }
                if let Some(session) = self.get(key) {
                    return Some(session);
                }
            }
        })
    }

    /// Sessions naming `session_key` as an associate.
    pub fn parents_of(&self, session_key: &str) -> &[String] {
        self.parents
            .get(session_key)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The sessions of one shard (`0..SHARDS`), so a background scan can take the lock a
    /// shard at a time.
    pub fn shard(&self, shard: usize) -> impl Iterator<Item = &Session> {
        self.shards
            .get(shard)
            .into_iter()
            .flat_map(|sessions| sessions.values().map(Box::as_ref))
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

    /// The feed sequence the sessions reflect.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Records that the sessions now reflect the store up to feed sequence `position`.
    pub fn set_position(&mut self, position: u64) {
        self.position = self.position.max(position);
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

    const AT: Timestamp = Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    };

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
        let events = p.apply(new_session("a", "ds"), AT);
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
        p.apply(new_session("a", "ds1"), AT);
        assert!(p.apply(new_session("a", "ds2"), AT).is_empty());
        assert_eq!(p.get("a").unwrap().data_source, "ds1");
        assert_eq!(
            p.keys_of("ds2").cloned().collect::<Vec<_>>(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn listing_is_exact_match_in_creation_order_with_completed_sessions() {
        let mut p = Projection::default();
        p.apply(new_session("b", "ds"), AT);
        p.apply(new_session("x", "DS"), AT);
        p.apply(new_session("a", "ds"), AT);
        p.apply(end("b", 1), AT);
        assert_eq!(
            p.keys_of("ds").cloned().collect::<Vec<_>>(),
            ["b".to_owned(), "a".to_owned()]
        );
        assert_eq!(
            p.keys_of("DS").cloned().collect::<Vec<_>>(),
            ["x".to_owned()]
        );
        assert_eq!(
            p.keys_of("").cloned().collect::<Vec<_>>(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn only_the_first_end_completes_and_notifies() {
        let mut p = Projection::default();
        p.apply(new_session("a", "ds"), AT);
        assert_eq!(p.apply(end("a", 5), AT)[0].kind, EventKind::Ended);
        assert!(p.apply(end("a", 9), AT).is_empty());
        assert_eq!(p.get("a").unwrap().termination_time().unwrap().seconds, 5);
    }

    #[test]
    fn ended_sessions_still_merge_updates() {
        let mut p = Projection::default();
        p.apply(new_session("a", "ds"), AT);
        p.apply(end("a", 5), AT);
        let events = p.apply(
            info(
                "a",
                SessionInfoPacket {
                    identifier: "late".into(),
                    ..Default::default()
                },
            ),
            AT,
        );
        assert_eq!(events[0].kind, EventKind::Updated);
        assert_eq!(p.get("a").unwrap().identifier, "late");
    }

    #[test]
    fn a_merge_that_changes_nothing_emits_no_event() {
        let mut p = Projection::default();
        p.apply(new_session("a", "ds"), AT);
        let same_type = SessionInfoPacket {
            r#type: "Session".into(),
            ..Default::default()
        };
        assert!(p.apply(info("a", same_type), AT).is_empty());
    }

    #[test]
    fn records_for_unseen_keys_wait_for_their_new_session() {
        let mut p = Projection::default();
        assert!(
            p.apply(
                info(
                    "a",
                    SessionInfoPacket {
                        identifier: "early".into(),
                        ..Default::default()
                    }
                ),
                AT
            )
            .is_empty()
        );
        assert!(p.apply(end("a", 3), AT).is_empty());
        assert!(p.get("a").is_none());
        assert_eq!(p.held_records(), 2);
        let kinds: Vec<_> = p
            .apply(new_session("a", "ds"), AT)
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
            p.apply(end(key, 1), AT);
        }
        assert_eq!(p.held_records(), 2);
        assert_eq!(p.dropped_orphans(), 1);
    }

    #[test]
    fn the_reference_replay_sequence_ends_in_the_expected_state() {
        let mut p = Projection::default();
        p.apply(new_session("s", "DS"), AT);
        p.apply(
            info(
                "s",
                SessionInfoPacket {
                    r#type: "T".into(),
                    version: 3,
                    ..Default::default()
                },
            ),
            AT,
        );
        p.apply(
            info(
                "s",
                SessionInfoPacket {
                    identifier: "id".into(),
                    ..Default::default()
                },
            ),
            AT,
        );
        let a1 = vec!["a1".to_owned()];
        let a12 = vec!["a1".to_owned(), "a2".to_owned()];
        for list in [a1, a12.clone(), a12.clone()] {
            p.apply(
                info(
                    "s",
                    SessionInfoPacket {
                        associate_session_keys: list,
                        ..Default::default()
                    },
                ),
                AT,
            );
        }
        p.apply(end("s", 1), AT);
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
            live.apply(new_session(key, ds), AT);
        }
        let mut snapshot: Vec<Session> = live.sessions().cloned().collect();
        snapshot.sort_by_key(|s| s.sequence);
        let mut restored = Projection::default();
        for s in snapshot {
            restored.restore(s);
        }
        assert_eq!(
            restored.keys_of("ds").cloned().collect::<Vec<_>>(),
            live.keys_of("ds").cloned().collect::<Vec<_>>()
        );
        assert_eq!(restored.next_sequence(), live.next_sequence());
        assert_eq!(restored.counts_of("ds"), live.counts_of("ds"));
    }
}
