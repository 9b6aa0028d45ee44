//! The embedded store: the current state of every session, one row per session, in a redb
//! database.
//!
//! Rows are the sessions after the records of a batch were applied (not the records), so
//! startup reads each session once however many changes it had, and its cost grows with the
//! number of sessions, not with the length of history. Rows are keyed by the session's
//! creation sequence: new sessions append to the end of the B-tree instead of dirtying a random
//! page each (as random UUID keys would), and reading the table in key order is creation
//! order, which listings need.

use std::path::{Path, PathBuf};

use pitwall_core::Session;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use thiserror::Error;

/// Creation sequence → encoded [`Session`].
const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions_by_sequence");

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

/// An open embedded store. The database file is locked for as long as this value lives.
pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
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
        txn.commit()?;
        Ok(EmbeddedStore { db, path })
    }

    /// How many sessions are stored.
    pub fn len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(SESSIONS)?.len()?)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Hands every stored session to `restore`, in creation order, without holding them all.
    pub fn load(&self, mut restore: impl FnMut(Session)) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
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

    /// Writes the sessions in one transaction and returns once it is durable on disk (fsync'd).
    pub fn commit<'a>(
        &self,
        sessions: impl IntoIterator<Item = &'a Session>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        // Makes recovery after a crash read the allocator state instead of walking every page,
        // so restart time after `kill -9` stays flat as the store grows.
        txn.set_quick_repair(true);
        {
            let mut table = txn.open_table(SESSIONS)?;
            for session in sessions {
                table.insert(session.sequence, session.encode().as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
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

    #[test]
    fn committed_sessions_load_back_in_creation_order() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions::default();
        {
            let store = EmbeddedStore::open(dir.path(), &options).unwrap();
            let (b, a) = (session("b", 0), session("a", 1));
            store.commit([&b, &a]).unwrap();
            let mut b2 = b.clone();
            b2.identifier = "changed".into();
            store.commit([&b2]).unwrap();
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
