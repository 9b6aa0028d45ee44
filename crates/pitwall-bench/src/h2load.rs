//! The durable create against etcd's durable `Put` and against a cheap read, all three driven by
//! the same external load generator, `h2load` (nghttp2's HTTP/2 benchmark tool): the same
//! encoded body for every request, 64 streams over 4 connections. A generator written in C
//! costs the shared cores far less per request than a tonic client, so what is measured is
//! mostly the servers.
//!
//! `h2load` only sees HTTP statuses; a gRPC failure comes as status 200 with `grpc-status` in
//! the trailers. So every run is checked against the server's own count: Pitwall's
//! `pitwall_rpc_requests_total` by method and outcome, etcd's revision (one per `Put`).
//!
//! The three are alternated, each on a freshly started server, `--runs` times; the table gives
//! each run and the medians, with the two ratios the goals are stated in.
//!
//! With `--rate`, h2load sends at that rate instead of as fast as it can (`--rps` per
//! connection) and logs every request; the table then adds the latency percentiles, read from
//! that log.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use pitwall_proto::api::GetSessionInfoRequest;
use prost::Message;
use tokio::process::Command;

use crate::connection::{self, pick};
use crate::etcd::proto::etcdserverpb::PutRequest;
use crate::etcd::proto::etcdserverpb::kv_client::KvClient;
use crate::etcd::{EtcdArgs, EtcdTarget};
use crate::latency::{Latencies, Percentiles};
use crate::payload;
use crate::process::CpuTimes;
use crate::report::median;
use crate::server::{ServerArgs, Target};

#[derive(Debug, Clone, clap::Args)]
pub struct H2loadArgs {
    /// The h2load binary (Debian: nghttp2-client).
    #[arg(long, value_name = "PATH", default_value = "h2load")]
    pub h2load_bin: PathBuf,
    /// Streams in flight in all, spread evenly over the connections.
    #[arg(long, default_value_t = 64)]
    pub streams: usize,
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Seconds measured per run, after the warm-up.
    #[arg(long, default_value_t = 8)]
    pub duration: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1)]
    pub warm_up: u64,
    /// Rounds of the three (create, put, read), alternating.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Requests per second in all, spread evenly over the connections, instead of as many as
    /// the server answers; adds each run's latency percentiles.
    #[arg(long)]
    pub rate: Option<u64>,
}

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// `CreateSession` with five details: a durable write.
    Create,
    /// etcd `KV/Put` of the same encoded create request: its durable write.
    Put,
    /// `GetSessionInfo` of a key that does not exist: the cheapest RPC with a body.
    Read,
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::Create => "pitwall create",
            Load::Put => "etcd put",
            Load::Read => "pitwall read (unknown key)",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Load::Create => "/ma.streaming.api.v1.SessionManagementService/CreateSession",
            Load::Put => "/etcdserverpb.KV/Put",
            Load::Read => "/ma.streaming.api.v1.SessionManagementService/GetSessionInfo",
        }
    }

    /// The gRPC message every request of this load sends.
    fn message(self) -> Vec<u8> {
        match self {
            Load::Create => payload::create_request("bench", 0).encode_to_vec(),
            Load::Put => PutRequest {
                key: b"bench/session".to_vec(),
                value: payload::etcd_value(0),
                ..Default::default()
            }
            .encode_to_vec(),
            Load::Read => GetSessionInfoRequest {
                session_key: "00000000-0000-0000-0000-000000000000".into(),
            }
            .encode_to_vec(),
        }
    }

    /// The method label Pitwall counts these requests under.
    fn method(self) -> Option<&'static str> {
        match self {
            Load::Create => Some("CreateSession"),
            Load::Read => Some("GetSessionInfo"),
            Load::Put => None,
        }
    }
}

/// One h2load run.
#[derive(Debug, Clone)]
pub struct Run {
    pub load: Load,
    /// Requests h2load saw answered with HTTP 200 in the measured time.
    pub succeeded: u64,
    pub failed: u64,
    pub rate: f64,
    pub mean_ms: f64,
    /// Requests the server counted, warm-up included, and how many of them failed.
    pub server_counted: u64,
    pub server_failed: u64,
    /// Server CPU per request it counted.
    pub server_cpu_us: Option<f64>,
    /// Latency percentiles of every request h2load logged (with `--rate`).
    pub latency: Option<Percentiles>,
}

