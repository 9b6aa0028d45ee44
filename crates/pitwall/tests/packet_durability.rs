//! The packet log under stress: `kill -9` during concurrent `WriteDataPackets` streams loses no
//! acknowledged packet and duplicates none (on the embedded store, and on Kafka when the suite
//! has a broker); a reader that stops reading holds up neither the writers nor the server's
//! memory.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use pitwall_proto::api::*;
use pitwall_proto::open_data::Packet;
use support::*;
use tokio::time::timeout;

const DATA_SOURCE: &str = "Rig1";

/// A packet naming its writer and its place in that writer's sequence.
fn packet(writer: usize, sequence: usize, padding: usize) -> Packet {
    Packet {
        r#type: "PeriodicData".into(),
        session_key: format!("w{writer}"),
        content: format!("{writer}:{sequence}:{}", "x".repeat(padding)).into_bytes(),
        ..Default::default()
    }
}

fn parse(packet: &Packet) -> (usize, usize) {
    let text = String::from_utf8_lossy(&packet.content);
    let mut parts = text.splitn(3, ':');
    let writer = parts.next().unwrap().parse().unwrap();
    let sequence = parts.next().unwrap().parse().unwrap();
    (writer, sequence)
}

/// Reads the main stream from offset 0 until the packet of type `marker`, which is written last.
async fn read_all(url: &str, data_source: &str, marker: &str) -> Vec<Packet> {
    let mut stream = read_connection(
        url,
        ConnectionDetails {
            data_source: data_source.into(),
            ..Default::default()
        },
    )
    .await;
    let mut packets = Vec::new();
    loop {
        let response = timeout(PATIENCE, stream.message())
            .await
            .expect("the marker did not arrive")
            .unwrap()
            .expect("the read ended");
        for item in response.response {
            let packet = item.decode_packet().unwrap().unwrap();
            if packet.r#type == marker {
                return packets;
            }
            packets.push(packet);
        }
    }
}

