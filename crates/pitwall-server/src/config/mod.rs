//! Server configuration: one [`Config`], whose [`Default`] holds every default, and one
//! layering function, [`Config::layered`]: defaults, then the reference's `AppConfig.json`
//! keys, then its `Pitwall` object, then what the environment and the command line give
//! ([`Overrides`], merged by the binary: a flag wins over its variable).

mod app_config;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pitwall_core::Limits;

pub use crate::connections::ConnectionLimits;
pub use crate::dataplane::Batching;
pub use crate::feed::FeedWindow;
pub use crate::log::packets::embedded::PacketLogOptions;
pub use crate::log::{StoreConfig, StreamLayout};
pub use app_config::{
    AppConfig, ConfigError, PartitionMapping, PitwallSection, parse_duration_setting,
};
pub use pitwall_core::lifecycle::{AutoEndConfig, PolicyOverride};

/// Default gRPC port of the Stream API.
pub const DEFAULT_GRPC_PORT: u16 = 13579;
/// Default Prometheus port of the reference server.
pub const DEFAULT_METRICS_PORT: u16 = 2468;

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    /// How a data source's streams map to a broker's topics (`StreamCreationStrategy`,
    /// `PartitionMappings`).
    pub stream_layout: StreamLayout,
    /// `IntegrateSessionManagement`: when false every unary RPC answers `success = false`.
    pub integrate_session_management: bool,
    pub limits: Limits,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Notifications a subscriber may fall behind by before its stream is ended.
    pub subscriber_queue: usize,
    /// Write requests waiting for the writer; beyond it writes answer `RESOURCE_EXHAUSTED`.
    pub write_queue: usize,
    /// Most write requests in one durable commit.
    pub max_batch: usize,
    /// Page cache of the embedded store.
    pub store_cache_bytes: usize,
    /// `host:port` of a remote key generator; `None` generates keys locally.
    pub remote_key_generator: Option<String>,
    /// How long CreateSession waits for the remote key generator.
    pub key_generator_timeout: std::time::Duration,
    /// How long shutdown waits for open requests and streams before closing them.
    pub shutdown_grace: std::time::Duration,
    /// TLS on both ports; `None` serves cleartext (h2c and HTTP/1.1).
    pub tls: Option<crate::tls::TlsFiles>,
    /// Bearer tokens with roles; `None` leaves access open.
    pub auth_tokens: Option<PathBuf>,
    /// Ending abandoned sessions; off by default.
    pub auto_end: AutoEndConfig,
    /// How long completed sessions are kept; `None` keeps them for ever.
    pub retention: Option<Duration>,
    /// How much of the session feed is kept for watchers to resume from.
    pub feed_window: FeedWindow,
    /// Where to write the addresses once ready (JSON), for whoever started the server.
    pub ready_file: Option<PathBuf>,
    /// Start even when stored rows fail their checksum, leaving those out (each is logged).
    pub skip_damaged_rows: bool,
    /// Limits on gRPC connections and the streams on each.
    pub connections: ConnectionLimits,
    /// The embedded packet log: its queue, batches, retention and disk reserve.
    pub packets: PacketLogOptions,
    /// `BatchingResponses`: reads group packets into fewer responses.
    pub batching: Batching,
    /// Read connections (`NewConnection`) open at once at most.
    pub max_read_connections: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_GRPC_PORT)),
            metrics_listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_METRICS_PORT)),
            data_dir: PathBuf::from("pitwall-data"),
            store: StoreConfig::Embedded,
            stream_layout: StreamLayout::PartitionBased(Vec::new()),
            integrate_session_management: true,
            limits: Limits::default(),
            max_message_bytes: 4 * 1024 * 1024,
            subscriber_queue: 10_000,
            write_queue: 16_384,
            max_batch: 1024,
            store_cache_bytes: 64 * 1024 * 1024,
            remote_key_generator: None,
            key_generator_timeout: std::time::Duration::from_secs(2),
            shutdown_grace: std::time::Duration::from_secs(10),
            tls: None,
            auth_tokens: None,
            auto_end: AutoEndConfig::default(),
            retention: None,
            feed_window: FeedWindow::default(),
            ready_file: None,
            skip_damaged_rows: false,
            connections: ConnectionLimits::default(),
            packets: PacketLogOptions::default(),
            batching: Batching::default(),
            max_read_connections: 10_000,
        }
    }
}

