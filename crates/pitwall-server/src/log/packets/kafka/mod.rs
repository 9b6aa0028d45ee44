//! The Kafka packet log: the reference's data-plane topics (DATA-PLANE.md §2), shared by every
//! instance pointed at the cluster.
//!
//! Records are the reference's: key = the write's session key (`""` for data-format
//! definitions), value = the client's `Packet` bytes, no headers, timestamp = when this server
//! produced it. [`topics`] says where each space lives and creates topics; [`writer`] produces
//! (idempotent, `acks=all`) and answers once the broker acknowledged every record of a write;
//! [`reader`] runs one consumer per read, assigned by hand. Offsets are Kafka's.

mod reader;
mod topics;
mod writer;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{Ends, PacketLog, PacketLogError, PacketStream, PacketWrite, ReadPlan, Space};
use crate::clock::Clock;
use crate::log::StreamLayout;
use topics::{ESSENTIALS_SUFFIX, Topics, place_of};

/// Writes waiting for the writer thread; beyond it writes answer `RESOURCE_EXHAUSTED`.
const WRITE_QUEUE: usize = 4096;
/// Batches a read may have waiting for its client: a slow client stops its consumer here.
const READER_QUEUE: usize = 8;
/// What the producer may hold unacknowledged, in KiB: beyond it writes answer
/// `RESOURCE_EXHAUSTED` instead of growing memory while the broker is slow or away.
const PRODUCER_QUEUE_KIB: &str = "262144";

/// How the cluster is reached.
#[derive(Debug, Clone)]
pub struct KafkaPacketSettings {
    pub brokers: String,
    /// How long a produce may wait for its acknowledgement, and a broker query for its answer.
    pub timeout: Duration,
    pub layout: StreamLayout,
}

pub struct KafkaPacketLog {
    /// Dropped at close, which ends the writer thread once it has routed what was queued.
    queue: Mutex<Option<SyncSender<writer::Job>>>,
    topics: Arc<Topics>,
    client: ClientConfig,
    runtime: Handle,
    readers: TaskTracker,
    deliveries: TaskTracker,
    stopping: CancellationToken,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn client_config(settings: &KafkaPacketSettings) -> ClientConfig {
    let timeout = settings.timeout.as_millis().max(1).to_string();
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("socket.timeout.ms", &timeout)
        .set("log_level", "3");
    config
}

impl KafkaPacketLog {
    /// Creates the clients and starts the writer thread; the broker is first asked when a
    /// packet is written or read. Must run inside the server's runtime.
    pub fn open(settings: KafkaPacketSettings, clock: Clock) -> Result<KafkaPacketLog, String> {
        let client = client_config(&settings);
        let timeout_ms = settings.timeout.as_millis().max(1).to_string();
        let mut producer_config = client.clone();
        producer_config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // A write is answered UNAVAILABLE once this passes without an acknowledgement.
            .set("message.timeout.ms", &timeout_ms)
            .set("linger.ms", "1")
            .set("compression.type", "zstd")
            .set("queue.buffering.max.kbytes", PRODUCER_QUEUE_KIB);
        let producer: FutureProducer = producer_config.create().map_err(|e| {
            format!(
                "cannot create a Kafka producer for {}: {e}",
                settings.brokers
            )
        })?;
        let topics = Arc::new(
            Topics::new(&client, settings.timeout, settings.layout.clone()).map_err(|e| {
                format!("cannot create a Kafka client for {}: {e}", settings.brokers)
            })?,
        );
        let runtime = Handle::current();
        let deliveries = TaskTracker::new();
        let (queue, jobs) = std::sync::mpsc::sync_channel(WRITE_QUEUE);
        let writer = writer::Writer {
            producer_config,
            producer,
            timeout: settings.timeout,
            topics: topics.clone(),
            clock,
            runtime: runtime.clone(),
            deliveries: deliveries.clone(),
            fenced: Arc::default(),
        };
        let thread = std::thread::Builder::new()
            .name("pitwall-kafka-packets".into())
            .spawn(move || writer.run(jobs))
            .map_err(|e| format!("cannot start the packet writer thread: {e}"))?;
        info!(brokers = %settings.brokers, "packets go to the data-plane topics of Kafka");
        Ok(KafkaPacketLog {
            queue: Mutex::new(Some(queue)),
            topics,
            client,
            runtime,
            readers: TaskTracker::new(),
            deliveries,
            stopping: CancellationToken::new(),
            writer: Mutex::new(Some(thread)),
        })
    }

