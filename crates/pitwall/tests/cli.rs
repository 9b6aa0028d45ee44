//! The `pitwall session` commands against a real server: output in both formats, exit codes,
//! error messages, and `watch` printing events caused by another client.

mod support;

use std::process::{Output, Stdio};

use pitwall_proto::api::{ConnectionDetails, DataPacketDetails, WriteDataPacketRequest};
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
async fn control_characters_from_the_server_are_printed_escaped() {
    let server = TestServer::start().await;
    // Detail values may hold anything, so a session can carry terminal escapes to a printer.
    let value = "red\u{1b}[2J\nforged  line\u{9b}";
    let key = created(
        &server,
        &["--data-source", "ds", "--detail", &format!("notes={value}")],
    )
    .await;
    let table = pitwall(&server, &["get", &key]).await;
    let text = stdout(&table);
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    let notes: Vec<&str> = text.lines().filter(|l| l.contains("notes")).collect();
    assert_eq!(notes.len(), 1, "{text}");
    assert!(
        notes[0].ends_with(r"  red\u{1b}[2J\nforged  line\u{9b}"),
        "{text}"
    );
    assert!(!text.lines().any(|l| l.starts_with("forged")), "{text}");

    let as_json = pitwall(&server, &["--output", "json", "get", &key]).await;
    assert!(
        !stdout(&as_json)
            .chars()
            .any(|c| c.is_control() && c != '\n')
    );
    assert_eq!(json(&as_json)["details"]["notes"], value);
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

/// Keys of `pitwall --output json session list ARGS…`, in the order printed.
async fn listed(server: &TestServer, args: &[&str]) -> Vec<String> {
    let mut all = vec!["--output", "json", "list"];
    all.extend_from_slice(args);
    let output = pitwall(server, &all).await;
    assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    json(&output)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_key"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn list_spans_data_sources_in_creation_order_and_applies_every_filter() {
    let server = TestServer::start().await;
    let a1 = created(
        &server,
        &[
            "--data-source",
            "Car1",
            "--identifier",
            "FP1",
            "--detail",
            "driver=Alex",
        ],
    )
    .await;
    let b1 = created(
        &server,
        &[
            "--data-source",
            "Car2",
            "--identifier",
            "FP2",
            "--detail",
            "driver=Sam",
            "--detail",
            "lap=3",
        ],
    )
    .await;
    let a2 = created(
        &server,
        &[
            "--data-source",
            "Car1",
            "--identifier",
            "Q1",
            "--detail",
            "driver=Sam",
        ],
    )
    .await;
    let c1 = created(&server, &["--data-source", "Rig", "--identifier", "FP3"]).await;
    for (key, at) in [(&a1, "2099-01-01T00:00:00Z"), (&b1, "2099-06-01T00:00:00Z")] {
        assert!(
            pitwall(&server, &["end", key, "--at", at])
                .await
                .status
                .success()
        );
    }

    // Every data source, oldest first, with the data source in its own column.
    let table = stdout(&pitwall(&server, &["list"]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    let header: Vec<&str> = lines[0]
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "KEY",
            "DATA SOURCE",
            "IDENTIFIER",
            "TYPE",
            "CREATED",
            "ENDED",
            "DETAILS"
        ]
    );
    let rows: Vec<Vec<&str>> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expected = [
        (&a1, "Car1", "FP1", "2099-01-01T00:00:00Z", "1"),
        (&b1, "Car2", "FP2", "2099-06-01T00:00:00Z", "2"),
        (&a2, "Car1", "Q1", "-", "1"),
        (&c1, "Rig", "FP3", "-", "0"),
    ];
    for (row, (key, data_source, identifier, ended, details)) in rows.iter().zip(expected) {
        assert_eq!(row.len(), 7, "{table}");
        assert_eq!(
            (row[0], row[1], row[2], row[3], row[5], row[6]),
            (
                key.as_str(),
                data_source,
                identifier,
                "Session",
                ended,
                details
            ),
            "{table}"
        );
        assert!(row[4].ends_with('Z'), "{table}");
    }

    assert_eq!(
        listed(&server, &[]).await,
        [a1.as_str(), b1.as_str(), a2.as_str(), c1.as_str()]
    );
    assert_eq!(
        listed(&server, &["--data-source", "Car1", "--data-source", "Car2"]).await,
        [a1.as_str(), b1.as_str(), a2.as_str()]
    );
    assert_eq!(
        listed(&server, &["--data-source", "Car1"]).await,
        [a1.as_str(), a2.as_str()]
    );
    assert!(
        listed(&server, &["--data-source", "Nowhere"])
            .await
            .is_empty()
    );
    assert_eq!(
        listed(&server, &["--identifier", "FP*"]).await,
        [a1.as_str(), b1.as_str(), c1.as_str()]
    );
    assert_eq!(
        listed(&server, &["--identifier", "FP[12]"]).await,
        [a1.as_str(), b1.as_str()]
    );
    assert_eq!(
        listed(&server, &["--identifier", "?1"]).await,
        [a2.as_str()]
    );
    assert_eq!(
        listed(&server, &["--detail", "driver=Sam"]).await,
        [b1.as_str(), a2.as_str()]
    );
    assert_eq!(
        listed(&server, &["--detail", "driver=Sam", "--detail", "lap=3"]).await,
        [b1.as_str()]
    );
    assert_eq!(
        listed(
            &server,
            &["--detail", "driver=Sam", "--data-source", "Car1"]
        )
        .await,
        [a2.as_str()]
    );
    assert_eq!(
        listed(&server, &["--live"]).await,
        [a2.as_str(), c1.as_str()]
    );
    assert_eq!(
        listed(&server, &["--complete"]).await,
        [a1.as_str(), b1.as_str()]
    );
    assert_eq!(
        listed(&server, &["--complete", "--data-source", "Car2"]).await,
        [b1.as_str()]
    );

    // after is inclusive, before exclusive.
    let ended = |after: &'static str, before: &'static str| {
        let server = &server;
        async move {
            let mut args = Vec::new();
            if !after.is_empty() {
                args.extend(["--ended-after", after]);
            }
            if !before.is_empty() {
                args.extend(["--ended-before", before]);
            }
            listed(server, &args).await
        }
    };
    assert_eq!(
        ended("2099-01-01T00:00:00Z", "").await,
        [a1.as_str(), b1.as_str()]
    );
    assert_eq!(
        ended("2099-01-01T00:00:00.000000001Z", "").await,
        [b1.as_str()]
    );
    assert_eq!(ended("", "2099-06-01T00:00:00Z").await, [a1.as_str()]);
    assert!(ended("", "2099-01-01T00:00:00Z").await.is_empty());
    assert_eq!(
        ended("2099-01-01T02:00:00+02:00", "2099-06-01T00:00:00.1Z").await,
        [a1.as_str(), b1.as_str()]
    );

    let all = json(&pitwall(&server, &["--output", "json", "list"]).await);
    let a2_created = all[2]["creation_time"].as_str().unwrap().to_owned();
    assert_eq!(
        listed(&server, &["--created-after", &a2_created]).await,
        [a2.as_str(), c1.as_str()]
    );
    assert_eq!(
        listed(&server, &["--created-before", &a2_created]).await,
        [a1.as_str(), b1.as_str()]
    );
    assert_eq!(
        listed(
            &server,
            &[
                "--created-after",
                &a2_created,
                "--created-before",
                &a2_created
            ]
        )
        .await,
        Vec::<String>::new()
    );

    // JSON carries the whole session.
    assert_eq!(all[1]["data_source"], "Car2");
    assert_eq!(all[1]["identifier"], "FP2");
    assert_eq!(all[1]["details"]["lap"], "3");
    assert_eq!(all[1]["is_complete"], true);
    assert_eq!(all[1]["termination_time"], "2099-06-01T00:00:00Z");
    assert_eq!(all[3]["is_complete"], false);
    assert!(all[3]["termination_time"].is_null());

    let header_only = stdout(&pitwall(&server, &["list", "--identifier", "nothing*"]).await);
    assert_eq!(header_only.lines().count(), 1, "{header_only}");
}

#[tokio::test]
async fn list_takes_times_in_rfc_3339_only() {
    let server = TestServer::start().await;
    let output = pitwall(&server, &["list", "--created-after", "yesterday"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("'yesterday' is not an RFC 3339 time"),
        "{}",
        stderr(&output)
    );
    let output = pitwall(&server, &["list", "--live", "--complete"]).await;
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test]
async fn tree_shows_associates_and_parents_indented_with_unknown_and_cycle_nodes() {
    let server = TestServer::start().await;
    let grandchild = created(&server, &["--data-source", "ds", "--identifier", "G"]).await;
    let first = created(
        &server,
        &[
            "--data-source",
            "ds",
            "--identifier",
            "C1",
            "--associate",
            &grandchild,
        ],
    )
    .await;
    let second = created(
        &server,
        &[
            "--data-source",
            "ds2",
            "--identifier",
            "C2",
            "--associate",
            "never-created",
        ],
    )
    .await;
    let parent = created(
        &server,
        &[
            "--data-source",
            "ds",
            "--identifier",
            "P",
            "--associate",
            &first,
            "--associate",
            &second,
        ],
    )
    .await;
    assert!(pitwall(&server, &["end", &second]).await.status.success());

    let tree = pitwall(&server, &["tree", &parent]).await;
    assert!(tree.status.success(), "{}", stderr(&tree));
    assert_eq!(
        stdout(&tree),
        format!(
            "{parent}  P (ds, live)\n\
             associates:\n\
             \x20 {first}  C1 (ds, live)\n\
             \x20   {grandchild}  G (ds, live)\n\
             \x20 {second}  C2 (ds2, complete)\n\
             \x20   never-created  (unknown)\n\
             parents: none\n"
        )
    );

    let up = stdout(&pitwall(&server, &["tree", &grandchild]).await);
    assert_eq!(
        up,
        format!(
            "{grandchild}  G (ds, live)\n\
             associates: none\n\
             parents:\n\
             \x20 {first}  C1 (ds, live)\n\
             \x20   {parent}  P (ds, live)\n"
        )
    );
    let shallow = stdout(&pitwall(&server, &["tree", &grandchild, "--depth", "1"]).await);
    assert_eq!(
        shallow,
        format!(
            "{grandchild}  G (ds, live)\n\
             associates: none\n\
             parents:\n\
             \x20 {first}  C1 (ds, live)\n"
        )
    );

    let as_json = json(&pitwall(&server, &["--output", "json", "tree", &parent]).await);
    assert_eq!(as_json["session_key"], parent.as_str());
    assert_eq!(as_json["session"]["identifier"], "P");
    assert_eq!(as_json["cycle"], false);
    assert_eq!(as_json["parents"], Value::Array(vec![]));
    let children = as_json["children"].as_array().unwrap();
    assert_eq!(children.len(), 2);
    assert_eq!(children[0]["session_key"], first.as_str());
    assert_eq!(children[0]["session"]["data_source"], "ds");
    assert_eq!(
        children[0]["children"][0]["session_key"],
        grandchild.as_str()
    );
    assert_eq!(children[0]["children"][0]["session"]["identifier"], "G");
    assert_eq!(children[1]["session"]["is_complete"], true);
    assert_eq!(children[1]["children"][0]["session_key"], "never-created");
    assert!(children[1]["children"][0]["session"].is_null());

    // A loop of associates is shown once, then marked.
    let x = created(&server, &["--data-source", "ds", "--identifier", "X"]).await;
    let y = created(
        &server,
        &[
            "--data-source",
            "ds",
            "--identifier",
            "Y",
            "--associate",
            &x,
        ],
    )
    .await;
    assert!(
        pitwall(&server, &["associate", &x, &y])
            .await
            .status
            .success()
    );
    assert_eq!(
        stdout(&pitwall(&server, &["tree", &x]).await),
        format!(
            "{x}  X (ds, live)\n\
             associates:\n\
             \x20 {y}  Y (ds, live)\n\
             \x20   {x}  (cycle)\n\
             parents:\n\
             \x20 {y}  Y (ds, live)\n\
             \x20   {x}  (cycle)\n"
        )
    );
    let looped = json(&pitwall(&server, &["--output", "json", "tree", &x]).await);
    assert_eq!(looped["children"][0]["children"][0]["cycle"], true);
}

#[tokio::test]
async fn tree_of_an_unknown_session_prints_the_servers_reason_and_exits_1() {
    let server = TestServer::start().await;
    let output = pitwall(&server, &["tree", "no-such-session"]).await;
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.starts_with("pitwall: "), "{message}");
    assert!(message.contains("no-such-session"), "{message}");
    assert!(!message.contains("NotFound"), "{message}");
    assert!(stdout(&output).is_empty());
}

type Lines<R> = tokio::io::Lines<BufReader<R>>;

/// A running `pitwall session watch` on the session feed.
struct FeedWatch {
    child: tokio::process::Child,
    lines: Lines<tokio::process::ChildStdout>,
    errors: Lines<tokio::process::ChildStderr>,
}

/// Starts `pitwall session --output FORMAT watch ARGS…` and waits until it has subscribed.
async fn feed_watch(server: &TestServer, format: &str, args: &[&str]) -> FeedWatch {
    feed_watch_at(&server.grpc_url(), format, args).await
}

/// [`feed_watch`] on the server at `url`.
async fn feed_watch_at(url: &str, format: &str, args: &[&str]) -> FeedWatch {
    let mut child = Command::new(binary())
        .args(["session", "--server", url, "--output", format])
        .arg("watch")
        .args(args)
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
        .expect("watch ended before it subscribed");
    assert!(line.starts_with("watching "), "{line}");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    FeedWatch {
        child,
        lines,
        errors,
    }
}

impl FeedWatch {
    async fn line(&mut self) -> String {
        next_line(&mut self.lines).await
    }

    /// The next table line as (sequence, kind, key, data source, identifier).
    async fn event(&mut self) -> (u64, String, String, String, String) {
        let line = self.line().await;
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!((4..=5).contains(&fields.len()), "{line}");
        (
            fields[0].parse().unwrap(),
            fields[1].to_owned(),
            fields[2].to_owned(),
            fields[3].to_owned(),
            fields.get(4).copied().unwrap_or_default().to_owned(),
        )
    }

    /// Ctrl-C: the watch stops with exit code 0.
    async fn interrupt(mut self) {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        let status = timeout(PATIENCE, self.child.wait()).await.unwrap().unwrap();
        assert_eq!(status.code(), Some(0));
    }
}

#[tokio::test]
async fn watch_all_prints_every_change_of_every_data_source_as_it_happens() {
    let server = TestServer::start().await;
    let mut watch = feed_watch(&server, "table", &["--all"]).await;
    let key = created(&server, &["--data-source", "Car1", "--identifier", "FP1"]).await;
    assert!(
        pitwall(&server, &["update", &key, "--detail", "lap=3"])
            .await
            .status
            .success()
    );
    assert!(pitwall(&server, &["end", &key]).await.status.success());
    let other = created(&server, &["--data-source", "Car2", "--identifier", "Q1"]).await;

    let started = watch.event().await;
    let updated = watch.event().await;
    let ended = watch.event().await;
    let second = watch.event().await;
    let car1 = |kind: &str| {
        (
            kind.to_owned(),
            key.clone(),
            "Car1".to_owned(),
            "FP1".to_owned(),
        )
    };
    let rest = |e: &(u64, String, String, String, String)| {
        (e.1.clone(), e.2.clone(), e.3.clone(), e.4.clone())
    };
    assert_eq!(rest(&started), car1("STARTED"));
    assert_eq!(rest(&updated), car1("UPDATED"));
    assert_eq!(rest(&ended), car1("ENDED"));
    assert_eq!(
        rest(&second),
        ("STARTED".into(), other, "Car2".into(), "Q1".into())
    );
    assert!(started.0 > 0);
    assert!(started.0 < updated.0 && updated.0 < ended.0 && ended.0 < second.0);
    watch.interrupt().await;
}

#[tokio::test]
async fn watch_all_in_json_prints_one_change_per_line_with_the_session() {
    let server = TestServer::start().await;
    let mut watch = feed_watch(&server, "json", &["--all", "--from", "0"]).await;
    let key = created(
        &server,
        &[
            "--data-source",
            "Car1",
            "--identifier",
            "FP1",
            "--detail",
            "driver=Alex",
        ],
    )
    .await;
    assert!(
        pitwall(&server, &["end", &key, "--at", "2099-01-01T00:00:00Z"])
            .await
            .status
            .success()
    );
    let started: Value = serde_json::from_str(&watch.line().await).unwrap();
    assert!(started["sequence"].as_u64().unwrap() > 0);
    assert_eq!(started["kind"], "STARTED");
    assert_eq!(started["session_key"], key.as_str());
    assert_eq!(started["data_source"], "Car1");
    assert!(started["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(started["session"]["identifier"], "FP1");
    assert_eq!(started["session"]["details"]["driver"], "Alex");
    assert_eq!(started["session"]["is_complete"], false);
    let ended: Value = serde_json::from_str(&watch.line().await).unwrap();
    assert_eq!(ended["kind"], "ENDED");
    assert!(ended["sequence"].as_u64() > started["sequence"].as_u64());
    assert_eq!(ended["session"]["is_complete"], true);
    assert_eq!(ended["session"]["termination_time"], "2099-01-01T00:00:00Z");
    watch.interrupt().await;
}

#[tokio::test]
async fn watch_from_a_sequence_replays_the_later_changes_then_follows() {
    let server = TestServer::start().await;
    // Learn two sequences from a live watch.
    let mut live = feed_watch(&server, "table", &["--all"]).await;
    let first = created(&server, &["--data-source", "Car1", "--identifier", "FP1"]).await;
    let second = created(&server, &["--data-source", "Car2"]).await;
    let (first_sequence, _, key, ..) = live.event().await;
    assert_eq!(key, first);
    let (second_sequence, _, key, ..) = live.event().await;
    assert_eq!(key, second);
    live.interrupt().await;
    assert!(pitwall(&server, &["end", &first]).await.status.success());
    assert!(
        pitwall(&server, &["update", &second, "--identifier", "Q2"])
            .await
            .status
            .success()
    );

    let from = first_sequence.to_string();
    let mut replay = feed_watch(&server, "table", &["--all", "--from", &from]).await;
    let kinds = |e: (u64, String, String, String, String)| (e.1, e.2, e.3);
    let started = replay.event().await;
    assert_eq!(started.0, second_sequence);
    assert_eq!(
        kinds(started),
        ("STARTED".into(), second.clone(), "Car2".into())
    );
    let ended = replay.event().await;
    assert!(ended.0 > second_sequence);
    assert_eq!(kinds(ended), ("ENDED".into(), first.clone(), "Car1".into()));
    let updated = replay.event().await;
    assert_eq!(updated.4, "Q2");
    assert_eq!(
        kinds(updated),
        ("UPDATED".into(), second.clone(), "Car2".into())
    );
    // Then it follows.
    let third = created(&server, &["--data-source", "Car1"]).await;
    assert_eq!(
        kinds(replay.event().await),
        ("STARTED".into(), third.clone(), "Car1".into())
    );
    replay.interrupt().await;

    // One data source only.
    let mut car2 = feed_watch(
        &server,
        "table",
        &["--data-source", "Car2", "--from", &from],
    )
    .await;
    assert_eq!(car2.event().await.2, second);
    let updated = car2.event().await;
    assert_eq!(
        (updated.1.as_str(), updated.2.as_str()),
        ("UPDATED", second.as_str())
    );
    created(&server, &["--data-source", "Car1"]).await;
    let fourth = created(&server, &["--data-source", "Car2"]).await;
    assert_eq!(
        kinds(car2.event().await),
        ("STARTED".into(), fourth, "Car2".into())
    );
    car2.interrupt().await;
}

#[tokio::test]
async fn watch_needs_a_data_source_or_all_but_not_both() {
    let server = TestServer::start().await;
    for args in [
        &["watch"][..],
        &["watch", "--all", "--data-source", "ds"],
        &["watch", "--all", "--from", "soon"],
    ] {
        let output = pitwall(&server, args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&output).starts_with("error: "),
            "{}",
            stderr(&output)
        );
    }
}

#[tokio::test]
async fn watch_all_ends_cleanly_when_the_server_shuts_down() {
    let mut server = TestServer::start().await;
    // Without reconnecting: the end of the stream is the end of the watch.
    let mut watch = feed_watch(&server, "table", &["--all", "--reconnect-seconds", "0"]).await;
    server.stop().await;
    assert_eq!(
        timeout(PATIENCE, watch.lines.next_line())
            .await
            .unwrap()
            .unwrap(),
        None
    );
    let status = timeout(PATIENCE, watch.child.wait())
        .await
        .unwrap()
        .unwrap();
    let errors = timeout(PATIENCE, watch.errors.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{errors:?}");
}

#[tokio::test]
async fn watch_from_a_sequence_no_longer_kept_prints_the_servers_reason_and_exits_1() {
    let server = TestServer::start_with(|c| c.feed_window.max_events = 2).await;
    let mut live = feed_watch(&server, "table", &["--all"]).await;
    let mut keys = Vec::new();
    for _ in 0..4 {
        keys.push(created(&server, &["--data-source", "ds"]).await);
    }
    let mut sequences = Vec::new();
    for key in &keys {
        let (sequence, kind, seen, ..) = live.event().await;
        assert_eq!((kind.as_str(), &seen), ("STARTED", key));
        sequences.push(sequence);
    }
    live.interrupt().await;

    let from = sequences[0].to_string();
    let output = pitwall(&server, &["watch", "--all", "--from", &from]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.starts_with("pitwall: history before sequence "),
        "{message}"
    );
    assert!(message.contains("no longer kept"), "{message}");
    assert!(stdout(&output).is_empty());

    // The last two are still kept.
    let from = sequences[1].to_string();
    let mut kept = feed_watch(&server, "table", &["--all", "--from", &from]).await;
    assert_eq!(kept.event().await.2, keys[2]);
    assert_eq!(kept.event().await.2, keys[3]);
    kept.interrupt().await;
}

#[tokio::test]
async fn watch_resumes_by_itself_after_the_server_cuts_it_off() {
    let server = TestServer::start_with(|c| c.subscriber_queue = 2).await;
    let mut watch = feed_watch(&server, "table", &["--all"]).await;
    let pid = watch.child.id().unwrap().to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    // A stopped watch reads nothing: once the transport's buffers are full, the server's queue
    // for it fills too and the server cuts it off. Large sessions get there sooner.
    signal("-STOP");
    let mut client = server.client().await;
    let blob = "x".repeat(60_000);
    let mut keys = Vec::new();
    let cut_off = r#"pitwall_feed_watchers_cut_off_total"#;
    while metric_value(&server.metrics().await, cut_off).unwrap_or(0.0) < 1.0 {
        assert!(keys.len() < 3000, "the stopped watch was never cut off");
        for _ in 0..10 {
            let response = client
                .create_session(pitwall_proto::api::CreateSessionRequest {
                    data_source: "ds".into(),
                    details: [("blob".to_owned(), blob.clone())].into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(response.success);
            keys.push(response.session_key);
        }
    }
    // Changes after the cut-off are not lost either.
    keys.push(create(&mut client, "ds").await);
    signal("-CONT");

    let mut last = 0;
    for key in &keys {
        let (sequence, kind, seen, ..) = watch.event().await;
        assert_eq!((kind.as_str(), &seen), ("STARTED", key));
        assert!(sequence > last, "{sequence} after {last}");
        last = sequence;
    }
    let notice = timeout(PATIENCE, watch.errors.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        notice.starts_with("pitwall: the server cut this watch off (")
            && notice.contains("resuming after sequence"),
        "{notice}"
    );
    // Still following.
    let after = create(&mut client, "other").await;
    assert_eq!(watch.event().await.2, after);
    watch.interrupt().await;
}

#[tokio::test]
async fn watch_shows_sessions_purged_by_retention() {
    let retention = std::time::Duration::from_millis(200);
    let server = TestServer::start_manual(|c| c.retention = Some(retention)).await;
    let mut watch = feed_watch(&server, "table", &["--all"]).await;
    let key = created(&server, &["--data-source", "ds", "--identifier", "FP1"]).await;
    assert!(pitwall(&server, &["end", &key]).await.status.success());
    server.advance(retention);
    let kinds = [
        watch.event().await,
        watch.event().await,
        watch.event().await,
    ]
    .map(|(_, kind, seen, data_source, identifier)| (kind, seen, data_source, identifier));
    let expect = |kind: &str| {
        (
            kind.to_owned(),
            key.clone(),
            "ds".to_owned(),
            "FP1".to_owned(),
        )
    };
    assert_eq!(
        kinds,
        [expect("STARTED"), expect("ENDED"), expect("PURGED")]
    );
    watch.interrupt().await;
}

#[tokio::test]
async fn watch_all_resumes_across_server_restarts_printing_every_change_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(dir.path(), &[]).await;
    let url = first.grpc_url();
    let port = first.grpc_addr.clone();
    let mut watch = feed_watch_at(&url, "table", &["--all"]).await;
    let mut client = connect(&url).await;
    let mut keys = vec![
        create(&mut client, "Car1").await,
        create(&mut client, "Car2").await,
    ];
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(watch.event().await);
    }

    // Graceful: SIGTERM, then the same data directory and port.
    let mut first = first;
    first.signal("TERM");
    assert_eq!(
        timeout(PATIENCE, first.child.wait())
            .await
            .unwrap()
            .unwrap()
            .code(),
        Some(0)
    );
    let mut second = ServerProcess::start(dir.path(), &["--listen", &port]).await;
    let mut client = connect(&url).await;
    keys.push(create(&mut client, "Car1").await);
    keys.push(create(&mut client, "Car3").await);
    for _ in 0..2 {
        seen.push(watch.event().await);
    }

    // Abrupt: kill -9.
    second.signal("KILL");
    timeout(PATIENCE, second.child.wait())
        .await
        .unwrap()
        .unwrap();
    let third = ServerProcess::start(dir.path(), &["--listen", &port]).await;
    let mut client = connect(&third.grpc_url()).await;
    keys.push(create(&mut client, "Car2").await);
    seen.push(watch.event().await);

    let printed: Vec<String> = seen.iter().map(|e| e.2.clone()).collect();
    assert_eq!(printed, keys);
    assert!(seen.iter().all(|e| e.1 == "STARTED"), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");

    let mut notices = Vec::new();
    while notices.len() < 2 {
        let line = timeout(PATIENCE, watch.errors.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("the watch ended");
        if line.contains("resuming after sequence") {
            notices.push(line);
        }
    }
    assert!(notices[0].contains("ended the watch"), "{notices:?}");
    assert!(notices[1].contains("lost the connection"), "{notices:?}");
    let mut lines = watch.lines;
    let pid = watch.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = timeout(PATIENCE, watch.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // Nothing printed twice after the last change.
    assert_eq!(
        timeout(PATIENCE, lines.next_line()).await.unwrap().unwrap(),
        None
    );
}

/// Writes one data packet through the Stream API.
async fn write_packet(server: &TestServer, stream: &str, session_key: &str, kind: &str) {
    let (mut writer, _, _) = server.data_plane().await;
    let packet = pitwall_proto::open_data::Packet {
        r#type: kind.into(),
        session_key: session_key.into(),
        content: b"abc".to_vec(),
        ..Default::default()
    };
    writer
        .write_data_packet(WriteDataPacketRequest {
            detail: Some(DataPacketDetails::new(&packet, "Car1", stream, session_key)),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn packets_tail_prints_a_data_sources_packets_and_connections_list_shows_its_connection() {
    let server = TestServer::start_with(|c| {
        c.store = pitwall_server::config::StoreConfig::Embedded;
        c.stream_layout = pitwall_server::config::StreamLayout::TopicBased;
    })
    .await;
    write_packet(&server, "", "s1", "Before").await;
    let mut child = Command::new(binary())
        .args([
            "packets",
            "--server",
            &server.grpc_url(),
            "--output",
            "json",
        ])
        .args([
            "tail",
            "--data-source",
            "Car1",
            "--stream",
            "laps",
            "--from-start",
        ])
        .env_remove("PITWALL_SERVER")
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
        .expect("tail ended before it followed");
    assert!(line.starts_with("following the packets"), "{line}");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    write_packet(&server, "laps", "s1", "Lap").await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let value: Value = serde_json::from_str(&next_line(&mut lines).await).unwrap();
        seen.push((
            value["stream"].as_str().unwrap().to_owned(),
            value["type"].as_str().unwrap().to_owned(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            (String::new(), "Before".to_owned()),
            ("laps".to_owned(), "Lap".to_owned())
        ]
    );

    let listed = Command::new(binary())
        .args(["connections", "--server", &server.grpc_url(), "list"])
        .env_remove("PITWALL_SERVER")
        .output()
        .await
        .unwrap();
    assert!(listed.status.success(), "{}", stderr(&listed));
    let table = stdout(&listed);
    assert!(table.lines().next().unwrap().starts_with("id"), "{table}");
    assert!(
        table.contains("Car1") && table.contains("laps@0"),
        "{table}"
    );

    // Ctrl-C closes the connection the tail opened.
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = timeout(PATIENCE, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    let after = Command::new(binary())
        .args([
            "connections",
            "--server",
            &server.grpc_url(),
            "--output",
            "json",
            "list",
        ])
        .env_remove("PITWALL_SERVER")
        .output()
        .await
        .unwrap();
    assert_eq!(stdout(&after), "");
}

/// Runs `pitwall packets --server URL ARGS…`.
async fn packets(server: &TestServer, args: &[&str]) -> Output {
    Command::new(binary())
        .args(["packets", "--server", &server.grpc_url()])
        .args(args)
        .env_remove("PITWALL_SERVER")
        .output()
        .await
        .unwrap()
}

/// The packets the server holds for a session, by stream, as its telemetry panel shows them.
async fn packets_held(server: &TestServer, session: &str) -> Vec<(String, u64)> {
    let (status, body) = server
        .http(&format!("/api/telemetry?session_key={session}"))
        .await;
    assert_eq!(status, 200, "{body}");
    let streams: Value = serde_json::from_str(&body).unwrap();
    streams["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stream"].as_str().unwrap().to_owned(),
                s["packets"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn packets_send_writes_a_sessions_packets_and_prints_how_many_were_acknowledged() {
    let server = TestServer::start_with(|c| {
        c.store = pitwall_server::config::StoreConfig::Embedded;
    })
    .await;
    let session = created(&server, &["--data-source", "Car1"]).await;
    let sent = packets(
        &server,
        &[
            "--output",
            "json",
            "send",
            "--data-source",
            "Car1",
            "--session",
            &session,
            "--stream",
            "laps",
            "--count",
            "2500",
        ],
    )
    .await;
    assert!(sent.status.success(), "{}", stderr(&sent));
    let printed = json(&sent);
    assert_eq!(printed["acknowledged"], 2500);
    assert_eq!(printed["stream"], "laps");
    let paced = packets(
        &server,
        &[
            "send",
            "--data-source",
            "Car1",
            "--session",
            &session,
            "--count",
            "3",
            "--rate",
            "1000",
        ],
    )
    .await;
    assert!(paced.status.success(), "{}", stderr(&paced));
    assert_eq!(stdout(&paced), "3 packets acknowledged\n");

    assert_eq!(
        packets_held(&server, &session).await,
        [(String::new(), 3), ("laps".to_owned(), 2500)]
    );

    let refused = packets(&server, &["send", "--data-source", "a b", "--count", "5"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(stdout(&refused), "0 packets acknowledged\n");
    assert!(
        stderr(&refused).contains("contains a space"),
        "{}",
        stderr(&refused)
    );
    let bad_rate = packets(&server, &["send", "--data-source", "Car1", "--rate", "0"]).await;
    assert_eq!(bad_rate.status.code(), Some(2));
    assert!(
        stderr(&bad_rate).contains("is not a rate"),
        "{}",
        stderr(&bad_rate)
    );
}

/// Ctrl-C while a call is in flight lets that call finish: the count printed is every packet the
/// server holds, not one call short of it.
#[tokio::test]
async fn packets_send_stopped_by_ctrl_c_prints_every_packet_the_server_holds() {
    let server = TestServer::start_with(|c| {
        c.store = pitwall_server::config::StoreConfig::Embedded;
    })
    .await;
    let session = created(&server, &["--data-source", "Car1"]).await;
    let mut read = read_connection(
        &server.grpc_url(),
        ConnectionDetails {
            data_source: "Car1".into(),
            ..Default::default()
        },
    )
    .await;
    // As fast as the server takes them: a call of a thousand packets is nearly always in flight.
    let sender = Command::new(binary())
        .args(["packets", "--server", &server.grpc_url()])
        .args(["send", "--data-source", "Car1", "--session", &session])
        .args(["--count", "100000000"])
        .env_remove("PITWALL_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    timeout(PATIENCE, read.message())
        .await
        .expect("no packet was written")
        .unwrap()
        .expect("the read ended");
    std::process::Command::new("kill")
        .args(["-INT", &sender.id().unwrap().to_string()])
        .status()
        .unwrap();
    let sent = timeout(PATIENCE, sender.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sent.status.code(), Some(0), "{}", stderr(&sent));
    let printed = stdout(&sent);
    let acknowledged: u64 = printed
        .strip_suffix(" packets acknowledged\n")
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("{printed}"));
    assert!(acknowledged > 0, "{printed}");
    assert_eq!(
        packets_held(&server, &session).await,
        [(String::new(), acknowledged)]
    );
}
