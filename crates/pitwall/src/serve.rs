//! `pitwall serve`: builds the config, starts the server, and stops it gracefully on SIGINT or
//! SIGTERM.

use anyhow::Context;
use pitwall_server::config::Config;
use std::path::PathBuf;

use pitwall_server::auth::Access;
use pitwall_server::config::{ConnectionLimits, StoreConfig};
use pitwall_server::tls::TlsFiles;
use pitwall_server::{AppConfig, Limits};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::cli::{ServeArgs, StoreKind};

/// Reloads the token file on every SIGHUP; connections stay open. A bad file keeps the
/// tokens in force and says why.
async fn reload_tokens_on_hangup(mut hangups: Signal, access: Access, path: PathBuf) {
    while hangups.recv().await.is_some() {
        match access.reload(&path) {
            Ok((read, write, admin)) => info!(
                path = %path.display(),
                read,
                write,
                admin,
                "token file reloaded"
            ),
            Err(e) => {
                warn!(error = %e, "token file not reloaded; the previous tokens stay in force")
            }
        }
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = build_config(&args)?;
    // Registered before anything is bound, so a signal at any point after the ready line (or
    // during startup) stops the server gracefully instead of killing the process.
    let signals = Signals::register().context("cannot listen for SIGINT and SIGTERM")?;
    let hangups = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    // A file that reaches the process's file-size limit would otherwise kill it (SIGXFSZ's
    // default); handled, the write fails with EFBIG instead, which the store answers like a
    // full disk: writes refused with the reason, retried until they succeed.
    let _file_size_limit =
        signal(SignalKind::from_raw(libc::SIGXFSZ)).context("cannot handle SIGXFSZ")?;
    let token_file = config.auth_tokens.clone();
    let launched = pitwall_server::launch(config, pitwall_server::Clock::system()).await?;
    let shutdown = launched.shutdown_handle();
    let access = launched.access();
    tokio::spawn(async move {
        let signal = signals.recv().await;
        info!(signal, "signal received");
        shutdown.trigger();
    });
    if let Some(path) = token_file {
        tokio::spawn(reload_tokens_on_hangup(hangups, access, path));
    }
    let server = match launched.finish().await {
        Ok(server) => server,
        Err(pitwall_server::StartError::StoppedBeforeReady) => {
            info!("stopped before the server was ready");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    server.wait().await.context("server stopped with an error")
}

fn build_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let defaults = Config::default();
    let mut config = Config {
        listen: args.listen.unwrap_or(defaults.listen),
        metrics_listen: args.metrics_listen.unwrap_or(defaults.metrics_listen),
        data_dir: args.data_dir.clone(),
        store: StoreConfig::Embedded,
        stream_layout: defaults.stream_layout.clone(),
        integrate_session_management: true,
        limits: Limits {
            data_source_bytes: args.limits.max_data_source_bytes,
            detail_key_bytes: args.limits.max_detail_key_bytes,
            detail_value_bytes: args.limits.max_detail_value_bytes,
            details_per_session: args.limits.max_details,
            associates_per_session: args.limits.max_associates,
            type_bytes: args.limits.max_type_bytes,
            identifier_bytes: args.limits.max_identifier_bytes,
            session_bytes: args.limits.max_session_bytes,
            creation_time_skew: args.limits.max_creation_time_skew.0,
        },
        max_message_bytes: args.max_message_bytes,
        subscriber_queue: args.subscriber_queue,
        write_queue: args.write_queue,
        max_batch: args.max_batch,
        store_cache_bytes: args.store_cache_bytes,
        remote_key_generator: args.remote_key_generator.clone(),
        key_generator_timeout: std::time::Duration::from_millis(args.key_generator_timeout_ms),
        shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_seconds),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            }),
            _ => None,
        },
        auth_tokens: args.auth_tokens.clone(),
        auto_end: defaults.auto_end.clone(),
        retention: defaults.retention,
        feed_window: defaults.feed_window,
        ready_file: args.ready_file.clone(),
        skip_damaged_rows: args.skip_damaged_rows,
        connections: ConnectionLimits {
            max_connections: args.max_connections,
            max_concurrent_streams: args.max_concurrent_streams,
            idle_timeout: args.idle_timeout.0,
            keepalive_interval: args.keepalive_interval.0,
            keepalive_timeout: std::time::Duration::from_secs(args.keepalive_timeout_seconds),
            ..defaults.connections
        },
    };
    let app = match &args.config {
        Some(path) => Some((path, AppConfig::load(path)?)),
        None => None,
    };
    if let Some((path, app)) = &app {
        app.apply_to(
            path,
            &mut config,
            args.listen.is_some(),
            args.metrics_listen.is_some(),
        )?;
    }
    // Flags and variables win over the config file's Pitwall section.
    if let Some(setting) = args.auto_end_idle_after {
        config.auto_end.default.idle_after = setting.0;
    }
    if let Some(setting) = args.auto_end_max_duration {
        config.auto_end.default.max_duration = setting.0;
    }
    if let Some(setting) = args.retention_completed_for {
        config.retention = setting.0;
    }
    if let Some(max_events) = args.feed_max_events {
        config.feed_window.max_events = max_events;
    }
    if let Some(setting) = args.feed_max_age {
        config.feed_window.max_age = setting.0;
    }
    if args.store == StoreKind::Kafka {
        let broker_url = app.as_ref().and_then(|(_, app)| app.broker_url.clone());
        config.store = StoreConfig::Kafka {
            brokers: args
                .broker
                .clone()
                .or(broker_url)
                .unwrap_or_else(|| "localhost:9092".to_owned()),
            topic: args.kafka_topic.clone(),
            timeout: std::time::Duration::from_millis(args.kafka_timeout_ms),
        };
    }
    if let Some((path, app)) = &app {
        for note in app.notes.iter().chain(&app.unused_here(&config.store)) {
            info!(config = %path.display(), "{note}");
        }
    }
    Ok(config)
}

/// SIGTERM and SIGINT, listened for from registration on.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn register() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
