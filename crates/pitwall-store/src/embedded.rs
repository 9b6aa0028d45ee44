//! The embedded store: the current state of every session, one row per session, in a redb
//! database.
//!
//! Rows are the sessions after the records of a batch were applied (not the records), so
//! startup reads each session once however many changes it had, and its cost grows with the
//! number of sessions, not with the length of history. Rows are keyed by the session's
//! creation sequence: new sessions append to the end of the B-tree instead of dirtying a random
//! page each (as random UUID keys would), and reading the table in key order is creation
//! order, which listings need.
//!
//! Beside the sessions, the same commits keep the feed: every change as an encoded
//! `pitwall.v1.SessionEvent` keyed by its sequence, trimmed from the front to a window of count
//! and age, and the first sequence still kept. A batch's sessions, removals and events are one
//! transaction, so the feed never disagrees with the sessions after a crash.

use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use pitwall_core::Session;
use pitwall_core::lifecycle::order;
use pitwall_proto::feed::SessionEvent;
use prost::Message;
use prost::bytes::Bytes;
use prost_types::Timestamp;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use thiserror::Error;

/// Creation sequence → encoded [`Session`].
const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions_by_sequence");

/// Feed sequence → encoded `pitwall.v1.SessionEvent`.
const FEED_EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("feed_events");

/// Small facts about the feed: [`FIRST_KEPT`] and [`NEXT`].
const FEED_META: TableDefinition<&str, u64> = TableDefinition::new("feed_meta");

/// The oldest sequence still kept (everything before it was trimmed).
const FIRST_KEPT: &str = "first_kept";

/// The next sequence, when the last ones numbered records that changed nothing (and so have no
/// event to say how far numbering went).
const NEXT: &str = "next";

/// How far beyond its count the feed may grow before it is trimmed back (less for small
/// windows).
const TRIM_SLACK: u64 = 1024;

/// Events one commit trims at most, so catching up with a lowered window spreads over
/// several commits instead of stalling one.
const MAX_TRIM_PER_COMMIT: usize = 10_000;

/// The file inside the data directory.
pub const DATABASE_FILE: &str = "pitwall.redb";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "data directory {0} is in use by another Pitwall process; stop it or choose another --data-dir"
    )]
    InUse(PathBuf),
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: DatabaseError,
    },
    #[error("session number {sequence} in {path} cannot be decoded: {source}")]
    Corrupt {
        path: PathBuf,
        sequence: u64,
        source: prost::DecodeError,
    },
    #[error("storage error: {0}")]
    Storage(#[from] redb::Error),
    #[error("compaction failed: {0}")]
    Compaction(#[from] redb::CompactionError),
    #[error("cannot read the size of {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
}

macro_rules! storage_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Storage(e.into())
            }
        }
    )*};
}
storage_error_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Page cache. Startup reads every row once, so a large cache only holds pages that are not
    /// read again; kept small so resident memory is the sessions themselves.
    pub cache_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Everything one commit changes.
#[derive(Default)]
pub struct Changes<'a> {
    /// Sessions to write as they now are.
    pub sessions: Vec<&'a Session>,
    /// Creation sequences of sessions to delete (retention).
    pub purged: Vec<u64>,
    /// Feed events, as (sequence, encoded `SessionEvent`), in sequence order.
    pub events: Vec<(u64, Bytes)>,
    /// The window the feed is trimmed to.
    pub window: FeedWindow,
    /// The next sequence, when it is past the last of `events`.
    pub next: Option<u64>,
}

/// How much of the feed is kept: at most `max_events`, none recorded before `oldest`.
#[derive(Debug, Clone, Copy)]
pub struct FeedWindow {
    pub max_events: u64,
    pub oldest: Option<Timestamp>,
}

impl Default for FeedWindow {
    fn default() -> Self {
        FeedWindow {
            max_events: u64::MAX,
            oldest: None,
        }
    }
}

/// The feed's extent: sequences `first_kept..next` are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedBounds {
    pub first_kept: u64,
    pub next: u64,
}

/// An open embedded store. The database file is locked for as long as this value lives.
pub struct EmbeddedStore {
    /// Shared by every transaction (redb serialises writers itself); taken exclusively only to
    /// compact the file, which needs no transaction open.
    db: RwLock<Database>,
    path: PathBuf,
}

