//! The engine: the single writer of the log and the shared projection that reads use.
//!
//! Write commands go through one bounded queue to one writer thread. It takes everything
//! waiting (up to `max_batch`), decides each command against the sessions as they will be after
//! the earlier ones, and makes the batch durable: embedded, in one fsync'd commit (group
//! commit), then applies it to the projection and queues the notifications; on Kafka, by
//! producing every record and waiting until this instance's follower has read them back and
//! applied them. Only then is each caller answered.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pitwall_core::command::{Context, embedded_offsets};
use pitwall_core::lifecycle::retention_expired;
use pitwall_core::{Command, Decision, EventKind, Limits, Projection, Record, Rejection, Session};
use pitwall_proto::feed::{self, SessionEvent};
use pitwall_store::embedded::{Changes, FeedBounds, FeedWindow as StoreWindow};
use pitwall_store::{EmbeddedStore, StoreError};
use prost_types::Timestamp;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

pub use crate::apply::SharedProjection;
use crate::apply::{Applier, MAX_PURGE_PER_PASS, read};
use crate::feed::{FeedItem, feed_event};
use crate::kafka_backend::KafkaBackend;
use crate::metrics::Metrics;

/// Why a write was not done.
#[derive(Debug, Error)]
pub enum WriteError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("write queue is full ({0} waiting); retry later")]
    Overloaded(usize),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("server is shutting down")]
    ShuttingDown,
}

/// Files smaller than this are not worth a compaction (which holds up writes while it runs).
const MIN_COMPACTED_FILE_BYTES: u64 = 4 * 1024 * 1024;

pub(crate) struct Job {
    pub command: Command,
    pub reply: oneshot::Sender<Result<Decision, WriteError>>,
}

// Nearly every message is a write; `Stop` is sent once, so its wasted size does not matter.
#[allow(clippy::large_enum_variant)]
enum Message {
    Write(Job),
    /// Retention (embedded store): remove these sessions if they are still expired.
    Purge {
        keys: Vec<String>,
        completed_for: Duration,
        reply: oneshot::Sender<usize>,
    },
    /// Trim the feed to its window even when nothing is written.
    TrimFeed,
    Stop,
}

/// Handle to the engine: submit writes, read the projection. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    queue: mpsc::Sender<Message>,
    queue_capacity: usize,
    projection: SharedProjection,
    metrics: Metrics,
    kafka: Option<Arc<KafkaBackend>>,
}

/// Owns the writer thread; [`Writer::stop`] drains it and closes the store.
pub struct Writer {
    queue: mpsc::Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

pub struct EngineOptions {
    pub limits: Limits,
    pub write_queue: usize,
    pub max_batch: usize,
}

/// Where the writer makes records durable.
pub enum Backend {
    Embedded(Arc<EmbeddedStore>),
    Kafka(Arc<KafkaBackend>),
}

impl Engine {
    /// Starts the writer on `backend`; `applier.projection` already holds its sessions.
    pub fn start(
        backend: Backend,
        applier: Applier,
        options: EngineOptions,
    ) -> std::io::Result<(Engine, Writer)> {
        let (sender, receiver) = mpsc::channel(options.write_queue.max(1));
        let projection = applier.projection.clone();
        let metrics = applier.metrics.clone();
        let kafka = match &backend {
            Backend::Kafka(kafka) => Some(kafka.clone()),
            Backend::Embedded(_) => None,
        };
        let feed_next = match &backend {
            Backend::Embedded(store) => store.feed_bounds().map_err(std::io::Error::other)?.next,
            Backend::Kafka(_) => 0,
        };
        let state = WriterState {
            backend,
            applier,
            limits: options.limits,
            max_batch: options.max_batch.max(1),
            feed_next: Cell::new(feed_next),
        };
        let thread = std::thread::Builder::new()
            .name("pitwall-writer".into())
            .spawn(move || state.run(receiver))?;
        let engine = Engine {
            queue: sender.clone(),
            queue_capacity: options.write_queue.max(1),
            projection,
            metrics,
            kafka,
        };
        Ok((
            engine,
            Writer {
                queue: sender,
                thread: Some(thread),
            },
        ))
    }

    /// Queues a write and waits until it is durable and applied (or refused).
    pub async fn submit(&self, command: Command) -> Result<Decision, WriteError> {
        let (reply, answer) = oneshot::channel();
        let job = Message::Write(Job { command, reply });
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(WriteError::Overloaded(self.queue_capacity));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(WriteError::ShuttingDown),
        }
        self.metrics
            .write_queue_depth
            .set((self.queue_capacity - self.queue.capacity()) as i64);
        answer.await.unwrap_or(Err(WriteError::ShuttingDown))
    }

