//! Load scenarios against Pitwall: one kind of request per scenario, sent by `concurrency`
//! loops over a few connections, reported against the `health` scenario of the same run.
//!
//! - `health`: gRPC health `Check`, the cheapest RPC the server has: the transport's limit.
//! - `create`: `CreateSession` with five details (durable: each answer follows an fsync).
//! - `update`: `UpdateSessionDetails` of pre-created sessions, changing a value every time
//!   (an unchanged value would skip the write).
//! - `get`: `GetSessionInfo` of pre-created sessions (a read of the projection).
//! - `end`: `EndSession` of sessions created earlier, each ended once.
//! - `mixed`: session lives: create with five details, three detail updates, two reads, end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use pitwall_proto::api::session_management_service_client::SessionManagementServiceClient;
use pitwall_proto::api::{
    CreateSessionRequest, EndSessionRequest, GetSessionInfoRequest, UpdateSessionDetailsRequest,
};
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::connection::{self, pick};
use crate::driver::{self, Pace, Step, StepError};
use crate::payload;
use crate::process::CpuTimes;
use crate::report::LoadResult;
use crate::server::Target;

pub type SessionClient = SessionManagementServiceClient<Channel>;

/// The data source the load scenarios create sessions in.
pub const DATA_SOURCE: &str = "bench";
/// Sessions `update` and `get` cycle over when no `create` ran before them.
const READ_SESSIONS: usize = 1_000;
/// Most sessions `update` and `get` cycle over: enough that concurrent loops seldom touch the
/// same session at once, few enough to be a working set of active sessions.
const WORKING_SET: usize = 10_000;
/// Open-loop `end` needs a session per request; made with this margin over rate × time.
const END_POOL_MARGIN: f64 = 1.1;
/// Requests in one session life of `mixed`.
pub const MIXED_REQUESTS_PER_LIFE: usize = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Health,
    Create,
    Update,
    Get,
    End,
    Mixed,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Health,
        Scenario::Create,
        Scenario::Update,
        Scenario::Get,
        Scenario::End,
        Scenario::Mixed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Health => "health",
            Scenario::Create => "create",
            Scenario::Update => "update",
            Scenario::Get => "get",
            Scenario::End => "end",
            Scenario::Mixed => "mixed",
        }
    }
}

/// How hard and how long the loops send.
#[derive(Debug, Clone, clap::Args)]
pub struct Shape {
    /// Loops with one request in flight each.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the loops are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Seconds each scenario is measured for.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds each scenario runs before it is measured.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Open loop at this many requests per second in total [default: closed loop].
    #[arg(long)]
    pub rate: Option<f64>,
}

impl Shape {
    pub fn pace(&self) -> Pace {
        match self.rate {
            Some(rate) => Pace::Open { rate },
            None => Pace::Closed,
        }
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration.max(0.0))
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup.max(0.0))
    }
}

/// Sessions created in this run, for the scenarios that need existing ones.
#[derive(Default)]
pub struct Sessions {
    keys: Vec<String>,
    /// Keys before this index have been handed to `end`.
    ended: usize,
}

/// Runs `scenarios` in order against `target`. A closed-loop `health` run at the same
/// concurrency comes first, as the reference every result is compared with.
pub async fn run_load(
    target: &Target,
    shape: &Shape,
    scenarios: &[Scenario],
) -> anyhow::Result<Vec<LoadResult>> {
    let channels = connection::connect(target.url(), shape.connections).await?;
    let closed = Shape {
        rate: None,
        ..shape.clone()
    };
    let health = measure(
        target,
        &channels,
        &closed,
        Scenario::Health,
        &mut Sessions::default(),
    )
    .await?;
    let reference = health.throughput;
    let mut sessions = Sessions::default();
    let mut results = Vec::new();
    for &scenario in scenarios {
        let mut result = if scenario == Scenario::Health && shape.rate.is_none() {
            health.clone()
        } else {
            measure(target, &channels, shape, scenario, &mut sessions).await?
        };
        result.vs_health = (reference > 0.0).then(|| result.throughput / reference);
        results.push(result);
    }
    Ok(results)
}

