//! The live session board on the admin port, over real HTTP on loopback: its page, its
//! listing and tree, a session's telemetry, and its event stream (resume with `Last-Event-ID`,
//! history no longer kept, a reader that stops reading, shutdown), and access with tokens.
//! What a user sees in a browser is tested in `tests/browser`.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use std::time::Duration;

use pitwall_proto::api::{DataPacketDetails, UpdateSessionDetailsRequest, WriteDataPacketsRequest};
use pitwall_proto::open_data::Packet;
use support::*;

async fn update(client: &mut Client, session_key: &str, key: &str, value: &str) {
    let response = client
        .update_session_details(UpdateSessionDetailsRequest {
            session_key: session_key.into(),
            details: BTreeMap::from([(key.to_owned(), value.to_owned())]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.success);
}

async fn get(server: &TestServer, path: &str) -> HttpAnswer {
    http_request(server.metrics_addr(), "GET", path, &[], "").await
}

/// The event stream after `sequence`, as a board opens it after a listing.
async fn events_after(server: &TestServer, sequence: u64) -> SseStream {
    let path = format!("/api/events?after={sequence}");
    let stream = SseStream::open(server.metrics_addr(), &path, &[]).await;
    assert_eq!(stream.status, 200);
    stream
}

fn keys(sessions: &serde_json::Value) -> Vec<String> {
    sessions
        .as_array()
        .expect("a list of sessions")
        .iter()
        .map(|s| s["session_key"].as_str().unwrap().to_owned())
        .collect()
}

/// The events of `change` messages, with their flags, until `count` events have come.
async fn changes(stream: &mut SseStream, count: usize) -> Vec<(u64, serde_json::Value, bool)> {
    let mut events = Vec::new();
    while events.len() < count {
        let message = stream.next().await.expect("the stream ended early");
        if message.event != "change" {
            continue;
        }
        let change = message.json();
        let sequence = change["sequence"].as_u64().unwrap();
        assert_eq!(
            message.id,
            Some(sequence.to_string()),
            "the id is the sequence"
        );
        for (event, matching) in change["events"]
            .as_array()
            .unwrap()
            .iter()
            .zip(change["matching"].as_array().unwrap())
        {
            events.push((sequence, event.clone(), matching.as_bool().unwrap()));
        }
    }
    events
}

#[tokio::test]
async fn the_page_and_its_assets_come_from_the_binary() {
    let server = TestServer::start().await;
    let page = get(&server, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        page.body.contains(r#"<script src="/board/board.js""#),
        "{}",
        page.body
    );
    let policy = page.header("content-security-policy").unwrap();
    assert!(
        policy.contains("script-src 'self'") && !policy.contains("unsafe"),
        "{policy}"
    );
    for (path, content_type) in [
        ("/board/board.js", "text/javascript; charset=utf-8"),
        ("/board/board.css", "text/css; charset=utf-8"),
        ("/board/icon.svg", "image/svg+xml"),
    ] {
        let asset = get(&server, path).await;
        assert_eq!(asset.status, 200, "{path}");
        assert_eq!(asset.header("content-type"), Some(content_type), "{path}");
        // The SVG namespace is a name, not an address anything is loaded from.
        let body = asset
            .body
            .replace(r#"xmlns="http://www.w3.org/2000/svg""#, "");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path} must load nothing from elsewhere"
        );
    }
}

#[tokio::test]
async fn a_listing_gives_counts_live_sessions_latest_ends_and_its_sequence() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let fp1 = create_with(&mut client, "Car1", "FP1", &[("driver", "Alex")], &[]).await;
    let q1 = create_with(&mut client, "Car1", "Q1", &[("driver", "Alex")], &[]).await;
    let fp2 = create_with(&mut client, "Car2", "FP2", &[("driver", "Sam")], &[]).await;
    let race = create_with(&mut client, "Car2", "Race", &[], &[]).await;
    end(&mut client, &q1).await;
    end(&mut client, &race).await;

    let all = get(&server, "/api/board").await;
    assert_eq!(all.status, 200, "{}", all.body);
    let all = all.json();
    assert_eq!(
        all["data_sources"],
        serde_json::json!([
            {"data_source": "Car1", "live": 1, "completed": 1},
            {"data_source": "Car2", "live": 1, "completed": 1},
        ])
    );
    assert_eq!(keys(&all["live"]), [fp1.clone(), fp2.clone()]);
    assert_eq!(
        keys(&all["ended"]),
        [race.clone(), q1.clone()],
        "the latest end first"
    );
    assert_eq!(all["live"][0]["details"]["driver"], "Alex");
    assert!(all["sequence"].as_u64().unwrap() > 0);

    let filtered = get(
        &server,
        "/api/board?data_source=Car1&identifier=F*&detail=driver%3DAlex",
    )
    .await
    .json();
    assert_eq!(keys(&filtered["live"]), [fp1]);
    assert!(keys(&filtered["ended"]).is_empty());
    assert_eq!(
        filtered["data_sources"], all["data_sources"],
        "counts cover every data source whatever the filter"
    );
    let only_one_end = get(&server, "/api/board?ended=1").await.json();
    assert_eq!(keys(&only_one_end["ended"]), [race]);

    let bad = get(&server, "/api/board?identifier=FP%5B").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap()
            .contains("identifier_glob"),
        "{}",
        bad.body
    );
    let bad = get(&server, "/api/board?detail=driver").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("key=value"), "{}", bad.body);
}

