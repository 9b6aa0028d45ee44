//! The Kafka packet log's writer thread: routes each write to its topic partitions, in the
//! order the writes came, and answers each once the broker has acknowledged all its records.
//!
//! One thread takes the writes in order, so records of one partition are produced in the
//! order their writes were answered (the idempotent producer keeps that order through
//! retries). It makes sure of the topics (a broker request the first time only), hands the
//! records to the producer and goes on; a task per write awaits the broker's acknowledgements
//! and answers. Nothing waits on the thread but the write queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::topics::{Place, Topics};
use crate::clock::Clock;
use crate::log::packets::{PacketLogError, PacketWrite, Space, space_of};

pub struct Job {
    pub writes: Vec<PacketWrite>,
    pub reply: oneshot::Sender<Result<(), PacketLogError>>,
}

pub struct Writer {
    /// How to make the producer again after a fatal error.
    pub producer_config: ClientConfig,
    pub producer: FutureProducer,
    /// How long a write may take to be acknowledged (it is answered `UNAVAILABLE` then), and
    /// the last acknowledgements once the log closes.
    pub timeout: Duration,
    pub topics: Arc<Topics>,
    pub clock: Clock,
    pub runtime: Handle,
    /// The tasks awaiting acknowledgements; the log waits for them when it closes.
    pub deliveries: TaskTracker,
    /// Set when the broker fenced the producer: the next write makes a new one.
    pub fenced: Arc<AtomicBool>,
}

impl Writer {
    /// Routes jobs until the queue closes, then waits (up to the timeout) for what the
    /// producer still holds.
    pub fn run(mut self, jobs: Receiver<Job>) {
        for job in jobs {
            self.renew_if_fenced();
            self.route(job);
        }
        let _ = self.producer.flush(self.timeout);
    }

    /// An idempotent producer that hit a fatal error (the broker fenced it after records
    /// timed out while it was away) takes no more records: make a new one. The writes the old
    /// one held were answered with its error.
    fn renew_if_fenced(&mut self) {
        let fatal = self.producer.client().fatal_error();
        let fenced = self.fenced.swap(false, Ordering::AcqRel);
        let (code, reason) = match fatal {
            Some((code, reason)) => (code, reason),
            None if fenced => (
                RDKafkaErrorCode::ProducerFenced,
                "fenced by the broker".into(),
            ),
            None => return,
        };
        match self.producer_config.create::<FutureProducer>() {
            Ok(producer) => {
                warn!(?code, %reason, "the Kafka producer failed fatally; writes go through a new one");
                self.producer = producer;
            }
            Err(e) => {
                warn!(?code, %reason, error = %e, "the Kafka producer failed fatally and cannot be made again");
            }
        }
    }

    fn route(&self, job: Job) {
        // The whole write, topic checks included, is answered within the timeout.
        let ensure_by = std::time::Instant::now() + self.timeout;
        let deadline = Deadline {
            at: tokio::time::Instant::now() + self.timeout,
            length: self.timeout,
        };
        let now = self.clock.now();
        let timestamp_ms = now.seconds * 1000 + i64::from(now.nanos) / 1_000_000;
        let mut produced: Vec<(Place, DeliveryFuture)> = Vec::new();
        let mut refused: Option<PacketLogError> = None;
        let total: usize = job
            .writes
            .iter()
            .map(|w| if w.essential { 2 } else { 1 })
            .sum();
        'writes: for write in &job.writes {
            // The essentials copy first, as the reference routes it. The two records go to
            // different partitions and are acknowledged apart: the write succeeds only with
            // both.
            let mut spaces = Vec::with_capacity(2);
            if write.essential {
                spaces.push(Space::Essentials);
            }
            spaces.push(space_of(self.topics.layout(), &write.stream));
            for space in spaces {
                let place = match self.topics.ensure(&write.data_source, &space, ensure_by) {
                    Ok(place) => place,
                    Err(e) => {
                        refused = Some(e);
                        break 'writes;
                    }
                };
                let record = FutureRecord::to(&place.topic)
                    .partition(place.partition)
                    .key(write.session_key.as_bytes())
                    .payload(&write.packet[..])
                    .timestamp(timestamp_ms);
                match self.producer.send_result(record) {
                    Ok(delivery) => produced.push((place, delivery)),
                    Err((e, _)) => {
                        refused = Some(refusal(&place, e));
                        break 'writes;
                    }
                }
            }
        }
        let (reply, topics, fenced) = (job.reply, self.topics.clone(), self.fenced.clone());
        self.deliveries.spawn_on(
            async move {
                let answer = settle(&topics, &fenced, deadline, produced, refused, total).await;
                let _ = reply.send(answer);
            },
            &self.runtime,
        );
    }
}

/// When a write is answered at the latest.
#[derive(Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    length: Duration,
}

/// Why the producer did not take a record.
fn refusal(place: &Place, error: KafkaError) -> PacketLogError {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => PacketLogError::Exhausted(format!(
            "the producer's queue is full (the broker is slow or away); {place} not written, retry \
             later"
        )),
        _ => PacketLogError::Unavailable(format!("cannot produce to {place}: {error}")),
    }
}

/// Awaits every acknowledgement; the write succeeds only when every record of it was
/// acknowledged. Otherwise the answer says what became of it.
async fn settle(
    topics: &Topics,
    fenced: &AtomicBool,
    deadline: Deadline,
    produced: Vec<(Place, DeliveryFuture)>,
    refused: Option<PacketLogError>,
    total: usize,
) -> Result<(), PacketLogError> {
    let mut acknowledged = 0usize;
    let mut failure: Option<String> = None;
    for (place, delivery) in produced {
        // librdkafka times a record out only between its retries: the answer keeps the
        // deadline itself.
        let Ok(delivered) = tokio::time::timeout_at(deadline.at, delivery).await else {
            failure.get_or_insert_with(|| {
                format!(
                    "the broker did not acknowledge {place} within {} ms",
                    deadline.length.as_millis()
                )
            });
            continue;
        };
        match delivered {
            Ok(Ok(delivery)) => {
                topics.acknowledge(&place, delivery.offset);
                acknowledged += 1;
            }
            Ok(Err((e, _))) => {
                match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::ProducerFenced) => fenced.store(true, Ordering::Release),
                    // Deleted under us: the next write checks the topic again (and creates it).
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => topics.forget(&place.topic),
                    _ => {}
                }
                failure
                    .get_or_insert_with(|| format!("the broker did not acknowledge {place}: {e}"));
            }
            Err(_) => {
                failure.get_or_insert_with(|| {
                    format!("the producer stopped before {place} was acknowledged")
                });
            }
        }
    }
    let outcome = |reason: &str| {
        format!(
            "{reason}; {acknowledged} of the {total} records of this write were acknowledged and \
             stay in Kafka, the others were not written (an unacknowledged one may still appear)"
        )
    };
    match (refused, failure) {
        (None, None) => Ok(()),
        (Some(PacketLogError::Exhausted(reason)), None) => {
            Err(PacketLogError::Exhausted(outcome(&reason)))
        }
        (Some(PacketLogError::Unavailable(reason)), None) | (_, Some(reason)) => {
            Err(PacketLogError::Unavailable(outcome(&reason)))
        }
    }
}
