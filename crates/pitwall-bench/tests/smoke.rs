//! Smoke test of every benchmark against the real `pitwall` binary, with tiny counts for about
//! a second each. It checks correctness only (no failed request, every notification once and
//! in order, every session back after a restart, every packet read back once and in order),
//! never timings: those depend on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The `pitwall` binary built into the same target directory as this test's `pitwall-bench`.
/// `cargo test --workspace` builds every workspace binary before it runs any test.
fn pitwall_binary() -> PathBuf {
    let bench = Path::new(env!("CARGO_BIN_EXE_pitwall-bench"));
    let pitwall = bench.with_file_name("pitwall");
    assert!(
        pitwall.exists(),
        "no pitwall binary at {}: run the tests with `cargo test --workspace`, or build it first \
         with `cargo build --bin pitwall`",
        pitwall.display()
    );
    pitwall
}

/// Runs `pitwall-bench --strict <args>` against a spawned server and returns its JSON report.
fn bench(args: &[&str]) -> Value {
    bench_with_log(args).0
}

/// The JSON report and what the tool wrote to standard error.
fn bench_with_log(args: &[&str]) -> (Value, String) {
    run_bench(args, true)
}

/// Runs `pitwall-bench --strict <args>`, with `--server-bin` when it spawns a server.
fn run_bench(args: &[&str], spawns_server: bool) -> (Value, String) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let json = dir.path().join("report.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pitwall-bench"));
    command.arg("--strict").arg("--json").arg(&json).args(args);
    if spawns_server {
        command.arg("--server-bin").arg(pitwall_binary());
    }
    let output = command.output().expect("pitwall-bench runs");
    assert!(
        output.status.success(),
        "pitwall-bench {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&json).expect("the JSON report is written");
    (
        serde_json::from_str(&text).expect("the JSON report parses"),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn count(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {field} in {value}"))
}

const SHORT_LOAD: &[&str] = &[
    "--duration",
    "0.7",
    "--warmup",
    "0.1",
    "--concurrency",
    "8",
    "--connections",
    "2",
];

#[test]
fn every_load_scenario_answers_every_request() {
    let mut args = vec!["load", "--scenario", "health,create,update,get,end,mixed"];
    args.extend_from_slice(SHORT_LOAD);
    let report = bench(&args);
    let load = report["load"].as_array().expect("load rows");
    let names: Vec<&str> = load.iter().filter_map(|r| r["scenario"].as_str()).collect();
    assert_eq!(names, ["health", "create", "update", "get", "end", "mixed"]);
    for row in load {
        assert!(count(row, "requests") > 0, "no request answered: {row}");
        assert_eq!(count(row, "errors"), 0, "{row}");
        assert!(row["vs_health"].as_f64().is_some(), "{row}");
    }
}

#[test]
fn feed_watchers_receive_the_changes_of_a_load() {
    let mut args = vec!["load", "--scenario", "create", "--feed-watchers", "3"];
    args.extend_from_slice(SHORT_LOAD);
    let (report, log) = bench_with_log(&args);
    let created = count(&report["load"][0], "requests");
    let received: u64 = log
        .lines()
        .find_map(|line| line.strip_prefix("pitwall-bench: 3 feed watchers received "))
        .and_then(|rest| rest.strip_suffix(" events"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no watcher count in the log:\n{log}"));
    // Every watcher saw at least every measured create (warm-up creates come on top).
    assert!(
        received >= 3 * created,
        "{received} events for {created} creates"
    );
}

#[test]
fn open_loop_create_answers_every_request() {
    let mut args = vec!["load", "--scenario", "create,end", "--rate", "200"];
    args.extend_from_slice(SHORT_LOAD);
    let report = bench(&args);
    for row in report["load"].as_array().expect("load rows") {
        assert_eq!(row["pace"], "open 200/s", "{row}");
        assert!(count(row, "requests") > 0, "{row}");
        assert_eq!(count(row, "errors"), 0, "{row}");
    }
}

#[test]
fn fanout_delivers_every_session_to_every_subscriber_in_order() {
    let report = bench(&[
        "fanout",
        "--subscribers",
        "20",
        "--create-rate",
        "200",
        "--seconds",
        "1",
    ]);
    every_session_to_every_subscriber(&report["fanout"][0]);
}

#[test]
fn board_delivers_every_session_to_every_browser_in_order() {
    let report = bench(&[
        "board",
        "--clients",
        "20",
        "--create-rate",
        "200",
        "--seconds",
        "1",
    ]);
    let board = &report["fanout"][0];
    assert_eq!(board["system"], "pitwall board (SSE)");
    every_session_to_every_subscriber(board);
}

/// 20 subscribers got every write once, in order, with no stream failing.
fn every_session_to_every_subscriber(fanout: &Value) {
    assert!(count(fanout, "writes") > 0, "{fanout}");
    assert_eq!(count(fanout, "delivered"), count(fanout, "expected"));
    assert_eq!(count(fanout, "expected"), 20 * count(fanout, "writes"));
    for field in [
        "missed",
        "reordered",
        "duplicates",
        "unexpected",
        "stream_errors",
    ] {
        assert_eq!(count(fanout, field), 0, "{field}: {fanout}");
    }
}

#[test]
fn recovery_restarts_with_every_session() {
    let report = bench(&["recovery", "--sessions", "2000", "--fill-concurrency", "16"]);
    let recovery = &report["recovery"];
    assert_eq!(count(recovery, "sessions_at_ready"), 2000, "{recovery}");
    assert_eq!(count(recovery, "sample_failures"), 0, "{recovery}");
}

/// etcd is optional: the peer runs only where an `etcd` binary is on PATH.
#[test]
fn etcd_peer_runs_when_etcd_is_installed() {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("etcd").is_file()));
    if !on_path {
        eprintln!("etcd is not on PATH; the peer benchmark is skipped");
        return;
    }
    let mut args = vec![
        "etcd",
        "--subscribers",
        "10",
        "--create-rate",
        "100",
        "--seconds",
        "1",
    ];
    args.extend_from_slice(SHORT_LOAD);
    let report = bench(&args);
    let load = report["load"].as_array().expect("load rows");
    assert!(
        load.iter()
            .any(|r| r["scenario"] == "etcd put" && count(r, "requests") > 0)
    );
    let systems: Vec<&str> = report["fanout"]
        .as_array()
        .expect("fan-out rows")
        .iter()
        .filter_map(|r| r["system"].as_str())
        .collect();
    assert_eq!(systems, ["pitwall", "etcd"]);
}

#[test]
fn packet_writes_are_acknowledged_and_reach_the_transport() {
    let report = bench(&[
        "write",
        "--streams",
        "2",
        "--packets-per-request",
        "8",
        "--packets-per-call",
        "32",
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
    ]);
    let rows = report["write"].as_array().expect("write rows");
    let systems: Vec<&str> = rows.iter().filter_map(|r| r["system"].as_str()).collect();
    // The disk again at the size of Pitwall's commits, read from its metrics.
    assert_eq!(
        systems,
        [
            "pitwall",
            "no-op RPC",
            "write+fdatasync",
            "write+fdatasync, Pitwall's commits"
        ]
    );
    for row in rows {
        assert!(count(row, "packets") > 0, "{row}");
        assert_eq!(count(row, "errors"), 0, "{row}");
        assert_eq!(count(row, "lost"), 0, "{row}");
        assert!(row["pitwall_ratio"].as_f64().is_some(), "{row}");
    }
    assert_eq!(rows[2]["packets_per_commit"].as_f64(), Some(16.0));
}

#[test]
fn replay_reads_back_every_packet_once_in_order() {
    let report = bench(&["replay", "--packets", "1000", "--fill-streams", "2"]);
    let rows = report["replay"].as_array().expect("replay rows");
    // The server's defaults, then restarted with --batching-responses.
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(count(row, "stored"), 1000, "{row}");
        assert_eq!(count(row, "received"), 1000, "{row}");
        for field in ["missing", "reordered", "duplicates", "unexpected"] {
            assert_eq!(count(row, field), 0, "{field}: {row}");
        }
    }
    // One packet per response by default; fewer, larger responses when batching.
    assert_eq!(count(&rows[0], "responses"), 1000);
    assert!(count(&rows[1], "responses") < 1000, "{}", rows[1]);
}

#[test]
fn live_readers_receive_every_packet_once_in_order() {
    let report = bench(&[
        "live",
        "--readers",
        "2",
        "--rate",
        "100",
        "--seconds",
        "0.5",
        "--writers",
        "2",
    ]);
    let live = &report["live"][0];
    assert!(count(live, "writes") > 0, "{live}");
    assert_eq!(count(live, "expected"), 2 * count(live, "writes"), "{live}");
    assert_eq!(count(live, "delivered"), count(live, "expected"), "{live}");
    for field in [
        "missed",
        "reordered",
        "duplicates",
        "unexpected",
        "stream_errors",
    ] {
        assert_eq!(count(live, field), 0, "{field}: {live}");
    }
}

#[test]
fn memory_measures_connections_readers_and_a_stalled_reader() {
    let report = bench(&[
        "memory",
        "--connections",
        "10",
        "--readers",
        "10",
        "--stalled-mib",
        "2",
        "--settle-ms",
        "50",
    ]);
    let memory = &report["memory"];
    assert_eq!(count(memory, "connections"), 10, "{memory}");
    assert_eq!(count(memory, "readers"), 10, "{memory}");
    assert_eq!(count(memory, "stalled_written_bytes"), 2 << 20, "{memory}");
    assert_eq!(count(memory, "stalled_write_errors"), 0, "{memory}");
    assert_eq!(memory["stalled_reader_alive"], true, "{memory}");
}

#[test]
fn every_storage_engine_reads_back_what_it_wrote() {
    let (report, _) = run_bench(&["engines", "--packets", "500", "--batch", "64"], false);
    let rows = report["engines"].as_array().expect("engine rows");
    assert_eq!(rows.len(), 4);
    for row in rows {
        assert_eq!(count(row, "packets"), 500, "{row}");
        assert_eq!(count(row, "read_errors"), 0, "{row}");
    }
}

#[test]
fn all_quick_reports_the_data_plane_and_its_goals() {
    let report = bench(&["all", "--quick", "--no-etcd", "--no-sessions"]);
    assert_eq!(count(&report, "runs"), 1);
    assert!(
        report
            .get("load")
            .is_none_or(|rows| rows.as_array().is_some_and(Vec::is_empty))
    );
    assert_eq!(report["write"].as_array().map(Vec::len), Some(4));
    assert_eq!(report["replay"].as_array().map(Vec::len), Some(2));
    assert_eq!(report["live"].as_array().map(Vec::len), Some(1));
    assert!(report["memory"].is_object());
    assert_eq!(report["engines"].as_array().map(Vec::len), Some(4));
    let goals = report["goals"].as_array().expect("goals");
    assert_eq!(goals.len(), 5, "{goals:?}");
}

#[test]
fn all_quick_reports_every_table_and_goal() {
    let report = bench(&[
        "all",
        "--quick",
        "--no-etcd",
        "--no-dataplane",
        "--no-engines",
        "--runs",
        "2",
    ]);
    assert_eq!(count(&report, "runs"), 2);
    assert!(
        report["load"]
            .as_array()
            .is_some_and(|rows| rows.len() == 7)
    );
    assert!(report["recovery"].is_object());
    let goals = report["goals"].as_array().expect("goals");
    assert!(goals.len() >= 4, "{goals:?}");
}
