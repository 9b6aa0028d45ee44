//! Every RPC of `SessionManagementService`, its success and failure paths, over real gRPC on
//! loopback against an in-process server.

mod support;

use pitwall_proto::api::*;
use prost_types::{Duration, Timestamp};
use support::*;
use tonic::Code;

#[tokio::test]
async fn create_returns_a_lowercase_uuid_key_and_the_new_session_packet() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let response = client
        .create_session(CreateSessionRequest {
            data_source: "Car1".into(),
            identifier: "FP1".into(),
            details: [("driver".to_owned(), "X".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.success);
    let key = &response.session_key;
    assert_eq!(key.len(), 36);
    assert_eq!(key, &key.to_lowercase());
    assert_eq!(
        key.split('-').map(str::len).collect::<Vec<_>>(),
        vec![8, 4, 4, 4, 12]
    );
    let packet = response.new_session.unwrap();
    assert_eq!(packet.data_source, "Car1");
    assert_eq!(
        packet.topic_partition_offsets,
        [("Car1:0".to_owned(), 0), ("Car1_essential:0".to_owned(), 0)].into()
    );
    let info = packet.session_info.unwrap();
    assert_eq!(info.data_source, "Car1");
    assert_eq!(info.identifier, "FP1");
    assert_eq!(info.details.get("driver").map(String::as_str), Some("X"));
    assert_eq!(info.creation_time, packet.creation_time);
}

#[tokio::test]
async fn create_defaults_type_version_utc_offset_and_creation_time() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let response = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let packet = response.new_session.unwrap();
    let info = packet.session_info.clone().unwrap();
    assert_eq!(info.r#type, "Session");
    assert_eq!(info.version, 1);
    assert_eq!(packet.utc_offset, Some(Duration::default()));
    let created = packet.creation_time.unwrap().seconds;
    assert!(
        created >= before && created <= before + 60,
        "{created} vs {before}"
    );

    let stored = info_of(&mut client, &response.session_key).await;
    assert_eq!(stored.r#type, "Session");
    assert_eq!(stored.version, 1);
    assert_eq!(stored.utc_offset, Some(Duration::default()));
}

async fn info_of(client: &mut Client, key: &str) -> GetSessionInfoResponse {
    let response = info(client, key).await;
    assert!(response.success);
    response
}

#[tokio::test]
async fn create_keeps_given_fields_and_collapses_duplicate_associates() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let creation_time = Timestamp {
        seconds: 1_700_000_000,
        nanos: 5,
    };
    let utc_offset = Duration {
        seconds: -5 * 3600,
        nanos: 0,
    };
    let response = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            r#type: "Dyno".into(),
            version: 3,
            utc_offset: Some(utc_offset),
            identifier: "run 7".into(),
            associate_session_key: vec!["p1".into(), "p2".into(), "p1".into()],
            details: [("a".to_owned(), "1".to_owned())].into(),
            creation_time: Some(creation_time),
        })
        .await
        .unwrap()
        .into_inner();
    let stored = info_of(&mut client, &response.session_key).await;
    assert_eq!(stored.r#type, "Dyno");
    assert_eq!(stored.version, 3);
    assert_eq!(stored.utc_offset, Some(utc_offset));
    assert_eq!(stored.identifier, "run 7");
    assert_eq!(stored.associate_session_keys, vec!["p1", "p2"]);
    assert_eq!(stored.creation_time, Some(creation_time));
    assert_eq!(stored.details.len(), 1);
}

#[tokio::test]
async fn invalid_creates_are_refused_with_a_reason_and_change_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let base = CreateSessionRequest {
        data_source: "ds".into(),
        ..Default::default()
    };
    let cases: Vec<(&str, CreateSessionRequest)> = vec![
        (
            "data_source",
            CreateSessionRequest {
                data_source: "bad source".into(),
                ..base.clone()
            },
        ),
        (
            "data_source is empty",
            CreateSessionRequest {
                data_source: String::new(),
                ..base.clone()
            },
        ),
        (
            "250 bytes",
            CreateSessionRequest {
                data_source: "a".repeat(250),
                ..base.clone()
            },
        ),
        (
            "type",
            CreateSessionRequest {
                r#type: "t".repeat(257),
                ..base.clone()
            },
        ),
        (
            "identifier",
            CreateSessionRequest {
                identifier: "i".repeat(1025),
                ..base.clone()
            },
        ),
        (
            "detail key",
            CreateSessionRequest {
                details: [("k".repeat(257), "v".to_owned())].into(),
                ..base.clone()
            },
        ),
        (
            "value",
            CreateSessionRequest {
                details: [("k".to_owned(), "v".repeat(64 * 1024 + 1))].into(),
                ..base.clone()
            },
        ),
        (
            "1025 details",
            CreateSessionRequest {
                details: (0..1025)
                    .map(|i| (format!("k{i}"), String::new()))
                    .collect(),
                ..base.clone()
            },
        ),
        (
            "associate",
            CreateSessionRequest {
                associate_session_key: vec![String::new()],
                ..base.clone()
            },
        ),
        (
            "257 associate",
            CreateSessionRequest {
                associate_session_key: (0..257).map(|i| format!("a{i}")).collect(),
                ..base.clone()
            },
        ),
        (
            "utc_offset",
            CreateSessionRequest {
                utc_offset: Some(Duration {
                    seconds: 24 * 3600 + 1,
                    nanos: 0,
                }),
                ..base.clone()
            },
        ),
        (
            "opposite signs",
            CreateSessionRequest {
                utc_offset: Some(Duration {
                    seconds: 10,
                    nanos: -1,
                }),
                ..base.clone()
            },
        ),
        (
            "creation_time",
            CreateSessionRequest {
                creation_time: Some(Timestamp {
                    seconds: 0,
                    nanos: 1_000_000_000,
                }),
                ..base.clone()
            },
        ),
        (
            "years 1 to 9999",
            CreateSessionRequest {
                creation_time: Some(Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                }),
                ..base.clone()
            },
        ),
    ];
    let mut feed = server.feed().await;
    for (expected, request) in cases {
        let response = client.create_session(request).await.unwrap();
        let why = reason(&response).unwrap_or_default();
        let body = response.into_inner();
        assert!(!body.success, "accepted a request with a bad {expected}");
        assert_eq!(body, CreateSessionResponse::default());
        assert!(
            why.contains(expected),
            "reason '{why}' should mention '{expected}'"
        );
        // No session in any data source (a refused name cannot be listed by itself).
        let everything = feed
            .list_sessions(pitwall_proto::feed::ListSessionsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(everything.sessions.is_empty(), "{expected}");
    }
    assert!(list(&mut client, "ds").await.is_empty());
}

