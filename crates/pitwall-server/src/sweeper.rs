//! The sweeper: a background task that looks at every session now and then, ends the abandoned
//! ones (auto-end) and, on the embedded store, removes completed ones past retention.
//!
//! It only finds candidates; the writer decides each again against the session as it stands
//! when its turn comes, so a write that lands meanwhile wins. It reads the projection a shard
//! at a time, so requests and the writer never wait for a whole scan.

use std::time::Duration;

use pitwall_core::lifecycle::{auto_end_due, retention_expired};
use pitwall_core::projection::SHARDS;
use pitwall_core::{Command, Decision};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::AutoEndConfig;
use crate::engine::{Engine, now};
use crate::shutdown::Shutdown;

/// Bounds of the time between passes: rules are checked about four times per their shortest
/// duration, but not more often than this (a pass costs a scan) nor less (so a lowered window
/// or retention takes effect soon).
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(100);
const MAX_PASS_INTERVAL: Duration = Duration::from_secs(10);

/// How often the feed is trimmed to its window when nothing else is written.
const TRIM_INTERVAL: Duration = Duration::from_secs(60);

/// Sessions a pass hands to the writer at most; the rest wait for the next pass.
const MAX_AUTO_ENDS_PER_PASS: usize = 1000;

/// Owns the sweeper task.
pub struct Sweeper {
    task: JoinHandle<()>,
}

impl Sweeper {
    pub fn start(
        engine: Engine,
        auto_end: AutoEndConfig,
        retention: Option<Duration>,
        trim_by_age: bool,
        shutdown: Shutdown,
    ) -> Sweeper {
        let retention = retention.filter(|_| engine.purges_by_time());
        let shortest = [auto_end.shortest(), retention].into_iter().flatten().min();
        let interval = shortest
            .map(|d| (d / 4).clamp(MIN_PASS_INTERVAL, MAX_PASS_INTERVAL))
            .unwrap_or(TRIM_INTERVAL);
        if auto_end.is_on() || retention.is_some() {
            info!(
                auto_end = auto_end.is_on(),
                retention_ms = retention.map(|d| d.as_millis() as u64),
                pass_ms = interval.as_millis() as u64,
                "sweeper started"
            );
        }
        let task = tokio::spawn(async move {
            let sweep = Sweep {
                engine,
                auto_end,
                retention,
            };
            let mut passes = tokio::time::interval(interval);
            passes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut trims = tokio::time::interval(TRIM_INTERVAL);
            loop {
                tokio::select! {
                    _ = passes.tick() => sweep.pass().await,
                    // Only age trims without writes; the count is kept by every commit.
                    _ = trims.tick(), if trim_by_age => sweep.engine.trim_feed(),
                    () = shutdown.wait() => return,
                }
            }
        });
        Sweeper { task }
    }

    /// Waits for the task to see the shutdown signal (triggered before this is called).
    pub async fn stop(self) {
        let _ = self.task.await;
    }
}

struct Sweep {
    engine: Engine,
    auto_end: AutoEndConfig,
    retention: Option<Duration>,
}

impl Sweep {
    async fn pass(&self) {
        if !self.auto_end.is_on() && self.retention.is_none() {
            return;
        }
        let now = now();
        let mut due = Vec::new();
        let mut expired = Vec::new();
        for shard in 0..SHARDS {
            let projection = self.engine.read();
            for session in projection.shard(shard) {
                if session.is_complete() {
                    if let Some(completed_for) = self.retention
                        && retention_expired(session, completed_for, now)
                    {
                        expired.push(session.key.clone());
                    }
                } else if due.len() < MAX_AUTO_ENDS_PER_PASS {
                    let policy = self.auto_end.policy_for(&session.data_source);
                    if !policy.is_off() && auto_end_due(session, &policy, now).is_some() {
                        due.push((session.key.clone(), policy));
                    }
                }
            }
        }
        for (session_key, policy) in due {
            let command = Command::AutoEnd {
                session_key: session_key.clone(),
                policy,
            };
            match self.engine.submit(command).await {
                Ok(Decision::AppendAll(_)) => {
                    info!(session_key = %session_key, "session auto-ended");
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(session_key = %session_key, error = %e, "auto-end deferred to the next pass");
                    break;
                }
            }
        }
        if let Some(completed_for) = self.retention {
            for keys in expired.chunks(crate::apply::MAX_PURGE_PER_PASS) {
                let purged = self.engine.purge(keys.to_vec(), completed_for).await;
                if purged > 0 {
                    info!(sessions = purged, "completed sessions purged (retention)");
                }
            }
        }
    }
}
