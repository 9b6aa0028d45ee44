//! The packet log seam: where the data plane's packets are made durable and read back, per
//! data source, in the reference's offset spaces (main, one per stream, essentials).
//!
//! [`PacketLog`] is all the data-plane services know of a store: [`embedded`] keeps packets in
//! a redb file beside the sessions; [`kafka`] keeps them in the reference's topics of a Kafka
//! cluster, shared by every instance pointed at it. Writes are queued to the log and answered once durable
//! (group commit); reads are owned tasks that follow the log from a start offset into a bounded
//! channel, so a slow client slows only its own read.

pub mod embedded;
pub mod kafka;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use prost::bytes::Bytes;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use pitwall_core::validate::RESERVED_STREAM;
pub use pitwall_store::packets::Space;

use crate::clock::Clock;
use crate::config::Config;
use crate::log::{StartLogError, StoreConfig, StreamLayout};
use crate::metrics::Metrics;

/// The packet log of the configured store, and whether data formats are rebuilt for every
/// data source before the server is ready (the embedded store, which has them at hand) or on
/// each data source's first use (a broker, where each would be one more consumer).
pub async fn open(
    config: &Config,
    clock: Clock,
    metrics: Metrics,
) -> Result<(Arc<dyn PacketLog>, bool), StartLogError> {
    let layout = config.stream_layout.clone();
    Ok(match &config.store {
        StoreConfig::Embedded => {
            let (data_dir, options) = (config.data_dir.clone(), config.packets.clone());
            let log = tokio::task::spawn_blocking(move || {
                embedded::EmbeddedPacketLog::open(&data_dir, options, layout, clock, metrics)
            })
            .await
            .map_err(|e| StartLogError::PacketLog(e.to_string()))??;
            (Arc::new(log), true)
        }
        StoreConfig::Kafka {
            brokers, timeout, ..
        } => {
            let settings = kafka::KafkaPacketSettings {
                brokers: brokers.clone(),
                timeout: *timeout,
                layout,
            };
            let log =
                kafka::KafkaPacketLog::open(settings, clock).map_err(StartLogError::PacketLog)?;
            (Arc::new(log), false)
        }
    })
}

/// The space a stream's packets go to under `layout`: the main stream for `""`, and for a
/// stream the layout does not give a space of its own (an unmapped stream under
/// `PartitionBased`, routed to the main stream as the reference routes it).
pub fn space_of(layout: &StreamLayout, stream: &str) -> Space {
    if stream.is_empty() {
        return Space::Main;
    }
    match layout {
        StreamLayout::TopicBased => Space::Stream(stream.to_owned()),
        StreamLayout::PartitionBased(mappings) => {
            if mappings.iter().any(|(mapped, _)| mapped == stream) {
                Space::Stream(stream.to_owned())
            } else {
                Space::Main
            }
        }
    }
}

/// One packet to append.
#[derive(Debug, Clone)]
pub struct PacketWrite {
    pub data_source: String,
    /// `""` for the main stream.
    pub stream: String,
    /// The session key the reference keys the record with (readers filter on it).
    pub session_key: String,
    /// The client's encoded `Packet`, validated, stored and served as these bytes.
    pub packet: Bytes,
    /// `Packet.is_essential`: a copy also goes to the essentials.
    pub essential: bool,
}

/// Why a write or a read was not done.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PacketLogError {
    /// The write queue is full, or the disk is too full to take the write.
    #[error("{0}")]
    Exhausted(String),
    /// The log cannot make writes durable now (the store failed, the server stops).
    #[error("{0}")]
    Unavailable(String),
}

/// Where a data source's spaces stand: the offset each one's next packet gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ends {
    pub main: u64,
    pub essentials: u64,
    /// Stream → next offset, for the streams that have a space of their own.
    pub streams: BTreeMap<String, u64>,
}

/// Where a read starts in one space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// An absolute offset: below the first kept one reads from the first kept one, beyond the
    /// end reads from the end.
    At(u64),
    /// Only what is written from now on.
    Latest,
    /// Where the read's consumer group left off (its committed offset), the end when it has
    /// none. Only a broker keeps groups: elsewhere the end.
    Committed,
}

impl Start {
    /// The Stream API's offsets: `≥ 0` absolute, negative "the end", or where the connection's
    /// consumer group left off when it names one (DATA-PLANE.md §9.4).
    pub fn from_api(offset: i64, consumer_group: &str) -> Start {
        match u64::try_from(offset) {
            Ok(offset) => Start::At(offset),
            Err(_) if consumer_group.is_empty() => Start::Latest,
            Err(_) => Start::Committed,
        }
    }
}

/// One space a read follows, and the stream name its packets are labelled with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSpace {
    pub space: Space,
    pub label: String,
    pub start: Start,
}

/// What a read follows.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    pub data_source: String,
    pub spaces: Vec<ReadSpace>,
    /// Only packets written with this session key; every packet when empty.
    pub session_key: String,
    /// Stop at the end each space had when the read started (ReadEssentials); follow for ever
    /// otherwise.
    pub finite: bool,
    /// The consumer group the read commits what its client has taken to, and resumes from
    /// ([`Start::Committed`]); none when empty. Only a broker keeps groups.
    pub consumer_group: String,
}

/// A packet as a reader gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPacket {
    /// The stream label: `""` for the main stream and the essentials.
    pub stream: String,
    pub offset: u64,
    /// When it was written, in nanoseconds since the Unix epoch.
    pub time_nanos: i64,
    pub packet: Bytes,
}

/// The packets of a read, in batches, as its task reads them; the channel closes when a finite
/// read is done, when the read is cancelled, or with an error.
pub type PacketStream = mpsc::Receiver<Result<Vec<ReadPacket>, PacketLogError>>;

pub trait PacketLog: Send + Sync {
    /// Queues the packets, in order; the receiver answers once all of them are durable (or
    /// why not). A full queue answers at once.
    fn append(
        &self,
        writes: Vec<PacketWrite>,
    ) -> Result<oneshot::Receiver<Result<(), PacketLogError>>, PacketLogError>;

    /// Where the data source's spaces stand now.
    fn ends(&self, data_source: &str) -> Ends;

    /// The data sources that have had packets written, in name order.
    fn data_sources(&self) -> Vec<String>;

    /// The space a stream's packets go to under the configured layout.
    fn space_of(&self, stream: &str) -> Space;

    /// The streams `session_key` has written packets to, by data source.
    fn session_streams(&self, session_key: &str) -> Vec<String>;

    /// Starts a read following `plan`; it stops when the receiver is dropped, `cancel` fires,
    /// or the server stops. Its first message is an empty batch, sent once its start positions
    /// are fixed: whatever is written after it arrives is read.
    fn read(&self, plan: ReadPlan, cancel: CancellationToken) -> PacketStream;

    /// Ends every read, then finishes the writes queued (made durable, or answered with why
    /// not) and stops the log's threads.
    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}
