//! Storage engines for the packet log, measured in this process on the same packets: 1 KiB
//! packets with random (incompressible) content, appended in durable group commits
//! (fdatasync'd, as the server commits) and read back in order after the engine is reopened.
//!
//! - redb, one row per packet (key: offset);
//! - redb, chunks, through `pitwall_store::packets::PacketStore`, as Pitwall stores packets:
//!   one row per run of up to [`CHUNK_BYTES`] of a commit's packets, framed with a CRC32C;
//! - fjall (an LSM tree), one key per packet (big-endian offset);
//! - fjall, the same chunks as Pitwall's, keyed by (space, first offset).
//!
//! Reads come from the operating system's page cache (the files were just written; nothing
//! here can drop that cache), so they measure the engine's own read path.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fjall::{PartitionCreateOptions, PersistMode};
use pitwall_store::packets::{
    ChunkBuilder, PacketCommit, PacketStore, PacketStoreOptions, Space, SpaceName,
};
use prost::bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::packets::{self, PACKET_BYTES, Random, Read, Stamp};
use crate::process::mib;
use crate::report::EngineResult;
use crate::server::fresh_data_dir;

/// Packets of one space per chunk, in bytes: the server's constant.
pub const CHUNK_BYTES: usize = 60 * 1024;
/// Page cache (redb) and block cache (fjall): the server's default packet cache.
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Packet bytes read from the chunk store in one step: the server's readers' step.
const READ_BYTES: usize = 256 * 1024;
/// The one space every packet goes to.
const SPACE: u64 = 1;

const PACKET_ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("packets");

#[derive(Debug, Clone, clap::Args)]
pub struct EnginesArgs {
    /// Packets (1 KiB each) written to, then read from, each engine.
    #[arg(long, default_value_t = 400_000)]
    pub packets: usize,
    /// Packets per durable commit.
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
}

/// A storage layout under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    RedbRows,
    RedbChunks,
    FjallKeys,
    FjallChunks,
}

impl Engine {
    pub const ALL: [Engine; 4] = [
        Engine::RedbRows,
        Engine::RedbChunks,
        Engine::FjallKeys,
        Engine::FjallChunks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Engine::RedbRows => "redb, a row per packet",
            Engine::RedbChunks => "redb, chunks (Pitwall's PacketStore)",
            Engine::FjallKeys => "fjall, a key per packet",
            Engine::FjallChunks => "fjall, chunks",
        }
    }
}

/// Every engine, one after the other, each on a fresh directory removed afterwards.
pub async fn run(args: &EnginesArgs) -> anyhow::Result<Vec<EngineResult>> {
    let mut rows = Vec::new();
    for engine in Engine::ALL {
        eprintln!("  engines: {}", engine.name());
        let args = args.clone();
        rows.push(tokio::task::spawn_blocking(move || measure(engine, &args)).await??);
    }
    Ok(rows)
}

/// The packets of commit `index`: offsets `index × batch ..`, each stamped with its offset.
fn batch_packets(index: usize, batch: usize, total: usize) -> Vec<Bytes> {
    let first = index * batch;
    let mut random = Random::new(first as u64);
    (first..total.min(first + batch))
        .map(|offset| {
            let stamp = Stamp {
                writer: 0,
                sequence: offset as u64,
                due_nanos: 0,
            };
            packets::data_packet(stamp, &mut random)
        })
        .collect()
}

/// Checks packets read back against their expected offsets, in order.
struct Checker {
    next: u64,
    errors: u64,
}

impl Checker {
    fn check(&mut self, packet: &[u8]) {
        let expected = self.next;
        self.next += 1;
        let ok = packet.len() == PACKET_BYTES
            && matches!(
                packets::read_packet(Bytes::copy_from_slice(packet)),
                Ok(Read::Data(stamp)) if stamp.sequence == expected
            );
        if !ok {
            self.errors += 1;
        }
    }
}

