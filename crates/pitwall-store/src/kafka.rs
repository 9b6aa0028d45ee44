//! The Kafka store: the reference's `SessionInfo` topic as the log.
//!
//! Records are `Packet`s keyed by session key, produced with `acks=all` and idempotence. Every
//! instance reads the topic from the start with its own consumer (no consumer group, no
//! commits) and applies what it reads; a write is answered once this instance has read it
//! back, so the topic's order is the order of state and notifications everywhere.
//!
//! This module only talks to the broker: producing, following, topic management, watermarks.
//! Applying records is the caller's (the same projection as the embedded store).

use std::collections::BTreeMap;
use std::time::Duration;

use pitwall_core::Record;
use pitwall_core::record::RecordDecodeError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;
use tracing::{info, warn};

/// The reference's session topic.
pub const SESSION_TOPIC: &str = "SessionInfo";

#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `host:port[,host:port…]`
    pub brokers: String,
    pub topic: String,
    /// How long a produce, a metadata query or a watermark query may take.
    pub timeout: Duration,
}

/// How a data source's streams map to Kafka (the reference's `StreamCreationStrategy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamLayout {
    /// Streams are partitions of the main topic, per `PartitionMappings` (strategy 1).
    PartitionBased(Vec<(String, u32)>),
    /// Streams are topics `"{data_source}.{stream}"` (strategy 2).
    TopicBased,
}

#[derive(Debug, Error)]
pub enum KafkaStoreError {
    #[error("cannot create a Kafka client for {brokers}: {source}")]
    Client { brokers: String, source: KafkaError },
    #[error("Kafka broker {brokers} unreachable: {source}")]
    Unreachable { brokers: String, source: KafkaError },
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("Kafka write failed: {0}")]
    Produce(KafkaError),
    #[error("Kafka consumer error: {0}")]
    Consume(KafkaError),
}

/// The producing and querying side.
pub struct KafkaLog {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// A consumer that is never assigned: used for metadata and watermark queries only.
    queries: BaseConsumer,
    options: KafkaOptions,
}

/// One message read from the topic. `record` is an error for messages that are not session
/// records (they still advance the offset).
#[derive(Debug)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    /// The message's timestamp (milliseconds since the epoch), when it has one.
    pub timestamp_ms: Option<i64>,
    pub record: Result<Record, RecordDecodeError>,
}

