//! `pitwall-bench`: load, fan-out, recovery, data-plane and peer benchmarks of a Pitwall
//! server, and the storage engine comparison for its packet log; prints markdown tables. See the library's module map for where each measurement lives.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pitwall_bench::board::{self, BoardArgs};
use pitwall_bench::dataplane::{self, LiveArgs, MemoryArgs, ReplayArgs, WriteArgs};
use pitwall_bench::engines::{self, EnginesArgs};
use pitwall_bench::etcd::EtcdArgs;
use pitwall_bench::fanout::{self, FanoutArgs};
use pitwall_bench::h2load::{self, H2loadArgs};
use pitwall_bench::recovery::{self, RecoveryArgs};
use pitwall_bench::report::Report;
use pitwall_bench::scenario::{self, Scenario, Shape};
use pitwall_bench::server::{ServerArgs, Target};
use pitwall_bench::suite::{self, AllArgs};
use pitwall_bench::watchers::Watchers;

#[derive(Debug, Parser)]
#[command(
    name = "pitwall-bench",
    version,
    about = "Benchmarks of the Pitwall server: sessions and the data plane"
)]
struct Cli {
    /// Also write the results as JSON to this file.
    #[arg(long, global = true, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Fail (exit 1) if any request failed, any notification was missed, reordered or
    /// duplicated, or any session was lost across a restart. Timings are never checked.
    #[arg(long, global = true)]
    strict: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load scenarios, each compared with the health-check rate of the same run.
    Load(LoadCommand),
    /// Start notifications to many subscribers while sessions are created at a fixed rate.
    Fanout(FanoutCommand),
    /// The board's event stream (SSE) to many browsers while sessions are created at a fixed
    /// rate.
    Board(BoardCommand),
    /// Fill a store, restart on it: time to ready and memory per session.
    Recovery(RecoveryCommand),
    /// Pitwall against etcd: durable write rate and notification latency.
    Etcd(EtcdCommand),
    /// Durable 1 KiB packet writes through WriteDataPackets, against a no-op RPC (the
    /// transport's limit) and write + fdatasync of the same batches (the disk's limit).
    Write(WriteCommand),
    /// Fill a store with packets, then ReadPackets from offset 0 until all came back.
    Replay(ReplayCommand),
    /// Readers following the latest packets while packets are written at a fixed rate.
    Live(LiveCommand),
    /// Memory per read connection, per idle reader, and with a stalled reader while 1 GiB is
    /// written.
    Memory(MemoryCommand),
    /// redb and fjall, a row per packet and chunks: packet appends and reads in this process.
    Engines(EnginesArgs),
    /// Durable create against etcd's durable Put and a cheap read, all driven by h2load
    /// (64 streams, 4 connections, the same body), alternating; prints the ratios.
    H2load(H2loadCommand),
    /// Everything, with the goals; --runs N for medians.
    All(AllArgs),
}

#[derive(Debug, Args)]
struct H2loadCommand {
    #[command(flatten)]
    h2load: H2loadArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(Debug, Args)]
struct LoadCommand {
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Scenario::ALL)]
    scenario: Vec<Scenario>,
    /// `pitwall.v1.SessionFeed.Watch` streams of every data source kept reading during the
    /// scenarios (what following the feed costs).
    #[arg(long, default_value_t = 0)]
    feed_watchers: usize,
    #[command(flatten)]
    shape: Shape,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct FanoutCommand {
    #[command(flatten)]
    fanout: FanoutArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct BoardCommand {
    #[command(flatten)]
    board: BoardArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct RecoveryCommand {
    #[command(flatten)]
    recovery: RecoveryArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct EtcdCommand {
    #[command(flatten)]
    shape: Shape,
    #[command(flatten)]
    fanout: FanoutArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(Debug, Args)]
struct WriteCommand {
    #[command(flatten)]
    write: WriteArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct ReplayCommand {
    #[command(flatten)]
    replay: ReplayArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct LiveCommand {
    #[command(flatten)]
    live: LiveArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct MemoryCommand {
    #[command(flatten)]
    memory: MemoryArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::H2load(args) = &cli.command {
        return run_h2load(args, cli.strict).await;
    }
    match run(&cli).await {
        Ok(report) => {
            print!("{}", report.markdown());
            let problems = report.problems();
            for problem in &problems {
                eprintln!("pitwall-bench: {problem}");
            }
            if cli.strict && !problems.is_empty() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pitwall-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_h2load(args: &H2loadCommand, strict: bool) -> ExitCode {
    match h2load::run(&args.h2load, &args.server, &args.etcd).await {
        Ok(runs) => {
            print!("{}", h2load::markdown(&args.h2load, &runs));
            let problems = h2load::problems(&runs);
            for problem in &problems {
                eprintln!("pitwall-bench: {problem}");
            }
            if strict && !problems.is_empty() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pitwall-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<Report> {
    let report = match &cli.command {
        Command::Load(args) => {
            let target = Target::start(&args.server).await?;
            let watchers = match args.feed_watchers {
                0 => None,
                count => Some(Watchers::start(target.url(), count, args.shape.connections).await?),
            };
            let load = scenario::run_load(&target, &args.shape, &args.scenario).await?;
            if let Some(watchers) = watchers {
                let events = watchers.stop().await?;
                eprintln!(
                    "pitwall-bench: {} feed watchers received {events} events",
                    args.feed_watchers
                );
            }
            target.stop().await?;
            Report {
                runs: 1,
                load,
                ..Report::default()
            }
        }
        Command::Fanout(args) => {
            let target = Target::start(&args.server).await?;
            let result = fanout::run_pitwall(&target, &args.fanout).await?;
            target.stop().await?;
            Report {
                runs: 1,
                fanout: vec![result],
                ..Report::default()
            }
        }
        Command::Board(args) => {
            let target = Target::start(&args.server).await?;
            let result = board::run(&target, &args.board).await?;
            target.stop().await?;
            Report {
                runs: 1,
                fanout: vec![result],
                ..Report::default()
            }
        }
        Command::Recovery(args) => Report {
            runs: 1,
            recovery: Some(recovery::run(&args.server, &args.recovery).await?),
            ..Report::default()
        },
        Command::Etcd(args) => {
            suite::run_peer(&args.server, &args.etcd, &args.shape, &args.fanout).await?
        }
        Command::All(args) => suite::run_all(args).await?,
        Command::Write(args) => {
            let target = Target::start(&args.server).await?;
            let write = dataplane::run_write(&target, &args.write).await?;
            target.stop().await?;
            with_goals(Report {
                runs: 1,
                write,
                ..Report::default()
            })
        }
        Command::Replay(args) => with_goals(Report {
            runs: 1,
            replay: dataplane::run_replay(&args.server, &args.replay).await?,
            ..Report::default()
        }),
        Command::Live(args) => {
            let target = Target::start(&args.server).await?;
            let live = dataplane::run_live(&target, &args.live).await?;
            target.stop().await?;
            with_goals(Report {
                runs: 1,
                live: vec![live],
                ..Report::default()
            })
        }
        Command::Memory(args) => {
            let target = Target::start(&args.server).await?;
            let memory = dataplane::run_memory(&target, &args.memory).await?;
            target.stop().await?;
            with_goals(Report {
                runs: 1,
                memory: Some(memory),
                ..Report::default()
            })
        }
        Command::Engines(args) => Report {
            runs: 1,
            engines: engines::run(args).await?,
            ..Report::default()
        },
        Command::H2load(_) => anyhow::bail!("h2load runs on its own (run_h2load)"),
    };
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

fn with_goals(mut report: Report) -> Report {
    report.goals = suite::goals(&report);
    report
}
