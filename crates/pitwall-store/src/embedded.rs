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
//! journal frame and one transaction, so the feed never disagrees with the sessions after a
//! crash.
//!
//! [`EmbeddedStore::commit`] returns once the batch's frame is synced in the journal (see
//! `journal`); the checkpointer thread commits it to the database afterwards (see `checkpoint`).
//! Until it has, reading the feed's history finds the batch among those it has not committed.
//!
//! Every row carries a CRC32C checksum (see `rows`), verified when it is read: all of them at
//! startup ([`EmbeddedStore::load`]), feed events again whenever a watcher replays them. A file
//! that is empty or that redb cannot read is refused, never initialised over: its sessions would
//! be gone without a word.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use tracing::{info, warn};

use pitwall_core::Session;
use prost::Message;
use prost::bytes::Bytes;
use prost_types::Timestamp;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use thiserror::Error;

use crate::checkpoint::{Backlog, Checkpointer, Work};
use crate::feed_index::FeedIndex;
use crate::guard::guarded;
use crate::journal::{Frame, Journal, Unappended};
use crate::rows::{DamagedRow, framed, read_event, read_session};

/// Creation sequence → encoded [`Session`].
pub(crate) const SESSIONS: TableDefinition<u64, &[u8]> =
    TableDefinition::new("sessions_by_sequence");

/// Feed sequence → encoded `pitwall.v1.SessionEvent`.
pub(crate) const FEED_EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("feed_events");

/// Small facts about the feed: [`FIRST_KEPT`] and [`NEXT`].
pub(crate) const FEED_META: TableDefinition<&str, u64> = TableDefinition::new("feed_meta");

/// The oldest sequence still kept (everything before it was trimmed).
pub(crate) const FIRST_KEPT: &str = "first_kept";

/// The journal generation whose frames are not in the file yet (see `journal`).
const JOURNAL_GENERATION: &str = "journal_generation";

/// The next sequence, when the last ones numbered records that changed nothing (and so have no
/// event to say how far numbering went).
const NEXT: &str = "next";

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
    #[error(
        "store file {path} is empty (0 bytes): the sessions it held are gone, and Pitwall does \
         not start on it so that nothing is written over it. Restore it from a backup, or move \
         it aside (or delete it) to start with an empty store"
    )]
    Empty { path: PathBuf },
    #[error(
        "store file {path} is damaged: {detail}. Restore it from a backup, or move it aside to \
         start with an empty store; `pitwall store check` reports what is damaged and `pitwall \
         store repair` repairs what it can"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error(
        "store file {path} has {} damaged row(s): {}. Restore the file from a backup, start with \
         --skip-damaged-rows to leave these rows out (each is logged), or run `pitwall store \
         repair` to remove them",
        rows.len(),
        list_rows(rows)
    )]
    DamagedRows {
        path: PathBuf,
        rows: Vec<DamagedRow>,
    },
    #[error("there is no store file {path}; nothing to check")]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the store {path} is closed after a failed write and could not be opened again yet; it is retried"
    )]
    Closed { path: PathBuf },
    #[error("storage error: {0}")]
    Storage(#[from] redb::Error),
    #[error("compaction failed: {0}")]
    Compaction(#[from] redb::CompactionError),
    #[error("cannot read the size of {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the journal {path}: {source}")]
    Journal {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store {path} cannot take the journal's batches: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
}

/// The first damaged rows, for a message that stays readable however many there are.
fn list_rows(rows: &[DamagedRow]) -> String {
    const SHOWN: usize = 10;
    let mut text = rows
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if rows.len() > SHOWN {
        text.push_str(&format!("; and {} more", rows.len() - SHOWN));
    }
    text
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
    redb::CommitError,
    redb::SetDurabilityError
);

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Page cache. Startup reads every row once, so a large cache only holds pages that are not
    /// read again; kept small so resident memory is the sessions themselves.
    pub cache_bytes: usize,
    /// Rows whose checksum fails are left out, each with a warning, instead of stopping
    /// startup (`--skip-damaged-rows`): the operator's explicit choice to lose them.
    pub skip_damaged_rows: bool,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            cache_bytes: 64 * 1024 * 1024,
            skip_damaged_rows: false,
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
    /// Feed events, as (sequence, time recorded, encoded `SessionEvent`), in sequence order.
    pub events: Vec<(u64, Timestamp, Bytes)>,
    /// The window the feed is trimmed to.
    pub window: FeedWindow,
    /// The next sequence, when it is past the last of `events`.
    pub next: Option<u64>,
}

/// How much of the feed is kept: at most `max_events`, none recorded before `oldest`.
#[derive(Debug, Clone, Copy, PartialEq)]
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
    /// compact the file, which needs no transaction open, or to reopen it after a failed write
    /// (`None` while that reopening has not succeeded).
    db: Arc<RwLock<Option<Database>>>,
    /// Where commits are made durable; taken first by whoever takes it and anything else.
    writing: Mutex<Writing>,
    /// Batches journalled and not yet committed to the database.
    backlog: Arc<Backlog>,
    checkpointer: Mutex<Checkpointer>,
    /// The first feed sequence kept, as of the last commit.
    first_kept: AtomicU64,
    path: PathBuf,
    cache_bytes: usize,
    skip_damaged_rows: bool,
}

