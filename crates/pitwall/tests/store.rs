//! The embedded store's file, damaged on disk: refused at startup with the file named and a way
//! out (never a panic, never a new empty store over it), `pitwall store check` and `repair`, and
//! rows whose checksum fails.

mod support;

use std::path::Path;
use std::process::Output;

use std::time::Duration;

use pitwall_proto::api::*;
use support::*;
use tokio::process::Command;
use tokio::time::timeout;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const STORE_FILE: &str = "pitwall.redb";

/// `pitwall serve` on `data_dir`, expected to stop by itself (refusing to start).
async fn refused_start(data_dir: &Path, extra: &[&str]) -> String {
    let output = timeout(
        PATIENCE,
        Command::new(binary())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env_remove("PITWALL_LISTEN")
            .env_remove("PITWALL_METRICS_LISTEN")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the server neither started nor stopped")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
    stderr
}

/// `pitwall store SUBCOMMAND --data-dir DIR`.
async fn store(subcommand: &str, data_dir: &Path) -> Output {
    timeout(
        PATIENCE,
        Command::new(binary())
            .args(["store", subcommand, "--data-dir"])
            .arg(data_dir)
            .env_remove("PITWALL_DATA_DIR")
            .output(),
    )
    .await
    .unwrap()
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn stop(mut process: ServerProcess) {
    process.signal("TERM");
    let status = timeout(PATIENCE, process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn an_empty_store_file_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(STORE_FILE);
    std::fs::write(&file, b"").unwrap();
    let stderr = refused_start(dir.path(), &[]).await;
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    for hint in ["is empty", "Restore it from a backup", "move it aside"] {
        assert!(stderr.contains(hint), "{stderr}");
    }
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);

    let check = store("check", dir.path()).await;
    assert_eq!(check.status.code(), Some(2));
    assert!(
        text(&check.stderr).contains("is empty"),
        "{}",
        text(&check.stderr)
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
}

#[tokio::test]
async fn a_store_file_with_a_megabyte_zeroed_mid_file_is_refused_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let process = ServerProcess::start_embedded(dir.path(), &[]).await;
    let url = process.grpc_url();
    // Some thousands of sessions with details: a file of several megabytes, nearly all in use.
    let mut writers = Vec::new();
    for writer in 0..16 {
        let url = url.clone();
        writers.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            for i in 0..200 {
                let response = client
                    .create_session(CreateSessionRequest {
                        data_source: format!("Car{}", writer % 4),
                        identifier: format!("run {writer}-{i}"),
                        details: [("notes".to_owned(), "x".repeat(400))].into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(response.success);
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    // The server holds the directory: the store commands keep off.
    let busy = store("check", dir.path()).await;
    assert_eq!(busy.status.code(), Some(2));
    assert!(
        text(&busy.stderr).contains("in use by another Pitwall process"),
        "{}",
        text(&busy.stderr)
    );
    stop(process).await;

    let file = dir.path().join(STORE_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 3 << 20, "only {} bytes", bytes.len());
    let middle = bytes.len() / 2 / 4096 * 4096;
    bytes[middle..middle + (1 << 20)].fill(0);
    std::fs::write(&file, &bytes).unwrap();

    let stderr = refused_start(dir.path(), &[]).await;
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("damaged"), "{stderr}");
    assert!(stderr.contains("Restore"), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), bytes, "the file was changed");

    let check = store("check", dir.path()).await;
    assert_eq!(check.status.code(), Some(1), "{}", text(&check.stdout));
    assert!(
        text(&check.stdout).contains("DAMAGED"),
        "{}",
        text(&check.stdout)
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        bytes,
        "check changed the file"
    );
}

#[tokio::test]
async fn a_changed_byte_in_a_session_row_is_refused_with_its_key_unless_damaged_rows_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let process = ServerProcess::start_embedded(dir.path(), &[]).await;
    let mut client = connect(&process.grpc_url()).await;
    let marker = format!("victim-{}", "0123456789abcdef".repeat(8));
    let victim = client
        .create_session(CreateSessionRequest {
            data_source: "Car1".into(),
            identifier: marker.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session_key;
    let mut others = Vec::new();
    for _ in 0..20 {
        others.push(create(&mut client, "Car1").await);
    }
    stop(process).await;
    assert_eq!(store("check", dir.path()).await.status.code(), Some(0));

    // One byte of the identifier, wherever the file holds it (the session's row, its feed
    // event, and older copies of their pages), as a bit flip on disk would.
    let file = dir.path().join(STORE_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    let mut changed = 0;
    let mut from = 0;
    while let Some(at) = find(&bytes[from..], marker.as_bytes()) {
        let byte = from + at + marker.len() - 3;
        bytes[byte] ^= 0x01;
        changed += 1;
        from += at + marker.len();
    }
    assert!(changed >= 1, "the identifier is not in the file");
    std::fs::write(&file, &bytes).unwrap();

    let stderr = refused_start(dir.path(), &[]).await;
    for hint in [
        victim.as_str(),
        "checksum mismatch",
        "--skip-damaged-rows",
        "Restore the file from a backup",
    ] {
        assert!(stderr.contains(hint), "no {hint:?} in {stderr}");
    }
    let check = store("check", dir.path()).await;
    assert_eq!(check.status.code(), Some(1));
    assert!(
        text(&check.stdout).contains(&victim),
        "{}",
        text(&check.stdout)
    );

    // Explicitly skipped: the server starts without that session, and says so.
    let mut process = ServerProcess::start_embedded(dir.path(), &["--skip-damaged-rows"]).await;
    let mut client = connect(&process.grpc_url()).await;
    assert!(!info(&mut client, &victim).await.success);
    for key in &others {
        assert!(info(&mut client, key).await.success);
    }
    stop_and_find_in_log(&mut process, &victim).await;

    // Repair removes the damaged rows; then the store is sound and starts as usual.
    let repair = store("repair", dir.path()).await;
    assert_eq!(repair.status.code(), Some(0), "{}", text(&repair.stderr));
    assert!(
        text(&repair.stdout).contains(&format!("removed damaged row: session '{victim}'")),
        "{}",
        text(&repair.stdout)
    );
    let check = store("check", dir.path()).await;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stdout));
    let process = ServerProcess::start_embedded(dir.path(), &[]).await;
    let mut client = connect(&process.grpc_url()).await;
    assert_eq!(list(&mut client, "Car1").await, others);
}

/// Asserts that the server's startup log named `key` as a damaged row left out, then stops it.
async fn stop_and_find_in_log(process: &mut ServerProcess, key: &str) {
    assert!(
        process
            .startup
            .iter()
            .any(|line| line.contains("damaged row left out") && line.contains(key)),
        "{:?}",
        process.startup
    );
    process.signal("TERM");
    let status = timeout(PATIENCE, process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Polls `check` until it holds; there is no event to await for a server's health.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    timeout(PATIENCE, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} did not happen in time"));
}

#[tokio::test]
async fn a_full_disk_refuses_writes_with_a_reason_and_recovers_without_a_restart_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The process's file-size limit stands in for a disk that fills up: a write past it fails
    // (EFBIG) as one fails with no space left, and raising it frees the space. Unlike a small
    // filesystem, it needs no privileges.
    let limit = 8 * 1024 * 1024;
    let process = ServerProcess::start_embedded_wrapped(
        &["prlimit", &format!("--fsize={limit}:unlimited")],
        dir.path(),
        &[],
    )
    .await;
    let url = process.grpc_url();
    let mut client = connect(&url).await;
    let padding = "p".repeat(60 * 1024);
    let request = |i: usize| CreateSessionRequest {
        data_source: "Car1".into(),
        identifier: format!("run {i}"),
        details: [("notes".to_owned(), padding.clone())].into(),
        ..Default::default()
    };
    let mut acknowledged = Vec::new();
    let refusal = loop {
        assert!(acknowledged.len() < 1000, "the store never filled up");
        match client.create_session(request(acknowledged.len())).await {
            Ok(response) => {
                let response = response.into_inner();
                assert!(response.success);
                acknowledged.push(response.session_key);
            }
            Err(status) => break status,
        }
    };
    assert!(acknowledged.len() > 10, "the store filled up too soon");
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(refusal.message().contains("storage"), "{refusal:?}");

    // Failed: health and readiness say so, and writes keep being refused with the reason.
    until("health NOT_SERVING", || async {
        health(&url, "").await == ServingStatus::NotServing
    })
    .await;
    assert_eq!(http_get(&process.metrics_addr, "/readyz").await.0, 503);
    let refused = client.create_session(request(0)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("refused until"), "{refused:?}");
    // Reads still answer.
    assert!(info(&mut client, &acknowledged[0]).await.success);

    // Space comes back: the server takes writes again by itself.
    let pid = process.child.id().unwrap().to_string();
    let raised = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
        .status()
        .unwrap();
    assert!(raised.success());
    until("health SERVING", || async {
        health(&url, "").await == ServingStatus::Serving
    })
    .await;
    assert_eq!(http_get(&process.metrics_addr, "/readyz").await.0, 200);
    let after = client
        .create_session(request(acknowledged.len()))
        .await
        .unwrap()
        .into_inner();
    assert!(after.success);
    acknowledged.push(after.session_key);

    // Nothing acknowledged was lost, now or after a restart.
    for key in &acknowledged {
        let session = info(&mut client, key).await;
        assert!(session.success, "{key}");
        assert_eq!(session.details.get("notes"), Some(&padding));
    }
    stop(process).await;
    let restarted = ServerProcess::start_embedded(dir.path(), &[]).await;
    let mut client = connect(&restarted.grpc_url()).await;
    for key in &acknowledged {
        assert!(
            info(&mut client, key).await.success,
            "{key} lost on restart"
        );
    }
    assert_eq!(list(&mut client, "Car1").await.len(), acknowledged.len());
}