/// Measures one scenario: warm-up, then `shape.duration` of requests, with the server's
/// memory before and after.
pub async fn measure(
    target: &Target,
    channels: &[Channel],
    shape: &Shape,
    scenario: Scenario,
    sessions: &mut Sessions,
) -> anyhow::Result<LoadResult> {
    let n = shape.concurrency.max(1);
    match scenario {
        Scenario::Health => {
            let loops = (0..n)
                .map(|i| HealthStep {
                    client: HealthClient::new(pick(channels, i)),
                })
                .collect();
            Ok(timed(target, shape, scenario, loops).await?.0)
        }
        Scenario::Create => {
            let loops = (0..n)
                .map(|i| CreateStep::new(pick(channels, i), DATA_SOURCE, i, n))
                .collect();
            let (result, loops) = timed(target, shape, scenario, loops).await?;
            for step in loops {
                sessions.keys.extend(step.keys);
            }
            Ok(result)
        }
        Scenario::Update | Scenario::Get => {
            if sessions.keys.is_empty() {
                sessions.keys = create_sessions(channels, n, READ_SESSIONS).await?;
            }
            // Sessions not ended yet: updates and reads of live sessions are the common case.
            let keys: Arc<[String]> = sessions.keys[sessions.ended..]
                .iter()
                .take(WORKING_SET)
                .cloned()
                .collect();
            if scenario == Scenario::Update {
                let loops = (0..n)
                    .map(|i| UpdateStep {
                        client: SessionClient::new(pick(channels, i)),
                        keys: keys.clone(),
                        index: i,
                        stride: n,
                        lap: (i as u64) << 32,
                    })
                    .collect();
                Ok(timed(target, shape, scenario, loops).await?.0)
            } else {
                let loops = (0..n)
                    .map(|i| GetStep {
                        client: SessionClient::new(pick(channels, i)),
                        keys: keys.clone(),
                        index: i,
                        stride: n,
                    })
                    .collect();
                Ok(timed(target, shape, scenario, loops).await?.0)
            }
        }
        Scenario::End => {
            let needed = match shape.rate {
                Some(rate) => {
                    (rate * (shape.duration + shape.warmup) * END_POOL_MARGIN).ceil() as usize + n
                }
                None => 0,
            };
            let available = sessions.keys.len() - sessions.ended;
            if available == 0 && shape.rate.is_none() {
                // Without a create run before, make as many as a create run would.
                let loops = (0..n)
                    .map(|i| CreateStep::new(pick(channels, i), DATA_SOURCE, i, n))
                    .collect();
                let total = shape.duration() + shape.warmup();
                let created = driver::run(loops, Pace::Closed, total).await?;
                for step in created.loops {
                    sessions.keys.extend(step.keys);
                }
            } else if available < needed {
                let more = create_sessions(channels, n, needed - available).await?;
                sessions.keys.extend(more);
            }
            let keys: Arc<[String]> = sessions.keys[sessions.ended..].iter().cloned().collect();
            sessions.ended = sessions.keys.len();
            let next = Arc::new(AtomicUsize::new(0));
            let loops = (0..n)
                .map(|i| EndStep {
                    client: SessionClient::new(pick(channels, i)),
                    keys: keys.clone(),
                    next: next.clone(),
                })
                .collect();
            Ok(timed(target, shape, scenario, loops).await?.0)
        }
        Scenario::Mixed => {
            let loops = (0..n)
                .map(|i| MixedStep {
                    creator: CreateStep::new(pick(channels, i), DATA_SOURCE, i, n),
                    client: SessionClient::new(pick(channels, i)),
                    life: None,
                })
                .collect();
            Ok(timed(target, shape, scenario, loops).await?.0)
        }
    }
}

