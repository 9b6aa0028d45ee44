//! `all` and `etcd`: the measurements of the issue in one command, repeated and reduced to
//! medians, and held against the goals.

use crate::connection;
use crate::dataplane::{self, LiveArgs, MemoryArgs, ReplayArgs, WriteArgs};
use crate::engines::{self, EnginesArgs};
use crate::etcd::{self, EtcdArgs, EtcdTarget};
use crate::fanout::{self, FanoutArgs};
use crate::recovery::{self, RecoveryArgs};
use crate::report::{FanoutResult, Goal, LoadResult, Report, WriteResult};
use crate::scenario::{self, Scenario, Sessions, Shape};
use crate::server::{ServerArgs, Target};

#[derive(Debug, Clone, clap::Args)]
pub struct AllArgs {
    /// Tiny counts and short runs: checks that everything works, measures nothing.
    #[arg(long)]
    pub quick: bool,
    /// Runs of everything; the figures are the medians.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Leave out the etcd peer.
    #[arg(long)]
    pub no_etcd: bool,
    /// Leave out the session service's benchmarks (load, fan-out, recovery, the etcd peer).
    #[arg(long)]
    pub no_sessions: bool,
    /// Leave out the data plane (packet writes, replay, live readers, reader memory).
    #[arg(long)]
    pub no_dataplane: bool,
    /// Leave out the storage engine comparison.
    #[arg(long)]
    pub no_engines: bool,
    /// Seconds each load scenario is measured for [default: 8, quick 0.5].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Sessions in the store for the recovery measurement [default: 1,000,000, quick 2,000].
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Notification subscribers [default: 1,000, quick 20].
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Packets stored for the replay [default: 1,000,000, quick 2,000].
    #[arg(long)]
    pub replay_packets: Option<usize>,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// The sizes of one run of everything.
struct Preset {
    shape: Shape,
    fanout: FanoutArgs,
    recovery: RecoveryArgs,
    write: WriteArgs,
    replay: ReplayArgs,
    live: LiveArgs,
    memory: MemoryArgs,
    engines: EnginesArgs,
}

impl AllArgs {
    fn preset(&self) -> Preset {
        let (duration, warmup, concurrency, sessions, subscribers, create_rate, seconds) =
            if self.quick {
                (0.5, 0.2, 8, 2_000, 20, 200.0, 1.0)
            } else {
                (8.0, 1.0, 64, 1_000_000, 1_000, 1_000.0, 5.0)
            };
        Preset {
            shape: Shape {
                concurrency,
                connections: 4,
                duration: self.duration.unwrap_or(duration),
                warmup,
                rate: None,
            },
            fanout: FanoutArgs {
                subscribers: self.subscribers.unwrap_or(subscribers),
                create_rate,
                seconds,
                subscriber_connections: 4,
                writers: 16,
            },
            recovery: RecoveryArgs {
                sessions: self.sessions.unwrap_or(sessions),
                fill_concurrency: if self.quick { 16 } else { 256 },
                fill_connections: 4,
                keep_data_dir: None,
            },
            write: WriteArgs {
                streams: if self.quick { 2 } else { 8 },
                packets_per_request: if self.quick { 16 } else { 64 },
                packets_per_call: if self.quick { 64 } else { 1024 },
                connections: None,
                duration: self
                    .duration
                    .unwrap_or(if self.quick { 0.3 } else { duration }),
                warmup: if self.quick { 0.1 } else { warmup },
                disk_batch: None,
            },
            replay: ReplayArgs {
                packets: self
                    .replay_packets
                    .unwrap_or(if self.quick { 2_000 } else { 1_000_000 }),
                fill_streams: if self.quick { 2 } else { 8 },
                no_batching_run: false,
            },
            live: LiveArgs {
                readers: if self.quick { 2 } else { 10 },
                rate: if self.quick { 200.0 } else { 10_000.0 },
                seconds: if self.quick { 0.5 } else { 10.0 },
                writers: if self.quick { 4 } else { 128 },
            },
            memory: MemoryArgs {
                connections: if self.quick { 20 } else { 1_000 },
                readers: if self.quick { 20 } else { 1_000 },
                stalled_mib: if self.quick { 4 } else { 1_024 },
                settle_ms: if self.quick { 50 } else { 500 },
            },
            engines: EnginesArgs {
                packets: if self.quick { 2_000 } else { 400_000 },
                batch: if self.quick { 64 } else { 512 },
            },
        }
    }
}

/// Everything, `runs` times; the report holds the medians and the goals.
pub async fn run_all(args: &AllArgs) -> anyhow::Result<Report> {
    let preset = args.preset();
    let with_etcd = !args.no_sessions && !args.no_etcd && args.etcd.available();
    if !args.no_sessions && !args.no_etcd && !with_etcd {
        eprintln!(
            "etcd: {} not found; the peer comparison is left out (install etcd-server)",
            args.etcd.etcd_bin.display()
        );
    }
    let runs = args.runs.max(1);
    let mut reports = Vec::with_capacity(runs);
    for run in 1..=runs {
        eprintln!("run {run}/{runs}");
        reports.push(run_once(args, &preset, with_etcd).await?);
    }
    let mut report = Report::median(&reports);
    report.goals = goals(&report);
    Ok(report)
}

async fn run_once(args: &AllArgs, preset: &Preset, with_etcd: bool) -> anyhow::Result<Report> {
    let mut report = Report {
        runs: 1,
        ..Report::default()
    };
    if !args.no_sessions {
        run_sessions(args, preset, with_etcd, &mut report).await?;
    }
    if !args.no_dataplane {
        run_dataplane(args, preset, &mut report).await?;
    }
    if !args.no_engines {
        eprintln!("  engines: {} packets each", preset.engines.packets);
        report.engines = engines::run(&preset.engines).await?;
    }
    Ok(report)
}

/// The session service's benchmarks: load, fan-out, recovery, and the etcd peer.
async fn run_sessions(
    args: &AllArgs,
    preset: &Preset,
    with_etcd: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let target = Target::start(&args.server).await?;
    eprintln!("  load: {}", names(&Scenario::ALL));
    report.load = scenario::run_load(&target, &preset.shape, &Scenario::ALL).await?;
    let create_max = find_load(&report.load, "create", false).map_or(0.0, |r| r.throughput);
    if create_max > 0.0 {
        let half = Shape {
            rate: Some((create_max / 2.0).round().max(1.0)),
            ..preset.shape.clone()
        };
        eprintln!("  load: create, open loop at {:.0}/s", create_max / 2.0);
        let channels = connection::connect(target.url(), half.connections).await?;
        let open = scenario::measure(
            &target,
            &channels,
            &half,
            Scenario::Create,
            &mut Sessions::default(),
        )
        .await?;
        report.load.push(open);
    }
    eprintln!("  fan-out: {} subscribers", preset.fanout.subscribers);
    report
        .fanout
        .push(fanout::run_pitwall(&target, &preset.fanout).await?);
    target.stop().await?;
    if args.server.server.is_none() {
        eprintln!("  recovery: {} sessions", preset.recovery.sessions);
        report.recovery = Some(recovery::run(&args.server, &preset.recovery).await?);
    }
    if with_etcd {
        let (put, watch) = run_etcd(&args.etcd, &preset.shape, &preset.fanout).await?;
        report.load.push(put);
        report.fanout.push(watch);
    }
    Ok(())
}

/// The data plane's benchmarks, each on a server of its own (a fresh store, its own memory).
async fn run_dataplane(args: &AllArgs, preset: &Preset, report: &mut Report) -> anyhow::Result<()> {
    let target = Target::start(&args.server).await?;
    report.write = dataplane::run_write(&target, &preset.write).await?;
    target.stop().await?;
    let target = Target::start(&args.server).await?;
    eprintln!(
        "  live: {} readers, {:.0} packets/s",
        preset.live.readers, preset.live.rate
    );
    report
        .live
        .push(dataplane::run_live(&target, &preset.live).await?);
    target.stop().await?;
    let target = Target::start(&args.server).await?;
    if target.pid().is_some() {
        eprintln!(
            "  memory: {} connections, {} readers, {} MiB past a stalled reader",
            preset.memory.connections, preset.memory.readers, preset.memory.stalled_mib
        );
        report.memory = Some(dataplane::run_memory(&target, &preset.memory).await?);
    }
    target.stop().await?;
    report.replay = dataplane::run_replay(&args.server, &preset.replay).await?;
    Ok(())
}

/// The peer on its own: Pitwall's create and fan-out, then etcd's put and watch, same shape.
pub async fn run_peer(
    server: &ServerArgs,
    etcd_args: &EtcdArgs,
    shape: &Shape,
    fanout_args: &FanoutArgs,
) -> anyhow::Result<Report> {
    let target = Target::start(server).await?;
    eprintln!("  pitwall: create, fan-out");
    let mut report = Report {
        runs: 1,
        load: scenario::run_load(&target, shape, &[Scenario::Create]).await?,
        fanout: vec![fanout::run_pitwall(&target, fanout_args).await?],
        ..Report::default()
    };
    target.stop().await?;
    let (put, watch) = run_etcd(etcd_args, shape, fanout_args).await?;
    report.load.push(put);
    report.fanout.push(watch);
    report.goals = goals(&report);
    Ok(report)
}

async fn run_etcd(
    args: &EtcdArgs,
    shape: &Shape,
    fanout_args: &FanoutArgs,
) -> anyhow::Result<(LoadResult, FanoutResult)> {
    eprintln!("  etcd: put, watch fan-out");
    let etcd = EtcdTarget::start(args).await?;
    let closed = Shape {
        rate: None,
        ..shape.clone()
    };
    let put = etcd::put_load(&etcd, &closed).await?;
    let watch = etcd::watch_fanout(&etcd, fanout_args).await?;
    etcd.stop().await?;
    Ok((put, watch))
}

fn names(scenarios: &[Scenario]) -> String {
    scenarios
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn find_load<'a>(rows: &'a [LoadResult], scenario: &str, open: bool) -> Option<&'a LoadResult> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.pace.starts_with("open") == open)
}