pub fn measure(engine: Engine, args: &EnginesArgs) -> anyhow::Result<EngineResult> {
    let dir = fresh_data_dir()?;
    let (total, batch) = (args.packets, args.batch.max(1));
    let commits = total.div_ceil(batch);
    let mut writing = Duration::ZERO;
    match engine {
        Engine::RedbRows => {
            let db = redb_open(dir.path())?;
            for index in 0..commits {
                let packets = batch_packets(index, batch, total);
                let started = Instant::now();
                let mut txn = db.begin_write()?;
                txn.set_quick_repair(true);
                {
                    let mut table = txn.open_table(PACKET_ROWS)?;
                    for (i, packet) in packets.iter().enumerate() {
                        table.insert((index * batch + i) as u64, packet.as_ref())?;
                    }
                }
                txn.commit()?;
                writing += started.elapsed();
            }
        }
        Engine::RedbChunks => {
            let store = chunk_store(dir.path())?;
            for index in 0..commits {
                let packets = batch_packets(index, batch, total);
                let started = Instant::now();
                let base = (index * batch) as u64;
                let next = base + packets.len() as u64;
                store.commit(PacketCommit {
                    new_spaces: if index == 0 {
                        vec![(space_name(), SPACE)]
                    } else {
                        Vec::new()
                    },
                    chunks: chunks(base, &packets)
                        .into_iter()
                        .map(|(base, chunk)| (SPACE, base, chunk))
                        .collect(),
                    heads: vec![(SPACE, next, 0)],
                    ..PacketCommit::default()
                })?;
                writing += started.elapsed();
            }
        }
        Engine::FjallKeys | Engine::FjallChunks => {
            let keyspace = fjall_open(dir.path())?;
            let partition =
                keyspace.open_partition("packets", PartitionCreateOptions::default())?;
            for index in 0..commits {
                let packets = batch_packets(index, batch, total);
                let started = Instant::now();
                let base = (index * batch) as u64;
                let mut commit = keyspace.batch().durability(Some(PersistMode::SyncData));
                if engine == Engine::FjallKeys {
                    for (i, packet) in packets.iter().enumerate() {
                        commit.insert(
                            &partition,
                            (base + i as u64).to_be_bytes().to_vec(),
                            packet.as_ref(),
                        );
                    }
                } else {
                    for (base, chunk) in chunks(base, &packets) {
                        commit.insert(&partition, chunk_key(base).to_vec(), chunk);
                    }
                }
                commit.commit()?;
                writing += started.elapsed();
            }
        }
    }
    // Closed above (each handle dropped at the end of its arm); read after reopening.
    let started = Instant::now();
    let mut checker = Checker { next: 0, errors: 0 };
    match engine {
        Engine::RedbRows => {
            let db = redb_open(dir.path())?;
            let txn = db.begin_read()?;
            let table = txn.open_table(PACKET_ROWS)?;
            for row in table.iter()? {
                let (_, value) = row?;
                checker.check(value.value());
            }
        }
        Engine::RedbChunks => {
            let store = chunk_store(dir.path())?;
            loop {
                let packets = store.read(SPACE, checker.next, READ_BYTES)?;
                if packets.is_empty() {
                    break;
                }
                for packet in &packets {
                    checker.check(&packet.packet);
                }
            }
        }
        Engine::FjallKeys | Engine::FjallChunks => {
            let keyspace = fjall_open(dir.path())?;
            let partition =
                keyspace.open_partition("packets", PartitionCreateOptions::default())?;
            for pair in partition.iter() {
                let (_, value) = pair?;
                if engine == Engine::FjallKeys {
                    checker.check(&value);
                } else {
                    for packet in decode_chunk(&value)? {
                        checker.check(packet);
                    }
                }
            }
        }
    }
    let reading = started.elapsed();
    let read_errors = checker.errors + (total as u64).abs_diff(checker.next);
    let (file_bytes, disk_bytes) = tree_bytes(dir.path())?;
    let write_per_second = total as f64 / writing.as_secs_f64().max(f64::MIN_POSITIVE);
    Ok(EngineResult {
        engine: engine.name().to_owned(),
        packets: total as u64,
        batch,
        write_per_second,
        write_mb_per_second: write_per_second * PACKET_BYTES as f64 / 1e6,
        read_per_second: checker.next as f64 / reading.as_secs_f64().max(f64::MIN_POSITIVE),
        read_errors,
        file_mib: mib(file_bytes),
        disk_mib: mib(disk_bytes),
    })
}

