//! The command line. Every flag has a `PITWALL_*` environment variable; a flag wins over its
//! variable, both win over `AppConfig.json`, which wins over the defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use pitwall_server::Config;
use pitwall_server::config::{DEFAULT_BROKER_TIMEOUT, DEFAULT_SESSION_TOPIC};

use crate::values;

#[derive(Debug, Parser)]
#[command(name = "pitwall", version, about = "The Stream API session service")]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    /// Without a command, `pitwall` serves (as `pitwall serve`).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The command line, read with which `serve` settings were given rather than defaulted.
pub struct Parsed {
    pub cli: Cli,
    /// `serve`'s matches: the `serve` subcommand's, or the environment's alone when `pitwall`
    /// runs without a command.
    pub serve: Option<ArgMatches>,
}

/// Reads the command line (exits with clap's message on a usage error).
pub fn parse() -> Parsed {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let serve = matches.subcommand_matches("serve").cloned();
    Parsed { cli, serve }
}

impl Parsed {
    /// The command to run, with `serve`'s matches: the one given, or `serve` with its
    /// settings from the environment.
    pub fn command(self) -> (Command, Option<ArgMatches>) {
        match self.cli.command {
            Some(command) => (command, self.serve),
            None => {
                let matches = ServeOnly::command().get_matches_from(["pitwall"]);
                let serve = ServeOnly::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
                (Command::Serve(Box::new(serve.serve)), Some(matches))
            }
        }
    }
}

/// `serve`'s arguments alone, to fill them from the environment and defaults.
#[derive(Debug, Parser)]
struct ServeOnly {
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// See and change sessions on a running server.
    Session(Box<SessionArgs>),
    /// Check or repair the embedded store of a stopped server.
    Store(Box<StoreArgs>),
    /// Write or follow telemetry packets on a running server.
    Packets(Box<PacketsArgs>),
    /// See the read connections open on a running server.
    Connections(Box<ConnectionsArgs>),
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Verify every page (redb's integrity check) and every row's checksum, changing nothing.
    /// Exits 0 when all is well, 1 when something is damaged.
    Check {
        /// Directory of the embedded store.
        #[arg(long, env = "PITWALL_DATA_DIR", default_value_os_t = defaults().data_dir)]
        data_dir: PathBuf,
    },
    /// Repair what redb can, then remove the rows whose checksum fails, saying which. Copy the
    /// store file first if you may want those rows back.
    Repair {
        /// Directory of the embedded store.
        #[arg(long, env = "PITWALL_DATA_DIR", default_value_os_t = defaults().data_dir)]
        data_dir: PathBuf,
    },
}

/// How a client command reaches its server.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server's gRPC URL (https:// when the server uses TLS).
    #[arg(
        long,
        global = true,
        env = "PITWALL_SERVER",
        default_value = "http://127.0.0.1:13579"
    )]
    pub server: String,
    /// Bearer token sent with every call.
    #[arg(long, global = true, env = "PITWALL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate that signed the server's certificate (for https:// URLs).
    #[arg(long, global = true, env = "PITWALL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Output format: a table for people, JSON for scripts (JSON lines for what streams).
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct SessionArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: SessionCommand,
}

#[derive(Debug, Args)]
pub struct PacketsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: PacketsCommand,
}

#[derive(Debug, Subcommand)]
pub enum PacketsCommand {
    /// Print the packets of a data source as they are written, until Ctrl-C: one line each
    /// (time, stream, type, bytes, essential, session key), or JSON lines.
    Tail {
        #[arg(long)]
        data_source: String,
        /// Only the packets written with this session key.
        #[arg(long)]
        session: Option<String>,
        /// A stream to follow besides the main stream; repeat for more.
        #[arg(long = "stream")]
        streams: Vec<String>,
        /// Start with what is already stored instead of what comes next.
        #[arg(long)]
        from_start: bool,
    },
    /// Write packets as a car or a rig would (PeriodicData, one sample each), and print how
    /// many the server acknowledged durable; Ctrl-C stops early, once the call in flight is
    /// answered (a second Ctrl-C does not wait).
    Send {
        #[arg(long)]
        data_source: String,
        /// The session key the packets carry.
        #[arg(long)]
        session: Option<String>,
        /// The stream to write to; the main stream when not given.
        #[arg(long)]
        stream: Option<String>,
        /// How many packets to write.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Packets per second (e.g. 50, 0.5); as fast as the server takes them when not given.
        #[arg(long, value_parser = parse_rate)]
        rate: Option<f64>,
    },
}

