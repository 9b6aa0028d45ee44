//! Write requests as commands: checked on their own ([`Command::validate`]), then decided against
//! the session as it stands ([`Command::decide`]) into the record to append, if any.

use std::collections::BTreeMap;

use pitwall_proto::api::{
    AddAssociateSessionRequest, CreateSessionRequest, EndSessionRequest,
    UpdateSessionDetailsRequest, UpdateSessionIdentifierRequest,
};
use pitwall_proto::open_data::{EndOfSessionPacket, NewSessionPacket, SessionInfoPacket};
use prost::Message;
use prost_types::Timestamp;

use crate::lifecycle::{AutoEndPolicy, END_REASON_DETAIL, auto_end_due, retention_expired};
use crate::record::Record;
use crate::rejection::{Rejection, quote};
use crate::session::Session;
use crate::validate::{Limits, check_associate, check_timestamp, check_utc_offset};

/// Bytes the stored form of a new session adds to its `NewSession` packet: field tags, lengths
/// and the sequence number.
const STORED_OVERHEAD_BYTES: usize = 24;

/// The type a session gets when the request names none.
pub const DEFAULT_SESSION_TYPE: &str = "Session";

/// A session-changing request. `Create` carries the key chosen for the new session.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Create {
        session_key: String,
        request: CreateSessionRequest,
    },
    End(EndSessionRequest),
    UpdateIdentifier(UpdateSessionIdentifierRequest),
    AddAssociate(AddAssociateSessionRequest),
    UpdateDetails(UpdateSessionDetailsRequest),
    /// Ends an abandoned session on the server's own initiative. Decided again against the
    /// session as it stands, so activity since the scan that found it cancels it.
    AutoEnd {
        session_key: String,
        policy: AutoEndPolicy,
    },
    /// Removes a completed session kept for `completed_for` (retention). Decided again against
    /// the session as it stands, like an auto-end.
    Purge {
        session_key: String,
        completed_for: std::time::Duration,
    },
    /// A session record a client wrote itself, as an info packet (`WriteInfoPacket`): applied
    /// as the reference applies its session topic (a second `NewSession` for a key changes
    /// nothing; an update or an end needs its session).
    Record(Record),
}

/// What a command does once decided.
// Most decisions are appends; boxing the record would add an allocation per write to shrink
// values that only move once, from the writer to the waiting caller.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Append this record; the request succeeds once it is durable and applied.
    Append(Record),
    /// Append these records, in order (an auto-end: its reason, then the end).
    AppendAll(Vec<Record>),
    /// The request succeeds and changes nothing (an empty identifier, a known associate, details
    /// already holding these values).
    Unchanged,
    /// The session had already ended: the request succeeds with the original end packet.
    AlreadyEnded(EndOfSessionPacket),
}

/// What deciding needs from outside: the time, the limits, and the offsets a session starts or
/// ends at for a data source (from the broker, or fixed without one).
pub struct Context<'a> {
    pub now: Timestamp,
    pub limits: &'a Limits,
    pub offsets: &'a dyn Fn(&str) -> BTreeMap<String, i64>,
}

pub use crate::session::embedded_offsets;

impl Command {
    pub fn session_key(&self) -> &str {
        match self {
            Command::Create { session_key, .. } => session_key,
            Command::End(r) => &r.session_key,
            Command::UpdateIdentifier(r) => &r.session_key,
            Command::AddAssociate(r) => &r.session_key,
            Command::UpdateDetails(r) => &r.session_key,
            Command::AutoEnd { session_key, .. } | Command::Purge { session_key, .. } => {
                session_key
            }
            Command::Record(record) => record.session_key(),
        }
    }

