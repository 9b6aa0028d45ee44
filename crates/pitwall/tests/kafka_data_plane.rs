//! The data plane on Kafka: several instances on one cluster (one of them killed mid-write),
//! records as the reference writes and reads them, a partition-count mismatch, and a broker
//! outage. Runs when `PITWALL_TEST_KAFKA` names a broker (scripts/test starts one);
//! `packets.rs`, `data_formats.rs` and `packet_durability.rs` run their scenarios on it too.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
use tokio::sync::mpsc;
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

/// A packet naming its writer and its place in that writer's sequence.
fn numbered(writer: usize, sequence: usize) -> Packet {
    Packet {
        r#type: "PeriodicData".into(),
        session_key: KEY.into(),
        content: format!("{writer}:{sequence}").into_bytes(),
        ..Default::default()
    }
}

fn number(packet: &Packet) -> (usize, usize) {
    let text = String::from_utf8_lossy(&packet.content);
    let (writer, sequence) = text
        .split_once(':')
        .unwrap_or_else(|| panic!("not a numbered packet: {packet:?}"));
    (writer.parse().unwrap(), sequence.parse().unwrap())
}

/// How a writer sends its packets.
#[derive(Clone, Copy)]
enum Calls {
    /// `WriteDataPackets` streams of [`PER_STREAM`] packets, in requests of 5.
    Streams,
    /// One `WriteDataPacket` per packet.
    Single,
}

const PER_STREAM: usize = 25;

impl Calls {
    /// The packets of one call.
    fn packets(self) -> usize {
        match self {
            Calls::Streams => PER_STREAM,
            Calls::Single => 1,
        }
    }
}

/// Per writer, the sequences of the packets its answered calls carried.
type Acknowledged = Arc<Mutex<BTreeMap<usize, BTreeSet<usize>>>>;

/// Writes writer `id`'s packets in sequence, one call after the other, until a call fails
/// (returned) or `stop` is set. Records what each answered call carried, then sends `id` on
/// `acks`.
async fn write_numbered(
    url: String,
    data_source: String,
    id: usize,
    calls: Calls,
    acknowledged: Acknowledged,
    acks: mpsc::UnboundedSender<usize>,
    stop: Arc<AtomicBool>,
) -> Option<tonic::Status> {
    let mut writer = WriterClient::new(channel(&url).await);
    let details =
        |sequence: &usize| DataPacketDetails::new(&numbered(id, *sequence), &data_source, "", KEY);
    let mut next = 0;
    while !stop.load(Ordering::Acquire) {
        let sequences: Vec<usize> = (next..next + calls.packets()).collect();
        next += calls.packets();
        let written = match calls {
            Calls::Streams => {
                let requests: Vec<WriteDataPacketsRequest> = sequences
                    .chunks(5)
                    .map(|chunk| WriteDataPacketsRequest {
                        details: chunk.iter().map(details).collect(),
                    })
                    .collect();
                writer
                    .write_data_packets(futures::stream::iter(requests))
                    .await
                    .map(drop)
            }
            Calls::Single => writer
                .write_data_packet(WriteDataPacketRequest {
                    detail: Some(details(&sequences[0])),
                })
                .await
                .map(drop),
        };
        if let Err(status) = written {
            return Some(status);
        }
        acknowledged
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .extend(sequences);
        let _ = acks.send(id);
    }
    None
}

/// Partition 0 of `topic` from its first record up to the packet of type `marker`, read by a
/// plain consumer: what is in the topic, whatever a server makes of it.
fn read_topic(broker: &str, topic: &str, marker: &str) -> Vec<Packet> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", format!("{topic}-check"))
        .set("enable.auto.commit", "false")
        // Nothing is written in transactions; the stable offset the test broker reports can
        // stop short of the last batch, which holds the marker.
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut packets = Vec::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no marker in {topic} after {} records",
            packets.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let packet = Packet::decode(message.unwrap().payload().unwrap()).unwrap();
        if packet.r#type == marker {
            return packets;
        }
        packets.push(packet);
    }
}

