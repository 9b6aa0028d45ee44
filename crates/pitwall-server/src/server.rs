//! Startup and shutdown of one server.
//!
//! Startup is two steps. [`launch`] opens (and locks) the store and binds both ports: from then
//! on health answers `NOT_SERVING`, `/readyz` 503, and session RPCs `UNAVAILABLE`, so an
//! orchestrator can tell "starting" from "down" during a long replay. [`Launched::finish`] reads
//! the log into the projection, starts the writer and reports ready (health `SERVING`, and the
//! ready file when one is asked for).
//! Shutdown: health `NOT_SERVING`, stop accepting connections, finish the writes already
//! queued, then end notification streams and feed watchers once they have been sent everything
//! those writes caused, wait for open requests, close the log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use pitwall_core::Projection;
use pitwall_proto::api::connection_manager_service_server::ConnectionManagerServiceServer;
use pitwall_proto::api::data_format_manager_service_server::DataFormatManagerServiceServer;
use pitwall_proto::api::packet_reader_service_server::PacketReaderServiceServer;
use pitwall_proto::api::packet_writer_service_server::PacketWriterServiceServer;
use pitwall_proto::api::session_management_service_server::SessionManagementServiceServer;
use pitwall_proto::feed::read_connections_server::ReadConnectionsServer;
use pitwall_proto::feed::session_feed_server::SessionFeedServer;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::ServiceBuilder;
use tower::util::MapResponseLayer;
use tracing::{info, warn};

use crate::admin::{self, Readiness};
use crate::apply::{Applier, read};
use crate::auth::{Access, GrpcAuthLayer, Tokens};
use crate::board::Board;
use crate::clock::Clock;
use crate::config::Config;
use crate::connections::accept_tcp;
use crate::dataplane::DataPlane;
use crate::dataplane::connections::{ConnectionService, Connections, ReadConnectionsService};
use crate::dataplane::formats::{FormatService, Formats};
use crate::dataplane::rates::{self, Rates};
use crate::dataplane::reader::PacketReader;
use crate::dataplane::writer::PacketWriter;
use crate::engine::{Engine, EngineOptions};
use crate::feed::Feed;
use crate::feed_service::FeedService;
use crate::grpc_status::{GrpcContentTypeLayer, oversize_as_resource_exhausted};
use crate::keys::KeySource;
use crate::log::packets::PacketLog;
use crate::log::{self, LogHealth, Opened, StartLogError};
use crate::metrics::Metrics;
use crate::notify::Hub;
use crate::service::SessionService;
use crate::shutdown::Shutdown;
use crate::sweeper::{Sweeper, SweeperOptions};
use crate::tls::{AdminListener, Tls};

