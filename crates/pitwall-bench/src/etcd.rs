//! The peer: etcd, a durable store with watches, driven with the same loops and payload as
//! Pitwall. A `Put` of the encoded create request stands for a create; a `Watch` on the key
//! prefix stands for a start-notification subscriber.
//!
//! The benchmark spawns `etcd` itself (single member on 127.0.0.1, its own temporary data
//! directory and free ports, default durability: each write is in its fsync'd WAL before it
//! is acknowledged), or measures a running one given by URL.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::connection::{self, pick};
use crate::driver::{self, Step, StepError};
use crate::fanout::{self, FanoutArgs, Feed, Write, Writer};
use crate::payload;
use crate::process::{self, CpuTimes, free_loopback_port, mib};
use crate::report::{FanoutResult, LoadResult};
use crate::scenario::Shape;

/// The generated etcd client (from `proto/etcd`).
pub mod proto {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::watch_client::WatchClient;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};

/// How long a freshly spawned etcd may take to answer its first write.
const READY_PATIENCE: Duration = Duration::from_secs(60);
const STOP_PATIENCE: Duration = Duration::from_secs(30);
/// Watches opened at once while registering subscribers.
const SUBSCRIBE_PARALLELISM: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// The etcd binary to spawn.
    #[arg(long, value_name = "PATH", default_value = "etcd")]
    pub etcd_bin: PathBuf,
    /// Measure a running etcd at this client URL (e.g. http://127.0.0.1:2379) instead.
    #[arg(long, value_name = "URL")]
    pub etcd: Option<String>,
    /// Process id of the etcd given by --etcd, to read its memory.
    #[arg(long, value_name = "PID", requires = "etcd")]
    pub etcd_pid: Option<u32>,
}

impl EtcdArgs {
    /// Whether there is an etcd to measure: one given by URL, or the binary on PATH.
    pub fn available(&self) -> bool {
        self.etcd.is_some() || find_in_path(&self.etcd_bin).is_some()
    }
}

fn find_in_path(binary: &std::path::Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return binary.exists().then(|| binary.to_owned());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|candidate| candidate.is_file())
    })
}

/// An etcd being measured.
// One value per run, never moved in a loop: boxing the spawned variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum EtcdTarget {
    Spawned {
        child: Child,
        pid: u32,
        url: String,
        _data_dir: tempfile::TempDir,
    },
    Attached {
        url: String,
        pid: Option<u32>,
    },
}

impl EtcdTarget {
    pub async fn start(args: &EtcdArgs) -> anyhow::Result<EtcdTarget> {
        if let Some(url) = &args.etcd {
            return Ok(EtcdTarget::Attached {
                url: url.clone(),
                pid: args.etcd_pid,
            });
        }
        let data_dir = tempfile::Builder::new()
            .prefix("pitwall-bench-etcd-")
            .tempdir()
            .context("cannot create etcd's data directory")?;
        let client_url = format!("http://127.0.0.1:{}", free_loopback_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_loopback_port()?);
        let mut child = Command::new(&args.etcd_bin)
            .arg("--name=bench")
            .arg(format!("--data-dir={}", data_dir.path().display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=bench={peer_url}"))
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (install etcd, e.g. apt-get install etcd-server)",
                    args.etcd_bin.display()
                )
            })?;
        let pid = child.id().context("etcd exited at once")?;
        let began = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("etcd exited with {status} before it served (ports taken?)");
            }
            if ready(&client_url).await {
                break;
            }
            if began.elapsed() > READY_PATIENCE {
                bail!("etcd did not answer a write within {READY_PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(EtcdTarget::Spawned {
            child,
            pid,
            url: client_url,
            _data_dir: data_dir,
        })
    }

    pub fn url(&self) -> &str {
        match self {
            EtcdTarget::Spawned { url, .. } | EtcdTarget::Attached { url, .. } => url,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            EtcdTarget::Spawned { pid, .. } => Some(*pid),
            EtcdTarget::Attached { pid, .. } => *pid,
        }
    }

    pub fn resident_bytes(&self) -> anyhow::Result<Option<u64>> {
        self.pid().map(process::resident_bytes).transpose()
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        if let EtcdTarget::Spawned { mut child, pid, .. } = self {
            process::terminate(pid)?;
            process::wait_or_kill(&mut child, STOP_PATIENCE).await?;
        }
        Ok(())
    }
}

