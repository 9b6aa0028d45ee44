//! The Kafka log: the reference's `SessionInfo` topic, shared by every instance.
//!
//! A follower thread reads the topic from the start and applies every record (this
//! instance's and everyone else's) through the [`Applier`], so the topic's order is the order
//! of state, notifications and the feed everywhere; a position is the record's offset plus one.
//! [`Log::append`] produces a batch and returns once this instance's follower has applied it.
//! A broker-watch thread reports whether the broker answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pitwall_store::kafka::{Follower, KafkaOptions, KafkaStoreError};
use prost_types::Timestamp;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Batch, Context, Log, LogError, LogHealth, Position, StartLogError};
use crate::apply::{Applied, Applier};
use crate::clock::Clock;
use crate::feed::FeedWindow;
use crate::shutdown::Shutdown;

pub use pitwall_store::kafka::StreamLayout;

/// How the topic is reached.
pub type Settings = KafkaOptions;

/// How long the follower waits for a message before checking whether it should stop.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long `streams` answers from its cache before asking the broker again.
const STREAMS_CACHE_TTL: Duration = Duration::from_secs(1);
/// How often the broker is asked whether it is there.
const BROKER_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long to wait between attempts to reach the broker at startup.
const CONNECT_RETRY: Duration = Duration::from_secs(2);

pub struct KafkaLog {
    broker: Arc<pitwall_store::kafka::KafkaLog>,
    applied: Arc<AppliedOffsets>,
    layout: StreamLayout,
    timeout: Duration,
    streams_cache: Mutex<HashMap<String, (Instant, Vec<String>)>>,
    health: watch::Sender<LogHealth>,
    metrics: crate::metrics::Metrics,
    /// The follower and broker-watch threads, stopped by [`Log::close`].
    threads: Mutex<Vec<Owned>>,
}

/// A thread this log started, and how to tell it to stop.
struct Owned {
    stop: Arc<AtomicBool>,
    wake: Option<std::sync::mpsc::Sender<()>>,
    thread: JoinHandle<()>,
}

impl Owned {
    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        drop(self.wake);
        let _ = self.thread.join();
    }
}

