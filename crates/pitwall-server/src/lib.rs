//! The Pitwall server: everything between the network and the store.
//!
//! - [`config`]: the one `Config`, and the reference's `AppConfig.json` keys.
//! - [`engine`]: the single writer (decides batches, group commit through the log) and the
//!   shared projection; [`log`]: the seam every store plugs into (embedded, or a broker topic);
//!   [`apply`]: the one way records reach the projection, notifications and the feed.
//! - [`fanout`]: bounded live subscribers, cut off when they fall behind; [`notify`]: start/stop
//!   subscribers per data source; [`feed`]: the session feed: sequenced events, the kept
//!   window, resumable watchers.
//! - [`service`]: the `SessionManagementService` RPCs: validation, answers, refusal reasons.
//! - [`feed_service`]: `pitwall.v1.SessionFeed`: Watch, ListSessions, GetSessionTree;
//!   [`follow`]: the catch-up-then-live loop every feed follower runs.
//! - [`sweeper`]: the background pass that proposes auto-ends and purges to the writer.
//! - [`clock`]: the server's time, the system's or a manual one for tests.
//! - [`metrics`]: Prometheus metrics; [`admin`]: the HTTP port serving them, health, and
//!   [`board`]: the live session board (its page, JSON and event stream).
//! - [`grpc_status`]: status codes mapped to what grpc-core clients expect.
//! - [`keys`]: new session keys, local UUIDs or the remote key generator.
//! - [`server`]: startup (open, replay, bind, ready) and graceful shutdown.
//! - [`shutdown`]: the shutdown signal every task watches.
//! - [`connections`]: accepting within limits (connection cap, bounded TLS handshakes, idle
//!   timeout, back-off when out of file descriptors).
//! - [`tls`]: certificate files and TLS termination for both ports; [`auth`]: bearer tokens,
//!   roles, and the rule of every RPC and admin path.
//!
//! Only the engine's writer thread appends to the log; only the [`apply::Applier`] changes the
//! projection, the notification hub and the feed; request handlers read the projection and
//! submit commands.

pub mod admin;
pub mod apply;
pub mod auth;
pub mod board;
pub mod clock;
pub mod config;
pub mod connections;
pub mod dataplane;
pub mod engine;
pub mod fanout;
pub mod feed;
pub mod feed_service;
pub mod follow;
pub mod grpc_status;
pub mod keys;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod sweeper;
pub mod tls;

pub use clock::{Clock, ManualClock};
pub use config::{AppConfig, Config};
pub use pitwall_core::Limits;
pub use server::{Launched, RunningServer, ServeError, StartError, launch, start};
pub use shutdown::Shutdown;
