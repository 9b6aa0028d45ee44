//! Connections that misbehave: too many streams on one connection, connections that send
//! nothing, running out of file descriptors, and requests that are not gRPC.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;
const STREAM_CLOSED: u32 = 0x5;

/// One HTTP/2 frame: type, flags, stream, payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    bytes.extend([kind, flags]);
    bytes.extend(stream.to_be_bytes());
    bytes.extend(payload);
    bytes
}

async fn read_frame(tcp: &mut TcpStream) -> Frame {
    let mut header = [0u8; 9];
    timeout(PATIENCE, tcp.read_exact(&mut header))
        .await
        .expect("no frame in time")
        .expect("connection closed");
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0; length];
    tcp.read_exact(&mut payload).await.unwrap();
    Frame {
        kind: header[3],
        flags: header[4],
        stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// An HPACK header block of literal fields (never indexed, no Huffman): enough for a request.
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127);
        block.push(0x10);
        block.push(name.len() as u8);
        block.extend(name.as_bytes());
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    }
    block
}

/// Connects, exchanges settings, and returns the server's `SETTINGS_MAX_CONCURRENT_STREAMS`.
async fn h2_connect(addr: &str) -> (TcpStream, Option<u32>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(PREFACE).await.unwrap();
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let (mut max_streams, mut theirs, mut acked) = (None, false, false);
    while !(theirs && acked) {
        let frame_in = read_frame(&mut tcp).await;
        if frame_in.kind != SETTINGS {
            continue;
        }
        if frame_in.flags & 0x1 != 0 {
            acked = true;
            continue;
        }
        for setting in frame_in.payload.chunks(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                max_streams = Some(u32::from_be_bytes([
                    setting[2], setting[3], setting[4], setting[5],
                ]));
            }
        }
        tcp.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
        theirs = true;
    }
    (tcp, max_streams)
}

