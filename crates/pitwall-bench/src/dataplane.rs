//! The data plane's benchmarks, over `PacketWriterService`, `PacketReaderService` and
//! `ConnectionManagerService` like any client:
//!
//! - **write**: durable writes of 1 KiB packets through `WriteDataPackets` from concurrent
//!   streams, against the same writer loops on a no-op RPC (the transport's limit,
//!   [`crate::noop`]) and a sequential `write` + `fdatasync` of the same batches (the disk's).
//! - **replay**: a store filled with packets, read from offset 0 through `ReadPackets`; with
//!   the server's defaults, then restarted with `--batching-responses`.
//! - **live**: readers following the latest packets while a writer writes at a fixed rate;
//!   latency from the write's acknowledgement and from its due time to each receipt.
//! - **memory**: the server's memory per read connection, per idle reader, and while packets
//!   are written past a reader whose client reads nothing.
//!
//! Every run also checks what it can: every acknowledged packet received, once, in each
//! writer's order; nothing acknowledged that the no-op server did not get.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use pitwall_proto::api::{DataPacketDetails, ReadPacketsResponse, WriteDataPacketRequest};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::connection::{self, pick};
use crate::driver::{self, Pace, Step, StepError};
use crate::fanout::{self, Feed, Write, Writer};
use crate::latency::Latencies;
use crate::metrics::Commits;
use crate::noop::NoopServer;
use crate::packets::{
    self, CallShape, Epoch, PACKET_BYTES, Random, Read, Stamp, StreamWriter, WriterClient,
};
use crate::process::{self, CpuTimes, PACKET_WRITER_THREAD, mib};
use crate::report::{FanoutResult, MemoryResult, ReplayResult, WriteResult};
use crate::server::{PitwallProcess, ServerArgs, Target, fresh_data_dir};

/// A read that delivers nothing for this long has stopped: what has not come is missing.
const READ_PATIENCE: Duration = Duration::from_secs(30);
/// How long readers may take to show they follow a data source before the run gives up.
const SYNC_PATIENCE: Duration = Duration::from_secs(30);
/// Between the packets that tell readers they follow.
const SYNC_EVERY: Duration = Duration::from_millis(20);
/// The disk benchmark starts a new file past this size, so it never fills the disk.
const DISK_FILE_LIMIT: u64 = 1 << 30;
/// How often the server's memory is sampled while the stalled reader's data source is written.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);

fn megabytes_per_second(packets_per_second: f64) -> f64 {
    packets_per_second * PACKET_BYTES as f64 / 1e6
}

fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

// ------------------------------------------------------------------------------------------
// Writes

#[derive(Debug, Clone, clap::Args)]
pub struct WriteArgs {
    /// Concurrent `WriteDataPackets` streams.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Packets (1 KiB each) in one message of a stream.
    #[arg(long = "packets-per-request", default_value_t = 64)]
    pub packets_per_request: usize,
    /// Packets in one `WriteDataPackets` call: the stream is closed after them, and they count
    /// once the answer (every packet durable) came.
    #[arg(long = "packets-per-call", default_value_t = 1024)]
    pub packets_per_call: usize,
    /// HTTP/2 connections the streams are spread over [default: one per stream].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Seconds measured, for each of Pitwall, the no-op RPC and the disk.
    #[arg(long, default_value_t = 8.0)]
    pub duration: f64,
    /// Seconds each runs before it is measured.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Packets per `write` + `fdatasync` of the disk's limit [default: streams × packets per
    /// request, one request of every stream per commit].
    #[arg(long = "disk-batch")]
    pub disk_batch: Option<usize>,
}

impl WriteArgs {
    fn shape(&self) -> CallShape {
        CallShape {
            packets_per_request: self.packets_per_request.max(1),
            packets_per_call: self.packets_per_call.max(1),
        }
    }

    fn disk_batch(&self) -> usize {
        self.disk_batch
            .unwrap_or(self.streams.max(1) * self.packets_per_request.max(1))
            .max(1)
    }
}

