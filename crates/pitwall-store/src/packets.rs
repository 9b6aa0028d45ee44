//! The embedded packet log: every data source's packets, in the reference's offset spaces (the
//! main stream, one per stream, the essentials), in a redb database of its own
//! (`packets.redb`), so that packet commits and session commits do not wait for each other.
//!
//! Offsets are dense per space, start at 0 and are never reused. Packets are stored in
//! **chunks**: one row holds the packets a commit appended to one space, in order, keyed by
//! (space, offset of the first). A commit of a thousand packets is then a few B-tree inserts
//! instead of a thousand, and a reader copies a run of packets out of one row. Each chunk is
//! framed with a CRC32C like the session rows. Retention removes whole chunks from the front of
//! a space; a space's next offset is kept in `heads`, so it survives its chunks.
//!
//! Which packet goes to which space, and the offsets, are the caller's (the server's packet
//! writer): this module only stores and reads what it is given, one fsync'd commit at a time.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use prost::bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::embedded::StoreError;
use crate::guard::guarded;
use crate::rows::{frame_into, unframe};

/// The file inside the data directory.
pub const PACKETS_FILE: &str = "packets.redb";

/// `"{data_source}\u{1f}{kind}{stream}"` → space id; see [`SpaceName`].
const SPACES: TableDefinition<&str, u64> = TableDefinition::new("spaces");
/// Space id → (next offset, bytes kept).
const HEADS: TableDefinition<u64, (u64, u64)> = TableDefinition::new("heads");
/// (space id, offset of its first packet) → framed chunk.
const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
/// (session key, data source, stream) of every stream a session has written to.
const SESSION_STREAMS: TableDefinition<(&str, &str, &str), ()> =
    TableDefinition::new("session_streams");

/// Separates the data source from the rest of a space's name: not a character a data source
/// may hold.
const SEPARATOR: char = '\u{1f}';

/// Which offset space of a data source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// Packets with no stream (and, under a partition layout, streams it does not map).
    Main,
    /// A copy of every essential packet.
    Essentials,
    /// One named stream.
    Stream(String),
}

/// A data source and one of its spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpaceName {
    pub data_source: String,
    pub space: Space,
}

impl SpaceName {
    fn key(&self) -> String {
        match &self.space {
            Space::Main => format!("{}{SEPARATOR}m", self.data_source),
            Space::Essentials => format!("{}{SEPARATOR}e", self.data_source),
            Space::Stream(stream) => format!("{}{SEPARATOR}s{stream}", self.data_source),
        }
    }

    fn from_key(key: &str) -> Option<SpaceName> {
        let (data_source, rest) = key.split_once(SEPARATOR)?;
        let space = match rest.split_at_checked(1)? {
            ("m", "") => Space::Main,
            ("e", "") => Space::Essentials,
            ("s", stream) => Space::Stream(stream.to_owned()),
            _ => return None,
        };
        Some(SpaceName {
            data_source: data_source.to_owned(),
            space,
        })
    }
}

/// Where a space stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    /// The offset the next packet gets.
    pub next: u64,
    /// Bytes of the chunks still kept.
    pub bytes: u64,
    /// The offset of the first packet still kept (`next` when none is).
    pub first: u64,
}

/// A space as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSpace {
    pub id: u64,
    pub name: SpaceName,
    pub head: Head,
}

/// One packet as a chunk holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPacket {
    pub offset: u64,
    /// When it was written, in nanoseconds since the Unix epoch.
    pub time_nanos: i64,
    /// The session key it was written with (the reference's record key).
    pub key: String,
    /// The client's `Packet` bytes, as written.
    pub packet: Bytes,
}

/// A chunk's times, for age retention without reading its packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    pub space: u64,
    pub base: u64,
    pub count: u64,
    pub bytes: u64,
    pub last_nanos: i64,
}

