//! Security: every RPC and admin path against each role and against no or an unknown token;
//! TLS and mutual TLS with a CA made in the test; certificate errors at startup; token reload on
//! SIGHUP; tokens never in logs; the CLI with a token and a CA.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use http::uri::PathAndQuery;
use pitwall_server::auth::{GRPC_RULES, HTTP_RULES, Role, Rule, http_rule};
use prost::Message;
use support::*;
use tokio::process::Command;
use tokio::time::timeout;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};

const TOKENS: &str = "# test tokens\nread reader-secret\nwrite writer-secret\nadmin admin-secret\n";

/// Who calls: no token, an unknown one, or one of each role.
const CALLERS: &[(&str, Option<&str>, Option<Role>)] = &[
    ("no token", None, None),
    ("unknown token", Some("guessed-secret"), None),
    ("read", Some("reader-secret"), Some(Role::Read)),
    ("write", Some("writer-secret"), Some(Role::Write)),
    ("admin", Some("admin-secret"), Some(Role::Admin)),
];

fn token_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, TOKENS).unwrap();
    path
}

/// A server with the test token file (the file is read at startup), and a channel to it.
async fn server_with_tokens() -> (TestServer, Channel) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let server = TestServer::start_with(|c| c.auth_tokens = Some(tokens)).await;
    let channel = channel(&server.grpc_url()).await;
    (server, channel)
}

/// Every method of every service the server registers, from the descriptors it serves.
fn served_methods() -> BTreeSet<String> {
    let mut methods = BTreeSet::new();
    for set in [
        pitwall_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let files = prost_types::FileDescriptorSet::decode(set).unwrap();
        for file in files.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                // Described in the proto files but not served by Pitwall.
                if name == "ma.streaming.key_generator.v1.UniqueKeyGeneratorService" {
                    continue;
                }
                for method in &service.method {
                    methods.insert(format!("/{name}/{}", method.name()));
                }
            }
        }
    }
    methods
}

#[test]
fn every_served_method_has_an_access_rule() {
    let ruled: BTreeSet<String> = GRPC_RULES.iter().map(|(p, _)| p.to_string()).collect();
    assert_eq!(
        served_methods(),
        ruled,
        "give every RPC a rule in pitwall_server::auth"
    );
}