/// Pitwall, the no-op RPC, the disk, in that order, with Pitwall's rate over each.
pub async fn run_write(target: &Target, args: &WriteArgs) -> anyhow::Result<Vec<WriteResult>> {
    eprintln!("  write: pitwall, {} streams", args.streams);
    let (pitwall, _) = write_rpc("pitwall", target.url(), Some(target), args).await?;
    eprintln!("  write: no-op RPC (the transport's limit)");
    let noop = NoopServer::start().await?;
    let (mut transport, acknowledged) = write_rpc("no-op RPC", &noop.url, None, args).await?;
    // An answered call was read whole by the server before it answered.
    transport.lost = acknowledged.saturating_sub(noop.packets());
    noop.stop().await?;
    eprintln!(
        "  write: write + fdatasync (the disk's limit), {} packets a commit",
        args.disk_batch()
    );
    let disk = write_disk("write+fdatasync", args.disk_batch(), args).await?;
    // The same at the size Pitwall's commits had in this run: whether it is the disk's limit.
    let commit = pitwall
        .packets_per_commit
        .map(|n| n.round() as usize)
        .filter(|&n| n > 0);
    let mut rows = vec![pitwall, transport, disk];
    if let Some(batch) = commit {
        eprintln!("  write: write + fdatasync, {batch} packets a commit (Pitwall's mean)");
        rows.push(write_disk("write+fdatasync, Pitwall's commits", batch, args).await?);
    }
    let rate = rows[0].packets_per_second;
    for row in &mut rows {
        row.pitwall_ratio = (row.packets_per_second > 0.0).then(|| rate / row.packets_per_second);
    }
    Ok(rows)
}

/// Writer loops against `url` for the warm-up and the measured time; also returns every packet
/// acknowledged, warm-up included. `target` is the Pitwall server, for its memory, CPU and
/// commits; `None` for the in-process no-op server, whose CPU is the benchmark process's.
async fn write_rpc(
    system: &str,
    url: &str,
    target: Option<&Target>,
    args: &WriteArgs,
) -> anyhow::Result<(WriteResult, u64)> {
    let streams = args.streams.max(1);
    let channels = connection::connect(url, args.connections.unwrap_or(streams)).await?;
    let data_source = packets::data_source("write");
    let epoch = Epoch::now();
    let loops: Vec<StreamWriter> = (0..streams)
        .map(|i| {
            StreamWriter::new(
                pick(&channels, i),
                &data_source,
                i as u32,
                args.shape(),
                epoch,
            )
        })
        .collect();
    let loops = if args.warmup > 0.0 {
        driver::run(loops, Pace::Closed, Duration::from_secs_f64(args.warmup))
            .await?
            .loops
    } else {
        loops
    };
    let acknowledged_before: u64 = loops.iter().map(|l| l.acknowledged).sum();
    let pid = target.and_then(Target::pid);
    let metrics = target.and_then(Target::metrics_addr);
    let rss_before = target.map(Target::resident_bytes).transpose()?.flatten();
    let commits_before = Commits::read(metrics).await;
    let cpu_before = CpuTimes::read_with(pid, PACKET_WRITER_THREAD);
    let outcome = driver::run(
        loops,
        Pace::Closed,
        Duration::from_secs_f64(args.duration.max(0.0)),
    )
    .await?;
    let acknowledged: u64 = outcome.loops.iter().map(|l| l.acknowledged).sum();
    let packets = acknowledged - acknowledged_before;
    let cpu = cpu_before.per_request(&CpuTimes::read_with(pid, PACKET_WRITER_THREAD), packets);
    let commits_after = Commits::read(metrics).await;
    let rss_after = target.map(Target::resident_bytes).transpose()?.flatten();
    let seconds = outcome.elapsed.as_secs_f64();
    let rate = per_second(packets, seconds);
    let shape = args.shape();
    let row = WriteResult {
        system: system.to_owned(),
        streams,
        packets_per_request: shape.packets_per_request,
        packets_per_call: shape.packets_per_call,
        packets_per_commit: commits_before
            .zip(commits_after)
            .and_then(|(before, after)| before.per_commit(&after)),
        seconds,
        packets,
        errors: outcome.failed,
        lost: 0,
        packets_per_second: rate,
        mb_per_second: megabytes_per_second(rate),
        pitwall_ratio: None,
        latency: outcome.latencies.percentiles(),
        cpu,
        rss_before_mib: rss_before.map(mib),
        rss_after_mib: rss_after.map(mib),
        first_error: outcome.first_error,
    };
    Ok((row, acknowledged))
}