fn grpc_addr(server: &TestServer) -> String {
    server.grpc_url().trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn streams_beyond_the_advertised_limit_on_one_connection_are_refused() {
    let server = TestServer::start_with(|c| c.connections.max_concurrent_streams = 10).await;
    let (mut tcp, advertised) = h2_connect(&grpc_addr(&server)).await;
    assert_eq!(advertised, Some(10));

    // 1,000 start-notification subscriptions at once, each a stream that stays open.
    let headers = header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (
            ":path",
            "/ma.streaming.api.v1.SessionManagementService/GetSessionStartNotification",
        ),
        (":authority", "pitwall"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    let request = [0x0a, 0x02, b'd', b's'];
    let mut message = vec![0];
    message.extend((request.len() as u32).to_be_bytes());
    message.extend(request);
    let mut bytes = Vec::new();
    for i in 0..1000u32 {
        let stream = 2 * i + 1;
        bytes.extend(frame(HEADERS, 0x4, stream, &headers));
        bytes.extend(frame(DATA, 0x1, stream, &message));
    }
    tcp.write_all(&bytes).await.unwrap();

    let (mut answered, mut refused) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    while answered.len() + refused.len() < 1000 {
        let frame_in = read_frame(&mut tcp).await;
        match frame_in.kind {
            HEADERS => {
                answered.insert(frame_in.stream);
            }
            RST_STREAM => {
                let code = u32::from_be_bytes(frame_in.payload[..4].try_into().unwrap());
                if code == STREAM_CLOSED && refused.contains(&frame_in.stream) {
                    // The answer to the request body sent after the refusal.
                    continue;
                }
                assert_eq!(code, REFUSED_STREAM, "stream {}", frame_in.stream);
                refused.insert(frame_in.stream);
            }
            GOAWAY => panic!("the server closed the connection"),
            PING if frame_in.flags & 0x1 == 0 => {
                tcp.write_all(&frame(PING, 0x1, 0, &frame_in.payload))
                    .await
                    .unwrap();
            }
            _ => {}
        }
    }
    assert_eq!((answered.len(), refused.len()), (10, 990));
    assert!(answered.iter().all(|stream| *stream <= 19), "{answered:?}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"pitwall_notification_streams{kind="start"}"#),
        Some(10.0)
    );
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(500);
    let server = TestServer::start_with(|c| {
        c.connections.idle_timeout = Some(idle);
        // A live client answers pings well within the idle timeout.
        c.connections.keepalive_interval = Some(Duration::from_millis(100));
    })
    .await;
    let mut client = server.client().await;
    let mut subscribed = starts(&mut client, "ds").await;

    let mut silent = TcpStream::connect(grpc_addr(&server)).await.unwrap();
    let opened = Instant::now();
    let mut buffer = [0u8; 1024];
    let closed = timeout(PATIENCE, async {
        loop {
            match silent.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                // The server's SETTINGS: it speaks first, then waits for the preface.
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent connection was never closed");
    assert!(
        opened.elapsed() >= idle,
        "closed after {:?}",
        opened.elapsed()
    );

    // The client with a quiet subscription kept answering pings: its connection is still there.
    let key = create(&mut client, "ds").await;
    let notified = timeout(PATIENCE, subscribed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(notified.session_key, key);
}

#[tokio::test]
async fn a_request_that_is_not_grpc_gets_http_415() {
    let server = TestServer::start().await;
    let tcp = TcpStream::connect(grpc_addr(&server)).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!(
        "{}/ma.streaming.api.v1.SessionManagementService/GetCurrentSessions",
        server.grpc_url()
    ))
    .header("content-type", "application/json")
    .body(())
    .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    body.send_data(r#"{"data_source":"ds"}"#.into(), true)
        .unwrap();
    let response = timeout(PATIENCE, response).await.unwrap().unwrap();
    assert_eq!(response.status(), http::StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // gRPC itself is still served.
    let mut client = server.client().await;
    assert!(list(&mut client, "ds").await.is_empty());
}

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn running_out_of_file_descriptors_is_survived_without_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = ServerProcess::start_wrapped(
        &["prlimit", "--nofile=200:200", "--"],
        dir.path(),
        &topic_for(dir.path()),
        &[],
    )
    .await;
    let pid = process.child.id().unwrap();
    let url = process.grpc_url();
    assert_eq!(
        health(&url, SESSION_SERVICE).await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // Idle connections until the server says it has no descriptor left for the next one. A
    // connect that times out is tried again: the kernel drops a SYN while the server is behind
    // on accepting, which says nothing about its descriptors.
    let mut idle = Vec::new();
    timeout(PATIENCE, async {
        loop {
            tokio::select! {
                line = process.log.recv() => {
                    let line = line.expect("the server's log ended");
                    if line.contains("cannot accept connections") {
                        return;
                    }
                }
                tcp = timeout(Duration::from_secs(1), TcpStream::connect(&process.grpc_addr)),
                    if idle.len() < 400 =>
                {
                    if let Ok(Ok(tcp)) = tcp {
                        idle.push(tcp);
                    }
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the server never said it could not accept ({} connections open)",
            idle.len()
        )
    });
    let before = cpu_ticks(pid);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    let ticks_per_second = 100;
    let share = used as f64 / (window.elapsed().as_secs_f64() * ticks_per_second as f64);
    assert!(
        share < 0.2,
        "the server used {share:.2} of a core while out of descriptors"
    );

    drop(idle);
    let closed = Instant::now();
    let answered = timeout(PATIENCE, async {
        loop {
            let check = async {
                let channel = tonic::transport::Endpoint::from_shared(url.clone())
                    .unwrap()
                    .connect_timeout(Duration::from_millis(200))
                    .timeout(Duration::from_millis(200))
                    .connect()
                    .await
                    .ok()?;
                tonic_health::pb::health_client::HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: SESSION_SERVICE.into(),
                    })
                    .await
                    .ok()
            };
            if check.await.is_some() {
                return closed.elapsed();
            }
        }
    })
    .await
    .expect("health never answered again");
    assert!(
        answered < Duration::from_secs(1),
        "health answered after {answered:?}"
    );
}