/// Name of the session service in gRPC health checks and reflection.
pub const SESSION_SERVICE_NAME: &str = "ma.streaming.api.v1.SessionManagementService";
/// Name of Pitwall's own feed service in gRPC health checks and reflection.
pub const FEED_SERVICE_NAME: &str = "pitwall.v1.SessionFeed";
const HEALTH_SERVICE_NAME: &str = "grpc.health.v1.Health";
/// Names of the data plane's services in gRPC health checks and reflection.
pub const PACKET_WRITER_SERVICE_NAME: &str = "ma.streaming.api.v1.PacketWriterService";
pub const PACKET_READER_SERVICE_NAME: &str = "ma.streaming.api.v1.PacketReaderService";
pub const CONNECTION_SERVICE_NAME: &str = "ma.streaming.api.v1.ConnectionManagerService";
pub const READ_CONNECTIONS_SERVICE_NAME: &str = "pitwall.v1.ReadConnections";
pub const DATA_FORMAT_SERVICE_NAME: &str = "ma.streaming.api.v1.DataFormatManagerService";
/// Health names that follow the store: the server as a whole and every Stream API and
/// `pitwall.v1` service.
const STORE_HEALTH_NAMES: [&str; 8] = [
    "",
    SESSION_SERVICE_NAME,
    FEED_SERVICE_NAME,
    PACKET_WRITER_SERVICE_NAME,
    PACKET_READER_SERVICE_NAME,
    CONNECTION_SERVICE_NAME,
    READ_CONNECTIONS_SERVICE_NAME,
    DATA_FORMAT_SERVICE_NAME,
];

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Log(#[from] StartLogError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start the writer thread: {0}")]
    Writer(std::io::Error),
    #[error("gRPC reflection cannot read the service descriptors: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    KeyGenerator(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    TokenFile(#[from] crate::auth::TokenFileError),
    #[error("cannot write the ready file {path}: {source}")]
    ReadyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stopped before the server was ready")]
    StoppedBeforeReady,
    #[error("startup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("admin HTTP server failed: {0}")]
    Admin(#[from] std::io::Error),
    #[error("server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Ports bound and answering, store open but not read yet.
pub struct Launched {
    config: Config,
    clock: Clock,
    started: Instant,
    opened: Option<Opened>,
    /// The packet log, closed at shutdown.
    packets: Option<Arc<dyn PacketLog>>,
    /// The data formats of the packet log, rebuilt before the server reports ready; their
    /// followers stop at shutdown.
    formats: Option<Arc<Formats>>,
    addrs: Addrs,
    metrics: Metrics,
    hub: Arc<Hub>,
    feed: Arc<Feed>,
    engine: Arc<OnceLock<Engine>>,
    access: Access,
    tls: bool,
    health: HealthReporter,
    readiness: Readiness,
    shutdown: Shutdown,
    /// Background tasks of the ports: accept loops, TLS handshakes, feed watchers, board event
    /// streams. Each ends at shutdown (watchers once the feed closes); shutdown waits for them.
    tasks: TaskTracker,
    grpc_task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    admin_task: Option<JoinHandle<std::io::Result<()>>>,
}

#[derive(Debug, Clone, Copy)]
struct Addrs {
    grpc: SocketAddr,
    metrics: SocketAddr,
}

/// A started server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    addrs: Addrs,
    access: Access,
    shutdown: Shutdown,
    done: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// The address the gRPC port is bound to (the real port when 0 was asked for).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addrs.grpc
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.addrs.metrics
    }

    /// A handle that starts a graceful shutdown when triggered.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// The access check, to reload its token file.
    pub fn access(&self) -> Access {
        self.access.clone()
    }

    /// Starts a graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.shutdown.trigger();
        self.wait().await
    }

    /// Waits until the server has stopped (after a shutdown is triggered elsewhere).
    pub async fn wait(self) -> Result<(), ServeError> {
        self.done.await?
    }
}

/// Opens the store, replays it, binds both ports and starts serving: [`launch`] then
/// [`Launched::finish`], on the system clock.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    launch(config, Clock::system()).await?.finish().await
}