/// Calls `path` with an empty message (valid for every request type) and returns the status
/// code the call ended with at its start (OK when it was let through).
async fn call(channel: Channel, path: &str, token: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let mut request = Request::new(());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let path = PathAndQuery::try_from(path.to_owned()).unwrap();
    let streaming = path.path().contains("Notification")
        || path.path().ends_with("/Watch")
        || path.path().contains("Reflection");
    let result = if path.path().contains("Reflection") {
        let mut request = Request::new(tokio_stream::iter(vec![()]));
        *request.metadata_mut() = {
            let mut m = tonic::metadata::MetadataMap::new();
            if let Some(token) = token {
                m.insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            m
        };
        grpc.streaming(request, path, codec).await.map(|_| ())
    } else if streaming {
        grpc.server_streaming(request, path, codec)
            .await
            .map(|_| ())
    } else {
        grpc.unary(request, path, codec).await.map(|_| ())
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn every_rpc_answers_each_role_by_its_rule() {
    // Bound to keep the server running for the whole test.
    let (_server, channel) = server_with_tokens().await;
    for (path, rule) in GRPC_RULES {
        for (caller, token, role) in CALLERS {
            let code = call(channel.clone(), path, *token).await;
            let expected = match (rule, role) {
                (Rule::Open, _) => None,
                (Rule::Needs(_), None) => Some(Code::Unauthenticated),
                (Rule::Needs(needed), Some(role)) if role < needed => Some(Code::PermissionDenied),
                (Rule::Needs(_), Some(_)) => None,
            };
            match expected {
                Some(denied) => assert_eq!(code, denied, "{path} as {caller}"),
                None => assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{path} as {caller} was denied ({code:?})"
                ),
            }
        }
    }
}

#[tokio::test]
async fn every_admin_path_answers_each_role_by_its_rule() {
    let (server, channel) = server_with_tokens().await;
    let mut writer = pitwall_proto::api::session_management_service_client::SessionManagementServiceClient::with_interceptor(
        channel,
        |mut request: Request<()>| {
            request.metadata_mut().insert("authorization", "Bearer writer-secret".parse().unwrap());
            Ok(request)
        },
    );
    let session_key = writer
        .create_session(pitwall_proto::api::CreateSessionRequest {
            data_source: "Car1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session_key;
    // The board's paths fall under a prefix rule; each is asked with what it needs to answer.
    let board_paths = [
        "/api/board".to_owned(),
        format!("/api/tree?session_key={session_key}"),
        format!("/api/telemetry?session_key={session_key}"),
        "/api/rates".to_owned(),
    ];
    let paths = HTTP_RULES
        .iter()
        .map(|(path, rule)| (path.to_string(), *rule))
        .chain(board_paths.into_iter().map(|path| {
            let rule = http_rule(path.split('?').next().unwrap_or_default());
            (path, rule)
        }));
    for (path, rule) in paths {
        for (caller, token, role) in CALLERS {
            let status = http_get_with_token(&server.metrics_addr().to_string(), &path, *token)
                .await
                .0;
            let expected = match (&rule, role) {
                (Rule::Open, _) => 200,
                (Rule::Needs(_), None) => 401,
                (Rule::Needs(needed), Some(role)) if role < needed => 403,
                (Rule::Needs(_), Some(_)) => 200,
            };
            assert_eq!(status, expected, "{path} as {caller}");
        }
    }
    let (status, body) = http_get_with_token(
        &server.metrics_addr().to_string(),
        "/metrics",
        Some("writer-secret"),
    )
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("needs role 'admin'"), "{body}");
}

#[tokio::test]
async fn a_refused_token_says_which_role_is_needed() {
    // Bound to keep the server running for the whole test.
    let (_server, channel) = server_with_tokens().await;
    let mut client = pitwall_proto::api::session_management_service_client::SessionManagementServiceClient::with_interceptor(
        channel,
        |mut request: Request<()>| {
            request.metadata_mut().insert("authorization", "Bearer reader-secret".parse().unwrap());
            Ok(request)
        },
    );
    let status = client
        .create_session(pitwall_proto::api::CreateSessionRequest {
            data_source: "ds".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "this needs role 'write'; the token has role 'read'"
    );
}

async fn tls_channel(url: &str, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_owned())?
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test]
async fn a_client_with_the_ca_connects_over_tls_and_one_without_fails() {
    let pki = TestPki::new();
    let server = TestServer::start_with(|c| c.tls = Some(pki.files(false))).await;
    let url = format!("https://localhost:{}", server_port(&server));
    let trusted = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    let channel = tls_channel(&url, trusted).await.unwrap();
    let mut client =
        pitwall_proto::api::session_management_service_client::SessionManagementServiceClient::new(
            channel,
        );
    assert!(
        client
            .get_current_sessions(pitwall_proto::api::GetCurrentSessionsRequest {
                data_source: "ds".into()
            })
            .await
            .unwrap()
            .into_inner()
            .success
    );

    let other = TestPki::new();
    let untrusted = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(other.ca_pem()))
        .domain_name("localhost");
    assert!(tls_channel(&url, untrusted).await.is_err());

    // Cleartext to a TLS port fails too.
    let cleartext = Endpoint::from_shared(format!("http://127.0.0.1:{}", server_port(&server)))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = cleartext {
        let mut client = pitwall_proto::api::session_management_service_client::SessionManagementServiceClient::new(channel);
        assert!(
            client
                .get_current_sessions(pitwall_proto::api::GetCurrentSessionsRequest::default())
                .await
                .is_err()
        );
    }
}

fn server_port(server: &TestServer) -> u16 {
    server
        .grpc_url()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let pki = TestPki::new();
    let server = TestServer::start_with(|c| c.tls = Some(pki.files(true))).await;
    let url = format!("https://localhost:{}", server_port(&server));
    let base = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    let request = pitwall_proto::api::GetCurrentSessionsRequest {
        data_source: "ds".into(),
    };

    let anonymous = match tls_channel(&url, base.clone()).await {
        Err(_) => true,
        Ok(channel) => pitwall_proto::api::session_management_service_client::SessionManagementServiceClient::new(channel)
            .get_current_sessions(request.clone())
            .await
            .is_err(),
    };
    assert!(anonymous, "a client without a certificate got through");

    let identified = base.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    let channel = tls_channel(&url, identified).await.unwrap();
    let answer =
        pitwall_proto::api::session_management_service_client::SessionManagementServiceClient::new(
            channel,
        )
        .get_current_sessions(request)
        .await
        .unwrap();
    assert!(answer.into_inner().success);
}

#[tokio::test]
async fn the_admin_port_serves_https_with_the_same_certificate() {
    let pki = TestPki::new();
    let server = TestServer::start_with(|c| c.tls = Some(pki.files(true))).await;
    let port = server.metrics_addr().port();
    let output = Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(&pki.ca)
        .arg(format!("https://localhost:{port}/readyz"))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ready\n");
}

#[tokio::test]
async fn unusable_certificate_files_stop_startup_naming_the_file() {
    let pki = TestPki::new();
    let missing = pki.dir.path().join("missing.pem");
    let cases = [
        (
            pitwall_server::tls::TlsFiles {
                cert: missing.clone(),
                ..pki.files(false)
            },
            "cannot read TLS file",
            "missing.pem",
        ),
        (
            pitwall_server::tls::TlsFiles {
                key: pki.stray_key.clone(),
                ..pki.files(false)
            },
            "does not belong to certificate",
            "stray.key",
        ),
        (
            pitwall_server::tls::TlsFiles {
                cert: pki.server_key.clone(),
                ..pki.files(false)
            },
            "holds no PEM certificate",
            "server.key",
        ),
    ];
    for (files, expected, file) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut config = loopback_config(dir.path());
        config.tls = Some(files);
        let message = match pitwall_server::start(config).await {
            Ok(_) => panic!("started with bad TLS files ({expected})"),
            Err(e) => e.to_string(),
        };
        assert!(
            message.contains(expected) && message.contains(file),
            "{message}"
        );
    }
}

#[tokio::test]
async fn the_token_file_is_reloaded_on_sighup_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let token_arg = tokens.to_str().unwrap().to_owned();
    let mut process =
        ServerProcess::start(&dir.path().join("data"), &["--auth-tokens", &token_arg]).await;
    let channel = channel(&process.grpc_url()).await;
    let path = "/ma.streaming.api.v1.SessionManagementService/GetCurrentSessions";
    assert_eq!(
        call(channel.clone(), path, Some("reader-secret")).await,
        Code::Ok
    );
    assert_eq!(
        call(channel.clone(), path, Some("new-secret")).await,
        Code::Unauthenticated
    );

    std::fs::write(&tokens, "read new-secret\n").unwrap();
    process.signal("HUP");
    timeout(PATIENCE, async {
        while let Some(line) = process.log.recv().await {
            if line.contains("token file reloaded") {
                return;
            }
        }
    })
    .await
    .expect("no reload in the log");
    // The same connection, the new tokens.
    assert_eq!(
        call(channel.clone(), path, Some("new-secret")).await,
        Code::Ok
    );
    assert_eq!(
        call(channel, path, Some("reader-secret")).await,
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn tokens_never_appear_in_the_logs_at_any_level() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let token_arg = tokens.to_str().unwrap().to_owned();
    let mut process = ServerProcess::start(
        &dir.path().join("data"),
        &["--auth-tokens", &token_arg, "--log-level", "trace"],
    )
    .await;
    let channel = channel(&process.grpc_url()).await;
    let path = "/ma.streaming.api.v1.SessionManagementService/CreateSession";
    for (_, token, _) in CALLERS {
        call(channel.clone(), path, *token).await;
    }
    process.signal("HUP");
    process.signal("TERM");
    process.child.wait().await.unwrap();
    let mut log = String::new();
    while let Some(line) = process.log.recv().await {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(
        log.contains("request denied"),
        "the denials were not logged"
    );
    for secret in [
        "reader-secret",
        "writer-secret",
        "admin-secret",
        "guessed-secret",
    ] {
        assert!(!log.contains(secret), "{secret} appears in the log");
    }
}

#[tokio::test]
async fn the_cli_connects_with_a_token_and_a_ca_and_explains_failures() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let server = TestServer::start_with(|c| {
        c.tls = Some(pki.files(false));
        c.auth_tokens = Some(tokens);
    })
    .await;
    let url = format!("https://localhost:{}", server_port(&server));
    let run = |args: Vec<String>| async move {
        Command::new(binary())
            .arg("session")
            .args(args)
            .env_remove("PITWALL_TOKEN")
            .env_remove("PITWALL_CA_CERT")
            .output()
            .await
            .unwrap()
    };
    let ca = pki.ca.to_str().unwrap().to_owned();
    let base = |extra: &[&str]| {
        let mut args = vec!["--server".to_owned(), url.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    let ok = run(base(&[
        "--ca-cert",
        &ca,
        "--token",
        "writer-secret",
        "create",
        "--data-source",
        "ds",
    ]))
    .await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let no_token = run(base(&["--ca-cert", &ca, "list", "--data-source", "ds"])).await;
    assert_eq!(no_token.status.code(), Some(1));
    let message = String::from_utf8_lossy(&no_token.stderr);
    assert!(
        message.contains("refused the token") && message.contains("--token"),
        "{message}"
    );

    let wrong_ca = TestPki::new();
    let other_ca = wrong_ca.ca.to_str().unwrap().to_owned();
    let untrusted = run(base(&[
        "--ca-cert",
        &other_ca,
        "--token",
        "reader-secret",
        "list",
        "--data-source",
        "ds",
    ]))
    .await;
    assert_eq!(untrusted.status.code(), Some(3));
    let message = String::from_utf8_lossy(&untrusted.stderr);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("--ca-cert"), "{message}");

    let no_ca = run(base(&["list", "--data-source", "ds"])).await;
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("pass --ca-cert"));
}