/// Warm-up, then the measured run; returns the result and the loops.
async fn timed<S: Step>(
    target: &Target,
    shape: &Shape,
    scenario: Scenario,
    loops: Vec<S>,
) -> anyhow::Result<(LoadResult, Vec<S>)> {
    let pace = shape.pace();
    let concurrency = loops.len();
    let loops = if shape.warmup > 0.0 {
        driver::run(loops, pace, shape.warmup()).await?.loops
    } else {
        loops
    };
    let rss_before = target.resident_bytes()?;
    let cpu_before = CpuTimes::read(target.pid());
    let outcome = driver::run(loops, pace, shape.duration()).await?;
    let cpu = cpu_before.per_request(&CpuTimes::read(target.pid()), outcome.succeeded);
    let rss_after = target.resident_bytes()?;
    let result = LoadResult {
        scenario: scenario.name().to_owned(),
        pace: pace.label(),
        concurrency,
        connections: shape.connections,
        requests: outcome.succeeded,
        errors: outcome.failed,
        unsent: outcome.unsent,
        seconds: outcome.elapsed.as_secs_f64(),
        throughput: outcome.throughput(),
        vs_health: None,
        latency: outcome.latencies.percentiles(),
        cpu,
        rss_before_mib: rss_before.map(crate::process::mib),
        rss_after_mib: rss_after.map(crate::process::mib),
        first_error: outcome.first_error.clone(),
    };
    Ok((result, outcome.loops))
}

/// Creates `count` sessions (five details each) with `concurrency` loops, as fast as the
/// server takes them; returns their keys in no particular order. Fails if any create fails.
pub async fn create_sessions(
    channels: &[Channel],
    concurrency: usize,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let remaining = Arc::new(AtomicUsize::new(count));
    let loops = (0..concurrency.max(1))
        .map(|i| {
            let mut step = CreateStep::new(pick(channels, i), DATA_SOURCE, i, concurrency);
            step.quota = Some(remaining.clone());
            step
        })
        .collect();
    // Ends when the quota is used up; the duration only bounds a server that stopped answering.
    let outcome = driver::run(loops, Pace::Closed, Duration::from_secs(24 * 3600)).await?;
    if outcome.failed > 0 {
        bail!(
            "{} of {count} creates failed while preparing sessions; first: {}",
            outcome.failed,
            outcome.first_error.unwrap_or_default()
        );
    }
    Ok(outcome
        .loops
        .into_iter()
        .flat_map(|step| step.keys)
        .collect())
}

/// The reason of a `success = false` answer, from the `pitwall-error` metadata.
fn refused<T>(response: &Response<T>) -> StepError {
    let reason = response
        .metadata()
        .get("pitwall-error")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("no reason given");
    StepError::Failed(format!("refused: {reason}"))
}

fn status(status: Status) -> StepError {
    StepError::Failed(format!("{:?}: {}", status.code(), status.message()))
}

struct HealthStep {
    client: HealthClient<Channel>,
}

impl Step for HealthStep {
    async fn step(&mut self, _scheduled: Instant) -> Result<(), StepError> {
        let response = self
            .client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(status)?;
        if response.get_ref().status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            Err(StepError::Failed(format!(
                "health status {}",
                response.get_ref().status
            )))
        }
    }
}

/// Creates sessions; keeps their keys.
pub struct CreateStep {
    client: SessionClient,
    data_source: Arc<str>,
    /// Numbers the sessions this loop creates (loop index + k × loops), for varied payloads.
    n: u64,
    stride: u64,
    /// Creates left for all loops together; `None` runs until the deadline.
    quota: Option<Arc<AtomicUsize>>,
    pub keys: Vec<String>,
}

impl CreateStep {
    pub fn new(channel: Channel, data_source: &str, index: usize, loops: usize) -> CreateStep {
        CreateStep {
            client: SessionClient::new(channel),
            data_source: data_source.into(),
            n: index as u64,
            stride: loops.max(1) as u64,
            quota: None,
            keys: Vec::new(),
        }
    }

    /// Sends one create; returns the new key.
    pub async fn create(&mut self) -> Result<String, StepError> {
        let request: CreateSessionRequest = payload::create_request(&self.data_source, self.n);
        self.n += self.stride;
        let response = self.client.create_session(request).await.map_err(status)?;
        if !response.get_ref().success {
            return Err(refused(&response));
        }
        Ok(response.into_inner().session_key)
    }
}

impl Step for CreateStep {
    async fn step(&mut self, _scheduled: Instant) -> Result<(), StepError> {
        if let Some(quota) = &self.quota {
            let claimed = quota.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(1)
            });
            if claimed.is_err() {
                return Err(StepError::Exhausted);
            }
        }
        let key = self.create().await?;
        self.keys.push(key);
        Ok(())
    }
}