impl KafkaLog {
    /// Connects (retrying until the broker answers or shutdown), replays the topic up to the
    /// end offsets read now, and keeps following it. `None` if shutdown began first. Blocking.
    pub fn start(settings: Settings, context: Context) -> Result<Option<KafkaLog>, StartLogError> {
        let Context {
            applier,
            clock,
            layout,
            shutdown,
            ..
        } = context;
        let timeout = settings.timeout;
        let broker = loop {
            match pitwall_store::kafka::KafkaLog::connect(settings.clone()) {
                Ok(broker) => break broker,
                Err(e @ KafkaStoreError::Unreachable { .. }) => {
                    warn!(error = %e, "waiting for the Kafka broker");
                    if shutdown.is_triggered() {
                        return Ok(None);
                    }
                    std::thread::sleep(CONNECT_RETRY);
                    if shutdown.is_triggered() {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        let broker = Arc::new(broker);
        let ends = broker.end_offsets()?;
        let records: i64 = ends.iter().map(|(_, end)| end).sum();
        info!(
            topic = %settings.topic,
            partitions = ends.len(),
            records,
            "replaying the session topic"
        );
        if ends.len() > 1 {
            applier.feed.disable(format!(
                "the session topic {} has {} partitions; feed sequences are offsets, which order \
                 records only within one partition",
                settings.topic,
                ends.len()
            ));
        }
        let metrics = applier.metrics.clone();
        let applied = Arc::new(AppliedOffsets::default());
        let follower = {
            let consumer = broker.follower()?;
            let (applied, stop) = (applied.clone(), Arc::new(AtomicBool::new(false)));
            let thread_stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name("pitwall-follower".into())
                .spawn(move || follow(consumer, applier, clock, applied, thread_stop))
                .map_err(|source| StartLogError::Thread {
                    what: "follower",
                    source,
                })?;
            Owned {
                stop,
                wake: None,
                thread,
            }
        };
        if !applied.wait_caught_up(&ends, &shutdown) {
            follower.stop();
            return Ok(None);
        }
        let health = watch::channel(LogHealth::Serving).0;
        let log = KafkaLog {
            broker,
            applied,
            layout,
            timeout,
            streams_cache: Mutex::new(HashMap::new()),
            health,
            metrics,
            threads: Mutex::new(vec![follower]),
        };
        let watch = log.watch_broker()?;
        log.lock_threads().push(watch);
        Ok(Some(log))
    }

    /// Starts the thread that asks the broker whether it is there every few seconds, and says
    /// when that changes: writes cannot be made durable while it does not answer.
    fn watch_broker(&self) -> Result<Owned, StartLogError> {
        let broker = self.broker.clone();
        let health = self.health.clone();
        let up_gauge = self.metrics.register_gauge(
            "pitwall_kafka_broker_up",
            "1 while the Kafka broker answers metadata requests (Kafka store only)",
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, sleep) = std::sync::mpsc::channel::<()>();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pitwall-broker-watch".into())
            .spawn(move || {
                let mut up = true;
                up_gauge.set(1);
                loop {
                    // Wakes early when the sender is dropped: the log is closing.
                    if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                        sleep.recv_timeout(BROKER_PROBE_INTERVAL)
                    {
                        return;
                    }
                    if thread_stop.load(Ordering::Acquire) {
                        return;
                    }
                    let answered = broker.probe().is_ok();
                    up_gauge.set(i64::from(answered));
                    if answered != up {
                        up = answered;
                        if up {
                            info!("Kafka broker answers again; writes are served");
                            health.send_replace(LogHealth::Serving);
                        } else {
                            warn!(
                                "Kafka broker does not answer; writes answer UNAVAILABLE until it returns"
                            );
                            health.send_replace(LogHealth::WritesDown(
                                "the Kafka broker does not answer".into(),
                            ));
                        }
                    }
                }
            })
            .map_err(|source| StartLogError::Thread {
                what: "broker watch",
                source,
            })?;
        Ok(Owned {
            stop,
            wake: Some(wake),
            thread,
        })
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<Owned>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until this instance has applied the record at `offset` of `partition`.
    fn wait_applied(&self, partition: i32, offset: i64) -> Result<(), LogError> {
        if self
            .applied
            .wait_for(partition, offset, Instant::now() + self.timeout)
        {
            Ok(())
        } else {
            Err(LogError::Unavailable(format!(
                "the write is in Kafka (partition {partition}, offset {offset}) but was not read \
                 back within {} ms; it will be applied when the topic can be read",
                self.timeout.as_millis()
            )))
        }
    }
}

impl Log for KafkaLog {
    fn append(&self, batch: Batch) -> Vec<Result<Position, LogError>> {
        if batch.records.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let timestamp_ms = batch.at.seconds * 1000 + i64::from(batch.at.nanos) / 1_000_000;
        let produced = self.broker.append(&batch.records, timestamp_ms);
        self.metrics
            .commit_duration
            .observe(started.elapsed().as_secs_f64());
        produced
            .into_iter()
            .map(|result| {
                let (partition, offset) = result.map_err(|e| {
                    LogError::Unavailable(format!(
                        "{e}; the broker did not confirm the write (it may still appear)"
                    ))
                })?;
                self.wait_applied(partition, offset)?;
                Ok(offset as Position + 1)
            })
            .collect()
    }

    fn offsets(&self, data_source: &str) -> Result<BTreeMap<String, i64>, LogError> {
        self.broker
            .session_offsets(data_source, &self.layout)
            .map_err(|e| LogError::Unavailable(e.to_string()))
    }

    /// The data source's streams, cached for a second per data source.
    fn streams(&self, data_source: &str, _session_key: &str) -> Vec<String> {
        let mut cache = self.streams_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, streams)) = cache.get(data_source)
            && at.elapsed() < STREAMS_CACHE_TTL
        {
            return streams.clone();
        }
        match self.broker.streams(data_source, &self.layout) {
            Ok(streams) => {
                cache.insert(data_source.to_owned(), (Instant::now(), streams.clone()));
                streams
            }
            Err(e) => {
                warn!(data_source, error = %e, "cannot list the data source's streams");
                cache
                    .get(data_source)
                    .map(|(_, s)| s.clone())
                    .unwrap_or_default()
            }
        }
    }

    /// The feed's history is this instance's memory, trimmed as events are published.
    fn trim(&self, _window: FeedWindow, _now: Timestamp) {}

    fn health(&self) -> watch::Receiver<LogHealth> {
        self.health.subscribe()
    }

    fn close(&self) {
        let threads: Vec<Owned> = self.lock_threads().drain(..).collect();
        for thread in threads {
            thread.stop();
        }
        info!("stopped following the session topic");
    }
}

/// How far the follower has read each partition.
#[derive(Default)]
struct AppliedOffsets {
    /// Partition → the next offset to apply.
    next: Mutex<HashMap<i32, i64>>,
    changed: Condvar,
}

impl AppliedOffsets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, i64>> {
        self.next.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn advance(&self, partition: i32, offset: i64) {
        self.lock().insert(partition, offset + 1);
        self.changed.notify_all();
    }

    /// Waits until `offset` of `partition` has been applied; false if `deadline` passed first.
    fn wait_for(&self, partition: i32, offset: i64, deadline: Instant) -> bool {
        let mut next = self.lock();
        loop {
            if next.get(&partition).is_some_and(|next| *next > offset) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            next = self
                .changed
                .wait_timeout(next, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until every partition has been applied up to its end offset; false if shutdown
    /// began first.
    fn wait_caught_up(&self, ends: &[(i32, i64)], shutdown: &Shutdown) -> bool {
        let mut next = self.lock();
        loop {
            let done = ends
                .iter()
                .all(|(p, end)| *end == 0 || next.get(p).is_some_and(|next| next >= end));
            if done {
                return true;
            }
            if shutdown.is_triggered() {
                return false;
            }
            next = self
                .changed
                .wait_timeout(next, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Reads the topic and applies each record; runs until stopped.
fn follow(
    follower: Follower,
    applier: Applier,
    clock: Clock,
    applied: Arc<AppliedOffsets>,
    stop: Arc<AtomicBool>,
) {
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::Acquire) {
        let consumed = match follower.poll(POLL_INTERVAL) {
            None => continue,
            Some(Err(e)) => {
                let message = e.to_string();
                // librdkafka repeats the same error while the broker is away: say it once.
                if last_error.as_ref() != Some(&message) {
                    warn!(error = %message, "reading the session topic failed; retrying");
                    last_error = Some(message);
                }
                continue;
            }
            Some(Ok(consumed)) => consumed,
        };
        if last_error.take().is_some() {
            info!("reading the session topic again");
        }
        // Log time: the timestamp the writer gave the record, so every instance (and every
        // replay) sees the same times for the same records.
        let at = consumed
            .timestamp_ms
            .map(|ms| Timestamp {
                seconds: ms.div_euclid(1000),
                nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
            })
            .unwrap_or_else(|| clock.now());
        let position = consumed.offset as Position + 1;
        let records = match consumed.record {
            Ok(record) => vec![(position, record)],
            Err(e) => {
                warn!(
                    partition = consumed.partition,
                    offset = consumed.offset,
                    error = %e,
                    "skipping a message of the session topic that is not a session record"
                );
                Vec::new()
            }
        };
        applier.apply(Applied {
            records,
            through: position,
            at,
            events: None,
            first_kept: None,
        });
        applied.advance(consumed.partition, consumed.offset);
    }
}
