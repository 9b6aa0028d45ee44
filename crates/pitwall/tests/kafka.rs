//! The Kafka store with several instances on one topic, and interoperability with what the
//! reference server writes. Runs when `PITWALL_TEST_KAFKA` names a broker (scripts/test starts
//! one); the other end-to-end tests also run against it then, with the same test bodies.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pitwall_proto::api::*;
use pitwall_proto::open_data::{EndOfSessionPacket, NewSessionPacket, Packet, SessionInfoPacket};
use prost::Message;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::outage::Outage;
use support::*;
use tokio::time::timeout;

/// Polls `check` until it holds: state written on one instance reaches the others through the
/// topic, with no event to wait for on the reading side.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    timeout(PATIENCE, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} did not happen in time"));
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn sessions_written_on_one_instance_are_read_listed_and_notified_on_the_others() {
    required_broker();
    let a = TestServer::start().await;
    let b = a.another_instance().await;
    let c = a.another_instance().await;
    let (mut on_a, mut on_b, mut on_c) = (a.client().await, b.client().await, c.client().await);
    let mut starts_b = starts(&mut on_b, "ds").await;
    let mut stops_c = stops(&mut on_c, "ds").await;

    let key = on_a
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            identifier: "from a".into(),
            details: [("car".to_owned(), "7".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session_key;
    let started = timeout(PATIENCE, starts_b.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(started.session_key, key);
    // The notification follows the apply: the session is readable on b now.
    let seen = info(&mut on_b, &key).await;
    assert!(seen.success);
    assert_eq!(seen.identifier, "from a");
    assert_eq!(seen.details["car"], "7");

    on_b.update_session_details(UpdateSessionDetailsRequest {
        session_key: key.clone(),
        details: [("lap".to_owned(), "3".to_owned())].into(),
    })
    .await
    .unwrap();
    end(&mut on_b, &key).await;
    let stopped = timeout(PATIENCE, stops_c.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(stopped.session_key, key);
    let on_c_now = info(&mut on_c, &key).await;
    assert!(on_c_now.is_complete);
    assert_eq!(on_c_now.details["lap"], "3");
    assert_eq!(list(&mut on_c, "ds").await, vec![key.clone()]);
    eventually("the end reaching a", || {
        let mut on_a = on_a.clone();
        let key = key.clone();
        async move { info(&mut on_a, &key).await.is_complete }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn concurrent_associates_from_two_instances_both_end_up_in_the_list() {
    required_broker();
    let a = TestServer::start().await;
    let b = a.another_instance().await;
    let (mut on_a, on_b) = (a.client().await, b.client().await);
    let key = create(&mut on_a, "ds").await;
    eventually("the session reaching b", || {
        let mut on_b = on_b.clone();
        let key = key.clone();
        async move { info(&mut on_b, &key).await.success }
    })
    .await;
    let mut expected = BTreeSet::new();
    for round in 0..15 {
        let (from_a, from_b) = (format!("a{round}"), format!("b{round}"));
        let add = |mut client: Client, associate: String| {
            let key = key.clone();
            async move {
                client
                    .add_associate_session(AddAssociateSessionRequest {
                        session_key: key,
                        associate_session_key: associate,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .success
            }
        };
        let (ok_a, ok_b) = tokio::join!(
            add(on_a.clone(), from_a.clone()),
            add(on_b.clone(), from_b.clone())
        );
        assert!(ok_a && ok_b);
        expected.insert(from_a);
        expected.insert(from_b);
    }
    for client in [&on_a, &on_b] {
        let client = client.clone();
        let (key, expected) = (key.clone(), expected.clone());
        eventually("every associate on every instance", move || {
            let mut client = client.clone();
            let (key, expected) = (key.clone(), expected.clone());
            async move {
                let listed: BTreeSet<String> = info(&mut client, &key)
                    .await
                    .associate_session_keys
                    .into_iter()
                    .collect();
                listed == expected
            }
        })
        .await;
    }
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn an_instance_killed_mid_write_loses_nothing_and_the_others_carry_on() {
    required_broker();
    let topic_dir = tempfile::tempdir().unwrap();
    let topic = topic_for(topic_dir.path());
    let (dir_1, dir_2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = ServerProcess::start_on_topic(dir_1.path(), &topic, &[]).await;
    let second = ServerProcess::start_on_topic(dir_2.path(), &topic, &[]).await;

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let enough = Arc::new(tokio::sync::Notify::new());
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let (url, acknowledged, enough) =
                (first.grpc_url(), acknowledged.clone(), enough.clone());
            tokio::spawn(async move {
                let mut client = connect(&url).await;
                loop {
                    let Ok(response) = client
                        .create_session(CreateSessionRequest {
                            data_source: "killed".into(),
                            ..Default::default()
                        })
                        .await
                    else {
                        return;
                    };
                    let mut acked = acknowledged.lock().unwrap();
                    acked.push(response.into_inner().session_key);
                    if acked.len() >= 100 {
                        enough.notify_one();
                    }
                }
            })
        })
        .collect();
    timeout(PATIENCE, enough.notified()).await.unwrap();
    first.signal("KILL");
    first.child.wait().await.unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    // The survivor never stalls: it takes writes right away.
    let mut on_second = connect(&second.grpc_url()).await;
    let after = timeout(PATIENCE, create(&mut on_second, "survivor"))
        .await
        .unwrap();

    let restarted = ServerProcess::start_on_topic(dir_1.path(), &topic, &[]).await;
    let mut on_restarted = connect(&restarted.grpc_url()).await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    for key in acknowledged.iter().chain([&after]) {
        assert!(
            info(&mut on_restarted, key).await.success,
            "{key} lost on restart"
        );
        assert!(
            info(&mut on_second, key).await.success,
            "{key} missing on the survivor"
        );
    }
}

fn packet(kind: &str, session_key: &str, content: Vec<u8>) -> Vec<u8> {
    Packet {
        r#type: kind.into(),
        session_key: session_key.into(),
        is_essential: false,
        content,
        id: 0,
    }
    .encode_to_vec()
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn records_written_as_the_reference_writes_them_are_picked_up() {
    let broker = required_broker();
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut starts = starts(&mut client, "REF").await;
    let mut stops = stops(&mut client, "REF").await;

    // The reference compresses with zstd and keys by session.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .set("compression.type", "zstd")
        .create()
        .unwrap();
    let topic = match &server_config_topic(&server) {
        Some(topic) => topic.clone(),
        None => return,
    };
    let key = "7a0d2b4e-6c1f-4e2a-9b3d-5f8e7c6a1b2d";
    let info_first = SessionInfoPacket {
        identifier: "early info".into(),
        ..Default::default()
    };
    let new_session = NewSessionPacket {
        data_source: "REF".into(),
        topic_partition_offsets: [("REF".to_owned(), 10), ("REF_essential:0".to_owned(), 2)].into(),
        utc_offset: None,
        session_info: Some(SessionInfoPacket {
            data_source: "REF".into(),
            r#type: "Session".into(),
            version: 0,
            details: [("driver".to_owned(), "R".to_owned())].into(),
            ..Default::default()
        }),
        creation_time: None,
    };
    let records = [
        // A record for a key not yet seen waits for its NewSession.
        packet("SessionInfo", key, info_first.encode_to_vec()),
        packet("NewSession", key, new_session.encode_to_vec()),
        // The first reference release wrote the full message names.
        packet(
            "SessionInfoPacket",
            key,
            SessionInfoPacket {
                associate_session_keys: vec!["p1".into()],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        packet(
            "EndOfSession",
            key,
            EndOfSessionPacket::default().encode_to_vec(),
        ),
    ];
    for record in &records {
        producer
            .send(
                FutureRecord::to(&topic).key(key).payload(record),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        timeout(PATIENCE, starts.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .session_key,
        key
    );
    assert_eq!(
        timeout(PATIENCE, stops.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .session_key,
        key
    );
    let seen = info(&mut client, key).await;
    assert!(seen.success && seen.is_complete);
    assert_eq!(seen.identifier, "early info");
    assert_eq!(seen.associate_session_keys, vec!["p1"]);
    assert_eq!(seen.details["driver"], "R");
    assert_eq!(seen.main_offset, 10);
    assert_eq!(seen.essentials_offset, 2);
    assert_eq!(list(&mut client, "REF").await, vec![key.to_owned()]);
}

fn server_config_topic(server: &TestServer) -> Option<String> {
    match store_for(server.data_dir()) {
        pitwall_server::config::StoreConfig::Kafka { topic, .. } => Some(topic),
        pitwall_server::config::StoreConfig::Embedded => None,
    }
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn writes_are_unavailable_while_the_broker_is_down_and_resume_when_it_returns() {
    required_broker();
    let tansu = std::env::var("PITWALL_TEST_TANSU")
        .expect("this test restarts the broker: set PITWALL_TEST_TANSU to the tansu binary");
    use tonic_health::pb::health_check_response::ServingStatus;
    let outage = Outage::start(&tansu).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(|config| {
        config.data_dir = dir.path().to_owned();
        config.store = pitwall_server::config::StoreConfig::Kafka {
            brokers: format!("127.0.0.1:{}", outage.proxy_port),
            topic: "SessionInfo".into(),
            timeout: Duration::from_secs(2),
        };
    })
    .await;
    let mut client = server.client().await;
    let before = create(&mut client, "ds").await;

    outage.cut();
    let started = std::time::Instant::now();
    let status = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < PATIENCE,
        "the write hung for {:?}",
        started.elapsed()
    );
    // Reads answer from the last applied state.
    assert!(info(&mut client, &before).await.success);
    assert_eq!(list(&mut client, "ds").await, vec![before.clone()]);
    let url = server.grpc_url();
    eventually("health NOT_SERVING while the broker is away", || {
        let url = url.clone();
        async move { health(&url, SESSION_SERVICE).await == ServingStatus::NotServing }
    })
    .await;

    outage.restore();
    eventually("health SERVING once the broker is back", || {
        let url = url.clone();
        async move { health(&url, SESSION_SERVICE).await == ServingStatus::Serving }
    })
    .await;
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    eventually("a write succeeding again", || {
        let (mut client, acknowledged) = (client.clone(), acknowledged.clone());
        async move {
            let created = client
                .create_session(CreateSessionRequest {
                    data_source: "ds".into(),
                    ..Default::default()
                })
                .await;
            match created {
                Ok(response) if response.get_ref().success => {
                    acknowledged
                        .lock()
                        .unwrap()
                        .push(response.into_inner().session_key);
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    // Every acknowledged write is there. A write answered UNAVAILABLE may be there too: the
    // broker can have stored it before the connection was cut, unconfirmed.
    let listed = list(&mut client, "ds").await;
    assert!(listed.contains(&before));
    for key in acknowledged.lock().unwrap().iter() {
        assert!(listed.contains(key), "acknowledged {key} is missing");
    }
}

/// A data source name no earlier run on the same broker used.
fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{nanos}")
}

/// Creates `topic` with `partitions` partitions and writes `counts[p]` records to partition p,
/// one record per produce so that the test broker's watermarks are exact (tansu 0.6.0 answers a
/// batched produce's end offset as the batch's base offset + 1).
async fn topic_with_records(broker: &str, topic: &str, partitions: i32, counts: &[i32]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("linger.ms", "0")
        .create()
        .unwrap();
    for (partition, count) in counts.iter().enumerate() {
        for i in 0..*count {
            producer
                .send(
                    FutureRecord::to(topic)
                        .partition(partition as i32)
                        .key("k")
                        .payload(&format!("data {i}")),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn partition_based_offsets_and_streams_come_from_the_cluster() {
    let broker = required_broker();
    let data_source = unique_name("pb");
    // Main topic: partition 0 holds 3 records, partition 1 holds 2, partition 2 none; no
    // essentials topic yet.
    topic_with_records(&broker, &data_source, 3, &[3, 2, 0]).await;
    let server = TestServer::start_with(|config| {
        config.stream_layout = pitwall_server::config::StreamLayout::PartitionBased(vec![
            ("Stream1".to_owned(), 1),
            ("Stream2".to_owned(), 2),
        ]);
    })
    .await;
    let mut client = server.client().await;
    let created = client
        .create_session(CreateSessionRequest {
            data_source: data_source.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expected: std::collections::BTreeMap<String, i64> = [
        (format!("{data_source}:0"), 3),
        (format!("{data_source}:1"), 2),
        (format!("{data_source}:2"), 0),
        (format!("{data_source}_essential:0"), 0),
    ]
    .into();
    assert_eq!(
        created.new_session.unwrap().topic_partition_offsets,
        expected
    );
    let seen = info(&mut client, &created.session_key).await;
    assert_eq!(seen.topic_partition_offsets, expected);
    assert_eq!((seen.main_offset, seen.essentials_offset), (3, 0));
    assert_eq!(seen.streams, vec!["Stream1", "Stream2"]);
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn topic_based_offsets_and_streams_come_from_the_cluster() {
    let broker = required_broker();
    let data_source = unique_name("tb");
    topic_with_records(&broker, &format!("{data_source}.laps"), 1, &[2]).await;
    topic_with_records(&broker, &format!("{data_source}.gps"), 1, &[0]).await;
    topic_with_records(&broker, &format!("{data_source}_essential"), 1, &[1]).await;
    // Not streams of the data source: a nested name, and another data source's prefix.
    topic_with_records(&broker, &format!("{data_source}.laps.raw"), 1, &[0]).await;
    topic_with_records(&broker, &format!("{data_source}x.laps"), 1, &[0]).await;
    let server = TestServer::start_with(|config| {
        config.stream_layout = pitwall_server::config::StreamLayout::TopicBased;
    })
    .await;
    let mut client = server.client().await;
    let key = create(&mut client, &data_source).await;
    let seen = info(&mut client, &key).await;
    let expected: std::collections::BTreeMap<String, i64> = [
        (format!("{data_source}:0"), 0),
        (format!("{data_source}_essential:0"), 1),
        (format!("{data_source}.laps:0"), 2),
        (format!("{data_source}.gps:0"), 0),
    ]
    .into();
    assert_eq!(seen.topic_partition_offsets, expected);
    assert_eq!(seen.essentials_offset, 1);
    assert_eq!(seen.streams, vec!["gps", "laps"]);
    // The end takes the offsets again, now that the stream has moved on.
    topic_with_records(&broker, &format!("{data_source}.brakes"), 1, &[4]).await;
    let ended = end(&mut client, &key).await.end_session.unwrap();
    assert_eq!(
        ended.topic_partition_offsets[&format!("{data_source}.brakes:0")],
        4
    );
}