/// Sequential `write` + `fdatasync` of batches of `batch` 1 KiB packets to a file in a fresh
/// temporary directory beside the servers' data directories.
async fn write_disk(system: &str, batch: usize, args: &WriteArgs) -> anyhow::Result<WriteResult> {
    let (warmup, duration) = (
        Duration::from_secs_f64(args.warmup.max(0.0)),
        Duration::from_secs_f64(args.duration.max(0.0)),
    );
    let dir = fresh_data_dir()?;
    let mut bytes = vec![0; batch * PACKET_BYTES];
    Random::new(7).fill(&mut bytes);
    let bytes = Arc::new(bytes);
    let file = DiskFile::create(&dir.path().join("batches"))?;
    let (file, _, _) = appending(file, bytes.clone(), warmup).await?;
    let cpu_before = CpuTimes::read(None);
    let started = Instant::now();
    let (_, batches, latencies) = appending(file, bytes, duration).await?;
    let seconds = started.elapsed().as_secs_f64();
    let packets = batches * batch as u64;
    let cpu = cpu_before.per_request(&CpuTimes::read(None), packets);
    let rate = per_second(packets, seconds);
    Ok(WriteResult {
        system: system.to_owned(),
        streams: 0,
        packets_per_request: batch,
        packets_per_call: 0,
        packets_per_commit: Some(batch as f64),
        seconds,
        packets,
        errors: 0,
        lost: 0,
        packets_per_second: rate,
        mb_per_second: megabytes_per_second(rate),
        pitwall_ratio: None,
        latency: latencies.percentiles(),
        cpu,
        rss_before_mib: None,
        rss_after_mib: None,
        first_error: None,
    })
}

/// [`DiskFile::append_for`] on a blocking thread.
async fn appending(
    mut file: DiskFile,
    bytes: Arc<Vec<u8>>,
    duration: Duration,
) -> anyhow::Result<(DiskFile, u64, Latencies)> {
    tokio::task::spawn_blocking(move || {
        let (count, latencies) = file.append_for(&bytes, duration)?;
        Ok((file, count, latencies))
    })
    .await?
}

/// An append-only file, replaced by a new one past [`DISK_FILE_LIMIT`].
struct DiskFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    written: u64,
}

impl DiskFile {
    fn create(path: &Path) -> anyhow::Result<DiskFile> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(DiskFile {
            path: path.to_owned(),
            file,
            written: 0,
        })
    }

    /// Appends `bytes` and fdatasyncs, again and again for `duration`; returns the count and
    /// the time each took.
    fn append_for(&mut self, bytes: &[u8], duration: Duration) -> anyhow::Result<(u64, Latencies)> {
        let mut latencies = Latencies::default();
        let mut count = 0;
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            if self.written + bytes.len() as u64 > DISK_FILE_LIMIT {
                let _ = std::fs::remove_file(&self.path);
                *self = DiskFile::create(&self.path)?;
            }
            let started = Instant::now();
            self.file.write_all(bytes)?;
            self.file.sync_data()?;
            latencies.record(started.elapsed());
            self.written += bytes.len() as u64;
            count += 1;
        }
        Ok((count, latencies))
    }
}

