//! `pitwall store check` and `pitwall store repair`: redb's own integrity check (the checksum
//! of every page of the committed trees) plus the checksum of every row.
//!
//! redb checks only through `Database::check_integrity`, which repairs what it can in the same
//! call. `check` must change nothing, so it runs on the real file (holding its lock, so it
//! refuses while a server has the store) through a backend that keeps every write in memory:
//! the verdict is redb's, the file stays as it was.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use redb::backends::FileBackend;
use redb::{
    BackendError, Database, DatabaseError, ReadableDatabase, ReadableTable, StorageBackend,
};

use crate::embedded::{DATABASE_FILE, FEED_EVENTS, FEED_META, FIRST_KEPT, SESSIONS, StoreError};
use crate::guard::guarded;
use crate::rows::{DamagedRow, read_event, read_session};

/// What redb's integrity check said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Integrity {
    /// Every page verified.
    Clean,
    /// Damaged, and redb can repair it (`check`), or did (`repair`).
    Repairable,
    /// Damaged beyond what redb can repair.
    Damaged(String),
}

/// What a check or a repair found.
#[derive(Debug, Clone)]
pub struct Report {
    pub path: PathBuf,
    /// The file was not closed cleanly (a crash): opening it recovers it, as a server start does.
    pub needed_recovery: bool,
    pub integrity: Integrity,
    pub sessions: u64,
    pub feed_events: u64,
    pub damaged_rows: Vec<DamagedRow>,
}

impl Report {
    /// Nothing to report: every page and row verified.
    pub fn is_clean(&self) -> bool {
        self.integrity == Integrity::Clean && self.damaged_rows.is_empty()
    }
}

/// Checks the store in `data_dir` without changing it.
pub fn check(data_dir: &Path) -> Result<Report, StoreError> {
    let path = existing_store(data_dir)?;
    let recovery = Arc::new(AtomicBool::new(false));
    let db = guarded(&path, || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Read {
                path: path.clone(),
                source,
            })?;
        let backend = Scratch::new(file).map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        let noted = recovery.clone();
        Database::builder()
            .set_repair_callback(move |_| noted.store(true, Ordering::Relaxed))
            .create_with_backend(backend)
            .map_err(|e| opened(data_dir, &path, e))
    });
    inspect(&path, db, &recovery, false)
}

/// Repairs the store in `data_dir`: redb's repair, then removes the rows whose checksum fails
/// (a damaged feed event removes the history up to it, so no watcher replays a gap).
pub fn repair(data_dir: &Path) -> Result<Report, StoreError> {
    let path = existing_store(data_dir)?;
    let recovery = Arc::new(AtomicBool::new(false));
    let db = guarded(&path, || {
        let noted = recovery.clone();
        Database::builder()
            .set_repair_callback(move |_| noted.store(true, Ordering::Relaxed))
            .open(&path)
            .map_err(|e| opened(data_dir, &path, e))
    });
    inspect(&path, db, &recovery, true)
}

