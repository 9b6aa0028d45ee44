//! Benchmarks of the Pitwall server, driven over gRPC from outside like any client, and of
//! etcd as a peer with the same loops and payload.
//!
//! - [`server`]: spawns `pitwall serve` (or attaches to a running one), waits for its ready
//!   line, stops it with SIGTERM.
//! - [`process`]: what is read and done to a server process: memory, SIGTERM, free ports.
//! - [`connection`]: the HTTP/2 connections request loops are spread over.
//! - [`driver`]: request loops, closed-loop or open-loop at a fixed rate.
//! - [`latency`]: latency histograms and their percentiles.
//! - [`payload`]: the session-sized create request (five details) both systems store.
//! - [`scenario`]: load scenarios: health, create, update, get, end, mixed.
//! - [`fanout`]: many notification subscribers while sessions are created; delivery checks.
//! - [`board`]: the same with browsers' event streams (the board's Server-Sent Events).
//! - [`recovery`]: fill a store, restart on it, time to ready and memory per session.
//! - [`packets`]: the data plane's 1 KiB packets (stamped with writer, sequence and due
//!   time) and the writer loop that streams them through `WriteDataPackets`.
//! - [`dataplane`]: packet writes against the transport's and the disk's limits, replay from
//!   offset 0, live latency to readers, memory per connection and reader and with a stalled
//!   reader.
//! - [`noop`]: the in-process no-op `PacketWriterService`, the transport's limit.
//! - [`engines`]: redb and fjall, a row per packet and chunks, for the packet log.
//! - [`metrics`]: the server's Prometheus metrics, for packets per commit.
//! - [`etcd`]: the peer, spawned and driven with `Put` and `Watch`.
//! - [`h2load`]: create against etcd's `Put` and a cheap read, all driven by `h2load`.
//! - [`report`]: results, medians over runs, goals, markdown tables.
//! - [`suite`]: everything in one command (`all`), and the peer comparison (`etcd`).
//! - [`watchers`]: `pitwall.v1` feed watchers kept reading during a load.
//!
//! The benchmarks check correctness (no failed request, every notification once and in order,
//! every session back after a restart, every packet read back once and in its writer's order)
//! and measure; only the measuring depends on the machine.

pub mod board;
pub mod connection;
pub mod dataplane;
pub mod driver;
pub mod engines;
pub mod etcd;
pub mod fanout;
pub mod h2load;
pub mod latency;
pub mod metrics;
pub mod noop;
pub mod packets;
pub mod payload;
pub mod process;
pub mod recovery;
pub mod report;
pub mod scenario;
pub mod server;
pub mod suite;
pub mod watchers;
