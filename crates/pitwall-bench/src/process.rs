//! What the benchmark reads and does to a server process from outside: its resident memory,
//! a graceful stop, and free loopback ports for servers that cannot pick their own.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};

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
