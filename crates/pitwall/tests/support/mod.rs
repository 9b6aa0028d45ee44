//! Shared setup for the end-to-end tests: servers on loopback ephemeral ports, in this process or
//! as a child process, and small client helpers.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod outage;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pitwall_proto::api::connection_manager_service_client::ConnectionManagerServiceClient;
use pitwall_proto::api::data_format_manager_service_client::DataFormatManagerServiceClient;
use pitwall_proto::api::packet_reader_service_client::PacketReaderServiceClient;
use pitwall_proto::api::packet_writer_service_client::PacketWriterServiceClient;
use pitwall_proto::api::session_management_service_client::SessionManagementServiceClient;
use pitwall_proto::api::*;
use pitwall_proto::feed::session_feed_client::SessionFeedClient;
use pitwall_proto::feed::{WatchRequest, WatchResponse};
use pitwall_server::config::StoreConfig;
use pitwall_server::{Clock, Config, ManualClock, RunningServer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub type Client = SessionManagementServiceClient<Channel>;
pub type FeedClient = SessionFeedClient<Channel>;
pub type WriterClient = PacketWriterServiceClient<Channel>;
pub type ReaderClient = PacketReaderServiceClient<Channel>;
pub type ConnectionClient = ConnectionManagerServiceClient<Channel>;
pub type FormatClient = DataFormatManagerServiceClient<Channel>;

/// Upper bound for anything a test waits for; reaching it is a failure, not a pass.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A server running inside the test process on a temporary data directory.
pub struct TestServer {
    server: Option<RunningServer>,
    config: Config,
    dir: Arc<tempfile::TempDir>,
    clock: Clock,
    /// Moves `clock`, for servers started with [`TestServer::start_manual`].
    hand: Option<Arc<ManualClock>>,
}

/// The Kafka broker the suite runs against when `PITWALL_TEST_KAFKA` names one; otherwise
/// every server uses the embedded store. The same test bodies cover both stores.
pub fn kafka_broker() -> Option<String> {
    std::env::var("PITWALL_TEST_KAFKA")
        .ok()
        .filter(|broker| !broker.is_empty())
}

/// The broker of a test that only means something on Kafka. Such tests are marked
/// `#[ignore = "needs a Kafka broker ..."]`, so a run without a broker lists them as not run;
/// run anyway (`--include-ignored`, as `scripts/test` does with a broker), a missing broker
/// fails them.
pub fn required_broker() -> String {
    kafka_broker().expect("this test needs a Kafka broker: set PITWALL_TEST_KAFKA=host:port")
}

/// The topic a test's server uses on Kafka: one per data directory, so a restart on the same
/// directory replays the same topic and tests do not see each other's sessions.
pub fn topic_for(data_dir: &Path) -> String {
    let name: String = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    format!("pitwall-test{name}")
}

/// A data source of a test's own: on a broker, data-plane topics are shared by every test, so
/// each test writes to topics no other test reads.
pub fn data_source_for(prefix: &str, data_dir: &Path) -> String {
    format!(
        "{prefix}{}",
        topic_for(data_dir).trim_start_matches("pitwall-test")
    )
}

pub fn store_for(data_dir: &Path) -> StoreConfig {
    match kafka_broker() {
        Some(brokers) => StoreConfig::Kafka {
            brokers,
            topic: topic_for(data_dir),
            timeout: Duration::from_secs(10),
        },
        None => StoreConfig::Embedded,
    }
}

pub fn loopback_config(data_dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        store: store_for(data_dir),
        ..Config::default()
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let mut config = loopback_config(dir.path());
        adjust(&mut config);
        TestServer::start_config(config, dir, Clock::system(), None).await
    }

    /// A server whose clock stands still until the test moves it with
    /// [`TestServer::advance`]: time-driven behaviour (auto-end, retention, the feed's age)
    /// happens when the test says, without waiting for real time.
    pub async fn start_manual(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let mut config = loopback_config(dir.path());
        adjust(&mut config);
        let (clock, hand) = Clock::manual(pitwall_server::clock::system_now());
        TestServer::start_config(config, dir, clock, Some(hand)).await
    }

    async fn start_config(
        config: Config,
        dir: Arc<tempfile::TempDir>,
        clock: Clock,
        hand: Option<Arc<ManualClock>>,
    ) -> TestServer {
        let server = start_on(config.clone(), clock.clone()).await;
        TestServer {
            server: Some(server),
            config,
            dir,
            clock,
            hand,
        }
    }

    /// Moves the server's manual clock forward.
    pub fn advance(&self, by: Duration) {
        self.hand
            .as_ref()
            .expect("advance needs a server started with TestServer::start_manual")
            .advance(by);
    }

    fn running(&self) -> &RunningServer {
        self.server.as_ref().expect("server is running")
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.running().grpc_addr())
    }

    pub async fn client(&self) -> Client {
        connect(&self.grpc_url()).await
    }

    /// A client of `pitwall.v1.SessionFeed`.
    pub async fn feed(&self) -> FeedClient {
        feed_client(&self.grpc_url()).await
    }

    /// Clients of the data plane: writer, reader, connections, on one channel.
    pub async fn data_plane(&self) -> (WriterClient, ReaderClient, ConnectionClient) {
        let channel = channel(&self.grpc_url()).await;
        (
            WriterClient::new(channel.clone()),
            ReaderClient::new(channel.clone()),
            ConnectionClient::new(channel),
        )
    }

    /// A client of `DataFormatManagerService`.
    pub async fn data_formats(&self) -> FormatClient {
        FormatClient::new(channel(&self.grpc_url()).await)
    }

    pub async fn metrics(&self) -> String {
        http_get(&self.running().metrics_addr().to_string(), "/metrics")
            .await
            .1
    }

    pub async fn http(&self, path: &str) -> (u16, String) {
        http_get(&self.running().metrics_addr().to_string(), path).await
    }

    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.running().metrics_addr()
    }

    /// The access check, to reload its token file.
    pub fn access(&self) -> pitwall_server::auth::Access {
        self.running().access()
    }

    pub fn shutdown_handle(&self) -> pitwall_server::Shutdown {
        self.running().shutdown_handle()
    }

    /// On Kafka, another instance on the same topic (its own data directory and ports), on
    /// the same clock.
    pub async fn another_instance(&self) -> TestServer {
        self.another_instance_with(|_| {}).await
    }

    /// Like [`TestServer::another_instance`], with its configuration adjusted.
    pub async fn another_instance_with(&self, adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..self.config.clone()
        };
        adjust(&mut config);
        TestServer::start_config(config, dir, self.clock.clone(), self.hand.clone()).await
    }

    /// Stops gracefully and starts again on the same data directory (new ports).
    pub async fn restart(mut self) -> TestServer {
        self.stop().await;
        let server = start_on(self.config.clone(), self.clock.clone()).await;
        self.server = Some(server);
        self
    }

    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

