//! Sessions and the data plane together: info packets written through PacketWriterService become
//! session records, and sessions record the packet log's offsets and streams, so that a reader
//! passing a session's offsets starts exactly at its first packet.

mod support;

use pitwall_proto::api::*;
use pitwall_proto::open_data::{EndOfSessionPacket, NewSessionPacket, Packet, SessionInfoPacket};
use pitwall_server::config::{StoreConfig, StreamLayout};
use prost::Message;
use support::*;
use tokio::time::timeout;
use tonic::Code;

const DATA_SOURCE: &str = "Sim1";

async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.store = StoreConfig::Embedded;
        c.stream_layout = StreamLayout::TopicBased;
    })
    .await
}

fn info_packet(kind: &str, session_key: &str, content: Vec<u8>) -> Packet {
    Packet {
        r#type: kind.into(),
        session_key: session_key.into(),
        content,
        ..Default::default()
    }
}

async fn write_info(writer: &mut WriterClient, packet: Packet) -> Result<(), tonic::Status> {
    writer
        .write_info_packet(WriteInfoPacketRequest {
            message: Some(packet),
            r#type: InfoType::SessionInfo as i32,
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn info_packets_start_update_and_end_sessions_with_their_notifications() {
    let server = server().await;
    let mut client = server.client().await;
    let (mut writer, _, _) = server.data_plane().await;
    let mut started = starts(&mut client, DATA_SOURCE).await;
    let mut stopped = stops(&mut client, DATA_SOURCE).await;
    let key = "written-by-a-logger";
    let new_session = NewSessionPacket {
        data_source: DATA_SOURCE.into(),
        session_info: Some(SessionInfoPacket {
            r#type: "Session".into(),
            version: 1,
            identifier: "FP1".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    write_info(
        &mut writer,
        info_packet("NewSession", key, new_session.encode_to_vec()),
    )
    .await
    .unwrap();
    let start = timeout(PATIENCE, started.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(start.session_key, key);
    let update = SessionInfoPacket {
        details: [("driver".to_owned(), "A".to_owned())].into(),
        ..Default::default()
    };
    write_info(
        &mut writer,
        info_packet("SessionInfo", key, update.encode_to_vec()),
    )
    .await
    .unwrap();
    let session = info(&mut client, key).await;
    assert!(session.success);
    assert_eq!(session.identifier, "FP1");
    assert_eq!(session.details.get("driver").map(String::as_str), Some("A"));
    write_info(
        &mut writer,
        info_packet(
            "EndOfSession",
            key,
            EndOfSessionPacket {
                data_source: DATA_SOURCE.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    )
    .await
    .unwrap();
    let stop = timeout(PATIENCE, stopped.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(stop.session_key, key);
    assert!(info(&mut client, key).await.is_complete);
    // A second NewSession for the key changes nothing (the first wins).
    write_info(
        &mut writer,
        info_packet(
            "NewSession",
            key,
            NewSessionPacket {
                data_source: "Other".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(info(&mut client, key).await.data_source, DATA_SOURCE);
}

#[tokio::test]
async fn info_packets_that_cannot_apply_are_refused_and_others_left_alone() {
    let server = server().await;
    let mut client = server.client().await;
    let (mut writer, _, _) = server.data_plane().await;
    let unknown = write_info(
        &mut writer,
        info_packet(
            "SessionInfo",
            "no-such-session",
            SessionInfoPacket::default().encode_to_vec(),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("no-such-session"), "{unknown:?}");
    let undecodable = write_info(
        &mut writer,
        info_packet("NewSession", "k", vec![0xff, 0xff]),
    )
    .await
    .unwrap_err();
    assert_eq!(undecodable.code(), Code::InvalidArgument);
    let bad_name = write_info(
        &mut writer,
        info_packet(
            "NewSession",
            "k",
            NewSessionPacket {
                data_source: "a b".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(bad_name.code(), Code::InvalidArgument);
    // A status packet is not a session record: accepted, and no session appears.
    write_info(&mut writer, info_packet("SystemStatus", "", vec![]))
        .await
        .unwrap();
    assert!(list(&mut client, DATA_SOURCE).await.is_empty());
    assert!(!info(&mut client, "k").await.success);
}

async fn write(writer: &mut WriterClient, stream: &str, key: &str, kind: &str, essential: bool) {
    let packet = Packet {
        r#type: kind.into(),
        is_essential: essential,
        ..Default::default()
    };
    writer
        .write_data_packet(WriteDataPacketRequest {
            detail: Some(DataPacketDetails::new(&packet, DATA_SOURCE, stream, key)),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_session_records_the_packet_logs_offsets_and_a_reader_passing_them_starts_at_its_first_packet()
 {
    let server = server().await;
    let mut client = server.client().await;
    let (mut writer, _, _) = server.data_plane().await;
    // Before the session: 3 packets on the main stream (one essential), 2 on "laps".
    for kind in ["m0", "m1"] {
        write(&mut writer, "", "before", kind, false).await;
    }
    write(&mut writer, "", "before", "m2", true).await;
    for kind in ["l0", "l1"] {
        write(&mut writer, "laps", "before", kind, false).await;
    }
    let key = create(&mut client, DATA_SOURCE).await;
    let session = info(&mut client, &key).await;
    assert_eq!(session.main_offset, 3);
    assert_eq!(session.essentials_offset, 1);
    assert_eq!(
        session
            .topic_partition_offsets
            .get(&format!("{DATA_SOURCE}.laps:0")),
        Some(&2)
    );
    assert!(session.streams.is_empty());
    // The session's own packets.
    write(&mut writer, "laps", &key, "l2-mine", false).await;
    write(&mut writer, "", &key, "m3-mine", false).await;
    assert_eq!(info(&mut client, &key).await.streams, ["laps"]);
    let mut read = read_connection(
        &server.grpc_url(),
        ConnectionDetails {
            data_source: DATA_SOURCE.into(),
            streams: vec!["laps".into()],
            stream_offsets: vec![session.topic_partition_offsets[&format!("{DATA_SOURCE}.laps:0")]],
            main_offset: session.main_offset,
            ..Default::default()
        },
    )
    .await;
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let response = timeout(PATIENCE, read.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for item in response.response {
            kinds.push(item.decode_packet().unwrap().unwrap().r#type);
        }
    }
    kinds.sort();
    assert_eq!(kinds, ["l2-mine", "m3-mine"]);
}
