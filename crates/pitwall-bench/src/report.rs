//! Results, their medians over repeated runs, the goals they are held against, and the
//! markdown tables they are printed as.

use std::fmt::Write as _;

use serde::Serialize;

use crate::latency::Percentiles;

/// One load scenario.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// `health`, `create`, …, or `etcd put` for the peer.
    pub scenario: String,
    /// `closed`, or `open N/s`.
    pub pace: String,
    pub concurrency: usize,
    pub connections: usize,
    /// Successful requests.
    pub requests: u64,
    pub errors: u64,
    /// Open loop: requests due but never sent because the server fell behind the rate.
    pub unsent: u64,
    pub seconds: f64,
    /// Successful requests per second.
    pub throughput: f64,
    /// Throughput over the closed-loop `health` throughput of the same run.
    pub vs_health: Option<f64>,
    pub latency: Percentiles,
    /// CPU spent per successful request, by the server, its writer thread and the benchmark.
    pub cpu: CpuPerRequest,
    pub rss_before_mib: Option<f64>,
    pub rss_after_mib: Option<f64>,
    pub first_error: Option<String>,
}

/// Microseconds of CPU per request. On a machine whose cores are all busy, throughput is
/// about cores / (server + client CPU per request).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuPerRequest {
    pub server_us: Option<f64>,
    /// The server's writer thread alone (Pitwall: decide, commit, apply, notify).
    pub writer_us: Option<f64>,
    pub client_us: Option<f64>,
}

/// One notification fan-out.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    /// `pitwall` or `etcd`.
    pub system: String,
    pub subscribers: usize,
    /// Writes per second offered.
    pub rate: f64,
    /// Writes acknowledged.
    pub writes: u64,
    /// Writes due but never sent: the system fell behind the rate.
    pub unsent: u64,
    pub write_errors: u64,
    /// Notifications every subscriber should have had: writes × subscribers.
    pub expected: u64,
    pub delivered: u64,
    pub missed: u64,
    /// Notifications that arrived after one of a later write.
    pub reordered: u64,
    pub duplicates: u64,
    /// Notifications of keys this run did not write.
    pub unexpected: u64,
    /// Subscriber streams that ended with an error.
    pub stream_errors: u64,
    /// From the write's acknowledgement to the subscriber's receipt (0 when it came first).
    pub from_ack: Percentiles,
    /// From when the write was due to be sent to the subscriber's receipt.
    pub from_send: Percentiles,
    /// Share of notifications received before their write was acknowledged.
    pub before_ack: f64,
    /// From when each write was due to be sent to its acknowledgement.
    pub write_latency: Percentiles,
    /// CPU of the server's writer thread per write (Pitwall only).
    pub writer_us_per_write: Option<f64>,
    /// CPU per delivered notification (writes included), by the server and the benchmark.
    pub cpu: CpuPerRequest,
    pub rss_before_mib: Option<f64>,
    pub rss_after_mib: Option<f64>,
    pub first_error: Option<String>,
}

/// Filling a store, restarting on it, and the memory it takes.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryResult {
    pub sessions: u64,
    /// Creates per second while filling (at the fill concurrency).
    pub fill_rate: f64,
    pub store_mib: f64,
    /// SIGTERM until exit (0) of the filled server.
    pub stop_seconds: f64,
    /// Spawn until ready (the ready file) on the filled store.
    pub ready_seconds: f64,
    /// Spawn until ready on an empty store, for comparison.
    pub empty_ready_seconds: f64,
    /// Sessions the restarted server reported reading.
    pub sessions_at_ready: u64,
    pub rss_empty_mib: f64,
    pub rss_filled_mib: f64,
    pub rss_restarted_mib: f64,
    /// (RSS after restart − RSS of an empty server) / sessions.
    pub bytes_per_session: f64,
    /// Sampled sessions read back after the restart that were missing or wrong.
    pub sample_failures: u64,
}

