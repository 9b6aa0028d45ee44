//! The commit journal: a batch is durable after one sequential write and one `fdatasync` of a
//! small file, instead of a durable redb commit per batch.
//!
//! A durable redb commit writes every B-tree page the batch dirtied, its allocator state and the
//! header, with two syncs (quick repair implies two-phase commit); for a batch of a few dozen
//! sessions that was most of a create's cost on the writer thread. So a batch's rows are written
//! here, framed and checksummed, and synced; that is all the writer waits for. The batch is
//! committed to redb afterwards, behind the writer, by the store's checkpointer (see
//! `checkpoint`), without durability; every [`CHECKPOINT_BYTES`] of journal one of its commits is
//! durable (a *checkpoint*) and records the journal *generation* from which frames are not yet
//! in the database file.
//!
//! There are two journal files, written in turn: a generation fills one, the next starts at the
//! front of the other, once the checkpoint that made that file's older generation unnecessary
//! is durable. So the writer never waits for a checkpoint unless the checkpointer is a whole file
//! behind, and at most two generations are ever needed: at open, the frames of the generation
//! the database records and of the one after it are committed again, in order, and
//! checkpointed. Reading a file stops at the first frame of another generation (older frames
//! further in, from the file's previous turn) or that is torn or fails its checksum (the tail of
//! a write that never completed, so never acknowledged).
//!
//! A frame is `[payload length u32][CRC32C of generation and payload u32][generation u64]`
//! followed by the payload, all little-endian. The payload holds the rows exactly as redb
//! stores them (see `rows`), so a batch is encoded once. The length's top bit marks the current
//! payload layout, whose feed trimming is the writer's decision (the first sequence kept);
//! frames without it come from the version that wrote a window for the commit to trim to; their
//! replay decides the first sequence kept from that window by the writer's rule (see
//! `feed_index`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use prost_types::Timestamp;

use crate::embedded::FeedWindow;

/// The journal files inside the data directory, written in turn. The first has the name the
/// single journal of earlier versions had, whose frames are read like any other.
pub const JOURNAL_FILES: [&str; 2] = ["pitwall.journal", "pitwall.journal.1"];

/// Journal bytes after which writing moves to the other file and the checkpointer is asked for
/// a checkpoint. A checkpoint writes every page dirtied since the last one and syncs twice: at
/// 1 MiB (about 800 creates) that took 2.5 to 10 ms here, at 16 MiB 40 to 150 ms. It no longer
/// holds up the writer, but it does hold the disk, and a larger file means a longer replay
/// after a crash.
pub const CHECKPOINT_BYTES: u64 = 1024 * 1024;

const HEADER_BYTES: usize = 16;

/// Set in a frame's length field for the current payload layout.
const CURRENT_LAYOUT: u32 = 1 << 31;

/// A batch as redb stores it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Frame {
    /// Creation sequence and stored row of each session written.
    pub sessions: Vec<(u64, Vec<u8>)>,
    pub purged: Vec<u64>,
    /// Feed sequence and stored row of each event.
    pub events: Vec<(u64, Vec<u8>)>,
    /// The first feed sequence kept after the batch: events before it go (the writer decided).
    pub first_kept: u64,
    pub next: Option<u64>,
}

impl Default for Frame {
    fn default() -> Self {
        Frame {
            sessions: Vec::new(),
            purged: Vec::new(),
            events: Vec::new(),
            first_kept: 1,
            next: None,
        }
    }
}

/// A frame read back, and for a frame of the earlier layout the window its commit trimmed the
/// feed to: replaying it decides `first_kept` from that (see `feed_index`).
pub(crate) type Replayed = (Frame, Option<FeedWindow>);

/// The two journal files; frames go after the last one of the current generation.
pub(crate) struct Journal {
    files: [File; 2],
    paths: [PathBuf; 2],
    current: usize,
    generation: u64,
    end: u64,
    buffer: Vec<u8>,
}