    /// Ends every read, routes the writes queued, stops the writer once the producer has
    /// delivered them (up to the timeout), and waits until each is answered.
    async fn shut(&self) {
        self.stopping.cancel();
        self.readers.close();
        self.readers.wait().await;
        drop(self.queue.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.deliveries.close();
        self.deliveries.wait().await;
    }

    fn end_of(&self, data_source: &str, space: &Space) -> u64 {
        let place = place_of(self.topics.layout(), data_source, space);
        match self.topics.watermarks(&place) {
            Ok((_, end)) => u64::try_from(end).unwrap_or(0),
            Err(e) => {
                warn!(%place, error = %e, "cannot read where a data-plane topic ends");
                0
            }
        }
    }
}

impl PacketLog for KafkaPacketLog {
    fn append(
        &self,
        writes: Vec<PacketWrite>,
    ) -> Result<oneshot::Receiver<Result<(), PacketLogError>>, PacketLogError> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = queue.as_ref() else {
            return Err(PacketLogError::Unavailable(
                "the server is shutting down".into(),
            ));
        };
        match queue.try_send(writer::Job { writes, reply }) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(PacketLogError::Exhausted(
                "the packet write queue is full; retry later".into(),
            )),
            Err(TrySendError::Disconnected(_)) => Err(PacketLogError::Unavailable(
                "the server is shutting down".into(),
            )),
        }
    }

    /// The high watermarks of the data source's topic partitions. Blocking (broker queries).
    fn ends(&self, data_source: &str) -> super::Ends {
        let mut ends = Ends {
            main: self.end_of(data_source, &Space::Main),
            essentials: self.end_of(data_source, &Space::Essentials),
            ..Ends::default()
        };
        let streams: Vec<String> = match self.topics.layout() {
            StreamLayout::PartitionBased(mappings) => {
                mappings.iter().map(|(stream, _)| stream.clone()).collect()
            }
            StreamLayout::TopicBased => {
                let prefix = format!("{data_source}.");
                self.topics
                    .list()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|topic| topic.strip_prefix(&prefix).map(str::to_owned))
                    .filter(|stream| !stream.is_empty() && !stream.contains('.'))
                    .collect()
            }
        };
        for stream in streams {
            let space = Space::Stream(stream.clone());
            ends.streams
                .insert(stream, self.end_of(data_source, &space));
        }
        ends
    }

    /// The data sources with an essentials topic. Blocking (a metadata query).
    fn data_sources(&self) -> Vec<String> {
        let topics = self.topics.list().unwrap_or_else(|e| {
            warn!(error = %e, "cannot list the data sources' topics");
            Vec::new()
        });
        let names: BTreeSet<String> = topics
            .iter()
            .filter_map(|topic| topic.strip_suffix(ESSENTIALS_SUFFIX))
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect();
        names.into_iter().collect()
    }

    fn space_of(&self, stream: &str) -> Space {
        super::space_of(self.topics.layout(), stream)
    }

    /// Not kept on a broker: a session's streams are the data source's topics there.
    fn session_streams(&self, _session_key: &str) -> Vec<String> {
        Vec::new()
    }

    fn read(&self, plan: ReadPlan, cancel: CancellationToken) -> PacketStream {
        let (sender, receiver) = mpsc::channel(READER_QUEUE);
        let (client, topics, stopping) = (
            self.client.clone(),
            self.topics.clone(),
            self.stopping.clone(),
        );
        self.readers.spawn_blocking_on(
            move || reader::run(client, topics, plan, sender, cancel, stopping),
            &self.runtime,
        );
        receiver
    }

    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.shut())
    }
}