struct UpdateStep {
    client: SessionClient,
    keys: Arc<[String]>,
    index: usize,
    stride: usize,
    /// A value no other update of this session used, so every update is a real write.
    lap: u64,
}

/// A detail update that always changes a value.
fn detail_update(session_key: &str, lap: u64) -> UpdateSessionDetailsRequest {
    UpdateSessionDetailsRequest {
        session_key: session_key.to_owned(),
        details: BTreeMap::from([("lap".to_owned(), lap.to_string())]),
    }
}

impl Step for UpdateStep {
    async fn step(&mut self, _scheduled: Instant) -> Result<(), StepError> {
        let key = &self.keys[self.index % self.keys.len()];
        self.index += self.stride;
        self.lap += 1;
        let response = self
            .client
            .update_session_details(detail_update(key, self.lap))
            .await
            .map_err(status)?;
        succeeded(&response, response.get_ref().success)
    }
}

struct GetStep {
    client: SessionClient,
    keys: Arc<[String]>,
    index: usize,
    stride: usize,
}

impl Step for GetStep {
    async fn step(&mut self, _scheduled: Instant) -> Result<(), StepError> {
        let key = &self.keys[self.index % self.keys.len()];
        self.index += self.stride;
        let response = self
            .client
            .get_session_info(GetSessionInfoRequest {
                session_key: key.clone(),
            })
            .await
            .map_err(status)?;
        let info = response.get_ref();
        if !info.success {
            return Err(refused(&response));
        }
        if info.details.len() < payload::DETAILS_PER_SESSION {
            return Err(StepError::Failed(format!(
                "session {key} has {} details, expected at least {}",
                info.details.len(),
                payload::DETAILS_PER_SESSION
            )));
        }
        Ok(())
    }
}

struct EndStep {
    client: SessionClient,
    keys: Arc<[String]>,
    /// The next key to end, shared by all loops so each session is ended once.
    next: Arc<AtomicUsize>,
}

impl Step for EndStep {
    async fn step(&mut self, _scheduled: Instant) -> Result<(), StepError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let Some(key) = self.keys.get(index) else {
            return Err(StepError::Exhausted);
        };
        let response = self
            .client
            .end_session(EndSessionRequest {
                session_key: key.clone(),
                ..Default::default()
            })
            .await
            .map_err(status)?;
        let ended = response.get_ref();
        succeeded(&response, ended.success && ended.end_session.is_some())
    }
}

/// One request of a session life per step: create, 3 × update, 2 × get, end.
struct MixedStep {
    creator: CreateStep,
    client: SessionClient,
    /// The session of the current life and the requests sent in it since its create.
    life: Option<(String, usize)>,
}

impl Step for MixedStep {
    async fn step(&mut self, _scheduled: Instant) -> Result<(), StepError> {
        let Some((key, done)) = self.life.take() else {
            // A life starts with its create; after a failed create the next step tries again.
            let key = self.creator.create().await?;
            self.life = Some((key, 0));
            return Ok(());
        };
        let done = done + 1;
        if done < MIXED_REQUESTS_PER_LIFE - 1 {
            self.life = Some((key.clone(), done));
        }
        match done {
            1..=3 => {
                let response = self
                    .client
                    .update_session_details(detail_update(&key, done as u64))
                    .await
                    .map_err(status)?;
                succeeded(&response, response.get_ref().success)
            }
            4 | 5 => {
                let response = self
                    .client
                    .get_session_info(GetSessionInfoRequest { session_key: key })
                    .await
                    .map_err(status)?;
                succeeded(&response, response.get_ref().success)
            }
            _ => {
                let response = self
                    .client
                    .end_session(EndSessionRequest {
                        session_key: key,
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?;
                succeeded(&response, response.get_ref().success)
            }
        }
    }
}

/// `Ok` for a `success = true` answer, else the refusal with its reason.
fn succeeded<T>(response: &Response<T>, success: bool) -> Result<(), StepError> {
    if success {
        Ok(())
    } else {
        Err(refused(response))
    }
}
