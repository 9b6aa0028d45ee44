//! The engine: the single writer of the log and the shared projection that reads use.
//!
//! Write commands go through one bounded queue to one writer thread. It takes everything
//! waiting (up to `max_batch`), decides each command against the sessions as the earlier
//! commands of the batch leave them, and hands the batch to the [`Log`], which returns once
//! the records are durable and applied (group commit). Only then is each caller answered. The
//! writer never asks which log it runs on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLockReadGuard};
use std::thread::JoinHandle;

use pitwall_core::command::{Context, embedded_offsets};
use pitwall_core::{
    Command, Decision, EventKind, Limits, Overlay, Projection, Record, Rejection, Session,
};
use pitwall_proto::open_data::SessionInfoPacket;
use prost_types::Timestamp;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

pub use crate::apply::SharedProjection;
use crate::apply::{Applier, read};
use crate::clock::Clock;
use crate::feed::FeedWindow;
use crate::log::{Batch, Log, LogError, LogHealth, Position};
use crate::metrics::Metrics;

/// Why a write was not done.
#[derive(Debug, Error)]
pub enum WriteError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("write queue is full ({0} waiting); retry later")]
    Overloaded(usize),
    #[error("{0}")]
    Unavailable(String),
    #[error("server is shutting down")]
    ShuttingDown,
}

/// Times a writer re-appends associates that a concurrent update dropped before giving up.
const MAX_ASSOCIATE_REPAIRS: usize = 8;

struct Job {
    command: Command,
    reply: oneshot::Sender<Result<Decision, WriteError>>,
}

// Nearly every message is a write; the others are rare, so their sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Message {
    Write(Job),
    /// Trim the feed to its window even when nothing is written.
    TrimFeed,
    /// Try to make a failed log writable again.
    Recover,
    Stop,
}

/// Handle to the engine: submit writes, read the projection. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    queue: mpsc::Sender<Message>,
    queue_capacity: usize,
    projection: SharedProjection,
    metrics: Metrics,
    log: Arc<dyn Log>,
}

