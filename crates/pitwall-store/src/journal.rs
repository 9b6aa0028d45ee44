//! The commit journal: a batch is durable after one sequential write and one `fdatasync` of a
//! small file, instead of a durable redb commit per batch.
//!
//! A durable redb commit writes every B-tree page the batch dirtied, its allocator state and the
//! header, with two syncs (quick repair implies two-phase commit); for a batch of a few dozen
//! sessions that is most of a create's cost on the writer thread. So a batch's rows are first
//! written here, framed and checksummed, and synced; then they are committed to redb without
//! durability (`redb::Durability::None`), which readers see at once. Every
//! [`CHECKPOINT_BYTES`] of journal, one durable commit (a *checkpoint*) makes everything before
//! it durable in the database file and moves the journal to the next *generation*, recorded in
//! the same commit. Writing then starts again at the front of the file.
//!
//! At open, the frames of the generation the database records are exactly the batches after its
//! last checkpoint: they are committed again, in order, and checkpointed. Older frames further
//! in the file belong to earlier generations and stop the replay, as does the first frame that
//! is torn or fails its checksum (the tail of a write that never completed, so never
//! acknowledged).
//!
//! A frame is `[payload length u32][CRC32C of generation and payload u32][generation u64]`
//! followed by the payload, all little-endian. The payload holds the rows exactly as redb
//! stores them (see `rows`), so a batch is encoded once.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use prost_types::Timestamp;

use crate::embedded::FeedWindow;

/// The journal file inside the data directory.
pub const JOURNAL_FILE: &str = "pitwall.journal";

/// Journal bytes after which the next commit is followed by a checkpoint. A checkpoint writes
/// every page dirtied since the last one and syncs twice, holding up the writes behind it: at
/// 1 MiB (about 800 creates) that took 2.5 to 10 ms here, at 16 MiB 40 to 150 ms, which showed as
/// the p99 of creates. Smaller still and the checkpoints' fixed cost (the two syncs) starts to
/// count.
pub const CHECKPOINT_BYTES: u64 = 1024 * 1024;

const HEADER_BYTES: usize = 16;

/// A batch as redb stores it.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Frame {
    /// Creation sequence and stored row of each session written.
    pub sessions: Vec<(u64, Vec<u8>)>,
    pub purged: Vec<u64>,
    /// Feed sequence and stored row of each event.
    pub events: Vec<(u64, Vec<u8>)>,
    pub window: FeedWindow,
    pub next: Option<u64>,
}

/// The journal file, positioned after the last frame of the current generation.
pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    generation: u64,
    end: u64,
    buffer: Vec<u8>,
    syncer: Syncer,
}

/// What became of a frame.
pub(crate) enum Appended<T> {
    /// Written and synced, at this offset.
    Durable(u64, T),
    /// Written at this offset, but the sync failed: it may or may not be on disk.
    Unsynced(u64, std::io::Error),
    /// Not written.
    Unwritten(std::io::Error),
}

