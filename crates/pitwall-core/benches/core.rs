//! Micro-benchmarks of the pure code on every write's path: the record codec, projection
//! apply, request validation and the session's durable encoding. Run with
//! `cargo bench -p pitwall-core`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use pitwall_core::command::{Context, embedded_offsets};
use pitwall_core::{Command, Decision, Limits, Projection, Record, Session};
use pitwall_proto::api::{CreateSessionRequest, EndSessionRequest, UpdateSessionDetailsRequest};
use prost_types::Timestamp;

const AT: Timestamp = Timestamp {
    seconds: 1_700_000_000,
    nanos: 0,
};

const SESSION_KEY: &str = "3f2b8c1e-9d4a-4e7b-a1c2-5f6e7d8c9b0a";

/// A create as the load benchmark sends it: five details, an identifier, a type.
fn create_request() -> CreateSessionRequest {
    let details: BTreeMap<String, String> = [
        ("driver", "driver-07"),
        ("car", "car-3"),
        ("track", "silverstone-gp"),
        ("event", "practice-2"),
        ("weather", "dry 21C"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    CreateSessionRequest {
        data_source: "bench".to_owned(),
        r#type: "Session".to_owned(),
        version: 1,
        identifier: "run 7".to_owned(),
        details,
        ..Default::default()
    }
}

fn create_command() -> Command {
    Command::Create {
        session_key: SESSION_KEY.to_owned(),
        request: create_request(),
    }
}

/// The record `command` appends to `current`, as the engine's writer decides it.
fn decide(command: Command, current: Option<&Session>) -> Record {
    let limits = Limits::default();
    let ctx = Context {
        now: Timestamp {
            seconds: 1_760_000_000,
            nanos: 0,
        },
        limits: &limits,
        offsets: &embedded_offsets,
    };
    match command.decide(current, &ctx) {
        Ok(Decision::Append(record)) => record,
        other => panic!("the benchmark's command must append a record, got {other:?}"),
    }
}

fn new_session_record() -> Record {
    decide(create_command(), None)
}

fn started_projection() -> Projection {
    let mut projection = Projection::default();
    projection.apply(new_session_record(), AT);
    projection
}

fn session_info_record(projection: &Projection) -> Record {
    let update = Command::UpdateDetails(UpdateSessionDetailsRequest {
        session_key: SESSION_KEY.to_owned(),
        details: BTreeMap::from([("lap".to_owned(), "12".to_owned())]),
    });
    decide(update, projection.get(SESSION_KEY))
}

fn end_record(projection: &Projection) -> Record {
    let end = Command::End(EndSessionRequest {
        session_key: SESSION_KEY.to_owned(),
        ..Default::default()
    });
    decide(end, projection.get(SESSION_KEY))
}

fn record_codec(c: &mut Criterion) {
    let record = new_session_record();
    let bytes = record.encode();
    c.bench_function("record/encode NewSession", |b| {
        b.iter(|| black_box(&record).encode())
    });
    c.bench_function("record/decode NewSession", |b| {
        b.iter(|| Record::decode(black_box(&bytes)))
    });
}

fn projection_apply(c: &mut Criterion) {
    let prepared = started_projection();
    let info = session_info_record(&prepared);
    let end = end_record(&prepared);
    // Each apply gets a fresh projection (built outside the timing), so a NewSession is never
    // ignored as a repeat and updates always find their live session.
    c.bench_function("projection/apply NewSession", |b| {
        b.iter_batched(
            || (Projection::default(), new_session_record()),
            |(mut projection, record)| {
                projection.apply(record, AT);
                projection
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("projection/apply SessionInfo", |b| {
        b.iter_batched(
            || (started_projection(), info.clone()),
            |(mut projection, record)| {
                projection.apply(record, AT);
                projection
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("projection/apply EndOfSession", |b| {
        b.iter_batched(
            || (started_projection(), end.clone()),
            |(mut projection, record)| {
                projection.apply(record, AT);
                projection
            },
            BatchSize::SmallInput,
        )
    });
}

fn validation(c: &mut Criterion) {
    let command = create_command();
    let limits = Limits::default();
    c.bench_function("validate/CreateSession with 5 details", |b| {
        b.iter(|| black_box(&command).validate(black_box(&limits)))
    });
}

fn session_encoding(c: &mut Criterion) {
    let projection = started_projection();
    let session = projection
        .get(SESSION_KEY)
        .expect("the session was started");
    c.bench_function("session/encode (5 details)", |b| {
        b.iter(|| black_box(session).encode())
    });
}

criterion_group!(
    benches,
    record_codec,
    projection_apply,
    validation,
    session_encoding
);
criterion_main!(benches);
