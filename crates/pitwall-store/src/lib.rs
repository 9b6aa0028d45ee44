//! Durable storage of sessions.
//!
//! - [`embedded`]: the default store, one crash-safe redb database in a data directory. Each
//!   commit holds a batch of records' results and is fsync'd before it returns, so callers can
//!   acknowledge as soon as it does.
//!
//! Only the engine's writer calls [`EmbeddedStore::commit`]; this crate knows nothing of gRPC,
//! notifications or clocks.

pub mod embedded;

pub use embedded::{EmbeddedOptions, EmbeddedStore, StoreError};
