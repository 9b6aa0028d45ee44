//! The reference's topics of a data source, and their creation and checks.
//!
//! A space lives at a [`Place`]: main = `{ds}` partition 0; a stream = `{ds}.{stream}`
//! partition 0 (`TopicBased`) or `{ds}` partition `p` of its `PartitionMappings` entry
//! (`PartitionBased`); essentials = `{ds}_essential` partition 0. Topics are created when a
//! writer or a reader first needs them: the main topic with one partition more than the
//! highest mapped one, every other topic with one. An existing topic that lacks the partition
//! a space needs is a failed write with the reason (the reference only logs it and loses the
//! packets).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::log::StreamLayout;
use crate::log::packets::{PacketLogError, Space};

/// The suffix of a data source's essentials topic.
pub const ESSENTIALS_SUFFIX: &str = "_essential";

/// A topic partition: where one space of a data source is kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Place {
    pub topic: String,
    pub partition: i32,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.topic, self.partition)
    }
}

/// Where `space` of `data_source` is kept under `layout`.
pub fn place_of(layout: &StreamLayout, data_source: &str, space: &Space) -> Place {
    let (topic, partition) = match space {
        Space::Main => (data_source.to_owned(), 0),
        Space::Essentials => (format!("{data_source}{ESSENTIALS_SUFFIX}"), 0),
        Space::Stream(stream) => match layout {
            StreamLayout::TopicBased => (format!("{data_source}.{stream}"), 0),
            StreamLayout::PartitionBased(mappings) => {
                let partition = mappings
                    .iter()
                    .find(|(mapped, _)| mapped == stream)
                    .map_or(0, |(_, p)| i32::try_from(*p).unwrap_or(i32::MAX));
                (data_source.to_owned(), partition)
            }
        },
    };
    Place { topic, partition }
}

/// The partitions a topic is created with: the main topic holds every mapped stream's
/// partition under `PartitionBased`; every other topic has one.
fn partitions_to_create(layout: &StreamLayout, space: &Space) -> i32 {
    match (layout, space) {
        (StreamLayout::PartitionBased(mappings), Space::Main | Space::Stream(_)) => mappings
            .iter()
            .map(|(_, p)| i32::try_from(*p).unwrap_or(i32::MAX - 1) + 1)
            .max()
            .unwrap_or(1)
            .max(1),
        _ => 1,
    }
}

/// Topic management and offset queries, shared by the writer and the readers.
pub struct Topics {
    admin: AdminClient<DefaultClientContext>,
    /// A consumer that is never assigned: metadata and watermark queries only.
    queries: BaseConsumer,
    timeout: Duration,
    layout: StreamLayout,
    /// Topic → its partition count, for topics seen to exist: each topic is checked once.
    /// A `std` mutex: held for a lookup or an insert, never across a broker request.
    known: Mutex<HashMap<String, i32>>,
    /// Per place, the offset after the last record this server had acknowledged. Some brokers
    /// (the tansu test broker) report an end that stops at the first record of the last
    /// batch; a finite read must still see every write answered before it started. A `std`
    /// mutex, as `known`.
    acknowledged: Mutex<HashMap<Place, i64>>,
}

impl Topics {
    pub fn new(
        config: &ClientConfig,
        timeout: Duration,
        layout: StreamLayout,
    ) -> Result<Topics, rdkafka::error::KafkaError> {
        let admin = config.create()?;
        let queries = config
            .clone()
            .set("group.id", "pitwall-queries")
            .set("enable.auto.commit", "false")
            // Nothing is written in transactions; the stable offset some brokers report for
            // read_committed can lag the acknowledged end.
            .set("isolation.level", "read_uncommitted")
            .create()?;
        Ok(Topics {
            admin,
            queries,
            timeout,
            layout,
            known: Mutex::new(HashMap::new()),
            acknowledged: Mutex::new(HashMap::new()),
        })
    }

    pub fn layout(&self) -> &StreamLayout {
        &self.layout
    }