fn inspect(
    path: &Path,
    db: Result<Database, StoreError>,
    recovery: &AtomicBool,
    remove_damaged: bool,
) -> Result<Report, StoreError> {
    let mut report = Report {
        path: path.to_owned(),
        needed_recovery: false,
        integrity: Integrity::Clean,
        sessions: 0,
        feed_events: 0,
        damaged_rows: Vec::new(),
    };
    let mut db = match db {
        Ok(db) => db,
        Err(StoreError::Damaged { detail, .. }) => {
            report.integrity = Integrity::Damaged(detail);
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    report.needed_recovery = recovery.load(Ordering::Relaxed);
    report.integrity = verify_pages(path, &mut db)?;
    // Whatever redb says of its pages, read the rows: a changed byte inside a row fails both
    // redb's page checksum and the row's, and only the row can say which session it was.
    match guarded(path, || scan_rows(&db, &mut report)) {
        Ok(()) => {}
        Err(StoreError::Damaged { detail, .. }) => {
            report.integrity = Integrity::Damaged(detail);
            return Ok(report);
        }
        Err(e) => return Err(e),
    }
    if remove_damaged && !report.damaged_rows.is_empty() {
        if let Integrity::Damaged(_) = report.integrity {
            // A failed check leaves redb without its allocator state: open again to write.
            drop(db);
            db = guarded(path, || {
                Database::builder()
                    .open(path)
                    .map_err(|e| opened(path.parent().unwrap_or(path), path, e))
            })?;
        }
        guarded(path, || remove_rows(&db, &report.damaged_rows))?;
        // Removing a row rewrites its page, so pages damaged only there verify again.
        report.integrity = match verify_pages(path, &mut db)? {
            Integrity::Damaged(why) => Integrity::Damaged(why),
            _ => Integrity::Repairable,
        };
    }
    Ok(report)
}

/// redb's integrity check; repairs what it can (in the scratch backend, for `check`).
fn verify_pages(path: &Path, db: &mut Database) -> Result<Integrity, StoreError> {
    Ok(match guarded(path, || Ok(db.check_integrity())) {
        Ok(Ok(true)) => Integrity::Clean,
        Ok(Ok(false)) => Integrity::Repairable,
        Ok(Err(e)) => Integrity::Damaged(e.to_string()),
        Err(StoreError::Damaged { detail, .. }) => Integrity::Damaged(detail),
        Err(e) => return Err(e),
    })
}

fn scan_rows(db: &Database, report: &mut Report) -> Result<(), StoreError> {
    let txn = db.begin_read()?;
    for row in txn.open_table(SESSIONS)?.iter()? {
        let (sequence, value) = row?;
        match read_session(value.value()) {
            Ok(_) => report.sessions += 1,
            Err((key, damage)) => report.damaged_rows.push(DamagedRow::Session {
                sequence: sequence.value(),
                key,
                damage,
            }),
        }
    }
    for row in txn.open_table(FEED_EVENTS)?.iter()? {
        let (sequence, value) = row?;
        match read_event(value.value()) {
            Ok(_) => report.feed_events += 1,
            Err(damage) => report.damaged_rows.push(DamagedRow::FeedEvent {
                sequence: sequence.value(),
                damage,
            }),
        }
    }
    Ok(())
}

fn remove_rows(db: &Database, rows: &[DamagedRow]) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    {
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut events = txn.open_table(FEED_EVENTS)?;
        let mut meta = txn.open_table(FEED_META)?;
        let mut history_from = None;
        for row in rows {
            match row {
                DamagedRow::Session { sequence, .. } => {
                    sessions.remove(*sequence)?;
                }
                DamagedRow::FeedEvent { sequence, .. } => {
                    history_from = history_from.max(Some(sequence + 1));
                }
            }
        }
        if let Some(first_kept) = history_from {
            let first = events.first()?.map(|(sequence, _)| sequence.value());
            if let Some(first) = first {
                events.retain_in(first..first_kept, |_, _| false)?;
            }
            meta.insert(FIRST_KEPT, first_kept)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// The store file of `data_dir`, refused when missing or empty (there is nothing to check, and
/// opening an empty file would make a new store of it).
fn existing_store(data_dir: &Path) -> Result<PathBuf, StoreError> {
    let path = data_dir.join(DATABASE_FILE);
    match std::fs::metadata(&path) {
        Ok(metadata) if metadata.len() == 0 => Err(StoreError::Empty { path }),
        Ok(_) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::Missing { path }),
        Err(source) => Err(StoreError::Read { path, source }),
    }
}

fn opened(data_dir: &Path, path: &Path, error: DatabaseError) -> StoreError {
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

/// The real file for reading and locking; every write stays in memory.
#[derive(Debug)]
struct Scratch {
    file: std::fs::File,
    locks: FileBackend,
    state: Mutex<ScratchState>,
}

#[derive(Debug)]
struct ScratchState {
    len: u64,
    /// Bytes below this are the file's own (unless written over); above, zeros.
    file_bytes: u64,
    writes: Vec<(u64, Vec<u8>)>,
}

impl Scratch {
    fn new(file: std::fs::File) -> std::io::Result<Scratch> {
        let len = file.metadata()?.len();
        let locks = FileBackend::new(file.try_clone()?).map_err(std::io::Error::other)?;
        Ok(Scratch {
            file,
            locks,
            state: Mutex::new(ScratchState {
                len,
                file_bytes: len,
                writes: Vec::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ScratchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StorageBackend for Scratch {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let state = self.state();
        let end = offset + out.len() as u64;
        if end > state.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read beyond the end",
            ));
        }
        out.fill(0);
        if offset < state.file_bytes {
            let from_file = (state.file_bytes - offset).min(out.len() as u64) as usize;
            self.file.read_exact_at(&mut out[..from_file], offset)?;
        }
        for (at, data) in &state.writes {
            let (start, stop) = (*at, at + data.len() as u64);
            if stop <= offset || start >= end {
                continue;
            }
            let from = start.max(offset);
            let to = stop.min(end);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut state = self.state();
        state.len = len;
        state.file_bytes = state.file_bytes.min(len);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.state().writes.push((offset, data.to_vec()));
        Ok(())
    }

    fn close(&self) -> std::io::Result<()> {
        self.locks.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.locks.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.locks.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.locks.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.locks.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.locks.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.locks.query_lock_range(start, end)
    }
}