/// Writes `count` packets to `data_source` with `streams` writer loops; fails unless every
/// call succeeded. Returns the packets each writer wrote and the rate.
pub async fn fill(
    url: &str,
    data_source: &str,
    count: usize,
    streams: usize,
    shape: CallShape,
) -> anyhow::Result<(Vec<u64>, f64)> {
    let streams = streams.max(1);
    let channels = connection::connect(url, streams).await?;
    let quota = Arc::new(AtomicUsize::new(count));
    let epoch = Epoch::now();
    let loops: Vec<StreamWriter> = (0..streams)
        .map(|i| {
            StreamWriter::new(pick(&channels, i), data_source, i as u32, shape, epoch)
                .with_quota(quota.clone())
        })
        .collect();
    // Ends when the quota is used up; the duration only bounds a server that stopped answering.
    let outcome = driver::run(loops, Pace::Closed, Duration::from_secs(24 * 3600)).await?;
    if outcome.failed > 0 {
        bail!(
            "{} WriteDataPackets calls failed while writing {count} packets; first: {}",
            outcome.failed,
            outcome.first_error.unwrap_or_default()
        );
    }
    let written: Vec<u64> = outcome.loops.iter().map(|l| l.acknowledged).collect();
    let total: u64 = written.iter().sum();
    if total != count as u64 {
        bail!("{total} packets were written instead of {count}");
    }
    Ok((written, per_second(total, outcome.elapsed.as_secs_f64())))
}

// ------------------------------------------------------------------------------------------
// Replay

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Packets (1 KiB each) stored in one data source before the read.
    #[arg(long, default_value_t = 1_000_000)]
    pub packets: usize,
    /// Writer streams filling the store.
    #[arg(long = "fill-streams", default_value_t = 8)]
    pub fill_streams: usize,
    /// Leave out the second read, restarted with `--batching-responses`.
    #[arg(long = "no-batching-run")]
    pub no_batching_run: bool,
}

const FILL_SHAPE: CallShape = CallShape {
    packets_per_request: 64,
    packets_per_call: 1024,
};

/// Fills a fresh store, reads it from offset 0; then (on a spawned server) restarts it with
/// `--batching-responses` and reads it again.
pub async fn run_replay(
    server: &ServerArgs,
    args: &ReplayArgs,
) -> anyhow::Result<Vec<ReplayResult>> {
    let data_source = packets::data_source("replay");
    if server.server.is_some() {
        let target = Target::start(server).await?;
        let (written, fill_rate) = fill(
            target.url(),
            &data_source,
            args.packets,
            args.fill_streams,
            FILL_SHAPE,
        )
        .await?;
        let mut row = replay(target.url(), target.pid(), &data_source, &written).await?;
        row.fill_rate = fill_rate;
        return Ok(vec![row]);
    }
    let binary = server.binary()?;
    let dir = fresh_data_dir()?;
    let first = PitwallProcess::spawn(&binary, dir.path(), &server.server_args).await?;
    eprintln!("  replay: filling {} packets", args.packets);
    let (written, fill_rate) = fill(
        &first.grpc_url,
        &data_source,
        args.packets,
        args.fill_streams,
        FILL_SHAPE,
    )
    .await?;
    eprintln!("  replay: reading from offset 0");
    let mut rows = vec![replay(&first.grpc_url, Some(first.pid), &data_source, &written).await?];
    first.stop().await?;
    let batching = "--batching-responses".to_owned();
    if !args.no_batching_run && !server.server_args.contains(&batching) {
        let mut extra = server.server_args.clone();
        extra.push(batching);
        let second = PitwallProcess::spawn(&binary, dir.path(), &extra).await?;
        eprintln!("  replay: reading again, restarted with --batching-responses");
        let mut row = replay(&second.grpc_url, Some(second.pid), &data_source, &written).await?;
        row.label = "batching responses (restarted)".to_owned();
        rows.push(row);
        second.stop().await?;
    }
    let store = directory_bytes(dir.path()).ok().map(mib);
    for row in &mut rows {
        row.fill_rate = fill_rate;
        row.store_mib = store;
    }
    Ok(rows)
}

/// What a reader of a data source written by [`fill`] received, checked against what each
/// writer wrote.
struct Tally {
    seen: Vec<Vec<bool>>,
    latest: Vec<Option<u64>>,
    received: u64,
    duplicates: u64,
    reordered: u64,
    unexpected: u64,
}

impl Tally {
    fn new(written: &[u64]) -> Tally {
        Tally {
            seen: written.iter().map(|&n| vec![false; n as usize]).collect(),
            latest: vec![None; written.len()],
            received: 0,
            duplicates: 0,
            reordered: 0,
            unexpected: 0,
        }
    }

