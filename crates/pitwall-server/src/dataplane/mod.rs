//! The data plane of the Stream API: the services that write and read telemetry packets and
//! the read connections they follow, over the [`PacketLog`](crate::log::packets::PacketLog).
//!
//! - [`writer`]: `PacketWriterService`: data packets into the packet log (answered once
//!   durable), info packets into the session log as session records.
//! - [`reader`]: `PacketReaderService`: `ReadPackets` (live, for ever), `ReadEssentials`
//!   (finite), `ReadDataPackets` (live, filtered by type and identifiers), each an owned read
//!   into a bounded channel.
//! - [`formats`]: data format ids (`DataFormatManagerService`), kept in the essentials as
//!   `DataFormatDefinition` packets and rebuilt from them.
//! - [`connections`]: the read connections, and `ConnectionManagerService`.
//! - [`rates`]: packets made durable per session and stream, and their rate (the board's
//!   telemetry panel), counted as the writer's batches are acknowledged.
//!
//! The data plane's RPCs report failures as gRPC statuses: their responses carry nothing to
//! say `success = false` with.

pub mod connections;
pub mod formats;
pub mod rates;
pub mod reader;
pub mod writer;

use std::sync::{Arc, OnceLock};

use pitwall_core::Limits;
use tonic::Status;

use crate::engine::Engine;
use crate::log::packets::{PacketLog, PacketLogError};
use crate::metrics::Metrics;
use connections::Connections;
use formats::Formats;
use rates::Rates;

/// What the data-plane services share.
#[derive(Clone)]
pub struct DataPlane {
    /// `None` only for a server built without a packet log: the RPCs say so.
    pub packets: Option<Arc<dyn PacketLog>>,
    /// The data formats of the packet log's data sources (with the packet log).
    pub formats: Option<Arc<Formats>>,
    pub connections: Arc<Connections>,
    /// The session engine, for info packets; set once the store has been read.
    pub engine: Arc<OnceLock<Engine>>,
    pub limits: Limits,
    pub metrics: Metrics,
    /// `BatchingResponses`: group the packets read into fewer responses.
    pub batching: Batching,
    /// Counted by the writer once a batch is durable; read by the board.
    pub rates: Arc<Rates>,
}

/// How reads group packets into responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub enabled: bool,
    /// Packets in one response at most.
    pub max_packets: usize,
    /// Bytes of packets in one response at most: below a client's default 4 MiB message limit.
    pub max_bytes: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            enabled: false,
            max_packets: 15_000,
            max_bytes: 1024 * 1024,
        }
    }
}

impl DataPlane {
    fn packets(&self) -> Result<&Arc<dyn PacketLog>, Status> {
        self.packets.as_ref().ok_or_else(|| {
            Status::unavailable("this server has no packet log: the data plane is not served")
        })
    }
}

fn status_of(error: PacketLogError) -> Status {
    match error {
        PacketLogError::Exhausted(reason) => Status::resource_exhausted(reason),
        PacketLogError::Unavailable(reason) => Status::unavailable(reason),
    }
}

fn invalid(rejection: pitwall_core::Rejection) -> Status {
    Status::invalid_argument(rejection.to_string())
}
