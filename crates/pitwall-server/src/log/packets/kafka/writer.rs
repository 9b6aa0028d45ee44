//! The Kafka packet log's writer thread: routes each write to its topic partitions, in the
//! order the writes came, and answers each once the broker has acknowledged all its records.
//!
//! One thread takes the writes in order, so records of one partition are produced in the
//! order their writes were answered (the idempotent producer keeps that order through
//! retries). It makes sure of the topics (a broker request the first time only), hands the
//! records to the producer and goes on; a task per write awaits the broker's acknowledgements
//! and answers. Nothing waits on the thread but the write queue.

use std::sync::Arc;
use std::sync::mpsc::Receiver;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::topics::{Place, Topics};
use crate::clock::Clock;
use crate::log::packets::{PacketLogError, PacketWrite, Space, space_of};

pub struct Job {
    pub writes: Vec<PacketWrite>,
    pub reply: oneshot::Sender<Result<(), PacketLogError>>,
}

pub struct Writer {
    pub producer: FutureProducer,
    pub topics: Arc<Topics>,
    pub clock: Clock,
    pub runtime: Handle,
    /// The tasks awaiting acknowledgements; the log waits for them when it closes.
    pub deliveries: TaskTracker,
}

impl Writer {
    pub fn run(self, jobs: Receiver<Job>) {
        for job in jobs {
            self.route(job);
        }
    }

    fn route(&self, job: Job) {
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
            // The essentials copy first, as the reference routes it: a reader of the stream
            // that sees the packet finds it in the essentials too.
            let mut spaces = Vec::with_capacity(2);
            if write.essential {
                spaces.push(Space::Essentials);
            }
            spaces.push(space_of(self.topics.layout(), &write.stream));
            for space in spaces {
                let place = match self.topics.ensure(&write.data_source, &space) {
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
        let (reply, topics) = (job.reply, self.topics.clone());
        self.deliveries.spawn_on(
            async move {
                let _ = reply.send(settle(&topics, produced, refused, total).await);
            },
            &self.runtime,
        );
    }
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
    produced: Vec<(Place, DeliveryFuture)>,
    refused: Option<PacketLogError>,
    total: usize,
) -> Result<(), PacketLogError> {
    let mut acknowledged = 0usize;
    let mut failure: Option<String> = None;
    for (place, delivery) in produced {
        match delivery.await {
            Ok(Ok(delivery)) => {
                topics.acknowledge(&place, delivery.offset);
                acknowledged += 1;
            }
            Ok(Err((e, _))) => {
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