fn base_config(options: &KafkaOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        .set("socket.timeout.ms", millis(options.timeout))
        .set("log_level", "3");
    config
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

impl KafkaLog {
    /// Connects, creates the topic if it is missing, and warns if it is compacted or expires
    /// records. Fails if the broker cannot be reached within the timeout.
    pub fn connect(options: KafkaOptions) -> Result<KafkaLog, KafkaStoreError> {
        let client_error = |source| KafkaStoreError::Client {
            brokers: options.brokers.clone(),
            source,
        };
        let producer: FutureProducer = base_config(&options)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", millis(options.timeout))
            .set("linger.ms", "1")
            .create()
            .map_err(client_error)?;
        let admin: AdminClient<DefaultClientContext> =
            base_config(&options).create().map_err(client_error)?;
        let queries: BaseConsumer = base_config(&options)
            .set("group.id", "pitwall-queries")
            .set("enable.auto.commit", "false")
            .create()
            .map_err(client_error)?;
        let log = KafkaLog {
            producer,
            admin,
            queries,
            options,
        };
        log.ensure_topic()?;
        log.check_topic_config();
        Ok(log)
    }

    pub fn options(&self) -> &KafkaOptions {
        &self.options
    }

    fn unreachable(&self, source: KafkaError) -> KafkaStoreError {
        KafkaStoreError::Unreachable {
            brokers: self.options.brokers.clone(),
            source,
        }
    }

    /// Partitions of the topic, or an empty list if it does not exist.
    fn partitions(&self, topic: &str) -> Result<Vec<i32>, KafkaStoreError> {
        let metadata = self
            .queries
            .fetch_metadata(Some(topic), self.options.timeout)
            .map_err(|e| self.unreachable(e))?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect())
    }

    fn ensure_topic(&self) -> Result<(), KafkaStoreError> {
        let topic = &self.options.topic;
        if !self.partitions(topic)?.is_empty() {
            return Ok(());
        }
        let admin_options = AdminOptions::new().operation_timeout(Some(self.options.timeout));
        // -1 asks for the broker's default replication factor; brokers that do not know it
        // get 1.
        for replication in [-1, 1] {
            let new_topic = NewTopic::new(topic, 1, TopicReplication::Fixed(replication))
                .set("retention.ms", "-1")
                .set("cleanup.policy", "delete");
            let result =
                futures::executor::block_on(self.admin.create_topics([&new_topic], &admin_options))
                    .map_err(|e| self.unreachable(e))?;
            match result.into_iter().next() {
                Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {
                    info!(
                        topic,
                        "created the session topic (1 partition, kept forever)"
                    );
                    return Ok(());
                }
                Some(Err((_, RDKafkaErrorCode::InvalidReplicationFactor))) if replication < 0 => {
                    continue;
                }
                Some(Err((_, code))) => {
                    return Err(KafkaStoreError::CreateTopic {
                        topic: topic.clone(),
                        reason: code.to_string(),
                    });
                }
                None => break,
            }
        }
        Err(KafkaStoreError::CreateTopic {
            topic: topic.clone(),
            reason: "the broker did not answer the request".into(),
        })
    }

    /// Compaction keeps only the last record per session and expiry drops old sessions: either
    /// loses sessions on the next replay, so say so loudly.
    fn check_topic_config(&self) {
        let topic = &self.options.topic;
        let admin_options = AdminOptions::new().request_timeout(Some(self.options.timeout));
        let described = futures::executor::block_on(
            self.admin
                .describe_configs([&ResourceSpecifier::Topic(topic)], &admin_options),
        );
        let resource = match described.map(|mut r| r.pop()) {
            Ok(Some(Ok(resource))) => resource,
            Ok(Some(Err(e))) => {
                warn!(topic, error = %e, "cannot read the session topic's configuration; make sure it is neither compacted nor expiring");
                return;
            }
            Ok(None) => return,
            Err(e) => {
                warn!(topic, error = %e, "cannot read the session topic's configuration; make sure it is neither compacted nor expiring");
                return;
            }
        };
        let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
        if let Some(policy) = value("cleanup.policy")
            && policy.contains("compact")
        {
            warn!(
                topic,
                policy,
                "THE SESSION TOPIC IS COMPACTED: replays will lose sessions; set cleanup.policy=delete"
            );
        }
        if let Some(retention) = value("retention.ms")
            && retention != "-1"
        {
            warn!(
                topic,
                retention_ms = %retention,
                "THE SESSION TOPIC EXPIRES RECORDS: sessions older than this vanish on replay; set retention.ms=-1"
            );
        }
    }

    /// The next offset of every partition of the topic: replay is complete once each has been
    /// read up to it.
    pub fn end_offsets(&self) -> Result<Vec<(i32, i64)>, KafkaStoreError> {
        let topic = &self.options.topic;
        self.partitions(topic)?
            .into_iter()
            .map(|partition| {
                self.queries
                    .fetch_watermarks(topic, partition, self.options.timeout)
                    .map(|(_, high)| (partition, high))
                    .map_err(|e| self.unreachable(e))
            })
            .collect()
    }

    /// Produces the records in order, stamped `timestamp_ms` (milliseconds since the epoch),
    /// and waits until each is acknowledged by all in-sync replicas. Returns each record's
    /// (partition, offset), or why it failed.
    pub fn append<'a>(
        &self,
        records: impl IntoIterator<Item = &'a Record>,
        timestamp_ms: i64,
    ) -> Vec<Result<(i32, i64), KafkaStoreError>> {
        let pending: Vec<_> = records
            .into_iter()
            .map(|record| {
                let payload = record.encode();
                let key = record.session_key().to_owned();
                self.producer
                    .send_result(
                        FutureRecord::to(&self.options.topic)
                            .key(&key)
                            .payload(&payload)
                            .timestamp(timestamp_ms),
                    )
                    .map_err(|(e, _)| KafkaStoreError::Produce(e))
            })
            .collect();
        let results: Vec<_> = pending
            .into_iter()
            .map(|sent| {
                let delivery = futures::executor::block_on(sent?)
                    .map_err(|_| KafkaStoreError::Produce(KafkaError::Canceled))?;
                delivery
                    .map(|d| (d.partition, d.offset))
                    .map_err(|(e, _)| KafkaStoreError::Produce(e))
            })
            .collect();
        // The topic was deleted under us (or the broker lost it): create it again so the next
        // writes succeed; these ones are answered as failed.
        let topic_missing = results.iter().any(|r| {
            matches!(
                r,
                Err(KafkaStoreError::Produce(e))
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
            )
        });
        if topic_missing && let Err(e) = self.ensure_topic() {
            warn!(error = %e, "the session topic is missing and cannot be created");
        }
        results
    }

    /// Whether the broker answers a metadata query for the topic.
    pub fn probe(&self) -> Result<(), KafkaStoreError> {
        self.partitions(&self.options.topic).map(|_| ())
    }

    /// Where a data source's topics stand now: `"{topic}:{partition}"` → next offset, 0 for a
    /// topic or partition that does not exist yet.
    pub fn session_offsets(
        &self,
        data_source: &str,
        layout: &StreamLayout,
    ) -> Result<BTreeMap<String, i64>, KafkaStoreError> {
        let metadata = self
            .queries
            .fetch_metadata(None, self.options.timeout)
            .map_err(|e| self.unreachable(e))?;
        let exists = |topic: &str, partition: i32| {
            metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.partitions().iter().any(|p| p.id() == partition))
        };
        let mut wanted = vec![
            (data_source.to_owned(), 0),
            (format!("{data_source}_essential"), 0),
        ];
        match layout {
            StreamLayout::PartitionBased(mappings) => {
                for (_, partition) in mappings {
                    wanted.push((data_source.to_owned(), *partition as i32));
                }
            }
            StreamLayout::TopicBased => {
                for topic in metadata.topics() {
                    if stream_of(data_source, topic.name()).is_some() {
                        wanted.push((topic.name().to_owned(), 0));
                    }
                }
            }
        }
        let mut offsets = BTreeMap::new();
        for (topic, partition) in wanted {
            let next = if exists(&topic, partition) {
                self.queries
                    .fetch_watermarks(&topic, partition, self.options.timeout)
                    .map_err(|e| self.unreachable(e))?
                    .1
            } else {
                0
            };
            offsets.insert(format!("{topic}:{partition}"), next);
        }
        Ok(offsets)
    }

    /// The data source's streams: the mapped names (partition-based) or the existing
    /// `"{data_source}.{stream}"` topics (topic-based).
    pub fn streams(
        &self,
        data_source: &str,
        layout: &StreamLayout,
    ) -> Result<Vec<String>, KafkaStoreError> {
        match layout {
            StreamLayout::PartitionBased(mappings) => {
                Ok(mappings.iter().map(|(stream, _)| stream.clone()).collect())
            }
            StreamLayout::TopicBased => {
                let metadata = self
                    .queries
                    .fetch_metadata(None, self.options.timeout)
                    .map_err(|e| self.unreachable(e))?;
                let mut streams: Vec<String> = metadata
                    .topics()
                    .iter()
                    .filter_map(|t| stream_of(data_source, t.name()).map(str::to_owned))
                    .collect();
                streams.sort();
                Ok(streams)
            }
        }
    }

    /// A consumer that reads the topic from the beginning of every partition.
    pub fn follower(&self) -> Result<Follower, KafkaStoreError> {
        let consumer: BaseConsumer = base_config(&self.options)
            .set("group.id", "pitwall-follower")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10")
            .create()
            .map_err(|source| KafkaStoreError::Client {
                brokers: self.options.brokers.clone(),
                source,
            })?;
        let mut assignment = TopicPartitionList::new();
        for partition in self.partitions(&self.options.topic)? {
            assignment
                .add_partition_offset(&self.options.topic, partition, Offset::Beginning)
                .map_err(KafkaStoreError::Consume)?;
        }
        consumer
            .assign(&assignment)
            .map_err(KafkaStoreError::Consume)?;
        Ok(Follower { consumer })
    }
}