async fn write_marker(url: &str, data_source: &str, marker: &str) {
    let mut writer = WriterClient::new(channel(url).await);
    let marker = Packet {
        r#type: marker.into(),
        ..Default::default()
    };
    writer
        .write_data_packet(WriteDataPacketRequest {
            detail: Some(DataPacketDetails::new(&marker, data_source, "", "")),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn kill_9_during_concurrent_packet_streams_loses_no_acknowledged_packet_and_duplicates_none()
{
    const WRITERS: usize = 8;
    const PACKETS_PER_CALL: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    // On a broker, topics of this test's own.
    let data_source = data_source_for(DATA_SOURCE, dir.path());
    let mut process = ServerProcess::start(dir.path(), &[]).await;
    let url = process.grpc_url();
    // Per writer: the sequences of every call that was answered OK.
    let acknowledged: Arc<Mutex<BTreeMap<usize, BTreeSet<usize>>>> = Arc::default();
    let (started_sender, mut started) = tokio::sync::mpsc::unbounded_channel();
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (url, data_source) = (url.clone(), data_source.clone());
        let acknowledged = acknowledged.clone();
        let started_sender = started_sender.clone();
        writers.push(tokio::spawn(async move {
            let mut client = WriterClient::new(channel(&url).await);
            let mut next = 0;
            loop {
                let sequences: Vec<usize> = (next..next + PACKETS_PER_CALL).collect();
                next += PACKETS_PER_CALL;
                let requests: Vec<WriteDataPacketsRequest> = sequences
                    .chunks(5)
                    .map(|chunk| WriteDataPacketsRequest {
                        details: chunk
                            .iter()
                            .map(|s| {
                                DataPacketDetails::new(
                                    &packet(writer, *s, 200),
                                    &data_source,
                                    "",
                                    &format!("w{writer}"),
                                )
                            })
                            .collect(),
                    })
                    .collect();
                match client
                    .write_data_packets(futures::stream::iter(requests))
                    .await
                {
                    Ok(_) => {
                        acknowledged
                            .lock()
                            .unwrap()
                            .entry(writer)
                            .or_default()
                            .extend(sequences);
                        let _ = started_sender.send(());
                    }
                    // The server is gone: what was not answered may or may not be there.
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill once every writer is well under way.
    for _ in 0..WRITERS * 8 {
        timeout(PATIENCE, started.recv()).await.unwrap().unwrap();
    }
    process.signal("KILL");
    process.child.wait().await.unwrap();
    for writer in writers {
        writer.await.unwrap();
    }

    let restarted = ServerProcess::start(dir.path(), &[]).await;
    let url = restarted.grpc_url();
    write_marker(&url, &data_source, "end-of-test").await;
    let read = read_all(&url, &data_source, "end-of-test").await;
    let mut seen: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for packet in &read {
        let (writer, sequence) = parse(packet);
        seen.entry(writer).or_default().push(sequence);
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    for (writer, sequences) in &acknowledged {
        let got = seen.get(writer).cloned().unwrap_or_default();
        // In order, once each, with nothing missing before the last packet stored (a write
        // that was not answered may have landed whole or not at all on the embedded store; on
        // Kafka a prefix of it may have, as the idempotent producer keeps a partition's order).
        assert!(
            got.windows(2).all(|w| w[0] + 1 == w[1]),
            "writer {writer}: packets out of order, repeated or missing: {got:?}"
        );
        assert_eq!(got.first().copied().unwrap_or(0), 0, "writer {writer}");
        let got: BTreeSet<usize> = got.into_iter().collect();
        let lost: Vec<&usize> = sequences.difference(&got).collect();
        assert!(
            lost.is_empty(),
            "writer {writer}: {} acknowledged packets lost, e.g. {:?}",
            lost.len(),
            lost.first()
        );
    }
}

#[tokio::test]
async fn a_reader_that_stops_reading_holds_up_neither_the_writers_nor_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    // A small page cache, so that what the server holds is what the reader holds.
    let process =
        ServerProcess::start_embedded(dir.path(), &["--packet-cache-bytes", "4MiB"]).await;
    let url = process.grpc_url();
    let pid = process.child.id().unwrap();
    // A reader that asks for everything and then never takes a message.
    let reader_channel = channel(&url).await;
    let mut connections = ConnectionClient::new(reader_channel.clone());
    let connection = connections
        .new_connection(NewConnectionRequest {
            details: Some(ConnectionDetails {
                data_source: DATA_SOURCE.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .connection;
    let stalled = ReaderClient::new(reader_channel)
        .read_packets(ReadPacketsRequest { connection })
        .await
        .unwrap()
        .into_inner();
    let resident = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    // Its own connection, so the writes do not share the stalled reader's flow control.
    let mut writer = WriterClient::new(channel(&url).await);
    // Warm up, then measure what 100 MB more of writes add.
    write_megabytes(&mut writer, 16).await;
    let before = resident();
    timeout(PATIENCE * 6, write_megabytes(&mut writer, 100))
        .await
        .expect("writes stalled behind a reader that does not read");
    let after = resident();
    let grown = after.saturating_sub(before);
    assert!(
        grown < 32 * 1024 * 1024,
        "the server grew by {} MiB while a reader stalled (from {} MiB)",
        grown / (1024 * 1024),
        before / (1024 * 1024)
    );
    drop(stalled);
}

async fn write_megabytes(writer: &mut WriterClient, megabytes: usize) {
    let per_call = 256;
    let packet_bytes = 4096;
    let calls = megabytes * 1024 * 1024 / (per_call * packet_bytes);
    for call in 0..calls {
        let requests: Vec<WriteDataPacketsRequest> = (0..per_call)
            .collect::<Vec<_>>()
            .chunks(32)
            .map(|chunk| WriteDataPacketsRequest {
                details: chunk
                    .iter()
                    .map(|i| {
                        DataPacketDetails::new(
                            &packet(call, *i, packet_bytes),
                            DATA_SOURCE,
                            "",
                            "k",
                        )
                    })
                    .collect(),
            })
            .collect();
        writer
            .write_data_packets(futures::stream::iter(requests))
            .await
            .unwrap();
    }
}
