//! The embedded packet log: `packets.redb` in the data directory, written by one thread.
//!
//! Writes wait in one bounded queue; the writer thread takes everything waiting (up to a batch
//! of packets and bytes), gives each packet its offsets (its stream's space, and the
//! essentials for an essential one, in the same commit), makes the batch durable in one
//! fsync'd commit (group commit), then wakes the readers of the data sources it touched and
//! answers. Between batches it applies retention (by bytes and by age, per data source) and, after a
//! failed commit (a full disk), reopens the store with back-off. Retention never loses a data
//! format: the `DataFormatDefinition` packets of the essentials it removes are appended to the
//! essentials again in the removal's own commit. Readers are tasks that copy
//! runs of packets out of the store into their call's bounded channel and wait for the next
//! commit when they have caught up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pitwall_core::data_format::DEFINITION_TYPE;
use pitwall_proto::raw_packet::PacketHeader;
use pitwall_store::StoreError;
use pitwall_store::packets::{
    ChunkBuilder, ChunkInfo, PacketCommit, PacketStore, PacketStoreOptions, Space, SpaceName,
    StoredPacket,
};
use prost::Message as _;
use prost_types::Timestamp;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{
    Ends, PacketLog, PacketLogError, PacketStream, PacketWrite, ReadPacket, ReadPlan, Start,
};
use crate::clock::Clock;
use crate::log::StreamLayout;
use crate::metrics::Metrics;

/// Settings of the embedded packet log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketLogOptions {
    /// Packet writes waiting for the writer; beyond it writes answer `RESOURCE_EXHAUSTED`.
    pub write_queue: usize,
    /// Packets in one commit at most.
    pub max_batch_packets: usize,
    /// Bytes of packets in one commit at most.
    pub max_batch_bytes: usize,
    /// Bytes a data source keeps at most; its oldest packets go first. `None`: no limit.
    pub retention_bytes: Option<u64>,
    /// How long packets are kept. `None`: for ever.
    pub retention_age: Option<Duration>,
    /// Free space the data directory's disk must keep: writes that would leave less are
    /// refused (`RESOURCE_EXHAUSTED`) instead of failing half-way.
    pub min_free_bytes: u64,
    /// Page cache of the packet store.
    pub cache_bytes: usize,
}