/// The broker log's settings when nothing names them.
pub const DEFAULT_BROKERS: &str = "localhost:9092";
pub const DEFAULT_SESSION_TOPIC: &str = "SessionInfo";
pub const DEFAULT_BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Which store a server uses, as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Embedded,
    /// A broker's session topic; its address comes from `brokers`, else `BrokerUrl`, else
    /// [`DEFAULT_BROKERS`].
    Broker,
}

/// Settings given by environment variables or flags: each one given wins over the config
/// file and the defaults. `None` leaves a setting to the layers below.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub store: Option<StoreKind>,
    pub brokers: Option<String>,
    pub session_topic: Option<String>,
    pub broker_timeout: Option<Duration>,
    pub max_message_bytes: Option<usize>,
    pub subscriber_queue: Option<usize>,
    pub write_queue: Option<usize>,
    pub max_batch: Option<usize>,
    pub store_cache_bytes: Option<usize>,
    pub remote_key_generator: Option<String>,
    pub key_generator_timeout: Option<Duration>,
    pub shutdown_grace: Option<Duration>,
    pub tls: Option<crate::tls::TlsFiles>,
    pub auth_tokens: Option<PathBuf>,
    pub idle_after: Option<Option<Duration>>,
    pub max_duration: Option<Option<Duration>>,
    pub retention: Option<Option<Duration>>,
    pub feed_max_events: Option<u64>,
    pub feed_max_age: Option<Option<Duration>>,
    pub ready_file: Option<PathBuf>,
    pub skip_damaged_rows: Option<bool>,
    pub max_connections: Option<usize>,
    pub max_concurrent_streams: Option<u32>,
    pub idle_timeout: Option<Option<Duration>>,
    pub keepalive_interval: Option<Option<Duration>>,
    pub keepalive_timeout: Option<Duration>,
    pub data_source_bytes: Option<usize>,
    pub detail_key_bytes: Option<usize>,
    pub detail_value_bytes: Option<usize>,
    pub details_per_session: Option<usize>,
    pub associates_per_session: Option<usize>,
    pub type_bytes: Option<usize>,
    pub identifier_bytes: Option<usize>,
    pub session_bytes: Option<usize>,
    pub creation_time_skew: Option<Option<Duration>>,
    pub packet_retention_bytes: Option<Option<u64>>,
    pub packet_retention_age: Option<Option<Duration>>,
    pub packet_min_free_bytes: Option<u64>,
    pub packet_cache_bytes: Option<usize>,
    pub batching_responses: Option<bool>,
    pub max_read_connections: Option<usize>,
}