#[tokio::test]
async fn limits_are_inclusive_at_their_maximum() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let response = client
        .create_session(CreateSessionRequest {
            data_source: "a".repeat(249),
            r#type: "t".repeat(256),
            identifier: "i".repeat(1024),
            associate_session_key: (0..256).map(|i| format!("a{i}")).collect(),
            details: (0..1024)
                .map(|i| (format!("{i:0>256}"), String::new()))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.success);
}

#[tokio::test]
async fn a_session_over_the_size_limit_is_refused() {
    let server = TestServer::start_with(|c| c.limits.session_bytes = 10_000).await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    let response = client
        .update_session_details(UpdateSessionDetailsRequest {
            session_key: key.clone(),
            details: [("big".to_owned(), "v".repeat(20_000))].into(),
        })
        .await
        .unwrap();
    assert!(reason(&response).unwrap().contains("bytes encoded"));
    assert!(!response.into_inner().success);
    assert!(info_of(&mut client, &key).await.details.is_empty());
}

#[tokio::test]
async fn a_request_over_the_message_limit_gets_resource_exhausted() {
    let server = TestServer::start_with(|c| c.max_message_bytes = 64 * 1024).await;
    let mut client = server.client().await;
    let status = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            details: [("k".to_owned(), "v".repeat(65 * 1024))].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(list(&mut client, "ds").await.is_empty());
}

