//! `pitwall serve`: builds the config, starts the server, and stops it gracefully on SIGINT or
//! SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::ArgMatches;
use clap::parser::ValueSource;
use pitwall_server::AppConfig;
use pitwall_server::auth::Access;
use pitwall_server::config::{self, Config, Overrides};
use pitwall_server::tls::TlsFiles;
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

pub async fn run(args: ServeArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let config = build_config(&args, matches)?;
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

fn build_config(args: &ServeArgs, matches: &ArgMatches) -> anyhow::Result<Config> {
    let app = match &args.config {
        Some(path) => Some((path.as_path(), AppConfig::load(path)?)),
        None => None,
    };
    let file = app.as_ref().map(|(path, app)| (*path, app));
    let config = Config::layered(file, overrides(args, matches))?;
    if let Some((path, app)) = &app {
        for note in app.notes.iter().chain(&app.unused_here(&config.store)) {
            info!(config = %path.display(), "{note}");
        }
    }
    Ok(config)
}

/// The settings given by a flag or a variable (clap has already let a flag win over its
/// variable); the rest keep what the config file or the defaults say.
fn overrides(args: &ServeArgs, matches: &ArgMatches) -> Overrides {
    let given = |id: &str| {
        !matches!(
            matches.value_source(id),
            None | Some(ValueSource::DefaultValue)
        )
    };
    macro_rules! given {
        ($id:literal, $value:expr) => {
            given($id).then(|| $value)
        };
    }
    let limits = &args.limits;
    Overrides {
        listen: given!("listen", args.listen),
        metrics_listen: given!("metrics_listen", args.metrics_listen),
        data_dir: given!("data_dir", args.data_dir.clone()),
        store: Some(match args.store {
            StoreKind::Embedded => config::StoreKind::Embedded,
            StoreKind::Kafka => config::StoreKind::Broker,
        }),
        brokers: args.broker.clone(),
        session_topic: given!("kafka_topic", args.kafka_topic.clone()),
        broker_timeout: given!(
            "kafka_timeout_ms",
            Duration::from_millis(args.kafka_timeout_ms)
        ),
        max_message_bytes: given!("max_message_bytes", args.max_message_bytes),
        subscriber_queue: given!("subscriber_queue", args.subscriber_queue),
        write_queue: given!("write_queue", args.write_queue),
        max_batch: given!("max_batch", args.max_batch),
        store_cache_bytes: given!("store_cache_bytes", args.store_cache_bytes),
        remote_key_generator: args.remote_key_generator.clone(),
        key_generator_timeout: given!(
            "key_generator_timeout_ms",
            Duration::from_millis(args.key_generator_timeout_ms)
        ),
        shutdown_grace: given!(
            "shutdown_grace_seconds",
            Duration::from_secs(args.shutdown_grace_seconds)
        ),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            }),
            _ => None,
        },
        auth_tokens: args.auth_tokens.clone(),
        idle_after: given!("auto_end_idle_after", args.auto_end_idle_after.0),
        max_duration: given!("auto_end_max_duration", args.auto_end_max_duration.0),
        retention: given!("retention_completed_for", args.retention_completed_for.0),
        feed_max_events: given!("feed_max_events", args.feed_max_events),
        feed_max_age: given!("feed_max_age", args.feed_max_age.0),
        ready_file: args.ready_file.clone(),
        skip_damaged_rows: given!("skip_damaged_rows", args.skip_damaged_rows),
        max_connections: given!("max_connections", args.max_connections),
        max_concurrent_streams: given!("max_concurrent_streams", args.max_concurrent_streams),
        idle_timeout: given!("idle_timeout", args.idle_timeout.0),
        keepalive_interval: given!("keepalive_interval", args.keepalive_interval.0),
        keepalive_timeout: given!(
            "keepalive_timeout_seconds",
            Duration::from_secs(args.keepalive_timeout_seconds)
        ),
        data_source_bytes: given!("max_data_source_bytes", limits.max_data_source_bytes),
        detail_key_bytes: given!("max_detail_key_bytes", limits.max_detail_key_bytes),
        detail_value_bytes: given!("max_detail_value_bytes", limits.max_detail_value_bytes),
        details_per_session: given!("max_details", limits.max_details),
        associates_per_session: given!("max_associates", limits.max_associates),
        type_bytes: given!("max_type_bytes", limits.max_type_bytes),
        identifier_bytes: given!("max_identifier_bytes", limits.max_identifier_bytes),
        session_bytes: given!("max_session_bytes", limits.max_session_bytes),
        creation_time_skew: given!("max_creation_time_skew", limits.max_creation_time_skew.0),
        packet_retention_bytes: given!("packet_retention_bytes", args.packet_retention_bytes.0),
        packet_retention_age: given!("packet_retention_age", args.packet_retention_age.0),
        packet_min_free_bytes: given!("packet_min_free_bytes", args.packet_min_free_bytes),
        packet_cache_bytes: given!(
            "packet_cache_bytes",
            usize::try_from(args.packet_cache_bytes).unwrap_or(usize::MAX)
        ),
        batching_responses: given!("batching_responses", args.batching_responses),
        max_read_connections: given!("max_read_connections", args.max_read_connections),
    }
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