    fn add(&mut self, stamp: Stamp) {
        let writer = stamp.writer as usize;
        let Some(seen) = self
            .seen
            .get_mut(writer)
            .and_then(|s| s.get_mut(stamp.sequence as usize))
        else {
            self.unexpected += 1;
            return;
        };
        if *seen {
            self.duplicates += 1;
            return;
        }
        *seen = true;
        self.received += 1;
        if self.latest[writer].is_some_and(|latest| stamp.sequence < latest) {
            self.reordered += 1;
        }
        self.latest[writer] = self.latest[writer].max(Some(stamp.sequence));
    }
}

/// Reads `data_source` from offset 0 until every packet `written` describes came (or the read
/// stalls), timing it.
async fn replay(
    url: &str,
    pid: Option<u32>,
    data_source: &str,
    written: &[u64],
) -> anyhow::Result<ReplayResult> {
    let expected: u64 = written.iter().sum();
    let channels = connection::connect(url, 1).await?;
    let rss_before = pid.map(process::resident_bytes).transpose()?;
    let cpu_before = CpuTimes::read_with(pid, PACKET_WRITER_THREAD);
    let started = Instant::now();
    let mut stream = packets::open_read(pick(&channels, 0), data_source, 0).await?;
    let mut tally = Tally::new(written);
    let (mut responses, mut first_error) = (0u64, None);
    let mut last = started;
    while tally.received < expected {
        match tokio::time::timeout(READ_PATIENCE, stream.message()).await {
            Ok(Ok(Some(response))) => {
                responses += 1;
                for item in response.response {
                    match item.packet.map(packets::read_packet) {
                        Some(Ok(Read::Data(stamp))) => tally.add(stamp),
                        _ => tally.unexpected += 1,
                    }
                }
                last = Instant::now();
            }
            Ok(Ok(None)) => {
                first_error = Some("the read ended".to_owned());
                break;
            }
            Ok(Err(status)) => {
                first_error = Some(format!("{}: {}", status.code(), status.message()));
                break;
            }
            Err(_) => {
                first_error = Some(format!("nothing came for {READ_PATIENCE:?}"));
                break;
            }
        }
    }
    let seconds = last.duration_since(started).as_secs_f64();
    drop(stream);
    let cpu = cpu_before.per_request(
        &CpuTimes::read_with(pid, PACKET_WRITER_THREAD),
        tally.received,
    );
    let rss_after = pid.map(process::resident_bytes).transpose()?;
    let rate = per_second(tally.received, seconds);
    Ok(ReplayResult {
        label: "default".to_owned(),
        stored: expected,
        fill_rate: 0.0,
        received: tally.received,
        responses,
        seconds,
        packets_per_second: rate,
        mb_per_second: megabytes_per_second(rate),
        missing: expected - tally.received,
        reordered: tally.reordered,
        duplicates: tally.duplicates,
        unexpected: tally.unexpected,
        cpu,
        rss_before_mib: rss_before.map(mib),
        rss_after_mib: rss_after.map(mib),
        store_mib: None,
        first_error,
    })
}

/// Bytes of the regular files directly in `dir`.
fn directory_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let metadata = entry?.metadata()?;
        if metadata.is_file() {
            total += metadata.len();
        }
    }
    Ok(total)
}

// ------------------------------------------------------------------------------------------
// Live latency

#[derive(Debug, Clone, clap::Args)]
pub struct LiveArgs {
    /// Readers of one data source, each on its own read connection and HTTP/2 connection,
    /// following from the latest packet (main_offset -1).
    #[arg(long, default_value_t = 10)]
    pub readers: usize,
    /// Packets written per second (open loop, one `WriteDataPacket` each).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Writer loops sharing the rate (each waits for its write's answer before the next, so
    /// at 10,000/s each has 12.8 ms for a durable write).
    #[arg(long, default_value_t = 128)]
    pub writers: usize,
}

/// A reader's `ReadPackets` stream as a fan-out feed: the stamps of the measured packets.
struct PacketFeed(Streaming<ReadPacketsResponse>);

