//! The engine's Kafka side: the follower thread that reads the session topic and applies every
//! record (this instance's and everyone else's), and the write path that produces a batch and
//! waits until the follower has applied it.
//!
//! Associates are the one field where concurrent writers can lose each other's changes: a
//! `SessionInfo` carries the whole list and replaces it (the reference's merge rule, kept so
//! reference servers read the same state). The follower notes when a record drops associates
//! that were in the list just before it; the writer of that record then appends them back
//! before it answers, so two instances adding different associates at once both end up in the
//! list everywhere.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pitwall_core::{Decision, Record};
use pitwall_proto::open_data::SessionInfoPacket;
use pitwall_store::kafka::{Follower, KafkaLog, KafkaOptions, KafkaStoreError, StreamLayout};
use prost_types::Timestamp;
use tracing::{info, warn};

use crate::apply::{Applier, RetentionClock, read};
use crate::engine::{Decided, Job, WriteError, WriterState, data_source_of, now};
use crate::shutdown::Shutdown;

/// Times a writer re-appends associates that a concurrent update dropped before giving up.
const MAX_ASSOCIATE_REPAIRS: usize = 8;
/// Dropped-associate notes kept for writers to pick up; older ones are forgotten.
const MAX_DROP_NOTES: usize = 10_000;
/// How long the follower waits for a message before checking whether it should stop.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long `streams` answers from its cache before asking the broker again.
const STREAMS_CACHE_TTL: Duration = Duration::from_secs(1);

/// How far the follower has read each partition, and what records dropped.
#[derive(Default)]
pub struct AppliedOffsets {
    state: Mutex<AppliedState>,
    changed: Condvar,
}

#[derive(Default)]
struct AppliedState {
    /// Partition → the next offset to apply.
    next: HashMap<i32, i64>,
    /// (partition, offset) of a `SessionInfo` → associates it dropped.
    drops: VecDeque<((i32, i64), Vec<String>)>,
}

