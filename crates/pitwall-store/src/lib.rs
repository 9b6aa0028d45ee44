//! Durable storage of sessions.
//!
//! - [`embedded`]: the default store, one crash-safe redb database in a data directory. Each
//!   commit holds a batch of records' results and is fsync'd before it returns, so callers can
//!   acknowledge as soon as it does.
//!
//! - [`integrity`]: `pitwall store check` and `repair`; rows carry CRC32C checksums, and redb's
//!   panics on damaged files are caught at this crate's boundary and reported as errors.
//!
//! - [`kafka`]: the reference's `SessionInfo` topic as the log: produce with `acks=all`, follow
//!   from the beginning, topic management, watermarks of a data source's topics.
//!
//! Only the engine's writer calls [`EmbeddedStore::commit`] or [`kafka::KafkaLog::append`];
//! this crate knows nothing of gRPC, notifications or clocks.

pub mod embedded;
mod guard;
pub mod integrity;
pub mod kafka;
mod rows;

pub use embedded::{EmbeddedOptions, EmbeddedStore, StoreError};
pub use rows::{DamagedRow, RowDamage};