impl PacketFeed {
    /// Reads until a sync packet came: from then on the reader follows every new packet.
    async fn synced(&mut self) -> anyhow::Result<()> {
        loop {
            let Some(response) = self.0.message().await? else {
                bail!("a reader's stream ended before it followed");
            };
            for item in response.response {
                if let Some(packet) = item.packet
                    && packets::read_packet(packet)? == Read::Sync
                {
                    return Ok(());
                }
            }
        }
    }
}

impl Feed for PacketFeed {
    async fn next(&mut self) -> anyhow::Result<Option<Vec<u128>>> {
        let Some(response) = self.0.message().await? else {
            return Ok(None);
        };
        let mut keys = Vec::with_capacity(response.response.len());
        for item in response.response {
            if let Some(packet) = item.packet
                && let Read::Data(stamp) = packets::read_packet(packet)?
            {
                keys.push(stamp.key());
            }
        }
        Ok(Some(keys))
    }
}

/// One writer loop of the live benchmark: a `WriteDataPacket` per step, stamped with when it
/// was due.
struct UnaryWriter {
    client: WriterClient,
    data_source: String,
    writer: u32,
    next: u64,
    epoch: Epoch,
    random: Random,
    writes: Vec<Write>,
}

impl Step for UnaryWriter {
    async fn step(&mut self, scheduled: Instant) -> Result<(), StepError> {
        let stamp = Stamp {
            writer: self.writer,
            sequence: self.next,
            due_nanos: self.epoch.nanos(scheduled),
        };
        self.next += 1;
        let detail = DataPacketDetails {
            message: Some(packets::data_packet(stamp, &mut self.random)),
            data_source: self.data_source.clone(),
            ..DataPacketDetails::default()
        };
        self.client
            .write_data_packet(WriteDataPacketRequest {
                detail: Some(detail),
            })
            .await
            .map_err(|status| {
                StepError::Failed(format!("{}: {}", status.code(), status.message()))
            })?;
        let acked = Instant::now();
        // The stamp carries the due time too; the two agree (same clock, same process).
        let sent = self.epoch.instant(stamp.due_nanos);
        self.writes.push(Write {
            key: stamp.key(),
            sent,
            acked,
            revision: 0,
        });
        Ok(())
    }
}

impl Writer for UnaryWriter {
    fn writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }
}

/// Live readers while a writer writes at a fixed rate.
pub async fn run_live(target: &Target, args: &LiveArgs) -> anyhow::Result<FanoutResult> {
    let data_source = packets::data_source("live");
    let readers = args.readers.max(1);
    let mut feeds = Vec::with_capacity(readers);
    for _ in 0..readers {
        let channels = connection::connect(target.url(), 1).await?;
        feeds.push(PacketFeed(
            packets::open_read(pick(&channels, 0), &data_source, -1).await?,
        ));
    }
    let writer_channels = connection::connect(target.url(), 2).await?;
    // A read from "latest" starts where the data source stands when its reader first looks:
    // write sync packets until every reader has one, then every reader follows.
    let stop_sync = CancellationToken::new();
    let sync = tokio::spawn(write_sync(
        pick(&writer_channels, 0),
        data_source.clone(),
        stop_sync.clone(),
    ));
    let synced = tokio::time::timeout(SYNC_PATIENCE, async {
        for feed in &mut feeds {
            feed.synced().await?;
        }
        anyhow::Ok(())
    })
    .await;
    stop_sync.cancel();
    sync.await??;
    synced.context("the readers did not follow the data source in time")??;

    let epoch = Epoch::now();
    let writers: Vec<UnaryWriter> = (0..args.writers.max(1))
        .map(|i| UnaryWriter {
            client: WriterClient::new(pick(&writer_channels, i)),
            data_source: data_source.clone(),
            writer: i as u32,
            next: 0,
            epoch,
            random: Random::new(i as u64),
            writes: Vec::new(),
        })
        .collect();
    let rss_before = target.resident_bytes()?;
    let cpu_before = CpuTimes::read_with(target.pid(), PACKET_WRITER_THREAD);
    let (writes, receipts) = fanout::run(feeds, writers, args.rate, args.seconds).await?;
    let cpu_after = CpuTimes::read_with(target.pid(), PACKET_WRITER_THREAD);
    let rss_after = target.resident_bytes()?;
    let order = log_order(target.url(), &data_source, writes.writes.len()).await?;
    let mut result = fanout::check(
        "pitwall packets",
        readers,
        args.rate,
        &order,
        &writes,
        &receipts,
    );
    result.cpu = cpu_before.per_request(&cpu_after, result.delivered);
    result.rss_before_mib = rss_before.map(mib);
    result.rss_after_mib = rss_after.map(mib);
    Ok(result)
}