#[derive(Debug, Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: ConnectionsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConnectionsCommand {
    /// The read connections open on the server (NewConnection), with what each reads.
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Create a session and print its key.
    Create {
        #[arg(long)]
        data_source: String,
        /// Session type [server default: Session].
        #[arg(long = "type")]
        session_type: Option<String>,
        /// Version [server default: 1].
        #[arg(long)]
        version: Option<u32>,
        #[arg(long)]
        identifier: Option<String>,
        /// Offset from UTC, as ±HH:MM.
        #[arg(long, value_parser = values::parse_utc_offset, allow_hyphen_values = true)]
        utc_offset: Option<prost_types::Duration>,
        /// A detail as key=value; repeat for more.
        #[arg(long = "detail", value_parser = values::parse_detail)]
        details: Vec<(String, String)>,
        /// An associate session key; repeat for more.
        #[arg(long = "associate")]
        associates: Vec<String>,
    },
    /// List sessions, oldest first: every session, or those matching every filter given.
    List {
        /// Only this data source; repeat for several [default: every data source].
        #[arg(long = "data-source", value_name = "DATA_SOURCE")]
        data_sources: Vec<String>,
        /// Only identifiers matching this shell-style pattern (`*`, `?`, `[abc]`).
        #[arg(long, value_name = "GLOB")]
        identifier: Option<String>,
        /// Only sessions with this detail, as key=value; repeat for more (all must hold).
        #[arg(long = "detail", value_name = "KEY=VALUE", value_parser = values::parse_detail)]
        details: Vec<(String, String)>,
        /// Only sessions created at or after this RFC 3339 time.
        #[arg(long, value_name = "TIME", value_parser = values::parse_time)]
        created_after: Option<prost_types::Timestamp>,
        /// Only sessions created before this RFC 3339 time.
        #[arg(long, value_name = "TIME", value_parser = values::parse_time)]
        created_before: Option<prost_types::Timestamp>,
        /// Only sessions that ended at or after this RFC 3339 time.
        #[arg(long, value_name = "TIME", value_parser = values::parse_time)]
        ended_after: Option<prost_types::Timestamp>,
        /// Only sessions that ended before this RFC 3339 time.
        #[arg(long, value_name = "TIME", value_parser = values::parse_time)]
        ended_before: Option<prost_types::Timestamp>,
        /// Only sessions that have not ended.
        #[arg(long, conflicts_with = "complete")]
        live: bool,
        /// Only sessions that have ended.
        #[arg(long)]
        complete: bool,
    },
    /// Show a session with its associates (children) and the sessions naming it as an
    /// associate (parents), each followed recursively.
    Tree {
        session_key: String,
        /// Levels to follow in each direction [default: as deep as the server allows].
        #[arg(long, value_name = "N")]
        depth: Option<u32>,
    },
    /// Show everything about one session.
    Get { session_key: String },
    /// Change a session's identifier and/or details.
    Update {
        session_key: String,
        #[arg(long)]
        identifier: Option<String>,
        /// A detail as key=value; repeat for more.
        #[arg(long = "detail", value_parser = values::parse_detail)]
        details: Vec<(String, String)>,
    },
    /// Add an associate session.
    Associate {
        session_key: String,
        associate_session_key: String,
    },
    /// End a session.
    End {
        session_key: String,
        /// Termination time, RFC 3339 (e.g. 2026-05-01T14:03:00Z) [default: now, server clock].
        #[arg(long, value_parser = values::parse_time)]
        at: Option<prost_types::Timestamp>,
    },
    /// Print sessions of a data source starting and stopping, until Ctrl-C. With --all or
    /// --from, print every change (started, updated, ended, purged) with its sequence number.
    Watch {
        /// The data source to watch (required unless --all).
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        data_source: Option<String>,
        /// Every data source.
        #[arg(long)]
        all: bool,
        /// Replay the changes after this sequence number first, then follow [default: follow
        /// from now].
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// With --all or --from: how long to keep reconnecting (with back-off) after losing
        /// the server, resuming from the last sequence; 0 ends the watch with the stream.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        reconnect_seconds: u64,
    },
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive list.
    #[arg(long, global = true, env = "PITWALL_LOG", default_value = "info")]
    pub log_level: String,
    /// Log line format.
    #[arg(long, global = true, env = "PITWALL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    Embedded,
    Kafka,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every default shown below comes from here: `Config::default()` is the one source.