    /// Removes sessions whose retention has run out (embedded store; on Kafka the follower
    /// purges). Returns how many went.
    pub async fn purge(&self, keys: Vec<String>, completed_for: Duration) -> usize {
        let (reply, answer) = oneshot::channel();
        let message = Message::Purge {
            keys,
            completed_for,
            reply,
        };
        if self.queue.try_send(message).is_err() {
            return 0;
        }
        answer.await.unwrap_or(0)
    }

    /// Asks the writer to trim the feed to its window (a full queue skips this round).
    pub fn trim_feed(&self) {
        let _ = self.queue.try_send(Message::TrimFeed);
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether retention is the writer's job (embedded) rather than the follower's (Kafka).
    pub fn purges_by_time(&self) -> bool {
        self.kafka.is_none()
    }

    /// The projection for reading. Hold the guard briefly: the writer waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Projection> {
        read(&self.projection)
    }

    /// The data source's streams: none without a broker.
    pub async fn streams(&self, data_source: &str) -> Vec<String> {
        let Some(kafka) = self.kafka.clone() else {
            return Vec::new();
        };
        let data_source = data_source.to_owned();
        tokio::task::spawn_blocking(move || kafka.streams(&data_source))
            .await
            .unwrap_or_default()
    }
}

impl Writer {
    /// Finishes the writes already queued, then stops the writer and closes the store. Writes
    /// submitted afterwards fail with [`WriteError::ShuttingDown`].
    pub async fn stop(mut self) {
        // Queued behind every write already accepted, so those are all answered first.
        let _ = self.queue.send(Message::Stop).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

pub(crate) struct WriterState {
    backend: Backend,
    applier: Applier,
    limits: Limits,
    max_batch: usize,
    /// The next feed sequence (embedded store).
    feed_next: Cell<u64>,
}

/// A decided command waiting for its batch to be durable.
pub(crate) struct Pending {
    pub reply: oneshot::Sender<Result<Decision, WriteError>>,
    pub outcome: Result<Decision, WriteError>,
}

/// A batch decided against the projection and itself.
pub(crate) struct Decided {
    /// One per job, in order.
    pub pending: Vec<Pending>,
    /// The records to append, in order, with the index of the job each belongs to.
    pub records: Vec<(usize, Record)>,
    /// Per record, the session after it if it changed anything (embedded store: its feed
    /// event).
    pub after: Vec<Option<feed::Session>>,
    /// Sessions as the batch leaves them.
    pub changed: HashMap<String, Session>,
    /// The time the batch was decided at, which the store records it at.
    pub now: Timestamp,
}

impl WriterState {
    fn run(self, mut receiver: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut stopping = false;
        while !stopping {
            match receiver.blocking_recv() {
                Some(Message::Write(job)) => batch.push(job),
                Some(Message::Stop) | None => break,
                Some(other) => self.maintain(other),
            }
            while batch.len() < self.max_batch {
                match receiver.try_recv() {
                    Ok(Message::Write(job)) => batch.push(job),
                    Ok(Message::Stop) => {
                        stopping = true;
                        break;
                    }
                    Ok(other) => {
                        // Writes queued before it go first, so order is kept.
                        self.process(&mut batch);
                        self.maintain(other);
                    }
                    Err(_) => break,
                }
            }
            self.applier
                .metrics
                .write_queue_depth
                .set(receiver.len() as i64);
            self.process(&mut batch);
        }
        receiver.close();
        // Answer whatever raced in behind the stop.
        while let Ok(message) = receiver.try_recv() {
            if let Message::Write(job) = message {
                let _ = job.reply.send(Err(WriteError::ShuttingDown));
            }
        }
        match &self.backend {
            Backend::Embedded(store) => info!(path = %store.path().display(), "store closed"),
            Backend::Kafka(_) => info!("writer stopped"),
        }
    }

    fn process(&self, batch: &mut Vec<Job>) {
        match &self.backend {
            Backend::Embedded(store) => self.process_embedded(store, batch),
            Backend::Kafka(kafka) => kafka.process(self, batch),
        }
    }

    fn process_embedded(&self, store: &EmbeddedStore, batch: &mut Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        let Decided {
            pending,
            records,
            after,
            changed,
            now,
        } = self.decide(batch, &BTreeMap::new(), &HashMap::new());
        if !changed.is_empty() {
            let mut next = self.feed_next.get();
            let events: Vec<SessionEvent> = records
                .iter()
                .zip(after)
                .filter_map(|((_, record), after)| {
                    let event = feed_event(next, kind_of(record), after?, now);
                    next += 1;
                    Some(event)
                })
                .collect();
            let started = Instant::now();
            let committed =
                self.commit(store, changed.values().collect(), Vec::new(), &events, now);
            let metrics = &self.applier.metrics;
            metrics
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
            metrics.commit_batch_size.observe(pending.len() as f64);
            let (items, bounds) = match committed {
                Ok(committed) => committed,
                Err(e) => {
                    error!(error = %e, writes = pending.len(), "commit failed; the batch is refused");
                    let message = e.to_string();
                    for p in pending {
                        let _ = p.reply.send(Err(WriteError::Unavailable(message.clone())));
                    }
                    return;
                }
            };
            self.applier.apply(
                records.into_iter().map(|(_, record)| record),
                now,
                self.feed_next.get() - 1,
            );
            self.applier
                .feed
                .publish(items, Some(bounds.first_kept), now);
        }
        for p in pending {
            let _ = p.reply.send(p.outcome);
        }
    }

    /// Work that is not a client's write: retention and feed trimming (embedded store).
    fn maintain(&self, message: Message) {
        let Backend::Embedded(store) = &self.backend else {
            if let Message::Purge { reply, .. } = message {
                let _ = reply.send(0);
            }
            return;
        };
        match message {
            Message::Purge {
                keys,
                completed_for,
                reply,
            } => {
                let _ = reply.send(self.purge_embedded(store, &keys, completed_for));
            }
            Message::TrimFeed => {
                let now = now();
                match self.commit(store, Vec::new(), Vec::new(), &[], now) {
                    Ok((items, bounds)) => {
                        self.applier
                            .feed
                            .publish(items, Some(bounds.first_kept), now)
                    }
                    Err(e) => warn!(error = %e, "trimming the feed failed; it is retried later"),
                }
            }
            Message::Write(_) | Message::Stop => {}
        }
    }

    /// Deletes the sessions that are still expired, with their `PURGED` events, in one
    /// commit; then removes them from the projection.
    fn purge_embedded(
        &self,
        store: &EmbeddedStore,
        keys: &[String],
        completed_for: Duration,
    ) -> usize {
        let now = now();
        let first = self.feed_next.get();
        let (sequences, events): (Vec<u64>, Vec<SessionEvent>) = {
            let projection = read(&self.applier.projection);
            keys.iter()
                .take(MAX_PURGE_PER_PASS)
                .filter_map(|key| projection.get(key))
                .filter(|session| retention_expired(session, completed_for, now))
                .enumerate()
                .map(|(i, session)| {
                    let event =
                        feed_event(first + i as u64, EventKind::Purged, session.to_view(), now);
                    (session.sequence, event)
                })
                .unzip()
        };
        if events.is_empty() {
            return 0;
        }
        let purged_keys: Vec<String> = events.iter().map(|e| e.session_key.clone()).collect();
        match self.commit(store, Vec::new(), sequences, &events, now) {
            Ok((items, bounds)) => {
                self.applier.purge(&purged_keys, self.feed_next.get() - 1);
                self.applier
                    .feed
                    .publish(items, Some(bounds.first_kept), now);
                let started = Instant::now();
                match store.compact_if_sparse(MIN_COMPACTED_FILE_BYTES) {
                    Ok(Some(compacted)) => info!(
                        before_bytes = compacted.before,
                        after_bytes = compacted.after,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "store file compacted after retention"
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        warn!(error = %e, "compacting the store file failed; it stays as large")
                    }
                }
                purged_keys.len()
            }
            Err(e) => {
                error!(error = %e, sessions = purged_keys.len(), "purging failed; retried on the next pass");
                0
            }
        }
    }

    /// Commits session rows, removals and the feed events that record them (numbered from
    /// `feed_next`), trimming the feed to its window. Once durable the events count as
    /// committed; they are returned encoded, to publish once the projection reflects them.
    fn commit(
        &self,
        store: &EmbeddedStore,
        sessions: Vec<&Session>,
        purged: Vec<u64>,
        events: &[SessionEvent],
        now: Timestamp,
    ) -> Result<(Vec<FeedItem>, FeedBounds), StoreError> {
        // Each event is encoded once: the bytes are stored and sent to every watcher.
        let items: Vec<FeedItem> = events.iter().map(FeedItem::encode).collect();
        let bounds = store.commit(Changes {
            sessions,
            purged,
            events: items
                .iter()
                .map(|item| (item.sequence, item.bytes.clone()))
                .collect(),
            window: self.store_window(now),
        })?;
        if let Some(last) = items.last() {
            self.feed_next.set(last.sequence + 1);
            self.applier.feed.committed(last.sequence);
        }
        Ok((items, bounds))
    }

    fn store_window(&self, now: Timestamp) -> StoreWindow {
        let window = self.applier.feed.window();
        StoreWindow {
            max_events: window.max_events,
            oldest: window.oldest(now),
        }
    }

    /// Decides every job against the projection and the batch so far. `offsets` gives the
    /// offsets of data sources (Kafka); without an entry a data source gets the embedded
    /// offsets. Jobs whose data source is in `unavailable` fail with that reason.
    pub(crate) fn decide(
        &self,
        batch: &mut Vec<Job>,
        offsets: &BTreeMap<String, BTreeMap<String, i64>>,
        unavailable: &HashMap<String, String>,
    ) -> Decided {
        let offsets_of = |data_source: &str| {
            offsets
                .get(data_source)
                .cloned()
                .unwrap_or_else(|| embedded_offsets(data_source))
        };
        let ctx = Context {
            now: now(),
            limits: &self.limits,
            offsets: &offsets_of,
        };
        let mut decided = Decided {
            pending: Vec::with_capacity(batch.len()),
            records: Vec::new(),
            after: Vec::new(),
            changed: HashMap::new(),
            now: ctx.now,
        };
        // Only the embedded store numbers feed events as it writes; Kafka's follower does.
        let keep_after = matches!(self.backend, Backend::Embedded(_));
        let projection = read(&self.applier.projection);
        let mut next_sequence = projection.next_sequence();
        for (index, job) in batch.drain(..).enumerate() {
            let key = job.command.session_key().to_owned();
            let current = decided.changed.get(&key).or_else(|| projection.get(&key));
            if let Some(reason) = data_source_of(&job.command, current)
                .and_then(|data_source| unavailable.get(&data_source))
            {
                decided.pending.push(Pending {
                    reply: job.reply,
                    outcome: Err(WriteError::Unavailable(reason.clone())),
                });
                continue;
            }
            let outcome = job.command.decide(current, &ctx);
            if let Ok(decision) = &outcome
                && !decision.records().is_empty()
            {
                let mut state = current.cloned();
                for record in decision.records() {
                    let (mut session, changed) = next_state(state, record, &mut next_sequence);
                    if changed {
                        // As `Projection::apply` will record it, so stored rows and feed
                        // events carry it too.
                        session.last_activity = Some(ctx.now);
                    }
                    decided.records.push((index, record.clone()));
                    decided
                        .after
                        .push((keep_after && changed).then(|| session.to_view()));
                    state = Some(session);
                }
                if let Some(session) = state {
                    decided.changed.insert(key, session);
                }
            }
            decided.pending.push(Pending {
                reply: job.reply,
                outcome: outcome.map_err(WriteError::from),
            });
        }
        decided
    }

    pub(crate) fn applier(&self) -> &Applier {
        &self.applier
    }
}

/// The data source whose offsets a command needs: a create's, or the ended session's.
pub(crate) fn data_source_of(command: &Command, current: Option<&Session>) -> Option<String> {
    match command {
        Command::Create { request, .. } => Some(request.data_source.clone()),
        Command::End(_) => current.map(|session| session.data_source.clone()),
        _ => None,
    }
}

/// The session after `record`, as [`Projection::apply`] will leave it, and whether the record
/// changed it.
fn next_state(
    current: Option<Session>,
    record: &Record,
    next_sequence: &mut u64,
) -> (Session, bool) {
    match (record, current) {
        (
            Record::NewSession {
                session_key,
                packet,
            },
            _,
        ) => {
            let session = Session::start(session_key, *next_sequence, packet);
            *next_sequence += 1;
            (session, true)
        }
        (Record::SessionInfo { packet, .. }, Some(mut session)) => {
            let changed = session.merge(packet);
            (session, changed)
        }
        (Record::EndOfSession { packet, .. }, Some(mut session)) => {
            let changed = session.complete(packet);
            (session, changed)
        }
        // `decide` only appends updates for sessions it found.
        (_, None) => unreachable!("an update record for a session that does not exist"),
    }
}

/// The feed event kind of a record that changed its session.
fn kind_of(record: &Record) -> EventKind {
    match record {
        Record::NewSession { .. } => EventKind::Started,
        Record::SessionInfo { .. } => EventKind::Updated,
        Record::EndOfSession { .. } => EventKind::Ended,
    }
}

pub(crate) fn now() -> Timestamp {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}
