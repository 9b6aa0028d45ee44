//! Durable storage of sessions and packets.
//!
//! - [`embedded`]: the default store, one crash-safe redb database in a data directory. Each
//!   commit holds a batch of records' results and is durable before it returns (synced in the
//!   `journal` beside the database, committed into it behind the writer by the `checkpoint`
//!   thread), so callers can acknowledge as soon as it does.
//!
//! - [`packets`]: the embedded packet log, a second redb database: packets in chunks per
//!   offset space (main, streams, essentials) of each data source, retention from the front.
//!
//! - [`integrity`]: `pitwall store check` and `repair`; rows carry CRC32C checksums, and redb's
//!   panics on damaged files are caught at this crate's boundary and reported as errors.
//!
//! - [`kafka`]: the reference's `SessionInfo` topic as the log: produce with `acks=all`, follow
//!   from the beginning, topic management, watermarks of a data source's topics.
//!
//! Only the engine's writer calls [`EmbeddedStore::commit`] or [`kafka::KafkaLog::append`];
//! this crate knows nothing of gRPC, notifications or clocks.

mod checkpoint;
pub mod embedded;
mod feed_index;
mod guard;
pub mod integrity;
mod journal;
pub mod kafka;
pub mod packets;
mod rows;

pub use embedded::{EmbeddedOptions, EmbeddedStore, StoreError};
pub use rows::{DamagedRow, RowDamage};