impl Config {
    /// The one place precedence is decided: [`Config::default`], then the config file (its
    /// reference keys, then its `Pitwall` object), then `overrides`.
    pub fn layered(
        file: Option<(&Path, &AppConfig)>,
        overrides: Overrides,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        if let Some((path, app)) = file {
            app.apply(path, &mut config)?;
        }
        let o = overrides;
        macro_rules! set {
            ($($field:ident).+ = $value:expr) => {
                if let Some(value) = $value {
                    config.$($field).+ = value;
                }
            };
        }
        set!(listen = o.listen);
        set!(metrics_listen = o.metrics_listen);
        set!(data_dir = o.data_dir);
        set!(max_message_bytes = o.max_message_bytes);
        set!(subscriber_queue = o.subscriber_queue);
        set!(write_queue = o.write_queue);
        set!(max_batch = o.max_batch);
        set!(store_cache_bytes = o.store_cache_bytes);
        set!(key_generator_timeout = o.key_generator_timeout);
        set!(shutdown_grace = o.shutdown_grace);
        set!(auto_end.default.idle_after = o.idle_after);
        set!(auto_end.default.max_duration = o.max_duration);
        set!(retention = o.retention);
        set!(feed_window.max_events = o.feed_max_events);
        set!(feed_window.max_age = o.feed_max_age);
        set!(skip_damaged_rows = o.skip_damaged_rows);
        set!(connections.max_connections = o.max_connections);
        set!(connections.max_concurrent_streams = o.max_concurrent_streams);
        set!(connections.idle_timeout = o.idle_timeout);
        set!(connections.keepalive_interval = o.keepalive_interval);
        set!(connections.keepalive_timeout = o.keepalive_timeout);
        set!(limits.data_source_bytes = o.data_source_bytes);
        set!(limits.detail_key_bytes = o.detail_key_bytes);
        set!(limits.detail_value_bytes = o.detail_value_bytes);
        set!(limits.details_per_session = o.details_per_session);
        set!(limits.associates_per_session = o.associates_per_session);
        set!(limits.type_bytes = o.type_bytes);
        set!(limits.identifier_bytes = o.identifier_bytes);
        set!(limits.session_bytes = o.session_bytes);
        set!(limits.creation_time_skew = o.creation_time_skew);
        set!(packets.retention_bytes = o.packet_retention_bytes);
        set!(packets.retention_age = o.packet_retention_age);
        set!(packets.min_free_bytes = o.packet_min_free_bytes);
        set!(packets.cache_bytes = o.packet_cache_bytes);
        set!(batching.enabled = o.batching_responses);
        set!(max_read_connections = o.max_read_connections);
        if o.remote_key_generator.is_some() {
            config.remote_key_generator = o.remote_key_generator;
        }
        if o.tls.is_some() {
            config.tls = o.tls;
        }
        if o.auth_tokens.is_some() {
            config.auth_tokens = o.auth_tokens;
        }
        if o.ready_file.is_some() {
            config.ready_file = o.ready_file;
        }
        if o.store == Some(StoreKind::Broker) {
            config.store = StoreConfig::broker(
                o.brokers
                    .or_else(|| file.and_then(|(_, app)| app.broker_url.clone()))
                    .unwrap_or_else(|| DEFAULT_BROKERS.to_owned()),
                o.session_topic
                    .unwrap_or_else(|| DEFAULT_SESSION_TOPIC.to_owned()),
                o.broker_timeout.unwrap_or(DEFAULT_BROKER_TIMEOUT),
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str) -> AppConfig {
        let path = std::env::temp_dir().join(format!(
            "pitwall-config-test-{}-{}.json",
            std::process::id(),
            json.len()
        ));
        std::fs::write(&path, json).unwrap();
        let app = AppConfig::load(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        app
    }

    #[test]
    fn config_ports_apply_only_when_no_flag_gave_the_address() {
        let app = file(r#"{"StreamApiPort": 1234, "PrometheusMetricPort": 4321}"#);
        let overrides = Overrides {
            metrics_listen: Some(Config::default().metrics_listen),
            ..Overrides::default()
        };
        let config = Config::layered(Some((Path::new("AppConfig.json"), &app)), overrides).unwrap();
        assert_eq!(config.listen.port(), 1234);
        assert_eq!(config.metrics_listen.port(), DEFAULT_METRICS_PORT);
    }

    #[test]
    fn flags_and_variables_win_over_the_pitwall_section() {
        let app = file(
            r#"{"Pitwall": {"retention": {"completed_for": "7days"}, "feed": {"max_events": 5}}}"#,
        );
        let overrides = Overrides {
            retention: Some(None),
            ..Overrides::default()
        };
        let config = Config::layered(Some((Path::new("AppConfig.json"), &app)), overrides).unwrap();
        assert_eq!(config.retention, None);
        assert_eq!(config.feed_window.max_events, 5);
    }

    #[test]
    fn the_broker_comes_from_the_flag_then_broker_url_then_the_default() {
        let app = file(r#"{"BrokerUrl": "broker-1:9092"}"#);
        let from_file = Config::layered(
            Some((Path::new("AppConfig.json"), &app)),
            Overrides {
                store: Some(StoreKind::Broker),
                ..Overrides::default()
            },
        )
        .unwrap();
        let brokers = |config: &Config| {
            config
                .store
                .brokers()
                .expect("the broker log was asked for")
                .to_owned()
        };
        assert_eq!(brokers(&from_file), "broker-1:9092");
        let from_flag = Config::layered(
            Some((Path::new("AppConfig.json"), &app)),
            Overrides {
                store: Some(StoreKind::Broker),
                brokers: Some("broker-2:9092".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(brokers(&from_flag), "broker-2:9092");
        let neither = Config::layered(
            None,
            Overrides {
                store: Some(StoreKind::Broker),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(brokers(&neither), DEFAULT_BROKERS);
        assert_eq!(
            Config::layered(
                Some((Path::new("AppConfig.json"), &app)),
                Overrides::default()
            )
            .unwrap()
            .store,
            StoreConfig::Embedded
        );
    }
}