/// Whether etcd at `url` takes a write.
async fn ready(url: &str) -> bool {
    let Ok(channels) = connection::connect(url, 1).await else {
        return false;
    };
    let mut client = KvClient::new(pick(&channels, 0));
    client
        .put(PutRequest {
            key: b"bench/ready".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        })
        .await
        .is_ok()
}

/// Closed- or open-loop `Put`s of session-sized values, shaped like a Pitwall load scenario.
pub async fn put_load(target: &EtcdTarget, shape: &Shape) -> anyhow::Result<LoadResult> {
    let channels = connection::connect(target.url(), shape.connections).await?;
    let n = shape.concurrency.max(1);
    let prefix = format!("sessions/{}/", uuid::Uuid::new_v4().simple());
    let loops: Vec<PutStep> = (0..n)
        .map(|i| PutStep::new(pick(&channels, i), &prefix, i, n))
        .collect();
    let pace = shape.pace();
    let loops = if shape.warmup > 0.0 {
        driver::run(loops, pace, Duration::from_secs_f64(shape.warmup))
            .await?
            .loops
    } else {
        loops
    };
    let rss_before = target.resident_bytes()?;
    let cpu_before = CpuTimes::read(target.pid());
    let outcome = driver::run(loops, pace, Duration::from_secs_f64(shape.duration)).await?;
    let cpu = cpu_before.per_request(&CpuTimes::read(target.pid()), outcome.succeeded);
    let rss_after = target.resident_bytes()?;
    Ok(LoadResult {
        scenario: "etcd put".to_owned(),
        pace: pace.label(),
        concurrency: n,
        connections: shape.connections,
        requests: outcome.succeeded,
        errors: outcome.failed,
        unsent: outcome.unsent,
        seconds: outcome.elapsed.as_secs_f64(),
        throughput: outcome.throughput(),
        vs_health: None,
        latency: outcome.latencies.percentiles(),
        cpu,
        rss_before_mib: rss_before.map(mib),
        rss_after_mib: rss_after.map(mib),
        first_error: outcome.first_error,
    })
}

/// Fan-out on etcd: one `Watch` stream per subscriber on a key prefix, `Put` writers.
pub async fn watch_fanout(target: &EtcdTarget, args: &FanoutArgs) -> anyhow::Result<FanoutResult> {
    let prefix = format!("fanout/{}/", uuid::Uuid::new_v4().simple());
    let channels = connection::connect(target.url(), args.subscriber_connections).await?;
    let feeds: Vec<WatchFeed> = futures::stream::iter(0..args.subscribers)
        .map(|i| WatchFeed::open(pick(&channels, i), prefix.clone()))
        .buffer_unordered(SUBSCRIBE_PARALLELISM)
        .try_collect()
        .await?;
    let writer_channels = connection::connect(target.url(), 1).await?;
    let writers: Vec<PutStep> = (0..args.writers.max(1))
        .map(|i| PutStep::new(pick(&writer_channels, i), &prefix, i, args.writers))
        .collect();
    let rss_before = target.resident_bytes()?;
    let cpu_before = CpuTimes::read(target.pid());
    let (writes, receipts) = fanout::run(feeds, writers, args.create_rate, args.seconds).await?;
    let cpu_after = CpuTimes::read(target.pid());
    let rss_after = target.resident_bytes()?;
    // The revision etcd gave each write is the order watchers must see them in.
    let mut ordered = writes.writes.clone();
    ordered.sort_by_key(|w| w.revision);
    let order: Vec<u128> = ordered.iter().map(|w| w.key).collect();
    let mut result = fanout::check(
        "etcd",
        args.subscribers,
        args.create_rate,
        &order,
        &writes,
        &receipts,
    );
    result.cpu = cpu_before.per_request(&cpu_after, result.delivered);
    result.rss_before_mib = rss_before.map(mib);
    result.rss_after_mib = rss_after.map(mib);
    Ok(result)
}