    /// Checks the request's own fields, before any state is looked at.
    pub fn validate(&self, limits: &Limits) -> Result<(), Rejection> {
        match self {
            Command::Create {
                session_key,
                request,
            } => {
                limits.check_data_source(&request.data_source)?;
                limits.check_type(&request.r#type)?;
                limits.check_identifier(&request.identifier)?;
                limits.check_detail_count(request.details.len())?;
                for (name, value) in &request.details {
                    limits.check_detail(name, value)?;
                }
                for associate in &request.associate_session_key {
                    check_associate(session_key, associate)?;
                }
                limits.check_associate_count(distinct(&request.associate_session_key).len())?;
                if let Some(offset) = &request.utc_offset {
                    check_utc_offset(offset)?;
                }
                if let Some(time) = &request.creation_time {
                    check_timestamp("creation_time", time)?;
                }
                Ok(())
            }
            Command::End(request) => match &request.termination_time {
                Some(time) => check_timestamp("termination_time", time),
                None => Ok(()),
            },
            Command::UpdateIdentifier(request) => limits.check_identifier(&request.identifier),
            Command::AddAssociate(request) => {
                check_associate(&request.session_key, &request.associate_session_key)
            }
            Command::UpdateDetails(request) => {
                limits.check_detail_count(request.details.len())?;
                for (name, value) in &request.details {
                    limits.check_detail(name, value)?;
                }
                Ok(())
            }
            Command::AutoEnd { .. } | Command::Purge { .. } => Ok(()),
            Command::Record(record) => validate_record(record, limits),
        }
    }

    /// Decides the command against `current`, the session with this command's key as it will
    /// stand when the record is appended. Call [`Command::validate`] first.
    pub fn decide(self, current: Option<&Session>, ctx: &Context) -> Result<Decision, Rejection> {
        if let Command::Record(record) = self {
            return decide_record(record, current, ctx);
        }
        if let Command::Create {
            session_key,
            request,
        } = self
        {
            if current.is_some() {
                return Err(Rejection::invalid(format!(
                    "session key {} is already in use",
                    quote(&session_key)
                )));
            }
            return create(session_key, request, ctx);
        }
        let session =
            current.ok_or_else(|| Rejection::UnknownSession(self.session_key().into()))?;
        match self {
            Command::Create { .. } | Command::Record(_) => unreachable!("handled above"),
            Command::End(request) => end(session, request, ctx),
            Command::UpdateIdentifier(request) => {
                if request.identifier.is_empty() || request.identifier == session.identifier {
                    return Ok(Decision::Unchanged);
                }
                let packet = SessionInfoPacket {
                    identifier: request.identifier,
                    ..Default::default()
                };
                update(session, request.session_key, packet, ctx.limits)
            }
            Command::AddAssociate(request) => {
                if session.associates.contains(&request.associate_session_key) {
                    return Ok(Decision::Unchanged);
                }
                ctx.limits
                    .check_associate_count(session.associates.len() + 1)?;
                let mut associates = session.associates.clone();
                associates.push(request.associate_session_key);
                let packet = SessionInfoPacket {
                    associate_session_keys: associates,
                    ..Default::default()
                };
                update(session, request.session_key, packet, ctx.limits)
            }
            Command::UpdateDetails(request) => {
                let changed: BTreeMap<String, String> = request
                    .details
                    .into_iter()
                    .filter(|(name, value)| session.details.get(name) != Some(value))
                    .collect();
                if changed.is_empty() {
                    return Ok(Decision::Unchanged);
                }
                let packet = SessionInfoPacket {
                    details: changed,
                    ..Default::default()
                };
                update(session, request.session_key, packet, ctx.limits)
            }
            Command::AutoEnd {
                session_key,
                policy,
            } => Ok(auto_end(session, session_key, &policy, ctx)),
            Command::Purge {
                session_key,
                completed_for,
            } => Ok(if retention_expired(session, completed_for, ctx.now) {
                Decision::Append(Record::Purge { session_key })
            } else {
                Decision::Unchanged
            }),
        }
    }
}

impl Decision {
    /// The records to append, in order.
    pub fn records(&self) -> &[Record] {
        match self {
            Decision::Append(record) => std::slice::from_ref(record),
            Decision::AppendAll(records) => records,
            Decision::Unchanged | Decision::AlreadyEnded(_) => &[],
        }
    }
}

/// Checks a client's session record on its own, as a create or an update would be checked.
fn validate_record(record: &Record, limits: &Limits) -> Result<(), Rejection> {
    if record.session_key().is_empty() {
        return Err(Rejection::invalid(
            "the packet's session_key is empty; a session record names its session",
        ));
    }
    limits.check_packet_session_key(record.session_key())?;
    let check_info = |info: &SessionInfoPacket| -> Result<(), Rejection> {
        limits.check_type(&info.r#type)?;
        limits.check_identifier(&info.identifier)?;
        limits.check_detail_count(info.details.len())?;
        for (name, value) in &info.details {
            limits.check_detail(name, value)?;
        }
        limits.check_associate_count(distinct(&info.associate_session_keys).len())?;
        Ok(())
    };
    match record {
        Record::NewSession { packet, .. } => {
            limits.check_data_source(&packet.data_source)?;
            if let Some(info) = &packet.session_info {
                check_info(info)?;
            }
            if let Some(offset) = &packet.utc_offset {
                check_utc_offset(offset)?;
            }
            if let Some(time) = &packet.creation_time {
                check_timestamp("creation_time", time)?;
            }
            Ok(())
        }
        Record::SessionInfo { packet, .. } => check_info(packet),
        Record::EndOfSession { packet, .. } => match &packet.termination_time {
            Some(time) => check_timestamp("termination_time", time),
            None => Ok(()),
        },
        Record::Purge { .. } => Err(Rejection::invalid(
            "a purge is Pitwall's own record (retention); clients end sessions with EndOfSession",
        )),
    }
}

/// A client's session record against the session as it stands.
fn decide_record(
    record: Record,
    current: Option<&Session>,
    ctx: &Context,
) -> Result<Decision, Rejection> {
    match (record, current) {
        // The first `NewSession` for a key wins.
        (Record::NewSession { .. }, Some(_)) => Ok(Decision::Unchanged),
        (
            Record::NewSession {
                session_key,
                packet,
            },
            None,
        ) => {
            ctx.limits.check_session_size(
                packet.encoded_len() + session_key.len() + STORED_OVERHEAD_BYTES,
            )?;
            Ok(Decision::Append(Record::NewSession {
                session_key,
                packet,
            }))
        }
        (record, None) => Err(Rejection::UnknownSession(record.session_key().to_owned())),
        (
            Record::SessionInfo {
                session_key,
                packet,
            },
            Some(session),
        ) => update(session, session_key, packet, ctx.limits),
        (Record::EndOfSession { .. }, Some(session)) if session.end.is_some() => Ok(
            Decision::AlreadyEnded(session.end.as_deref().cloned().unwrap_or_default()),
        ),
        (record @ Record::EndOfSession { .. }, Some(_)) => Ok(Decision::Append(record)),
        (Record::Purge { .. }, Some(_)) => Err(Rejection::invalid(
            "a purge is Pitwall's own record (retention); clients end sessions with EndOfSession",
        )),
    }
}

/// The reason detail, then the end, if the session is still due; nothing otherwise.
fn auto_end(
    session: &Session,
    session_key: String,
    policy: &AutoEndPolicy,
    ctx: &Context,
) -> Decision {
    let Some(due) = auto_end_due(session, policy, ctx.now) else {
        return Decision::Unchanged;
    };
    let reason = Record::SessionInfo {
        session_key: session_key.clone(),
        packet: SessionInfoPacket {
            details: BTreeMap::from([(
                END_REASON_DETAIL.to_owned(),
                due.reason.as_str().to_owned(),
            )]),
            ..Default::default()
        },
    };
    let end = Record::EndOfSession {
        session_key,
        packet: EndOfSessionPacket {
            topic_partition_offsets: (ctx.offsets)(&session.data_source),
            data_source: session.data_source.clone(),
            termination_time: Some(due.termination_time),
        },
    };
    Decision::AppendAll(vec![reason, end])
}

fn create(
    session_key: String,
    request: CreateSessionRequest,
    ctx: &Context,
) -> Result<Decision, Rejection> {
    let session_type = if request.r#type.is_empty() {
        DEFAULT_SESSION_TYPE.to_owned()
    } else {
        request.r#type
    };
    let utc_offset = request.utc_offset.unwrap_or_default();
    if let Some(creation_time) = request.creation_time {
        ctx.limits.check_creation_time(creation_time, ctx.now)?;
    }
    let creation_time = request.creation_time.unwrap_or(ctx.now);
    let info = SessionInfoPacket {
        data_source: request.data_source.clone(),
        identifier: request.identifier,
        r#type: session_type,
        version: request.version.max(1),
        associate_session_keys: distinct(&request.associate_session_key),
        details: request.details,
        utc_offset: Some(utc_offset),
        creation_time: Some(creation_time),
        termination_time: None,
    };
    let packet = NewSessionPacket {
        topic_partition_offsets: (ctx.offsets)(&request.data_source),
        data_source: request.data_source,
        utc_offset: Some(utc_offset),
        session_info: Some(info),
        creation_time: Some(creation_time),
    };
    // The stored form is this packet plus the key and the sequence number: no need to build the
    // session just to measure it.
    ctx.limits
        .check_session_size(packet.encoded_len() + session_key.len() + STORED_OVERHEAD_BYTES)?;
    Ok(Decision::Append(Record::NewSession {
        session_key,
        packet,
    }))
}

fn end(
    session: &Session,
    request: EndSessionRequest,
    ctx: &Context,
) -> Result<Decision, Rejection> {
    let termination_time = request.termination_time.unwrap_or(ctx.now);
    if let Some(creation_time) = session.creation_time
        && (termination_time.seconds, termination_time.nanos)
            < (creation_time.seconds, creation_time.nanos)
    {
        let whose = if request.termination_time.is_some() {
            "termination_time"
        } else {
            "the server's clock (no termination_time given)"
        };
        return Err(Rejection::invalid(format!(
            "{whose} {} is earlier than the session's creation_time {}",
            termination_time, creation_time
        )));
    }
    if let Some(end) = &session.end {
        return Ok(Decision::AlreadyEnded(end.as_ref().clone()));
    }
    Ok(Decision::Append(Record::EndOfSession {
        session_key: request.session_key,
        packet: EndOfSessionPacket {
            topic_partition_offsets: (ctx.offsets)(&session.data_source),
            data_source: session.data_source.clone(),
            termination_time: Some(termination_time),
        },
    }))
}

/// A `SessionInfo` merge, refused if the merged session would break the count or size limits.
fn update(
    session: &Session,
    session_key: String,
    packet: SessionInfoPacket,
    limits: &Limits,
) -> Result<Decision, Rejection> {
    let mut merged = session.clone();
    merged.merge(&packet);
    limits.check_detail_count(merged.details.len())?;
    limits.check_session_size(merged.encoded_len())?;
    Ok(Decision::Append(Record::SessionInfo {
        session_key,
        packet,
    }))
}

/// Keys in order of first occurrence, duplicates dropped.
fn distinct(keys: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    keys.iter()
        .filter(|key| seen.insert(key.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use prost_types::Duration;

    use super::*;
    use crate::projection::Projection;

    const NOW: Timestamp = Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    };

    fn run(projection: &mut Projection, command: Command) -> Result<Decision, Rejection> {
        let limits = Limits::default();
        command.validate(&limits)?;
        let key = command.session_key().to_owned();
        let ctx = Context {
            now: NOW,
            limits: &limits,
            offsets: &embedded_offsets,
        };
        let decision = command.decide(projection.get(&key), &ctx)?;
        for record in decision.records() {
            projection.apply(record.clone(), NOW);
        }
        Ok(decision)
    }

    fn create(projection: &mut Projection, key: &str, request: CreateSessionRequest) -> Decision {
        run(
            projection,
            Command::Create {
                session_key: key.into(),
                request,
            },
        )
        .unwrap()
    }

    fn created(key: &str) -> Projection {
        let mut p = Projection::default();
        create(
            &mut p,
            key,
            CreateSessionRequest {
                data_source: "ds".into(),
                ..Default::default()
            },
        );
        p
    }

    fn new_session_packet(decision: Decision) -> NewSessionPacket {
        match decision {
            Decision::Append(Record::NewSession { packet, .. }) => packet,
            other => panic!("expected a NewSession, got {other:?}"),
        }
    }

    #[test]
    fn create_defaults_type_version_offset_and_creation_time() {
        let mut p = Projection::default();
        let packet = new_session_packet(create(
            &mut p,
            "k",
            CreateSessionRequest {
                data_source: "ds".into(),
                ..Default::default()
            },
        ));
        let info = packet.session_info.unwrap();
        assert_eq!(info.r#type, "Session");
        assert_eq!(info.version, 1);
        assert_eq!(packet.utc_offset, Some(Duration::default()));
        assert_eq!(packet.creation_time, Some(NOW));
        assert_eq!(info.creation_time, Some(NOW));
    }

    #[test]
    fn create_without_a_broker_starts_at_offset_zero_of_main_and_essentials() {
        let mut p = Projection::default();
        let packet = new_session_packet(create(
            &mut p,
            "k",
            CreateSessionRequest {
                data_source: "Car1".into(),
                ..Default::default()
            },
        ));
        assert_eq!(
            packet.topic_partition_offsets,
            BTreeMap::from([("Car1:0".to_owned(), 0), ("Car1_essential:0".to_owned(), 0)])
        );
    }

    #[test]
    fn create_keeps_given_values_and_collapses_duplicate_associates() {
        let mut p = Projection::default();
        let packet = new_session_packet(create(
            &mut p,
            "k",
            CreateSessionRequest {
                data_source: "ds".into(),
                r#type: "Dyno".into(),
                version: 4,
                identifier: "run".into(),
                associate_session_key: vec!["b".into(), "a".into(), "b".into()],
                utc_offset: Some(Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                creation_time: Some(Timestamp {
                    seconds: 5,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ));
        let info = packet.session_info.unwrap();
        assert_eq!((info.r#type.as_str(), info.version), ("Dyno", 4));
        assert_eq!(info.associate_session_keys, vec!["b", "a"]);
        assert_eq!(packet.creation_time.unwrap().seconds, 5);
    }

    #[test]
    fn create_refuses_an_associate_equal_to_its_own_key() {
        let mut p = Projection::default();
        let outcome = run(
            &mut p,
            Command::Create {
                session_key: "k".into(),
                request: CreateSessionRequest {
                    data_source: "ds".into(),
                    associate_session_key: vec!["k".into()],
                    ..Default::default()
                },
            },
        );
        assert!(matches!(outcome, Err(Rejection::Invalid(_))));
        assert!(p.is_empty());
    }

    #[test]
    fn create_refuses_a_session_over_the_size_limit() {
        let limits = Limits {
            session_bytes: 200,
            ..Limits::default()
        };
        let command = Command::Create {
            session_key: "k".into(),
            request: CreateSessionRequest {
                data_source: "ds".into(),
                identifier: "x".repeat(300),
                ..Default::default()
            },
        };
        command.validate(&limits).unwrap();
        let ctx = Context {
            now: NOW,
            limits: &limits,
            offsets: &embedded_offsets,
        };
        assert!(matches!(
            command.decide(None, &ctx),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn create_refuses_a_creation_time_beyond_the_skew_in_the_servers_future() {
        let mut p = Projection::default();
        let at = |seconds| Command::Create {
            session_key: "k".into(),
            request: CreateSessionRequest {
                data_source: "ds".into(),
                creation_time: Some(Timestamp {
                    seconds: NOW.seconds + seconds,
                    nanos: 0,
                }),
                ..Default::default()
            },
        };
        let outcome = run(&mut p, at(3600));
        assert!(
            matches!(&outcome, Err(Rejection::Invalid(m)) if m.contains("ahead of the server's clock")),
            "{outcome:?}"
        );
        assert!(p.is_empty());
        assert!(run(&mut p, at(60)).is_ok());
    }

    #[test]
    fn ending_an_unknown_session_is_refused() {
        let mut p = Projection::default();
        let outcome = run(
            &mut p,
            Command::End(EndSessionRequest {
                session_key: "nope".into(),
                ..Default::default()
            }),
        );
        assert_eq!(outcome, Err(Rejection::UnknownSession("nope".into())));
    }

    #[test]
    fn ending_uses_the_sessions_data_source_not_the_requests() {
        let mut p = created("k");
        let outcome = run(
            &mut p,
            Command::End(EndSessionRequest {
                session_key: "k".into(),
                data_source: "other".into(),
                termination_time: None,
            }),
        )
        .unwrap();
        let Decision::Append(Record::EndOfSession { packet, .. }) = outcome else {
            panic!("expected an end record");
        };
        assert_eq!(packet.data_source, "ds");
        assert_eq!(packet.termination_time, Some(NOW));
        assert!(packet.topic_partition_offsets.contains_key("ds:0"));
    }

    #[test]
    fn ending_an_ended_session_returns_the_original_packet() {
        let mut p = created("k");
        let first = run(
            &mut p,
            Command::End(EndSessionRequest {
                session_key: "k".into(),
                ..Default::default()
            }),
        )
        .unwrap();
        let Decision::Append(Record::EndOfSession { packet, .. }) = first else {
            panic!("expected an end record");
        };
        let later = Timestamp {
            seconds: NOW.seconds + 100,
            nanos: 0,
        };
        let second = run(
            &mut p,
            Command::End(EndSessionRequest {
                session_key: "k".into(),
                termination_time: Some(later),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(second, Decision::AlreadyEnded(packet));
    }

    #[test]
    fn termination_before_creation_is_refused() {
        let mut p = created("k");
        let outcome = run(
            &mut p,
            Command::End(EndSessionRequest {
                session_key: "k".into(),
                termination_time: Some(Timestamp {
                    seconds: NOW.seconds - 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        );
        assert!(matches!(outcome, Err(Rejection::Invalid(_))));
        assert!(!p.get("k").unwrap().is_complete());
    }

    #[test]
    fn an_invalid_termination_time_is_refused_even_for_an_ended_session() {
        let mut p = created("k");
        let end = |termination_time| {
            Command::End(EndSessionRequest {
                session_key: "k".into(),
                termination_time,
                ..Default::default()
            })
        };
        run(&mut p, end(None)).unwrap();
        let outcome = run(
            &mut p,
            end(Some(Timestamp {
                seconds: 0,
                nanos: -1,
            })),
        );
        assert!(matches!(outcome, Err(Rejection::Invalid(_))));
    }

    #[test]
    fn an_empty_identifier_succeeds_and_changes_nothing() {
        let mut p = created("k");
        let outcome = run(
            &mut p,
            Command::UpdateIdentifier(UpdateSessionIdentifierRequest {
                session_key: "k".into(),
                identifier: String::new(),
            }),
        );
        assert_eq!(outcome, Ok(Decision::Unchanged));
    }

    #[test]
    fn updating_an_unknown_session_is_refused() {
        let mut p = Projection::default();
        let commands = [
            Command::UpdateIdentifier(UpdateSessionIdentifierRequest {
                session_key: "x".into(),
                identifier: "i".into(),
            }),
            Command::AddAssociate(AddAssociateSessionRequest {
                session_key: "x".into(),
                associate_session_key: "y".into(),
            }),
            Command::UpdateDetails(UpdateSessionDetailsRequest {
                session_key: "x".into(),
                details: [("a".to_owned(), "b".to_owned())].into(),
            }),
        ];
        for command in commands {
            assert_eq!(
                run(&mut p, command),
                Err(Rejection::UnknownSession("x".into()))
            );
        }
    }

    #[test]
    fn adding_an_associate_appends_it_and_adding_it_again_changes_nothing() {
        let mut p = created("k");
        let add = |key: &str| {
            Command::AddAssociate(AddAssociateSessionRequest {
                session_key: "k".into(),
                associate_session_key: key.into(),
            })
        };
        run(&mut p, add("a")).unwrap();
        run(&mut p, add("b")).unwrap();
        assert_eq!(run(&mut p, add("a")), Ok(Decision::Unchanged));
        assert_eq!(p.get("k").unwrap().associates, vec!["a", "b"]);
    }

    #[test]
    fn associates_beyond_the_limit_are_refused() {
        let mut p = created("k");
        let limits = Limits {
            associates_per_session: 1,
            ..Limits::default()
        };
        let ctx = Context {
            now: NOW,
            limits: &limits,
            offsets: &embedded_offsets,
        };
        let add = |key: &str| {
            Command::AddAssociate(AddAssociateSessionRequest {
                session_key: "k".into(),
                associate_session_key: key.into(),
            })
        };
        let Decision::Append(record) = add("a").decide(p.get("k"), &ctx).unwrap() else {
            panic!("expected a record");
        };
        p.apply(record, NOW);
        assert!(matches!(
            add("b").decide(p.get("k"), &ctx),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn details_update_writes_only_changed_entries() {
        let mut p = created("k");
        run(
            &mut p,
            Command::UpdateDetails(UpdateSessionDetailsRequest {
                session_key: "k".into(),
                details: [("a".to_owned(), "1".to_owned())].into(),
            }),
        )
        .unwrap();
        let outcome = run(
            &mut p,
            Command::UpdateDetails(UpdateSessionDetailsRequest {
                session_key: "k".into(),
                details: [
                    ("a".to_owned(), "1".to_owned()),
                    ("b".to_owned(), "2".to_owned()),
                ]
                .into(),
            }),
        )
        .unwrap();
        let Decision::Append(Record::SessionInfo { packet, .. }) = outcome else {
            panic!("expected a SessionInfo record");
        };
        assert_eq!(
            packet.details,
            BTreeMap::from([("b".to_owned(), "2".to_owned())])
        );
    }

    #[test]
    fn an_empty_details_map_succeeds_and_changes_nothing() {
        let mut p = created("k");
        let outcome = run(
            &mut p,
            Command::UpdateDetails(UpdateSessionDetailsRequest {
                session_key: "k".into(),
                details: BTreeMap::new(),
            }),
        );
        assert_eq!(outcome, Ok(Decision::Unchanged));
    }

    #[test]
    fn details_beyond_the_count_limit_after_merge_are_refused() {
        let mut p = created("k");
        let limits = Limits {
            details_per_session: 2,
            ..Limits::default()
        };
        let ctx = Context {
            now: NOW,
            limits: &limits,
            offsets: &embedded_offsets,
        };
        let update = |name: &str| {
            Command::UpdateDetails(UpdateSessionDetailsRequest {
                session_key: "k".into(),
                details: [(name.to_owned(), "v".to_owned())].into(),
            })
        };
        for name in ["a", "b"] {
            let Decision::Append(record) = update(name).decide(p.get("k"), &ctx).unwrap() else {
                panic!("expected a record");
            };
            p.apply(record, NOW);
        }
        assert!(matches!(
            update("c").decide(p.get("k"), &ctx),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn ended_sessions_may_still_be_updated() {
        let mut p = created("k");
        run(
            &mut p,
            Command::End(EndSessionRequest {
                session_key: "k".into(),
                ..Default::default()
            }),
        )
        .unwrap();
        run(
            &mut p,
            Command::UpdateIdentifier(UpdateSessionIdentifierRequest {
                session_key: "k".into(),
                identifier: "after the run".into(),
            }),
        )
        .unwrap();
        assert_eq!(p.get("k").unwrap().identifier, "after the run");
    }

    #[test]
    fn an_auto_end_records_its_reason_then_ends_at_the_last_activity() {
        let mut p = created("k");
        let limits = Limits::default();
        let at = |seconds| Context {
            now: Timestamp {
                seconds: NOW.seconds + seconds,
                nanos: 0,
            },
            limits: &limits,
            offsets: &embedded_offsets,
        };
        let auto_end = || Command::AutoEnd {
            session_key: "k".into(),
            policy: AutoEndPolicy {
                idle_after: Some(std::time::Duration::from_secs(60)),
                max_duration: None,
            },
        };
        assert_eq!(
            auto_end().decide(p.get("k"), &at(59)),
            Ok(Decision::Unchanged)
        );
        let decision = auto_end().decide(p.get("k"), &at(61)).unwrap();
        let Decision::AppendAll(records) = &decision else {
            panic!("expected two records, got {decision:?}");
        };
        let [
            Record::SessionInfo { packet: info, .. },
            Record::EndOfSession { packet: end, .. },
        ] = records.as_slice()
        else {
            panic!("expected the reason then the end, got {records:?}");
        };
        assert_eq!(
            info.details.get(END_REASON_DETAIL).map(String::as_str),
            Some("idle")
        );
        assert_eq!(end.termination_time, Some(NOW));
        for record in decision.records() {
            p.apply(record.clone(), at(61).now);
        }
        // Already ended: a later pass changes nothing.
        assert_eq!(
            auto_end().decide(p.get("k"), &at(500)),
            Ok(Decision::Unchanged)
        );
    }
}
