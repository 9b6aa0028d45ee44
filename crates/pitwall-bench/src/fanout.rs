//! Notification fan-out: many subscribers on one data source while sessions are created at a
//! fixed rate. Every subscriber must receive every session, once, in creation order; the
//! latency is from the create's acknowledgement (and from its send) to each receipt.
//!
//! The machinery is shared with the etcd peer ([`crate::etcd`]): a system supplies subscriber
//! [`Feed`]s that are already registered, writer loops that record their [`Write`]s, and the
//! order it applied the writes in.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use pitwall_proto::api::{
    GetCurrentSessionsRequest, GetSessionStartNotificationRequest,
    GetSessionStartNotificationResponse,
};
use tokio::sync::watch;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::connection::{self, pick};
use crate::driver::{self, Step, StepError};
use crate::latency::Latencies;
use crate::process::CpuTimes;
use crate::report::{CpuPerRequest, FanoutResult};
use crate::scenario::{CreateStep, SessionClient};
use crate::server::Target;

/// How long subscribers may take, after the last write, to receive what is still on its way;
/// anything later counts as missed.
const DRAIN_PATIENCE: Duration = Duration::from_secs(15);
/// Subscriptions opened at once while registering subscribers.
const SUBSCRIBE_PARALLELISM: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Subscribers to one data source.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Sessions created per second while the subscribers listen.
    #[arg(long = "create-rate", default_value_t = 1000.0)]
    pub create_rate: f64,
    /// Seconds of creating.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// HTTP/2 connections the subscribers are spread over.
    #[arg(long = "subscriber-connections", default_value_t = 4)]
    pub subscriber_connections: usize,
    /// Loops creating sessions (open loop at --create-rate in total).
    #[arg(long, default_value_t = 16)]
    pub writers: usize,
}

/// One acknowledged write: its key, when it was due to be sent, when it was acknowledged, and
/// (etcd) the store revision it got.
#[derive(Debug, Clone, Copy)]
pub struct Write {
    pub key: u128,
    pub sent: Instant,
    pub acked: Instant,
    pub revision: i64,
}

/// One subscriber's stream, registered before the first write.
pub trait Feed: Send + 'static {
    /// The keys of the next message (etcd batches several), or `None` when the stream ended.
    fn next(&mut self) -> impl Future<Output = anyhow::Result<Option<Vec<u128>>>> + Send;
}

/// A writer loop that keeps what it wrote.
pub trait Writer: Step {
    fn writes(&mut self) -> Vec<Write>;
}

/// What the subscribers received.
pub struct Receipts {
    /// Per subscriber: each key with the moment it arrived.
    pub keys: Vec<Vec<(u128, Instant)>>,
    pub stream_errors: u64,
    pub first_error: Option<String>,
}

/// What the writers did.
pub struct Writes {
    pub writes: Vec<Write>,
    pub errors: u64,
    /// Writes due but never sent: the system could not keep up with the rate.
    pub unsent: u64,
    pub first_error: Option<String>,
}