/// `"{data_source}.{stream}"` with a stream name without dots: the stream. Matched exactly
/// (the reference matches case-insensitively and without escaping the data source).
fn stream_of<'a>(data_source: &str, topic: &'a str) -> Option<&'a str> {
    topic
        .strip_prefix(data_source)
        .and_then(|rest| rest.strip_prefix('.'))
        .filter(|stream| !stream.is_empty() && !stream.contains('.'))
}

/// Reads the topic in order, partition by partition.
pub struct Follower {
    consumer: BaseConsumer,
}

impl Follower {
    /// The next message, or `None` if none arrived within `timeout`.
    pub fn poll(&self, timeout: Duration) -> Option<Result<Consumed, KafkaStoreError>> {
        let message = match self.consumer.poll(timeout)? {
            Ok(message) => message,
            Err(e) => return Some(Err(KafkaStoreError::Consume(e))),
        };
        let record = match message.payload() {
            Some(payload) => Record::decode(payload),
            None => Err(RecordDecodeError::UnknownType("(empty message)".into())),
        };
        Some(Ok(Consumed {
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            record,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_topics_match_the_data_source_exactly() {
        assert_eq!(stream_of("Car1", "Car1.laps"), Some("laps"));
        assert_eq!(stream_of("Car1", "Car1.laps.x"), None);
        assert_eq!(stream_of("Car1", "car1.laps"), None);
        assert_eq!(stream_of("Car1", "Car1_essential"), None);
        assert_eq!(stream_of("Car", "Car1.laps"), None);
        assert_eq!(stream_of("Car1", "Car1."), None);
    }
}