/// A thread that syncs the journal while the writer does the rest of the commit: the sync is
/// mostly waiting for the disk, and the commit's other work needs no durability to start.
struct Syncer {
    requests: Option<SyncSender<()>>,
    results: Receiver<std::io::Result<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start(file: File) -> std::io::Result<Syncer> {
        let (requests, wanted) = sync_channel::<()>(1);
        let (done, results) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("pitwall-journal".into())
            .spawn(move || {
                while wanted.recv().is_ok() {
                    if done.send(file.sync_data()).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Syncer {
            requests: Some(requests),
            results,
            thread: Some(thread),
        })
    }

    /// Syncs the file on the syncer thread while `meanwhile` runs here.
    fn sync_while<T>(&self, meanwhile: impl FnOnce() -> T) -> (std::io::Result<()>, T) {
        let asked = self.requests.as_ref().is_some_and(|r| r.send(()).is_ok());
        let value = meanwhile();
        let synced = asked.then(|| self.results.recv().ok()).flatten();
        let synced = synced
            .unwrap_or_else(|| Err(std::io::Error::other("the journal's sync thread stopped")));
        (synced, value)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Journal {
    /// Opens (or creates) the journal and reads the frames of `generation` from its front.
    pub fn open(path: &Path, generation: u64) -> std::io::Result<(Journal, Vec<Frame>)> {
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if created {
            // The file's name must survive a crash as well as what is later written into it.
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let bytes = std::fs::read(path)?;
        let (frames, end) = read_frames(&bytes, generation);
        let journal = Journal {
            syncer: Syncer::start(file.try_clone()?)?,
            file,
            path: path.to_owned(),
            generation,
            end,
            buffer: Vec::new(),
        };
        Ok((journal, frames))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the journal is long enough to be checkpointed.
    pub fn due(&self) -> bool {
        self.end >= CHECKPOINT_BYTES
    }

    /// Writes `frame` after the last one and syncs it; returns where it starts, for
    /// [`Journal::retract`].
    #[cfg(test)]
    pub fn append(&mut self, frame: &Frame) -> std::io::Result<u64> {
        match self.append_while(frame, || ()) {
            Appended::Durable(at, ()) => Ok(at),
            Appended::Unsynced(_, e) | Appended::Unwritten(e) => Err(e),
        }
    }

    /// Writes `frame` after the last one, then syncs it while `meanwhile` runs. `meanwhile`
    /// must not make the batch visible as durable; it does not run when the frame could not
    /// even be written.
    pub fn append_while<T>(&mut self, frame: &Frame, meanwhile: impl FnOnce() -> T) -> Appended<T> {
        encode(&mut self.buffer, self.generation, frame);
        let at = self.end;
        if let Err(e) = self.file.write_all_at(&self.buffer, at) {
            return Appended::Unwritten(e);
        }
        match self.syncer.sync_while(meanwhile) {
            (Ok(()), value) => {
                self.end = at + self.buffer.len() as u64;
                Appended::Durable(at, value)
            }
            (Err(e), _) => Appended::Unsynced(at, e),
        }
    }

    /// Undoes the frame written at `at` (its batch was not committed after all), so that no
    /// replay brings it back. Best effort: the caller is already failing.
    pub fn retract(&mut self, at: u64) -> std::io::Result<()> {
        self.end = at;
        self.file.write_all_at(&[0; HEADER_BYTES], at)?;
        self.file.sync_data()
    }

    /// After a checkpoint recorded `generation`: frames start again at the front.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.end = 0;
    }
}

fn encode(buffer: &mut Vec<u8>, generation: u64, frame: &Frame) {
    buffer.clear();
    buffer.extend_from_slice(&[0; HEADER_BYTES]);
    put_u32(buffer, frame.sessions.len());
    for (sequence, row) in &frame.sessions {
        buffer.extend_from_slice(&sequence.to_le_bytes());
        put_bytes(buffer, row);
    }
    put_u32(buffer, frame.purged.len());
    for sequence in &frame.purged {
        buffer.extend_from_slice(&sequence.to_le_bytes());
    }
    put_u32(buffer, frame.events.len());
    for (sequence, row) in &frame.events {
        buffer.extend_from_slice(&sequence.to_le_bytes());
        put_bytes(buffer, row);
    }
    buffer.extend_from_slice(&frame.window.max_events.to_le_bytes());
    match frame.window.oldest {
        Some(oldest) => {
            buffer.push(1);
            buffer.extend_from_slice(&oldest.seconds.to_le_bytes());
            buffer.extend_from_slice(&oldest.nanos.to_le_bytes());
        }
        None => buffer.push(0),
    }
    match frame.next {
        Some(next) => {
            buffer.push(1);
            buffer.extend_from_slice(&next.to_le_bytes());
        }
        None => buffer.push(0),
    }
    let length = (buffer.len() - HEADER_BYTES) as u32;
    buffer[0..4].copy_from_slice(&length.to_le_bytes());
    buffer[8..16].copy_from_slice(&generation.to_le_bytes());
    let checksum = crc32c::crc32c(&buffer[8..]);
    buffer[4..8].copy_from_slice(&checksum.to_le_bytes());
}

fn put_u32(buffer: &mut Vec<u8>, value: usize) {
    buffer.extend_from_slice(&(value as u32).to_le_bytes());
}

fn put_bytes(buffer: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(buffer, bytes.len());
    buffer.extend_from_slice(bytes);
}

/// The frames of `generation` from the front of `bytes`, and where the next one goes.
fn read_frames(bytes: &[u8], generation: u64) -> (Vec<Frame>, u64) {
    let mut frames = Vec::new();
    let mut at = 0usize;
    while let Some(header) = bytes.get(at..at + HEADER_BYTES) {
        let length = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default()) as usize;
        let checksum = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default());
        let written = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let Some(end) = (at + HEADER_BYTES).checked_add(length) else {
            break;
        };
        let Some(payload) = bytes.get(at + HEADER_BYTES..end) else {
            break;
        };
        if written != generation || crc32c::crc32c(&bytes[at + 8..end]) != checksum {
            break;
        }
        let Some(frame) = decode(payload) else {
            break;
        };
        frames.push(frame);
        at = end;
    }
    (frames, at as u64)
}

fn decode(payload: &[u8]) -> Option<Frame> {
    let mut reader = Reader(payload);
    let mut frame = Frame::default();
    for _ in 0..reader.u32()? {
        let sequence = reader.u64()?;
        frame.sessions.push((sequence, reader.bytes()?.to_vec()));
    }
    for _ in 0..reader.u32()? {
        frame.purged.push(reader.u64()?);
    }
    for _ in 0..reader.u32()? {
        let sequence = reader.u64()?;
        frame.events.push((sequence, reader.bytes()?.to_vec()));
    }
    frame.window.max_events = reader.u64()?;
    if reader.take(1)?[0] == 1 {
        let seconds = reader.u64()? as i64;
        let nanos = reader.u32()? as i32;
        frame.window.oldest = Some(Timestamp { seconds, nanos });
    }
    if reader.take(1)?[0] == 1 {
        frame.next = Some(reader.u64()?);
    }
    reader.0.is_empty().then_some(frame)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let length = self.u32()? as usize;
        self.take(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u64) -> Frame {
        Frame {
            sessions: vec![(n, vec![1, 2, 3]), (n + 1, vec![4])],
            purged: vec![n / 2],
            events: vec![(n * 10, b"event".to_vec())],
            window: FeedWindow {
                max_events: 100,
                oldest: Some(Timestamp {
                    seconds: -5,
                    nanos: 7,
                }),
            },
            next: n.is_multiple_of(2).then_some(n + 3),
        }
    }

    #[test]
    fn frames_of_the_generation_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let (mut journal, found) = Journal::open(&path, 3).unwrap();
        assert!(found.is_empty());
        journal.append(&frame(1)).unwrap();
        journal.append(&frame(2)).unwrap();
        let (_, found) = Journal::open(&path, 3).unwrap();
        assert_eq!(found, vec![frame(1), frame(2)]);
    }

    #[test]
    fn a_new_generation_ignores_the_older_frames_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let (mut journal, _) = Journal::open(&path, 1).unwrap();
        for n in 0..5 {
            journal.append(&frame(n)).unwrap();
        }
        journal.restart(2);
        journal.append(&frame(9)).unwrap();
        let (_, found) = Journal::open(&path, 2).unwrap();
        assert_eq!(found, vec![frame(9)]);
        let (_, found) = Journal::open(&path, 3).unwrap();
        assert!(found.is_empty());
    }

    #[test]
    fn a_torn_or_retracted_frame_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let (mut journal, _) = Journal::open(&path, 1).unwrap();
        journal.append(&frame(1)).unwrap();
        let second = journal.append(&frame(2)).unwrap();
        journal.append(&frame(3)).unwrap();
        // A byte of the third frame's payload changed: it and everything after it are gone.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (mut journal, found) = Journal::open(&path, 1).unwrap();
        assert_eq!(found, vec![frame(1), frame(2)]);
        journal.retract(second).unwrap();
        let (_, found) = Journal::open(&path, 1).unwrap();
        assert_eq!(found, vec![frame(1)]);
    }
}