/// Runs the writers open-loop at `rate` for `seconds` while every feed records what it gets.
pub async fn run<F: Feed, W: Writer>(
    feeds: Vec<F>,
    writers: Vec<W>,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<(Writes, Receipts)> {
    let expected = (rate * seconds).ceil() as usize;
    // None while writing; then the number of writes and the deadline to receive them by.
    let (finished, finish) = watch::channel(None);
    let tasks: Vec<_> = feeds
        .into_iter()
        .map(|feed| tokio::spawn(receive(feed, expected, finish.clone())))
        .collect();
    let outcome = driver::run(
        writers,
        driver::Pace::Open { rate },
        Duration::from_secs_f64(seconds.max(0.0)),
    )
    .await?;
    let mut writes: Vec<Write> = Vec::with_capacity(outcome.succeeded as usize);
    for mut writer in outcome.loops {
        writes.extend(writer.writes());
    }
    let _ = finished.send(Some((writes.len(), Instant::now() + DRAIN_PATIENCE)));
    let mut receipts = Receipts {
        keys: Vec::with_capacity(tasks.len()),
        stream_errors: 0,
        first_error: None,
    };
    for task in tasks {
        let (keys, error) = task.await?;
        if let Some(error) = error {
            receipts.stream_errors += 1;
            receipts.first_error.get_or_insert(error);
        }
        receipts.keys.push(keys);
    }
    Ok((
        Writes {
            writes,
            errors: outcome.failed,
            unsent: outcome.unsent,
            first_error: outcome.first_error,
        },
        receipts,
    ))
}

/// One subscriber: records every key until it has as many as were written, or the deadline.
async fn receive<F: Feed>(
    mut feed: F,
    expected: usize,
    mut finish: watch::Receiver<Option<(usize, Instant)>>,
) -> (Vec<(u128, Instant)>, Option<String>) {
    let mut keys = Vec::with_capacity(expected);
    loop {
        let finished = *finish.borrow_and_update();
        if let Some((count, deadline)) = finished
            && (keys.len() >= count || Instant::now() >= deadline)
        {
            return (keys, None);
        }
        let deadline = finished.map(|(_, deadline)| deadline);
        tokio::select! {
            message = feed.next() => match message {
                Ok(Some(batch)) => {
                    let now = Instant::now();
                    keys.extend(batch.into_iter().map(|key| (key, now)));
                }
                Ok(None) => return (keys, Some("stream ended early".to_owned())),
                Err(e) => return (keys, Some(format!("{e:#}"))),
            },
            changed = finish.changed(), if finished.is_none() => {
                if changed.is_err() {
                    return (keys, None);
                }
            }
            () = sleep_until(deadline), if deadline.is_some() => return (keys, None),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Checks every subscriber's receipts against `order` (the keys in the order the system
/// applied them) and measures latencies.
pub fn check(
    system: &str,
    subscribers: usize,
    rate: f64,
    order: &[u128],
    writes: &Writes,
    receipts: &Receipts,
) -> FanoutResult {
    let rank: HashMap<u128, usize> = order.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    let by_key: HashMap<u128, &Write> = writes.writes.iter().map(|w| (w.key, w)).collect();
    let (mut delivered, mut missed, mut reordered, mut duplicates, mut unexpected) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut before_ack = 0u64;
    let mut from_ack = Latencies::default();
    let mut from_send = Latencies::default();
    let mut write_latency = Latencies::default();
    for write in &writes.writes {
        write_latency.record(write.acked.saturating_duration_since(write.sent));
    }
    let mut seen = vec![false; order.len()];
    for keys in &receipts.keys {
        seen.fill(false);
        let mut latest: Option<usize> = None;
        let mut distinct = 0u64;
        for (key, at) in keys {
            let Some(&position) = rank.get(key) else {
                unexpected += 1;
                continue;
            };
            if seen[position] {
                duplicates += 1;
                continue;
            }
            seen[position] = true;
            distinct += 1;
            if latest.is_some_and(|latest| position < latest) {
                reordered += 1;
            }
            latest = latest.max(Some(position));
            if let Some(write) = by_key.get(key) {
                match at.checked_duration_since(write.acked) {
                    Some(latency) => from_ack.record(latency),
                    None => {
                        before_ack += 1;
                        from_ack.record(Duration::ZERO);
                    }
                }
                from_send.record(at.saturating_duration_since(write.sent));
            }
        }
        delivered += distinct;
        missed += order.len() as u64 - distinct;
    }
    // Sessions the system applied but that no one acknowledged, or the reverse, are missed too.
    let unacknowledged = order.iter().filter(|k| !by_key.contains_key(k)).count() as u64;
    let unlisted = by_key.keys().filter(|k| !rank.contains_key(k)).count() as u64;
    let receipts_total = from_ack.count().max(1);
    FanoutResult {
        system: system.to_owned(),
        subscribers,
        rate,
        writes: writes.writes.len() as u64,
        unsent: writes.unsent,
        write_errors: writes.errors + unacknowledged + unlisted,
        expected: order.len() as u64 * subscribers as u64,
        delivered,
        missed,
        reordered,
        duplicates,
        unexpected,
        stream_errors: receipts.stream_errors,
        from_ack: from_ack.percentiles(),
        from_send: from_send.percentiles(),
        before_ack: before_ack as f64 / receipts_total as f64,
        write_latency: write_latency.percentiles(),
        writer_us_per_write: None,
        cpu: CpuPerRequest::default(),
        rss_before_mib: None,
        rss_after_mib: None,
        first_error: writes
            .first_error
            .clone()
            .or_else(|| receipts.first_error.clone()),
    }
}

/// A session key as a number, to keep millions of receipts compact.
pub fn key_number(key: &str) -> anyhow::Result<u128> {
    uuid::Uuid::parse_str(key)
        .map(|uuid| uuid.as_u128())
        .with_context(|| format!("'{key}' is not a UUID session key"))
}

/// Fan-out on Pitwall: `GetSessionStartNotification` subscribers, `CreateSession` writers.
pub async fn run_pitwall(target: &Target, args: &FanoutArgs) -> anyhow::Result<FanoutResult> {
    let data_source = fresh_data_source("fanout");
    let channels = connection::connect(target.url(), args.subscriber_connections).await?;
    let feeds: Vec<PitwallFeed> = futures::stream::iter(0..args.subscribers)
        .map(|i| subscribe(pick(&channels, i), data_source.clone()))
        .buffer_unordered(SUBSCRIBE_PARALLELISM)
        .try_collect()
        .await?;
    let creates = Creates {
        rate: args.create_rate,
        seconds: args.seconds,
        writers: args.writers,
    };
    measure_pitwall(target, "pitwall", &data_source, feeds, &creates).await
}

/// A data source no earlier run used.
pub fn fresh_data_source(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// How sessions are created while subscribers listen.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Creates {
    /// Sessions created per second while the subscribers listen.
    #[arg(long = "create-rate", default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of creating.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Loops creating sessions (open loop at --create-rate in total).
    #[arg(long, default_value_t = 16)]
    pub writers: usize,
}

/// Creates sessions in `data_source` as `creates` says while `feeds` (already registered) listen, then
/// checks what each received against the order Pitwall lists them in, and times it.
pub async fn measure_pitwall<F: Feed>(
    target: &Target,
    system: &str,
    data_source: &str,
    feeds: Vec<F>,
    creates: &Creates,
) -> anyhow::Result<FanoutResult> {
    let subscribers = feeds.len();
    let writer_channels = connection::connect(target.url(), 1).await?;
    let writers: Vec<CreateWriter> = (0..creates.writers.max(1))
        .map(|i| CreateWriter {
            create: CreateStep::new(pick(&writer_channels, i), data_source, i, creates.writers),
            writes: Vec::new(),
        })
        .collect();
    let rss_before = target.resident_bytes()?;
    let cpu_before = CpuTimes::read(target.pid());
    let (writes, receipts) = run(feeds, writers, creates.rate, creates.seconds).await?;
    let cpu_after = CpuTimes::read(target.pid());
    let rss_after = target.resident_bytes()?;
    let mut client =
        SessionClient::new(pick(&writer_channels, 0)).max_decoding_message_size(usize::MAX);
    let listed = client
        .get_current_sessions(GetCurrentSessionsRequest {
            data_source: data_source.to_owned(),
        })
        .await
        .context("GetCurrentSessions after the fan-out failed")?
        .into_inner();
    let order = listed
        .session_keys
        .iter()
        .map(|key| key_number(key))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut result = check(
        system,
        subscribers,
        creates.rate,
        &order,
        &writes,
        &receipts,
    );
    result.cpu = cpu_before.per_request(&cpu_after, result.delivered);
    result.writer_us_per_write = cpu_before.per_request(&cpu_after, result.writes).writer_us;
    result.rss_before_mib = rss_before.map(crate::process::mib);
    result.rss_after_mib = rss_after.map(crate::process::mib);
    Ok(result)
}

/// Subscribes; returns once the response headers arrived, which the server sends when the
/// subscription is registered.
async fn subscribe(channel: Channel, data_source: String) -> anyhow::Result<PitwallFeed> {
    let stream = SessionClient::new(channel)
        .get_session_start_notification(GetSessionStartNotificationRequest { data_source })
        .await
        .context("GetSessionStartNotification failed")?
        .into_inner();
    Ok(PitwallFeed(stream))
}

struct PitwallFeed(Streaming<GetSessionStartNotificationResponse>);

impl Feed for PitwallFeed {
    async fn next(&mut self) -> anyhow::Result<Option<Vec<u128>>> {
        match self.0.message().await? {
            Some(notification) => Ok(Some(vec![key_number(&notification.session_key)?])),
            None => Ok(None),
        }
    }
}

struct CreateWriter {
    create: CreateStep,
    writes: Vec<Write>,
}

impl Step for CreateWriter {
    async fn step(&mut self, scheduled: Instant) -> Result<(), StepError> {
        let key = self.create.create().await?;
        let acked = Instant::now();
        let key = key_number(&key).map_err(|e| StepError::Failed(format!("{e:#}")))?;
        self.writes.push(Write {
            key,
            sent: scheduled,
            acked,
            revision: 0,
        });
        Ok(())
    }
}

impl Writer for CreateWriter {
    fn writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: u128, at: Instant) -> Write {
        Write {
            key,
            sent: at,
            acked: at,
            revision: 0,
        }
    }

    #[test]
    fn in_order_complete_receipts_pass() {
        let t = Instant::now();
        let writes = Writes {
            writes: vec![write(1, t), write(2, t)],
            errors: 0,
            unsent: 0,
            first_error: None,
        };
        let receipts = Receipts {
            keys: vec![vec![(1, t), (2, t)], vec![(1, t), (2, t)]],
            stream_errors: 0,
            first_error: None,
        };
        let result = check("x", 2, 1.0, &[1, 2], &writes, &receipts);
        assert_eq!((result.delivered, result.expected), (4, 4));
        assert_eq!(result.missed + result.reordered + result.duplicates, 0);
    }

    #[test]
    fn missing_reordered_and_repeated_receipts_are_counted() {
        let t = Instant::now();
        let writes = Writes {
            writes: vec![write(1, t), write(2, t), write(3, t)],
            errors: 0,
            unsent: 0,
            first_error: None,
        };
        let receipts = Receipts {
            keys: vec![vec![(2, t), (1, t), (1, t), (9, t)]],
            stream_errors: 0,
            first_error: None,
        };
        let result = check("x", 1, 1.0, &[1, 2, 3], &writes, &receipts);
        assert_eq!(result.missed, 1);
        assert_eq!(result.reordered, 1);
        assert_eq!(result.duplicates, 1);
        assert_eq!(result.unexpected, 1);
    }
}