fn defaults() -> Config {
    Config::default()
}

/// How a duration setting's default reads on the command line.
fn setting_text(setting: Option<Duration>) -> String {
    match setting {
        Some(duration) => humantime::format_duration(duration).to_string(),
        None => "off".to_owned(),
    }
}

/// `serve`'s settings. Which of them were given (rather than left at their shown defaults)
/// decides what overrides the config file; see `serve::overrides`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC address (or StreamApiPort from --config). Port 0 picks a free port.
    #[arg(long, env = "PITWALL_LISTEN", default_value_t = defaults().listen)]
    pub listen: SocketAddr,
    /// Admin HTTP address for /metrics, /healthz, /readyz (or PrometheusMetricPort from
    /// --config).
    #[arg(long, env = "PITWALL_METRICS_LISTEN", default_value_t = defaults().metrics_listen)]
    pub metrics_listen: SocketAddr,
    /// Directory of the embedded store; created if missing, locked while in use.
    #[arg(long, env = "PITWALL_DATA_DIR", default_value_os_t = defaults().data_dir)]
    pub data_dir: PathBuf,
    /// A reference-format AppConfig.json.
    #[arg(long, env = "PITWALL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where sessions and packets are kept: the embedded store in --data-dir, or Kafka topics
    /// shared by every instance.
    #[arg(long, env = "PITWALL_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    pub store: StoreKind,
    /// Kafka bootstrap servers, host:port[,host:port…] [default: BrokerUrl from --config, else
    /// localhost:9092].
    #[arg(long, env = "PITWALL_BROKER")]
    pub broker: Option<String>,
    /// The Kafka topic of session records.
    #[arg(long, env = "PITWALL_KAFKA_TOPIC", default_value = DEFAULT_SESSION_TOPIC)]
    pub kafka_topic: String,
    /// How long a Kafka write (or a broker query) may take before it answers UNAVAILABLE, in
    /// milliseconds.
    #[arg(long, env = "PITWALL_KAFKA_TIMEOUT_MS", default_value_t = DEFAULT_BROKER_TIMEOUT.as_millis() as u64)]
    pub kafka_timeout_ms: u64,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "PITWALL_MAX_MESSAGE_BYTES", default_value_t = defaults().max_message_bytes)]
    pub max_message_bytes: usize,
    /// Notifications a subscriber may fall behind by before its stream is ended.
    #[arg(long, env = "PITWALL_SUBSCRIBER_QUEUE", default_value_t = defaults().subscriber_queue)]
    pub subscriber_queue: usize,
    /// Writes waiting for the writer before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "PITWALL_WRITE_QUEUE", default_value_t = defaults().write_queue)]
    pub write_queue: usize,
    /// Most writes made durable by one commit.
    #[arg(long, env = "PITWALL_MAX_BATCH", default_value_t = defaults().max_batch)]
    pub max_batch: usize,
    /// Page cache of the embedded store, in bytes.
    #[arg(long, env = "PITWALL_STORE_CACHE_BYTES", default_value_t = defaults().store_cache_bytes)]
    pub store_cache_bytes: usize,
    /// host:port of a remote key generator (ma.streaming.key_generator.v1) to take session
    /// keys from [default: local UUIDs, or RemoteKeyGeneratorServiceAddress from --config when
    /// UseRemoteKeyGenerator is true].
    #[arg(long, env = "PITWALL_REMOTE_KEY_GENERATOR")]
    pub remote_key_generator: Option<String>,
    /// How long CreateSession waits for the remote key generator, in milliseconds.
    #[arg(long, env = "PITWALL_KEY_GENERATOR_TIMEOUT_MS", default_value_t = defaults().key_generator_timeout.as_millis() as u64)]
    pub key_generator_timeout_ms: u64,
    /// PEM certificate (chain) served on both ports; with --tls-key, TLS replaces cleartext.
    #[arg(long, env = "PITWALL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PITWALL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): gRPC clients must present a certificate signed by one (mutual TLS).
    #[arg(long, env = "PITWALL_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Bearer tokens, one 'ROLE TOKEN' per line (roles: read, write, admin; '#' comments).
    /// Reloaded on SIGHUP. Without it, access is open.
    #[arg(long, env = "PITWALL_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// How long shutdown waits for open requests and streams before closing them, in seconds.
    #[arg(long, env = "PITWALL_SHUTDOWN_GRACE_SECONDS", default_value_t = defaults().shutdown_grace.as_secs())]
    pub shutdown_grace_seconds: u64,
    /// End a live session after this long without a create, update or end (e.g. 30m; off), or
    /// Pitwall.auto_end.idle_after from --config.
    #[arg(long, env = "PITWALL_AUTO_END_IDLE_AFTER", value_parser = parse_setting, default_value = setting_text(defaults().auto_end.default.idle_after))]
    pub auto_end_idle_after: DurationSetting,
    /// End a live session this long after its creation (e.g. 12h; off), or
    /// Pitwall.auto_end.max_duration from --config.
    #[arg(long, env = "PITWALL_AUTO_END_MAX_DURATION", value_parser = parse_setting, default_value = setting_text(defaults().auto_end.default.max_duration))]
    pub auto_end_max_duration: DurationSetting,
    /// Remove completed sessions this long after they ended (e.g. 30days; off), or
    /// Pitwall.retention.completed_for from --config.
    #[arg(long, env = "PITWALL_RETENTION_COMPLETED_FOR", value_parser = parse_setting, default_value = setting_text(defaults().retention))]
    pub retention_completed_for: DurationSetting,
    /// Feed events kept for watchers to resume from, or Pitwall.feed.max_events from --config.
    #[arg(long, env = "PITWALL_FEED_MAX_EVENTS", value_parser = clap::value_parser!(u64).range(1..), default_value_t = defaults().feed_window.max_events)]
    pub feed_max_events: u64,
    /// Age after which feed events are dropped (e.g. 24h; off), or Pitwall.feed.max_age from
    /// --config.
    #[arg(long, env = "PITWALL_FEED_MAX_AGE", value_parser = parse_setting, default_value = setting_text(defaults().feed_window.max_age))]
    pub feed_max_age: DurationSetting,
    /// Once ready, write the gRPC and metrics addresses, the process id and the sessions read
    /// here, as JSON (`{"grpc":"127.0.0.1:13579","metrics":"127.0.0.1:2468","pid":1234,
    /// "sessions":0}`); removed when shutdown begins. For scripts and tests that start it.
    #[arg(long, env = "PITWALL_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Start even if stored rows fail their checksum, leaving them out (each is logged).
    #[arg(long, env = "PITWALL_SKIP_DAMAGED_ROWS")]
    pub skip_damaged_rows: bool,
    /// gRPC connections served at once (per port); more wait in the accept queue. Keep it
    /// below the open-file limit.
    #[arg(long, env = "PITWALL_MAX_CONNECTIONS", default_value_t = defaults().connections.max_connections)]
    pub max_connections: usize,
    /// Streams (calls) open at once on one gRPC connection (HTTP/2 MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "PITWALL_MAX_CONCURRENT_STREAMS", default_value_t = defaults().connections.max_concurrent_streams)]
    pub max_concurrent_streams: u32,
    /// Close a connection that sends nothing for this long (e.g. 5m; off).
    #[arg(long, env = "PITWALL_IDLE_TIMEOUT", value_parser = parse_setting, default_value = setting_text(defaults().connections.idle_timeout))]
    pub idle_timeout: DurationSetting,
    /// Ping a connection quiet for this long (e.g. 60s; off).
    #[arg(long, env = "PITWALL_KEEPALIVE_INTERVAL", value_parser = parse_setting, default_value = setting_text(defaults().connections.keepalive_interval))]
    pub keepalive_interval: DurationSetting,
    /// Close a connection that does not answer a ping within this long, in seconds.
    #[arg(long, env = "PITWALL_KEEPALIVE_TIMEOUT_SECONDS", default_value_t = defaults().connections.keepalive_timeout.as_secs())]
    pub keepalive_timeout_seconds: u64,
    /// Bytes of packets a data source keeps; its oldest go first (e.g. 10GiB; off).
    #[arg(long, env = "PITWALL_PACKET_RETENTION_BYTES", value_parser = parse_size_setting, default_value = size_text(defaults().packets.retention_bytes))]
    pub packet_retention_bytes: SizeSetting,
    /// How long packets are kept (e.g. 7days; off).
    #[arg(long, env = "PITWALL_PACKET_RETENTION_AGE", value_parser = parse_setting, default_value = setting_text(defaults().packets.retention_age))]
    pub packet_retention_age: DurationSetting,
    /// Free disk space kept beside the data directory: packet writes that would leave less
    /// are refused with RESOURCE_EXHAUSTED (e.g. 512MiB).
    #[arg(long, env = "PITWALL_PACKET_MIN_FREE_BYTES", value_parser = parse_size, default_value = size_text(Some(defaults().packets.min_free_bytes)))]
    pub packet_min_free_bytes: u64,
    /// Page cache of the packet store, in bytes (e.g. 64MiB).
    #[arg(long, env = "PITWALL_PACKET_CACHE_BYTES", value_parser = parse_size, default_value = size_text(Some(defaults().packets.cache_bytes as u64)))]
    pub packet_cache_bytes: u64,
    /// Group the packets of a read into fewer responses (BatchingResponses).
    #[arg(long, env = "PITWALL_BATCHING_RESPONSES")]
    pub batching_responses: bool,
    /// Read connections (NewConnection) open at once at most.
    #[arg(long, env = "PITWALL_MAX_READ_CONNECTIONS", default_value_t = defaults().max_read_connections)]
    pub max_read_connections: usize,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// A size setting on the command line: bytes such as `512MiB` or `10GiB`, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeSetting(pub Option<u64>);

