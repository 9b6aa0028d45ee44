//! The `pitwall session` commands against a real server: output in both formats, exit codes,
//! error messages, and `watch` printing events caused by another client.

mod support;

use std::process::{Output, Stdio};

use serde_json::Value;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

/// Runs `pitwall session --server URL ARGS…`.
async fn pitwall(server: &TestServer, args: &[&str]) -> Output {
    Command::new(binary())
        .arg("session")
        .args(["--server", &server.grpc_url()])
        .args(args)
        .env_remove("PITWALL_SERVER")
        .output()
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn json(output: &Output) -> Value {
    serde_json::from_str(&stdout(output)).unwrap()
}

async fn created(server: &TestServer, args: &[&str]) -> String {
    let mut all = vec!["create"];
    all.extend_from_slice(args);
    let output = pitwall(server, &all).await;
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output).trim().to_owned()
}

#[tokio::test]
async fn create_prints_the_new_key_and_get_shows_every_field() {
    let server = TestServer::start().await;
    let key = created(
        &server,
        &[
            "--data-source",
            "Car1",
            "--type",
            "Dyno",
            "--version",
            "2",
            "--identifier",
            "FP1",
            "--utc-offset",
            "-05:30",
            "--detail",
            "driver=X",
            "--detail",
            "car=7",
            "--associate",
            "parent",
        ],
    )
    .await;
    assert_eq!(key.len(), 36);

    let table = pitwall(&server, &["get", &key]).await;
    assert!(table.status.success());
    let text = stdout(&table);
    for expected in [
        "data_source        Car1",
        "identifier         FP1",
        "type               Dyno",
        "version            2",
        "utc_offset         -05:30",
        "associates         parent",
        "complete           false",
        "ended              -",
    ] {
        assert!(text.contains(expected), "missing '{expected}' in\n{text}");
    }
    let car = text.find("  car ").unwrap();
    let driver = text.find("  driver ").unwrap();
    assert!(car < driver, "details are sorted:\n{text}");

    let as_json = json(&pitwall(&server, &["--output", "json", "get", &key]).await);
    assert_eq!(as_json["session_key"], key.as_str());
    assert_eq!(as_json["details"]["driver"], "X");
    assert_eq!(as_json["utc_offset"], "-05:30");
    assert_eq!(as_json["version"], 2);
    assert_eq!(as_json["is_complete"], false);
}

