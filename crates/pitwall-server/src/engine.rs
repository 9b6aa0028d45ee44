//! The engine: the single writer of the log and the shared projection that reads use.
//!
//! Write commands go through one bounded queue to one writer thread. It takes everything
//! waiting (up to `max_batch`), decides each command against the sessions as they will be after
//! the earlier ones, makes the batch durable in one commit, applies it to the projection,
//! queues the notifications, and only then answers each caller. Many concurrent writes thus
//! share one fsync (group commit) and every acknowledged write is on disk.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pitwall_core::command::{Context, embedded_offsets};
use pitwall_core::{Command, Decision, Limits, Projection, Record, Rejection, Session};
use pitwall_store::EmbeddedStore;
use prost_types::Timestamp;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::notify::Hub;

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

/// The projection behind a `std` lock: held for map lookups and clones only, never across an
/// await; the writer holds it exclusively just long enough to apply one committed batch.
pub type SharedProjection = Arc<RwLock<Projection>>;

struct Job {
    command: Command,
    reply: oneshot::Sender<Result<Decision, WriteError>>,
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

impl Engine {
    /// Starts the writer on `store`, whose sessions are already in `projection`.
    pub fn start(
        store: EmbeddedStore,
        projection: Projection,
        hub: Arc<Hub>,
        metrics: Metrics,
        options: EngineOptions,
    ) -> std::io::Result<(Engine, Writer)> {
        let (sender, receiver) = mpsc::channel(options.write_queue.max(1));
        let projection = Arc::new(RwLock::new(projection));
        let state = WriterState {
            store,
            projection: projection.clone(),
            hub,
            metrics: metrics.clone(),
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

struct WriterState {
    store: EmbeddedStore,
    projection: SharedProjection,
    hub: Arc<Hub>,
    metrics: Metrics,
    limits: Limits,
    max_batch: usize,
}

/// A decided command waiting for its batch to commit.
struct Pending {
    reply: oneshot::Sender<Result<Decision, WriteError>>,
    outcome: Result<Decision, Rejection>,
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
            self.metrics.write_queue_depth.set(receiver.len() as i64);
            self.process(&mut batch);
        }
        receiver.close();
        // Answer whatever raced in behind the stop.
        while let Ok(message) = receiver.try_recv() {
            if let Message::Write(job) = message {
                let _ = job.reply.send(Err(WriteError::ShuttingDown));
            }
        }
        info!(path = %self.store.path().display(), "store closed");
    }

    fn process(&self, batch: &mut Vec<Job>) {
        let ctx = Context {
            now: now(),
            limits: &self.limits,
            offsets: &embedded_offsets,
        };
        // Sessions as this batch leaves them, to decide later commands and to persist.
        let mut changed: HashMap<String, Session> = HashMap::new();
        let mut records = Vec::new();
        let mut pending = Vec::with_capacity(batch.len());
        {
            let projection = read(&self.projection);
            let mut next_sequence = projection.next_sequence();
            for job in batch.drain(..) {
                let key = job.command.session_key().to_owned();
                let current = changed.get(&key).or_else(|| projection.get(&key));
                let outcome = job.command.decide(current, &ctx);
                if let Ok(Decision::Append(record)) = &outcome {
                    let session = next_state(current, record, &mut next_sequence);
                    changed.insert(key, session);
                    records.push(record.clone());
                }
                pending.push(Pending {
                    reply: job.reply,
                    outcome,
                });
            }
        }

        if !changed.is_empty() {
            let started = Instant::now();
            let committed = self.store.commit(changed.values());
            self.metrics
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
            self.metrics.commit_batch_size.observe(pending.len() as f64);
            if let Err(e) = committed {
                error!(error = %e, writes = pending.len(), "commit failed; the batch is refused");
                let message = e.to_string();
                for p in pending {
                    let _ = p.reply.send(Err(WriteError::Unavailable(message.clone())));
                }
                return;
            }
            self.apply(records);
        }
        for p in pending {
            let _ = p.reply.send(p.outcome.map_err(WriteError::from));
        }
    }

    /// Applies committed records, then queues their notifications: before any caller is
    /// answered, and in log order.
    fn apply(&self, records: Vec<Record>) {
        let mut events = Vec::new();
        {
            let mut projection = write(&self.projection);
            for record in records {
                events.extend(projection.apply(record));
            }
            let mut counted = std::collections::HashSet::new();
            for event in &events {
                if counted.insert(event.data_source.as_str()) {
                    let counts = projection.counts_of(&event.data_source);
                    self.metrics.set_session_counts(
                        &event.data_source,
                        counts.total,
                        counts.completed,
                    );
                }
            }
        }
        self.hub.publish(&events);
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

// A panic while holding the projection lock would come from a bug in apply; the projection is
// then as the last complete apply left it, so reads may go on.
fn read(projection: &SharedProjection) -> RwLockReadGuard<'_, Projection> {
    projection.read().unwrap_or_else(|e| e.into_inner())
}

fn write(projection: &SharedProjection) -> RwLockWriteGuard<'_, Projection> {
    projection.write().unwrap_or_else(|e| e.into_inner())
}
