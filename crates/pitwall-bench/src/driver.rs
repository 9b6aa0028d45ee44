//! Request loops: `concurrency` loops, each with one request in flight at a time, either
//! closed-loop (the next request leaves as soon as the previous one is answered: the most the
//! server does) or open-loop at a fixed total rate.
//!
//! Open-loop latency is measured from the time a request was scheduled to leave, not from
//! when it actually left: a loop stuck behind a slow answer sends late, and that wait is part
//! of what a client sending at this rate would see (no coordinated omission). Every request
//! due before the end is sent, late if need be, unless the loop is still behind once the run
//! has lasted twice its duration: those are counted as unsent.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::latency::Latencies;

/// How fast the loops send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Back to back: maximum throughput.
    Closed,
    /// `rate` requests per second in total, spread evenly over the loops.
    Open { rate: f64 },
}

impl Pace {
    pub fn label(self) -> String {
        match self {
            Pace::Closed => "closed".to_owned(),
            Pace::Open { rate } => format!("open {rate:.0}/s"),
        }
    }
}

/// Why one request did not count as a success.
#[derive(Debug)]
pub enum StepError {
    /// The request failed (a gRPC status, or `success = false`); the loop goes on.
    Failed(String),
    /// The loop has nothing left to do (every pre-created session was ended); it stops.
    Exhausted,
}

/// One loop's request: what it sends and how it checks the answer. A loop's state (its client,
/// its place in a session's life) lives in the implementing value.
pub trait Step: Send + 'static {
    /// Sends one request and waits for its answer. `scheduled` is when it was due to leave.
    fn step(&mut self, scheduled: Instant) -> impl Future<Output = Result<(), StepError>> + Send;
}

/// What the loops did.
pub struct Outcome<S> {
    /// The loops, handed back so their state (recorded keys, sessions) can be read.
    pub loops: Vec<S>,
    pub succeeded: u64,
    pub failed: u64,
    /// Open loop only: requests due before the end but still not sent when the run had
    /// lasted twice its duration (the server could not keep up with the rate).
    pub unsent: u64,
    /// From the start until the last loop finished.
    pub elapsed: Duration,
    /// Latencies of successful requests.
    pub latencies: Latencies,
    pub first_error: Option<String>,
}

impl<S> Outcome<S> {
    /// Successful requests per second.
    pub fn throughput(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.succeeded as f64 / seconds
        } else {
            0.0
        }
    }
}

struct LoopOutcome<S> {
    state: S,
    succeeded: u64,
    failed: u64,
    unsent: u64,
    latencies: Latencies,
    first_error: Option<String>,
}

/// Runs every loop for `duration` at `pace`, each in its own task.
pub async fn run<S: Step>(
    loops: Vec<S>,
    pace: Pace,
    duration: Duration,
) -> anyhow::Result<Outcome<S>> {
    let count = loops.len().max(1);
    let start = Instant::now();
    let deadline = start + duration;
    let hard_stop = deadline + duration;
    let tasks: Vec<_> = loops
        .into_iter()
        .enumerate()
        .map(|(index, state)| {
            let schedule = match pace {
                Pace::Closed => None,
                Pace::Open { rate } => {
                    let rate = rate.max(f64::MIN_POSITIVE);
                    // Loop `index` sends at start + index/rate, then every count/rate.
                    Some((
                        start + Duration::from_secs_f64(index as f64 / rate),
                        Duration::from_secs_f64(count as f64 / rate),
                    ))
                }
            };
            tokio::spawn(run_loop(state, deadline, hard_stop, schedule))
        })
        .collect();
    let mut outcome = Outcome {
        loops: Vec::with_capacity(count),
        succeeded: 0,
        failed: 0,
        unsent: 0,
        elapsed: Duration::ZERO,
        latencies: Latencies::default(),
        first_error: None,
    };
    for task in tasks {
        let done = task.await?;
        outcome.succeeded += done.succeeded;
        outcome.failed += done.failed;
        outcome.unsent += done.unsent;
        outcome.latencies.add(&done.latencies);
        if outcome.first_error.is_none() {
            outcome.first_error = done.first_error;
        }
        outcome.loops.push(done.state);
    }
    outcome.elapsed = start.elapsed();
    Ok(outcome)
}

async fn run_loop<S: Step>(
    mut state: S,
    deadline: Instant,
    hard_stop: Instant,
    schedule: Option<(Instant, Duration)>,
) -> LoopOutcome<S> {
    let (mut succeeded, mut failed, mut unsent) = (0, 0, 0);
    let mut latencies = Latencies::default();
    let mut first_error = None;
    let mut next = schedule.map(|(first, _)| first);
    loop {
        let scheduled = match (next, schedule) {
            (Some(due), Some((_, interval))) => {
                if due >= deadline {
                    break;
                }
                if Instant::now() >= hard_stop {
                    // Due before the end, but the loop fell too far behind to send them.
                    let behind = deadline.duration_since(due).as_nanos();
                    unsent += behind.div_ceil(interval.as_nanos().max(1)) as u64;
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                next = Some(due + interval);
                due
            }
            _ => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                now
            }
        };
        match state.step(scheduled).await {
            Ok(()) => {
                succeeded += 1;
                latencies.record(scheduled.elapsed());
            }
            Err(StepError::Failed(message)) => {
                failed += 1;
                first_error.get_or_insert(message);
            }
            Err(StepError::Exhausted) => break,
        }
    }
    LoopOutcome {
        state,
        succeeded,
        failed,
        unsent,
        latencies,
        first_error,
    }
}