#[tokio::test]
#[ignore = "needs a Kafka broker: PITWALL_TEST_KAFKA (scripts/test runs it)"]
async fn kill_9_of_one_of_two_instances_during_writes_leaves_every_acknowledged_packet_in_the_topic_exactly_once()
 {
    const MARKER: &str = "end-of-test";
    // Before the kill, every writer through A has had this many calls answered: each is
    // mid-sequence when A dies.
    const CALLS_BEFORE_THE_KILL: usize = 5;
    // Calls answered to each writer through B after A died: B wrote on across the kill.
    const CALLS_AFTER_THE_KILL: usize = 3;
    let broker = required_broker();
    let b = TestServer::start().await;
    // A child process, so that it can be killed; on B's sessions topic, as two instances of
    // one deployment are.
    let a_dir = tempfile::tempdir().unwrap();
    let mut a = ServerProcess::start_on_topic(a_dir.path(), &topic_for(b.data_dir()), &[]).await;
    let data_source = data_source_for("Killed", b.data_dir());
    let writers: [(&str, Calls); 8] = [
        ("a", Calls::Streams),
        ("a", Calls::Streams),
        ("a", Calls::Streams),
        ("a", Calls::Streams),
        ("a", Calls::Single),
        ("a", Calls::Single),
        ("b", Calls::Streams),
        ("b", Calls::Single),
    ];
    let acknowledged: Acknowledged = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (acks_sender, mut acks) = mpsc::unbounded_channel();
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for (id, (instance, calls)) in writers.iter().enumerate() {
        let (url, spawned) = match *instance {
            "a" => (a.grpc_url(), &mut on_a),
            _ => (b.grpc_url(), &mut on_b),
        };
        let task = tokio::spawn(write_numbered(
            url,
            data_source.clone(),
            id,
            *calls,
            acknowledged.clone(),
            acks_sender.clone(),
            stop.clone(),
        ));
        spawned.push((id, *calls, task));
    }

    let mut calls_answered: BTreeMap<usize, usize> = BTreeMap::new();
    while on_a
        .iter()
        .any(|(id, _, _)| calls_answered.get(id).copied().unwrap_or(0) < CALLS_BEFORE_THE_KILL)
    {
        let id = timeout(PATIENCE, acks.recv())
            .await
            .expect("the writers stalled before the kill")
            .unwrap();
        *calls_answered.entry(id).or_default() += 1;
    }
    a.signal("KILL");
    a.child.wait().await.unwrap();
    // Each ends with the call the kill cut, which may or may not have landed, in part or whole.
    for (_, _, task) in on_a {
        task.await.unwrap();
    }

    let packets_of = |id: usize| {
        acknowledged
            .lock()
            .unwrap()
            .get(&id)
            .map_or(0, BTreeSet::len)
    };
    let wanted: Vec<(usize, usize)> = on_b
        .iter()
        .map(|(id, calls, _)| {
            (
                *id,
                packets_of(*id) + CALLS_AFTER_THE_KILL * calls.packets(),
            )
        })
        .collect();
    while wanted.iter().any(|(id, enough)| packets_of(*id) < *enough) {
        timeout(PATIENCE, acks.recv())
            .await
            .expect("the writers through B stalled after A was killed")
            .unwrap();
    }
    stop.store(true, Ordering::Release);
    for (id, _, task) in on_b {
        if let Some(status) = task.await.unwrap() {
            panic!("writer {id} through B failed: {status:?}");
        }
    }

    // Written after every acknowledged packet, so a read that reaches it has passed them all.
    let (mut writer, mut reader, mut connections) = b.data_plane().await;
    write(&mut writer, &data_source, "", &packet(MARKER)).await;
    let mut read = read_main(&mut connections, &mut reader, &data_source).await;
    let mut through_b = Vec::new();
    while !through_b.iter().any(|p: &Packet| p.r#type == MARKER) {
        through_b.extend(receive(&mut read, 1).await);
    }
    // An unacknowledged record of A's, delivered late, may follow the marker.
    through_b.truncate(through_b.iter().position(|p| p.r#type == MARKER).unwrap());
    let in_topic = {
        let (broker, topic) = (broker.clone(), data_source.clone());
        tokio::task::spawn_blocking(move || read_topic(&broker, &topic, MARKER))
            .await
            .unwrap()
    };
    let in_topic: Vec<(usize, usize)> = in_topic.iter().map(number).collect();
    assert_eq!(
        through_b.iter().map(number).collect::<Vec<_>>(),
        in_topic,
        "B read other than what the topic holds"
    );

    let mut seen: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (id, sequence) in &in_topic {
        seen.entry(*id).or_default().push(*sequence);
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    for (id, (instance, calls)) in writers.iter().enumerate() {
        let got = seen.remove(&id).unwrap_or_default();
        let answered = acknowledged.get(&id).cloned().unwrap_or_default();
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for sequence in &got {
            *counts.entry(*sequence).or_default() += 1;
        }
        let repeated: Vec<(&usize, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            repeated.is_empty(),
            "writer {id} through {instance}: packets in the topic more than once (sequence, \
             times): {repeated:?}"
        );
        let lost: Vec<&usize> = answered
            .iter()
            .filter(|s| !counts.contains_key(s))
            .collect();
        assert!(
            lost.is_empty(),
            "writer {id} through {instance}: {} of {} acknowledged packets not in the topic, \
             e.g. {:?}",
            lost.len(),
            answered.len(),
            &lost[..lost.len().min(10)]
        );
        // A writer waits for each answer before its next call, and one producer's records keep
        // their order in a partition through retries: what landed is the writer's first
        // packets. Of the call the kill cut, some first ones may be there, nothing after it.
        let out_of_order = got.iter().enumerate().position(|(i, s)| i != *s);
        assert_eq!(
            out_of_order,
            None,
            "writer {id} through {instance}: not its packets in sequence from 0: {:?}",
            &got[..got.len().min(out_of_order.unwrap_or(0) + 5)]
        );
        if *instance == "a" {
            assert!(
                got.len() <= answered.len() + calls.packets(),
                "writer {id} through A: {} in the topic, {} acknowledged",
                got.len(),
                answered.len()
            );
        } else {
            assert_eq!(got.len(), answered.len(), "writer {id} through B");
        }
    }
    assert!(seen.is_empty(), "packets of no writer: {seen:?}");
}
