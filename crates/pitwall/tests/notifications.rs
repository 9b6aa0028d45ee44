//! Start and stop notifications: filtering, order, fan-out, slow and departing subscribers,
//! shutdown, and the feature switch, over real gRPC on loopback.

mod support;

use std::time::Duration;

use pitwall_proto::api::*;
use support::*;
use tokio::time::timeout;
use tonic::{Code, Streaming};

async fn next_start(
    stream: &mut Streaming<GetSessionStartNotificationResponse>,
) -> GetSessionStartNotificationResponse {
    timeout(PATIENCE, stream.message())
        .await
        .expect("no start notification in time")
        .unwrap()
        .expect("stream ended")
}

async fn next_stop(
    stream: &mut Streaming<GetSessionStopNotificationResponse>,
) -> GetSessionStopNotificationResponse {
    timeout(PATIENCE, stream.message())
        .await
        .expect("no stop notification in time")
        .unwrap()
        .expect("stream ended")
}

#[tokio::test]
async fn a_start_notification_carries_the_key_and_data_source() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = starts(&mut client, "ds").await;
    let key = create(&mut client, "ds").await;
    assert_eq!(
        next_start(&mut stream).await,
        GetSessionStartNotificationResponse {
            session_key: key,
            data_source: "ds".into()
        }
    );
}

#[tokio::test]
async fn notifications_match_the_data_source_exactly() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut exact = starts(&mut client, "ds").await;
    for other in ["DS", "ds2", "d"] {
        create(&mut client, other).await;
    }
    let key = create(&mut client, "ds").await;
    assert_eq!(next_start(&mut exact).await.session_key, key);
    // The empty data source is not a wildcard: it names no data source, so it is refused.
    let empty = client
        .get_session_start_notification(GetSessionStartNotificationRequest {
            data_source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn history_is_not_replayed_to_new_subscribers() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "ds").await;
    let mut stream = starts(&mut client, "ds").await;
    let key = create(&mut client, "ds").await;
    assert_eq!(next_start(&mut stream).await.session_key, key);
}

#[tokio::test]
async fn events_arrive_in_the_order_the_store_applied_them() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = starts(&mut client, "ds").await;
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let url = server.grpc_url();
            tokio::spawn(async move {
                let mut client = connect(&url).await;
                for _ in 0..25 {
                    create(&mut client, "ds").await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // The listing is in apply (creation) order; notifications must follow it exactly.
    let applied = list(&mut client, "ds").await;
    assert_eq!(applied.len(), 200);
    let mut received = Vec::new();
    for _ in 0..applied.len() {
        received.push(next_start(&mut stream).await.session_key);
    }
    assert_eq!(received, applied);
}

#[tokio::test]
async fn every_subscriber_gets_every_event() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut subscribers = Vec::new();
    for _ in 0..20 {
        let mut own = server.client().await;
        subscribers.push(starts(&mut own, "ds").await);
    }
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(create(&mut client, "ds").await);
    }
    for stream in &mut subscribers {
        for key in &keys {
            assert_eq!(&next_start(stream).await.session_key, key);
        }
    }
}

#[tokio::test]
async fn only_the_first_end_notifies() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = stops(&mut client, "ds").await;
    let first = create(&mut client, "ds").await;
    let second = create(&mut client, "ds").await;
    end(&mut client, &first).await;
    end(&mut client, &first).await;
    end(&mut client, &second).await;
    let stop = next_stop(&mut stream).await;
    assert_eq!(
        stop,
        GetSessionStopNotificationResponse {
            session_key: first,
            data_source: "ds".into()
        }
    );
    // The repeated end sent nothing: the next event is the second session's end.
    assert_eq!(next_stop(&mut stream).await.session_key, second);
}