#[tokio::test]
async fn create_in_json_gives_key_data_source_and_time() {
    let server = TestServer::start().await;
    let output = pitwall(
        &server,
        &["--output", "json", "create", "--data-source", "ds"],
    )
    .await;
    let created = json(&output);
    assert_eq!(created["data_source"], "ds");
    assert_eq!(created["session_key"].as_str().unwrap().len(), 36);
    assert!(created["creation_time"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn list_shows_sessions_oldest_first_and_filters_live_and_complete() {
    let server = TestServer::start().await;
    let first = created(&server, &["--data-source", "ds", "--identifier", "one"]).await;
    let second = created(
        &server,
        &[
            "--data-source",
            "ds",
            "--identifier",
            "two",
            "--detail",
            "a=1",
        ],
    )
    .await;
    let ended = pitwall(&server, &["end", &first, "--at", "2099-01-01T00:00:00Z"]).await;
    assert_eq!(
        stdout(&ended).trim(),
        format!("ended {first} at 2099-01-01T00:00:00Z")
    );

    let table = stdout(&pitwall(&server, &["list", "--data-source", "ds"]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("KEY"));
    assert!(lines[1].starts_with(&first) && lines[1].contains("2099-01-01T00:00:00Z"));
    assert!(lines[2].starts_with(&second) && lines[2].ends_with(" 1"));

    let live = json(
        &pitwall(
            &server,
            &["--output", "json", "list", "--data-source", "ds", "--live"],
        )
        .await,
    );
    let live_keys: Vec<&str> = live
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_key"].as_str().unwrap())
        .collect();
    assert_eq!(live_keys, vec![second.as_str()]);
    let complete = json(
        &pitwall(
            &server,
            &[
                "--output",
                "json",
                "list",
                "--data-source",
                "ds",
                "--complete",
            ],
        )
        .await,
    );
    assert_eq!(complete[0]["session_key"], first.as_str());
    assert_eq!(complete.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn update_associate_and_end_report_what_they_did() {
    let server = TestServer::start().await;
    let key = created(&server, &["--data-source", "ds"]).await;
    let updated = pitwall(
        &server,
        &["update", &key, "--identifier", "Q2", "--detail", "lap=12"],
    )
    .await;
    assert_eq!(stdout(&updated).trim(), format!("updated {key}"));
    let associated = pitwall(&server, &["--output", "json", "associate", &key, "other"]).await;
    assert_eq!(json(&associated)["associate_session_key"], "other");
    let ended = json(&pitwall(&server, &["--output", "json", "end", &key]).await);
    assert_eq!(ended["data_source"], "ds");
    assert!(ended["termination_time"].is_string());

    let mut client = server.client().await;
    let stored = info(&mut client, &key).await;
    assert_eq!(stored.identifier, "Q2");
    assert_eq!(stored.details["lap"], "12");
    assert_eq!(stored.associate_session_keys, vec!["other"]);
    assert!(stored.is_complete);
}

#[tokio::test]
async fn a_refused_request_prints_the_servers_reason_and_exits_1() {
    let server = TestServer::start().await;
    let unknown = pitwall(&server, &["get", "no-such-session"]).await;
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(
        stderr(&unknown).trim(),
        "pitwall: session 'no-such-session' not found"
    );
    assert!(stdout(&unknown).is_empty());

    let invalid = pitwall(&server, &["create", "--data-source", "a b"]).await;
    assert_eq!(invalid.status.code(), Some(1));
    assert!(
        stderr(&invalid).contains("contains a space"),
        "{}",
        stderr(&invalid)
    );
}

#[tokio::test]
async fn bad_detail_syntax_is_a_usage_error() {
    let server = TestServer::start().await;
    let output = pitwall(
        &server,
        &["create", "--data-source", "ds", "--detail", "novalue"],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("'novalue' is not key=value"),
        "{}",
        stderr(&output)
    );
    assert!(list(&mut server.client().await, "ds").await.is_empty());
}

#[tokio::test]
async fn an_unreachable_server_is_one_line_and_exit_code_3() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(binary())
        .args([
            "session",
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "list",
            "--data-source",
            "ds",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.starts_with(&format!(
            "pitwall: cannot reach the Pitwall server at http://127.0.0.1:{port}"
        )),
        "{message}"
    );
}

/// Starts `pitwall session watch` and waits until it has subscribed.
async fn watch(
    server: &TestServer,
    format: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut child = Command::new(binary())
        .args([
            "session",
            "--server",
            &server.grpc_url(),
            "--output",
            format,
            "watch",
            "--data-source",
            "ds",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = timeout(PATIENCE, errors.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.contains("watching data source 'ds'"), "{line}");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("watch ended")
}

#[tokio::test]
async fn watch_prints_starts_and_stops_caused_by_another_client() {
    let server = TestServer::start().await;
    let (mut child, mut lines) = watch(&server, "table").await;
    let mut client = server.client().await;
    create(&mut client, "other").await;
    let key = create(&mut client, "ds").await;
    end(&mut client, &key).await;
    assert_eq!(next_line(&mut lines).await, format!("started  {key}  ds"));
    assert_eq!(next_line(&mut lines).await, format!("stopped  {key}  ds"));
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = timeout(PATIENCE, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn watch_in_json_prints_one_event_per_line() {
    let server = TestServer::start().await;
    let (_child, mut lines) = watch(&server, "json").await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    let event: Value = serde_json::from_str(&next_line(&mut lines).await).unwrap();
    assert_eq!(event["event"], "started");
    assert_eq!(event["session_key"], key.as_str());
    assert_eq!(event["data_source"], "ds");
}

#[tokio::test]
async fn watch_ends_cleanly_when_the_server_shuts_down() {
    let mut server = TestServer::start().await;
    let (mut child, mut lines) = watch(&server, "table").await;
    server.stop().await;
    assert_eq!(
        timeout(PATIENCE, lines.next_line()).await.unwrap().unwrap(),
        None
    );
    assert_eq!(
        timeout(PATIENCE, child.wait())
            .await
            .unwrap()
            .unwrap()
            .code(),
        Some(0)
    );
}
