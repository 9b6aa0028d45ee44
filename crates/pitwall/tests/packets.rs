//! The data plane's reference scenarios (DATA-PLANE.md §7.2), over gRPC on loopback: packets
//! written through PacketWriterService come back through PacketReaderService with their stream
//! labels, filtered by session key, essentials copied and read to their end, in the partition
//! and topic layouts, with response batching off and on; on the embedded store, and on Kafka
//! when the suite has a broker (each test on data-plane topics of its own).

mod support;

use pitwall_proto::api::*;
use pitwall_proto::open_data::Packet;
use pitwall_server::config::StreamLayout;
use support::*;
use tokio::time::timeout;
use tonic::{Code, Streaming};

const STREAM_1: &str = "AppGroup1Stream";
const STREAM_2: &str = "AppGroup2Stream";
/// The record key readers filter on; the packets carry another session key on purpose.
const KEY: &str = " session key with a leading space";
const PACKET_KEY: &str = "the packet's own session key";

#[derive(Clone, Copy)]
enum Layout {
    Partitions,
    Topics,
}

struct Plane {
    _server: TestServer,
    data_source: String,
    writer: WriterClient,
    reader: ReaderClient,
    connections: ConnectionClient,
}

async fn plane(layout: Layout, batching: bool) -> Plane {
    let server = TestServer::start_with(|c| {
        c.stream_layout = match layout {
            Layout::Partitions => {
                StreamLayout::PartitionBased(vec![(STREAM_1.into(), 1), (STREAM_2.into(), 2)])
            }
            Layout::Topics => StreamLayout::TopicBased,
        };
        c.batching.enabled = batching;
    })
    .await;
    let (writer, reader, connections) = server.data_plane().await;
    Plane {
        data_source: data_source_for("IntegrationDs", server.data_dir()),
        _server: server,
        writer,
        reader,
        connections,
    }
}

fn packet(kind: &str, essential: bool) -> Packet {
    Packet {
        r#type: kind.into(),
        session_key: PACKET_KEY.into(),
        is_essential: essential,
        content: format!("content of {kind}").into_bytes(),
        id: 0,
    }
}

impl Plane {
    async fn write(&mut self, stream: &str, key: &str, packet: &Packet) {
        self.writer
            .write_data_packet(WriteDataPacketRequest {
                detail: Some(DataPacketDetails::new(
                    packet,
                    &self.data_source,
                    stream,
                    key,
                )),
            })
            .await
            .unwrap();
    }

    /// Writes every packet through one WriteDataPackets stream, a few per message.
    async fn write_stream(&mut self, packets: Vec<(String, Packet)>) {
        let data_source = self.data_source.clone();
        let requests: Vec<WriteDataPacketsRequest> = packets
            .chunks(7)
            .map(|chunk| WriteDataPacketsRequest {
                details: chunk
                    .iter()
                    .map(|(stream, packet)| {
                        DataPacketDetails::new(packet, &data_source, stream, KEY)
                    })
                    .collect(),
            })
            .collect();
        self.writer
            .write_data_packets(futures::stream::iter(requests))
            .await
            .unwrap();
    }