fn find_fanout<'a>(rows: &'a [FanoutResult], system: &str) -> Option<&'a FanoutResult> {
    rows.iter().find(|r| r.system == system)
}

/// The goals, for the figures the report has.
pub fn goals(report: &Report) -> Vec<Goal> {
    let mut goals = Vec::new();
    let create = find_load(&report.load, "create", false);
    if let Some(create) = create
        && let Some(ratio) = create.vs_health
    {
        goals.push(Goal {
            goal: format!(
                "durable create at {} streams ≥ 0.7 × health-check rate",
                create.concurrency
            ),
            measured: format!(
                "{:.0}/s = {ratio:.2} × health ({} streams)",
                create.throughput, create.concurrency
            ),
            met: ratio >= 0.7,
        });
    }
    if let Some(open) = find_load(&report.load, "create", true) {
        goals.push(Goal {
            goal: "create p99 ≤ 5 ms at half the maximum rate (open loop)".to_owned(),
            measured: format!("p99 {:.2} ms at {}", open.latency.p99, open.pace),
            met: open.latency.p99 <= 5.0 && open.unsent == 0,
        });
    }
    let pitwall_fanout = find_fanout(&report.fanout, "pitwall");
    if let Some(f) = pitwall_fanout {
        let wrong = f.missed + f.reordered + f.duplicates;
        goals.push(Goal {
            goal: format!(
                "fan-out to {} subscribers at {:.0} creates/s: p99 ≤ 50 ms, none missed or reordered",
                f.subscribers, f.rate
            ),
            measured: format!(
                "ack→received p99 {:.2} ms; {} missed, {} reordered; {} of the writes not sent in time",
                f.from_ack.p99, f.missed, f.reordered, f.unsent
            ),
            met: f.from_ack.p99 <= 50.0
                && wrong == 0
                && f.delivered == f.expected
                && f.unsent == 0,
        });
    }
    if let Some(r) = &report.recovery {
        goals.push(Goal {
            goal: format!("restart with {} sessions: ready ≤ 5 s", r.sessions),
            measured: format!("{:.2} s from spawn to ready", r.ready_seconds),
            met: r.ready_seconds <= 5.0 && r.sessions_at_ready == r.sessions,
        });
        goals.push(Goal {
            goal: "≤ 1.5 KiB RSS per session".to_owned(),
            measured: format!("{:.0} bytes per session", r.bytes_per_session),
            met: r.bytes_per_session <= 1536.0,
        });
    }
    if let (Some(create), Some(put)) = (create, find_load(&report.load, "etcd put", false)) {
        let ratio = create.throughput / put.throughput.max(f64::MIN_POSITIVE);
        goals.push(Goal {
            goal: "≥ 2 × etcd's durable write rate, same concurrency and payload".to_owned(),
            measured: format!(
                "Pitwall {:.0}/s vs etcd {:.0}/s = {ratio:.2}×",
                create.throughput, put.throughput
            ),
            met: ratio >= 2.0,
        });
    }
    dataplane_goals(report, &mut goals);
    if let (Some(pitwall), Some(etcd)) = (pitwall_fanout, find_fanout(&report.fanout, "etcd")) {
        goals.push(Goal {
            goal: "notification p99 no worse than etcd's watch p99".to_owned(),
            measured: format!(
                "Pitwall {:.2} ms vs etcd {:.2} ms (ack→received) = {:.2}×",
                pitwall.from_ack.p99,
                etcd.from_ack.p99,
                pitwall.from_ack.p99 / etcd.from_ack.p99.max(f64::MIN_POSITIVE)
            ),
            met: pitwall.from_ack.p99 <= etcd.from_ack.p99,
        });
    }
    goals
}