/// One row of the packet write comparison: Pitwall, the no-op RPC (the transport's limit) or
/// `write` + `fdatasync` (the disk's limit).
#[derive(Debug, Clone, Serialize)]
pub struct WriteResult {
    /// `pitwall`, `no-op RPC` or `write+fdatasync`.
    pub system: String,
    /// Concurrent `WriteDataPackets` streams (the disk: none).
    pub streams: usize,
    pub packets_per_request: usize,
    /// Packets per `WriteDataPackets` call; 0 for the disk.
    pub packets_per_call: usize,
    /// Packets per durable commit: per `write` + `fdatasync` for the disk, the mean of the
    /// server's commits (from its metrics) for Pitwall.
    pub packets_per_commit: Option<f64>,
    pub seconds: f64,
    /// Packets acknowledged (every packet of an answered call, or of an fdatasync'd write).
    pub packets: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Packets acknowledged that the no-op server never received.
    pub lost: u64,
    pub packets_per_second: f64,
    /// Megabytes (10^6 bytes) of packets per second.
    pub mb_per_second: f64,
    /// Pitwall's packets/s over this row's.
    pub pitwall_ratio: Option<f64>,
    /// Duration of one call (one `write` + `fdatasync` for the disk).
    pub latency: Percentiles,
    /// CPU per packet: server (its packet writer thread) + benchmark process.
    pub cpu: CpuPerRequest,
    pub rss_before_mib: Option<f64>,
    pub rss_after_mib: Option<f64>,
    pub first_error: Option<String>,
}

/// One replay of stored packets from offset 0 through `ReadPackets`.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayResult {
    /// What the server ran with: `default` or `batching responses` (after a restart).
    pub label: String,
    /// Packets stored before the read.
    pub stored: u64,
    /// Packets/s while filling (WriteDataPackets, same writer loops as the write benchmark).
    pub fill_rate: f64,
    /// Distinct packets received.
    pub received: u64,
    /// `ReadPacketsResponse` messages.
    pub responses: u64,
    /// From the `ReadPackets` call to the last packet.
    pub seconds: f64,
    pub packets_per_second: f64,
    pub mb_per_second: f64,
    pub missing: u64,
    /// Packets that came before one their writer wrote earlier.
    pub reordered: u64,
    pub duplicates: u64,
    /// Packets this run did not write.
    pub unexpected: u64,
    /// CPU per packet: server + benchmark process.
    pub cpu: CpuPerRequest,
    pub rss_before_mib: Option<f64>,
    pub rss_after_mib: Option<f64>,
    /// The packet store's file(s) in MiB, when the data directory is the benchmark's.
    pub store_mib: Option<f64>,
    pub first_error: Option<String>,
}

/// Memory of read connections and readers, and the server's memory with a stalled reader.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    pub rss_idle_mib: f64,
    /// Read connections opened (`NewConnection`), never read.
    pub connections: usize,
    /// (RSS after − before) / connections.
    pub bytes_per_connection: f64,
    /// `ReadPackets` calls open on a data source nobody writes to.
    pub readers: usize,
    /// (RSS after − before) / readers.
    pub bytes_per_reader: f64,
    /// Bytes of packets written while one reader's client read nothing.
    pub stalled_written_bytes: u64,
    /// Packets/s of that write.
    pub stalled_write_rate: f64,
    pub stalled_write_errors: u64,
    pub rss_stalled_before_mib: f64,
    /// Highest RSS sampled (every 100 ms) during the write.
    pub rss_stalled_peak_mib: f64,
    pub rss_stalled_after_mib: f64,
    /// The stalled call still delivered packets once its client read it.
    pub stalled_reader_alive: bool,
    pub first_error: Option<String>,
}

/// One storage engine layout in the engine comparison.
#[derive(Debug, Clone, Serialize)]
pub struct EngineResult {
    pub engine: String,
    pub packets: u64,
    /// Packets per durable (fdatasync'd) commit.
    pub batch: usize,
    pub write_per_second: f64,
    pub write_mb_per_second: f64,
    pub read_per_second: f64,
    /// Packets read back that were missing, out of order or different from what was written.
    pub read_errors: u64,
    /// Apparent size of the engine's files.
    pub file_mib: f64,
    /// Disk blocks allocated to them.
    pub disk_mib: f64,
}

/// A goal from the issue and whether the figure met it.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

