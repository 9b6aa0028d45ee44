//! The sweeper: a background task that looks at every session now and then and proposes to end
//! the abandoned ones (auto-end) and to purge completed ones past retention.
//!
//! It only proposes; each proposal is a command the writer decides again against the session as
//! it stands when its turn comes, so a write that lands meanwhile wins, and the records it
//! appends go through the log like any write. It reads the projection a shard at a time, so
//! requests and the writer never wait for a whole scan, and proposes at most
//! [`MAX_PROPOSALS_PER_PASS`] per pass.

use std::time::Duration;

use futures::future::join_all;
use pitwall_core::lifecycle::{auto_end_due, retention_expired};
use pitwall_core::projection::SHARDS;
use pitwall_core::{Command, Decision};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::config::AutoEndConfig;
use crate::engine::{Engine, WriteError};
use crate::shutdown::Shutdown;

/// Bounds of the time between passes: rules are checked about four times per their shortest
/// duration, but not more often than this (a pass costs a scan) nor less (so a lowered window
/// or retention takes effect soon).
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(100);
const MAX_PASS_INTERVAL: Duration = Duration::from_secs(10);

/// How often the feed is trimmed to its window when nothing else is written.
const TRIM_INTERVAL: Duration = Duration::from_secs(60);

/// Commands a pass hands to the writer at most; a pass that reaches it is followed by another
/// at once, after the writer has answered these.
pub const MAX_PROPOSALS_PER_PASS: usize = 1000;

/// Owns the sweeper task.
pub struct Sweeper {
    task: JoinHandle<()>,
}

pub struct SweeperOptions {
    pub auto_end: AutoEndConfig,
    pub retention: Option<Duration>,
    /// Whether the feed has an age limit, so that it needs trimming when nothing is written.
    pub trim_by_age: bool,
}

impl Sweeper {
    pub fn start(
        engine: Engine,
        options: SweeperOptions,
        clock: Clock,
        shutdown: Shutdown,
    ) -> Sweeper {
        let SweeperOptions {
            auto_end,
            retention,
            trim_by_age,
        } = options;
        let shortest = [auto_end.shortest(), retention].into_iter().flatten().min();
        let interval = shortest
            .map(|d| (d / 4).clamp(MIN_PASS_INTERVAL, MAX_PASS_INTERVAL))
            .unwrap_or(TRIM_INTERVAL);
        let sweeps = auto_end.is_on() || retention.is_some();
        if sweeps {
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
                clock: clock.clone(),
            };
            let mut passes = tokio::time::interval(interval);
            passes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut trims = tokio::time::interval(TRIM_INTERVAL);
            // A manual clock (tests) says when it moves: sweep at once instead of at the next
            // tick.
            let mut moves = clock.moves();
            loop {
                tokio::select! {
                    _ = passes.tick(), if sweeps => sweep.passes().await,
                    // Only age trims without writes; the count is kept by every commit.
                    _ = trims.tick(), if trim_by_age => sweep.trim(),
                    () = moves.next() => {
                        if sweeps {
                            sweep.passes().await;
                        }
                        if trim_by_age {
                            sweep.trim();
                        }
                    }
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
    clock: Clock,
}

impl Sweep {
    /// Passes until one finds fewer than its cap.
    async fn passes(&self) {
        while self.pass().await {
            tokio::task::yield_now().await;
        }
    }

    /// One pass; true when it proposed its cap and more may be due.
    async fn pass(&self) -> bool {
        let now = self.clock.now();
        let mut proposals = Vec::new();
        'scan: for shard in 0..SHARDS {
            let projection = self.engine.read();
            for session in projection.shard(shard) {
                if proposals.len() >= MAX_PROPOSALS_PER_PASS {
                    break 'scan;
                }
                if session.is_complete() {
                    if let Some(completed_for) = self.retention
                        && retention_expired(session, completed_for, now)
                    {
                        proposals.push(Command::Purge {
                            session_key: session.key.clone(),
                            completed_for,
                        });
                    }
                } else {
                    let policy = self.auto_end.policy_for(&session.data_source);
                    if !policy.is_off() && auto_end_due(session, &policy, now).is_some() {
                        proposals.push(Command::AutoEnd {
                            session_key: session.key.clone(),
                            policy,
                        });
                    }
                }
            }
        }
        let full = proposals.len() >= MAX_PROPOSALS_PER_PASS;
        let keys: Vec<(String, bool)> = proposals
            .iter()
            .map(|c| {
                (
                    c.session_key().to_owned(),
                    matches!(c, Command::AutoEnd { .. }),
                )
            })
            .collect();
        // Submitted together, so the writer commits them in a few batches, not one by one.
        let outcomes = join_all(proposals.into_iter().map(|c| self.engine.submit(c))).await;
        let mut deferred = 0;
        for ((session_key, auto_end), outcome) in keys.into_iter().zip(outcomes) {
            match outcome {
                Ok(Decision::AppendAll(_)) if auto_end => {
                    info!(session_key = %session_key, "session auto-ended");
                }
                Ok(_) | Err(WriteError::Rejected(_)) => {}
                Err(WriteError::ShuttingDown) => return false,
                Err(e @ (WriteError::Overloaded(_) | WriteError::Unavailable(_))) => {
                    if deferred == 0 {
                        warn!(error = %e, "sweeping deferred to the next pass");
                    }
                    deferred += 1;
                }
            }
        }
        full && deferred == 0
    }

    fn trim(&self) {
        if !self.engine.trim_feed() {
            warn!("the write queue is full; trimming the feed waits for the next round");
        }
    }
}