#[tokio::test]
async fn the_default_message_limit_is_four_mebibytes() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let status = client
        .get_session_info(GetSessionInfoRequest {
            session_key: "k".repeat(4 * 1024 * 1024 + 1),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test]
async fn ending_a_session_returns_its_end_packet_with_the_sessions_data_source() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    let termination_time = Timestamp {
        seconds: 4_000_000_000,
        nanos: 0,
    };
    let response = client
        .end_session(EndSessionRequest {
            data_source: "some-other-source".into(),
            session_key: key.clone(),
            termination_time: Some(termination_time),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.success);
    let packet = response.end_session.unwrap();
    assert_eq!(packet.data_source, "ds");
    assert_eq!(packet.termination_time, Some(termination_time));
    assert_eq!(
        packet.topic_partition_offsets,
        [("ds:0".to_owned(), 0), ("ds_essential:0".to_owned(), 0)].into()
    );
    let stored = info_of(&mut client, &key).await;
    assert!(stored.is_complete);
    assert_eq!(stored.termination_time, Some(termination_time));
}

#[tokio::test]
async fn ending_without_termination_time_uses_the_server_clock() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    let created = info_of(&mut client, &key).await.creation_time.unwrap();
    let ended = end(&mut client, &key).await.end_session.unwrap();
    let terminated = ended.termination_time.unwrap();
    assert!((terminated.seconds, terminated.nanos) >= (created.seconds, created.nanos));
}

#[tokio::test]
async fn an_invalid_termination_time_is_refused_even_when_already_ended() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    end(&mut client, &key).await;
    let response = client
        .end_session(EndSessionRequest {
            session_key: key,
            termination_time: Some(Timestamp {
                seconds: 0,
                nanos: -1,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(reason(&response).unwrap().contains("nanos"));
    assert!(!response.into_inner().success);
}

#[tokio::test]
async fn listing_an_unusable_data_source_is_refused_with_the_reason() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "ds").await;
    for data_source in ["", "not a valid source", "*"] {
        let response = client
            .get_current_sessions(GetCurrentSessionsRequest {
                data_source: data_source.into(),
            })
            .await
            .unwrap();
        assert!(reason(&response).unwrap().contains("data_source"));
        assert_eq!(response.into_inner(), GetCurrentSessionsResponse::default());
    }
}

#[tokio::test]
async fn session_info_reports_every_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "Car7").await;
    let live = info_of(&mut client, &key).await;
    assert_eq!(live.data_source, "Car7");
    assert!(!live.is_complete);
    assert!(live.streams.is_empty());
    assert_eq!(live.main_offset, 0);
    assert_eq!(live.essentials_offset, 0);
    assert_eq!(
        live.topic_partition_offsets,
        [("Car7:0".to_owned(), 0), ("Car7_essential:0".to_owned(), 0)].into()
    );
    assert!(live.creation_time.is_some());
    assert_eq!(
        live.termination_time, None,
        "no termination_time before the end"
    );
    assert_eq!(live.utc_offset, Some(Duration::default()));
}

#[tokio::test]
async fn session_info_of_an_unknown_key_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let response = client
        .get_session_info(GetSessionInfoRequest {
            session_key: "missing".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        reason(&response).as_deref(),
        Some("session 'missing' not found")
    );
    assert_eq!(response.into_inner(), GetSessionInfoResponse::default());
}

#[tokio::test]
async fn updating_the_identifier_sets_it_and_an_empty_one_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    for (identifier, expected) in [("Q1", "Q1"), ("", "Q1"), ("Q2", "Q2")] {
        let response = client
            .update_session_identifier(UpdateSessionIdentifierRequest {
                session_key: key.clone(),
                identifier: identifier.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.success);
        assert_eq!(info_of(&mut client, &key).await.identifier, expected);
    }
}

#[tokio::test]
async fn an_identifier_over_the_limit_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    let response = client
        .update_session_identifier(UpdateSessionIdentifierRequest {
            session_key: key.clone(),
            identifier: "i".repeat(1025),
        })
        .await
        .unwrap();
    assert!(!response.into_inner().success);
    assert_eq!(info_of(&mut client, &key).await.identifier, "");
}