fn find_write<'a>(rows: &'a [WriteResult], system: &str) -> Option<&'a WriteResult> {
    rows.iter().find(|r| r.system == system)
}

/// Peak RSS growth allowed while the stalled reader's data source is written: the packet
/// store's page cache (64 MiB) and the writes in flight, not the bytes written.
const STALLED_GROWTH_MIB: f64 = 128.0;

/// The data plane's goals (issue 12), for the figures the report has.
fn dataplane_goals(report: &Report, goals: &mut Vec<Goal>) {
    let write = find_write(&report.write, "pitwall");
    if let Some(w) = write {
        goals.push(Goal {
            goal: format!(
                "durable 1 KiB packet writes, {} streams: ≥ 100,000 packets/s",
                w.streams
            ),
            measured: format!(
                "{:.0} packets/s ({:.1} MB/s)",
                w.packets_per_second, w.mb_per_second
            ),
            met: w.packets_per_second >= 100_000.0 && w.errors == 0,
        });
        if let Some(noop) = find_write(&report.write, "no-op RPC") {
            let ratio = w.packets_per_second / noop.packets_per_second.max(f64::MIN_POSITIVE);
            goals.push(Goal {
                goal: "packet writes ≥ 0.5 × the transport's limit (no-op RPC, same client)"
                    .to_owned(),
                measured: format!(
                    "{:.0} vs {:.0} packets/s = {ratio:.2}×",
                    w.packets_per_second, noop.packets_per_second
                ),
                met: ratio >= 0.5,
            });
        }
    }
    if let Some(replay) = report.replay.first() {
        let (rate, of) = match write {
            Some(w) => (w.packets_per_second, "the write benchmark"),
            None => (replay.fill_rate, "the fill"),
        };
        let ratio = replay.packets_per_second / rate.max(f64::MIN_POSITIVE);
        goals.push(Goal {
            goal: format!(
                "replay of {} packets from offset 0 ≥ 2 × the write rate",
                replay.stored
            ),
            measured: format!(
                "{:.0} packets/s vs {rate:.0} packets/s written ({of}) = {ratio:.2}×",
                replay.packets_per_second
            ),
            met: ratio >= 2.0 && replay.received == replay.stored,
        });
    }
    if let Some(live) = report.live.first() {
        let wrong = live.missed + live.reordered + live.duplicates + live.unexpected;
        goals.push(Goal {
            goal: format!(
                "live packets at {:.0}/s to {} readers: p99 ≤ 10 ms, none missed or reordered",
                live.rate, live.subscribers
            ),
            measured: format!(
                "ack→received p99 {:.2} ms (p50 {:.2}, p99.9 {:.2}); {} missed, {} reordered; {} not sent in time",
                live.from_ack.p99,
                live.from_ack.p50,
                live.from_ack.p999,
                live.missed,
                live.reordered,
                live.unsent
            ),
            met: live.from_ack.p99 <= 10.0
                && wrong == 0
                && live.delivered == live.expected
                && live.unsent == 0,
        });
    }
    if let Some(m) = &report.memory {
        let growth = m.rss_stalled_peak_mib - m.rss_stalled_before_mib;
        goals.push(Goal {
            goal: format!(
                "RSS bounded with a stalled reader while {:.0} MiB are written: peak growth ≤ {STALLED_GROWTH_MIB:.0} MiB",
                crate::process::mib(m.stalled_written_bytes)
            ),
            measured: format!(
                "{:.0} → peak {:.0} MiB (+{growth:.0}); the reader {}",
                m.rss_stalled_before_mib,
                m.rss_stalled_peak_mib,
                if m.stalled_reader_alive {
                    "still delivered afterwards"
                } else {
                    "did not deliver afterwards"
                }
            ),
            met: growth <= STALLED_GROWTH_MIB
                && m.stalled_reader_alive
                && m.stalled_write_errors == 0,
        });
    }
}
