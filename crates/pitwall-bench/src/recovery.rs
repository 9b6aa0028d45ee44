//! Recovery and memory: fill a fresh store through gRPC, stop the server gracefully, restart
//! it on the same directory, and measure the time to ready and the memory each session takes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use pitwall_proto::api::GetSessionInfoRequest;

use crate::connection::{self, pick};
use crate::payload::DETAILS_PER_SESSION;
use crate::process::{mib, resident_bytes};
use crate::report::RecoveryResult;
use crate::scenario::{SessionClient, create_sessions};
use crate::server::{PitwallProcess, ServerArgs, fresh_data_dir};

/// Sessions read back after the restart to check they came back whole.
const SAMPLE: usize = 200;

#[derive(Debug, Clone, clap::Args)]
pub struct RecoveryArgs {
    /// Sessions (five details each) in the store when it is restarted.
    #[arg(long, default_value_t = 1_000_000)]
    pub sessions: usize,
    /// Loops creating sessions while filling.
    #[arg(long = "fill-concurrency", default_value_t = 256)]
    pub fill_concurrency: usize,
    /// HTTP/2 connections used while filling.
    #[arg(long = "fill-connections", default_value_t = 4)]
    pub fill_connections: usize,
    /// Fill this (new or empty) directory and keep it, e.g. to profile restarts on it
    /// [default: a temporary directory, removed afterwards].
    #[arg(long = "keep-data-dir", value_name = "DIR")]
    pub keep_data_dir: Option<PathBuf>,
}

pub async fn run(server: &ServerArgs, args: &RecoveryArgs) -> anyhow::Result<RecoveryResult> {
    if server.server.is_some() {
        bail!(
            "recovery restarts the server, so it needs one it spawns: use --server-bin, not --server"
        );
    }
    let binary = server.binary()?;
    // The temporary directory, if any, lives until the end of the run.
    let (data_dir, _temporary) = match &args.keep_data_dir {
        Some(dir) => {
            if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
                bail!("{} is not empty; recovery fills a new store", dir.display());
            }
            (dir.clone(), None)
        }
        None => {
            let temporary = fresh_data_dir()?;
            (temporary.path().to_owned(), Some(temporary))
        }
    };

    let empty = PitwallProcess::spawn(&binary, &data_dir, &server.server_args).await?;
    let empty_ready = empty.ready_after;
    let rss_empty = resident_bytes(empty.pid)?;

    let channels = connection::connect(&empty.grpc_url, args.fill_connections).await?;
    let filling = Instant::now();
    let keys = create_sessions(&channels, args.fill_concurrency, args.sessions).await?;
    let fill_seconds = filling.elapsed().as_secs_f64();
    let rss_filled = resident_bytes(empty.pid)?;
    drop(channels);
    let stop = empty.stop().await?;
    let store_bytes = directory_bytes(&data_dir)?;

    let restarted = PitwallProcess::spawn(&binary, &data_dir, &server.server_args).await?;
    let rss_restarted = resident_bytes(restarted.pid)?;
    let sessions_at_ready = restarted.ready.sessions;
    let sample_failures = check_sample(&restarted.grpc_url, &keys).await?;
    let ready = restarted.ready_after;
    restarted.stop().await?;

    let sessions = args.sessions as u64;
    Ok(RecoveryResult {
        sessions,
        fill_rate: sessions as f64 / fill_seconds.max(f64::MIN_POSITIVE),
        store_mib: mib(store_bytes),
        stop_seconds: stop.as_secs_f64(),
        ready_seconds: ready.as_secs_f64(),
        empty_ready_seconds: empty_ready.as_secs_f64(),
        sessions_at_ready,
        rss_empty_mib: mib(rss_empty),
        rss_filled_mib: mib(rss_filled),
        rss_restarted_mib: mib(rss_restarted),
        bytes_per_session: rss_restarted.saturating_sub(rss_empty) as f64 / sessions.max(1) as f64,
        sample_failures,
    })
}

/// Reads back an evenly spread sample of the sessions; counts those missing or incomplete.
async fn check_sample(url: &str, keys: &[String]) -> anyhow::Result<u64> {
    let channels = connection::connect(url, 1).await?;
    let mut client = SessionClient::new(pick(&channels, 0));
    let step = (keys.len() / SAMPLE).max(1);
    let mut failures = 0;
    for key in keys.iter().step_by(step) {
        let info = client
            .get_session_info(GetSessionInfoRequest {
                session_key: key.clone(),
            })
            .await
            .context("GetSessionInfo after the restart failed")?
            .into_inner();
        if !info.success || info.details.len() != DETAILS_PER_SESSION {
            failures += 1;
        }
    }
    Ok(failures)
}

/// Bytes of the regular files directly in `dir` (the store is one database file).
fn directory_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let metadata = entry?.metadata()?;
        if metadata.is_file() {
            total += metadata.len();
        }
    }
    Ok(total)
}