/// What h2load printed that the table uses.
#[derive(Debug, Clone, Copy, PartialEq)]
struct H2loadSummary {
    succeeded: u64,
    failed: u64,
    rate: f64,
    mean_ms: f64,
    latency: Option<Percentiles>,
}

pub async fn run(
    args: &H2loadArgs,
    server: &ServerArgs,
    etcd: &EtcdArgs,
) -> anyhow::Result<Vec<Run>> {
    let bodies = tempfile::tempdir().context("cannot create a directory for the bodies")?;
    let mut runs = Vec::new();
    for round in 0..args.runs.max(1) {
        eprintln!("pitwall-bench: h2load round {} of {}", round + 1, args.runs);
        let target = Target::start(server).await?;
        for load in [Load::Create, Load::Read] {
            runs.push(measure_pitwall(args, &target, load, bodies.path()).await?);
        }
        target.stop().await?;
        let peer = EtcdTarget::start(etcd).await?;
        runs.push(measure_etcd(args, &peer, bodies.path()).await?);
        peer.stop().await?;
    }
    Ok(runs)
}

async fn measure_pitwall(
    args: &H2loadArgs,
    target: &Target,
    load: Load,
    bodies: &Path,
) -> anyhow::Result<Run> {
    let method = load.method().context("not a Pitwall load")?;
    let admin = target.admin_addr()?.to_owned();
    let before = counted(&admin, method).await?;
    let cpu_before = CpuTimes::read(target.pid());
    let summary = h2load(args, target.url(), load, bodies).await?;
    let cpu_after = CpuTimes::read(target.pid());
    let after = counted(&admin, method).await?;
    let server_counted = after.total - before.total;
    let server_failed = match load {
        // Every read of an unknown key is refused: that is the load.
        Load::Read => 0,
        _ => server_counted - (after.success - before.success),
    };
    Ok(Run {
        load,
        succeeded: summary.succeeded,
        failed: summary.failed,
        rate: summary.rate,
        mean_ms: summary.mean_ms,
        server_counted,
        server_failed,
        server_cpu_us: cpu_before.per_request(&cpu_after, server_counted).server_us,
        latency: summary.latency,
    })
}

async fn measure_etcd(
    args: &H2loadArgs,
    target: &EtcdTarget,
    bodies: &Path,
) -> anyhow::Result<Run> {
    let before = revision(target.url()).await?;
    let cpu_before = CpuTimes::read(target.pid());
    let summary = h2load(args, target.url(), Load::Put, bodies).await?;
    let cpu_after = CpuTimes::read(target.pid());
    // The revision moves once per Put, this probe's own included.
    let server_counted = (revision(target.url()).await? - before - 1).max(0) as u64;
    Ok(Run {
        load: Load::Put,
        succeeded: summary.succeeded,
        failed: summary.failed,
        rate: summary.rate,
        mean_ms: summary.mean_ms,
        server_counted,
        server_failed: 0,
        server_cpu_us: cpu_before.per_request(&cpu_after, server_counted).server_us,
        latency: summary.latency,
    })
}