/// Writes a sync packet every [`SYNC_EVERY`] until `stop`.
async fn write_sync(
    channel: Channel,
    data_source: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut client = WriterClient::new(channel);
    while !stop.is_cancelled() {
        client
            .write_data_packet(WriteDataPacketRequest {
                detail: Some(DataPacketDetails {
                    message: Some(packets::sync_packet()),
                    data_source: data_source.clone(),
                    ..DataPacketDetails::default()
                }),
            })
            .await
            .context("a sync packet was not written")?;
        tokio::select! {
            () = tokio::time::sleep(SYNC_EVERY) => {}
            () = stop.cancelled() => {}
        }
    }
    Ok(())
}

/// The measured packets of `data_source` in the log's order, read from offset 0: at least
/// `expected` of them, or what came before the read stalled.
async fn log_order(url: &str, data_source: &str, expected: usize) -> anyhow::Result<Vec<u128>> {
    let channels = connection::connect(url, 1).await?;
    let mut stream = packets::open_read(pick(&channels, 0), data_source, 0).await?;
    let mut order = Vec::with_capacity(expected);
    while order.len() < expected {
        match tokio::time::timeout(READ_PATIENCE, stream.message()).await {
            Ok(Ok(Some(response))) => {
                for item in response.response {
                    if let Some(packet) = item.packet
                        && let Read::Data(stamp) = packets::read_packet(packet)?
                    {
                        order.push(stamp.key());
                    }
                }
            }
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(status)) => bail!("reading the log's order failed: {status}"),
        }
    }
    Ok(order)
}

// ------------------------------------------------------------------------------------------
// Memory

#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    /// Read connections opened (`NewConnection`) and never read.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// `ReadPackets` calls kept open on a data source nobody writes to.
    #[arg(long, default_value_t = 1000)]
    pub readers: usize,
    /// MiB of packets written to a data source whose one reader's client reads nothing.
    #[arg(long = "stalled-mib", default_value_t = 1024)]
    pub stalled_mib: u64,
    /// Milliseconds the server is given to finish what a burst of calls started before its
    /// memory is read.
    #[arg(long = "settle-ms", default_value_t = 500)]
    pub settle_ms: u64,
}

/// HTTP/2 streams a connection carries at most (Pitwall's `--max-concurrent-streams`), less
/// some room.
const STREAMS_PER_CONNECTION: usize = 1000;

