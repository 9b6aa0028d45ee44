//! What operators rely on: gRPC health through startup, serving and shutdown; server reflection;
//! the admin HTTP endpoints; metrics that move with known operations; the remote key generator.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pitwall_proto::api::*;
use pitwall_proto::key_generator::unique_key_generator_service_server::{
    UniqueKeyGeneratorService, UniqueKeyGeneratorServiceServer,
};
use pitwall_proto::key_generator::{
    GenerateUniqueKeyRequest, GenerateUniqueKeyResponse, KeyType, generate_unique_key_response,
};
use pitwall_server::Clock;
use support::*;
use tokio::time::timeout;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn before_the_store_is_read_health_is_not_serving_and_sessions_are_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let launched = pitwall_server::launch(loopback_config(dir.path()), Clock::system())
        .await
        .unwrap();
    let url = format!("http://{}", launched.grpc_addr());
    let admin = launched.metrics_addr().to_string();

    assert_eq!(health(&url, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&url, SESSION_SERVICE).await,
        ServingStatus::NotServing
    );
    assert_eq!(http_get(&admin, "/readyz").await.0, 503);
    assert_eq!(http_get(&admin, "/healthz").await, (200, "ok\n".to_owned()));
    let mut client = connect(&url).await;
    let status = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("starting"),
        "{}",
        status.message()
    );

    let server = launched.finish().await.unwrap();
    assert_eq!(health(&url, "").await, ServingStatus::Serving);
    assert_eq!(health(&url, SESSION_SERVICE).await, ServingStatus::Serving);
    assert_eq!(
        http_get(&admin, "/readyz").await,
        (200, "ready\n".to_owned())
    );
    create(&mut client, "ds").await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_turns_not_serving_as_soon_as_shutdown_begins() {
    let server = TestServer::start_with(|c| c.shutdown_grace = Duration::from_millis(500)).await;
    let channel = channel(&server.grpc_url()).await;
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: SESSION_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = timeout(PATIENCE, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let shutdown = server.shutdown_handle();
    shutdown.trigger();
    let next = timeout(PATIENCE, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // The open Watch stream does not keep the server from stopping: the grace period ends it.
    let mut server = server;
    timeout(PATIENCE, server.stop())
        .await
        .expect("shutdown waited for the health stream");
}

#[tokio::test]
async fn reflection_lists_the_served_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = TestServer::start().await;
    let channel = channel(&server.grpc_url()).await;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "ma.streaming.api.v1.ConnectionManagerService",
            "ma.streaming.api.v1.DataFormatManagerService",
            "ma.streaming.api.v1.PacketReaderService",
            "ma.streaming.api.v1.PacketWriterService",
            SESSION_SERVICE,
            "pitwall.v1.ReadConnections",
            "pitwall.v1.SessionFeed",
        ]
    );

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                SESSION_SERVICE.into(),
            ),
        ),
    };
    let mut responses = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    assert!(matches!(
        response.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref files))
            if !files.file_descriptor_proto.is_empty()
    ));
}

#[tokio::test]
async fn metrics_follow_notification_streams_and_commits() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = starts(&mut client, "ds").await;
    for _ in 0..3 {
        create(&mut client, "ds").await;
    }
    timeout(PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"pitwall_notification_streams{kind="start"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"pitwall_notifications_sent_total{kind="start"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(&metrics, "pitwall_store_commit_batch_size_sum"),
        Some(3.0)
    );
    assert_eq!(
        metric_value(&metrics, "pitwall_store_commit_duration_seconds_count"),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"pitwall_sessions{data_source="ds",state="live"}"#
        ),
        Some(3.0)
    );
    assert!(metrics.contains("# TYPE pitwall_write_queue_depth gauge"));
}

/// A key generator that answers from a script of behaviours, and counts calls.
struct Generator {
    answer: fn(usize) -> Result<GenerateUniqueKeyResponse, Status>,
    calls: Arc<AtomicUsize>,
    delay: Duration,
}

#[tonic::async_trait]
impl UniqueKeyGeneratorService for Generator {
    async fn generate_unique_key(
        &self,
        request: Request<GenerateUniqueKeyRequest>,
    ) -> Result<Response<GenerateUniqueKeyResponse>, Status> {
        assert_eq!(request.into_inner().r#type, KeyType::String as i32);
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        (self.answer)(call).map(Response::new)
    }
}

/// Starts a generator on a loopback port; returns its `host:port` and call counter.
async fn generator(
    answer: fn(usize) -> Result<GenerateUniqueKeyResponse, Status>,
    delay: Duration,
) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = UniqueKeyGeneratorServiceServer::new(Generator {
        answer,
        calls: calls.clone(),
        delay,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, calls)
}

fn string_key(call: usize) -> Result<GenerateUniqueKeyResponse, Status> {
    Ok(GenerateUniqueKeyResponse {
        key: Some(generate_unique_key_response::Key::StringKey(format!(
            "remote-key-{call}"
        ))),
    })
}

#[tokio::test]
async fn keys_come_from_the_remote_generator_when_configured() {
    let (address, calls) = generator(string_key, Duration::ZERO).await;
    let server = TestServer::start_with(|c| c.remote_key_generator = Some(address)).await;
    let mut client = server.client().await;
    assert_eq!(create(&mut client, "ds").await, "remote-key-0");
    assert_eq!(create(&mut client, "ds").await, "remote-key-1");
    assert_eq!(
        list(&mut client, "ds").await,
        vec!["remote-key-0", "remote-key-1"]
    );
    // A request refused by validation does not ask the generator for a key.
    let refused = client
        .create_session(CreateSessionRequest {
            data_source: "bad source".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.success);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

async fn create_fails_unavailable(server: &TestServer, mentions: &str) {
    let mut client = server.client().await;
    let status = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(mentions), "{}", status.message());
    assert!(list(&mut client, "ds").await.is_empty());
}

#[tokio::test]
async fn a_failing_key_generator_makes_create_unavailable_and_creates_nothing() {
    let (address, _) = generator(
        |_| Err(Status::internal("key store broken")),
        Duration::ZERO,
    )
    .await;
    let server = TestServer::start_with(|c| c.remote_key_generator = Some(address)).await;
    create_fails_unavailable(&server, "key store broken").await;
}

#[tokio::test]
async fn a_key_generator_without_a_string_key_makes_create_unavailable() {
    let ulong = |_| {
        Ok(GenerateUniqueKeyResponse {
            key: Some(generate_unique_key_response::Key::UlongKey(7)),
        })
    };
    let (address, _) = generator(ulong, Duration::ZERO).await;
    let server = TestServer::start_with(|c| c.remote_key_generator = Some(address)).await;
    create_fails_unavailable(&server, "without a string key").await;
}

#[tokio::test]
async fn a_slow_key_generator_hits_the_deadline() {
    let (address, _) = generator(string_key, Duration::from_secs(30)).await;
    let server = TestServer::start_with(|c| {
        c.remote_key_generator = Some(address);
        c.key_generator_timeout = Duration::from_millis(200);
    })
    .await;
    create_fails_unavailable(&server, "did not answer within 200 ms").await;
}

#[tokio::test]
async fn an_unreachable_key_generator_makes_create_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server =
        TestServer::start_with(|c| c.remote_key_generator = Some(format!("127.0.0.1:{port}")))
            .await;
    create_fails_unavailable(&server, &format!("127.0.0.1:{port}")).await;
}