/// Runs h2load once and reads its summary.
async fn h2load(
    args: &H2loadArgs,
    url: &str,
    load: Load,
    bodies: &Path,
) -> anyhow::Result<H2loadSummary> {
    let body = bodies.join(format!("{load:?}.grpc"));
    std::fs::write(&body, grpc_frame(&load.message()))
        .with_context(|| format!("cannot write {}", body.display()))?;
    let connections = args.connections.max(1);
    let per_connection = args.streams.max(1).div_ceil(connections);
    let log = bodies.join(format!("{load:?}.log"));
    let mut command = Command::new(&args.h2load_bin);
    if let Some(rate) = args.rate {
        let _ = std::fs::remove_file(&log);
        command
            .arg(format!(
                "--rps={}",
                rate.div_ceil(connections as u64).max(1)
            ))
            .arg(format!("--log-file={}", log.display()));
    }
    let output = command
        .arg(format!("--clients={connections}"))
        .arg(format!("--max-concurrent-streams={per_connection}"))
        .arg(format!("--duration={}", args.duration))
        .arg(format!("--warm-up-time={}", args.warm_up))
        .arg(format!("--data={}", body.display()))
        .arg("--header=content-type: application/grpc")
        .arg("--header=te: trailers")
        .arg(format!("{url}{}", load.path()))
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| {
            format!(
                "cannot run {} (install it: apt-get install nghttp2-client)",
                args.h2load_bin.display()
            )
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "h2load exited with {}: {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut summary = parse_summary(&stdout)
        .with_context(|| format!("cannot read h2load's output:\n{stdout}"))?;
    if args.rate.is_some() {
        let logged = std::fs::read_to_string(&log)
            .with_context(|| format!("h2load wrote no request log {}", log.display()))?;
        summary.latency = Some(latencies(&logged).percentiles());
    }
    Ok(summary)
}

/// The durations in h2load's request log: a line per request, `start (µs since the epoch)`,
/// `status`, `duration (µs)`, separated by tabs.
fn latencies(log: &str) -> Latencies {
    let mut latencies = Latencies::default();
    for line in log.lines() {
        if let Some(micros) = line
            .split('\t')
            .nth(2)
            .and_then(|field| field.trim().parse().ok())
        {
            latencies.record(std::time::Duration::from_micros(micros));
        }
    }
    latencies
}

/// A gRPC length-prefixed message: no compression, big-endian length, the bytes.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// Reads `finished in …, R req/s`, `requests: … N succeeded, F failed, …` and the mean of
/// `time for request:`.
fn parse_summary(output: &str) -> Option<H2loadSummary> {
    let mut rate = None;
    let mut counts: HashMap<&str, u64> = HashMap::new();
    let mut mean_ms = None;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            rate = rest
                .split(", ")
                .find_map(|part| part.strip_suffix(" req/s"))
                .and_then(|value| value.parse().ok());
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(", ") {
                if let Some((value, name)) = part.split_once(' ')
                    && let Ok(value) = value.parse()
                {
                    counts.insert(name, value);
                }
            }
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // min, max, mean, sd, ±sd
            mean_ms = rest.split_whitespace().nth(2).and_then(duration_ms);
        }
    }
    Some(H2loadSummary {
        succeeded: *counts.get("succeeded")?,
        failed: counts.get("failed").copied().unwrap_or(0)
            + counts.get("errored").copied().unwrap_or(0)
            + counts.get("timeout").copied().unwrap_or(0),
        rate: rate?,
        mean_ms: mean_ms?,
        latency: None,
    })
}

/// `850us`, `2.57ms`, `1.2s` in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// Requests of `method` Pitwall counted so far: all, and those that succeeded.
struct Counted {
    total: u64,
    success: u64,
}

async fn counted(admin: &str, method: &str) -> anyhow::Result<Counted> {
    let text = crate::metrics::exposition(admin).await?;
    let mut counted = Counted {
        total: 0,
        success: 0,
    };
    let label = format!("method=\"{method}\"");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("pitwall_rpc_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        if !labels.split(',').any(|l| l == label) {
            continue;
        }
        let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        counted.total += value;
        if labels.split(',').any(|l| l == "outcome=\"success\"") {
            counted.success += value;
        }
    }
    Ok(counted)
}

/// etcd's current revision, read by a `Put` (which moves it by one).
async fn revision(url: &str) -> anyhow::Result<i64> {
    let channels = connection::connect(url, 1).await?;
    let answer = KvClient::new(pick(&channels, 0))
        .put(PutRequest {
            key: b"bench/revision".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        })
        .await
        .context("etcd refused the revision probe")?;
    answer
        .into_inner()
        .header
        .map(|header| header.revision)
        .context("etcd's answer has no header")
}