/// What the writer keeps between commits.
struct Writing {
    journal: Journal,
    feed: FeedIndex,
}

/// The open database, borrowed for one call.
struct Db<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for Db<'_> {
    type Target = Database;

    fn deref(&self) -> &Database {
        match self.0.as_ref() {
            Some(db) => db,
            // `EmbeddedStore::db` only hands out a `Db` holding a database.
            None => unreachable!("a Db is made only from an open database"),
        }
    }
}

/// The database file's size before and after a compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub before: u64,
    pub after: u64,
}

impl EmbeddedStore {
    /// Opens the store in `data_dir`, creating it if there is no store file. Fails with
    /// [`StoreError::InUse`] if another process holds it, and with [`StoreError::Empty`] or
    /// [`StoreError::Damaged`] on a file that cannot be a store: never creates one over it.
    pub fn open(data_dir: &Path, options: &EmbeddedOptions) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(DATABASE_FILE);
        let db = guarded(&path, || {
            let mut builder = Database::builder();
            builder.set_cache_size(options.cache_bytes);
            let db = match std::fs::metadata(&path) {
                Ok(metadata) if metadata.len() == 0 => {
                    return Err(StoreError::Empty { path: path.clone() });
                }
                Ok(_) => builder
                    .open(&path)
                    .map_err(|e| open_error(data_dir, &path, e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    create_new(data_dir, &path, &builder)?
                }
                Err(source) => {
                    return Err(StoreError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            };
            let txn = db.begin_write()?;
            txn.open_table(SESSIONS)?;
            txn.open_table(FEED_EVENTS)?;
            txn.open_table(FEED_META)?;
            txn.commit()?;
            Ok(db)
        })
        .map_err(|e| damaged_if_corrupted(&path, e))?;
        let mut journal =
            Journal::open(data_dir).map_err(|source| journal_error(data_dir, source))?;
        let (generation, feed) = guarded(&path, || recover(&db, &mut journal))
            .map_err(|e| damaged_if_corrupted(&path, e))?;
        let db = Arc::new(RwLock::new(Some(db)));
        let backlog = Backlog::new(generation);
        let checkpointer = Checkpointer::start(db.clone(), backlog.clone(), path.clone())?;
        Ok(EmbeddedStore {
            db,
            first_kept: AtomicU64::new(feed.first_kept()),
            writing: Mutex::new(Writing { journal, feed }),
            backlog,
            checkpointer: Mutex::new(checkpointer),
            path,
            cache_bytes: options.cache_bytes,
            skip_damaged_rows: options.skip_damaged_rows,
        })
    }

    /// How many sessions are stored.
    pub fn len(&self) -> Result<u64, StoreError> {
        guarded(&self.path, || {
            let txn = self.db()?.begin_read()?;
            Ok(txn.open_table(SESSIONS)?.len()?)
        })
        .map_err(|e| damaged_if_corrupted(&self.path, e))
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Hands every stored session to `restore`, in creation order, without holding them all,
    /// after verifying its checksum; then verifies the kept feed events. Damaged rows stop it
    /// with [`StoreError::DamagedRows`], or are left out with a warning each when the store was
    /// opened with `skip_damaged_rows`.
    pub fn load(&self, mut restore: impl FnMut(Session)) -> Result<u64, StoreError> {
        guarded(&self.path, || {
            let txn = self.db()?.begin_read()?;
            let table = txn.open_table(SESSIONS)?;
            let mut count = 0;
            let mut damaged = Vec::new();
            for row in table.iter()? {
                let (sequence, value) = row?;
                match read_session(value.value()) {
                    Ok(session) => {
                        restore(session);
                        count += 1;
                    }
                    Err((key, damage)) => damaged.push(DamagedRow::Session {
                        sequence: sequence.value(),
                        key,
                        damage,
                    }),
                }
            }
            let events = txn.open_table(FEED_EVENTS)?;
            for row in events.iter()? {
                let (sequence, value) = row?;
                if let Err(damage) = read_event(value.value()) {
                    damaged.push(DamagedRow::FeedEvent {
                        sequence: sequence.value(),
                        damage,
                    });
                }
            }
            self.damaged(damaged)?;
            Ok(count)
        })
        .map_err(|e| damaged_if_corrupted(&self.path, e))
    }

    /// Refuses damaged rows, or (skipping) says which ones are left out.
    fn damaged(&self, rows: Vec<DamagedRow>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        if !self.skip_damaged_rows {
            return Err(StoreError::DamagedRows {
                path: self.path.clone(),
                rows,
            });
        }
        for row in &rows {
            warn!(path = %self.path.display(), row = %row, "damaged row left out (--skip-damaged-rows)");
        }
        Ok(())
    }

    /// Writes the changes as one batch and returns once it is durable on disk (in the synced
    /// journal; see `journal`), with the first feed sequence still kept after it.
    pub fn commit(&self, changes: Changes<'_>) -> Result<u64, StoreError> {
        guarded(&self.path, || self.commit_unguarded(changes))
    }

    fn commit_unguarded(&self, changes: Changes<'_>) -> Result<u64, StoreError> {
        if let Some(reason) = self.backlog.failed() {
            return Err(self.behind(reason));
        }
        let mut writing = self.writing();
        let first_kept = writing.feed.push(
            changes
                .events
                .iter()
                .map(|(sequence, time, _)| (*sequence, *time)),
            changes.window,
            changes.next,
        );
        let frame = Frame {
            sessions: changes
                .sessions
                .iter()
                .map(|session| (session.sequence, framed(&session.encode())))
                .collect(),
            purged: changes.purged,
            events: changes
                .events
                .iter()
                .map(|(sequence, _, event)| (*sequence, framed(event)))
                .collect(),
            first_kept,
            next: changes.next,
        };
        // A failed write leaves the feed index ahead of the store; it is rebuilt when the
        // store is reopened, which the failure asks for.
        match writing.journal.append(&frame) {
            Ok(_) => {}
            Err(Unappended::Unwritten(source)) => {
                return Err(journal_error(writing.journal.path(), source));
            }
            Err(Unappended::Unsynced(at, source)) => {
                refuse(&mut writing.journal, at);
                return Err(journal_error(writing.journal.path(), source));
            }
        }
        self.backlog.push(Work::Batch(Arc::new(frame)));
        self.first_kept.store(first_kept, Ordering::Release);
        if writing.journal.due() {
            // The batch is durable whatever happens here; a checkpointer that failed meanwhile
            // makes the next commit fail.
            if let Err(reason) = self.next_generation(&mut writing.journal) {
                warn!(path = %self.path.display(), %reason, "the journal cannot move to its other file");
            }
        }
        Ok(first_kept)
    }

    /// Moves the journal to its other file once the database holds that file's frames, and
    /// asks the checkpointer to make what came before durable.
    fn next_generation(&self, journal: &mut Journal) -> Result<(), String> {
        self.backlog.wait_checkpointed(journal.generation())?;
        self.backlog
            .push(Work::Checkpoint(journal.generation() + 1));
        journal.rotate();
        Ok(())
    }

    /// One durable commit of everything committed so far, waited for.
    fn checkpoint(&self, journal: &mut Journal) -> Result<(), StoreError> {
        self.next_generation(journal)
            .and_then(|()| self.backlog.wait_checkpointed(journal.generation()))
            .map_err(|reason| self.behind(reason))
    }

    fn behind(&self, reason: String) -> StoreError {
        StoreError::Checkpoint {
            path: self.path.clone(),
            reason,
        }
    }

    fn writing(&self) -> MutexGuard<'_, Writing> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first feed sequence still kept, as of the last commit.
    pub fn first_kept(&self) -> u64 {
        self.first_kept.load(Ordering::Acquire)
    }

    /// The feed's extent as stored, once what was committed is in the database.
    pub fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        self.backlog
            .wait_empty()
            .map_err(|reason| self.behind(reason))?;
        guarded(&self.path, || {
            let txn = self.db()?.begin_read()?;
            bounds_of(&txn.open_table(FEED_EVENTS)?, &txn.open_table(FEED_META)?)
        })
    }

    /// Up to `limit` stored events after sequence `after`, in order, as encoded
    /// `SessionEvent`s. A damaged one is an error, or left out with a warning when the store was
    /// opened with `skip_damaged_rows`.
    pub fn events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let first_kept = self.first_kept();
        let after = after.max(first_kept.saturating_sub(1));
        guarded(&self.path, || {
            // Taken before the database's snapshot: a batch the checkpointer commits in between
            // is in both, and none is in neither.
            let pending = self.backlog.pending();
            let txn = self.db()?.begin_read()?;
            let table = txn.open_table(FEED_EVENTS)?;
            let mut rows = Vec::new();
            for row in table.range(after.saturating_add(1)..)?.take(limit) {
                let (sequence, row) = row?;
                rows.push((sequence.value(), row.value().to_vec()));
            }
            let through = rows.last().map_or(after, |(sequence, _)| *sequence);
            let waiting = pending.iter().flat_map(|frame| frame.events.iter());
            for (sequence, row) in waiting.filter(|(sequence, _)| *sequence > through) {
                if rows.len() >= limit {
                    break;
                }
                rows.push((*sequence, row.clone()));
            }
            let mut events = Vec::with_capacity(rows.len());
            for (sequence, row) in rows {
                match read_event(&row) {
                    Ok(payload) => events.push((sequence, payload.to_vec())),
                    Err(damage) => {
                        self.damaged(vec![DamagedRow::FeedEvent { sequence, damage }])?
                    }
                }
            }
            Ok(events)
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Shrinks the file when less than half of it is in use and it is larger than
    /// `min_file_bytes` (after retention removed many sessions). Transactions wait while it
    /// runs, so the caller does it rarely: only after removals.
    pub fn compact_if_sparse(&self, min_file_bytes: u64) -> Result<Option<Compacted>, StoreError> {
        guarded(&self.path, || self.compact_unguarded(min_file_bytes))
    }

    fn compact_unguarded(&self, min_file_bytes: u64) -> Result<Option<Compacted>, StoreError> {
        let before = self.file_bytes()?;
        if before < min_file_bytes {
            return Ok(None);
        }
        // Pages freed by a commit are released by the next durable one: make that happen
        // first so the count below is what is really in use.
        let mut writing = self.writing();
        for _ in 0..2 {
            self.checkpoint(&mut writing.journal)?;
        }
        let used = {
            let txn = self.db()?.begin_write()?;
            let stats = txn.stats()?;
            txn.abort()?;
            stats.allocated_pages() * stats.page_size() as u64
        };
        if used.saturating_mul(2) > before {
            return Ok(None);
        }
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = slot.as_mut() {
            while db.compact()? {}
        }
        drop(slot);
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
    fn db(&self) -> Result<Db<'_>, StoreError> {
        let slot = self.db.read().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            return Err(StoreError::Closed {
                path: self.path.clone(),
            });
        }
        Ok(Db(slot))
    }

    /// Closes the database and opens it again, then replays the journal into it, which ends
    /// in a durable commit: after a failed write (a full disk, say) redb refuses every later one
    /// until it is reopened, and a reopen that cannot write yet must not count as recovered.
    /// What was committed before the failure is what the reopened file and the journal hold.
    pub fn reopen(&self) -> Result<(), StoreError> {
        guarded(&self.path, || {
            let mut writing = self.writing();
            let mut checkpointer = self.checkpointer.lock().unwrap_or_else(|e| e.into_inner());
            checkpointer.stop();
            let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
            // Dropped first: the file lock is released with it, and the new handle takes it.
            drop(slot.take());
            let mut builder = Database::builder();
            builder.set_cache_size(self.cache_bytes);
            let db = builder
                .open(&self.path)
                .map_err(|source| StoreError::Open {
                    path: self.path.clone(),
                    source,
                })?;
            let (generation, feed) = recover(&db, &mut writing.journal)?;
            *slot = Some(db);
            drop(slot);
            self.first_kept.store(feed.first_kept(), Ordering::Release);
            writing.feed = feed;
            self.backlog.reset(generation);
            *checkpointer =
                Checkpointer::start(self.db.clone(), self.backlog.clone(), self.path.clone())?;
            Ok(())
        })
    }
}

impl Drop for EmbeddedStore {
    /// A store closed in order leaves nothing to replay: the next start, and `pitwall store
    /// check`, find every batch in the database file.
    fn drop(&mut self) {
        let mut writing = self.writing();
        let checkpointed = guarded(&self.path, || self.checkpoint(&mut writing.journal));
        if let Err(e) = checkpointed {
            warn!(path = %self.path.display(), error = %e, "final checkpoint failed; the journal is replayed at the next start");
        }
        self.checkpointer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop();
    }
}

/// Commits the frames of the journal's generations that the database does not hold (the one
/// it records and the one after it: those after its last checkpoint, lost with the process),
/// then checkpoints, and starts the journal's next generation. Returns that generation and the
/// feed as stored.
fn recover(db: &Database, journal: &mut Journal) -> Result<(u64, FeedIndex), StoreError> {
    let generation = {
        let txn = db.begin_read()?;
        let meta = txn.open_table(FEED_META)?;
        meta.get(JOURNAL_GENERATION)?.map_or(0, |g| g.value())
    };
    let read = |generation| {
        journal
            .frames_of(generation)
            .map_err(|source| journal_error(journal.path(), source))
    };
    let mut replayed = read(generation)?;
    replayed.extend(read(generation + 1)?);
    // The feed as the database holds it, then as each frame leaves it: a frame of the earlier
    // layout gets its trimming decided here, by the rule the writer uses now.
    let mut feed = feed_index(db)?;
    let mut frames = Vec::with_capacity(replayed.len());
    for (mut frame, window) in replayed {
        let times = frame
            .events
            .iter()
            .map(|(sequence, row)| (*sequence, recorded_at(row)));
        frame.first_kept = match window {
            Some(window) => feed.push(times, window, frame.next),
            None => feed.replay(times, frame.first_kept, frame.next),
        };
        frames.push(frame);
    }
    let next = generation + 2;
    commit_frames(db, &frames.iter().collect::<Vec<_>>(), Some(next))?;
    journal.start(next);
    if !frames.is_empty() {
        info!(path = %journal.path().display(), batches = frames.len(), "journal replayed into the store: the batches after its last checkpoint");
    }
    Ok((next, feed))
}

/// The kept feed's sequences and times, read from the database.
fn feed_index(db: &Database) -> Result<FeedIndex, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(FEED_EVENTS)?;
    let bounds = bounds_of(&table, &txn.open_table(FEED_META)?)?;
    let mut events = VecDeque::with_capacity(table.len()? as usize);
    for row in table.iter()? {
        let (sequence, row) = row?;
        events.push_back((sequence.value(), recorded_at(row.value())));
    }
    Ok(FeedIndex::new(bounds, events))
}

/// When a stored event row was recorded. A damaged one counts as recorded at the epoch: kept
/// until the count trims it (`load` reports it).
fn recorded_at(row: &[u8]) -> Timestamp {
    /// The one field of a `SessionEvent` this needs; the rest is skipped undecoded.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Recorded {
        #[prost(message, optional, tag = "6")]
        time: Option<Timestamp>,
    }
    read_event(row)
        .ok()
        .and_then(|payload| Recorded::decode(payload).ok())
        .and_then(|recorded| recorded.time)
        .unwrap_or_default()
}

fn journal_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Journal {
        path: path.to_owned(),
        source,
    }
}

