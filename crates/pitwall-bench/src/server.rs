//! The Pitwall server under test: spawned from its binary (`pitwall serve` on loopback ephemeral
//! ports and a fresh data directory) and stopped with SIGTERM, or a running one given by URL.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::process;

/// How often the ready file is looked for: it is the signal, there is nothing to block on.
const READY_POLL: Duration = Duration::from_millis(5);
/// Replaying a large store in a debug build is slow; past this the server is taken as stuck.
const READY_PATIENCE: Duration = Duration::from_secs(600);
/// A graceful stop finishes in-flight writes and closes the store; past this it is a failure.
const STOP_PATIENCE: Duration = Duration::from_secs(120);
/// Log lines kept to explain a server that failed.
const LOG_TAIL_LINES: usize = 40;

/// Which server to measure.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// The `pitwall` binary to spawn [default: `pitwall` next to this binary].
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Measure a running server at this URL (e.g. http://127.0.0.1:13579) instead of
    /// spawning one.
    #[arg(long, value_name = "URL", conflicts_with = "server_bin")]
    pub server: Option<String>,
    /// Process id of the server given by --server, to read its memory.
    #[arg(long, value_name = "PID", requires = "server")]
    pub server_pid: Option<u32>,
    /// Admin HTTP address (host:port) of the server given by --server, for the board's event
    /// stream.
    #[arg(long, value_name = "ADDR", requires = "server")]
    pub server_admin: Option<String>,
    /// Extra argument for a spawned `pitwall serve` (repeatable), e.g. --server-arg=--max-batch=256.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
}

impl ServerArgs {
    /// The binary to spawn: the one given, or `pitwall` in the directory of this executable
    /// (both are built into the same target directory).
    pub fn binary(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.server_bin {
            return Ok(path.clone());
        }
        let exe = std::env::current_exe().context("cannot locate this executable")?;
        let dir = exe.parent().context("this executable has no directory")?;
        let path = dir.join("pitwall");
        if !path.exists() {
            bail!(
                "no pitwall binary at {}; build it (cargo build --release --bin pitwall) or pass --server-bin",
                path.display()
            );
        }
        Ok(path)
    }
}

/// A server being measured.
// One value per run, never moved in a loop: boxing the spawned variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Target {
    /// Spawned by the benchmark on its own temporary data directory.
    Spawned {
        process: PitwallProcess,
        _data_dir: tempfile::TempDir,
    },
    /// Running elsewhere; only reachable by URL (memory if its pid was given, the board if
    /// its admin address was).
    Attached {
        url: String,
        pid: Option<u32>,
        admin: Option<String>,
    },
}

impl Target {
    pub async fn start(args: &ServerArgs) -> anyhow::Result<Target> {
        if let Some(url) = &args.server {
            return Ok(Target::Attached {
                url: url.clone(),
                pid: args.server_pid,
                admin: args.server_admin.clone(),
            });
        }
        let data_dir = fresh_data_dir()?;
        let process =
            PitwallProcess::spawn(&args.binary()?, data_dir.path(), &args.server_args).await?;
        Ok(Target::Spawned {
            process,
            _data_dir: data_dir,
        })
    }

    pub fn url(&self) -> &str {
        match self {
            Target::Spawned { process, .. } => &process.grpc_url,
            Target::Attached { url, .. } => url,
        }
    }

    /// `host:port` of the admin HTTP port (metrics, health, the board).
    pub fn admin_addr(&self) -> anyhow::Result<&str> {
        match self {
            Target::Spawned { process, .. } => Ok(&process.ready.metrics),
            Target::Attached { admin, .. } => admin.as_deref().context(
                "the admin address of the server is not known; pass --server-admin HOST:PORT",
            ),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Target::Spawned { process, .. } => Some(process.pid),
            Target::Attached { pid, .. } => *pid,
        }
    }

    /// The server's admin HTTP address (`/metrics`), when it was spawned here.
    pub fn metrics_addr(&self) -> Option<&str> {
        match self {
            Target::Spawned { process, .. } => Some(process.ready.metrics.as_str()),
            Target::Attached { .. } => None,
        }
    }

    /// Resident memory of the server, when its process is known.
    pub fn resident_bytes(&self) -> anyhow::Result<Option<u64>> {
        self.pid().map(process::resident_bytes).transpose()
    }

