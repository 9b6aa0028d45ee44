//! Durability: restart with the same data directory restores everything, and `kill -9` during
//! concurrent writes loses nothing that was acknowledged.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pitwall_proto::api::*;
use prost_types::{Duration, Timestamp};
use support::*;

/// Every session's info and every data source's listing, as a client sees them.
async fn snapshot(
    client: &mut Client,
    data_sources: &[&str],
) -> (
    BTreeMap<String, GetSessionInfoResponse>,
    BTreeMap<String, Vec<String>>,
) {
    let mut infos = BTreeMap::new();
    let mut listings = BTreeMap::new();
    for data_source in data_sources {
        let keys = list(client, data_source).await;
        for key in &keys {
            infos.insert(key.clone(), info(client, key).await);
        }
        listings.insert(data_source.to_string(), keys);
    }
    (infos, listings)
}

#[tokio::test]
async fn restart_restores_every_session_with_every_field_and_the_listing_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut keys = Vec::new();
    for i in 0..30 {
        let data_source = ["b", "a", "c"][i % 3];
        let response = client
            .create_session(CreateSessionRequest {
                data_source: data_source.into(),
                r#type: if i % 2 == 0 {
                    String::new()
                } else {
                    "Dyno".into()
                },
                version: i as u32 % 4,
                utc_offset: Some(Duration {
                    seconds: 3600 * (i as i64 % 5),
                    nanos: 0,
                }),
                identifier: format!("run {i}"),
                associate_session_key: vec![format!("parent-{}", i % 4)],
                details: [("lap".to_owned(), i.to_string())].into(),
                creation_time: Some(Timestamp {
                    seconds: 1_700_000_000 + i as i64,
                    nanos: i as i32,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.success);
        keys.push(response.session_key);
    }
    for (i, key) in keys.iter().enumerate() {
        if i % 2 == 0 {
            end(&mut client, key).await;
        }
        if i % 3 == 0 {
            client
                .update_session_details(UpdateSessionDetailsRequest {
                    session_key: key.clone(),
                    details: [("after".to_owned(), "yes".to_owned())].into(),
                })
                .await
                .unwrap();
            client
                .add_associate_session(AddAssociateSessionRequest {
                    session_key: key.clone(),
                    associate_session_key: "late".into(),
                })
                .await
                .unwrap();
        }
    }
    let before = snapshot(&mut client, &["a", "b", "c"]).await;
    let ended_before = end(&mut client, &keys[0]).await;

    let server = server.restart().await;
    let mut client = server.client().await;
    let after = snapshot(&mut client, &["a", "b", "c"]).await;
    assert_eq!(after, before);
    assert_eq!(after.0.len(), 30);
    // Ending again after the restart still returns the original end packet.
    assert_eq!(end(&mut client, &keys[0]).await, ended_before);
    // New sessions still list after the restored ones.
    let newest = create(&mut client, "a").await;
    assert_eq!(list(&mut client, "a").await.last(), Some(&newest));
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"stream_api_sessions_total{data_source="a"}"#),
        Some(11.0)
    );
}

#[tokio::test]
async fn kill_9_during_concurrent_creates_loses_no_acknowledged_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = ServerProcess::start(dir.path(), &[]).await;
    // The first change: the feed is read back from just after it.
    let marker = create(&mut connect(&process.grpc_url()).await, "marker").await;
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let enough = Arc::new(tokio::sync::Notify::new());
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let url = process.grpc_url();
            let acknowledged = acknowledged.clone();
            let enough = enough.clone();
            tokio::spawn(async move {
                let mut client = connect(&url).await;
                for i in 0.. {
                    let result = client
                        .create_session(CreateSessionRequest {
                            data_source: format!("writer{}", w % 4),
                            details: [("i".to_owned(), i.to_string())].into(),
                            ..Default::default()
                        })
                        .await;
                    match result {
                        Ok(response) => {
                            let response = response.into_inner();
                            assert!(response.success);
                            let mut acked = acknowledged.lock().unwrap();
                            acked.push((response.session_key, i));
                            if acked.len() >= 400 {
                                enough.notify_one();
                            }
                        }
                        // The server was killed: this write was never acknowledged.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::timeout(PATIENCE, enough.notified())
        .await
        .expect("writers did not get 400 acknowledgements");
    process.signal("KILL");
    process.child.wait().await.unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 400);

    let restarted = ServerProcess::start(dir.path(), &[]).await;
    let mut client = connect(&restarted.grpc_url()).await;
    for (key, i) in &acknowledged {
        let stored = info(&mut client, key).await;
        assert!(stored.success, "acknowledged session {key} is lost");
        assert_eq!(stored.details["i"], i.to_string());
    }
    let mut listed = 0;
    for w in 0..4 {
        listed += list(&mut client, &format!("writer{w}")).await.len();
    }
    assert!(listed >= acknowledged.len());

    // The feed was in the same commits: one STARTED event per stored session, none lost, none
    // for a session that is not there.
    let mut feed = feed_client(&restarted.grpc_url()).await;
    let mut stream = watch(&mut feed, "", 1).await;
    let mut started = std::collections::HashSet::new();
    loop {
        let message = next(&mut stream).await;
        if message.events.is_empty() {
            break; // caught up with the history
        }
        started.extend(message.events.into_iter().map(|e| e.session_key));
    }
    assert!(!started.contains(&marker));
    assert_eq!(started.len(), listed);
    for (key, _) in &acknowledged {
        assert!(
            started.contains(key),
            "no feed event for acknowledged session {key}"
        );
    }
}