/// Takes back the frame at `at`: its batch is refused, and must not come back at the next
/// start.
fn refuse(journal: &mut Journal, at: u64) {
    if let Err(e) = journal.retract(at) {
        warn!(path = %journal.path().display(), error = %e, "cannot undo a refused batch in the journal");
    }
}

/// Commits journalled batches to the database in one transaction: not durably (the journal is
/// what makes them durable), or, with `checkpoint`, durably and recording that journal
/// generation as the first whose frames the database lacks (so a crash on either side of it
/// replays exactly the batches the file lacks).
pub(crate) fn commit_frames(
    db: &Database,
    frames: &[&Frame],
    checkpoint: Option<u64>,
) -> Result<(), StoreError> {
    let mut txn = db.begin_write()?;
    match checkpoint {
        // Makes recovery after a crash read the allocator state instead of walking every
        // page, so restart time after `kill -9` stays flat as the store grows.
        Some(_) => txn.set_quick_repair(true),
        None => txn.set_durability(Durability::None)?,
    }
    {
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut events = txn.open_table(FEED_EVENTS)?;
        let mut meta = txn.open_table(FEED_META)?;
        let mut first_kept = meta.get(FIRST_KEPT)?.map_or(1, |v| v.value());
        for frame in frames {
            for (sequence, row) in &frame.sessions {
                sessions.insert(*sequence, row.as_slice())?;
            }
            for sequence in &frame.purged {
                sessions.remove(*sequence)?;
            }
            for (sequence, row) in &frame.events {
                events.insert(*sequence, row.as_slice())?;
            }
            if frame.first_kept > first_kept {
                events.retain_in(..frame.first_kept, |_, _| false)?;
            }
            if frame.first_kept != first_kept {
                meta.insert(FIRST_KEPT, frame.first_kept)?;
                first_kept = frame.first_kept;
            }
            if let Some(next) = frame.next {
                meta.insert(NEXT, next)?;
            }
        }
        if let Some(generation) = checkpoint {
            meta.insert(JOURNAL_GENERATION, generation)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// A store file made whole before it gets its name: a crash while it is being made leaves no
/// `pitwall.redb` (a 0-byte one would be refused at the next start as a lost store).
fn create_new(
    data_dir: &Path,
    path: &Path,
    builder: &redb::Builder,
) -> Result<Database, StoreError> {
    let fresh = data_dir.join(format!("{DATABASE_FILE}.new"));
    let db = match builder.create(&fresh) {
        Ok(db) => db,
        Err(DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StoreError::InUse(data_dir.to_owned()));
        }
        // Left over from a start that stopped half-way, and held by nobody (it is not locked).
        Err(_) => {
            std::fs::remove_file(&fresh).map_err(|source| StoreError::Read {
                path: fresh.clone(),
                source,
            })?;
            builder
                .create(&fresh)
                .map_err(|e| open_error(data_dir, &fresh, e))?
        }
    };
    let txn = db.begin_write()?;
    txn.open_table(SESSIONS)?;
    txn.open_table(FEED_EVENTS)?;
    txn.open_table(FEED_META)?;
    txn.commit()?;
    // A link, not a rename: it fails if another process made the store meanwhile, instead of
    // replacing it.
    match std::fs::hard_link(&fresh, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(StoreError::InUse(data_dir.to_owned()));
        }
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_owned(),
                source,
            });
        }
    }
    let _ = std::fs::remove_file(&fresh);
    if let Ok(dir) = std::fs::File::open(data_dir) {
        let _ = dir.sync_all();
    }
    Ok(db)
}