impl AppliedOffsets {
    fn lock(&self) -> std::sync::MutexGuard<'_, AppliedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn advance(&self, partition: i32, offset: i64, dropped: Vec<String>) {
        let mut state = self.lock();
        state.next.insert(partition, offset + 1);
        if !dropped.is_empty() {
            if state.drops.len() >= MAX_DROP_NOTES {
                state.drops.pop_front();
            }
            state.drops.push_back(((partition, offset), dropped));
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Waits until `offset` of `partition` has been applied; false if `deadline` passed first.
    fn wait_for(&self, partition: i32, offset: i64, deadline: Instant) -> bool {
        let mut state = self.lock();
        loop {
            if state
                .next
                .get(&partition)
                .is_some_and(|next| *next > offset)
            {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until every partition has been applied up to its end offset; false if shutdown
    /// began first.
    fn wait_caught_up(&self, ends: &[(i32, i64)], shutdown: &Shutdown) -> bool {
        let mut state = self.lock();
        loop {
            let done = ends
                .iter()
                .all(|(p, end)| *end == 0 || state.next.get(p).is_some_and(|next| next >= end));
            if done {
                return true;
            }
            if shutdown.is_triggered() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn take_drops(&self, partition: i32, offset: i64) -> Option<Vec<String>> {
        let mut state = self.lock();
        let index = state
            .drops
            .iter()
            .position(|(at, _)| *at == (partition, offset))?;
        state.drops.remove(index).map(|(_, dropped)| dropped)
    }
}

/// The follower thread; stopping it ends the consumer.
pub struct FollowerThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FollowerThread {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads the topic and applies each record; runs until stopped.
fn follow(
    follower: Follower,
    applier: Applier,
    applied: Arc<AppliedOffsets>,
    stop: Arc<AtomicBool>,
    retention: Option<Duration>,
) {
    let mut last_error: Option<String> = None;
    let mut retention = retention.map(RetentionClock::new);
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
        let dropped = match &consumed.record {
            Ok(Record::SessionInfo {
                session_key,
                packet,
            }) if !packet.associate_session_keys.is_empty() => read(&applier.projection)
                .get(session_key)
                .map(|session| {
                    session
                        .associates
                        .iter()
                        .filter(|a| !packet.associate_session_keys.contains(a))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        // Log time: the producer's timestamp, so every instance (and every replay) sees the
        // same times for the same records.
        let at = consumed
            .timestamp_ms
            .map(|ms| Timestamp {
                seconds: ms.div_euclid(1000),
                nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
            })
            .unwrap_or_else(now);
        let record = match consumed.record {
            Ok(record) => Some(record),
            Err(e) => {
                warn!(
                    partition = consumed.partition,
                    offset = consumed.offset,
                    error = %e,
                    "skipping a message of the session topic that is not a session record"
                );
                None
            }
        };
        // The feed sequence is the offset plus one (0 means "from now").
        let sequence = consumed.offset as u64 + 1;
        applier.apply_logged(record, at, sequence, retention.as_mut());
        applied.advance(consumed.partition, consumed.offset, dropped);
    }
}

/// The Kafka store as the engine uses it. Shared by the writer and the read side (streams).
pub struct KafkaBackend {
    log: KafkaLog,
    applied: Arc<AppliedOffsets>,
    layout: StreamLayout,
    timeout: Duration,
    streams_cache: Mutex<HashMap<String, (Instant, Vec<String>)>>,
}

impl KafkaBackend {
    /// Connects (retrying until the broker answers or shutdown), replays the topic up to the
    /// end offsets read now, and keeps following it. Blocking.
    pub fn start(
        options: KafkaOptions,
        layout: StreamLayout,
        applier: Applier,
        retention: Option<Duration>,
        shutdown: &Shutdown,
    ) -> Result<Option<(Arc<KafkaBackend>, FollowerThread)>, KafkaStoreError> {
        let timeout = options.timeout;
        let log = loop {
            match KafkaLog::connect(options.clone()) {
                Ok(log) => break log,
                Err(e @ KafkaStoreError::Unreachable { .. }) => {
                    warn!(error = %e, "waiting for the Kafka broker");
                    if shutdown.is_triggered() {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_secs(2));
                    if shutdown.is_triggered() {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let ends = log.end_offsets()?;
        let records: i64 = ends.iter().map(|(_, end)| end).sum();
        info!(
            topic = %options.topic,
            partitions = ends.len(),
            records,
            "replaying the session topic"
        );
        if ends.len() > 1 {
            applier.feed.disable(format!(
                "the session topic {} has {} partitions; feed sequences are offsets, which order \
                 records only within one partition",
                options.topic,
                ends.len()
            ));
        }
        let follower = log.follower()?;
        let applied = Arc::new(AppliedOffsets::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (applied, stop) = (applied.clone(), stop.clone());
            std::thread::Builder::new()
                .name("pitwall-follower".into())
                .spawn(move || follow(follower, applier, applied, stop, retention))
                .map_err(|e| KafkaStoreError::Consume(rdkafka_io_error(e)))?
        };
        let follower_thread = FollowerThread {
            stop,
            thread: Some(thread),
        };
        if !applied.wait_caught_up(&ends, shutdown) {
            follower_thread.stop();
            return Ok(None);
        }
        let backend = Arc::new(KafkaBackend {
            log,
            applied,
            layout,
            timeout,
            streams_cache: Mutex::new(HashMap::new()),
        });
        Ok(Some((backend, follower_thread)))
    }

    /// The writer's path for one batch on Kafka.
    pub(crate) fn process(&self, writer: &WriterState, batch: &mut Vec<Job>) {
        let needed: BTreeSet<String> = {
            let projection = read(&writer.applier().projection);
            batch
                .iter()
                .filter_map(|job| {
                    data_source_of(&job.command, projection.get(job.command.session_key()))
                })
                .collect()
        };
        let mut offsets = BTreeMap::new();
        let mut unavailable = HashMap::new();
        for data_source in needed {
            match self.log.session_offsets(&data_source, &self.layout) {
                Ok(found) => {
                    offsets.insert(data_source, found);
                }
                Err(e) => {
                    unavailable.insert(data_source, e.to_string());
                }
            }
        }
        let Decided {
            mut pending,
            records,
            ..
        } = writer.decide(batch, &offsets, &unavailable);
        if !records.is_empty() {
            let metrics = &writer.applier().metrics;
            let started = Instant::now();
            let results = self.log.append(records.iter().map(|(_, record)| record));
            metrics
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
            metrics.commit_batch_size.observe(pending.len() as f64);
            for ((index, record), result) in records.into_iter().zip(results) {
                let settled = result
                    .map_err(|e| {
                        WriteError::Unavailable(format!(
                            "{e}; the broker did not confirm the write (it may still appear)"
                        ))
                    })
                    .and_then(|(partition, offset)| self.settle(writer, record, partition, offset));
                match settled {
                    // An end answers with the session's first end; an auto-end keeps its own
                    // outcome (its caller only needs to know it was done).
                    Ok(Some(decision))
                        if matches!(pending[index].outcome, Ok(Decision::Append(_))) =>
                    {
                        pending[index].outcome = Ok(decision)
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {}
                    Err(e) => pending[index].outcome = Err(e),
                }
            }
        }
        for p in pending {
            let _ = p.reply.send(p.outcome);
        }
    }

    /// Waits until this instance has applied its own record, then makes the answer match what
    /// the topic decided: an end answers with the session's first end; an associate list that
    /// dropped concurrent additions is repaired first.
    fn settle(
        &self,
        writer: &WriterState,
        record: Record,
        partition: i32,
        offset: i64,
    ) -> Result<Option<Decision>, WriteError> {
        self.wait_applied(partition, offset)?;
        match record {
            Record::EndOfSession { session_key, .. } => {
                let end = read(&writer.applier().projection)
                    .get(&session_key)
                    .and_then(|session| session.end.as_deref().cloned());
                Ok(end.map(|packet| {
                    Decision::Append(Record::EndOfSession {
                        session_key,
                        packet,
                    })
                }))
            }
            Record::SessionInfo { session_key, .. } => {
                if let Some(dropped) = self.applied.take_drops(partition, offset) {
                    self.repair_associates(writer, &session_key, dropped)?;
                }
                Ok(None)
            }
            Record::NewSession { .. } => Ok(None),
        }
    }

    fn wait_applied(&self, partition: i32, offset: i64) -> Result<(), WriteError> {
        if self
            .applied
            .wait_for(partition, offset, Instant::now() + self.timeout)
        {
            Ok(())
        } else {
            Err(WriteError::Unavailable(format!(
                "the write is in Kafka (partition {partition}, offset {offset}) but was not read \
                 back within {} ms; it will be applied when the topic can be read",
                self.timeout.as_millis()
            )))
        }
    }

    fn repair_associates(
        &self,
        writer: &WriterState,
        session_key: &str,
        mut dropped: Vec<String>,
    ) -> Result<(), WriteError> {
        for _ in 0..MAX_ASSOCIATE_REPAIRS {
            let current = read(&writer.applier().projection)
                .get(session_key)
                .map(|session| session.associates.clone())
                .unwrap_or_default();
            let mut merged = current.clone();
            for associate in dropped {
                if !merged.contains(&associate) {
                    merged.push(associate);
                }
            }
            if merged == current {
                return Ok(());
            }
            let record = Record::SessionInfo {
                session_key: session_key.to_owned(),
                packet: SessionInfoPacket {
                    associate_session_keys: merged,
                    ..Default::default()
                },
            };
            let (partition, offset) = self
                .log
                .append([&record])
                .pop()
                .unwrap_or(Err(KafkaStoreError::Produce(
                    rdkafka::error::KafkaError::Canceled,
                )))
                .map_err(|e| WriteError::Unavailable(e.to_string()))?;
            self.wait_applied(partition, offset)?;
            match self.applied.take_drops(partition, offset) {
                None => return Ok(()),
                Some(again) => dropped = again,
            }
        }
        Err(WriteError::Unavailable(format!(
            "associates of session '{session_key}' keep being replaced concurrently; retry"
        )))
    }

    /// The data source's streams, cached for a second per data source.
    pub fn streams(&self, data_source: &str) -> Vec<String> {
        let mut cache = self.streams_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, streams)) = cache.get(data_source)
            && at.elapsed() < STREAMS_CACHE_TTL
        {
            return streams.clone();
        }
        match self.log.streams(data_source, &self.layout) {
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

    /// Whether the broker answers.
    pub fn probe(&self) -> bool {
        self.log.probe().is_ok()
    }
}

fn rdkafka_io_error(e: std::io::Error) -> rdkafka::error::KafkaError {
    rdkafka::error::KafkaError::ClientCreation(e.to_string())
}
