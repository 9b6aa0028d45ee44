//! Startup and shutdown of one server: open and replay the store, open the ports, report ready;
//! on shutdown stop accepting, end streams, finish in-flight writes, close the store.

use std::net::SocketAddr;
use std::time::Instant;

use pitwall_core::Projection;
use pitwall_proto::api::session_management_service_server::SessionManagementServiceServer;
use pitwall_store::embedded::EmbeddedOptions;
use pitwall_store::{EmbeddedStore, StoreError};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tower::util::MapResponseLayer;
use tracing::{error, info};

use crate::admin::{self, Readiness};
use crate::config::Config;
use crate::engine::{Engine, EngineOptions};
use crate::grpc_status::oversize_as_resource_exhausted;
use crate::metrics::Metrics;
use crate::notify::Hub;
use crate::service::SessionService;
use crate::shutdown::Shutdown;

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start the writer thread: {0}")]
    Writer(std::io::Error),
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

/// A started server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shutdown: Shutdown,
    done: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// The address the gRPC port is bound to (the real port when 0 was asked for).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// A handle that starts a graceful shutdown when triggered.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
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

/// Opens the store, replays it, binds both ports and starts serving.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    let started = Instant::now();
    let metrics = Metrics::new();

    let data_dir = config.data_dir.clone();
    let store_options = EmbeddedOptions {
        cache_bytes: config.store_cache_bytes,
    };
    let (store, projection) = tokio::task::spawn_blocking(move || {
        let store = EmbeddedStore::open(&data_dir, &store_options)?;
        let mut projection = Projection::default();
        for session in store.load()? {
            projection.restore(session);
        }
        Ok::<_, StoreError>((store, projection))
    })
    .await??;
    for (data_source, counts) in projection.counts_by_data_source() {
        metrics.set_session_counts(data_source, counts.total, counts.completed);
    }
    let sessions = projection.len();
    info!(
        sessions,
        path = %store.path().display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store opened and replayed"
    );

    let grpc_listener = bind(config.listen, "gRPC").await?;
    let metrics_listener = bind(config.metrics_listen, "metrics").await?;
    let grpc_addr = local_addr(&grpc_listener, config.listen, "gRPC")?;
    let metrics_addr = local_addr(&metrics_listener, config.metrics_listen, "metrics")?;

    let hub = Hub::new(config.subscriber_queue, metrics.clone());
    let (engine, writer) = Engine::start(
        store,
        projection,
        hub.clone(),
        metrics.clone(),
        EngineOptions {
            limits: config.limits.clone(),
            write_queue: config.write_queue,
            max_batch: config.max_batch,
        },
    )
    .map_err(StartError::Writer)?;

    let shutdown = Shutdown::new();
    let service = SessionService::new(
        engine,
        hub.clone(),
        metrics.clone(),
        config.limits.clone(),
        config.integrate_session_management,
        shutdown.clone(),
    );
    let grpc = SessionManagementServiceServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let grpc_shutdown = shutdown.clone();
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(MapResponseLayer::new(oversize_as_resource_exhausted))
            .add_service(grpc)
            .serve_with_incoming_shutdown(incoming, async move { grpc_shutdown.wait().await }),
    );
    let readiness = Readiness::default();
    let admin_task = tokio::spawn(admin::serve(
        metrics_listener,
        metrics,
        readiness.clone(),
        shutdown.clone(),
    ));

    readiness.set(true);
    if !config.integrate_session_management {
        info!("IntegrateSessionManagement is false: session RPCs answer success = false");
    }
    info!(
        grpc = %grpc_addr,
        metrics = %metrics_addr,
        data_dir = %config.data_dir.display(),
        sessions,
        startup_ms = started.elapsed().as_millis() as u64,
        "pitwall ready"
    );

    let stopping = shutdown.clone();
    let done = tokio::spawn(async move {
        stopping.wait().await;
        let began = Instant::now();
        info!("shutting down: no new connections, ending notification streams");
        readiness.set(false);
        hub.close();
        let grpc_result = grpc_task.await;
        // Every request has been answered; the writer finishes what is queued and closes.
        writer.stop().await;
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
        grpc_addr,
        metrics_addr,
        shutdown,
        done,
    })
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
    listener.local_addr().map_err(|source| {
        error!(%addr, what, "cannot read the bound address");
        StartError::Bind { addr, what, source }
    })
}