fn open_error(data_dir: &Path, path: &Path, error: DatabaseError) -> StoreError {
    match error {
        DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(data_dir.to_owned()),
        DatabaseError::Storage(redb::StorageError::Corrupted(detail)) => StoreError::Damaged {
            path: path.to_owned(),
            detail,
        },
        source => StoreError::Open {
            path: path.to_owned(),
            source,
        },
    }
}

/// redb's own word that the file is not what it wrote, as [`StoreError::Damaged`].
fn damaged_if_corrupted(path: &Path, error: StoreError) -> StoreError {
    match error {
        StoreError::Storage(redb::Error::Corrupted(detail)) => StoreError::Damaged {
            path: path.to_owned(),
            detail,
        },
        other => other,
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

#[cfg(test)]
mod tests {
    use pitwall_proto::feed::SessionEvent;
    use pitwall_proto::open_data::NewSessionPacket;

    use super::*;
    use crate::journal::JOURNAL_FILES;

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

    fn event(sequence: u64, seconds: i64) -> (u64, Timestamp, Bytes) {
        let time = Timestamp { seconds, nanos: 0 };
        let event = SessionEvent {
            sequence,
            time: Some(time),
            ..Default::default()
        };
        (sequence, time, Bytes::from(event.encode_to_vec()))
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

    /// The files as a crash would leave them at this moment: copied while the store is open.
    fn crash_copy(store: &EmbeddedStore, files: &[&str]) -> tempfile::TempDir {
        let copy = tempfile::tempdir().unwrap();
        let dir = store.path().parent().unwrap();
        for file in files {
            std::fs::copy(dir.join(file), copy.path().join(file)).unwrap();
        }
        copy
    }

    fn keys(dir: &Path) -> Vec<String> {
        let store = EmbeddedStore::open(dir, &EmbeddedOptions::default()).unwrap();
        let mut loaded = Vec::new();
        store.load(|s| loaded.push(s.key)).unwrap();
        loaded
    }

    #[test]
    fn batches_after_the_last_checkpoint_come_back_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), &EmbeddedOptions::default()).unwrap();
        let (a, b, c) = (session("a", 0), session("b", 1), session("c", 2));
        store.commit(sessions([&a, &b])).unwrap();
        store.commit(sessions([&c])).unwrap();
        store.backlog.wait_empty().unwrap();
        let crashed = crash_copy(&store, &[DATABASE_FILE, JOURNAL_FILES[0], JOURNAL_FILES[1]]);
        let without_journal = crash_copy(&store, &[DATABASE_FILE]);
        drop(store);
        assert_eq!(keys(crashed.path()), ["a", "b", "c"]);
        // The database file alone stops at the checkpoint made when it was opened: the
        // journal is what made the batches durable.
        assert!(keys(without_journal.path()).is_empty());
        // Replayed and checkpointed: a second start has nothing to replay and finds the same.
        assert_eq!(keys(crashed.path()), ["a", "b", "c"]);
    }

    /// Creates of 2 KiB sessions, enough to fill both journal files more than once.
    fn fill(store: &EmbeddedStore, from: u64, count: u64) {
        for sequence in from..from + count {
            let mut session = session(&format!("s{sequence}"), sequence);
            session.identifier = "x".repeat(2048);
            store
                .commit(Changes {
                    sessions: vec![&session],
                    events: vec![event(sequence + 1, 0)],
                    ..Default::default()
                })
                .unwrap();
        }
    }

    #[test]
    fn a_crash_at_any_point_of_the_journal_files_turns_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), &EmbeddedOptions::default()).unwrap();
        let files = [DATABASE_FILE, JOURNAL_FILES[0], JOURNAL_FILES[1]];
        let mut crashes = Vec::new();
        let mut written = 0;
        for _ in 0..6 {
            // 300 creates of 2 KiB: past half a journal file each time.
            fill(&store, written, 300);
            written += 300;
            // Copied with the checkpointer at work, as a crash leaves the files; the writer is held
            // so that both journal files are copied as of the same moment.
            let writing = store.writing();
            crashes.push((written, crash_copy(&store, &files)));
            drop(writing);
        }
        drop(store);
        for (count, crashed) in crashes {
            let keys = keys(crashed.path());
            assert_eq!(keys.len() as u64, count);
            let expected: Vec<String> = (0..count).map(|s| format!("s{s}")).collect();
            assert_eq!(keys, expected);
        }
    }

    fn sequences_after(store: &EmbeddedStore, after: u64) -> Vec<u64> {
        let events = store.events_after(after, 10).unwrap();
        events.into_iter().map(|(sequence, _)| sequence).collect()
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
        let first_kept = store
            .commit(Changes {
                events: (1..=5).map(|s| event(s, s as i64)).collect(),
                window,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(first_kept, 3);
        // What the checkpointer has not committed yet is read from what it holds.
        assert_eq!(sequences_after(&store, 0), [3, 4, 5]);
        assert_eq!(
            store.feed_bounds().unwrap(),
            FeedBounds {
                first_kept: 3,
                next: 6
            }
        );
        assert_eq!(sequences_after(&store, 0), [3, 4, 5]);
        // By age: events recorded before second 5 go.
        let first_kept = store
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
        assert_eq!(first_kept, 5);
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
