//! What the benchmark reads and does to a server process from outside: its resident memory and
//! CPU time, a graceful stop, and free loopback ports for servers that cannot pick their own.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};

use crate::report::CpuPerRequest;

/// Resident set size of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .with_context(|| format!("{path} has no VmRSS line"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("cannot read the VmRSS value in '{line}'"))?;
    Ok(kib * 1024)
}

/// CPU time (user + system) used so far by process `pid`, all threads; or, with `thread`, by
/// its thread of that name (e.g. `pitwall-writer`), if it has one.
pub fn cpu_seconds(pid: u32, thread: Option<&str>) -> anyhow::Result<Option<f64>> {
    let Some(thread) = thread else {
        return stat_cpu_seconds(&format!("/proc/{pid}/stat")).map(Some);
    };
    let tasks = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
        let dir = task?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() == thread {
            return stat_cpu_seconds(&dir.join("stat").to_string_lossy()).map(Some);
        }
    }
    Ok(None)
}

/// `utime + stime` of a `/proc/…/stat` file, in seconds.
fn stat_cpu_seconds(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain numbers.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path} has no command name"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("cannot read field {} of {path}", index + 3))
    };
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

/// CPU seconds used so far by a server, its writer thread, and this benchmark process; `None`
/// where a process is unknown or could not be read.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    server: Option<f64>,
    writer: Option<f64>,
    client: Option<f64>,
}

/// The thread of a Pitwall server that commits to the store.
const WRITER_THREAD: &str = "pitwall-writer";

/// The thread of a Pitwall server that commits packets to the packet log.
pub const PACKET_WRITER_THREAD: &str = "pitwall-packets";

impl CpuTimes {
    pub fn read(server_pid: Option<u32>) -> CpuTimes {
        CpuTimes::read_with(server_pid, WRITER_THREAD)
    }

    /// As [`CpuTimes::read`], with `writer_thread` as the server's writer thread.
    pub fn read_with(server_pid: Option<u32>, writer_thread: &str) -> CpuTimes {
        let of = |pid: Option<u32>, thread| pid.and_then(|pid| cpu_seconds(pid, thread).ok()?);
        CpuTimes {
            server: of(server_pid, None),
            writer: of(server_pid, Some(writer_thread)),
            client: of(Some(std::process::id()), None),
        }
    }

    /// Microseconds of CPU per request between `self` and `later`.
    pub fn per_request(&self, later: &CpuTimes, requests: u64) -> CpuPerRequest {
        let micros = |before: Option<f64>, after: Option<f64>| {
            let (before, after) = (before?, after?);
            (requests > 0).then(|| (after - before) * 1e6 / requests as f64)
        };
        CpuPerRequest {
            server_us: micros(self.server, later.server),
            writer_us: micros(self.writer, later.writer),
            client_us: micros(self.client, later.client),
        }
    }
}

/// Asks process `pid` to stop gracefully (SIGTERM).
pub fn terminate(pid: u32) -> anyhow::Result<()> {
    let raw = i32::try_from(pid).context("process id out of range")?;
    let Some(pid) = Pid::from_raw(raw) else {
        bail!("process id {raw} is not a process");
    };
    kill_process(pid, Signal::TERM).with_context(|| format!("cannot send SIGTERM to {raw}"))
}

/// A port on 127.0.0.1 that was free a moment ago. For servers (etcd) that must be told their
/// ports up front; another process could take it in between, which the caller then reports.
pub fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits for a child to exit, killing it if it takes longer than `patience`; returns how it
/// exited (None when it had to be killed).
pub async fn wait_or_kill(
    child: &mut tokio::process::Child,
    patience: Duration,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    match tokio::time::timeout(patience, child.wait()).await {
        Ok(status) => Ok(Some(status.context("cannot wait for the child process")?)),
        Err(_) => {
            child
                .kill()
                .await
                .context("cannot kill the child process")?;
            Ok(None)
        }
    }
}

/// Bytes to MiB, for tables.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