/// Owns the writer thread; [`Writer::stop`] drains it.
pub struct Writer {
    queue: mpsc::Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

pub struct EngineOptions {
    pub limits: Limits,
    pub write_queue: usize,
    pub max_batch: usize,
    pub feed_window: FeedWindow,
    pub clock: Clock,
}

impl Engine {
    /// Starts the writer on `log`; `applier.projection` already holds what the log holds.
    pub fn start(
        log: Arc<dyn Log>,
        applier: Applier,
        options: EngineOptions,
    ) -> std::io::Result<(Engine, Writer)> {
        let (sender, receiver) = mpsc::channel(options.write_queue.max(1));
        let engine = Engine {
            queue: sender.clone(),
            queue_capacity: options.write_queue.max(1),
            projection: applier.projection.clone(),
            metrics: applier.metrics.clone(),
            log: log.clone(),
        };
        let state = WriterState {
            log,
            applier,
            limits: options.limits,
            max_batch: options.max_batch.max(1),
            feed_window: options.feed_window,
            clock: options.clock,
        };
        let thread = std::thread::Builder::new()
            .name("pitwall-writer".into())
            .spawn(move || state.run(receiver))?;
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

    /// Asks the writer to try a failed log again (a full queue skips this round).
    pub fn recover(&self) {
        let _ = self.queue.try_send(Message::Recover);
    }

    /// Asks the writer to trim the feed to its window; false when the queue is full (the
    /// next round does it).
    pub fn trim_feed(&self) -> bool {
        self.queue.try_send(Message::TrimFeed).is_ok()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The projection for reading. Hold the guard briefly: the writer waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Projection> {
        read(&self.projection)
    }

    /// A session's streams, as the log knows them.
    pub async fn streams(&self, data_source: &str, session_key: &str) -> Vec<String> {
        let (log, data_source, session_key) = (
            self.log.clone(),
            data_source.to_owned(),
            session_key.to_owned(),
        );
        tokio::task::spawn_blocking(move || log.streams(&data_source, &session_key))
            .await
            .unwrap_or_default()
    }

    /// Whether the log can take writes, and each change of it.
    pub fn health(&self) -> watch::Receiver<LogHealth> {
        self.log.health()
    }
}

impl Writer {
    /// Finishes the writes already queued, then stops the writer. Writes submitted afterwards
    /// fail with [`WriteError::ShuttingDown`].
    pub async fn stop(mut self) {
        // Queued behind every write already accepted, so those are all answered first.
        let _ = self.queue.send(Message::Stop).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

struct WriterState {
    log: Arc<dyn Log>,
    applier: Applier,
    limits: Limits,
    max_batch: usize,
    feed_window: FeedWindow,
    clock: Clock,
}

/// A decided command waiting for its batch to be durable.
struct Pending {
    reply: oneshot::Sender<Result<Decision, WriteError>>,
    outcome: Result<Decision, WriteError>,
}

/// What the writer needs of a record once it is durable, to settle its caller's answer.
struct Appended {
    job: usize,
    session_key: String,
    kind: RecordKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RecordKind {
    Start,
    Info,
    End,
    Purge,
}

impl WriterState {
    fn run(self, mut receiver: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut stopping = false;
        while !stopping {
            match receiver.blocking_recv() {
                Some(Message::Write(job)) => batch.push(job),
                Some(Message::Stop) | None => break,
                Some(Message::TrimFeed) => self.trim(),
                Some(Message::Recover) => self.log.recover(),
            }
            while batch.len() < self.max_batch {
                match receiver.try_recv() {
                    Ok(Message::Write(job)) => batch.push(job),
                    Ok(Message::Stop) => {
                        stopping = true;
                        break;
                    }
                    Ok(Message::TrimFeed) => {
                        // Writes queued before it go first, so order is kept.
                        self.process(&mut batch);
                        self.trim();
                    }
                    Ok(Message::Recover) => self.log.recover(),
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
    }

    fn trim(&self) {
        self.log.trim(self.feed_window, self.clock.now());
    }

    fn process(&self, batch: &mut Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        let now = self.clock.now();
        let (offsets, unavailable) = self.offsets_for(batch);
        let (mut pending, log_batch, appended) = self.decide(batch, &offsets, &unavailable, now);
        if !appended.is_empty() {
            self.applier
                .metrics
                .commit_batch_size
                .observe(pending.len() as f64);
            let results = self.log.append(log_batch);
            let mut failed: Option<(usize, String)> = None;
            for (record, result) in appended.into_iter().zip(results) {
                let settled = result.and_then(|position| self.settle(&record, position, now));
                match settled {
                    // An end answers with the session's first end; an auto-end keeps its own
                    // outcome (its caller only needs to know it was done).
                    Ok(Some(decision))
                        if matches!(pending[record.job].outcome, Ok(Decision::Append(_))) =>
                    {
                        pending[record.job].outcome = Ok(decision)
                    }
                    Ok(_) => {}
                    Err(LogError::Unavailable(reason)) => {
                        if failed.is_none() {
                            failed = Some((record.job, reason));
                        }
                    }
                }
            }
            // Every command after a failed write was decided against the sessions as that
            // write would have left them: none of them stands.
            if let Some((first, reason)) = failed {
                for p in &mut pending[first..] {
                    p.outcome = Err(WriteError::Unavailable(reason.clone()));
                }
            }
        }
        for p in pending {
            let _ = p.reply.send(p.outcome);
        }
    }

    /// The offsets of the data sources the batch's creates and ends record, and the data
    /// sources whose offsets cannot be read now (with why).
    fn offsets_for(
        &self,
        batch: &[Job],
    ) -> (
        BTreeMap<String, BTreeMap<String, i64>>,
        HashMap<String, String>,
    ) {
        let needed: BTreeSet<String> = {
            let projection = read(&self.applier.projection);
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
            match self.log.offsets(&data_source) {
                Ok(found) => {
                    offsets.insert(data_source, found);
                }
                Err(e) => {
                    unavailable.insert(data_source, e.to_string());
                }
            }
        }
        (offsets, unavailable)
    }

    /// Decides every job against the projection and the batch so far. Jobs whose data source
    /// is in `unavailable` fail with that reason.
    fn decide(
        &self,
        batch: &mut Vec<Job>,
        offsets: &BTreeMap<String, BTreeMap<String, i64>>,
        unavailable: &HashMap<String, String>,
        now: Timestamp,
    ) -> (Vec<Pending>, Batch, Vec<Appended>) {
        let offsets_of = |data_source: &str| {
            offsets
                .get(data_source)
                .cloned()
                .unwrap_or_else(|| embedded_offsets(data_source))
        };
        let ctx = Context {
            now,
            limits: &self.limits,
            offsets: &offsets_of,
        };
        let mut pending = Vec::with_capacity(batch.len());
        let mut appended = Vec::new();
        let projection = read(&self.applier.projection);
        let mut builder = BatchBuilder::new(&projection, now);
        for (index, job) in batch.drain(..).enumerate() {
            let key = job.command.session_key().to_owned();
            let current = builder.overlay.get(&key);
            if let Some(reason) = data_source_of(&job.command, current)
                .and_then(|data_source| unavailable.get(&data_source))
            {
                pending.push(Pending {
                    reply: job.reply,
                    outcome: Err(WriteError::Unavailable(reason.clone())),
                });
                continue;
            }
            let outcome = job.command.decide(current, &ctx);
            if let Ok(decision) = &outcome {
                for record in decision.records() {
                    appended.push(Appended {
                        job: index,
                        session_key: key.clone(),
                        kind: RecordKind::of(record),
                    });
                    builder.push(record.clone());
                }
            }
            pending.push(Pending {
                reply: job.reply,
                outcome: outcome.map_err(WriteError::from),
            });
        }
        (pending, builder.finish(), appended)
    }

    /// Once a record is durable and applied, makes its caller's answer match what the log
    /// decided: an end answers with the session's first end (another instance's may have come
    /// first); associates that a concurrent update dropped are appended back first.
    fn settle(
        &self,
        record: &Appended,
        position: Position,
        now: Timestamp,
    ) -> Result<Option<Decision>, LogError> {
        match record.kind {
            RecordKind::End => {
                let end = read(&self.applier.projection)
                    .get(&record.session_key)
                    .and_then(|session| session.end.as_deref().cloned());
                Ok(end.map(|packet| {
                    Decision::Append(Record::EndOfSession {
                        session_key: record.session_key.clone(),
                        packet,
                    })
                }))
            }
            RecordKind::Info => {
                if let Some(dropped) = self.applier.take_drops(position) {
                    self.repair_associates(&record.session_key, dropped, now)?;
                }
                Ok(None)
            }
            RecordKind::Start | RecordKind::Purge => Ok(None),
        }
    }

    /// Appends back associates that a concurrent `SessionInfo` replaced the list without
    /// (associate lists are replaced whole, as the reference merges them), until the list holds
    /// them or it keeps being replaced.
    fn repair_associates(
        &self,
        session_key: &str,
        mut dropped: Vec<String>,
        now: Timestamp,
    ) -> Result<(), LogError> {
        for _ in 0..MAX_ASSOCIATE_REPAIRS {
            let record = {
                let projection = read(&self.applier.projection);
                let current = projection
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
                let mut builder = BatchBuilder::new(&projection, now);
                builder.push(record);
                builder.finish()
            };
            let position = self.log.append(record).pop().unwrap_or_else(|| {
                Err(LogError::Unavailable(
                    "the log answered nothing for the write".into(),
                ))
            })?;
            match self.applier.take_drops(position) {
                None => return Ok(()),
                Some(again) => dropped = again,
            }
        }
        Err(LogError::Unavailable(format!(
            "associates of session '{session_key}' keep being replaced concurrently; retry"
        )))
    }
}

/// Builds a [`Batch`]: each record folded into an overlay of the projection, so the log gets
/// the sessions as the batch leaves them.
struct BatchBuilder<'p> {
    overlay: Overlay<'p>,
    records: Vec<Record>,
    changes: Vec<Option<(EventKind, pitwall_proto::feed::Session)>>,
    at: Timestamp,
}

impl<'p> BatchBuilder<'p> {
    fn new(projection: &'p Projection, at: Timestamp) -> Self {
        BatchBuilder {
            overlay: Overlay::new(projection),
            records: Vec::new(),
            changes: Vec::new(),
            at,
        }
    }

    fn push(&mut self, record: Record) {
        let change = self
            .overlay
            .apply(&record, self.at)
            .map(|(kind, session)| (kind, session.to_view()));
        self.changes.push(change);
        self.records.push(record);
    }

    fn finish(self) -> Batch {
        Batch {
            records: self.records,
            changes: self.changes,
            sessions: self.overlay.into_changes().collect(),
            at: self.at,
        }
    }
}

impl RecordKind {
    fn of(record: &Record) -> RecordKind {
        match record {
            Record::NewSession { .. } => RecordKind::Start,
            Record::SessionInfo { .. } => RecordKind::Info,
            Record::EndOfSession { .. } => RecordKind::End,
            Record::Purge { .. } => RecordKind::Purge,
        }
    }
}

/// The data source whose offsets a command records: a create's, or the ending session's.
fn data_source_of(command: &Command, current: Option<&Session>) -> Option<String> {
    match command {
        Command::Create { request, .. } => Some(request.data_source.clone()),
        Command::End(_) | Command::AutoEnd { .. } => {
            current.map(|session| session.data_source.clone())
        }
        _ => None,
    }
}
