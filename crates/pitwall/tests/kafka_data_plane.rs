//! The data plane on Kafka: several instances on one cluster, records as the reference writes
//! and reads them, a partition-count mismatch, and a broker outage. Runs when
//! `PITWALL_TEST_KAFKA` names a broker (scripts/test starts one); `packets.rs`, `data_formats.rs`
//! and `packet_durability.rs` run their scenarios on it too.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pitwall_proto::api::*;
use pitwall_proto::open_data::Packet;
use pitwall_server::config::{StoreConfig, StreamLayout};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use support::outage::Outage;
use support::*;
use tokio::time::timeout;
use tonic::Streaming;

const KEY: &str = "run key";

fn packet(kind: &str) -> Packet {
    Packet {
        r#type: kind.into(),
        session_key: "the packet's own key".into(),
        content: format!("content of {kind}").into_bytes(),
        ..Default::default()
    }
}

async fn write(writer: &mut WriterClient, data_source: &str, stream: &str, packet: &Packet) {
    writer
        .write_data_packet(WriteDataPacketRequest {
            detail: Some(DataPacketDetails::new(packet, data_source, stream, KEY)),
        })
        .await
        .unwrap();
}

/// A read of the data source's main stream from offset 0, filtered by [`KEY`].
async fn read_main(
    connections: &mut ConnectionClient,
    reader: &mut ReaderClient,
    data_source: &str,
) -> Streaming<ReadPacketsResponse> {
    let connection = connections
        .new_connection(NewConnectionRequest {
            details: Some(ConnectionDetails {
                data_source: data_source.into(),
                session_key: KEY.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .connection;
    reader
        .read_packets(ReadPacketsRequest { connection })
        .await
        .unwrap()
        .into_inner()
}

async fn receive(stream: &mut Streaming<ReadPacketsResponse>, count: usize) -> Vec<Packet> {
    let mut received = Vec::new();
    while received.len() < count {
        let response = timeout(PATIENCE, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} packets arrived in time", received.len()))
            .unwrap()
            .expect("the read ended");
        for item in response.response {
            received.push(item.decode_packet().unwrap().unwrap());
        }
    }
    received
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn a_packet_written_through_one_instance_is_read_through_another() {
    required_broker();
    let a = TestServer::start().await;
    let b = a.another_instance().await;
    let data_source = data_source_for("Shared", a.data_dir());
    let (mut writer, _, _) = a.data_plane().await;
    let (_, mut reader, mut connections) = b.data_plane().await;
    let mut read = read_main(&mut connections, &mut reader, &data_source).await;
    let sent = packet("from a");
    write(&mut writer, &data_source, "", &sent).await;
    assert_eq!(receive(&mut read, 1).await, [sent]);
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn a_data_format_registered_on_one_instance_resolves_on_another() {
    required_broker();
    let a = TestServer::start().await;
    let b = a.another_instance().await;
    let data_source = data_source_for("Formats", a.data_dir());
    let (mut on_a, mut on_b) = (a.data_formats().await, b.data_formats().await);
    let parameters = vec!["speed".to_owned(), "rpm".to_owned()];
    let id = on_a
        .get_parameter_data_format_id(GetParameterDataFormatIdRequest {
            data_source: data_source.clone(),
            parameters: parameters.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .data_format_identifier;
    let resolved = on_b
        .get_parameters_list(GetParametersListRequest {
            data_source: data_source.clone(),
            data_format_identifier: id,
        })
        .await
        .unwrap()
        .into_inner()
        .parameters;
    assert_eq!(resolved, parameters);
    let same = on_b
        .get_parameter_data_format_id(GetParameterDataFormatIdRequest {
            data_source,
            parameters,
        })
        .await
        .unwrap()
        .into_inner()
        .data_format_identifier;
    assert_eq!(
        same, id,
        "the other instance gives the content its existing id"
    );
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn two_instances_allocating_at_once_never_give_one_id_to_two_contents() {
    required_broker();
    let a = TestServer::start().await;
    let b = a.another_instance().await;
    let data_source = data_source_for("Race", a.data_dir());
    let mut asks = Vec::new();
    for (name, server) in [("a", &a), ("b", &b)] {
        for i in 0..16 {
            let mut formats = server.data_formats().await;
            let data_source = data_source.clone();
            let event = format!("{name} event {i}");
            asks.push(tokio::spawn(async move {
                let id = formats
                    .get_event_data_format_id(GetEventDataFormatIdRequest {
                        data_source,
                        event: event.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .data_format_identifier;
                (id, event)
            }));
        }
    }
    let mut contents: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for ask in asks {
        let (id, event) = ask.await.unwrap();
        contents.entry(id).or_default().insert(event);
    }
    for (id, events) in &contents {
        assert_eq!(events.len(), 1, "id {id} was given to {events:?}");
    }
    // Both instances resolve every id to the content it was given for.
    for server in [&a, &b] {
        let mut formats = server.data_formats().await;
        for (id, events) in &contents {
            let event = formats
                .get_event(GetEventRequest {
                    data_source: data_source.clone(),
                    data_format_identifier: *id,
                })
                .await
                .unwrap()
                .into_inner()
                .event;
            assert!(events.contains(&event), "id {id} resolves to {event:?}");
        }
    }
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn records_are_the_reference_s_in_both_directions() {
    let broker = required_broker();
    let server = TestServer::start_with(|c| {
        c.stream_layout = StreamLayout::PartitionBased(vec![("Laps".into(), 1)]);
    })
    .await;
    let data_source = data_source_for("Interop", server.data_dir());
    let (mut writer, mut reader, mut connections) = server.data_plane().await;
    // Written through Pitwall: a plain consumer finds the reference's record.
    let mut essential = packet("Configuration");
    essential.is_essential = true;
    write(&mut writer, &data_source, "Laps", &essential).await;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .set("group.id", "interop-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for (topic, partition) in [
        (data_source.clone(), 1),
        (format!("{data_source}_essential"), 0),
    ] {
        assignment
            .add_partition_offset(&topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut found = BTreeSet::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    while found.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "found only {found:?}");
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.unwrap();
        assert_eq!(message.key(), Some(KEY.as_bytes()));
        assert!(message.headers().is_none());
        assert!(message.timestamp().to_millis().is_some());
        let value = Packet::decode(message.payload().unwrap()).unwrap();
        assert_eq!(value, essential);
        found.insert((message.topic().to_owned(), message.partition()));
    }
    // Written by a plain producer as the reference writes: ReadPackets delivers it.
    let mut read = read_main(&mut connections, &mut reader, &data_source).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .create()
        .unwrap();
    let foreign = packet("from the reference");
    // Not a Packet: skipped, and the read goes on.
    producer
        .send(
            FutureRecord::to(&data_source)
                .partition(0)
                .key(KEY)
                .payload(&[0xff_u8, 0xff][..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    producer
        .send(
            FutureRecord::to(&data_source)
                .partition(0)
                .key(KEY)
                .payload(&foreign.encode_to_vec()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(receive(&mut read, 1).await, [foreign]);
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn a_stream_mapped_to_a_partition_the_topic_lacks_fails_its_write_with_the_reason() {
    required_broker();
    let server = TestServer::start_with(|c| {
        c.stream_layout = StreamLayout::PartitionBased(vec![("Laps".into(), 1)]);
    })
    .await;
    let data_source = data_source_for("Narrow", server.data_dir());
    let (mut writer, _, _) = server.data_plane().await;
    // A server with no mappings creates the main topic with one partition.
    let narrow = server.another_instance_with(|c| {
        c.stream_layout = StreamLayout::PartitionBased(Vec::new());
    });
    let (mut narrow_writer, _, _) = narrow.await.data_plane().await;
    write(&mut narrow_writer, &data_source, "", &packet("first")).await;
    let refused = writer
        .write_data_packet(WriteDataPacketRequest {
            detail: Some(DataPacketDetails::new(
                &packet("lap"),
                &data_source,
                "Laps",
                KEY,
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("partition"),
        "{}",
        refused.message()
    );
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn during_a_broker_outage_writes_fail_in_time_and_readers_resume_without_gaps() {
    required_broker();
    let tansu = std::env::var("PITWALL_TEST_TANSU")
        .expect("this test runs its own broker: set PITWALL_TEST_TANSU to the tansu binary");
    let outage = Outage::start(&tansu).await;
    let deadline = Duration::from_secs(2);
    let server = TestServer::start_with(|c| {
        c.store = StoreConfig::Kafka {
            brokers: format!("127.0.0.1:{}", outage.proxy_port),
            topic: "SessionInfo".into(),
            timeout: deadline,
        };
    })
    .await;
    let data_source = "Outage";
    let (mut writer, mut reader, mut connections) = server.data_plane().await;
    let mut read = read_main(&mut connections, &mut reader, data_source).await;
    write(&mut writer, data_source, "", &packet("before")).await;
    assert_eq!(receive(&mut read, 1).await, [packet("before")]);

    outage.cut();
    let started = std::time::Instant::now();
    let refused = writer
        .write_data_packet(WriteDataPacketRequest {
            detail: Some(DataPacketDetails::new(
                &packet("during"),
                data_source,
                "",
                KEY,
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        started.elapsed() < deadline + Duration::from_secs(1),
        "the write was answered after {:?}",
        started.elapsed()
    );

    outage.restore();
    // No event says the producer has reconnected: write until a write succeeds.
    let mut acknowledged = Vec::new();
    let until = tokio::time::Instant::now() + PATIENCE;
    let mut last_refusal = None;
    for i in 0.. {
        assert!(
            tokio::time::Instant::now() < until,
            "no write succeeded: {last_refusal:?}"
        );
        let after = packet(&format!("after {i}"));
        let written = writer
            .write_data_packet(WriteDataPacketRequest {
                detail: Some(DataPacketDetails::new(&after, data_source, "", KEY)),
            })
            .await;
        match written {
            Ok(_) => {
                acknowledged.push(after);
                break;
            }
            Err(status) => last_refusal = Some(status),
        }
    }
    for i in 0..5 {
        let after = packet(&format!("then {i}"));
        write(&mut writer, data_source, "", &after).await;
        acknowledged.push(after);
    }
    // The read resumes where it was: the refused write may be there (the broker may have
    // stored it unconfirmed), then every acknowledged one once, in order.
    let mut received = Vec::new();
    while !received.ends_with(&acknowledged[acknowledged.len() - 1..]) {
        received.extend(receive(&mut read, 1).await);
    }
    let unconfirmed: Vec<&Packet> = received
        .iter()
        .filter(|p| !acknowledged.contains(p))
        .collect();
    assert!(
        unconfirmed
            .iter()
            .all(|p| p.r#type == "during" || p.r#type.starts_with("after ")),
        "{unconfirmed:?}"
    );
    let confirmed: Vec<Packet> = received
        .into_iter()
        .filter(|p| acknowledged.contains(p))
        .collect();
    assert_eq!(confirmed, acknowledged);
}

/// Opens a connection on the main stream under `consumer_group`, from `main_offset`.
async fn grouped_read(
    server: &TestServer,
    data_source: &str,
    consumer_group: &str,
    main_offset: i64,
) -> Streaming<ReadPacketsResponse> {
    let (_, mut reader, mut connections) = server.data_plane().await;
    let connection = connections
        .new_connection(NewConnectionRequest {
            details: Some(ConnectionDetails {
                data_source: data_source.into(),
                session_key: KEY.into(),
                main_offset,
                consumer_group: consumer_group.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .connection;
    reader
        .read_packets(ReadPacketsRequest { connection })
        .await
        .unwrap()
        .into_inner()
}

/// The offset `group` committed for partition 0 of `topic`, if any.
fn committed(broker: &str, group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, 0);
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    match committed.find_partition(topic, 0).unwrap().offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn a_consumer_group_commits_what_was_delivered_and_resumes_there() {
    let broker = required_broker();
    let server = TestServer::start().await;
    let data_source = data_source_for("Grouped", server.data_dir());
    let group = format!("{data_source}-dashboard");
    let (mut writer, _, _) = server.data_plane().await;
    let first: Vec<Packet> = (0..5).map(|i| packet(&format!("first {i}"))).collect();
    for sent in &first {
        write(&mut writer, &data_source, "", sent).await;
    }
    let mut read = grouped_read(&server, &data_source, &group, 0).await;
    assert_eq!(receive(&mut read, 5).await, first);
    // Commits follow what the client took; nothing signals them to another client.
    let deadline = std::time::Instant::now() + PATIENCE;
    while committed(&broker, &group, &data_source) != Some(5) {
        assert!(
            std::time::Instant::now() < deadline,
            "the group committed {:?}, not 5",
            committed(&broker, &group, &data_source)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(read);
    let later: Vec<Packet> = (0..2).map(|i| packet(&format!("later {i}"))).collect();
    for sent in &later {
        write(&mut writer, &data_source, "", sent).await;
    }
    // A negative offset resumes where the group left off: nothing delivered before comes
    // again, nothing written since is missed.
    let mut resumed = grouped_read(&server, &data_source, &group, -1).await;
    assert_eq!(receive(&mut resumed, 2).await, later);
    // Without a group, a negative offset is the end.
    let mut latest = grouped_read(&server, &data_source, "", -1).await;
    let newest = packet("newest");
    write(&mut writer, &data_source, "", &newest).await;
    assert_eq!(receive(&mut latest, 1).await, [newest]);
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn reads_without_a_consumer_group_leave_no_group_on_the_broker() {
    let broker = required_broker();
    let server = TestServer::start().await;
    let data_source = data_source_for("Groupless", server.data_dir());
    let (mut writer, mut reader, mut connections) = server.data_plane().await;
    let mut essential = packet("Configuration");
    essential.is_essential = true;
    write(&mut writer, &data_source, "", &essential).await;
    let mut read = read_main(&mut connections, &mut reader, &data_source).await;
    assert_eq!(receive(&mut read, 1).await, [essential]);
    // A grouped read beside it, so the listing is seen to show groups that exist.
    let group = format!("{data_source}-listed");
    let mut grouped = grouped_read(&server, &data_source, &group, 0).await;
    receive(&mut grouped, 1).await;
    let lister: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .create()
        .unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    let names = loop {
        let groups = lister
            .fetch_group_list(None, Duration::from_secs(10))
            .unwrap();
        let names: BTreeSet<String> = groups
            .groups()
            .iter()
            .map(|g| g.name().to_owned())
            .collect();
        if names.contains(&group) {
            break names;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the grouped read's group is not listed: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pitwall_groups: Vec<&String> = names
        .iter()
        .filter(|name| name.starts_with("pitwall"))
        .collect();
    assert!(pitwall_groups.is_empty(), "{pitwall_groups:?}");
}