#[tokio::test]
async fn refused_writes_notify_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut started = starts(&mut client, "ds").await;
    let mut stopped = stops(&mut client, "ds").await;
    let refused = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            r#type: "t".repeat(300),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.success);
    let key = create(&mut client, "ds").await;
    let early = client
        .end_session(EndSessionRequest {
            session_key: key.clone(),
            termination_time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!early.success);
    end(&mut client, &key).await;
    assert_eq!(next_start(&mut started).await.session_key, key);
    assert_eq!(next_stop(&mut stopped).await.session_key, key);
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_is_cut_off_with_resource_exhausted() {
    let server = TestServer::start_with(|c| c.subscriber_queue = 4).await;
    // A tiny HTTP/2 window stops the transport from absorbing the backlog, so the unread
    // notifications pile up in the subscriber's queue.
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .initial_stream_window_size(Some(256))
        .initial_connection_window_size(Some(256))
        .connect()
        .await
        .unwrap();
    let mut slow_client =
        pitwall_proto::api::session_management_service_client::SessionManagementServiceClient::new(
            channel,
        );
    let mut slow = starts(&mut slow_client, "ds").await;
    let mut client = server.client().await;
    let mut healthy = starts(&mut client, "ds").await;
    let mut keys = Vec::new();
    for _ in 0..40 {
        keys.push(create(&mut client, "ds").await);
        // The healthy subscriber keeps up and sees everything.
        assert_eq!(
            &next_start(&mut healthy).await.session_key,
            keys.last().unwrap()
        );
    }
    let status = timeout(PATIENCE, async {
        loop {
            match slow.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("slow subscriber was not cut off");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("behind"), "{}", status.message());
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"pitwall_notification_subscribers_cut_off_total{kind="start"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_departed_subscriber_is_forgotten_without_waiting_for_an_event() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let stream = stops(&mut client, "ds").await;
    let open = r#"pitwall_notification_streams{kind="stop"}"#;
    assert_eq!(metric_value(&server.metrics().await, open), Some(1.0));
    drop(stream);
    timeout(PATIENCE, async {
        while metric_value(&server.metrics().await, open) != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server kept the departed subscriber");
}

#[tokio::test]
async fn shutdown_ends_every_stream_with_ok() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    let mut started = starts(&mut client, "ds").await;
    let mut stopped = stops(&mut client, "other").await;
    let key = create(&mut client, "ds").await;
    assert_eq!(next_start(&mut started).await.session_key, key);
    server.stop().await;
    assert_eq!(
        timeout(PATIENCE, started.message()).await.unwrap().unwrap(),
        None
    );
    assert_eq!(
        timeout(PATIENCE, stopped.message()).await.unwrap().unwrap(),
        None
    );
}

#[tokio::test]
async fn with_the_feature_off_streams_stay_open_and_silent_until_shutdown() {
    let mut server = TestServer::start_with(|c| c.integrate_session_management = false).await;
    let mut client = server.client().await;
    let mut started = starts(&mut client, "ds").await;
    let refused = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.success);
    // Still open: nothing has arrived and the stream has not ended.
    assert!(
        timeout(Duration::from_millis(200), started.message())
            .await
            .is_err()
    );
    server.stop().await;
    assert_eq!(
        timeout(PATIENCE, started.message()).await.unwrap().unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_under_load_delivers_every_acknowledged_start_before_ending_with_ok() {
    const WRITERS: usize = 16;
    const SUBSCRIBERS: usize = 4;
    let mut server = TestServer::start().await;
    let url = server.grpc_url();
    let mut readers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut client = connect(&url).await;
        let mut stream = starts(&mut client, "ds").await;
        // Each subscriber keeps up: it reads everything until its stream ends.
        readers.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            loop {
                match timeout(PATIENCE, stream.message()).await {
                    Ok(Ok(Some(start))) => keys.push(start.session_key),
                    Ok(Ok(None)) => return Ok(keys),
                    Ok(Err(status)) => return Err(status),
                    Err(_) => panic!("the stream neither sent nor ended in time"),
                }
            }
        }));
    }
    let (acked_sender, mut acked) = tokio::sync::mpsc::unbounded_channel();
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let mut client = connect(&url).await;
        let acked = acked_sender.clone();
        writers.push(tokio::spawn(async move {
            // Until the server refuses or goes away; only answered successes count.
            while let Ok(response) = client
                .create_session(CreateSessionRequest {
                    data_source: "ds".into(),
                    ..Default::default()
                })
                .await
            {
                let response = response.into_inner();
                if !response.success {
                    break;
                }
                let _ = acked.send(response.session_key);
            }
        }));
    }
    drop(acked_sender);
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 500 {
        acknowledged.push(
            timeout(PATIENCE, acked.recv())
                .await
                .expect("writes stalled")
                .expect("every writer stopped"),
        );
    }
    // Shut down while the writers are still writing.
    server.stop().await;
    for writer in writers {
        writer.await.unwrap();
    }
    while let Some(key) = acked.recv().await {
        acknowledged.push(key);
    }
    for reader in readers {
        let received = reader
            .await
            .unwrap()
            .expect("the stream ended with an error instead of OK");
        let received: std::collections::HashSet<String> = received.into_iter().collect();
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|key| !received.contains(*key))
            .collect();
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged sessions were never notified, e.g. {:?}",
            missing.len(),
            acknowledged.len(),
            missing.first()
        );
    }
}