/// The runs and their medians as markdown, with the ratios.
pub fn markdown(args: &H2loadArgs, runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "h2load, {} streams over {} connections, {} s after {} s of warm-up, the same body every request\n",
        args.streams, args.connections, args.duration, args.warm_up
    );
    let _ = writeln!(
        out,
        "| run | load | req/s | mean ms | failed (h2load) | counted by the server | failed (server) | server CPU µs/req |"
    );
    let _ = writeln!(out, "|--:|---|--:|--:|--:|--:|--:|--:|");
    let mut round = 0;
    for run in runs {
        if run.load == Load::Create {
            round += 1;
        }
        let _ = writeln!(
            out,
            "| {round} | {} | {:.0} | {:.2} | {} | {} | {} | {} |",
            run.load.label(),
            run.rate,
            run.mean_ms,
            run.failed,
            run.server_counted,
            run.server_failed,
            run.server_cpu_us
                .map_or("–".to_owned(), |cpu| format!("{cpu:.1}")),
        );
    }
    let median_of = |load: Load| median_over(runs, load, |r| Some(r.rate));
    let (create, put, read) = (
        median_of(Load::Create),
        median_of(Load::Put),
        median_of(Load::Read),
    );
    let cpu_of = |load: Load| median_over(runs, load, |r| r.server_cpu_us);
    let _ = writeln!(
        out,
        "\n| median | req/s | server CPU µs/req |\n|---|--:|--:|"
    );
    for load in [Load::Create, Load::Put, Load::Read] {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.1} |",
            load.label(),
            median_of(load),
            cpu_of(load)
        );
    }
    if let Some(rate) = args.rate {
        out.push_str(&latency_table(rate, runs));
        return out;
    }
    let _ = writeln!(
        out,
        "\ncreate ÷ etcd put = {:.2} (goal ≥ 1.5); create ÷ read = {:.2} (goal ≥ 0.5)",
        create / put.max(f64::MIN_POSITIVE),
        create / read.max(f64::MIN_POSITIVE),
    );
    out
}

/// Each run's latency percentiles at the fixed rate, and the median p99 of each load.
fn latency_table(rate: u64, runs: &[Run]) -> String {
    let mut out = format!(
        "\nAt {rate} requests/s, every request h2load logged (ms):\n\n\
         | load | p50 | p90 | p99 | p99.9 | max |\n|---|--:|--:|--:|--:|--:|\n"
    );
    for run in runs {
        if let Some(l) = run.latency {
            let _ = writeln!(
                out,
                "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                run.load.label(),
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max
            );
        }
    }
    for load in [Load::Create, Load::Put, Load::Read] {
        let p99 = median_over(runs, load, |r| r.latency.map(|l| l.p99));
        let _ = writeln!(out, "\nmedian p99 of {}: {p99:.2} ms", load.label());
    }
    out
}

/// The median of a figure over the runs of one load (those that have it).
fn median_over(runs: &[Run], load: Load, figure: impl Fn(&Run) -> Option<f64>) -> f64 {
    median(runs.iter().filter(|r| r.load == load).filter_map(figure))
}

/// Problems that make the figures untrustworthy: failed requests, or fewer requests counted
/// by the server than h2load says were answered.
pub fn problems(runs: &[Run]) -> Vec<String> {
    runs.iter()
        .filter_map(|run| {
            if run.failed > 0 || run.server_failed > 0 {
                Some(format!(
                    "{}: {} requests failed by h2load's count, {} by the server's",
                    run.load.label(),
                    run.failed,
                    run.server_failed
                ))
            } else if run.server_counted < run.succeeded {
                Some(format!(
                    "{}: h2load saw {} answered, the server counted only {}",
                    run.load.label(),
                    run.succeeded,
                    run.server_counted
                ))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
finished in 8.00s, 24825.12 req/s, 2.53MB/s
requests: 198601 total, 198665 started, 198601 done, 198600 succeeded, 1 failed, 0 errored, 0 timeout
status codes: 198601 2xx, 0 3xx, 0 4xx, 0 5xx
time for request:      520us     15.20ms      2.57ms       900us    71.23%
";

    #[test]
    fn the_summary_is_read_from_h2loads_output() {
        let summary = parse_summary(OUTPUT).unwrap();
        assert_eq!(
            summary,
            H2loadSummary {
                succeeded: 198600,
                failed: 1,
                rate: 24825.12,
                mean_ms: 2.57,
                latency: None,
            }
        );
    }

    #[test]
    fn latencies_are_read_from_the_request_log() {
        let log = "1764770000000000\t200\t850\n1764770000000100\t200\t2570\n\nnot a line\n";
        let latencies = latencies(log);
        assert_eq!(latencies.count(), 2);
        let percentiles = latencies.percentiles();
        assert!((percentiles.p50 - 0.85).abs() < 0.01, "{percentiles:?}");
        assert!((percentiles.max - 2.57).abs() < 0.01, "{percentiles:?}");
    }

    #[test]
    fn output_without_a_count_is_not_a_summary() {
        assert_eq!(parse_summary("finished in 8.00s, 1.0 req/s\n"), None);
    }

    #[test]
    fn a_grpc_frame_is_flag_length_message() {
        assert_eq!(grpc_frame(b"ab"), vec![0, 0, 0, 0, 2, b'a', b'b']);
    }
}