/// Opens and locks the store and binds both ports; health says `NOT_SERVING` until
/// [`Launched::finish`] has read the store. `clock` is the time every decision uses.
pub async fn launch(config: Config, clock: Clock) -> Result<Launched, StartError> {
    let started = Instant::now();
    let metrics = Metrics::new();
    let (store, data_dir) = (config.store.clone(), config.data_dir.clone());
    let store_options = log::embedded::Options {
        cache_bytes: config.store_cache_bytes,
        skip_damaged_rows: config.skip_damaged_rows,
    };
    let opened =
        tokio::task::spawn_blocking(move || log::open(&store, &data_dir, store_options)).await??;
    let (packets, rebuild_formats) =
        log::packets::open(&config, clock.clone(), metrics.clone()).await?;
    let packets = Some(packets);

    let grpc_listener = bind(config.listen, "gRPC").await?;
    let metrics_listener = bind(config.metrics_listen, "metrics").await?;
    let addrs = Addrs {
        grpc: local_addr(&grpc_listener, config.listen, "gRPC")?,
        metrics: local_addr(&metrics_listener, config.metrics_listen, "metrics")?,
    };

    let tls = config.tls.as_ref().map(Tls::load).transpose()?;
    let access = Access::new(
        config
            .auth_tokens
            .as_deref()
            .map(Tokens::load)
            .transpose()?,
    );

    let shutdown = Shutdown::new();
    let readiness = Readiness::default();
    let hub = Hub::new(config.subscriber_queue, metrics.clone());
    let feed = Feed::new(config.feed_window, config.subscriber_queue, metrics.clone());
    let engine = Arc::new(OnceLock::new());
    let tasks = TaskTracker::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in STORE_HEALTH_NAMES {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pitwall_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(SESSION_SERVICE_NAME)
        .with_service_name(FEED_SERVICE_NAME)
        .with_service_name(PACKET_WRITER_SERVICE_NAME)
        .with_service_name(PACKET_READER_SERVICE_NAME)
        .with_service_name(CONNECTION_SERVICE_NAME)
        .with_service_name(READ_CONNECTIONS_SERVICE_NAME)
        .with_service_name(DATA_FORMAT_SERVICE_NAME)
        .with_service_name(HEALTH_SERVICE_NAME)
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pitwall_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(SESSION_SERVICE_NAME)
        .with_service_name(FEED_SERVICE_NAME)
        .with_service_name(PACKET_WRITER_SERVICE_NAME)
        .with_service_name(PACKET_READER_SERVICE_NAME)
        .with_service_name(CONNECTION_SERVICE_NAME)
        .with_service_name(READ_CONNECTIONS_SERVICE_NAME)
        .with_service_name(DATA_FORMAT_SERVICE_NAME)
        .with_service_name(HEALTH_SERVICE_NAME)
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()?;

    let keys = match &config.remote_key_generator {
        Some(address) => KeySource::remote(address, config.key_generator_timeout)
            .map_err(StartError::KeyGenerator)?,
        None => KeySource::Local,
    };
    let service = SessionService::new(
        engine.clone(),
        hub.clone(),
        metrics.clone(),
        config.limits.clone(),
        config.integrate_session_management,
        shutdown.clone(),
        keys,
    )
    .with_max_message_bytes(config.max_message_bytes);
    let sessions = SessionManagementServiceServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let feed_service = SessionFeedServer::new(FeedService::new(
        engine.clone(),
        feed.clone(),
        metrics.clone(),
        config.limits.clone(),
        config.max_message_bytes,
        tasks.clone(),
    ))
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);
    // The rebuild starts now, beside the session replay; `finish` waits for it.
    let formats = packets.clone().map(|packets| {
        let formats = Formats::new(packets, clock.clone(), metrics.clone());
        if rebuild_formats {
            formats.start();
        }
        formats
    });
    let rates = Arc::new(Rates::new(clock.clone(), rates::DEFAULT_CAPACITY));
    let plane = DataPlane {
        packets: packets.clone(),
        formats: formats.clone(),
        connections: Arc::new(Connections::new(
            config.max_read_connections,
            metrics.clone(),
        )),
        engine: engine.clone(),
        limits: config.limits.clone(),
        metrics: metrics.clone(),
        batching: config.batching,
        rates: rates.clone(),
    };
    let max_message = config.max_message_bytes;
    let packet_writer = PacketWriterServiceServer::new(PacketWriter::new(plane.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let packet_reader = PacketReaderServiceServer::new(PacketReader::new(plane.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let read_connections = ReadConnectionsServer::new(ReadConnectionsService::new(plane.clone()));
    let data_formats = DataFormatManagerServiceServer::new(FormatService::new(plane.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let connections = ConnectionManagerServiceServer::new(ConnectionService::new(plane))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let limits = config.connections;
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(limits.keepalive_interval)
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .layer(
            ServiceBuilder::new()
                .layer(MapResponseLayer::new(oversize_as_resource_exhausted))
                .layer(GrpcContentTypeLayer)
                .layer(GrpcAuthLayer {
                    access: access.clone(),
                }),
        )
        .add_service(sessions)
        .add_service(feed_service)
        .add_service(packet_writer)
        .add_service(packet_reader)
        .add_service(connections)
        .add_service(read_connections)
        .add_service(data_formats)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let grpc_shutdown = shutdown.clone();
    let stop_serving = async move { grpc_shutdown.wait().await };
    let grpc_task = match &tls {
        Some(tls) => {
            let connections = ReceiverStream::new(tls.accept_grpc(
                grpc_listener,
                limits,
                shutdown.clone(),
                &tasks,
            ))
            .map(|(connection, _peer)| Ok::<_, std::io::Error>(connection));
            tokio::spawn(router.serve_with_incoming_shutdown(connections, stop_serving))
        }
        None => {
            let connections =
                ReceiverStream::new(accept_tcp(grpc_listener, limits, shutdown.clone(), &tasks))
                    .map(Ok::<_, std::io::Error>);
            tokio::spawn(router.serve_with_incoming_shutdown(connections, stop_serving))
        }
    };
    let board = Board {
        engine: engine.clone(),
        feed: feed.clone(),
        calls: tasks.clone(),
        access: access.clone(),
        limits: config.limits.clone(),
        clock: clock.clone(),
        tls: tls.is_some(),
        packets: packets.clone().map(|packets| packets as Arc<dyn PacketLog>),
        rates,
    };
    let admin_task = match &tls {
        Some(tls) => tokio::spawn(admin::serve(
            AdminListener {
                accepted: tls.accept_admin(metrics_listener, limits, shutdown.clone(), &tasks),
                local_addr: addrs.metrics,
            },
            metrics.clone(),
            readiness.clone(),
            board,
            shutdown.clone(),
        )),
        None => tokio::spawn(admin::serve(
            metrics_listener,
            metrics.clone(),
            readiness.clone(),
            board,
            shutdown.clone(),
        )),
    };
    info!(
        grpc = %addrs.grpc,
        metrics = %addrs.metrics,
        log = %opened.describe(),
        "ports bound; reading the log"
    );
    Ok(Launched {
        config,
        clock,
        started,
        opened: Some(opened),
        packets,
        formats,
        addrs,
        metrics,
        hub,
        feed,
        engine,
        access,
        tls: tls.is_some(),
        health,
        readiness,
        shutdown,
        tasks,
        grpc_task: Some(grpc_task),
        admin_task: Some(admin_task),
    })
}

impl Launched {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addrs.grpc
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.addrs.metrics
    }

    /// A handle that starts a graceful shutdown when triggered; a shutdown triggered before
    /// `finish` takes effect as soon as the server is ready.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// The access check, to reload its token file.
    pub fn access(&self) -> Access {
        self.access.clone()
    }

    /// Reads the log into the projection, starts the writer and reports ready.
    pub async fn finish(mut self) -> Result<RunningServer, StartError> {
        let replay_started = Instant::now();
        let applier = Applier::new(
            Projection::default(),
            self.hub.clone(),
            self.feed.clone(),
            self.metrics.clone(),
        );
        let context = log::Context {
            applier: applier.clone(),
            clock: self.clock.clone(),
            layout: self.config.stream_layout.clone(),
            feed_window: self.config.feed_window,
            shutdown: self.shutdown.clone(),
            packets: self.packets.clone(),
        };
        let opened = self.opened.take().expect("finish runs once");
        let log = tokio::task::spawn_blocking(move || opened.start(context))
            .await??
            .ok_or(StartError::StoppedBeforeReady)?;
        let sessions = {
            let projection = read(&applier.projection);
            for (data_source, counts) in projection.counts_by_data_source() {
                self.metrics
                    .set_session_counts(data_source, counts.total, counts.completed);
            }
            info!(
                sessions = projection.len(),
                data_sources = projection.counts_by_data_source().count(),
                elapsed_ms = replay_started.elapsed().as_millis() as u64,
                "store read"
            );
            projection.len()
        };

        if let Some(formats) = &self.formats {
            formats.ready().await;
        }

        let (engine, writer) = Engine::start(
            log.clone(),
            applier,
            EngineOptions {
                limits: self.config.limits.clone(),
                write_queue: self.config.write_queue,
                max_batch: self.config.max_batch,
                feed_window: self.config.feed_window,
                clock: self.clock.clone(),
            },
        )
        .map_err(StartError::Writer)?;
        let sweeper = Sweeper::start(
            engine.clone(),
            SweeperOptions {
                auto_end: self.config.auto_end.clone(),
                retention: self.config.retention,
                trim_by_age: self.config.feed_window.max_age.is_some(),
            },
            self.clock.clone(),
            self.shutdown.clone(),
        );
        let log_health = tokio::spawn(follow_log_health(
            engine.clone(),
            self.health.clone(),
            self.readiness.clone(),
            self.shutdown.clone(),
        ));
        // Only `finish` sets it, once.
        let _ = self.engine.set(engine);
        for name in STORE_HEALTH_NAMES {
            self.health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        self.readiness.set(true);
        if let Some(address) = &self.config.remote_key_generator {
            info!(%address, "session keys come from the remote key generator");
        }
        if !self.config.integrate_session_management {
            info!("IntegrateSessionManagement is false: session RPCs answer success = false");
        }
        let access = if self.access.is_enabled() {
            "tokens"
        } else if self.config.listen.ip().is_loopback() {
            "open"
        } else {
            warn!(
                listen = %self.config.listen,
                "access is open: no --auth-tokens, and the gRPC port listens beyond loopback"
            );
            "open-beyond-loopback"
        };
        if let Some(path) = &self.config.ready_file {
            write_ready_file(path, self.addrs, sessions).map_err(|source| {
                StartError::ReadyFile {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        info!(
            grpc = %self.addrs.grpc,
            metrics = %self.addrs.metrics,
            data_dir = %self.config.data_dir.display(),
            tls = self.tls,
            access,
            sessions,
            startup_ms = self.started.elapsed().as_millis() as u64,
            "pitwall ready"
        );

        let stopping = self.shutdown.clone();
        let grace = self.config.shutdown_grace;
        let health = self.health.clone();
        let readiness = self.readiness.clone();
        let hub = self.hub.clone();
        let feed = self.feed.clone();
        let tasks = self.tasks.clone();
        let ready_file = self.config.ready_file.clone();
        let packets = self.packets.take();
        let formats = self.formats.take();
        let grpc_task = self.grpc_task.take().expect("finish runs once");
        let admin_task = self.admin_task.take().expect("finish runs once");
        let done = tokio::spawn(async move {
            stopping.wait().await;
            let began = Instant::now();
            info!("shutting down: no new connections, finishing queued writes");
            if let Some(path) = &ready_file {
                let _ = std::fs::remove_file(path);
            }
            readiness.set(false);
            for name in STORE_HEALTH_NAMES {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            sweeper.stop().await;
            // Every write accepted so far is answered, so its notifications are queued...
            writer.stop().await;
            // The data format followers stop, then reads of packets end; the packet writes
            // already queued are made durable.
            if let Some(formats) = &formats {
                formats.close().await;
            }
            if let Some(packets) = &packets {
                packets.close().await;
            }
            // ...and every stream ends once it has been sent them.
            hub.close();
            feed.close();
            tasks.close();
            tasks.wait().await;
            let _ = log_health.await;
            // In-flight requests finish; a stream that does not end by itself (a health Watch)
            // is cut when the grace period is over, so it cannot hold the process open.
            let abort = grpc_task.abort_handle();
            let grpc_result = match tokio::time::timeout(grace, grpc_task).await {
                Ok(result) => result.map_err(ServeError::from),
                Err(_) => {
                    warn!(
                        grace_ms = grace.as_millis() as u64,
                        "requests still open after the shutdown grace period; closing them"
                    );
                    abort.abort();
                    Ok(Ok(()))
                }
            };
            let _ = tokio::task::spawn_blocking(move || log.close()).await;
            let admin_result = admin_task.await;
            info!(
                elapsed_ms = began.elapsed().as_millis() as u64,
                "shutdown complete"
            );
            grpc_result??;
            admin_result??;
            Ok(())
        });
        Ok(RunningServer {
            addrs: self.addrs,
            access: self.access.clone(),
            shutdown: self.shutdown.clone(),
            done,
        })
    }
}

impl Drop for Launched {
    /// A launch abandoned before `finish` (startup failed) must not leave its ports serving.
    fn drop(&mut self) {
        if self.grpc_task.is_some() {
            self.shutdown.trigger();
        }
        if let Some(formats) = &self.formats {
            formats.stop();
        }
    }
}

/// How often a failed store is asked to recover when no write comes to try it.
const RECOVERY_PROBE: Duration = Duration::from_secs(1);

/// Keeps health and readiness in step with the log: a log that cannot take writes marks the
/// session service `NOT_SERVING` (reads still answer from what was applied); a failed store
/// marks the whole server `NOT_SERVING` and `/readyz` 503 until it recovers, and is asked to
/// recover every [`RECOVERY_PROBE`] meanwhile.
async fn follow_log_health(
    engine: Engine,
    health: HealthReporter,
    readiness: Readiness,
    shutdown: Shutdown,
) {
    let mut changes = engine.health();
    loop {
        let failed = matches!(*changes.borrow(), LogHealth::Failed(_));
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RECOVERY_PROBE), if failed => {
                engine.recover();
                continue;
            }
            () = shutdown.wait() => return,
        }
        let state = changes.borrow_and_update().clone();
        if shutdown.is_triggered() {
            return;
        }
        let (names, status, ready): (&[&str], _, _) = match &state {
            LogHealth::Serving => (&STORE_HEALTH_NAMES, ServingStatus::Serving, true),
            LogHealth::WritesDown(_) => (&[SESSION_SERVICE_NAME], ServingStatus::NotServing, true),
            LogHealth::Failed(_) => (&STORE_HEALTH_NAMES, ServingStatus::NotServing, false),
        };
        for name in names {
            health.set_service_status(*name, status).await;
        }
        readiness.set(ready);
    }
}

/// Writes the addresses once the server is ready, for scripts and tests that start it: written
/// whole under another name, then renamed, so a reader never sees half of it.
fn write_ready_file(path: &Path, addrs: Addrs, sessions: usize) -> std::io::Result<()> {
    let ready = serde_json::json!({
        "grpc": addrs.grpc.to_string(),
        "metrics": addrs.metrics.to_string(),
        "pid": std::process::id(),
        "sessions": sessions,
    });
    let text = format!("{ready}\n");
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, what, source })
}

fn local_addr(
    listener: &TcpListener,
    addr: SocketAddr,
    what: &'static str,
) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, what, source })
}