/// The database file's size before and after a compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub before: u64,
    pub after: u64,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `data_dir`. Fails with [`StoreError::InUse`] if another
    /// process holds it.
    pub fn open(data_dir: &Path, options: &EmbeddedOptions) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(DATABASE_FILE);
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create(&path)
            .map_err(|source| match source {
                DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(data_dir.to_owned()),
                source => StoreError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let txn = db.begin_write()?;
        txn.open_table(SESSIONS)?;
        txn.open_table(FEED_EVENTS)?;
        txn.open_table(FEED_META)?;
        txn.commit()?;
        Ok(EmbeddedStore {
            db: RwLock::new(db),
            path,
        })
    }

    /// How many sessions are stored.
    pub fn len(&self) -> Result<u64, StoreError> {
        let txn = self.db().begin_read()?;
        Ok(txn.open_table(SESSIONS)?.len()?)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Hands every stored session to `restore`, in creation order, without holding them all.
    pub fn load(&self, mut restore: impl FnMut(Session)) -> Result<u64, StoreError> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(SESSIONS)?;
        let mut count = 0;
        for row in table.iter()? {
            let (sequence, value) = row?;
            let session = Session::decode(value.value()).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                sequence: sequence.value(),
                source,
            })?;
            restore(session);
            count += 1;
        }
        Ok(count)
    }

    /// Writes the changes in one transaction and returns once it is durable on disk (fsync'd),
    /// with the feed's extent after it.
    pub fn commit(&self, changes: Changes<'_>) -> Result<FeedBounds, StoreError> {
        let mut txn = self.db().begin_write()?;
        // Makes recovery after a crash read the allocator state instead of walking every page,
        // so restart time after `kill -9` stays flat as the store grows.
        txn.set_quick_repair(true);
        let bounds = {
            let mut sessions = txn.open_table(SESSIONS)?;
            for session in changes.sessions {
                sessions.insert(session.sequence, session.encode().as_slice())?;
            }
            for sequence in changes.purged {
                sessions.remove(sequence)?;
            }
            let mut events = txn.open_table(FEED_EVENTS)?;
            for (sequence, event) in &changes.events {
                events.insert(*sequence, event.as_ref())?;
            }
            let mut meta = txn.open_table(FEED_META)?;
            let before = bounds_of(&events, &meta)?;
            trim(&mut events, changes.window)?;
            let first_kept = match events.first()? {
                Some((sequence, _)) => sequence.value(),
                None => before.next,
            };
            if first_kept != before.first_kept {
                meta.insert(FIRST_KEPT, first_kept)?;
            }
            if let Some(next) = changes.next {
                meta.insert(NEXT, next)?;
            }
            FeedBounds {
                first_kept,
                next: before.next.max(changes.next.unwrap_or(0)),
            }
        };
        txn.commit()?;
        Ok(bounds)
    }

    /// The feed's extent as stored.
    pub fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        let txn = self.db().begin_read()?;
        bounds_of(&txn.open_table(FEED_EVENTS)?, &txn.open_table(FEED_META)?)
    }

    /// Up to `limit` stored events after sequence `after`, in order.
    pub fn events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(FEED_EVENTS)?;
        let mut events = Vec::new();
        for row in table.range(after.saturating_add(1)..)?.take(limit) {
            let (sequence, event) = row?;
            events.push((sequence.value(), event.value().to_vec()));
        }
        Ok(events)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Shrinks the file when less than half of it is in use and it is larger than
    /// `min_file_bytes` (after retention removed many sessions). Transactions wait while it
    /// runs, so the caller does it rarely: only after removals.
    pub fn compact_if_sparse(&self, min_file_bytes: u64) -> Result<Option<Compacted>, StoreError> {
        let before = self.file_bytes()?;
        if before < min_file_bytes {
            return Ok(None);
        }
        // Pages freed by a commit are released by the next one: make that happen first so
        // the count below is what is really in use.
        for _ in 0..2 {
            self.db().begin_write()?.commit()?;
        }
        let used = {
            let txn = self.db().begin_write()?;
            let stats = txn.stats()?;
            txn.abort()?;
            stats.allocated_pages() * stats.page_size() as u64
        };
        if used.saturating_mul(2) > before {
            return Ok(None);
        }
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        while db.compact()? {}
        drop(db);
        Ok(Some(Compacted {
            before,
            after: self.file_bytes()?,
        }))
    }

    fn file_bytes(&self) -> Result<u64, StoreError> {
        std::fs::metadata(&self.path)
            .map(|m| m.len())
            .map_err(|source| StoreError::Size {
                path: self.path.clone(),
                source,
            })
    }

    // A panic while holding the lock can only come from inside redb, which leaves the database
    // as its last commit; going on is safe.
    fn db(&self) -> RwLockReadGuard<'_, Database> {
        self.db.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stored events are `first_kept..next`; an empty feed starts at 1 (0 means "from now").
fn bounds_of(
    events: &impl ReadableTable<u64, &'static [u8]>,
    meta: &impl ReadableTable<&'static str, u64>,
) -> Result<FeedBounds, StoreError> {
    let first_kept = meta.get(FIRST_KEPT)?.map(|v| v.value()).unwrap_or(1);
    let after_events = match events.last()? {
        Some((sequence, _)) => sequence.value() + 1,
        None => first_kept,
    };
    let next = after_events.max(meta.get(NEXT)?.map(|v| v.value()).unwrap_or(0));
    Ok(FeedBounds { first_kept, next })
}