pub async fn run_memory(target: &Target, args: &MemoryArgs) -> anyhow::Result<MemoryResult> {
    let Some(pid) = target.pid() else {
        bail!("the memory benchmark reads the server's memory: give --server-pid with --server");
    };
    let rss = || process::resident_bytes(pid);
    let settle = || tokio::time::sleep(Duration::from_millis(args.settle_ms));
    settle().await;
    let rss_idle = rss()?;

    // Read connections: server-side plans, nothing running.
    let idle = packets::data_source("idle");
    let channels = connection::connect(target.url(), 1).await?;
    let before = rss()?;
    let mut connections = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        connections.push(packets::new_connection(pick(&channels, 0), &idle, -1).await?);
    }
    settle().await;
    let bytes_per_connection = growth(before, rss()?, args.connections);

    // Idle readers: one read connection, many ReadPackets calls waiting for packets.
    let reader_channels = connection::connect(
        target.url(),
        args.readers.div_ceil(STREAMS_PER_CONNECTION).max(1),
    )
    .await?;
    let connection = packets::new_connection(pick(&reader_channels, 0), &idle, -1).await?;
    settle().await;
    let before = rss()?;
    let readers = futures::stream::iter(0..args.readers)
        .map(|i| {
            let channel = reader_channels[i / STREAMS_PER_CONNECTION].clone();
            async move {
                packets::ReaderClient::new(channel)
                    .read_packets(pitwall_proto::api::ReadPacketsRequest {
                        connection: Some(connection),
                    })
                    .await
                    .map(|r| r.into_inner())
                    .context("ReadPackets failed")
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    settle().await;
    let bytes_per_reader = growth(before, rss()?, args.readers);
    drop(readers);
    drop(connections);
    drop(reader_channels);
    drop(channels);

    // A reader whose client reads nothing, on its own HTTP/2 connection, while its data
    // source is written.
    let stalled_source = packets::data_source("stalled");
    let stalled_channels = connection::connect(target.url(), 1).await?;
    let mut stalled = packets::open_read(pick(&stalled_channels, 0), &stalled_source, 0).await?;
    settle().await;
    let rss_stalled_before = rss()?;
    let packets_to_write = (args.stalled_mib * 1024 * 1024 / PACKET_BYTES as u64) as usize;
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn({
        let stop = stop_sampling.clone();
        async move {
            let mut peak = 0;
            while !stop.is_cancelled() {
                peak = peak.max(process::resident_bytes(pid).unwrap_or(0));
                tokio::select! {
                    () = tokio::time::sleep(RSS_SAMPLE_EVERY) => {}
                    () = stop.cancelled() => {}
                }
            }
            peak
        }
    });
    let written = fill(
        target.url(),
        &stalled_source,
        packets_to_write,
        8,
        FILL_SHAPE,
    )
    .await;
    stop_sampling.cancel();
    let peak = sampler.await?;
    let (stalled_write_rate, stalled_write_errors, first_error) = match written {
        Ok((_, rate)) => (rate, 0, None),
        Err(e) => (0.0, 1, Some(format!("{e:#}"))),
    };
    let rss_stalled_after = rss()?;
    // The stalled call is still open: its client now reads, and packets come.
    let stalled_reader_alive = matches!(
        tokio::time::timeout(READ_PATIENCE, stalled.message()).await,
        Ok(Ok(Some(response))) if !response.response.is_empty()
    );
    Ok(MemoryResult {
        rss_idle_mib: mib(rss_idle),
        connections: args.connections,
        bytes_per_connection,
        readers: args.readers,
        bytes_per_reader,
        stalled_written_bytes: packets_to_write as u64 * PACKET_BYTES as u64,
        stalled_write_rate,
        stalled_write_errors,
        rss_stalled_before_mib: mib(rss_stalled_before),
        rss_stalled_peak_mib: mib(peak.max(rss_stalled_after)),
        rss_stalled_after_mib: mib(rss_stalled_after),
        stalled_reader_alive,
        first_error,
    })
}

/// (after − before) / count, in bytes; negative growth (pages given back) counts as none.
fn growth(before: u64, after: u64, count: usize) -> f64 {
    after.saturating_sub(before) as f64 / count.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(writer: u32, sequence: u64) -> Stamp {
        Stamp {
            writer,
            sequence,
            due_nanos: 0,
        }
    }

    #[test]
    fn a_tally_counts_each_fault_once() {
        let mut tally = Tally::new(&[3, 2]);
        for s in [
            stamp(0, 0),
            stamp(1, 1),
            stamp(0, 2),
            stamp(0, 1),
            stamp(1, 1),
        ] {
            tally.add(s);
        }
        tally.add(stamp(2, 0));
        tally.add(stamp(1, 9));
        assert_eq!(tally.received, 4);
        assert_eq!(tally.reordered, 1);
        assert_eq!(tally.duplicates, 1);
        assert_eq!(tally.unexpected, 2);
    }

    #[test]
    fn appended_batches_rotate_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = DiskFile::create(&dir.path().join("f")).unwrap();
        let (count, latencies) = file
            .append_for(&[1; 4096], Duration::from_millis(20))
            .unwrap();
        assert!(count > 0);
        assert_eq!(latencies.count(), count);
    }
}