#[tokio::test]
async fn the_tree_shows_associates_and_parents() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let child = create_with(&mut client, "Car1", "stint", &[], &[]).await;
    let root = create_with(&mut client, "Car1", "race", &[], &[&child]).await;
    let parent = create_with(&mut client, "Rig1", "replay", &[], &[&root]).await;

    let tree = get(&server, &format!("/api/tree?session_key={root}")).await;
    assert_eq!(tree.status, 200, "{}", tree.body);
    let tree = tree.json();
    assert_eq!(tree["root"]["session"]["identifier"], "race");
    assert_eq!(tree["root"]["children"][0]["session_key"], child.as_str());
    assert_eq!(tree["root"]["parents"][0]["session_key"], parent.as_str());
    assert_eq!(tree["root"]["parents"][0]["session"]["data_source"], "Rig1");

    let unknown = get(&server, "/api/tree?session_key=nobody").await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.body.contains("not found"), "{}", unknown.body);
    assert_eq!(get(&server, "/api/tree").await.status, 400);
}

/// Writes `count` packets of `session_key` to a stream of Car1 in one `WriteDataPackets` call;
/// returns their bytes.
async fn write_packets(server: &TestServer, session_key: &str, stream: &str, count: u64) -> u64 {
    let (mut writer, _, _) = server.data_plane().await;
    let details: Vec<DataPacketDetails> = (0..count)
        .map(|id| {
            let packet = Packet {
                r#type: "PeriodicData".into(),
                session_key: session_key.into(),
                content: vec![7; 10 + id as usize],
                id,
                ..Default::default()
            };
            DataPacketDetails::new(&packet, "Car1", stream, session_key)
        })
        .collect();
    let bytes = details
        .iter()
        .map(|detail| detail.message.as_ref().map_or(0, |m| m.len() as u64))
        .sum();
    writer
        .write_data_packets(futures::stream::iter([WriteDataPacketsRequest { details }]))
        .await
        .unwrap();
    bytes
}

