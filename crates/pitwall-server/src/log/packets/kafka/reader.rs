//! One read of the Kafka packet log: its own consumer, assigned the read's topic partitions by
//! hand (unless its connection names a consumer group: no group and no commits, so nothing is
//! left on the broker), on a blocking thread owned by the log, copying records into the call's
//! bounded channel.
//!
//! Start offsets follow DATA-PLANE.md §9.4: an absolute offset below the first kept one reads
//! from the first kept one (retention removed the rest), beyond the end from the end; a
//! negative one from the end. A finite read (ReadEssentials, a data-format rebuild) stops at
//! the ends the partitions had when it started. A record removed by retention while the read
//! waits for it resumes at the first kept one. While the broker is away the consumer keeps its
//! positions and goes on from them when it returns: no gap, no duplicate.
//!
//! A read of a connection that names a `consumer_group` (§9.5) reads under that group: it
//! still assigns its partitions itself (the group holds offsets, it does not share partitions
//! out), starts a negative offset where the group left off, and commits what its client has
//! taken from the call's channel. It commits at least every [`POLL`], so a client that goes away
//! may be sent again what it took in its last moments (at least once, never a gap).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use pitwall_proto::raw_packet::PacketHeader;
use prost::Message as _;
use prost::bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::topics::{Place, Topics};
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

type Partition = (String, i32);

/// What a grouped read has sent and not committed yet: per batch sent, oldest first, the
/// positions (next offsets) it brings its partitions to.
#[derive(Default)]
struct Commits {
    /// Positions consumed since the last batch sent (records a filter dropped included).
    consumed: HashMap<Partition, i64>,
    sent: VecDeque<HashMap<Partition, i64>>,
}

impl Commits {
    fn consumed(&mut self, partition: Partition, offset: i64) {
        self.consumed.insert(partition, offset + 1);
    }

    fn sent(&mut self) {
        self.sent.push_back(std::mem::take(&mut self.consumed));
    }

    /// Commits the positions of every batch the client has taken from the channel: those sent
    /// before the ones still in it.
    fn commit_taken(&mut self, consumer: &BaseConsumer, sender: &Sender, mode: CommitMode) {
        if sender.is_closed() {
            // Dropped with what it held: what was taken is not known.
            return;
        }
        let waiting = sender.max_capacity() - sender.capacity();
        let mut taken: HashMap<Partition, i64> = HashMap::new();
        while self.sent.len() > waiting {
            if let Some(positions) = self.sent.pop_front() {
                taken.extend(positions);
            }
        }
        if taken.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), next) in &taken {
            let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        if let Err(e) = consumer.commit(&list, mode) {
            warn!(error = %e, "cannot commit a consumer group's offsets; they are committed with the next ones");
            // Kept, so that the next commit carries them.
            self.sent.push_front(taken);
        }
    }
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
    // The start positions are fixed (assigned): say so, so that the call is answered.
    if !deliver(&sender, Ok(Vec::new()), &cancel, &stopping) {
        return;
    }
    let grouped = !plan.consumer_group.is_empty();
    let mut commits = Commits::default();
    let mut last_error: Option<String> = None;
    let mut warned_undecodable = false;
    loop {
        if grouped {
            let mode = if stopped() {
                CommitMode::Sync
            } else {
                CommitMode::Async
            };
            commits.commit_taken(&consumer, &sender, mode);
        }
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
            if grouped {
                commits.consumed(key, offset);
            }
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
            // Another writer of the topic may have put anything there: a record that is not a
            // Packet is skipped (the reference ends the whole read on it).
            if PacketHeader::decode(payload.clone()).is_err() {
                if !warned_undecodable {
                    warn!(
                        data_source = %plan.data_source,
                        topic = message.topic(),
                        partition = message.partition(),
                        offset,
                        "a record that is not a Packet is skipped (said once per read)"
                    );
                    warned_undecodable = true;
                }
                continue;
            }
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
        if !batch.is_empty() {
            if !deliver(&sender, Ok(batch), &cancel, &stopping) {
                return;
            }
            if grouped {
                commits.sent();
            }
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

type Assignment = HashMap<Partition, Assigned>;

/// A consumer assigned the plan's partitions from their start offsets.
fn assign(
    client: &ClientConfig,
    topics: &Topics,
    plan: &ReadPlan,
) -> Result<(BaseConsumer, Assignment), PacketLogError> {
    let group = if plan.consumer_group.is_empty() {
        // Never joined and never committed to: no group is left on the broker.
        "pitwall-readers"
    } else {
        plan.consumer_group.as_str()
    };
    let consumer: BaseConsumer = client
        .clone()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted")
        .set("fetch.wait.max.ms", "10")
        .set("queued.max.messages.kbytes", PREFETCH_KIB)
        .create()
        .map_err(|e| PacketLogError::Unavailable(format!("cannot create a Kafka consumer: {e}")))?;
    let mut list = TopicPartitionList::new();
    let mut assigned = HashMap::new();
    for read in &plan.spaces {
        let place = topics.ensure(
            &plan.data_source,
            &read.space,
            std::time::Instant::now() + topics.timeout(),
        )?;
        let (first, end) = topics.watermarks(&place)?;
        let start = match read.start {
            Start::At(offset) => i64::try_from(offset).unwrap_or(i64::MAX).clamp(first, end),
            Start::Latest => end,
            Start::Committed => {
                committed(&consumer, &place, topics)?.map_or(end, |offset| offset.clamp(first, end))
            }
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
    consumer
        .assign(&list)
        .map_err(|e| PacketLogError::Unavailable(format!("cannot assign the read: {e}")))?;
    Ok((consumer, assigned))
}

/// The offset the consumer's group committed for `place`, if any.
fn committed(
    consumer: &BaseConsumer,
    place: &Place,
    topics: &Topics,
) -> Result<Option<i64>, PacketLogError> {
    let mut list = TopicPartitionList::new();
    list.add_partition(&place.topic, place.partition);
    let committed = consumer
        .committed_offsets(list, topics.timeout())
        .map_err(|e| {
            PacketLogError::Unavailable(format!(
                "cannot read where the consumer group left {place}: {e}"
            ))
        })?;
    Ok(committed
        .find_partition(&place.topic, place.partition)
        .and_then(|p| match p.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        }))
}
