//! The log seam: where the writer makes records durable, and where they come back from to be
//! applied.
//!
//! [`Log`] is all the writer knows of a store. Two implement it: [`embedded`] (one redb file:
//! the sessions' state and the feed, committed together) and [`kafka`] (the reference's
//! session topic, shared by every instance: a follower applies what it reads). Outside this
//! module and the store crate, nothing names a broker product; the server's startup picks a
//! log from [`StoreConfig`].
//!
//! Every record has a position, one number per record, which is also its feed sequence.
//! [`Log::append`] returns once each record is durable *and* applied by the
//! [`Applier`](crate::apply::Applier), so the writer answers with read-your-writes on either
//! log.

pub mod embedded;
pub mod kafka;
pub mod packets;

use std::collections::BTreeMap;
use std::sync::Arc;

use pitwall_core::overlay::Changed;
use pitwall_core::{EventKind, Record};
use pitwall_proto::feed;
use prost_types::Timestamp;
use thiserror::Error;
use tokio::sync::watch;

use crate::apply::Applier;
use crate::clock::Clock;
use crate::feed::FeedWindow;
use crate::shutdown::Shutdown;

pub use kafka::StreamLayout;

/// A record's place in its log, and its feed sequence. Counted from 1 (0 means "from now").
pub type Position = u64;

/// Where sessions are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded store in the data directory.
    Embedded,
    /// The session topic of a Kafka cluster, shared by every instance pointed at it.
    Kafka {
        brokers: String,
        topic: String,
        /// How long a produce, a broker query or waiting to read a write back may take.
        timeout: std::time::Duration,
    },
}

impl StoreConfig {
    /// A broker's session topic.
    pub fn broker(brokers: String, topic: String, timeout: std::time::Duration) -> StoreConfig {
        StoreConfig::Kafka {
            brokers,
            topic,
            timeout,
        }
    }

    /// The brokers of a broker store.
    pub fn brokers(&self) -> Option<&str> {
        match self {
            StoreConfig::Kafka { brokers, .. } => Some(brokers),
            StoreConfig::Embedded => None,
        }
    }
}

/// A batch the writer decided, to make durable in order.
pub struct Batch {
    pub records: Vec<Record>,
    /// Per record, what it does and the session right after it, as the writer decided it
    /// against the sessions and the batch's earlier records; `None` when it changes nothing.
    pub changes: Vec<Option<(EventKind, feed::Session)>>,
    /// The sessions the batch changed, as it leaves them.
    pub sessions: Vec<Changed>,
    /// When the batch was decided: the time the log records it at.
    pub at: Timestamp,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LogError {
    /// The log cannot take or confirm the write now; the message says what became of it.
    #[error("{0}")]
    Unavailable(String),
}

/// Whether the log can take writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogHealth {
    Serving,
    /// Writes cannot be made durable until the log's service returns (a broker that does not
    /// answer); reads answer from what was applied.
    WritesDown(String),
    /// The store failed (a write error such as a full disk); the log retries until a write
    /// succeeds again. Reads answer from what was applied.
    Failed(String),
}

pub trait Log: Send + Sync {
    /// Makes the records durable in order and has them applied; returns each record's
    /// position, or why it is not (known to be) durable. Blocking.
    fn append(&self, batch: Batch) -> Vec<Result<Position, LogError>>;

    /// Where the data source's topics stand now, as `"{topic}:{partition}"` → next offset: what
    /// a session records when it starts or ends. Blocking.
    fn offsets(&self, data_source: &str) -> Result<BTreeMap<String, i64>, LogError>;

    /// The streams of a session: those its packets were written to (embedded store), or the
    /// data source's (a broker's topics). Blocking.
    fn streams(&self, data_source: &str, session_key: &str) -> Vec<String>;

    /// Drops kept feed history outside `window` at `now`, when nothing else is written.
    fn trim(&self, window: FeedWindow, now: Timestamp);

    /// Whether the log can take writes, and each change of it.
    fn health(&self) -> watch::Receiver<LogHealth>;

    /// Tries to make a failed log writable again (the server asks now and then while it is
    /// failed, so it recovers even when no write comes).
    fn recover(&self) {}

    /// Stops what the log runs in the background; the writer has stopped.
    fn close(&self);
}

/// A log opened by [`open`], not yet read into the projection.
pub enum Opened {
    Embedded(embedded::Opened),
    Kafka(kafka::Settings),
}

/// Opens (and locks) the store the configuration names. An embedded store is opened here,
/// before the ports are bound, so that a data directory in use fails startup at once.
/// Blocking.
pub fn open(
    store: &StoreConfig,
    data_dir: &std::path::Path,
    options: embedded::Options,
) -> Result<Opened, StartLogError> {
    Ok(match store {
        StoreConfig::Embedded => Opened::Embedded(embedded::Opened::open(data_dir, options)?),
        StoreConfig::Kafka {
            brokers,
            topic,
            timeout,
        } => Opened::Kafka(kafka::Settings {
            brokers: brokers.clone(),
            topic: topic.clone(),
            timeout: *timeout,
        }),
    })
}

/// What starting a log needs besides the store itself.
pub struct Context {
    pub applier: Applier,
    pub clock: Clock,
    pub layout: StreamLayout,
    pub feed_window: FeedWindow,
    pub shutdown: Shutdown,
    /// The packet log beside the sessions, whose offsets sessions record (embedded store).
    pub packets: Option<Arc<dyn packets::PacketLog>>,
}

impl Opened {
    /// Reads the log into the projection and keeps it applied from then on. `None` when
    /// shutdown began first. Blocking.
    pub fn start(self, context: Context) -> Result<Option<Arc<dyn Log>>, StartLogError> {
        Ok(match self {
            Opened::Embedded(opened) => Some(Arc::new(opened.start(context)?)),
            Opened::Kafka(settings) => {
                kafka::KafkaLog::start(settings, context)?.map(|log| Arc::new(log) as Arc<dyn Log>)
            }
        })
    }

    /// A line for the startup log saying what was opened.
    pub fn describe(&self) -> String {
        match self {
            Opened::Embedded(opened) => format!("store {}", opened.path().display()),
            Opened::Kafka(settings) => format!(
                "session topic {} on Kafka {}",
                settings.topic, settings.brokers
            ),
        }
    }
}

#[derive(Debug, Error)]
pub enum StartLogError {
    #[error(transparent)]
    Store(#[from] pitwall_store::StoreError),
    #[error(transparent)]
    Kafka(#[from] pitwall_store::kafka::KafkaStoreError),
    #[error("cannot open the packet log: {0}")]
    PacketLog(String),
    #[error("cannot register the log's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot start the log's {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
}