/// (stream, packets, bytes, packets per second) of a session's telemetry.
async fn telemetry(server: &TestServer, session_key: &str) -> Vec<(String, u64, u64, f64)> {
    let answer = get(server, &format!("/api/telemetry?session_key={session_key}")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()["streams"]
        .as_array()
        .expect("a list of streams")
        .iter()
        .map(|stream| {
            (
                stream["stream"].as_str().unwrap().to_owned(),
                stream["packets"].as_u64().unwrap(),
                stream["bytes"].as_u64().unwrap(),
                stream["packets_per_second"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn telemetry_counts_each_stream_of_a_session_and_its_rate_by_the_servers_clock() {
    let server = TestServer::start_manual(|c| {
        c.store = pitwall_server::config::StoreConfig::Embedded;
    })
    .await;
    let mut client = server.client().await;
    let session = create(&mut client, "Car1").await;
    let other = create(&mut client, "Car1").await;
    assert_eq!(
        telemetry(&server, &session).await,
        [],
        "nothing written yet"
    );

    let main_bytes = write_packets(&server, &session, "", 30).await;
    let lap_bytes = write_packets(&server, &session, "laps", 12).await;
    write_packets(&server, &other, "laps", 5).await;
    assert_eq!(
        telemetry(&server, &session).await,
        [
            (String::new(), 30, main_bytes, 0.0),
            ("laps".to_owned(), 12, lap_bytes, 0.0)
        ],
        "counted at once; no whole second has passed for a rate"
    );

    server.advance(Duration::from_secs(1));
    let more_lap_bytes = write_packets(&server, &session, "laps", 10).await;
    assert_eq!(
        telemetry(&server, &session).await,
        [
            (String::new(), 30, main_bytes, 30.0),
            ("laps".to_owned(), 22, lap_bytes + more_lap_bytes, 12.0)
        ]
    );
    server.advance(Duration::from_secs(1));
    let rates: Vec<f64> = telemetry(&server, &session)
        .await
        .iter()
        .map(|stream| stream.3)
        .collect();
    assert_eq!(rates, [15.0, 11.0], "packets over the two whole seconds");
    let writing = get(&server, "/api/rates").await;
    assert_eq!(writing.status, 200, "{}", writing.body);
    assert_eq!(
        writing.json()["sessions"],
        serde_json::json!({ session.as_str(): 26.0, other.as_str(): 2.5 }),
        "each session's streams together, for the live table"
    );
    server.advance(Duration::from_secs(60));
    let rates: Vec<f64> = telemetry(&server, &session)
        .await
        .iter()
        .map(|stream| stream.3)
        .collect();
    assert_eq!(rates, [0.0, 0.0], "the writers stopped");
    assert_eq!(telemetry(&server, &other).await[0].1, 5);
    assert_eq!(
        get(&server, "/api/rates").await.json()["sessions"],
        serde_json::json!({}),
        "no session is writing"
    );

    let answer = get(&server, &format!("/api/telemetry?session_key={session}")).await;
    assert_eq!(answer.json()["live"], true);
    end(&mut client, &session).await;
    let answer = get(&server, &format!("/api/telemetry?session_key={session}")).await;
    assert_eq!(answer.json()["live"], false, "the page stops polling");
}

#[tokio::test]
async fn telemetry_of_an_unknown_or_missing_session_key_is_refused_with_a_reason() {
    let server = TestServer::start().await;
    let unknown = get(&server, "/api/telemetry?session_key=nobody").await;
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.json()["error"]
            .as_str()
            .unwrap()
            .contains("'nobody' not found"),
        "{}",
        unknown.body
    );
    let long = "k".repeat(10_000);
    let refused = get(&server, &format!("/api/telemetry?session_key={long}")).await;
    assert_eq!(refused.status, 404);
    assert!(refused.body.len() < 500, "the key is echoed cut short");
    let missing = get(&server, "/api/telemetry").await;
    assert_eq!(missing.status, 400);
    assert!(
        missing.body.contains("session_key is missing"),
        "{}",
        missing.body
    );
}

#[tokio::test]
async fn the_stream_follows_on_from_a_listing_and_resumes_after_last_event_id() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let before = create(&mut client, "Car1").await;
    let listed = get(&server, "/api/board").await.json();
    let sequence = listed["sequence"].as_u64().unwrap();
    assert_eq!(keys(&listed["live"]), [before]);

    let mut stream = events_after(&server, sequence).await;
    assert_eq!(
        stream.headers.get("content-type").unwrap(),
        "text/event-stream"
    );
    let live = stream.next().await.unwrap();
    assert_eq!(live.event, "live");
    assert_eq!(
        live.id,
        Some(sequence.to_string()),
        "caught up at the listing"
    );

    let first = create(&mut client, "Car1").await;
    update(&mut client, &first, "lap", "2").await;
    let received = changes(&mut stream, 2).await;
    assert_eq!(received[0].1["kind"], "STARTED");
    assert_eq!(received[0].1["session_key"], first.as_str());
    assert_eq!(received[1].1["kind"], "UPDATED");
    assert_eq!(received[1].1["session"]["details"]["lap"], "2");
    assert!(received[0].0 > sequence && received[1].0 > received[0].0);
    let last_seen = received[1].0;
    drop(stream);

    // Meanwhile, while no board is connected:
    let missed = create(&mut client, "Car2").await;
    end(&mut client, &first).await;

    // A browser reconnecting sends the last id it saw; it wins over the URL's `after`.
    let mut resumed = SseStream::open(
        server.metrics_addr(),
        "/api/events?after=0",
        &[("last-event-id", &last_seen.to_string())],
    )
    .await;
    let replayed = changes(&mut resumed, 2).await;
    assert_eq!(
        replayed[0].1["session_key"],
        missed.as_str(),
        "nothing repeated"
    );
    assert!(replayed[0].0 > last_seen);
    assert_eq!(replayed[1].1["kind"], "ENDED");
    assert_eq!(resumed.next().await.unwrap().event, "live");
}

#[tokio::test]
async fn every_event_is_sent_and_the_ones_matching_the_filter_are_marked() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = SseStream::open(
        server.metrics_addr(),
        "/api/events?data_source=Car1&identifier=FP*",
        &[],
    )
    .await;
    assert_eq!(stream.next().await.unwrap().event, "live");
    create_with(&mut client, "Car1", "FP1", &[], &[]).await;
    create_with(&mut client, "Car2", "FP1", &[], &[]).await;
    create_with(&mut client, "Car1", "Q1", &[], &[]).await;
    let received = changes(&mut stream, 3).await;
    let flags: Vec<(&str, &str, bool)> = received
        .iter()
        .map(|(_, event, matching)| {
            let session = &event["session"];
            (
                session["data_source"].as_str().unwrap(),
                session["identifier"].as_str().unwrap(),
                *matching,
            )
        })
        .collect();
    assert_eq!(
        flags,
        [
            ("Car1", "FP1", true),
            ("Car2", "FP1", false),
            ("Car1", "Q1", false)
        ]
    );
}

#[tokio::test]
async fn a_resume_from_history_no_longer_kept_is_answered_compacted() {
    let server = TestServer::start_with(|c| c.feed_window.max_events = 5).await;
    let mut client = server.client().await;
    let listed = get(&server, "/api/board").await.json();
    let sequence = listed["sequence"].as_u64().unwrap();
    for _ in 0..20 {
        create(&mut client, "Car1").await;
    }
    let mut stream = events_after(&server, sequence).await;
    let compacted = stream.next().await.unwrap();
    assert_eq!(compacted.event, "compacted");
    let reason = compacted.json();
    assert!(
        reason["first_kept"].as_u64().unwrap() > sequence + 1,
        "{reason}"
    );
    assert!(
        reason["reason"]
            .as_str()
            .unwrap()
            .contains("list the sessions again"),
        "{reason}"
    );
    assert_eq!(stream.next().await, None, "and the stream ends");

    if kafka_broker().is_none() {
        // The embedded store knows every sequence it gave out.
        let newest = get(&server, "/api/board").await.json()["sequence"]
            .as_u64()
            .unwrap();
        let mut ahead = events_after(&server, newest + 100).await;
        assert_eq!(ahead.next().await.unwrap().event, "ahead");
        assert_eq!(ahead.next().await, None);
    }
}

#[tokio::test]
async fn a_board_that_stops_reading_is_cut_off_with_a_reason_and_resumes_without_a_gap() {
    let server = TestServer::start_with(|c| c.subscriber_queue = 2).await;
    let client = server.client().await;
    // A reader with a tiny receive buffer that reads nothing for now.
    let mut stalled =
        SseStream::open_with(server.metrics_addr(), "/api/events", &[], Some(4096)).await;
    assert_eq!(stalled.next().await.unwrap().event, "live");
    let lap = "x".repeat(60 * 1024);
    let mut created = BTreeSet::new();
    // Every write is answered although the reader is stuck: publishing never waits.
    for _ in 0..25 {
        let batch = (0..8).map(|_| {
            let mut client = client.clone();
            let lap = lap.clone();
            async move { create_with(&mut client, "Car1", "FP1", &[("lap", &lap)], &[]).await }
        });
        created.extend(futures::future::join_all(batch).await);
    }

    // Now it reads: what was queued for it, then why it was cut off, then the end.
    let mut seen = Vec::new();
    let mut last = 0;
    let cut_off = loop {
        let message = stalled.next().await.expect("a reason before the end");
        match message.event.as_str() {
            "change" => {
                let change = message.json();
                last = change["sequence"].as_u64().unwrap();
                for event in change["events"].as_array().unwrap() {
                    seen.push(event["session_key"].as_str().unwrap().to_owned());
                }
            }
            "cut-off" => break message.json(),
            other => panic!("unexpected {other}: {message:?}"),
        }
    };
    assert_eq!(cut_off["resume_after"].as_u64(), Some(last), "{cut_off}");
    assert!(
        cut_off["reason"]
            .as_str()
            .unwrap()
            .contains("fell more than 2"),
        "{cut_off}"
    );
    assert_eq!(stalled.next().await, None);
    assert!(seen.len() < created.len(), "it was cut off before the end");
    let cut_offs = metric_value(
        &server.metrics().await,
        "pitwall_feed_watchers_cut_off_total",
    );
    assert!(cut_offs.unwrap_or(0.0) >= 1.0);

    // Reconnecting as a browser does: the rest, no gap, no duplicate.
    let mut resumed = SseStream::open(
        server.metrics_addr(),
        "/api/events",
        &[("last-event-id", &last.to_string())],
    )
    .await;
    let rest = changes(&mut resumed, created.len() - seen.len()).await;
    seen.extend(
        rest.iter()
            .map(|(_, e, _)| e["session_key"].as_str().unwrap().to_owned()),
    );
    assert_eq!(seen.len(), created.len(), "every session once");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), created);
}

#[tokio::test]
async fn shutdown_ends_a_stream_after_what_it_was_sent() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = SseStream::open(server.metrics_addr(), "/api/events", &[]).await;
    assert_eq!(stream.next().await.unwrap().event, "live");
    let key = create(&mut client, "Car1").await;
    tokio::time::timeout(PATIENCE, server.stop())
        .await
        .expect("shutdown waits for no open board");
    let started = changes(&mut stream, 1).await;
    assert_eq!(started[0].1["session_key"], key.as_str());
    assert_eq!(stream.next().await.unwrap().event, "closing");
    assert_eq!(stream.next().await, None);
}