async fn add_associate(
    client: &mut Client,
    key: &str,
    associate: &str,
) -> tonic::Response<AddAssociateSessionResponse> {
    client
        .add_associate_session(AddAssociateSessionRequest {
            session_key: key.into(),
            associate_session_key: associate.into(),
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn adding_associates_appends_and_a_known_one_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    for associate in ["a", "held-elsewhere", "a"] {
        assert!(
            add_associate(&mut client, &key, associate)
                .await
                .into_inner()
                .success
        );
    }
    assert_eq!(
        info_of(&mut client, &key).await.associate_session_keys,
        vec!["a", "held-elsewhere"]
    );
}

#[tokio::test]
async fn an_empty_or_own_associate_key_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    for associate in ["", key.as_str()] {
        let response = add_associate(&mut client, &key, associate).await;
        assert!(reason(&response).is_some());
        assert!(!response.into_inner().success);
    }
    assert!(
        info_of(&mut client, &key)
            .await
            .associate_session_keys
            .is_empty()
    );
}

async fn update_details(
    client: &mut Client,
    key: &str,
    details: &[(&str, &str)],
) -> tonic::Response<UpdateSessionDetailsResponse> {
    client
        .update_session_details(UpdateSessionDetailsRequest {
            session_key: key.into(),
            details: details
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn details_are_upserted_and_an_empty_map_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    assert!(
        update_details(&mut client, &key, &[("a", "1"), ("b", "2")])
            .await
            .into_inner()
            .success
    );
    assert!(
        update_details(&mut client, &key, &[("b", "3"), ("c", "")])
            .await
            .into_inner()
            .success
    );
    assert!(
        update_details(&mut client, &key, &[])
            .await
            .into_inner()
            .success
    );
    let details = info_of(&mut client, &key).await.details;
    assert_eq!(
        details,
        [("a", "1"), ("b", "3"), ("c", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    );
}

#[tokio::test]
async fn details_beyond_the_count_limit_are_refused_and_change_nothing() {
    let server = TestServer::start_with(|c| c.limits.details_per_session = 2).await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    assert!(
        update_details(&mut client, &key, &[("a", "1"), ("b", "2")])
            .await
            .into_inner()
            .success
    );
    let response = update_details(&mut client, &key, &[("a", "9"), ("c", "3")]).await;
    assert!(reason(&response).unwrap().contains("details"));
    assert!(!response.into_inner().success);
    assert_eq!(
        info_of(&mut client, &key)
            .await
            .details
            .get("a")
            .map(String::as_str),
        Some("1")
    );
}

#[tokio::test]
async fn an_empty_detail_key_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let key = create(&mut client, "ds").await;
    let response = update_details(&mut client, &key, &[("", "v")]).await;
    assert!(reason(&response).is_some());
    assert!(!response.into_inner().success);
}

#[tokio::test]
async fn writes_are_read_back_at_once_on_another_connection() {
    let server = TestServer::start().await;
    let mut writer = server.client().await;
    let mut reader = server.client().await;
    for i in 0..20 {
        let key = create(&mut writer, "ds").await;
        assert!(
            update_details(&mut writer, &key, &[("i", &i.to_string())])
                .await
                .into_inner()
                .success
        );
        assert_eq!(info_of(&mut reader, &key).await.details["i"], i.to_string());
        assert_eq!(list(&mut reader, "ds").await.last(), Some(&key));
    }
}

#[tokio::test]
async fn with_the_feature_switched_off_every_unary_rpc_is_refused() {
    let server = TestServer::start_with(|c| c.integrate_session_management = false).await;
    let mut client = server.client().await;
    let create = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(reason(&create).unwrap().contains("disabled"));
    assert_eq!(create.into_inner(), CreateSessionResponse::default());
    let listing = client
        .get_current_sessions(GetCurrentSessionsRequest {
            data_source: "ds".into(),
        })
        .await
        .unwrap();
    assert!(reason(&listing).unwrap().contains("disabled"));
    assert!(!listing.into_inner().success);
    let checks = [
        reason(
            &client
                .end_session(EndSessionRequest::default())
                .await
                .unwrap(),
        ),
        reason(
            &client
                .get_session_info(GetSessionInfoRequest::default())
                .await
                .unwrap(),
        ),
        reason(
            &client
                .update_session_identifier(UpdateSessionIdentifierRequest::default())
                .await
                .unwrap(),
        ),
        reason(
            &client
                .add_associate_session(AddAssociateSessionRequest::default())
                .await
                .unwrap(),
        ),
        reason(
            &client
                .update_session_details(UpdateSessionDetailsRequest::default())
                .await
                .unwrap(),
        ),
    ];
    for check in checks {
        assert!(check.unwrap().contains("disabled"));
    }
}

#[tokio::test]
async fn metrics_count_sessions_per_data_source_and_rpcs_by_outcome() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let a = create(&mut client, "alpha").await;
    create(&mut client, "alpha").await;
    create(&mut client, "beta").await;
    end(&mut client, &a).await;
    info(&mut client, "unknown").await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"stream_api_sessions_total{data_source="alpha"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&metrics, r#"stream_api_sessions_total{data_source="beta"}"#),
        Some(1.0)
    );
    assert!(metrics.contains("# TYPE stream_api_sessions_total gauge"));
    assert_eq!(
        metric_value(
            &metrics,
            r#"pitwall_sessions{data_source="alpha",state="completed"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"pitwall_rpc_requests_total{method="CreateSession",outcome="success"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"pitwall_rpc_requests_total{method="GetSessionInfo",outcome="not_found"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"pitwall_rpc_duration_seconds_count{method="EndSession",outcome="success"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_huge_session_key_is_refused_with_a_short_reason_on_every_rpc_that_looks_it_up() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // Over the 16 KiB of metadata a client accepts, were it echoed whole.
    let key = "k".repeat(17 * 1024);
    let info = client
        .get_session_info(GetSessionInfoRequest {
            session_key: key.clone(),
        })
        .await
        .unwrap();
    let end = client
        .end_session(EndSessionRequest {
            session_key: key.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let identifier = client
        .update_session_identifier(UpdateSessionIdentifierRequest {
            session_key: key.clone(),
            identifier: "FP1".into(),
        })
        .await
        .unwrap();
    let details = client
        .update_session_details(UpdateSessionDetailsRequest {
            session_key: key.clone(),
            details: [("lap".to_owned(), "1".to_owned())].into(),
        })
        .await
        .unwrap();
    let associate = client
        .add_associate_session(AddAssociateSessionRequest {
            session_key: key.clone(),
            associate_session_key: "other".into(),
        })
        .await
        .unwrap();
    let answers = [
        (reason(&info), info.into_inner().success),
        (reason(&end), end.into_inner().success),
        (reason(&identifier), identifier.into_inner().success),
        (reason(&details), details.into_inner().success),
        (reason(&associate), associate.into_inner().success),
    ];
    for (reason, success) in answers {
        let reason = reason.expect("a refusal carries its reason");
        assert!(!success);
        assert!(reason.len() < 400, "{} bytes: {reason}", reason.len());
        assert!(reason.starts_with("session 'kkkk"), "{reason}");
        assert!(reason.ends_with("(17408 bytes) not found"), "{reason}");
    }
}

#[tokio::test]
async fn get_current_sessions_past_the_message_limit_is_resource_exhausted_and_list_sessions_pages_them_all()
 {
    // Room for about a hundred keys, so few sessions get there.
    let server = TestServer::start_with(|c| c.max_message_bytes = 4096).await;
    let mut client = server.client().await;
    let mut keys = Vec::new();
    for i in 0..120 {
        let key = create(&mut client, "Crowded").await;
        if i % 3 == 0 {
            assert!(end(&mut client, &key).await.success);
        }
        keys.push(key);
    }
    let small = create(&mut client, "Quiet").await;

    let status = client
        .get_current_sessions(GetCurrentSessionsRequest {
            data_source: "Crowded".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for hint in [
        "120 session keys",
        "ListSessions",
        "retention",
        "4096 bytes",
    ] {
        assert!(status.message().contains(hint), "{}", status.message());
    }
    assert_eq!(list(&mut client, "Quiet").await, vec![small]);
    let metrics = server.metrics().await;
    let count = |outcome: &str| {
        metric_value(
            &metrics,
            &format!(
                r#"pitwall_rpc_requests_total{{method="GetCurrentSessions",outcome="{outcome}"}}"#
            ),
        )
    };
    assert_eq!(count("resource_exhausted"), Some(1.0));
    assert_eq!(count("success"), Some(1.0));

    // The way out the message names covers the same sessions, ended ones included, in order.
    let mut feed = server.feed().await;
    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = feed
            .list_sessions(pitwall_proto::feed::ListSessionsRequest {
                filter: Some(pitwall_proto::feed::SessionFilter {
                    data_sources: vec!["Crowded".into()],
                    ..Default::default()
                }),
                page_size: 0,
                page_token: page_token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.sessions.into_iter().map(|s| s.session_key));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(listed, keys);
}

#[tokio::test]
async fn data_sources_kafka_refuses_or_reserves_are_refused_with_the_same_reason_wherever_named() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut feed = server.feed().await;
    for name in [".", "..", "__consumer_offsets", "Car1_essential"] {
        let created = client
            .create_session(CreateSessionRequest {
                data_source: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let why = reason(&created).unwrap_or_else(|| panic!("{name} was accepted"));
        assert!(!created.into_inner().success);
        assert!(why.starts_with(&format!("data_source '{name}'")), "{why}");

        let listed = client
            .get_current_sessions(GetCurrentSessionsRequest {
                data_source: name.into(),
            })
            .await
            .unwrap();
        assert_eq!(reason(&listed).as_deref(), Some(why.as_str()));
        assert!(!listed.into_inner().success);

        let starts = client
            .get_session_start_notification(GetSessionStartNotificationRequest {
                data_source: name.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (starts.code(), starts.message()),
            (Code::InvalidArgument, why.as_str())
        );
        let stops = client
            .get_session_stop_notification(GetSessionStopNotificationRequest {
                data_source: name.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (stops.code(), stops.message()),
            (Code::InvalidArgument, why.as_str())
        );

        let listing = feed
            .list_sessions(pitwall_proto::feed::ListSessionsRequest {
                filter: Some(pitwall_proto::feed::SessionFilter {
                    data_sources: vec![name.into()],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(listing.message(), why);
    }
    // The empty data source names nothing a session can have.
    let status = client
        .get_session_start_notification(GetSessionStartNotificationRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("data_source is empty"));
}

#[tokio::test]
async fn control_characters_are_refused_in_identifier_type_and_detail_keys() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let requests = [
        CreateSessionRequest {
            identifier: "FP1\u{1b}[2J".into(),
            ..Default::default()
        },
        CreateSessionRequest {
            r#type: "Race\nforged line".into(),
            ..Default::default()
        },
        CreateSessionRequest {
            details: [("lap\u{7}".to_owned(), "1".to_owned())].into(),
            ..Default::default()
        },
    ];
    for request in requests {
        let response = client
            .create_session(CreateSessionRequest {
                data_source: "ds".into(),
                ..request.clone()
            })
            .await
            .unwrap();
        let why = reason(&response).unwrap_or_else(|| panic!("{request:?} was accepted"));
        assert!(why.contains("control character"), "{why}");
        assert!(why.is_ascii() && !why.contains('\u{1b}'), "{why:?}");
    }
    // Tab is allowed, and values may hold anything.
    let response = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            identifier: "FP1\tdry".into(),
            details: [("notes".to_owned(), "line 1\nline 2\u{1b}".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.success);
    let key = response.session_key;
    let renamed = client
        .update_session_identifier(UpdateSessionIdentifierRequest {
            session_key: key.clone(),
            identifier: "FP2\r".into(),
        })
        .await
        .unwrap();
    assert!(reason(&renamed).unwrap().contains("control character"));
    let detailed = client
        .update_session_details(UpdateSessionDetailsRequest {
            session_key: key.clone(),
            details: [("\u{9b}31m".to_owned(), "red".to_owned())].into(),
        })
        .await
        .unwrap();
    assert!(reason(&detailed).unwrap().contains("control character"));
    assert_eq!(info(&mut client, &key).await.identifier, "FP1\tdry");
}

#[tokio::test]
async fn a_creation_time_beyond_the_allowed_skew_into_the_future_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let create_at = |seconds: i64| CreateSessionRequest {
        data_source: "ds".into(),
        creation_time: Some(Timestamp { seconds, nanos: 0 }),
        ..Default::default()
    };
    // 2100-01-01: accepted, such a session could never be ended by the server's clock.
    let year_2100 = client
        .create_session(create_at(4_102_444_800))
        .await
        .unwrap();
    let why = reason(&year_2100).expect("a creation time in 2100 was accepted");
    assert!(why.contains("ahead of the server's clock"), "{why}");
    assert!(list(&mut client, "ds").await.is_empty());
    // Within the skew (5 minutes by default) is fine.
    let soon = client
        .create_session(create_at(now + 60))
        .await
        .unwrap()
        .into_inner();
    assert!(soon.success);

    let anything = TestServer::start_with(|c| c.limits.creation_time_skew = None).await;
    let mut client = anything.client().await;
    assert!(
        client
            .create_session(create_at(4_102_444_800))
            .await
            .unwrap()
            .into_inner()
            .success
    );
}
