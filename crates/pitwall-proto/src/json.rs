//! The JSON form of `pitwall.v1` sessions, feed events and associate trees: what `pitwall
//! session … --output json` prints and what the board reads. Times are RFC 3339 in UTC, UTC
//! offsets `±HH:MM`, event kinds their protobuf names (`STARTED`).

use prost_types::{Duration, Timestamp};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::pitwall::v1::{EventKind, Session, SessionEvent, SessionNode};

pub fn session(session: &Session) -> Value {
    json!({
        "session_key": session.session_key,
        "data_source": session.data_source,
        "identifier": session.identifier,
        "type": session.r#type,
        "version": session.version,
        "is_complete": session.is_complete,
        "creation_time": session.creation_time.as_ref().map(format_time),
        "termination_time": session.termination_time.as_ref().map(format_time),
        "last_activity_time": session.last_activity_time.as_ref().map(format_time),
        "utc_offset": format_utc_offset(&session.utc_offset.unwrap_or_default()),
        "associate_session_keys": session.associate_session_keys,
        "details": session.details,
        "topic_partition_offsets": session.topic_partition_offsets,
    })
}

pub fn event(event: &SessionEvent) -> Value {
    json!({
        "sequence": event.sequence,
        "kind": kind_name(event.kind),
        "session_key": event.session_key,
        "data_source": event.data_source,
        "time": event.time.as_ref().map(format_time),
        "session": event.session.as_ref().map(session),
    })
}

pub fn tree(node: &SessionNode) -> Value {
    json!({
        "session_key": node.session_key,
        "session": node.session.as_ref().map(session),
        "cycle": node.cycle,
        "children": node.children.iter().map(tree).collect::<Vec<_>>(),
        "parents": node.parents.iter().map(tree).collect::<Vec<_>>(),
    })
}

/// `STARTED`, `UPDATED`, `ENDED`, `PURGED` (`KIND_7` for a kind this build does not know).
pub fn kind_name(kind: i32) -> String {
    match EventKind::try_from(kind) {
        Ok(EventKind::Unspecified) => "UNSPECIFIED".to_owned(),
        Ok(kind) => kind.as_str_name().to_owned(),
        Err(_) => format!("KIND_{kind}"),
    }
}

pub fn format_utc_offset(offset: &Duration) -> String {
    let sign = if offset.seconds < 0 { '-' } else { '+' };
    let minutes = offset.seconds.unsigned_abs() / 60;
    format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60)
}

/// RFC 3339 in UTC; the raw seconds if the time cannot be shown that way.
pub fn format_time(timestamp: &Timestamp) -> String {
    let nanos = i128::from(timestamp.seconds) * 1_000_000_000 + i128::from(timestamp.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{}s", timestamp.seconds))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_session_reads_with_sorted_details_and_plain_times() {
        let value = session(&Session {
            session_key: "k".into(),
            data_source: "Car1".into(),
            details: BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]),
            utc_offset: Some(Duration {
                seconds: -(5 * 3600 + 30 * 60),
                nanos: 0,
            }),
            creation_time: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 500_000_000,
            }),
            ..Default::default()
        });
        assert_eq!(value["utc_offset"], "-05:30");
        assert_eq!(value["creation_time"], "2023-11-14T22:13:20.5Z");
        assert_eq!(value["termination_time"], Value::Null);
        assert_eq!(value["details"].to_string(), r#"{"a":"1","b":"2"}"#);
        assert_eq!(kind_name(EventKind::Ended as i32), "ENDED");
        assert_eq!(kind_name(99), "KIND_99");
    }
}