    /// The connection of the reference's tests: both streams from 0, filtered by [`KEY`].
    async fn connection(&mut self) -> Connection {
        self.connections
            .new_connection(NewConnectionRequest {
                details: Some(ConnectionDetails {
                    data_source: self.data_source.clone(),
                    session_key: KEY.into(),
                    streams: vec![STREAM_1.into(), STREAM_2.into()],
                    stream_offsets: vec![0, 0],
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .connection
            .unwrap()
    }

    async fn read(&mut self, connection: Connection) -> Streaming<ReadPacketsResponse> {
        self.reader
            .read_packets(ReadPacketsRequest {
                connection: Some(connection),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Reads ReadEssentials to its end.
    async fn essentials(&mut self, connection: Connection) -> Vec<Packet> {
        let mut stream = self
            .reader
            .read_essentials(ReadEssentialsRequest {
                connection: Some(connection),
            })
            .await
            .unwrap()
            .into_inner();
        let mut packets = Vec::new();
        loop {
            let message = timeout(PATIENCE, stream.message())
                .await
                .expect("ReadEssentials did not complete");
            match message.unwrap() {
                Some(response) => {
                    for item in response.response {
                        assert_eq!(item.stream, "");
                        packets.push(item.decode_packet().unwrap().unwrap());
                    }
                }
                None => return packets,
            }
        }
    }
}

/// The next `count` packets of a read, with their stream labels.
async fn receive(
    stream: &mut Streaming<ReadPacketsResponse>,
    count: usize,
) -> Vec<(String, Packet)> {
    let mut received = Vec::new();
    while received.len() < count {
        let response = timeout(PATIENCE, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} packets arrived in time", received.len()))
            .unwrap()
            .expect("the read ended");
        for item in response.response {
            let packet = item.decode_packet().unwrap().unwrap();
            received.push((item.stream, packet));
        }
    }
    received
}

async fn a_packet_on_a_stream_comes_back_labelled_with_it(layout: Layout, batching: bool) {
    for stream in [STREAM_1, STREAM_2] {
        let mut plane = plane(layout, batching).await;
        let connection = plane.connection().await;
        let mut read = plane.read(connection).await;
        let sent = packet("PeriodicData", false);
        plane.write(stream, KEY, &sent).await;
        let received = receive(&mut read, 1).await;
        assert_eq!(received, [(stream.to_owned(), sent)]);
        // The packet keeps its own session key, whatever the record key.
        assert_eq!(received[0].1.session_key, PACKET_KEY);
    }
}

async fn a_packet_of_an_unmapped_stream_comes_back_on_the_main_stream(layout: Layout) {
    let mut plane = plane(layout, false).await;
    let connection = plane.connection().await;
    let mut read = plane.read(connection).await;
    let sent = packet("Marker", false);
    plane.write("SomeOtherStream", KEY, &sent).await;
    assert_eq!(receive(&mut read, 1).await, [(String::new(), sent)]);
}

async fn a_packet_without_a_stream_comes_back_on_the_main_stream(layout: Layout, batching: bool) {
    let mut plane = plane(layout, batching).await;
    let connection = plane.connection().await;
    let mut read = plane.read(connection).await;
    let sent = packet("Event", false);
    plane.write("", KEY, &sent).await;
    assert_eq!(receive(&mut read, 1).await, [(String::new(), sent)]);
}

async fn three_packets_each_come_back_with_their_label(layout: Layout, batching: bool) {
    let mut plane = plane(layout, batching).await;
    let connection = plane.connection().await;
    let mut read = plane.read(connection).await;
    let sent = [
        (STREAM_1, packet("one", false)),
        (STREAM_2, packet("two", false)),
        ("", packet("three", false)),
    ];
    for (stream, packet) in &sent {
        plane.write(stream, KEY, packet).await;
    }
    let mut received = receive(&mut read, 3).await;
    received.sort_by(|a, b| a.1.r#type.cmp(&b.1.r#type));
    let mut expected: Vec<(String, Packet)> = sent
        .iter()
        .map(|(stream, packet)| (stream.to_string(), packet.clone()))
        .collect();
    expected.sort_by(|a, b| a.1.r#type.cmp(&b.1.r#type));
    assert_eq!(received, expected);
}

async fn a_packet_of_another_session_key_is_not_delivered(layout: Layout, batching: bool) {
    let mut plane = plane(layout, batching).await;
    let connection = plane.connection().await;
    let mut read = plane.read(connection).await;
    plane
        .write(STREAM_1, "unknown", &packet("foreign", false))
        .await;
    let mine = packet("mine", false);
    plane.write(STREAM_1, KEY, &mine).await;
    // The first packet that arrives is the one written after the foreign one.
    assert_eq!(receive(&mut read, 1).await, [(STREAM_1.to_owned(), mine)]);
}

async fn a_thousand_streamed_packets_are_all_delivered_in_order(layout: Layout, batching: bool) {
    let mut plane = plane(layout, batching).await;
    let connection = plane.connection().await;
    let mut read = plane.read(connection).await;
    let streams = [STREAM_1, STREAM_2, ""];
    let sent: Vec<(String, Packet)> = (0..1000)
        .map(|i| (streams[i % 3].to_owned(), packet(&i.to_string(), false)))
        .collect();
    plane.write_stream(sent.clone()).await;
    let received = receive(&mut read, 1000).await;
    assert_eq!(received.len(), 1000);
    // Order holds within each stream.
    for stream in streams {
        let of = |packets: &[(String, Packet)]| -> Vec<Packet> {
            packets
                .iter()
                .filter(|(s, _)| s == stream)
                .map(|(_, p)| p.clone())
                .collect()
        };
        assert_eq!(of(&received), of(&sent), "stream {stream:?}");
    }
}

async fn an_essential_packet_is_read_and_the_essentials_complete_with_it(
    layout: Layout,
    batching: bool,
) {
    let mut plane = plane(layout, batching).await;
    let connection = plane.connection().await;
    let mut read = plane.read(connection).await;
    let sent = packet("Configuration", true);
    plane.write(STREAM_1, KEY, &sent).await;
    let received = receive(&mut read, 1).await;
    assert_eq!(received, [(STREAM_1.to_owned(), sent.clone())]);
    assert!(received[0].1.is_essential);
    assert_eq!(plane.essentials(connection).await, [sent]);
}

async fn a_thousand_essential_packets_are_read_and_the_essentials_hold_them_all(
    layout: Layout,
    batching: bool,
) {
    let mut plane = plane(layout, batching).await;
    let connection = plane.connection().await;
    let mut read = plane.read(connection).await;
    let sent: Vec<(String, Packet)> = (0..1000)
        .map(|i| (STREAM_2.to_owned(), packet(&format!("essential {i}"), true)))
        .collect();
    plane.write_stream(sent.clone()).await;
    assert_eq!(receive(&mut read, 1000).await, sent);
    let fresh = plane.connection().await;
    let essentials = plane.essentials(fresh).await;
    let expected: Vec<Packet> = sent.into_iter().map(|(_, p)| p).collect();
    assert_eq!(essentials, expected);
}

macro_rules! scenarios {
    ($($module:ident: $layout:expr, $batching:expr;)*) => {$(
        mod $module {
            use super::*;

            #[tokio::test]
            async fn a_packet_on_a_stream_comes_back_labelled_with_it() {
                super::a_packet_on_a_stream_comes_back_labelled_with_it($layout, $batching).await;
            }

            #[tokio::test]
            async fn a_packet_without_a_stream_comes_back_on_the_main_stream() {
                super::a_packet_without_a_stream_comes_back_on_the_main_stream($layout, $batching)
                    .await;
            }

            #[tokio::test]
            async fn three_packets_each_come_back_with_their_label() {
                super::three_packets_each_come_back_with_their_label($layout, $batching).await;
            }

            #[tokio::test]
            async fn a_packet_of_another_session_key_is_not_delivered() {
                super::a_packet_of_another_session_key_is_not_delivered($layout, $batching).await;
            }

            #[tokio::test]
            async fn a_thousand_streamed_packets_are_all_delivered_in_order() {
                super::a_thousand_streamed_packets_are_all_delivered_in_order($layout, $batching)
                    .await;
            }

            #[tokio::test]
            async fn an_essential_packet_is_read_and_the_essentials_complete_with_it() {
                super::an_essential_packet_is_read_and_the_essentials_complete_with_it(
                    $layout, $batching,
                )
                .await;
            }

            #[tokio::test]
            async fn a_thousand_essential_packets_are_read_and_the_essentials_hold_them_all() {
                super::a_thousand_essential_packets_are_read_and_the_essentials_hold_them_all(
                    $layout, $batching,
                )
                .await;
            }
        }
    )*};
}

scenarios! {
    partitions: Layout::Partitions, false;
    partitions_batched: Layout::Partitions, true;
    topics: Layout::Topics, false;
    topics_batched: Layout::Topics, true;
}

#[tokio::test]
async fn under_partitions_an_unmapped_stream_comes_back_on_the_main_stream() {
    a_packet_of_an_unmapped_stream_comes_back_on_the_main_stream(Layout::Partitions).await;
}

#[tokio::test]
async fn bad_packets_and_names_are_refused_and_change_nothing() {
    let mut plane = plane(Layout::Topics, false).await;
    let connection = plane.connection().await;
    let mut read = plane.read(connection).await;
    let refused = |details: DataPacketDetails| {
        let mut writer = plane.writer.clone();
        async move {
            writer
                .write_data_packet(WriteDataPacketRequest {
                    detail: Some(details),
                })
                .await
                .unwrap_err()
        }
    };
    let good = packet("p", false);
    let data_source = plane.data_source.clone();
    let cases = [
        DataPacketDetails {
            message: None,
            ..DataPacketDetails::new(&good, &data_source, STREAM_1, KEY)
        },
        DataPacketDetails {
            message: Some(prost::bytes::Bytes::from_static(&[0xff, 0xff])),
            ..DataPacketDetails::new(&good, &data_source, STREAM_1, KEY)
        },
        DataPacketDetails::new(&good, "", STREAM_1, KEY),
        DataPacketDetails::new(&good, "a b", STREAM_1, KEY),
        DataPacketDetails::new(&good, &data_source, "bad/stream", KEY),
        DataPacketDetails::new(&good, &data_source, "@stream@::_essential", KEY),
    ];
    for details in cases {
        let status = refused(details.clone()).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{details:?}: {status:?}"
        );
        assert!(!status.message().is_empty());
    }
    let missing = plane
        .writer
        .write_data_packet(WriteDataPacketRequest { detail: None })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    // Nothing of them was stored: the next packet is the first one read.
    let after = packet("after", false);
    plane.write(STREAM_1, KEY, &after).await;
    assert_eq!(receive(&mut read, 1).await, [(STREAM_1.to_owned(), after)]);
}

#[tokio::test]
async fn reading_an_unknown_connection_says_so() {
    let mut plane = plane(Layout::Topics, false).await;
    let status = plane
        .reader
        .read_packets(ReadPacketsRequest {
            connection: Some(Connection { id: 42 }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn closing_a_connection_ends_its_reads() {
    let mut plane = plane(Layout::Topics, false).await;
    let connection = plane.connection().await;
    let mut read = plane.read(connection).await;
    let closed = plane
        .connections
        .close_connection(CloseConnectionRequest {
            connection: Some(connection),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(closed.success);
    let end = timeout(PATIENCE, read.message())
        .await
        .expect("the read did not end when its connection closed");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let again = plane
        .connections
        .get_connection(GetConnectionRequest {
            connection: Some(connection),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.details, None);
}

#[tokio::test]
async fn a_read_from_an_offset_starts_there_and_offsets_beyond_the_end_wait_for_new_packets() {
    let mut plane = plane(Layout::Topics, false).await;
    for i in 0..5 {
        plane
            .write(STREAM_1, KEY, &packet(&format!("p{i}"), false))
            .await;
    }
    let data_source = plane.data_source.clone();
    let from = |offset: i64| ConnectionDetails {
        data_source: data_source.clone(),
        streams: vec![STREAM_1.into()],
        stream_offsets: vec![offset],
        exclude_main_stream: true,
        ..Default::default()
    };
    let open = |details: ConnectionDetails| {
        let mut connections = plane.connections.clone();
        async move {
            connections
                .new_connection(NewConnectionRequest {
                    details: Some(details),
                })
                .await
                .unwrap()
                .into_inner()
                .connection
                .unwrap()
        }
    };
    let at_three = open(from(3)).await;
    let latest = open(from(-1)).await;
    let beyond = open(from(1000)).await;
    let mut read = plane.read(at_three).await;
    let kinds: Vec<String> = receive(&mut read, 2)
        .await
        .into_iter()
        .map(|(_, p)| p.r#type)
        .collect();
    assert_eq!(kinds, ["p3", "p4"]);
    let mut from_latest = plane.read(latest).await;
    let mut from_beyond = plane.read(beyond).await;
    // Nothing old comes to either: the first packet each gets is the next one written.
    plane.write(STREAM_1, KEY, &packet("p5", false)).await;
    for read in [&mut from_latest, &mut from_beyond] {
        let kinds: Vec<String> = receive(read, 1)
            .await
            .into_iter()
            .map(|(_, p)| p.r#type)
            .collect();
        assert_eq!(kinds, ["p5"]);
    }
}