async fn start_on(config: Config, clock: Clock) -> RunningServer {
    pitwall_server::launch(config, clock)
        .await
        .unwrap()
        .finish()
        .await
        .unwrap()
}

/// The gRPC name of the Stream API session service (health checks, reflection).
pub const SESSION_SERVICE: &str = "ma.streaming.api.v1.SessionManagementService";

/// A cleartext HTTP/2 connection to `url`.
pub async fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A read through a new connection of `details` on the server at `url`: the stream of its
/// packets.
pub async fn read_connection(
    url: &str,
    details: ConnectionDetails,
) -> Streaming<ReadPacketsResponse> {
    let channel = channel(url).await;
    let connection = ConnectionClient::new(channel.clone())
        .new_connection(NewConnectionRequest {
            details: Some(details),
        })
        .await
        .unwrap()
        .into_inner()
        .connection;
    ReaderClient::new(channel)
        .read_packets(ReadPacketsRequest { connection })
        .await
        .unwrap()
        .into_inner()
}

pub async fn connect(url: &str) -> Client {
    SessionManagementServiceClient::new(channel(url).await)
}

pub async fn feed_client(url: &str) -> FeedClient {
    SessionFeedClient::new(channel(url).await)
}

/// The gRPC health status the server at `url` reports for `service`.
pub async fn health(url: &str, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel(url).await)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

