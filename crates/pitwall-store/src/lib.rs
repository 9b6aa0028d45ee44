//! Durable storage of sessions.
//!
//! - [`embedded`]: the default store, one crash-safe redb database in a data directory. Each
//!   commit holds a batch of records' results and is fsync'd before it returns, so callers can
//!   acknowledge as soon as it does.
//!
//! - [`kafka`]: the reference's `SessionInfo` topic as the log: produce with `acks=all`, follow
//!   from the beginning, topic management, watermarks of a data source's topics.
//!
//! Only the engine's writer calls [`EmbeddedStore::commit`] or [`kafka::KafkaLog::append`];
//! this crate knows nothing of gRPC, notifications or clocks.

pub mod embedded;
pub mod kafka;

pub use embedded::{EmbeddedOptions, EmbeddedStore, StoreError};