impl Default for PacketLogOptions {
    fn default() -> Self {
        PacketLogOptions {
            write_queue: 4096,
            max_batch_packets: 16_384,
            max_batch_bytes: 32 * 1024 * 1024,
            retention_bytes: Some(10 * 1024 * 1024 * 1024),
            retention_age: Some(Duration::from_secs(7 * 24 * 3600)),
            min_free_bytes: 64 * 1024 * 1024,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Packets of one space per chunk, in bytes: below 64 KiB, so that a chunk fits the page
/// allocation it gets instead of rounding up to the next power of two.
const CHUNK_BYTES: usize = 60 * 1024;
/// Packet bytes a reader copies out of the store in one step (one response's worth).
const READ_BYTES: usize = 256 * 1024;
/// Batches of packets a reader may have waiting for its client: a slow client stops its
/// reader here, and the reader holds no more than this.
const READER_QUEUE: usize = 8;
/// How often the writer looks at retention and at a failed store when nothing is written.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);
/// Chunks one retention commit removes at most, so that a large backlog does not stall
/// writes.
const MAX_REMOVED_PER_PASS: usize = 4096;
/// How long a failed store waits before it is reopened, at first and at most.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

struct Job {
    writes: Vec<PacketWrite>,
    reply: oneshot::Sender<Result<(), PacketLogError>>,
}

enum Message {
    Write(Job),
    Stop,
}

/// Where one space stands, in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    id: u64,
    next: u64,
    first: u64,
    bytes: u64,
}

/// What the writer and the readers share.
struct Shared {
    store: Arc<PacketStore>,
    /// Written by the writer after each commit; read by readers and `ends`. A `std` lock: held
    /// for a map lookup or an update, never across an await.
    heads: RwLock<HashMap<SpaceName, Head>>,
    /// Session key → (data source, stream) it has written to.
    session_streams: RwLock<HashMap<String, BTreeSet<(String, String)>>>,
    /// Per data source, a counter bumped by every commit that touches it: readers wait on it.
    changes: Mutex<HashMap<String, watch::Sender<u64>>>,
    layout: StreamLayout,
}

impl Shared {
    fn head(&self, name: &SpaceName) -> Option<Head> {
        self.heads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    fn changes_of(&self, data_source: &str) -> watch::Receiver<u64> {
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(data_source.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn space_of(&self, stream: &str) -> Space {
        super::space_of(&self.layout, stream)
    }
}

pub struct EmbeddedPacketLog {
    queue: SyncSender<Message>,
    shared: Arc<Shared>,
    readers: TaskTracker,
    stopping: CancellationToken,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl EmbeddedPacketLog {
    /// Opens (and locks) `packets.redb` in `data_dir`. Blocking.
    pub fn open(
        data_dir: &Path,
        options: PacketLogOptions,
        layout: StreamLayout,
        clock: Clock,
        metrics: Metrics,
    ) -> Result<EmbeddedPacketLog, StoreError> {
        let store = Arc::new(PacketStore::open(
            data_dir,
            &PacketStoreOptions {
                cache_bytes: options.cache_bytes,
            },
        )?);
        let mut heads = HashMap::new();
        let mut next_id = 1;
        for space in store.spaces()? {
            next_id = next_id.max(space.id + 1);
            heads.insert(
                space.name,
                Head {
                    id: space.id,
                    next: space.head.next,
                    first: space.head.first,
                    bytes: space.head.bytes,
                },
            );
        }
        let mut session_streams: HashMap<String, BTreeSet<(String, String)>> = HashMap::new();
        for (session, data_source, stream) in store.session_streams()? {
            session_streams
                .entry(session)
                .or_default()
                .insert((data_source, stream));
        }
        info!(
            path = %store.path().display(),
            spaces = heads.len(),
            "packet log opened"
        );
        let shared = Arc::new(Shared {
            store,
            heads: RwLock::new(heads),
            session_streams: RwLock::new(session_streams),
            changes: Mutex::new(HashMap::new()),
            layout,
        });
        let (queue, receiver) = std::sync::mpsc::sync_channel(options.write_queue.max(1));
        let writer = Writer {
            shared: shared.clone(),
            options,
            clock,
            metrics,
            next_id,
            failed: None,
        };
        let thread = std::thread::Builder::new()
            .name("pitwall-packets".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| StoreError::Read {
                path: data_dir.to_owned(),
                source: e,
            })?;
        Ok(EmbeddedPacketLog {
            queue,
            shared,
            readers: TaskTracker::new(),
            stopping: CancellationToken::new(),
            writer: Mutex::new(Some(thread)),
        })
    }

    /// Ends every read, then finishes the writes queued and stops the writer.
    async fn shut(&self) {
        self.stopping.cancel();
        self.readers.close();
        self.readers.wait().await;
        let _ = self.queue.send(Message::Stop);
        let thread = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl PacketLog for EmbeddedPacketLog {
    fn append(
        &self,
        writes: Vec<PacketWrite>,
    ) -> Result<oneshot::Receiver<Result<(), PacketLogError>>, PacketLogError> {
        let (reply, answer) = oneshot::channel();
        match self.queue.try_send(Message::Write(Job { writes, reply })) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(PacketLogError::Exhausted(
                "the packet write queue is full; retry later".into(),
            )),
            Err(TrySendError::Disconnected(_)) => Err(PacketLogError::Unavailable(
                "the server is shutting down".into(),
            )),
        }
    }

    fn ends(&self, data_source: &str) -> Ends {
        let heads = self.shared.heads.read().unwrap_or_else(|e| e.into_inner());
        let mut ends = Ends::default();
        for (name, head) in heads.iter().filter(|(n, _)| n.data_source == data_source) {
            match &name.space {
                Space::Main => ends.main = head.next,
                Space::Essentials => ends.essentials = head.next,
                Space::Stream(stream) => {
                    ends.streams.insert(stream.clone(), head.next);
                }
            }
        }
        ends
    }

    fn data_sources(&self) -> Vec<String> {
        let heads = self.shared.heads.read().unwrap_or_else(|e| e.into_inner());
        let names: BTreeSet<&String> = heads.keys().map(|name| &name.data_source).collect();
        names.into_iter().cloned().collect()
    }

    fn space_of(&self, stream: &str) -> Space {
        self.shared.space_of(stream)
    }

    fn session_streams(&self, session_key: &str) -> Vec<String> {
        self.shared
            .session_streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(session_key)
            .map(|streams| {
                let names: BTreeSet<String> = streams
                    .iter()
                    .filter(|(_, stream)| !stream.is_empty())
                    .map(|(_, stream)| stream.clone())
                    .collect();
                names.into_iter().collect()
            })
            .unwrap_or_default()
    }

    fn read(&self, plan: ReadPlan, cancel: CancellationToken) -> PacketStream {
        let (sender, receiver) = mpsc::channel(READER_QUEUE);
        let shared = self.shared.clone();
        let stopping = self.stopping.clone();
        self.readers.spawn(async move {
            tokio::select! {
                () = follow(shared, plan, &sender) => {}
                () = cancel.cancelled() => {}
                () = stopping.cancelled() => {}
                () = sender.closed() => {}
            }
        });
        receiver
    }

    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.shut())
    }
}

/// Where a read stands in one space.
struct Cursor {
    name: SpaceName,
    label: String,
    next: u64,
    /// Finite reads stop here.
    end: Option<u64>,
}

/// Copies the plan's packets into `sender` as they come; returns when a finite read is done or
/// the channel is closed.
async fn follow(
    shared: Arc<Shared>,
    plan: ReadPlan,
    sender: &mpsc::Sender<Result<Vec<ReadPacket>, PacketLogError>>,
) {
    let mut changes = shared.changes_of(&plan.data_source);
    let mut cursors: Vec<Cursor> = plan
        .spaces
        .iter()
        .map(|read| {
            let name = SpaceName {
                data_source: plan.data_source.clone(),
                space: read.space.clone(),
            };
            let head = shared.head(&name);
            let (first, end) = head.map_or((0, 0), |h| (h.first, h.next));
            let next = match read.start {
                Start::At(offset) => offset.clamp(first, end),
                Start::Latest | Start::Committed => end,
            };
            Cursor {
                name,
                label: read.label.clone(),
                next,
                end: plan.finite.then_some(end),
            }
        })
        .collect();
    if sender.send(Ok(Vec::new())).await.is_err() {
        return;
    }
    loop {
        changes.borrow_and_update();
        let mut progressed = false;
        for cursor in &mut cursors {
            if cursor.end.is_some_and(|end| cursor.next >= end) {
                continue;
            }
            let Some(head) = shared.head(&cursor.name) else {
                continue;
            };
            if cursor.next >= head.next {
                continue;
            }
            // Retention overtook this reader: it goes on from what is still kept.
            cursor.next = cursor.next.max(head.first);
            let (store, id, from) = (shared.store.clone(), head.id, cursor.next);
            let read = tokio::task::spawn_blocking(move || store.read(id, from, READ_BYTES)).await;
            let stored: Vec<StoredPacket> = match read {
                Ok(Ok(stored)) => stored,
                Ok(Err(e)) => {
                    let _ = sender
                        .send(Err(PacketLogError::Unavailable(format!(
                            "cannot read the packet log: {e}"
                        ))))
                        .await;
                    return;
                }
                Err(_) => return,
            };
            let Some(last) = stored.last().map(|p| p.offset) else {
                continue;
            };
            progressed = true;
            let end = cursor.end.unwrap_or(u64::MAX);
            cursor.next = (last + 1).min(end.max(cursor.next));
            let batch: Vec<ReadPacket> = stored
                .into_iter()
                .filter(|p| p.offset < end)
                .filter(|p| plan.session_key.is_empty() || p.key == plan.session_key)
                .map(|p| ReadPacket {
                    stream: cursor.label.clone(),
                    offset: p.offset,
                    time_nanos: p.time_nanos,
                    packet: p.packet,
                })
                .collect();
            if !batch.is_empty() && sender.send(Ok(batch)).await.is_err() {
                return;
            }
        }
        if plan.finite
            && cursors
                .iter()
                .all(|c| c.end.is_some_and(|end| c.next >= end))
        {
            return;
        }
        if !progressed && changes.changed().await.is_err() {
            return;
        }
    }
}

/// Why the store is failed, and when to try it again.
struct Failed {
    reason: String,
    retry_at: Instant,
    backoff: Duration,
}

struct Writer {
    shared: Arc<Shared>,
    options: PacketLogOptions,
    clock: Clock,
    metrics: Metrics,
    next_id: u64,
    failed: Option<Failed>,
}

impl Writer {
    fn run(mut self, receiver: Receiver<Message>) {
        let mut last_maintenance = Instant::now();
        loop {
            let first = match receiver.recv_timeout(MAINTENANCE_EVERY) {
                Ok(Message::Write(job)) => job,
                Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    self.maintain();
                    last_maintenance = Instant::now();
                    continue;
                }
            };
            let mut jobs = vec![first];
            let mut packets = jobs[0].writes.len();
            let mut bytes: usize = jobs[0].writes.iter().map(|w| w.packet.len()).sum();
            let mut stopping = false;
            while packets < self.options.max_batch_packets && bytes < self.options.max_batch_bytes {
                match receiver.try_recv() {
                    Ok(Message::Write(job)) => {
                        packets += job.writes.len();
                        bytes += job.writes.iter().map(|w| w.packet.len()).sum::<usize>();
                        jobs.push(job);
                    }
                    Ok(Message::Stop) => {
                        stopping = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.commit(jobs, bytes);
            if stopping {
                break;
            }
            if last_maintenance.elapsed() >= MAINTENANCE_EVERY {
                self.maintain();
                last_maintenance = Instant::now();
            }
        }
        // Answer whatever raced in behind the stop.
        while let Ok(message) = receiver.try_recv() {
            if let Message::Write(job) = message {
                let _ = job.reply.send(Err(PacketLogError::Unavailable(
                    "the server is shutting down".into(),
                )));
            }
        }
        info!(path = %self.shared.store.path().display(), "packet log closed");
    }

    fn commit(&mut self, jobs: Vec<Job>, bytes: usize) {
        if let Err(reason) = self.writable(bytes as u64) {
            for job in jobs {
                let _ = job.reply.send(Err(reason.clone()));
            }
            return;
        }
        let now = nanos(self.clock.now());
        let mut touched: BTreeMap<SpaceName, Head> = BTreeMap::new();
        let mut builders: BTreeMap<SpaceName, (u64, ChunkBuilder)> = BTreeMap::new();
        let mut commit = PacketCommit::default();
        let mut new_streams: Vec<(String, String, String)> = Vec::new();
        {
            let heads = self.shared.heads.read().unwrap_or_else(|e| e.into_inner());
            let known = self
                .shared
                .session_streams
                .read()
                .unwrap_or_else(|e| e.into_inner());
            for write in jobs.iter().flat_map(|job| &job.writes) {
                let mut targets = vec![self.shared.space_of(&write.stream)];
                if write.essential {
                    targets.insert(0, Space::Essentials);
                }
                for space in targets {
                    let name = SpaceName {
                        data_source: write.data_source.clone(),
                        space,
                    };
                    let head = touched.entry(name.clone()).or_insert_with(|| {
                        heads.get(&name).copied().unwrap_or_else(|| {
                            let id = self.next_id;
                            self.next_id += 1;
                            commit.new_spaces.push((name.clone(), id));
                            Head {
                                id,
                                next: 0,
                                first: 0,
                                bytes: 0,
                            }
                        })
                    });
                    let (base, builder) = builders
                        .entry(name)
                        .or_insert_with(|| (head.next, ChunkBuilder::new()));
                    if builder.payload_bytes() >= CHUNK_BYTES {
                        let full = std::mem::take(builder).finish();
                        head.bytes += full.len() as u64;
                        commit.chunks.push((head.id, *base, full));
                        *base = head.next;
                    }
                    builder.push(now, &write.session_key, &write.packet);
                    head.next += 1;
                }
                let seen = (write.data_source.clone(), write.stream.clone());
                if !write.session_key.is_empty()
                    && !known
                        .get(&write.session_key)
                        .is_some_and(|streams| streams.contains(&seen))
                {
                    let entry = (write.session_key.clone(), seen.0, seen.1);
                    if !new_streams.contains(&entry) {
                        new_streams.push(entry);
                    }
                }
            }
        }
        for (name, (base, builder)) in builders {
            if builder.is_empty() {
                continue;
            }
            let chunk = builder.finish();
            if let Some(head) = touched.get_mut(&name) {
                head.bytes += chunk.len() as u64;
                commit.chunks.push((head.id, base, chunk));
            }
        }
        commit.heads = touched
            .values()
            .map(|head| (head.id, head.next, head.bytes))
            .collect();
        commit.session_streams = new_streams.clone();
        let started = Instant::now();
        let result = self.shared.store.commit(commit);
        self.metrics
            .packet_commit_duration
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            let reason = format!("packet storage unavailable: {e}");
            error!(error = %e, "packet commit failed; the batch is refused");
            self.fail(reason.clone());
            for job in jobs {
                let _ = job
                    .reply
                    .send(Err(PacketLogError::Unavailable(reason.clone())));
            }
            return;
        }
        let data_sources: BTreeSet<String> = touched
            .keys()
            .map(|name| name.data_source.clone())
            .collect();
        {
            let mut heads = self.shared.heads.write().unwrap_or_else(|e| e.into_inner());
            for (name, head) in touched {
                heads.insert(name, head);
            }
        }
        if !new_streams.is_empty() {
            let mut known = self
                .shared
                .session_streams
                .write()
                .unwrap_or_else(|e| e.into_inner());
            for (session, data_source, stream) in new_streams {
                known
                    .entry(session)
                    .or_default()
                    .insert((data_source, stream));
            }
        }
        self.notify(&data_sources);
        for job in jobs {
            let _ = job.reply.send(Ok(()));
        }
    }

    fn notify(&self, data_sources: &BTreeSet<String>) {
        let changes = self
            .shared
            .changes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for data_source in data_sources {
            if let Some(sender) = changes.get(data_source) {
                sender.send_modify(|version| *version += 1);
            }
        }
    }

    /// Whether a batch of `bytes` can be written: the store has not failed (or was reopened
    /// now), and the disk keeps its reserve after it.
    fn writable(&mut self, bytes: u64) -> Result<(), PacketLogError> {
        if let Some(failure) = &mut self.failed {
            let now = Instant::now();
            if now < failure.retry_at {
                return Err(PacketLogError::Unavailable(refused(&failure.reason)));
            }
            match self.shared.store.reopen() {
                Ok(()) => {
                    info!("packet store writable again; packet writes are taken");
                    self.failed = None;
                }
                Err(e) => {
                    failure.backoff = (failure.backoff * 2).min(MAX_RETRY);
                    failure.retry_at = now + failure.backoff;
                    warn!(error = %e, "the packet store cannot be written yet");
                    return Err(PacketLogError::Unavailable(refused(&failure.reason)));
                }
            }
        }
        if let Some(free) = free_bytes(self.shared.store.path())
            && free
                < self
                    .options
                    .min_free_bytes
                    .saturating_add(bytes.saturating_mul(2))
        {
            return Err(PacketLogError::Exhausted(format!(
                "the disk of {} has {} MiB free, less than the {} MiB kept free \
                 (--packet-min-free-bytes) and the write; free space or lower the packet retention",
                self.shared.store.path().display(),
                free / (1024 * 1024),
                self.options.min_free_bytes / (1024 * 1024)
            )));
        }
        Ok(())
    }

    fn fail(&mut self, reason: String) {
        self.failed = Some(Failed {
            reason,
            retry_at: Instant::now() + FIRST_RETRY,
            backoff: FIRST_RETRY,
        });
    }

    /// Retention, and another try of a failed store, between batches.
    fn maintain(&mut self) {
        if self.failed.is_some() && self.writable(0).is_err() {
            return;
        }
        let mut removed = self.retention();
        if !removed.is_empty() {
            let carried = match self.carry_definitions(&mut removed) {
                Ok(carried) => carried,
                Err(e) => {
                    // Removing the chunks without their definitions would lose data formats.
                    warn!(error = %e, "cannot read the essentials retention removes; it is retried");
                    return;
                }
            };
            let commit = PacketCommit {
                heads: removed
                    .updated
                    .values()
                    .map(|head| (head.id, head.next, head.bytes))
                    .collect(),
                removed: removed.chunks,
                chunks: carried.chunks,
                ..PacketCommit::default()
            };
            match self.shared.store.commit(commit) {
                Ok(()) => {
                    {
                        let mut heads =
                            self.shared.heads.write().unwrap_or_else(|e| e.into_inner());
                        for (name, head) in removed.updated {
                            heads.insert(name, head);
                        }
                    }
                    self.metrics.packets_removed.inc_by(removed.packets);
                    self.notify(&carried.data_sources);
                }
                Err(e) => {
                    warn!(error = %e, "packet retention failed; it is retried");
                    self.fail(format!("packet storage unavailable: {e}"));
                }
            }
        }
    }

    /// The chunks retention removes now: the oldest of each data source over its byte budget,
    /// and those older than the age limit, at most [`MAX_REMOVED_PER_PASS`].
    fn retention(&self) -> Removal {
        let mut removal = Removal::default();
        if self.options.retention_bytes.is_none() && self.options.retention_age.is_none() {
            return removal;
        }
        let heads: Vec<(SpaceName, Head)> = self
            .shared
            .heads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, h)| (n.clone(), *h))
            .collect();
        let oldest_kept = self
            .options
            .retention_age
            .map(|age| nanos(self.clock.now()).saturating_sub(age.as_nanos() as i64));
        let mut by_data_source: BTreeMap<String, Vec<(SpaceName, Head)>> = BTreeMap::new();
        for (name, head) in heads {
            by_data_source
                .entry(name.data_source.clone())
                .or_default()
                .push((name, head));
        }
        for spaces in by_data_source.values() {
            let total: u64 = spaces.iter().map(|(_, h)| h.bytes).sum();
            let mut over = self
                .options
                .retention_bytes
                .map_or(0, |limit| total.saturating_sub(limit));
            // The candidates, oldest first across the data source's spaces.
            let mut candidates = Vec::new();
            for (name, head) in spaces {
                if head.first >= head.next {
                    continue;
                }
                let chunks = match self.shared.store.oldest_chunks(head.id, 256) {
                    Ok(chunks) => chunks,
                    Err(e) => {
                        warn!(error = %e, "cannot read packet chunks for retention");
                        continue;
                    }
                };
                candidates.extend(chunks.into_iter().map(|chunk| (name.clone(), *head, chunk)));
            }
            candidates.sort_by_key(|(_, _, chunk)| chunk.last_nanos);
            for (name, head, chunk) in candidates {
                if removal.chunks.len() >= MAX_REMOVED_PER_PASS {
                    break;
                }
                let expired = oldest_kept.is_some_and(|oldest| chunk.last_nanos < oldest);
                if over == 0 && !expired {
                    continue;
                }
                over = over.saturating_sub(chunk.bytes);
                if name.space == Space::Essentials {
                    removal.essentials.push((name.clone(), chunk));
                }
                let updated = removal.updated.entry(name).or_insert(head);
                // Chunks of a space come oldest first, so the first kept moves past each.
                updated.first = updated.first.max(chunk.base + chunk.count);
                updated.bytes = updated.bytes.saturating_sub(chunk.bytes);
                removal.chunks.push((chunk.space, chunk.base));
                removal.packets += chunk.count;
            }
        }
        removal
    }

    /// The data-format definitions among the essentials `removal` removes, appended again to
    /// the end of their essentials (stamped now, so that age retention does not take them at
    /// once), as chunks for the removal's own commit: a data source keeps its formats, and a
    /// restart rebuilds them, however old they are. Followers of the essentials merge the
    /// copies as the no-ops they are.
    fn carry_definitions(&self, removal: &mut Removal) -> Result<Carried, StoreError> {
        let mut definitions: BTreeMap<SpaceName, Vec<StoredPacket>> = BTreeMap::new();
        for (name, chunk) in &removal.essentials {
            let end = chunk.base + chunk.count;
            // One chunk: the read stops after the first chunk that holds any packet.
            for packet in self.shared.store.read(chunk.space, chunk.base, 1)? {
                if packet.offset < chunk.base || packet.offset >= end {
                    continue;
                }
                let is_definition = PacketHeader::decode(packet.packet.clone())
                    .is_ok_and(|header| header.r#type == DEFINITION_TYPE);
                if is_definition {
                    definitions.entry(name.clone()).or_default().push(packet);
                }
            }
        }
        let now = nanos(self.clock.now());
        let mut carried = Carried::default();
        for (name, packets) in definitions {
            let Some(head) = removal.updated.get_mut(&name) else {
                continue;
            };
            let mut base = head.next;
            let mut builder = ChunkBuilder::new();
            for packet in packets {
                if builder.payload_bytes() >= CHUNK_BYTES {
                    let full = std::mem::take(&mut builder).finish();
                    head.bytes += full.len() as u64;
                    carried.chunks.push((head.id, base, full));
                    base = head.next;
                }
                builder.push(now, &packet.key, &packet.packet);
                head.next += 1;
            }
            if !builder.is_empty() {
                let chunk = builder.finish();
                head.bytes += chunk.len() as u64;
                carried.chunks.push((head.id, base, chunk));
            }
            carried.data_sources.insert(name.data_source);
        }
        Ok(carried)
    }
}

#[derive(Default)]
struct Removal {
    chunks: Vec<(u64, u64)>,
    updated: BTreeMap<SpaceName, Head>,
    /// The essentials' chunks among `chunks`, whose definitions are carried forward.
    essentials: Vec<(SpaceName, ChunkInfo)>,
    packets: u64,
}

/// Definitions carried forward by a removal: the chunks appended, and the data sources whose
/// readers to wake.
#[derive(Default)]
struct Carried {
    chunks: Vec<(u64, u64, Vec<u8>)>,
    data_sources: BTreeSet<String>,
}

impl Removal {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

fn refused(reason: &str) -> String {
    format!(
        "{reason}; packet writes are refused until the store can be written again (retried by itself)"
    )
}

/// Nanoseconds since the Unix epoch.
pub fn nanos(time: Timestamp) -> i64 {
    time.seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(time.nanos))
}

/// Free bytes on the filesystem holding `path`, when the system says.
fn free_bytes(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path.parent()?).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}