/// Why a frame is not durable.
pub(crate) enum Unappended {
    /// Written at this offset, but the sync failed: it may or may not be on disk.
    Unsynced(u64, std::io::Error),
    /// Not written.
    Unwritten(std::io::Error),
}

impl Journal {
    /// Opens (or creates) both files in `dir`. Nothing is written until [`Journal::start`].
    pub fn open(dir: &Path) -> std::io::Result<Journal> {
        let paths = JOURNAL_FILES.map(|name| dir.join(name));
        let created = paths.iter().any(|path| !path.exists());
        let open = |path: &PathBuf| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        };
        let files = [open(&paths[0])?, open(&paths[1])?];
        if created {
            // The names must survive a crash as well as what is later written into the files.
            for file in &files {
                file.sync_all()?;
            }
            File::open(dir)?.sync_all()?;
        }
        Ok(Journal {
            files,
            paths,
            current: 0,
            generation: 0,
            end: 0,
            buffer: Vec::new(),
        })
    }

    /// The frames of `generation`, from the file it fills (if either does).
    pub fn frames_of(&self, generation: u64) -> std::io::Result<Vec<Replayed>> {
        for path in &self.paths {
            let bytes = std::fs::read(path)?;
            let frames = read_frames(&bytes, generation);
            if !frames.is_empty() {
                return Ok(frames);
            }
        }
        Ok(Vec::new())
    }

    /// Writes `generation` from the front of the first file: the database holds every frame
    /// either file has.
    pub fn start(&mut self, generation: u64) {
        self.current = 0;
        self.generation = generation;
        self.end = 0;
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.paths[self.current]
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the current file is long enough to move on to the other.
    pub fn due(&self) -> bool {
        self.end >= CHECKPOINT_BYTES
    }

    /// Writes `frame` after the last one and syncs it; returns where it starts, for
    /// [`Journal::retract`].
    pub fn append(&mut self, frame: &Frame) -> Result<u64, Unappended> {
        encode(&mut self.buffer, self.generation, frame);
        let at = self.end;
        let file = &self.files[self.current];
        file.write_all_at(&self.buffer, at)
            .map_err(Unappended::Unwritten)?;
        file.sync_data().map_err(|e| Unappended::Unsynced(at, e))?;
        self.end = at + self.buffer.len() as u64;
        Ok(at)
    }

    /// Undoes the frame written at `at` (its batch was not committed after all), so that no
    /// replay brings it back. Best effort: the caller is already failing.
    pub fn retract(&mut self, at: u64) -> std::io::Result<()> {
        self.end = at;
        let file = &self.files[self.current];
        file.write_all_at(&[0; HEADER_BYTES], at)?;
        file.sync_data()
    }

    /// Moves to the next generation, at the front of the other file. Only once the database
    /// durably records the current generation: the other file's frames are older.
    pub fn rotate(&mut self) {
        self.current = 1 - self.current;
        self.generation += 1;
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
    buffer.extend_from_slice(&frame.first_kept.to_le_bytes());
    match frame.next {
        Some(next) => {
            buffer.push(1);
            buffer.extend_from_slice(&next.to_le_bytes());
        }
        None => buffer.push(0),
    }
    let length = (buffer.len() - HEADER_BYTES) as u32 | CURRENT_LAYOUT;
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

/// The frames of `generation` from the front of `bytes`.
fn read_frames(bytes: &[u8], generation: u64) -> Vec<Replayed> {
    let mut frames = Vec::new();
    let mut at = 0usize;
    while let Some(header) = bytes.get(at..at + HEADER_BYTES) {
        let length = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let current = length & CURRENT_LAYOUT != 0;
        let length = (length & !CURRENT_LAYOUT) as usize;
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
        let Some(frame) = decode(payload, current) else {
            break;
        };
        frames.push(frame);
        at = end;
    }
    frames
}

fn decode(payload: &[u8], current: bool) -> Option<Replayed> {
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
    let window = if current {
        frame.first_kept = reader.u64()?;
        None
    } else {
        let mut window = FeedWindow {
            max_events: reader.u64()?,
            oldest: None,
        };
        if reader.take(1)?[0] == 1 {
            let seconds = reader.u64()? as i64;
            let nanos = reader.u32()? as i32;
            window.oldest = Some(Timestamp { seconds, nanos });
        }
        Some(window)
    };
    if reader.take(1)?[0] == 1 {
        frame.next = Some(reader.u64()?);
    }
    reader.0.is_empty().then_some((frame, window))
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
            first_kept: n * 5,
            next: n.is_multiple_of(2).then_some(n + 3),
        }
    }

    #[test]
    fn frames_of_a_generation_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        journal.start(3);
        assert!(journal.frames_of(3).unwrap().is_empty());
        journal.append(&frame(1)).ok().unwrap();
        journal.append(&frame(2)).ok().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        assert_eq!(
            journal.frames_of(3).unwrap(),
            vec![(frame(1), None), (frame(2), None)]
        );
    }

    #[test]
    fn generations_alternate_between_the_files_and_older_frames_stop_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        journal.start(1);
        for n in 0..5 {
            journal.append(&frame(n)).ok().unwrap();
        }
        journal.rotate();
        journal.append(&frame(7)).ok().unwrap();
        journal.rotate();
        // Generation 3 starts over generation 1, whose longer run stays behind it.
        journal.append(&frame(9)).ok().unwrap();
        assert_eq!(journal.path(), dir.path().join(JOURNAL_FILES[0]));
        let journal = Journal::open(dir.path()).unwrap();
        assert!(journal.frames_of(1).unwrap().is_empty());
        assert_eq!(journal.frames_of(2).unwrap(), vec![(frame(7), None)]);
        assert_eq!(journal.frames_of(3).unwrap(), vec![(frame(9), None)]);
        assert!(journal.frames_of(4).unwrap().is_empty());
    }

    #[test]
    fn a_torn_or_retracted_frame_ends_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        journal.start(1);
        journal.append(&frame(1)).ok().unwrap();
        let second = journal.append(&frame(2)).ok().unwrap();
        journal.append(&frame(3)).ok().unwrap();
        // A byte of the third frame's payload changed: it and everything after it are gone.
        let path = dir.path().join(JOURNAL_FILES[0]);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        assert_eq!(
            journal.frames_of(1).unwrap(),
            vec![(frame(1), None), (frame(2), None)]
        );
        journal.start(1);
        journal.retract(second).unwrap();
        assert_eq!(journal.frames_of(1).unwrap(), vec![(frame(1), None)]);
    }

    #[test]
    fn frames_of_the_earlier_layout_keep_their_window() {
        // Written as the single journal of the version before: no layout bit, a window.
        let mut payload = Vec::new();
        payload.extend_from_slice(&1u32.to_le_bytes());
        payload.extend_from_slice(&4u64.to_le_bytes());
        put_bytes(&mut payload, b"row");
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&100u64.to_le_bytes());
        payload.push(1);
        payload.extend_from_slice(&(-5i64).to_le_bytes());
        payload.extend_from_slice(&7i32.to_le_bytes());
        payload.push(0);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut checked = 6u64.to_le_bytes().to_vec();
        checked.extend_from_slice(&payload);
        bytes.extend_from_slice(&crc32c::crc32c(&checked).to_le_bytes());
        bytes.extend_from_slice(&checked);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOURNAL_FILES[0]), &bytes).unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let found = journal.frames_of(6).unwrap();
        assert_eq!(
            found,
            vec![(
                Frame {
                    sessions: vec![(4, b"row".to_vec())],
                    ..Frame::default()
                },
                Some(FeedWindow {
                    max_events: 100,
                    oldest: Some(Timestamp {
                        seconds: -5,
                        nanos: 7
                    }),
                })
            )]
        );
    }
}
