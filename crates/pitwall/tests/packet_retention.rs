//! The packet log keeps the disk from filling by surprise: retention by bytes and by age per
//! data source, writes refused with a reason below the free-space reserve, and a store that
//! failed on a full disk taking writes again once space comes back, losing nothing.

mod support;

use std::time::Duration;

use pitwall_proto::api::*;
use pitwall_proto::open_data::Packet;
use pitwall_server::config::StoreConfig;
use support::*;
use tokio::time::timeout;
use tonic::Code;

const DATA_SOURCE: &str = "Car9";

fn packet(kind: &str, padding: usize) -> Packet {
    Packet {
        r#type: kind.into(),
        content: vec![b'x'; padding],
        ..Default::default()
    }
}

async fn write(writer: &mut WriterClient, kind: &str, padding: usize) -> Result<(), tonic::Status> {
    writer
        .write_data_packet(WriteDataPacketRequest {
            detail: Some(DataPacketDetails::new(
                &packet(kind, padding),
                DATA_SOURCE,
                "",
                "k",
            )),
        })
        .await
        .map(|_| ())
}

/// The type of the first packet a read of the main stream from offset 0 gets.
async fn first_kept(url: &str) -> String {
    let mut read = read_connection(
        url,
        ConnectionDetails {
            data_source: DATA_SOURCE.into(),
            ..Default::default()
        },
    )
    .await;
    let response = timeout(PATIENCE, read.message())
        .await
        .expect("nothing to read")
        .unwrap()
        .unwrap();
    response.response[0]
        .decode_packet()
        .unwrap()
        .unwrap()
        .r#type
}

/// Polls until the first kept packet is no longer `old`: retention runs between batches, with
/// no event to wait for.
async fn until_removed(url: &str, old: &str) -> String {
    timeout(PATIENCE, async {
        loop {
            let first = first_kept(url).await;
            if first != old {
                return first;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("retention never removed {old}"))
}

#[tokio::test]
async fn a_data_source_over_its_byte_budget_loses_its_oldest_packets_first() {
    let server = TestServer::start_with(|c| {
        c.store = StoreConfig::Embedded;
        c.packets.retention_bytes = Some(256 * 1024);
        c.packets.retention_age = None;
    })
    .await;
    let (mut writer, _, _) = server.data_plane().await;
    for i in 0..200 {
        write(&mut writer, &format!("p{i}"), 4096).await.unwrap();
    }
    // Retention runs between batches, so a pass may come while the writes go on: wait for the
    // one that brings the data source under its budget (256 KiB: 64 packets of 4 KiB).
    let url = server.grpc_url();
    let first = timeout(PATIENCE, async {
        loop {
            let first: usize = first_kept(&url)
                .await
                .trim_start_matches('p')
                .parse()
                .unwrap();
            if first >= 200 - 64 - 16 {
                return first;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("retention never brought the data source under its budget");
    // The newest are kept: no more is removed than to come under the budget, less a chunk
    // (60 KiB, 15 packets) removed whole.
    assert!(first <= 200 - 64 + 15, "kept from p{first}");
    assert!(
        metric_value(&server.metrics().await, "pitwall_packets_removed_total")
            .is_some_and(|n| n >= 1.0)
    );
}

#[tokio::test]
async fn packets_older_than_the_age_limit_are_removed() {
    let server = TestServer::start_manual(|c| {
        c.store = StoreConfig::Embedded;
        c.packets.retention_bytes = None;
        c.packets.retention_age = Some(Duration::from_secs(3600));
    })
    .await;
    let (mut writer, _, _) = server.data_plane().await;
    for i in 0..10 {
        write(&mut writer, &format!("old{i}"), 100).await.unwrap();
    }
    server.advance(Duration::from_secs(2 * 3600));
    write(&mut writer, "new", 100).await.unwrap();
    assert_eq!(until_removed(&server.grpc_url(), "old0").await, "new");
}

#[tokio::test]
async fn writes_that_would_eat_the_disk_reserve_are_refused_with_the_reason() {
    let server = TestServer::start_with(|c| {
        c.store = StoreConfig::Embedded;
        // More than any disk here has free.
        c.packets.min_free_bytes = u64::MAX / 4;
    })
    .await;
    let (mut writer, _, _) = server.data_plane().await;
    let refused = write(&mut writer, "p", 10).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("free"), "{refused:?}");
    assert!(
        refused.message().contains("--packet-min-free-bytes"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_full_disk_refuses_packet_writes_then_takes_them_again_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The file-size limit stands in for a disk that fills (see the session store's test).
    let limit = 6 * 1024 * 1024;
    let process = ServerProcess::start_embedded_wrapped(
        &["prlimit", &format!("--fsize={limit}:unlimited")],
        dir.path(),
        &["--packet-min-free-bytes", "0"],
    )
    .await;
    let url = process.grpc_url();
    let mut writer = WriterClient::new(channel(&url).await);
    let mut acknowledged = 0;
    let refusal = loop {
        assert!(acknowledged < 10_000, "the packet store never filled up");
        match write(&mut writer, &format!("p{acknowledged}"), 32 * 1024).await {
            Ok(()) => acknowledged += 1,
            Err(status) => break status,
        }
    };
    assert!(acknowledged > 10, "filled up too soon");
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(refusal.message().contains("packet storage"), "{refusal:?}");
    let pid = process.child.id().unwrap().to_string();
    let raised = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
        .status()
        .unwrap();
    assert!(raised.success());
    // The store reopens by itself; writes are taken again (poll: the retry is timed).
    timeout(PATIENCE, async {
        while write(&mut writer, "after", 10).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("packet writes never came back");
    // Every acknowledged packet is there, in order, before the one written after.
    let mut read = read_connection(
        &url,
        ConnectionDetails {
            data_source: DATA_SOURCE.into(),
            ..Default::default()
        },
    )
    .await;
    let mut kinds = Vec::new();
    while kinds.last().map(String::as_str) != Some("after") {
        let response = timeout(PATIENCE, read.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for item in response.response {
            kinds.push(item.decode_packet().unwrap().unwrap().r#type);
        }
    }
    let expected: Vec<String> = (0..acknowledged)
        .map(|i| format!("p{i}"))
        .chain(["after".to_owned()])
        .collect();
    assert_eq!(kinds, expected);
}
