//! The Pitwall server: everything between the network and the store.
//!
//! - [`config`]: the one `Config`, and the reference's `AppConfig.json` keys.
//! - [`engine`]: the single writer (group commit into the store) and the shared projection;
//!   [`apply`]: records into the projection, then notifications; [`kafka_backend`]: the
//!   follower of the Kafka topic and the Kafka write path.
//! - [`notify`]: start/stop subscribers per data source, bounded queues, cut-off of laggards.
//! - [`feed`]: the session feed: sequenced events, the kept window, resumable watchers.
//! - [`service`]: the `SessionManagementService` RPCs: validation, answers, refusal reasons.
//! - [`feed_service`]: `pitwall.v1.SessionFeed`: Watch, ListSessions, GetSessionTree.
//! - [`sweeper`]: the background pass that auto-ends abandoned sessions and purges expired ones.
//! - [`metrics`]: Prometheus metrics; [`admin`]: the HTTP port serving them and health.
//! - [`grpc_status`]: status codes mapped to what grpc-core clients expect.
//! - [`keys`]: new session keys, local UUIDs or the remote key generator.
//! - [`server`]: startup (open, replay, bind, ready) and graceful shutdown.
//! - [`shutdown`]: the shutdown signal every task watches.
//! - [`connections`]: accepting within limits (connection cap, bounded TLS handshakes, idle
//!   timeout, back-off when out of file descriptors).
//! - [`tls`]: certificate files and TLS termination for both ports; [`auth`]: bearer tokens,
//!   roles, and the rule of every RPC and admin path.
//!
//! Only the engine's writer thread writes the store; only the writer (embedded) or the Kafka
//! follower changes the projection; request handlers read the projection and submit commands.

pub mod admin;
pub mod apply;
pub mod auth;
pub mod config;
pub mod connections;
pub mod engine;
pub mod feed;
pub mod feed_service;
pub mod grpc_status;
pub mod kafka_backend;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod sweeper;
pub mod tls;

pub use config::{AppConfig, Config};
pub use pitwall_core::Limits;
pub use server::{Launched, RunningServer, ServeError, StartError, launch, start};
pub use shutdown::Shutdown;