#[tokio::test]
async fn with_tokens_the_board_reads_with_a_read_token_or_its_sign_in_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "read reader-secret\nwrite writer-secret\nadmin admin-secret\n",
    )
    .unwrap();
    let server = TestServer::start_with(|c| c.auth_tokens = Some(tokens.clone())).await;
    let addr = server.metrics_addr();

    assert_eq!(
        get(&server, "/").await.status,
        200,
        "the page holds no session"
    );
    assert_eq!(get(&server, "/board/board.js").await.status, 200);
    assert_eq!(get(&server, "/api/board").await.status, 401);
    let events = SseStream::open(addr, "/api/events", &[]).await;
    assert_eq!(events.status, 401);
    let bearer = [("authorization", "Bearer reader-secret")];
    assert_eq!(
        http_request(addr, "GET", "/api/board", &bearer, "")
            .await
            .status,
        200
    );

    let form = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("x-pitwall-board", "sign-in"),
    ];
    let unknown = http_request(addr, "POST", "/board/sign-in", &form, "token=guessed").await;
    assert_eq!(unknown.status, 401);
    assert!(unknown.header("set-cookie").is_none());
    let from_elsewhere = http_request(
        addr,
        "POST",
        "/board/sign-in",
        &form[..1],
        "token=reader-secret",
    )
    .await;
    assert_eq!(
        from_elsewhere.status, 403,
        "a plain cross-site form cannot sign in"
    );

    let signed_in =
        http_request(addr, "POST", "/board/sign-in", &form, "token=reader-secret").await;
    assert_eq!(signed_in.status, 204, "{}", signed_in.body);
    let set_cookie = signed_in.header("set-cookie").unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/api/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains("reader-secret"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let with_cookie = [("cookie", cookie.as_str())];
    assert_eq!(
        http_request(addr, "GET", "/api/board", &with_cookie, "")
            .await
            .status,
        200
    );
    let mut stream = SseStream::open(addr, "/api/events", &with_cookie).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.next().await.unwrap().event, "live");
    assert_eq!(
        http_request(addr, "GET", "/metrics", &with_cookie, "")
            .await
            .status,
        401,
        "the cookie reads the board, nothing else"
    );

    // A token taken out of the file (and reloaded) no longer signs anything in.
    std::fs::write(&tokens, "admin admin-secret\n").unwrap();
    server.access().reload(&tokens).unwrap();
    assert_eq!(
        http_request(addr, "GET", "/api/board", &with_cookie, "")
            .await
            .status,
        401
    );

    let signed_out = http_request(addr, "POST", "/board/sign-out", &[], "").await;
    assert!(
        signed_out
            .header("set-cookie")
            .unwrap()
            .contains("Max-Age=0")
    );
}
