//! The `pitwall serve` process: ready line, configuration sources, exclusive data directory,
//! graceful shutdown on signals.

mod support;

use pitwall_proto::api::*;
use support::*;
use tokio::process::Command;
use tokio::time::timeout;

#[tokio::test]
async fn sigterm_stops_gracefully_with_exit_code_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = ServerProcess::start(dir.path(), &[]).await;
    let mut client = connect(&process.grpc_url()).await;
    let key = create(&mut client, "ds").await;
    let mut stream = stops(&mut client, "ds").await;
    process.signal("TERM");
    let status = timeout(PATIENCE, process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        timeout(PATIENCE, stream.message()).await.unwrap().unwrap(),
        None
    );
    let mut log = Vec::new();
    while let Ok(line) = process.log.try_recv() {
        log.push(line);
    }
    assert!(
        log.iter().any(|l| l.contains("shutdown complete")),
        "{log:?}"
    );

    let restarted = ServerProcess::start(dir.path(), &[]).await;
    let mut client = connect(&restarted.grpc_url()).await;
    assert!(info(&mut client, &key).await.success);
}

#[tokio::test]
async fn sigint_stops_gracefully_with_exit_code_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = ServerProcess::start(dir.path(), &[]).await;
    process.signal("INT");
    let status = timeout(PATIENCE, process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_second_server_on_a_data_directory_in_use_refuses_to_start() {
    // The embedded store's lock, whichever store the suite runs on (on Kafka several instances
    // share one topic by design).
    let dir = tempfile::tempdir().unwrap();
    let _first = ServerProcess::start_embedded(dir.path(), &[]).await;
    let second = timeout(
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
            .arg(dir.path())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another Pitwall process"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_ready_line_names_the_real_ports() {
    let dir = tempfile::tempdir().unwrap();
    let process = ServerProcess::start(dir.path(), &[]).await;
    assert!(!process.grpc_addr.ends_with(":0"));
    assert!(!process.metrics_addr.ends_with(":0"));
    let (status, body) = http_get(&process.metrics_addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let mut client = connect(&process.grpc_url()).await;
    assert!(list(&mut client, "ds").await.is_empty());
}

/// A free loopback port: bound, read, released.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn app_config_ports_and_feature_switch_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let config = dir.path().join("AppConfig.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"PrometheusMetricPort": {metrics_port}, "IntegrateSessionManagement": false,
                "BrokerUrl": "localhost:9092", "SomethingElse": 1}}"#
        ),
    )
    .unwrap();
    let ready_file = dir.path().join("ready.json");
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--ready-file")
        .arg(&ready_file)
        .env_remove("PITWALL_METRICS_LISTEN")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_ready(&ready_file, &mut child).await;
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    // The notes come before the ready line, which is written once the ready file is.
    let ready = timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("pitwall ready") {
                return line;
            }
            log.push(line);
        }
        panic!("exited before ready");
    })
    .await
    .unwrap();
    assert_eq!(field(&ready, "metrics="), format!("0.0.0.0:{metrics_port}"));
    assert!(
        log.iter()
            .any(|l| l.contains("unknown key 'SomethingElse'")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("BrokerUrl is ignored")),
        "{log:?}"
    );
    let mut client = connect(&format!("http://{}", field(&ready, "grpc="))).await;
    let response = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(reason(&response).unwrap().contains("disabled"));
}

#[tokio::test]
async fn environment_variables_configure_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let ready_file = dir.path().join("ready.json");
    let mut child = Command::new(binary())
        .arg("serve")
        .env("PITWALL_LISTEN", "127.0.0.1:0")
        .env("PITWALL_METRICS_LISTEN", "127.0.0.1:0")
        .env("PITWALL_DATA_DIR", dir.path())
        .env("PITWALL_MAX_DETAILS", "1")
        .env("PITWALL_READY_FILE", &ready_file)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_ready(&ready_file, &mut child).await;
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("pitwall ready") {
                return line;
            }
        }
        panic!("exited before ready");
    })
    .await
    .unwrap();
    assert!(ready.contains(&format!("data_dir={}", dir.path().display())));
    let mut client = connect(&format!("http://{}", field(&ready, "grpc="))).await;
    let response = client
        .create_session(CreateSessionRequest {
            data_source: "ds".into(),
            details: [
                ("a".to_owned(), String::new()),
                ("b".to_owned(), String::new()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(reason(&response).unwrap().contains("at most 1"));
}

#[tokio::test]
async fn a_bad_config_file_stops_startup_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("AppConfig.json");
    std::fs::write(&config, r#"{"StreamApiPort": "not a number"}"#).unwrap();
    let output = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("StreamApiPort"), "{stderr}");
}