fn redb_open(dir: &Path) -> anyhow::Result<redb::Database> {
    let mut builder = redb::Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    Ok(builder.create(dir.join("rows.redb"))?)
}

fn chunk_store(dir: &Path) -> anyhow::Result<PacketStore> {
    Ok(PacketStore::open(
        dir,
        &PacketStoreOptions {
            cache_bytes: CACHE_BYTES,
        },
    )?)
}

fn fjall_open(dir: &Path) -> anyhow::Result<fjall::Keyspace> {
    Ok(fjall::Config::new(dir.join("fjall"))
        .cache_size(CACHE_BYTES as u64)
        .open()?)
}

fn space_name() -> SpaceName {
    SpaceName {
        data_source: "bench".to_owned(),
        space: Space::Main,
    }
}

fn chunk_key(base: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&SPACE.to_be_bytes());
    key[8..].copy_from_slice(&base.to_be_bytes());
    key
}

/// A commit's packets as the server chunks them: (offset of the first, stored chunk).
fn chunks(base: u64, packets: &[Bytes]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut builder = ChunkBuilder::new();
    let mut first = base;
    for (i, packet) in packets.iter().enumerate() {
        if builder.payload_bytes() >= CHUNK_BYTES {
            out.push((first, std::mem::take(&mut builder).finish()));
            first = base + i as u64;
        }
        builder.push(0, "", packet);
    }
    if !builder.is_empty() {
        out.push((first, builder.finish()));
    }
    out
}

/// The packets of a chunk [`ChunkBuilder`] made: a format marker and CRC32C of the payload,
/// then a count and two times, then per packet its time, key and bytes (lengths as u32).
fn decode_chunk(row: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let (header, payload) = row.split_at_checked(5).context("a chunk is cut short")?;
    let stored = u32::from_le_bytes(header[1..5].try_into()?);
    if crc32c::crc32c(payload) != stored {
        bail!("a chunk does not match its checksum");
    }
    let mut cursor = Cursor(payload);
    let count = cursor.u32()?;
    cursor.take(16)?;
    let mut packets = Vec::with_capacity(count as usize);
    for _ in 0..count {
        cursor.take(8)?;
        let key_len = cursor.u32()? as usize;
        cursor.take(key_len)?;
        let len = cursor.u32()? as usize;
        packets.push(cursor.take(len)?);
    }
    Ok(packets)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n).context("a chunk is cut short")?;
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
}

/// Apparent size and allocated blocks of every file under `dir`.
fn tree_bytes(dir: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut apparent, mut allocated) = (0, 0);
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        if metadata.is_dir() {
            let (a, b) = tree_bytes(&entry.path())?;
            apparent += a;
            allocated += b;
        } else {
            apparent += metadata.len();
            allocated += metadata.blocks() * 512;
        }
    }
    Ok((apparent, allocated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_decode_to_the_packets_they_were_built_from() {
        let packets = batch_packets(0, 200, 200);
        let chunks = chunks(0, &packets);
        assert!(chunks.len() > 1, "200 KiB of packets make several chunks");
        let mut decoded = Vec::new();
        for (base, chunk) in &chunks {
            assert_eq!(*base, decoded.len() as u64);
            decoded.extend(decode_chunk(chunk).unwrap().into_iter().map(<[u8]>::to_vec));
        }
        let expected: Vec<Vec<u8>> = packets.iter().map(|p| p.to_vec()).collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn every_engine_reads_back_what_it_wrote() {
        let args = EnginesArgs {
            packets: 300,
            batch: 64,
        };
        for engine in Engine::ALL {
            let result = measure(engine, &args).unwrap();
            assert_eq!(result.read_errors, 0, "{}", engine.name());
            assert!(result.file_mib > 0.0, "{}", engine.name());
        }
    }
}