/// Drops events from the front: those beyond the window's count, once they are at least
/// [`TRIM_SLACK`] too many (so most commits delete nothing and the others delete a run, which
/// costs less than one deletion per commit), and those recorded before its oldest time; at most
/// [`MAX_TRIM_PER_COMMIT`]. Sequences are contiguous, so a run is a key range.
fn trim(events: &mut redb::Table<u64, &[u8]>, window: FeedWindow) -> Result<(), StoreError> {
    let Some(first) = events.first()?.map(|(sequence, _)| sequence.value()) else {
        return Ok(());
    };
    let limit = first.saturating_add(MAX_TRIM_PER_COMMIT as u64);
    let excess = events.len()?.saturating_sub(window.max_events);
    // A small window is kept exactly; a large one may run over by an eighth at most.
    let slack = TRIM_SLACK.min(window.max_events / 8).max(1);
    let mut cut = if excess >= slack {
        first.saturating_add(excess).min(limit)
    } else {
        first
    };
    if let Some(oldest) = window.oldest {
        for row in events.range(cut..limit)? {
            let (sequence, event) = row?;
            let recorded = SessionEvent::decode(event.value())
                .ok()
                .and_then(|e| e.time);
            if recorded.is_some_and(|time| order(time) >= order(oldest)) {
                break;
            }
            cut = sequence.value() + 1;
        }
    }
    if cut > first {
        events.retain_in(first..cut, |_, _| false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use pitwall_proto::open_data::NewSessionPacket;

    use super::*;

    fn session(key: &str, sequence: u64) -> Session {
        Session::start(
            key,
            sequence,
            &NewSessionPacket {
                data_source: "ds".into(),
                ..Default::default()
            },
        )
    }

    fn sessions<'a>(sessions: impl IntoIterator<Item = &'a Session>) -> Changes<'a> {
        Changes {
            sessions: sessions.into_iter().collect(),
            ..Default::default()
        }
    }

    fn event(sequence: u64, seconds: i64) -> (u64, Bytes) {
        let event = SessionEvent {
            sequence,
            time: Some(Timestamp { seconds, nanos: 0 }),
            ..Default::default()
        };
        (sequence, Bytes::from(event.encode_to_vec()))
    }

    #[test]
    fn purged_sessions_are_gone_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions::default();
        {
            let store = EmbeddedStore::open(dir.path(), &options).unwrap();
            let (a, b) = (session("a", 0), session("b", 1));
            store.commit(sessions([&a, &b])).unwrap();
            store
                .commit(Changes {
                    purged: vec![0],
                    ..Default::default()
                })
                .unwrap();
        }
        let store = EmbeddedStore::open(dir.path(), &options).unwrap();
        let mut loaded = Vec::new();
        store.load(|s| loaded.push(s.key)).unwrap();
        assert_eq!(loaded, ["b"]);
    }

    #[test]
    fn the_feed_keeps_its_window_and_says_where_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions::default();
        let store = EmbeddedStore::open(dir.path(), &options).unwrap();
        assert_eq!(
            store.feed_bounds().unwrap(),
            FeedBounds {
                first_kept: 1,
                next: 1
            }
        );
        let window = FeedWindow {
            max_events: 3,
            oldest: None,
        };
        let bounds = store
            .commit(Changes {
                events: (1..=5).map(|s| event(s, s as i64)).collect(),
                window,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            bounds,
            FeedBounds {
                first_kept: 3,
                next: 6
            }
        );
        let kept: Vec<u64> = store
            .events_after(0, 10)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(kept, [3, 4, 5]);
        // By age: events recorded before second 5 go.
        let bounds = store
            .commit(Changes {
                window: FeedWindow {
                    max_events: 3,
                    oldest: Some(Timestamp {
                        seconds: 5,
                        nanos: 0,
                    }),
                },
                ..Default::default()
            })
            .unwrap();
        assert_eq!(bounds.first_kept, 5);
        drop(store);
        let store = EmbeddedStore::open(dir.path(), &options).unwrap();
        assert_eq!(
            store.feed_bounds().unwrap(),
            FeedBounds {
                first_kept: 5,
                next: 6
            }
        );
        assert_eq!(store.events_after(5, 10).unwrap(), Vec::new());
    }

    #[test]
    fn committed_sessions_load_back_in_creation_order() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions::default();
        {
            let store = EmbeddedStore::open(dir.path(), &options).unwrap();
            let (b, a) = (session("b", 0), session("a", 1));
            store.commit(sessions([&b, &a])).unwrap();
            let mut b2 = b.clone();
            b2.identifier = "changed".into();
            store.commit(sessions([&b2])).unwrap();
        }
        let store = EmbeddedStore::open(dir.path(), &options).unwrap();
        let mut loaded = Vec::new();
        assert_eq!(store.load(|s| loaded.push(s)).unwrap(), 2);
        assert_eq!(store.len().unwrap(), 2);
        let keys: Vec<_> = loaded.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, vec!["b", "a"]);
        assert_eq!(loaded[0].identifier, "changed");
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions::default();
        let _first = EmbeddedStore::open(dir.path(), &options).unwrap();
        let second = EmbeddedStore::open(dir.path(), &options);
        assert!(matches!(second, Err(StoreError::InUse(_))));
    }
}