/// Watches the feed for `data_source` (every one if empty) after sequence `from` (0: from
/// now); returns once the watch is registered.
pub async fn watch(
    feed: &mut FeedClient,
    data_source: &str,
    from: u64,
) -> Streaming<WatchResponse> {
    feed.watch(WatchRequest {
        data_source: data_source.into(),
        from_sequence: from,
    })
    .await
    .unwrap()
    .into_inner()
}

/// The next feed reply; none within [`PATIENCE`] is a failure.
pub async fn next(stream: &mut Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("no feed message in time")
        .expect("feed stream failed")
        .expect("feed stream ended")
}

/// The `pitwall-error` reason of a `success = false` answer.
pub fn reason<T>(response: &tonic::Response<T>) -> Option<String> {
    response
        .metadata()
        .get("pitwall-error")
        .map(|v| v.to_str().unwrap().to_owned())
}

pub async fn create(client: &mut Client, data_source: &str) -> String {
    create_with(client, data_source, "", &[], &[]).await
}

/// Creates a session with an identifier, details and associates.
pub async fn create_with(
    client: &mut Client,
    data_source: &str,
    identifier: &str,
    details: &[(&str, &str)],
    associates: &[&str],
) -> String {
    let response = client
        .create_session(CreateSessionRequest {
            data_source: data_source.into(),
            identifier: identifier.into(),
            details: details
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            associate_session_key: associates.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.success, "create in {data_source} failed");
    response.session_key
}

pub async fn end(client: &mut Client, session_key: &str) -> EndSessionResponse {
    client
        .end_session(EndSessionRequest {
            session_key: session_key.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn info(client: &mut Client, session_key: &str) -> GetSessionInfoResponse {
    client
        .get_session_info(GetSessionInfoRequest {
            session_key: session_key.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn list(client: &mut Client, data_source: &str) -> Vec<String> {
    let response = client
        .get_current_sessions(GetCurrentSessionsRequest {
            data_source: data_source.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.success);
    response.session_keys
}

/// Subscribes to start notifications; returns once the subscription is registered (the
/// response headers arrived), so every later event is delivered.
pub async fn starts(
    client: &mut Client,
    data_source: &str,
) -> Streaming<GetSessionStartNotificationResponse> {
    client
        .get_session_start_notification(GetSessionStartNotificationRequest {
            data_source: data_source.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Subscribes to stop notifications, like [`starts`].
pub async fn stops(
    client: &mut Client,
    data_source: &str,
) -> Streaming<GetSessionStopNotificationResponse> {
    client
        .get_session_stop_notification(GetSessionStopNotificationRequest {
            data_source: data_source.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_get_with_token(addr, path, None).await
}

/// [`http_get`] with `Authorization: Bearer TOKEN` when a token is given.
pub async fn http_get_with_token(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// An answer to [`http_request`].
pub struct HttpAnswer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request on its own connection, with the given headers, answered whole.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpAnswer {
    let response = send_http(addr, method, path, headers, body.to_owned(), None).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("the body arrives whole")
        .to_bytes();
    HttpAnswer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Sends one request and returns once the response head arrived. `receive_buffer` shrinks
/// the socket's receive buffer (set before connecting), so that a client that stops reading
/// stalls the server's writes after little data.
async fn send_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
    receive_buffer: Option<u32>,
) -> http::Response<hyper::body::Incoming> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    // Ends with the connection (the response body dropped, or the server closing it).
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(prost::bytes::Bytes::from(body)))
        .unwrap();
    tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("no answer in time")
        .unwrap()
}

/// One message of a Server-Sent Events stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseMessage {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// The board's event stream (`/api/events`), read a message at a time.
pub struct SseStream {
    pub status: u16,
    pub headers: http::HeaderMap,
    body: hyper::body::Incoming,
    /// Bytes received and not yet a whole message (a frame may end inside a character).
    pending: Vec<u8>,
}

impl SseStream {
    pub async fn open(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        SseStream::open_with(addr, path, headers, None).await
    }

    /// [`SseStream::open`] on a socket whose receive buffer is `receive_buffer` bytes.
    pub async fn open_with(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        receive_buffer: Option<u32>,
    ) -> Self {
        let response = send_http(addr, "GET", path, headers, String::new(), receive_buffer).await;
        SseStream {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.into_body(),
            pending: Vec::new(),
        }
    }

    /// The next message with an event name (comments and `retry` alone are skipped), or
    /// `None` when the stream ended; nothing within [`PATIENCE`] is a failure.
    pub async fn next(&mut self) -> Option<SseMessage> {
        tokio::time::timeout(PATIENCE, self.read())
            .await
            .expect("no event-stream message in time")
    }

    async fn read(&mut self) -> Option<SseMessage> {
        loop {
            while let Some(end) = self.pending.windows(2).position(|pair| pair == b"\n\n") {
                let block: Vec<u8> = self.pending.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("the stream is UTF-8");
                let mut message = SseMessage {
                    id: None,
                    event: String::new(),
                    data: String::new(),
                };
                for line in block.lines() {
                    let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                    match field {
                        "id" => message.id = Some(value.to_owned()),
                        "event" => message.event = value.to_owned(),
                        "data" if message.data.is_empty() => message.data = value.to_owned(),
                        "data" => message.data = format!("{}\n{value}", message.data),
                        _ => {}
                    }
                }
                if !message.event.is_empty() {
                    return Some(message);
                }
            }
            let frame = http_body_util::BodyExt::frame(&mut self.body).await?;
            if let Ok(data) = frame.expect("the stream reads").into_data() {
                self.pending.extend_from_slice(&data);
            }
        }
    }
}

/// The value of one sample line of a Prometheus text exposition, e.g.
/// `stream_api_sessions_total{data_source="ds"}`.
pub fn metric_value(exposition: &str, sample: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        line.strip_prefix(sample)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

/// The `pitwall` binary as a child process.
pub struct ServerProcess {
    pub child: Child,
    pub grpc_addr: String,
    pub metrics_addr: String,
    /// Lines of standard error after the ready line, as they arrive.
    pub log: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Lines of standard error before the ready line.
    pub startup: Vec<String>,
    /// Holds the ready file.
    _ready_dir: tempfile::TempDir,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pitwall"))
}

/// What a server's `--ready-file` says once it is ready.
pub struct Ready {
    pub grpc: String,
    pub metrics: String,
}

/// Waits for `child` to write its ready file at `path`; fails if it exits first. The file
/// appears whole (it is renamed into place), so the first read that finds it is complete.
pub async fn wait_ready(path: &Path, child: &mut Child) -> Ready {
    let ready = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                return text;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("pitwall exited ({status}) before it was ready");
            }
            // Nothing to await: the file is the signal.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("pitwall did not report ready in time");
    let value: serde_json::Value = serde_json::from_str(&ready).expect("the ready file is JSON");
    Ready {
        grpc: value["grpc"].as_str().expect("grpc address").to_owned(),
        metrics: value["metrics"]
            .as_str()
            .expect("metrics address")
            .to_owned(),
    }
}

impl ServerProcess {
    /// Starts `pitwall serve` on loopback ephemeral ports, on the suite's store, and waits
    /// until it is ready.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> ServerProcess {
        ServerProcess::start_on_topic(data_dir, &topic_for(data_dir), extra).await
    }

    /// Like [`ServerProcess::start`]; on Kafka, on the given topic (to run several instances).
    pub async fn start_on_topic(data_dir: &Path, topic: &str, extra: &[&str]) -> ServerProcess {
        ServerProcess::start_wrapped(&[], data_dir, topic, extra).await
    }

    /// Like [`ServerProcess::start`], always on the embedded store.
    pub async fn start_embedded(data_dir: &Path, extra: &[&str]) -> ServerProcess {
        ServerProcess::spawn(&[], data_dir, &[], extra).await
    }

    /// Like [`ServerProcess::start_embedded`], run by `wrapper` (see
    /// [`ServerProcess::start_wrapped`]).
    pub async fn start_embedded_wrapped(
        wrapper: &[&str],
        data_dir: &Path,
        extra: &[&str],
    ) -> ServerProcess {
        ServerProcess::spawn(wrapper, data_dir, &[], extra).await
    }

    /// Like [`ServerProcess::start`], run by `wrapper` (a command that runs the rest, such as
    /// `prlimit --nofile=200`).
    pub async fn start_wrapped(
        wrapper: &[&str],
        data_dir: &Path,
        topic: &str,
        extra: &[&str],
    ) -> ServerProcess {
        let mut store_args = Vec::new();
        if let Some(broker) = kafka_broker() {
            store_args = vec![
                "--store".to_owned(),
                "kafka".to_owned(),
                "--broker".to_owned(),
                broker,
                "--kafka-topic".to_owned(),
                topic.to_owned(),
            ];
        }
        ServerProcess::spawn(wrapper, data_dir, &store_args, extra).await
    }

    async fn spawn(
        wrapper: &[&str],
        data_dir: &Path,
        store_args: &[String],
        extra: &[&str],
    ) -> ServerProcess {
        let ready_dir = tempfile::tempdir().unwrap();
        let ready_file = ready_dir.path().join("ready.json");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary());
                command
            }
            None => Command::new(binary()),
        };
        command.args(["serve", "--metrics-listen", "127.0.0.1:0"]);
        // `extra` may name a fixed port (to restart on the same one).
        if !extra.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(store_args)
            .args(extra)
            .env_remove("PITWALL_LISTEN")
            .env_remove("PITWALL_METRICS_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (sender, mut log) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = sender.send(line);
            }
        });
        let ready = wait_ready(&ready_file, &mut child).await;
        // The ready line follows the ready file: what came before it is the startup log.
        let mut startup = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            while let Some(line) = log.recv().await {
                if line.contains("pitwall ready") {
                    return;
                }
                startup.push(line);
            }
        })
        .await
        .expect("no ready line after the ready file");
        ServerProcess {
            child,
            grpc_addr: ready.grpc,
            metrics_addr: ready.metrics,
            log,
            startup,
            _ready_dir: ready_dir,
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("process is running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// The value after `name` in a log line, up to the next space.
pub fn field(line: &str, name: &str) -> String {
    let start = line
        .find(name)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len();
    line[start..].split_whitespace().next().unwrap().to_owned()
}

/// A test certificate authority with a server certificate (for `localhost` and `127.0.0.1`) and
/// a client certificate, written as PEM files.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: String,
    pub client_key: String,
    /// A key that does not belong to the server certificate.
    pub stray_key: PathBuf,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Pitwall test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = server_params.signed_by(&server_key, &ca).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["pitwall-client".to_owned()]).unwrap();
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &ca).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        TestPki {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            stray_key: write("stray.key", KeyPair::generate().unwrap().serialize_pem()),
            client_cert: client.pem(),
            client_key: client_key.serialize_pem(),
            dir,
        }
    }

    pub fn files(&self, client_ca: bool) -> pitwall_server::tls::TlsFiles {
        pitwall_server::tls::TlsFiles {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: client_ca.then(|| self.ca.clone()),
        }
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca).unwrap()
    }
}