    /// How long a broker request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn known(&self, topic: &str) -> Option<i32> {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .copied()
    }

    /// The topic's partition count, `None` when it does not exist.
    fn partitions(&self, topic: &str, timeout: Duration) -> Result<Option<i32>, PacketLogError> {
        if let Some(count) = self.known(topic) {
            return Ok(Some(count));
        }
        let metadata = self
            .queries
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| unavailable(format!("cannot read the metadata of topic {topic}: {e}")))?;
        let count = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|count| *count > 0);
        if let Some(count) = count {
            self.known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(topic.to_owned(), count);
        }
        Ok(count)
    }

    /// Makes sure `space` of `data_source` has its topic partition: creates the topic when it
    /// is missing, fails with the reason when it exists without the partition. Blocking, until
    /// `deadline` at the latest (a topic already seen costs nothing).
    pub fn ensure(
        &self,
        data_source: &str,
        space: &Space,
        deadline: Instant,
    ) -> Result<Place, PacketLogError> {
        let place = place_of(&self.layout, data_source, space);
        let remaining = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let count = match self.partitions(&place.topic, remaining())? {
            Some(count) => count,
            None => {
                let wanted = partitions_to_create(&self.layout, space);
                self.create(&place.topic, wanted, remaining())?;
                // The broker may not list a topic it just created yet: the count asked for
                // stands until a produce says otherwise.
                let count = self
                    .partitions(&place.topic, remaining())?
                    .unwrap_or(wanted);
                self.known
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(place.topic.clone(), count);
                count
            }
        };
        if place.partition >= count {
            let reason = format!(
                "topic {} has {count} partitions, but stream {} is mapped to partition {}; add \
                 partitions to the topic or change PartitionMappings",
                place.topic,
                match space {
                    Space::Stream(stream) => stream.as_str(),
                    _ => "\"\"",
                },
                place.partition
            );
            warn!(topic = %place.topic, count, partition = place.partition, "partition count mismatch");
            // Asked again next time: partitions may have been added meanwhile.
            self.forget(&place.topic);
            return Err(unavailable(reason));
        }
        Ok(place)
    }

    fn create(
        &self,
        topic: &str,
        partitions: i32,
        timeout: Duration,
    ) -> Result<(), PacketLogError> {
        let options = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        // -1 asks for the broker's default replication factor; brokers that do not know it
        // get 1.
        for replication in [-1, 1] {
            let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
            let result =
                futures::executor::block_on(self.admin.create_topics([&new_topic], &options))
                    .map_err(|e| unavailable(format!("cannot create topic {topic}: {e}")))?;
            match result.into_iter().next() {
                Some(Ok(_)) => {
                    info!(topic, partitions, "created a data-plane topic");
                    return Ok(());
                }
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => return Ok(()),
                Some(Err((_, RDKafkaErrorCode::InvalidReplicationFactor))) if replication < 0 => {
                    continue;
                }
                Some(Err((_, code))) => {
                    return Err(unavailable(format!("cannot create topic {topic}: {code}")));
                }
                None => {
                    return Err(unavailable(format!(
                        "cannot create topic {topic}: the broker did not answer"
                    )));
                }
            }
        }
        Err(unavailable(format!(
            "cannot create topic {topic}: the broker refused every replication factor"
        )))
    }

    /// Forgets what is known of `topic`: it is looked up again when next needed.
    pub fn forget(&self, topic: &str) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
    }

    /// Notes that the broker acknowledged the record at `offset` of `place`.
    pub fn acknowledge(&self, place: &Place, offset: i64) {
        let mut acknowledged = self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
        let next = acknowledged.entry(place.clone()).or_insert(0);
        *next = (*next).max(offset + 1);
    }

    /// The first kept and the next offset of a place; `(0, 0)` when its topic or partition
    /// does not exist. Blocking.
    pub fn watermarks(&self, place: &Place) -> Result<(i64, i64), PacketLogError> {
        let (first, end) = self.broker_watermarks(place)?;
        let acknowledged = self
            .acknowledged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(place)
            .copied()
            .unwrap_or(0);
        Ok((first, end.max(acknowledged)))
    }

    fn broker_watermarks(&self, place: &Place) -> Result<(i64, i64), PacketLogError> {
        match self.partitions(&place.topic, self.timeout)? {
            Some(count) if place.partition < count => self
                .queries
                .fetch_watermarks(&place.topic, place.partition, self.timeout)
                .map_err(|e| unavailable(format!("cannot read the offsets of {place}: {e}"))),
            _ => Ok((0, 0)),
        }
    }

    /// Every topic of the cluster. Blocking.
    pub fn list(&self) -> Result<Vec<String>, PacketLogError> {
        let metadata = self
            .queries
            .fetch_metadata(None, self.timeout)
            .map_err(|e| unavailable(format!("cannot list the topics: {e}")))?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name().to_owned())
            .collect())
    }
}

fn unavailable(reason: String) -> PacketLogError {
    PacketLogError::Unavailable(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partitioned() -> StreamLayout {
        StreamLayout::PartitionBased(vec![("laps".into(), 1), ("tyres".into(), 3)])
    }

    #[test]
    fn spaces_live_in_the_reference_topics() {
        let place = |layout: &StreamLayout, space: Space| {
            let place = place_of(layout, "Car1", &space);
            (place.topic, place.partition)
        };
        let topics = StreamLayout::TopicBased;
        assert_eq!(place(&topics, Space::Main), ("Car1".into(), 0));
        assert_eq!(
            place(&topics, Space::Essentials),
            ("Car1_essential".into(), 0)
        );
        assert_eq!(
            place(&topics, Space::Stream("laps".into())),
            ("Car1.laps".into(), 0)
        );
        assert_eq!(
            place(&partitioned(), Space::Stream("tyres".into())),
            ("Car1".into(), 3)
        );
        assert_eq!(
            place(&partitioned(), Space::Essentials),
            ("Car1_essential".into(), 0)
        );
    }

    #[test]
    fn the_main_topic_is_created_with_every_mapped_partition() {
        assert_eq!(partitions_to_create(&partitioned(), &Space::Main), 4);
        assert_eq!(partitions_to_create(&partitioned(), &Space::Essentials), 1);
        assert_eq!(
            partitions_to_create(&StreamLayout::PartitionBased(Vec::new()), &Space::Main),
            1
        );
        assert_eq!(
            partitions_to_create(&StreamLayout::TopicBased, &Space::Stream("x".into())),
            1
        );
    }
}