/// Everything one command measured: one run, or the medians of several.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub runs: usize,
    pub load: Vec<LoadResult>,
    pub fanout: Vec<FanoutResult>,
    pub recovery: Option<RecoveryResult>,
    /// Packet writes against the transport's and the disk's limits.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub write: Vec<WriteResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replay: Vec<ReplayResult>,
    /// Live packet latency to readers (the fan-out result shape).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub live: Vec<FanoutResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub engines: Vec<EngineResult>,
    pub goals: Vec<Goal>,
    /// The runs the medians were taken from (JSON only), to see their spread.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_run: Vec<Report>,
}

impl Report {
    /// Correctness problems (never timings): failed requests, missed, reordered or duplicated
    /// notifications, sessions lost across a restart.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for load in &self.load {
            if load.errors > 0 {
                problems.push(format!(
                    "{} ({}): {} errors, first: {}",
                    load.scenario,
                    load.pace,
                    load.errors,
                    load.first_error.as_deref().unwrap_or("")
                ));
            }
        }
        for f in self.fanout.iter().chain(&self.live) {
            let wrong = f.write_errors + f.missed + f.reordered + f.duplicates + f.unexpected;
            if wrong + f.stream_errors > 0 || f.delivered != f.expected {
                problems.push(format!(
                    "{} fan-out: {} write errors, {} missed, {} reordered, {} duplicates, \
                     {} unexpected, {} stream errors; first: {}",
                    f.system,
                    f.write_errors,
                    f.missed,
                    f.reordered,
                    f.duplicates,
                    f.unexpected,
                    f.stream_errors,
                    f.first_error.as_deref().unwrap_or("")
                ));
            }
        }
        for w in &self.write {
            if w.errors + w.lost > 0 {
                problems.push(format!(
                    "{} writes: {} failed calls, {} packets lost; first: {}",
                    w.system,
                    w.errors,
                    w.lost,
                    w.first_error.as_deref().unwrap_or("")
                ));
            }
        }
        for r in &self.replay {
            if r.missing + r.reordered + r.duplicates + r.unexpected > 0 || r.received < r.stored {
                problems.push(format!(
                    "replay ({}): {} of {} packets received, {} missing, {} reordered, \
                     {} duplicates, {} unexpected; first: {}",
                    r.label,
                    r.received,
                    r.stored,
                    r.missing,
                    r.reordered,
                    r.duplicates,
                    r.unexpected,
                    r.first_error.as_deref().unwrap_or("")
                ));
            }
        }
        if let Some(m) = &self.memory
            && (m.stalled_write_errors > 0 || !m.stalled_reader_alive)
        {
            problems.push(format!(
                "memory: {} failed writes, stalled reader alive: {}; first: {}",
                m.stalled_write_errors,
                m.stalled_reader_alive,
                m.first_error.as_deref().unwrap_or("")
            ));
        }
        for e in &self.engines {
            if e.read_errors > 0 {
                problems.push(format!(
                    "engines ({}): {} packets read back wrong",
                    e.engine, e.read_errors
                ));
            }
        }
        if let Some(r) = &self.recovery
            && (r.sessions_at_ready != r.sessions || r.sample_failures > 0)
        {
            problems.push(format!(
                "recovery: {} sessions written, {} read at restart, {} sampled sessions wrong",
                r.sessions, r.sessions_at_ready, r.sample_failures
            ));
        }
        problems
    }

    /// The medians of several runs of the same command: each figure separately, rows matched
    /// by position (every run measures the same rows in the same order).
    pub fn median(runs: &[Report]) -> Report {
        let Some(first) = runs.first() else {
            return Report::default();
        };
        let load = (0..first.load.len())
            .map(|i| {
                median_load(
                    &runs
                        .iter()
                        .filter_map(|r| r.load.get(i))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let fanout = (0..first.fanout.len())
            .map(|i| {
                median_fanout(
                    &runs
                        .iter()
                        .filter_map(|r| r.fanout.get(i))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let recoveries: Vec<_> = runs.iter().filter_map(|r| r.recovery.as_ref()).collect();
        let write = (0..first.write.len())
            .map(|i| {
                median_write(
                    &runs
                        .iter()
                        .filter_map(|r| r.write.get(i))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let replay = (0..first.replay.len())
            .map(|i| {
                median_replay(
                    &runs
                        .iter()
                        .filter_map(|r| r.replay.get(i))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let live = (0..first.live.len())
            .map(|i| {
                median_fanout(
                    &runs
                        .iter()
                        .filter_map(|r| r.live.get(i))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let memories: Vec<_> = runs.iter().filter_map(|r| r.memory.as_ref()).collect();
        let engines = (0..first.engines.len())
            .map(|i| {
                median_engine(
                    &runs
                        .iter()
                        .filter_map(|r| r.engines.get(i))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        Report {
            runs: runs.len(),
            load,
            fanout,
            recovery: (!recoveries.is_empty()).then(|| median_recovery(&recoveries)),
            write,
            replay,
            live,
            memory: (!memories.is_empty()).then(|| median_memory(&memories)),
            engines,
            goals: Vec::new(),
            per_run: if runs.len() > 1 {
                runs.to_vec()
            } else {
                Vec::new()
            },
        }
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let of_runs = if self.runs > 1 {
            format!(" (medians of {} runs)", self.runs)
        } else {
            String::new()
        };
        if !self.load.is_empty() {
            let _ = writeln!(out, "### Load{of_runs}\n");
            out.push_str(&load_table(&self.load));
            out.push('\n');
        }
        if !self.fanout.is_empty() {
            let _ = writeln!(out, "### Notification fan-out{of_runs}\n");
            out.push_str(&fanout_table(&self.fanout));
            out.push('\n');
        }
        if let Some(recovery) = &self.recovery {
            let _ = writeln!(out, "### Recovery and memory{of_runs}\n");
            out.push_str(&recovery_table(recovery));
            out.push('\n');
        }
        if !self.write.is_empty() {
            let _ = writeln!(out, "### Packet writes{of_runs}\n");
            out.push_str(&write_table(&self.write));
            out.push('\n');
        }
        if !self.replay.is_empty() {
            let _ = writeln!(out, "### Replay{of_runs}\n");
            out.push_str(&replay_table(&self.replay));
            out.push('\n');
        }
        if !self.live.is_empty() {
            let _ = writeln!(out, "### Live packets to readers{of_runs}\n");
            // The fan-out's columns, named for packets.
            let table = fanout_table(&self.live)
                .replacen("| subscribers |", "| readers |", 1)
                .replacen("offered writes/s", "offered packets/s", 1)
                .replacen("send→recv", "due→recv", 1)
                .replacen("CPU µs/notification", "CPU µs/packet received", 1);
            out.push_str(&table);
            out.push('\n');
        }
        if let Some(memory) = &self.memory {
            let _ = writeln!(out, "### Reader memory{of_runs}\n");
            out.push_str(&memory_table(memory));
            out.push('\n');
        }
        if !self.engines.is_empty() {
            let _ = writeln!(out, "### Storage engines{of_runs}\n");
            out.push_str(&engine_table(&self.engines));
            out.push('\n');
        }
        if !self.goals.is_empty() {
            let _ = writeln!(out, "### Goals\n");
            out.push_str(&goal_table(&self.goals));
            out.push('\n');
        }
        out
    }
}

fn optional(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

fn load_table(rows: &[LoadResult]) -> String {
    let mut out = String::from(
        "| scenario | pace | conc. | conns | s | requests | errors | req/s | × health | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | CPU µs/req server (writer) + client | RSS MiB before → after |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let unsent = if r.unsent > 0 {
            format!(" ({} unsent)", r.unsent)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {}{unsent} | {} | {} | {:.1} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} → {} |",
            r.scenario,
            r.pace,
            r.concurrency,
            r.connections,
            r.seconds,
            r.requests,
            r.errors,
            r.throughput,
            optional(r.vs_health, 2),
            r.latency.p50,
            r.latency.p90,
            r.latency.p99,
            r.latency.p999,
            r.latency.max,
            cpu_cell(&r.cpu),
            optional(r.rss_before_mib, 0),
            optional(r.rss_after_mib, 0),
        );
    }
    out
}

fn cpu_cell(cpu: &CpuPerRequest) -> String {
    let writer = cpu
        .writer_us
        .map_or_else(String::new, |w| format!(" ({w:.0})"));
    format!(
        "{}{writer} + {}",
        optional(cpu.server_us, 0),
        optional(cpu.client_us, 0)
    )
}

fn fanout_table(rows: &[FanoutResult]) -> String {
    let mut out = String::from(
        "| system | subscribers | offered writes/s | writes (unsent) | delivered / expected | missed | reordered | ack→recv p50 ms | p90 | p99 | p99.9 | max | send→recv p50 ms | p99 | before ack | write p50 ms | write p99 ms | writer CPU µs/write | CPU µs/notification server + client | RSS MiB before → after |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} ({}) | {} / {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.2} | {:.2} | {} | {} + {} | {} → {} |",
            r.system,
            r.subscribers,
            r.rate,
            r.writes,
            r.unsent,
            r.delivered,
            r.expected,
            r.missed,
            r.reordered,
            r.from_ack.p50,
            r.from_ack.p90,
            r.from_ack.p99,
            r.from_ack.p999,
            r.from_ack.max,
            r.from_send.p50,
            r.from_send.p99,
            r.before_ack * 100.0,
            r.write_latency.p50,
            r.write_latency.p99,
            optional(r.writer_us_per_write, 0),
            optional(r.cpu.server_us, 1),
            optional(r.cpu.client_us, 1),
            optional(r.rss_before_mib, 0),
            optional(r.rss_after_mib, 0),
        );
    }
    out
}

fn recovery_table(r: &RecoveryResult) -> String {
    let mut out = String::from(
        "| sessions | fill creates/s | store MiB | stop s | ready s (empty store) | ready s (filled) | sessions read | RSS MiB empty | RSS MiB filled | RSS MiB restarted | bytes/session |\n\
         |--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let _ = writeln!(
        out,
        "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        r.sessions,
        r.fill_rate,
        r.store_mib,
        r.stop_seconds,
        r.empty_ready_seconds,
        r.ready_seconds,
        r.sessions_at_ready,
        r.rss_empty_mib,
        r.rss_filled_mib,
        r.rss_restarted_mib,
        r.bytes_per_session,
    );
    out
}

fn write_table(rows: &[WriteResult]) -> String {
    let mut out = String::from(
        "| system | streams | packets/request | packets/call | packets/commit | s | packets | errors | packets/s | MB/s | Pitwall ÷ this | call p50 ms | p99 ms | CPU µs/packet server (writer) + client | RSS MiB before → after |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let dash = |n: usize| {
            if n == 0 {
                "–".to_owned()
            } else {
                n.to_string()
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {:.0} | {:.1} | {} | {:.2} | {:.2} | {} | {} → {} |",
            r.system,
            dash(r.streams),
            r.packets_per_request,
            dash(r.packets_per_call),
            optional(r.packets_per_commit, 0),
            r.seconds,
            r.packets,
            r.errors + r.lost,
            r.packets_per_second,
            r.mb_per_second,
            optional(r.pitwall_ratio, 2),
            r.latency.p50,
            r.latency.p99,
            cpu_cell(&r.cpu),
            optional(r.rss_before_mib, 0),
            optional(r.rss_after_mib, 0),
        );
    }
    out
}

fn replay_table(rows: &[ReplayResult]) -> String {
    let mut out = String::from(
        "| server | packets stored | fill packets/s | received | responses | missing | reordered | s | packets/s | MB/s | CPU µs/packet server + client | RSS MiB before → after | store MiB |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.2} | {:.0} | {:.1} | {} + {} | {} → {} | {} |",
            r.label,
            r.stored,
            r.fill_rate,
            r.received,
            r.responses,
            r.missing,
            r.reordered + r.duplicates + r.unexpected,
            r.seconds,
            r.packets_per_second,
            r.mb_per_second,
            optional(r.cpu.server_us, 2),
            optional(r.cpu.client_us, 2),
            optional(r.rss_before_mib, 0),
            optional(r.rss_after_mib, 0),
            optional(r.store_mib, 0),
        );
    }
    out
}

fn memory_table(m: &MemoryResult) -> String {
    let mut out = String::from(
        "| RSS MiB idle | connections | bytes/connection | readers | bytes/reader | stalled: MiB written | packets/s | RSS MiB before → peak → after | reader alive |\n\
         |--:|--:|--:|--:|--:|--:|--:|--:|---|\n",
    );
    let _ = writeln!(
        out,
        "| {:.0} | {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} → {:.0} → {:.0} | {} |",
        m.rss_idle_mib,
        m.connections,
        m.bytes_per_connection,
        m.readers,
        m.bytes_per_reader,
        crate::process::mib(m.stalled_written_bytes),
        m.stalled_write_rate,
        m.rss_stalled_before_mib,
        m.rss_stalled_peak_mib,
        m.rss_stalled_after_mib,
        if m.stalled_reader_alive {
            "yes"
        } else {
            "**no**"
        },
    );
    out
}

fn engine_table(rows: &[EngineResult]) -> String {
    let mut out = String::from(
        "| engine, layout | packets | packets/commit | write packets/s | write MB/s | read packets/s | read errors | file MiB | disk MiB |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.1} | {:.0} | {} | {:.0} | {:.0} |",
            r.engine,
            r.packets,
            r.batch,
            r.write_per_second,
            r.write_mb_per_second,
            r.read_per_second,
            r.read_errors,
            r.file_mib,
            r.disk_mib,
        );
    }
    out
}

fn goal_table(goals: &[Goal]) -> String {
    let mut out = String::from("| goal | measured | met |\n|---|---|---|\n");
    for g in goals {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            g.goal,
            g.measured,
            if g.met { "yes" } else { "**no**" }
        );
    }
    out
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn median_option(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let present: Vec<f64> = values.into_iter().flatten().collect();
    (!present.is_empty()).then(|| median(present))
}

fn median_count(values: impl IntoIterator<Item = u64>) -> u64 {
    median(values.into_iter().map(|v| v as f64)).round() as u64
}

fn median_percentiles(values: &[Percentiles]) -> Percentiles {
    Percentiles {
        p50: median(values.iter().map(|p| p.p50)),
        p90: median(values.iter().map(|p| p.p90)),
        p99: median(values.iter().map(|p| p.p99)),
        p999: median(values.iter().map(|p| p.p999)),
        max: median(values.iter().map(|p| p.max)),
    }
}

fn median_load(rows: &[&LoadResult]) -> LoadResult {
    let first = rows[0];
    LoadResult {
        scenario: first.scenario.clone(),
        // Open-loop rates follow each run's own maximum, so they differ slightly.
        pace: if rows.iter().all(|r| r.pace == first.pace) {
            first.pace.clone()
        } else if first.pace.starts_with("open") {
            let rate = median(rows.iter().filter_map(|r| {
                r.pace
                    .strip_prefix("open ")
                    .and_then(|p| p.strip_suffix("/s"))
                    .and_then(|p| p.parse().ok())
            }));
            format!("open {rate:.0}/s")
        } else {
            first.pace.clone()
        },
        concurrency: first.concurrency,
        connections: first.connections,
        requests: median_count(rows.iter().map(|r| r.requests)),
        errors: rows.iter().map(|r| r.errors).max().unwrap_or(0),
        unsent: median_count(rows.iter().map(|r| r.unsent)),
        seconds: median(rows.iter().map(|r| r.seconds)),
        throughput: median(rows.iter().map(|r| r.throughput)),
        vs_health: median_option(rows.iter().map(|r| r.vs_health)),
        latency: median_percentiles(&rows.iter().map(|r| r.latency).collect::<Vec<_>>()),
        cpu: CpuPerRequest {
            server_us: median_option(rows.iter().map(|r| r.cpu.server_us)),
            writer_us: median_option(rows.iter().map(|r| r.cpu.writer_us)),
            client_us: median_option(rows.iter().map(|r| r.cpu.client_us)),
        },
        rss_before_mib: median_option(rows.iter().map(|r| r.rss_before_mib)),
        rss_after_mib: median_option(rows.iter().map(|r| r.rss_after_mib)),
        first_error: rows.iter().find_map(|r| r.first_error.clone()),
    }
}

fn median_fanout(rows: &[&FanoutResult]) -> FanoutResult {
    let first = rows[0];
    // Correctness counts are summed over runs, not medianed: one miss in any run is a miss.
    let sum = |f: fn(&FanoutResult) -> u64| rows.iter().map(|r| f(r)).sum::<u64>();
    FanoutResult {
        system: first.system.clone(),
        subscribers: first.subscribers,
        rate: first.rate,
        writes: median_count(rows.iter().map(|r| r.writes)),
        unsent: median_count(rows.iter().map(|r| r.unsent)),
        write_errors: sum(|r| r.write_errors),
        expected: median_count(rows.iter().map(|r| r.expected)),
        delivered: median_count(rows.iter().map(|r| r.delivered)),
        missed: sum(|r| r.missed),
        reordered: sum(|r| r.reordered),
        duplicates: sum(|r| r.duplicates),
        unexpected: sum(|r| r.unexpected),
        stream_errors: sum(|r| r.stream_errors),
        from_ack: median_percentiles(&rows.iter().map(|r| r.from_ack).collect::<Vec<_>>()),
        from_send: median_percentiles(&rows.iter().map(|r| r.from_send).collect::<Vec<_>>()),
        before_ack: median(rows.iter().map(|r| r.before_ack)),
        write_latency: median_percentiles(
            &rows.iter().map(|r| r.write_latency).collect::<Vec<_>>(),
        ),
        writer_us_per_write: median_option(rows.iter().map(|r| r.writer_us_per_write)),
        cpu: CpuPerRequest {
            server_us: median_option(rows.iter().map(|r| r.cpu.server_us)),
            writer_us: median_option(rows.iter().map(|r| r.cpu.writer_us)),
            client_us: median_option(rows.iter().map(|r| r.cpu.client_us)),
        },
        rss_before_mib: median_option(rows.iter().map(|r| r.rss_before_mib)),
        rss_after_mib: median_option(rows.iter().map(|r| r.rss_after_mib)),
        first_error: rows.iter().find_map(|r| r.first_error.clone()),
    }
}

fn median_recovery(rows: &[&RecoveryResult]) -> RecoveryResult {
    let m = |f: fn(&RecoveryResult) -> f64| median(rows.iter().map(|r| f(r)));
    RecoveryResult {
        sessions: rows[0].sessions,
        fill_rate: m(|r| r.fill_rate),
        store_mib: m(|r| r.store_mib),
        stop_seconds: m(|r| r.stop_seconds),
        ready_seconds: m(|r| r.ready_seconds),
        empty_ready_seconds: m(|r| r.empty_ready_seconds),
        // The worst run: a restart that lost sessions must show.
        sessions_at_ready: rows.iter().map(|r| r.sessions_at_ready).min().unwrap_or(0),
        rss_empty_mib: m(|r| r.rss_empty_mib),
        rss_filled_mib: m(|r| r.rss_filled_mib),
        rss_restarted_mib: m(|r| r.rss_restarted_mib),
        bytes_per_session: m(|r| r.bytes_per_session),
        sample_failures: rows.iter().map(|r| r.sample_failures).sum(),
    }
}

fn median_cpu(values: &[CpuPerRequest]) -> CpuPerRequest {
    CpuPerRequest {
        server_us: median_option(values.iter().map(|c| c.server_us)),
        writer_us: median_option(values.iter().map(|c| c.writer_us)),
        client_us: median_option(values.iter().map(|c| c.client_us)),
    }
}

fn median_write(rows: &[&WriteResult]) -> WriteResult {
    let first = rows[0];
    let m = |f: fn(&WriteResult) -> f64| median(rows.iter().map(|r| f(r)));
    WriteResult {
        system: first.system.clone(),
        streams: first.streams,
        // The disk's row at Pitwall's commit size has a batch of its own in each run.
        packets_per_request: median_count(rows.iter().map(|r| r.packets_per_request as u64))
            as usize,
        packets_per_call: first.packets_per_call,
        packets_per_commit: median_option(rows.iter().map(|r| r.packets_per_commit)),
        seconds: m(|r| r.seconds),
        packets: median_count(rows.iter().map(|r| r.packets)),
        errors: rows.iter().map(|r| r.errors).sum(),
        lost: rows.iter().map(|r| r.lost).sum(),
        packets_per_second: m(|r| r.packets_per_second),
        mb_per_second: m(|r| r.mb_per_second),
        pitwall_ratio: median_option(rows.iter().map(|r| r.pitwall_ratio)),
        latency: median_percentiles(&rows.iter().map(|r| r.latency).collect::<Vec<_>>()),
        cpu: median_cpu(&rows.iter().map(|r| r.cpu).collect::<Vec<_>>()),
        rss_before_mib: median_option(rows.iter().map(|r| r.rss_before_mib)),
        rss_after_mib: median_option(rows.iter().map(|r| r.rss_after_mib)),
        first_error: rows.iter().find_map(|r| r.first_error.clone()),
    }
}

fn median_replay(rows: &[&ReplayResult]) -> ReplayResult {
    let first = rows[0];
    let m = |f: fn(&ReplayResult) -> f64| median(rows.iter().map(|r| f(r)));
    let sum = |f: fn(&ReplayResult) -> u64| rows.iter().map(|r| f(r)).sum::<u64>();
    ReplayResult {
        label: first.label.clone(),
        stored: first.stored,
        fill_rate: m(|r| r.fill_rate),
        // The worst run: a lost packet in any run must show.
        received: rows.iter().map(|r| r.received).min().unwrap_or(0),
        responses: median_count(rows.iter().map(|r| r.responses)),
        seconds: m(|r| r.seconds),
        packets_per_second: m(|r| r.packets_per_second),
        mb_per_second: m(|r| r.mb_per_second),
        missing: sum(|r| r.missing),
        reordered: sum(|r| r.reordered),
        duplicates: sum(|r| r.duplicates),
        unexpected: sum(|r| r.unexpected),
        cpu: median_cpu(&rows.iter().map(|r| r.cpu).collect::<Vec<_>>()),
        rss_before_mib: median_option(rows.iter().map(|r| r.rss_before_mib)),
        rss_after_mib: median_option(rows.iter().map(|r| r.rss_after_mib)),
        store_mib: median_option(rows.iter().map(|r| r.store_mib)),
        first_error: rows.iter().find_map(|r| r.first_error.clone()),
    }
}

fn median_memory(rows: &[&MemoryResult]) -> MemoryResult {
    let first = rows[0];
    let m = |f: fn(&MemoryResult) -> f64| median(rows.iter().map(|r| f(r)));
    MemoryResult {
        rss_idle_mib: m(|r| r.rss_idle_mib),
        connections: first.connections,
        bytes_per_connection: m(|r| r.bytes_per_connection),
        readers: first.readers,
        bytes_per_reader: m(|r| r.bytes_per_reader),
        stalled_written_bytes: first.stalled_written_bytes,
        stalled_write_rate: m(|r| r.stalled_write_rate),
        stalled_write_errors: rows.iter().map(|r| r.stalled_write_errors).sum(),
        rss_stalled_before_mib: m(|r| r.rss_stalled_before_mib),
        rss_stalled_peak_mib: m(|r| r.rss_stalled_peak_mib),
        rss_stalled_after_mib: m(|r| r.rss_stalled_after_mib),
        stalled_reader_alive: rows.iter().all(|r| r.stalled_reader_alive),
        first_error: rows.iter().find_map(|r| r.first_error.clone()),
    }
}

fn median_engine(rows: &[&EngineResult]) -> EngineResult {
    let first = rows[0];
    let m = |f: fn(&EngineResult) -> f64| median(rows.iter().map(|r| f(r)));
    EngineResult {
        engine: first.engine.clone(),
        packets: first.packets,
        batch: first.batch,
        write_per_second: m(|r| r.write_per_second),
        write_mb_per_second: m(|r| r.write_mb_per_second),
        read_per_second: m(|r| r.read_per_second),
        read_errors: rows.iter().map(|r| r.read_errors).sum(),
        file_mib: m(|r| r.file_mib),
        disk_mib: m(|r| r.disk_mib),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn open_loop_rates_are_medianed_in_the_label() {
        let row = |pace: &str| LoadResult {
            scenario: "create".into(),
            pace: pace.into(),
            concurrency: 1,
            connections: 1,
            requests: 1,
            errors: 0,
            unsent: 0,
            seconds: 1.0,
            throughput: 1.0,
            vs_health: None,
            latency: Percentiles::default(),
            cpu: CpuPerRequest::default(),
            rss_before_mib: None,
            rss_after_mib: None,
            first_error: None,
        };
        let (a, b, c) = (row("open 100/s"), row("open 300/s"), row("open 200/s"));
        assert_eq!(median_load(&[&a, &b, &c]).pace, "open 200/s");
    }
}