fn parse_size_setting(text: &str) -> Result<SizeSetting, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(SizeSetting(None));
    }
    parse_size(text).map(|bytes| SizeSetting(Some(bytes)))
}

/// Bytes, with an optional binary unit: `1048576`, `512KiB`, `64MiB`, `10GiB`, `1TiB`.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "'{text}' is not a rate; give packets per second above 0, e.g. 50 or 0.5"
        )),
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size; write e.g. 512MiB, 10GiB or a byte count"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "'{other}' is not a unit of size; use KiB, MiB, GiB or TiB"
            ));
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// How a size setting's default reads on the command line.
fn size_text(bytes: Option<u64>) -> String {
    let Some(bytes) = bytes else {
        return "off".to_owned();
    };
    for (unit, scale) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= scale && bytes % scale == 0 {
            return format!("{}{unit}", bytes / scale);
        }
    }
    bytes.to_string()
}

/// A duration setting on the command line: a duration such as `30m`, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationSetting(pub Option<std::time::Duration>);

fn parse_setting(text: &str) -> Result<DurationSetting, String> {
    pitwall_server::config::parse_duration_setting(text).map(DurationSetting)
}

/// Limits on session content (inclusive).
#[derive(Debug, Args)]
pub struct LimitArgs {
    #[arg(long, env = "PITWALL_MAX_DATA_SOURCE_BYTES", default_value_t = defaults().limits.data_source_bytes)]
    pub max_data_source_bytes: usize,
    #[arg(long, env = "PITWALL_MAX_DETAIL_KEY_BYTES", default_value_t = defaults().limits.detail_key_bytes)]
    pub max_detail_key_bytes: usize,
    #[arg(long, env = "PITWALL_MAX_DETAIL_VALUE_BYTES", default_value_t = defaults().limits.detail_value_bytes)]
    pub max_detail_value_bytes: usize,
    #[arg(long, env = "PITWALL_MAX_DETAILS", default_value_t = defaults().limits.details_per_session)]
    pub max_details: usize,
    #[arg(long, env = "PITWALL_MAX_ASSOCIATES", default_value_t = defaults().limits.associates_per_session)]
    pub max_associates: usize,
    #[arg(long, env = "PITWALL_MAX_TYPE_BYTES", default_value_t = defaults().limits.type_bytes)]
    pub max_type_bytes: usize,
    #[arg(long, env = "PITWALL_MAX_IDENTIFIER_BYTES", default_value_t = defaults().limits.identifier_bytes)]
    pub max_identifier_bytes: usize,
    /// Encoded size of a whole session.
    #[arg(long, env = "PITWALL_MAX_SESSION_BYTES", default_value_t = defaults().limits.session_bytes)]
    pub max_session_bytes: usize,
    /// How far ahead of the server's clock a creation_time may lie (e.g. 5m; off).
    #[arg(long, env = "PITWALL_MAX_CREATION_TIME_SKEW", value_parser = parse_setting, default_value = setting_text(defaults().limits.creation_time_skew))]
    pub max_creation_time_skew: DurationSetting,
}
