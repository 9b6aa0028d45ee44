//! One read of the Kafka packet log: its own consumer, assigned the read's topic partitions by
//! hand (no consumer group, no commits, so nothing is left on the broker), on a blocking
//! thread owned by the log, copying records into the call's bounded channel.
//!
//! Start offsets follow DATA-PLANE.md §9.4: an absolute offset below the first kept one reads
//! from the first kept one (retention removed the rest), beyond the end from the end; a
//! negative one from the end. A finite read (ReadEssentials, a data-format rebuild) stops at
//! the ends the partitions had when it started. A record removed by retention while the read
//! waits for it resumes at the first kept one. While the broker is away the consumer keeps its
//! positions and goes on from them when it returns: no gap, no duplicate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prost::bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::topics::Topics;
use crate::log::packets::{PacketLogError, ReadPacket, ReadPlan, Start};

/// How long a poll waits for a record before the read looks at its cancellation again.
const POLL: Duration = Duration::from_millis(100);
/// Records of one batch at most, and their bytes: one response's worth.
const BATCH_RECORDS: usize = 1024;
const BATCH_BYTES: usize = 256 * 1024;
/// What librdkafka may prefetch for one read, in KiB: a slow client holds no more than this
/// (and its channel) in memory.
const PREFETCH_KIB: &str = "4096";

type Sender = mpsc::Sender<Result<Vec<ReadPacket>, PacketLogError>>;

/// One assigned partition of a read.
struct Assigned {
    label: String,
    /// Finite reads stop here (the end when the read started).
    end: Option<i64>,
    done: bool,
}

/// Runs the read until it is done, cancelled, its receiver is dropped, or `stopping` fires.
/// Blocking.
pub fn run(
    client: ClientConfig,
    topics: Arc<Topics>,
    plan: ReadPlan,
    sender: Sender,
    cancel: CancellationToken,
    stopping: CancellationToken,
) {
    let stopped = || cancel.is_cancelled() || stopping.is_cancelled() || sender.is_closed();
    let (consumer, mut assigned) = match assign(&client, &topics, &plan) {
        Ok(started) => started,
        Err(e) => {
            warn!(data_source = %plan.data_source, error = %e, "a read cannot start");
            let _ = deliver(&sender, Err(e), &cancel, &stopping);
            return;
        }
    };
    let mut last_error: Option<String> = None;
    loop {
        if plan.finite && assigned.values().all(|a| a.done) {
            return;
        }
        if stopped() {
            return;
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut wait = POLL;
        while batch.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
            let message = match consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    let message = e.to_string();
                    // librdkafka repeats the same error while the broker is away: say it once.
                    if last_error.as_ref() != Some(&message) {
                        warn!(data_source = %plan.data_source, error = %message, "reading packets failed; retrying");
                        last_error = Some(message);
                    }
                    break;
                }
                Some(Ok(message)) => message,
            };
            if last_error.take().is_some() {
                info!(data_source = %plan.data_source, "reading packets again");
            }
            wait = Duration::ZERO;
            let key = (message.topic().to_owned(), message.partition());
            let Some(partition) = assigned.get_mut(&key) else {
                continue;
            };
            let offset = message.offset();
            if let Some(end) = partition.end {
                if offset >= end {
                    partition.done = true;
                    continue;
                }
                if offset + 1 >= end {
                    partition.done = true;
                }
            }
            let matches =
                plan.session_key.is_empty() || message.key() == Some(plan.session_key.as_bytes());
            if !matches {
                continue;
            }
            let payload = Bytes::copy_from_slice(message.payload().unwrap_or_default());
            bytes += payload.len();
            batch.push(ReadPacket {
                stream: partition.label.clone(),
                offset: u64::try_from(offset).unwrap_or(0),
                time_nanos: message
                    .timestamp()
                    .to_millis()
                    .map_or(0, |ms| ms.saturating_mul(1_000_000)),
                packet: payload,
            });
        }
        if !batch.is_empty() && !deliver(&sender, Ok(batch), &cancel, &stopping) {
            return;
        }
    }
}

/// Sends one item, waiting while the channel is full; false when the read should stop.
fn deliver(
    sender: &Sender,
    item: Result<Vec<ReadPacket>, PacketLogError>,
    cancel: &CancellationToken,
    stopping: &CancellationToken,
) -> bool {
    futures::executor::block_on(async {
        tokio::select! {
            sent = sender.send(item) => sent.is_ok(),
            () = cancel.cancelled() => false,
            () = stopping.cancelled() => false,
        }
    })
}

type Assignment = HashMap<(String, i32), Assigned>;

/// A consumer assigned the plan's partitions from their start offsets.
fn assign(
    client: &ClientConfig,
    topics: &Topics,
    plan: &ReadPlan,
) -> Result<(BaseConsumer, Assignment), PacketLogError> {
    let mut list = TopicPartitionList::new();
    let mut assigned = HashMap::new();
    for read in &plan.spaces {
        let place = topics.ensure(&plan.data_source, &read.space)?;
        let (first, end) = topics.watermarks(&place)?;
        let start = match read.start {
            Start::At(offset) => i64::try_from(offset).unwrap_or(i64::MAX).clamp(first, end),
            Start::Latest => end,
        };
        list.add_partition_offset(&place.topic, place.partition, Offset::Offset(start))
            .map_err(|e| PacketLogError::Unavailable(format!("cannot read {place}: {e}")))?;
        let end = plan.finite.then_some(end);
        assigned.insert(
            (place.topic, place.partition),
            Assigned {
                label: read.label.clone(),
                end,
                done: end.is_some_and(|end| start >= end),
            },
        );
    }
    let consumer: BaseConsumer = client
        .clone()
        // Never joined and never committed to: no group is left on the broker.
        .set("group.id", "pitwall-readers")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .set("queued.max.messages.kbytes", PREFETCH_KIB)
        .create()
        .map_err(|e| PacketLogError::Unavailable(format!("cannot create a Kafka consumer: {e}")))?;
    consumer
        .assign(&list)
        .map_err(|e| PacketLogError::Unavailable(format!("cannot assign the read: {e}")))?;
    Ok((consumer, assigned))
}