    /// Stops a spawned server gracefully (checking it exits 0); leaves an attached one alone.
    pub async fn stop(self) -> anyhow::Result<()> {
        match self {
            Target::Spawned { process, .. } => process.stop().await.map(|_| ()),
            Target::Attached { .. } => Ok(()),
        }
    }
}

/// A temporary data directory (under `TMPDIR`, default /tmp), removed when dropped.
pub fn fresh_data_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("pitwall-bench-")
        .tempdir()
        .context("cannot create a temporary data directory")
}

/// A `pitwall serve` child process that has reported ready.
pub struct PitwallProcess {
    child: Child,
    pub pid: u32,
    pub grpc_url: String,
    /// From spawn until the ready file appeared.
    pub ready_after: Duration,
    /// What the ready file said.
    pub ready: Ready,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    drain: JoinHandle<()>,
    _ready_dir: tempfile::TempDir,
}

/// The `--ready-file` a server writes once it serves.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Ready {
    pub grpc: String,
    /// The admin HTTP address (metrics, health, the board).
    pub metrics: String,
    /// Sessions read from the store at startup.
    pub sessions: u64,
}

impl PitwallProcess {
    /// Spawns `pitwall serve` on loopback ephemeral ports and waits for its ready file.
    pub async fn spawn(
        binary: &Path,
        data_dir: &Path,
        extra_args: &[String],
    ) -> anyhow::Result<PitwallProcess> {
        let ready_dir = tempfile::Builder::new()
            .prefix("pitwall-bench-ready-")
            .tempdir()
            .context("cannot create a directory for the ready file")?;
        let ready_file = ready_dir.path().join("ready.json");
        let mut command = Command::new(binary);
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The flags above must not be overridden.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PITWALL_") {
                command.env_remove(name);
            }
        }
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let mut lines = BufReader::new(stderr).lines();
        let log_tail = Arc::new(Mutex::new(VecDeque::new()));
        // Keep reading: a full pipe would block the server's logging, and so the server.
        let drain_tail = log_tail.clone();
        let drain = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                remember(&drain_tail, &line);
            }
        });
        let ready = tokio::time::timeout(READY_PATIENCE, async {
            loop {
                // Written whole under another name and renamed: a file that exists is complete.
                if let Ok(text) = std::fs::read_to_string(&ready_file) {
                    return Ok::<_, std::io::Error>(Some(text));
                }
                if child.try_wait()?.is_some() {
                    return Ok(None);
                }
                tokio::time::sleep(READY_POLL).await;
            }
        })
        .await;
        let ready_after = spawned.elapsed();
        let text = match ready {
            Ok(Ok(Some(text))) => text,
            Ok(Ok(None)) => bail!(
                "pitwall exited before it was ready:\n{}",
                tail_text(&log_tail)
            ),
            Ok(Err(e)) => bail!("cannot watch the pitwall process: {e}"),
            Err(_) => bail!(
                "pitwall was not ready within {READY_PATIENCE:?}:\n{}",
                tail_text(&log_tail)
            ),
        };
        let ready: Ready = serde_json::from_str(&text)
            .with_context(|| format!("the ready file is not what pitwall writes: {text}"))?;
        Ok(PitwallProcess {
            child,
            pid,
            grpc_url: format!("http://{}", ready.grpc),
            ready_after,
            ready,
            log_tail,
            drain,
            _ready_dir: ready_dir,
        })
    }

    /// SIGTERM, then waits for exit; fails unless the server exits 0 in time. Returns how long
    /// the stop took.
    pub async fn stop(mut self) -> anyhow::Result<Duration> {
        let began = Instant::now();
        process::terminate(self.pid)?;
        let status = process::wait_or_kill(&mut self.child, STOP_PATIENCE).await?;
        let took = began.elapsed();
        let _ = self.drain.await;
        match status {
            Some(status) if status.success() => Ok(took),
            Some(status) => bail!(
                "pitwall exited with {status} after SIGTERM:\n{}",
                tail_text(&self.log_tail)
            ),
            None => bail!(
                "pitwall did not stop within {STOP_PATIENCE:?} of SIGTERM and was killed:\n{}",
                tail_text(&self.log_tail)
            ),
        }
    }
}

fn remember(tail: &Mutex<VecDeque<String>>, line: &str) {
    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
    if tail.len() == LOG_TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line.to_owned());
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let tail = tail.lock().unwrap_or_else(|e| e.into_inner());
    tail.iter().cloned().collect::<Vec<_>>().join("\n")
}