/// Everything one commit changes.
#[derive(Default)]
pub struct PacketCommit {
    /// Spaces seen for the first time.
    pub new_spaces: Vec<(SpaceName, u64)>,
    /// (space, offset of the first packet, encoded chunk from [`ChunkBuilder`]).
    pub chunks: Vec<(u64, u64, Vec<u8>)>,
    /// Where each changed space stands after the commit: (space, next offset, bytes kept).
    pub heads: Vec<(u64, u64, u64)>,
    /// Chunks removed by retention: (space, offset of its first packet).
    pub removed: Vec<(u64, u64)>,
    /// (session key, data source, stream) seen for the first time.
    pub session_streams: Vec<(String, String, String)>,
}

/// Builds one chunk: the packets of one space appended by one commit.
pub struct ChunkBuilder {
    payload: Vec<u8>,
    count: u32,
    first_nanos: i64,
    last_nanos: i64,
}

/// Count, then first and last time.
const CHUNK_HEADER_BYTES: usize = 4 + 8 + 8;

impl ChunkBuilder {
    pub fn new() -> ChunkBuilder {
        ChunkBuilder {
            payload: vec![0; CHUNK_HEADER_BYTES],
            count: 0,
            first_nanos: 0,
            last_nanos: 0,
        }
    }

    pub fn push(&mut self, time_nanos: i64, key: &str, packet: &[u8]) {
        if self.count == 0 {
            self.first_nanos = time_nanos;
        }
        self.last_nanos = time_nanos;
        self.count += 1;
        self.payload.extend_from_slice(&time_nanos.to_le_bytes());
        self.payload
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.payload.extend_from_slice(key.as_bytes());
        self.payload
            .extend_from_slice(&(packet.len() as u32).to_le_bytes());
        self.payload.extend_from_slice(packet);
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the packets so far.
    pub fn payload_bytes(&self) -> usize {
        self.payload.len()
    }

    /// The stored form: the framed payload.
    pub fn finish(mut self) -> Vec<u8> {
        self.payload[0..4].copy_from_slice(&self.count.to_le_bytes());
        self.payload[4..12].copy_from_slice(&self.first_nanos.to_le_bytes());
        self.payload[12..20].copy_from_slice(&self.last_nanos.to_le_bytes());
        let mut row = Vec::new();
        frame_into(&mut row, &self.payload);
        row
    }
}

impl Default for ChunkBuilder {
    fn default() -> Self {
        ChunkBuilder::new()
    }
}

/// What is wrong with a stored chunk.
#[derive(Debug, thiserror::Error)]
#[error("packet chunk at offset {base} of space {space} is damaged: {why}")]
pub struct DamagedChunk {
    pub space: u64,
    pub base: u64,
    pub why: String,
}

/// The packets of a chunk from `from` on.
fn decode_chunk(
    space: u64,
    base: u64,
    row: &[u8],
    from: u64,
    out: &mut Vec<StoredPacket>,
) -> Result<(), DamagedChunk> {
    let damaged = |why: String| DamagedChunk { space, base, why };
    let payload = unframe(row).map_err(|e| damaged(e.to_string()))?;
    let mut cursor = Cursor { bytes: payload };
    let count = cursor.u32().ok_or_else(|| damaged("no header".into()))?;
    cursor.take(16).ok_or_else(|| damaged("no header".into()))?;
    for index in 0..u64::from(count) {
        let truncated = || damaged(format!("packet {index} of {count} is cut short"));
        let time_nanos = cursor.i64().ok_or_else(truncated)?;
        let key_len = cursor.u32().ok_or_else(truncated)? as usize;
        let key = cursor.take(key_len).ok_or_else(truncated)?;
        let packet_len = cursor.u32().ok_or_else(truncated)? as usize;
        let packet = cursor.take(packet_len).ok_or_else(truncated)?;
        let offset = base + index;
        if offset < from {
            continue;
        }
        out.push(StoredPacket {
            offset,
            time_nanos,
            key: String::from_utf8_lossy(key).into_owned(),
            packet: Bytes::copy_from_slice(packet),
        });
    }
    Ok(())
}

/// A chunk's header: (count, last time).
fn chunk_header(row: &[u8]) -> Option<(u64, i64)> {
    let payload = unframe(row).ok()?;
    let mut cursor = Cursor { bytes: payload };
    let count = cursor.u32()?;
    cursor.i64()?;
    let last = cursor.i64()?;
    Some((u64::from(count), last))
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// Settings of the packet store.
#[derive(Debug, Clone)]
pub struct PacketStoreOptions {
    /// Page cache: readers that replay from far back read through it.
    pub cache_bytes: usize,
}

/// An open packet store. The file is locked for as long as this value lives.
pub struct PacketStore {
    /// `None` while reopening after a failed write has not succeeded.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    cache_bytes: usize,
}

impl PacketStore {
    /// Opens (or creates) `packets.redb` in `data_dir`.
    pub fn open(data_dir: &Path, options: &PacketStoreOptions) -> Result<PacketStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(PACKETS_FILE);
        let db = guarded(&path, || {
            if let Ok(metadata) = std::fs::metadata(&path)
                && metadata.len() == 0
            {
                return Err(StoreError::Empty { path: path.clone() });
            }
            let mut builder = Database::builder();
            builder.set_cache_size(options.cache_bytes);
            let db = builder.create(&path).map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(data_dir.to_owned()),
                source => StoreError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
            let txn = db.begin_write()?;
            txn.open_table(SPACES)?;
            txn.open_table(HEADS)?;
            txn.open_table(CHUNKS)?;
            txn.open_table(SESSION_STREAMS)?;
            txn.commit()?;
            Ok(db)
        })?;
        Ok(PacketStore {
            db: RwLock::new(Some(db)),
            path,
            cache_bytes: options.cache_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every space with where it stands.
    pub fn spaces(&self) -> Result<Vec<StoredSpace>, StoreError> {
        guarded(&self.path, || {
            let db = self.db()?;
            let txn = db.begin_read()?;
            let names = txn.open_table(SPACES)?;
            let heads = txn.open_table(HEADS)?;
            let chunks = txn.open_table(CHUNKS)?;
            let mut spaces = Vec::new();
            for row in names.iter()? {
                let (key, id) = row?;
                let Some(name) = SpaceName::from_key(key.value()) else {
                    continue;
                };
                let id = id.value();
                let (next, bytes) = heads.get(id)?.map(|v| v.value()).unwrap_or((0, 0));
                let first = chunks
                    .range((id, 0)..=(id, u64::MAX))?
                    .next()
                    .transpose()?
                    .map(|(key, _)| key.value().1)
                    .unwrap_or(next);
                spaces.push(StoredSpace {
                    id,
                    name,
                    head: Head { next, bytes, first },
                });
            }
            Ok(spaces)
        })
    }

    /// Every (session key, data source, stream) written to.
    pub fn session_streams(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        guarded(&self.path, || {
            let db = self.db()?;
            let txn = db.begin_read()?;
            let table = txn.open_table(SESSION_STREAMS)?;
            let mut all = Vec::new();
            for row in table.iter()? {
                let (key, _) = row?;
                let (session, data_source, stream) = key.value();
                all.push((
                    session.to_owned(),
                    data_source.to_owned(),
                    stream.to_owned(),
                ));
            }
            Ok(all)
        })
    }

    /// Writes the commit in one transaction and returns once it is durable (fsync'd).
    pub fn commit(&self, commit: PacketCommit) -> Result<(), StoreError> {
        guarded(&self.path, || {
            let db = self.db()?;
            let mut txn = db.begin_write()?;
            // As for the session store: restart after `kill -9` reads the allocator state
            // instead of walking every page.
            txn.set_quick_repair(true);
            {
                let mut spaces = txn.open_table(SPACES)?;
                for (name, id) in &commit.new_spaces {
                    spaces.insert(name.key().as_str(), *id)?;
                }
                let mut chunks = txn.open_table(CHUNKS)?;
                for (space, base, chunk) in &commit.chunks {
                    chunks.insert((*space, *base), chunk.as_slice())?;
                }
                for (space, base) in &commit.removed {
                    chunks.remove((*space, *base))?;
                }
                let mut heads = txn.open_table(HEADS)?;
                for (space, next, bytes) in &commit.heads {
                    heads.insert(*space, (*next, *bytes))?;
                }
                let mut streams = txn.open_table(SESSION_STREAMS)?;
                for (session, data_source, stream) in &commit.session_streams {
                    streams.insert(
                        (session.as_str(), data_source.as_str(), stream.as_str()),
                        (),
                    )?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Packets of `space` from offset `from` on, whole chunks, until at least `max_bytes` of
    /// packets are read (or the space's end).
    pub fn read(
        &self,
        space: u64,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<StoredPacket>, StoreError> {
        guarded(&self.path, || {
            let db = self.db()?;
            let txn = db.begin_read()?;
            let chunks = txn.open_table(CHUNKS)?;
            // The chunk holding `from`: the last one starting at or before it.
            let start = chunks
                .range((space, 0)..=(space, from))?
                .next_back()
                .transpose()?
                .map(|(key, _)| key.value().1)
                .unwrap_or(from);
            let mut out = Vec::new();
            let mut bytes = 0;
            for row in chunks.range((
                Bound::Included((space, start)),
                Bound::Included((space, u64::MAX)),
            ))? {
                let (key, value) = row?;
                let (_, base) = key.value();
                let before = out.len();
                decode_chunk(space, base, value.value(), from, &mut out).map_err(|e| {
                    StoreError::Damaged {
                        path: self.path.clone(),
                        detail: e.to_string(),
                    }
                })?;
                bytes += out[before..].iter().map(|p| p.packet.len()).sum::<usize>();
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// The oldest chunks of `space`, for retention: up to `limit`, oldest first.
    pub fn oldest_chunks(&self, space: u64, limit: usize) -> Result<Vec<ChunkInfo>, StoreError> {
        guarded(&self.path, || {
            let db = self.db()?;
            let txn = db.begin_read()?;
            let chunks = txn.open_table(CHUNKS)?;
            let mut out = Vec::new();
            for row in chunks.range((space, 0)..=(space, u64::MAX))?.take(limit) {
                let (key, value) = row?;
                let (_, base) = key.value();
                let value = value.value();
                let (count, last_nanos) = chunk_header(value).unwrap_or((0, i64::MIN));
                out.push(ChunkInfo {
                    space,
                    base,
                    count,
                    bytes: value.len() as u64,
                    last_nanos,
                });
            }
            Ok(out)
        })
    }

    /// How many chunks are stored, for tests and the startup log.
    pub fn chunk_count(&self) -> Result<u64, StoreError> {
        guarded(&self.path, || {
            let db = self.db()?;
            let txn = db.begin_read()?;
            Ok(txn.open_table(CHUNKS)?.len()?)
        })
    }

    /// Closes and opens the database again after a failed write (see
    /// [`crate::EmbeddedStore::reopen`]), then checks a write succeeds.
    pub fn reopen(&self) -> Result<(), StoreError> {
        guarded(&self.path, || {
            let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
            drop(slot.take());
            let mut builder = Database::builder();
            builder.set_cache_size(self.cache_bytes);
            let db = builder
                .open(&self.path)
                .map_err(|source| StoreError::Open {
                    path: self.path.clone(),
                    source,
                })?;
            let txn = db.begin_write()?;
            txn.open_table(HEADS)?;
            txn.commit()?;
            *slot = Some(db);
            Ok(())
        })
    }

    fn db(&self) -> Result<Db<'_>, StoreError> {
        let slot = self.db.read().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            return Err(StoreError::Closed {
                path: self.path.clone(),
            });
        }
        Ok(Db(slot))
    }
}

/// The open database, borrowed for one call.
struct Db<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for Db<'_> {
    type Target = Database;

    fn deref(&self) -> &Database {
        match self.0.as_ref() {
            Some(db) => db,
            None => unreachable!("a Db is made only from an open database"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> PacketStoreOptions {
        PacketStoreOptions {
            cache_bytes: 1 << 20,
        }
    }

    fn chunk(from: u64, count: u64) -> Vec<u8> {
        let mut builder = ChunkBuilder::new();
        for offset in from..from + count {
            builder.push(offset as i64, "key", format!("packet {offset}").as_bytes());
        }
        builder.finish()
    }

    #[test]
    fn packets_read_back_from_any_offset_across_chunks_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let main = SpaceName {
            data_source: "Car1".into(),
            space: Space::Main,
        };
        {
            let store = PacketStore::open(dir.path(), &options()).unwrap();
            store
                .commit(PacketCommit {
                    new_spaces: vec![(main.clone(), 1)],
                    chunks: vec![(1, 0, chunk(0, 3)), (1, 3, chunk(3, 4))],
                    heads: vec![(1, 7, 0)],
                    session_streams: vec![("s".into(), "Car1".into(), String::new())],
                    ..PacketCommit::default()
                })
                .unwrap();
        }
        let store = PacketStore::open(dir.path(), &options()).unwrap();
        let spaces = store.spaces().unwrap();
        assert_eq!(spaces.len(), 1);
        assert_eq!(spaces[0].name, main);
        assert_eq!(spaces[0].head.next, 7);
        let read = store.read(1, 2, usize::MAX).unwrap();
        let offsets: Vec<u64> = read.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [2, 3, 4, 5, 6]);
        assert_eq!(read[0].packet, Bytes::from_static(b"packet 2"));
        assert_eq!(read[0].key, "key");
        assert_eq!(
            store.session_streams().unwrap(),
            [("s".to_owned(), "Car1".to_owned(), String::new())]
        );
    }

    #[test]
    fn removed_chunks_move_the_first_offset_but_not_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let store = PacketStore::open(dir.path(), &options()).unwrap();
        let name = SpaceName {
            data_source: "Car1".into(),
            space: Space::Stream("laps".into()),
        };
        store
            .commit(PacketCommit {
                new_spaces: vec![(name, 5)],
                chunks: vec![(5, 0, chunk(0, 2)), (5, 2, chunk(2, 2))],
                heads: vec![(5, 4, 0)],
                ..PacketCommit::default()
            })
            .unwrap();
        let oldest = store.oldest_chunks(5, 10).unwrap();
        assert_eq!(oldest.len(), 2);
        assert_eq!((oldest[0].count, oldest[0].last_nanos), (2, 1));
        store
            .commit(PacketCommit {
                removed: vec![(5, 0), (5, 2)],
                ..PacketCommit::default()
            })
            .unwrap();
        let spaces = store.spaces().unwrap();
        assert_eq!((spaces[0].head.first, spaces[0].head.next), (4, 4));
        assert!(store.read(5, 0, usize::MAX).unwrap().is_empty());
    }

    #[test]
    fn a_changed_byte_in_a_chunk_is_reported_not_served() {
        let mut row = chunk(0, 2);
        let last = row.len() - 1;
        row[last] ^= 1;
        let mut out = Vec::new();
        assert!(decode_chunk(1, 0, &row, 0, &mut out).is_err());
    }

    #[test]
    fn space_names_round_trip() {
        for space in [Space::Main, Space::Essentials, Space::Stream("a.b".into())] {
            let name = SpaceName {
                data_source: "Car_1".into(),
                space,
            };
            assert_eq!(SpaceName::from_key(&name.key()), Some(name));
        }
    }
}