/// Puts `{prefix}{uuid}` = the encoded create request, as a create would store it.
struct PutStep {
    client: KvClient<Channel>,
    prefix: String,
    n: u64,
    stride: u64,
    writes: Vec<Write>,
}

impl PutStep {
    fn new(channel: Channel, prefix: &str, index: usize, loops: usize) -> PutStep {
        PutStep {
            client: KvClient::new(channel),
            prefix: prefix.to_owned(),
            n: index as u64,
            stride: loops.max(1) as u64,
            writes: Vec::new(),
        }
    }
}

impl Step for PutStep {
    async fn step(&mut self, scheduled: Instant) -> Result<(), StepError> {
        let key = uuid::Uuid::new_v4();
        let value = payload::etcd_value(self.n);
        self.n += self.stride;
        let response = self
            .client
            .put(PutRequest {
                key: format!("{}{key}", self.prefix).into_bytes(),
                value,
                ..Default::default()
            })
            .await
            .map_err(|e| StepError::Failed(format!("{:?}: {}", e.code(), e.message())))?;
        let acked = Instant::now();
        let revision = response
            .into_inner()
            .header
            .map_or(0, |header| header.revision);
        self.writes.push(Write {
            key: key.as_u128(),
            sent: scheduled,
            acked,
            revision,
        });
        Ok(())
    }
}

impl Writer for PutStep {
    fn writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }
}

/// A watch on `prefix`, registered (etcd answered `created`) before it is returned.
struct WatchFeed {
    stream: Streaming<WatchResponse>,
    /// Kept open: closing the request side would end the watch.
    _requests: mpsc::Sender<WatchRequest>,
    prefix_len: usize,
}

impl WatchFeed {
    async fn open(channel: Channel, prefix: String) -> anyhow::Result<WatchFeed> {
        let (requests, outgoing) = mpsc::channel(1);
        requests
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: prefix.clone().into_bytes(),
                    range_end: prefix_end(prefix.as_bytes()),
                    ..Default::default()
                })),
            })
            .await
            .context("cannot queue the watch request")?;
        let mut stream = WatchClient::new(channel)
            .watch(ReceiverStream::new(outgoing))
            .await
            .context("Watch failed")?
            .into_inner();
        loop {
            let response = stream
                .message()
                .await
                .context("Watch failed")?
                .context("etcd closed the watch before creating it")?;
            if response.canceled {
                bail!("etcd refused the watch: {}", response.cancel_reason);
            }
            if response.created {
                break;
            }
        }
        Ok(WatchFeed {
            stream,
            _requests: requests,
            prefix_len: prefix.len(),
        })
    }
}

impl Feed for WatchFeed {
    async fn next(&mut self) -> anyhow::Result<Option<Vec<u128>>> {
        let Some(response) = self.stream.message().await? else {
            return Ok(None);
        };
        if response.canceled {
            bail!("etcd cancelled the watch: {}", response.cancel_reason);
        }
        response
            .events
            .iter()
            .map(|event| {
                let key = event.kv.as_ref().map(|kv| kv.key.as_slice()).unwrap_or(&[]);
                let suffix = key.get(self.prefix_len..).unwrap_or(&[]);
                fanout::key_number(&String::from_utf8_lossy(suffix))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Some)
    }
}

/// The end of the key range holding every key that starts with `prefix` (etcd's convention:
/// the prefix with its last byte incremented).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: etcd reads "\0" as "to the end of the keyspace".
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"fanout/a/"), b"fanout/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
