//! `pitwall-bench`: load, fan-out, recovery and peer benchmarks of a Pitwall server; prints
//! markdown tables. See the library's module map for where each measurement lives.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pitwall_bench::board::{self, BoardArgs};
use pitwall_bench::etcd::EtcdArgs;
use pitwall_bench::fanout::{self, FanoutArgs};
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
    about = "Benchmarks of the Pitwall session service"
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
    /// Everything, with the goals; --runs N for medians.
    All(AllArgs),
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
    };
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}
