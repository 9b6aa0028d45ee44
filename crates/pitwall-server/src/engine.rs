//! The engine: the single writer of the log and the shared projection that reads use.
//!
//! Write commands go through one bounded queue to one writer thread. It takes everything
//! waiting (up to `max_batch`), decides each command against the sessions as they will be after
//! the earlier ones, and makes the batch durable: embedded, in one fsync'd commit (group
//! commit), then applies it to the projection and queues the notifications; on Kafka, by
//! producing every record and waiting until this instance's follower has read them back and
//! applied them. Only then is each caller answered.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pitwall_core::command::{Context, embedded_offsets};
use pitwall_core::{Command, Decision, Limits, Projection, Record, Rejection, Session};
use pitwall_store::EmbeddedStore;
use prost_types::Timestamp;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

pub use crate::apply::SharedProjection;
use crate::apply::{Applier, read};
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

pub(crate) struct Job {
    pub command: Command,
    pub reply: oneshot::Sender<Result<Decision, WriteError>>,
}

// Nearly every message is a write; `Stop` is sent once, so its wasted size does not matter.
#[allow(clippy::large_enum_variant)]
enum Message {
    Write(Job),
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
    Embedded(EmbeddedStore),
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
        let state = WriterState {
            backend,
            applier,
            limits: options.limits,
            max_batch: options.max_batch.max(1),
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
    /// Sessions as the batch leaves them.
    pub changed: HashMap<String, Session>,
}

impl WriterState {
    fn run(self, mut receiver: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut stopping = false;
        while !stopping {
            match receiver.blocking_recv() {
                Some(Message::Write(job)) => batch.push(job),
                Some(Message::Stop) | None => break,
            }
            while batch.len() < self.max_batch {
                match receiver.try_recv() {
                    Ok(Message::Write(job)) => batch.push(job),
                    Ok(Message::Stop) => {
                        stopping = true;
                        break;
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
        let Decided {
            pending,
            records,
            changed,
        } = self.decide(batch, &BTreeMap::new(), &HashMap::new());
        if !changed.is_empty() {
            let started = Instant::now();
            let committed = store.commit(changed.values());
            let metrics = &self.applier.metrics;
            metrics
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
            metrics.commit_batch_size.observe(pending.len() as f64);
            if let Err(e) = committed {
                error!(error = %e, writes = pending.len(), "commit failed; the batch is refused");
                let message = e.to_string();
                for p in pending {
                    let _ = p.reply.send(Err(WriteError::Unavailable(message.clone())));
                }
                return;
            }
            self.applier
                .apply(records.into_iter().map(|(_, record)| record));
        }
        for p in pending {
            let _ = p.reply.send(p.outcome);
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
            changed: HashMap::new(),
        };
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
            if let Ok(Decision::Append(record)) = &outcome {
                let session = next_state(current, record, &mut next_sequence);
                decided.changed.insert(key, session);
                decided.records.push((index, record.clone()));
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

/// The session after `record`, as [`Projection::apply`] will leave it.
fn next_state(current: Option<&Session>, record: &Record, next_sequence: &mut u64) -> Session {
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
            session
        }
        (Record::SessionInfo { packet, .. }, Some(current)) => {
            let mut session = current.clone();
            session.merge(packet);
            session
        }
        (Record::EndOfSession { packet, .. }, Some(current)) => {
            let mut session = current.clone();
            session.complete(packet);
            session
        }
        // `decide` only appends updates for sessions it found.
        (_, None) => unreachable!("an update record for a session that does not exist"),
    }
}

fn now() -> Timestamp {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}
