//! A session as the projection holds it, and its durable encoding.

use std::collections::BTreeMap;

use pitwall_proto::open_data::{EndOfSessionPacket, NewSessionPacket, SessionInfoPacket};
use prost::Message;
use prost_types::{Duration, Timestamp};

use crate::details::Details;

/// One session: where it started, its merged metadata, and its end once it has one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Session {
    pub key: String,
    /// Position in creation order (log order of its `NewSession`); listings sort by it.
    pub sequence: u64,
    pub data_source: String,
    pub identifier: String,
    pub session_type: String,
    pub version: u32,
    pub associates: Vec<String>,
    pub details: Details,
    pub utc_offset: Duration,
    pub creation_time: Option<Timestamp>,
    /// `"{topic}:{partition}"` → next offset when the session started; `None` stands for
    /// [`embedded_offsets`] of the data source, which every session of the embedded store has,
    /// so that a million sessions do not hold a million copies of it.
    start_offsets: Option<BTreeMap<String, i64>>,
    /// The first `EndOfSession` applied; later ones are ignored. Boxed: most sessions held in
    /// memory are live, and a live session then pays one pointer for it.
    pub end: Option<Box<EndOfSessionPacket>>,
    /// When the store recorded the last record that changed the session (its start, a merge
    /// that changed something, its end): what idle auto-end and retention measure from.
    pub last_activity: Option<Timestamp>,
}

impl Session {
    /// The session a `NewSession` record starts.
    pub fn start(key: &str, sequence: u64, packet: &NewSessionPacket) -> Session {
        Session::start_owned(key.to_owned(), sequence, packet.clone())
    }

    /// [`Session::start`], moving the packet's fields instead of copying them.
    pub fn start_owned(key: String, sequence: u64, packet: NewSessionPacket) -> Session {
        let offsets = normalise_offsets(packet.topic_partition_offsets);
        let start_offsets =
            (!are_embedded_offsets(&offsets, &packet.data_source)).then_some(offsets);
        let mut session = Session {
            key,
            sequence,
            data_source: packet.data_source,
            utc_offset: packet.utc_offset.unwrap_or_default(),
            creation_time: packet.creation_time,
            start_offsets,
            ..Session::default()
        };
        // The reference drops embedded info whose data_source is empty; Pitwall keeps it.
        if let Some(info) = packet.session_info {
            session.identifier = info.identifier;
            session.session_type = info.r#type;
            session.version = info.version;
            session.associates = info.associate_session_keys;
            session.details = Details::from(info.details);
        }
        session
    }

    /// `"{topic}:{partition}"` → next offset when the session started.
    pub fn start_offsets(&self) -> std::borrow::Cow<'_, BTreeMap<String, i64>> {
        match &self.start_offsets {
            Some(offsets) => std::borrow::Cow::Borrowed(offsets),
            None => std::borrow::Cow::Owned(embedded_offsets(&self.data_source)),
        }
    }

    /// The start offset of partition 0 of `topic`, 0 if there is none.
    pub fn start_offset_of(&self, topic: &str) -> i64 {
        match &self.start_offsets {
            Some(offsets) => offsets.get(&format!("{topic}:0")).copied().unwrap_or(0),
            // The embedded offsets are all 0.
            None => 0,
        }
    }

    pub fn is_complete(&self) -> bool {
        self.end.is_some()
    }

    pub fn termination_time(&self) -> Option<Timestamp> {
        self.end.as_ref().and_then(|end| end.termination_time)
    }

    /// Merges a `SessionInfo` record: non-empty `type` and `identifier` replace, `version` > 0
    /// replaces, a non-empty associate list replaces the whole list, details are upserted, the
    /// packet's `data_source` is ignored. Returns whether anything changed.
    pub fn merge(&mut self, info: &SessionInfoPacket) -> bool {
        let mut changed = false;
        if !info.r#type.is_empty() && info.r#type != self.session_type {
            self.session_type.clone_from(&info.r#type);
            changed = true;
        }
        if info.version > 0 && info.version != self.version {
            self.version = info.version;
            changed = true;
        }
        if !info.identifier.is_empty() && info.identifier != self.identifier {
            self.identifier.clone_from(&info.identifier);
            changed = true;
        }
        if !info.associate_session_keys.is_empty() && info.associate_session_keys != self.associates
        {
            self.associates.clone_from(&info.associate_session_keys);
            changed = true;
        }
        for (name, value) in &info.details {
            changed |= self.details.upsert(name, value);
        }
        changed
    }

    /// Completes a live session. Returns false (and changes nothing) if it had already ended.
    pub fn complete(&mut self, end: &EndOfSessionPacket) -> bool {
        if self.end.is_some() {
            return false;
        }
        self.end = Some(Box::new(end.clone()));
        true
    }

    /// The session's metadata as a `SessionInfoPacket` (the form `NewSession` embeds).
    pub fn info_packet(&self) -> SessionInfoPacket {
        SessionInfoPacket {
            data_source: self.data_source.clone(),
            identifier: self.identifier.clone(),
            r#type: self.session_type.clone(),
            version: self.version,
            associate_session_keys: self.associates.clone(),
            details: self.details.to_map(),
            utc_offset: Some(self.utc_offset),
            creation_time: self.creation_time,
            termination_time: self.termination_time(),
        }
    }

    /// The durable form: the start packet with the current merged info embedded, and the end.
    pub fn encode(&self) -> Vec<u8> {
        self.stored().encode_to_vec()
    }

    /// Size of [`Session::encode`]'s output, the measure of the per-session size limit.
    pub fn encoded_len(&self) -> usize {
        self.stored().encoded_len()
    }

    pub fn decode(bytes: &[u8]) -> Result<Session, prost::DecodeError> {
        let stored = StoredSession::decode(bytes)?;
        let start = stored.start.unwrap_or_default();
        let mut session = Session::start_owned(stored.key, stored.sequence, start);
        session.end = stored.end.map(Box::new);
        session.last_activity = stored.last_activity;
        Ok(session)
    }

    fn stored(&self) -> StoredSession {
        StoredSession {
            key: self.key.clone(),
            sequence: self.sequence,
            start: Some(NewSessionPacket {
                data_source: self.data_source.clone(),
                topic_partition_offsets: self.start_offsets().into_owned(),
                utc_offset: Some(self.utc_offset),
                session_info: Some(self.info_packet()),
                creation_time: self.creation_time,
            }),
            end: self.end.as_deref().cloned(),
            last_activity: self.last_activity,
        }
    }
}

/// Offset keys are `"{topic}:{partition}"`; a key without a partition means partition 0. When
/// both forms name the same partition, the explicit one wins (the reference throws instead).
fn normalise_offsets(offsets: BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    if offsets.keys().all(|key| key.contains(':')) {
        return offsets;
    }
    let (explicit, bare): (BTreeMap<_, _>, BTreeMap<_, _>) =
        offsets.into_iter().partition(|(key, _)| key.contains(':'));
    let mut normalised = explicit;
    for (key, offset) in bare {
        normalised.entry(format!("{key}:0")).or_insert(offset);
    }
    normalised
}

/// Whether `offsets` equal [`embedded_offsets`] of `data_source`, checked without building them
/// (every session start asks).
fn are_embedded_offsets(offsets: &BTreeMap<String, i64>, data_source: &str) -> bool {
    offsets.len() == 2
        && offsets.iter().all(|(key, offset)| {
            *offset == 0
                && key
                    .strip_prefix(data_source)
                    .is_some_and(|rest| rest == ":0" || rest == "_essential:0")
        })
}

/// Offsets without a broker: the main and essentials topics, partition 0, both at 0, as the
/// reference reports for a data source whose topics do not exist yet.
pub fn embedded_offsets(data_source: &str) -> BTreeMap<String, i64> {
    BTreeMap::from([
        (format!("{data_source}:0"), 0),
        (format!("{data_source}_essential:0"), 0),
    ])
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredSession {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(uint64, tag = "2")]
    sequence: u64,
    #[prost(message, optional, tag = "3")]
    start: Option<NewSessionPacket>,
    #[prost(message, optional, tag = "4")]
    end: Option<EndOfSessionPacket>,
    #[prost(message, optional, tag = "5")]
    last_activity: Option<Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_recognised_without_building_it() {
        let default = embedded_offsets("car");
        assert!(are_embedded_offsets(&default, "car"));
        assert!(!are_embedded_offsets(&default, "ca"));
        let mut moved = default.clone();
        moved.insert("car:0".into(), 5);
        assert!(!are_embedded_offsets(&moved, "car"));
        let mut more = default.clone();
        more.insert("car.laps:0".into(), 0);
        assert!(!are_embedded_offsets(&more, "car"));
        let twice_main = BTreeMap::from([("car:0".to_owned(), 0), ("car:0 ".to_owned(), 0)]);
        assert!(!are_embedded_offsets(&twice_main, "car"));
    }

    fn session() -> Session {
        Session::start(
            "k",
            0,
            &NewSessionPacket {
                data_source: "ds".into(),
                session_info: Some(SessionInfoPacket {
                    r#type: "Session".into(),
                    version: 1,
                    identifier: "run 1".into(),
                    associate_session_keys: vec!["a1".into()],
                    details: [("car".to_owned(), "1".to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
    }

    #[test]
    fn non_empty_type_replaces_and_empty_type_keeps() {
        let mut s = session();
        assert!(!s.merge(&SessionInfoPacket::default()));
        assert_eq!(s.session_type, "Session");
        assert!(s.merge(&SessionInfoPacket {
            r#type: "Dyno".into(),
            ..Default::default()
        }));
        assert_eq!(s.session_type, "Dyno");
    }

    #[test]
    fn version_above_zero_replaces_and_zero_keeps() {
        let mut s = session();
        assert!(!s.merge(&SessionInfoPacket {
            version: 0,
            ..Default::default()
        }));
        assert_eq!(s.version, 1);
        assert!(s.merge(&SessionInfoPacket {
            version: 7,
            ..Default::default()
        }));
        assert_eq!(s.version, 7);
    }

    #[test]
    fn non_empty_identifier_replaces_and_empty_identifier_keeps() {
        let mut s = session();
        assert!(!s.merge(&SessionInfoPacket {
            identifier: String::new(),
            ..Default::default()
        }));
        assert_eq!(s.identifier, "run 1");
        assert!(s.merge(&SessionInfoPacket {
            identifier: "run 2".into(),
            ..Default::default()
        }));
        assert_eq!(s.identifier, "run 2");
    }

    #[test]
    fn non_empty_associate_list_replaces_the_whole_list_and_empty_keeps() {
        let mut s = session();
        assert!(!s.merge(&SessionInfoPacket::default()));
        assert_eq!(s.associates, vec!["a1"]);
        let replacement = vec!["a2".to_owned(), "a3".to_owned()];
        assert!(s.merge(&SessionInfoPacket {
            associate_session_keys: replacement.clone(),
            ..Default::default()
        }));
        assert_eq!(s.associates, replacement);
    }

    #[test]
    fn details_are_upserted_and_never_deleted() {
        let mut s = session();
        assert!(
            s.merge(&SessionInfoPacket {
                details: [
                    ("driver".to_owned(), "x".to_owned()),
                    ("car".to_owned(), "2".to_owned())
                ]
                .into(),
                ..Default::default()
            })
        );
        assert_eq!(s.details.get("car").map(String::as_str), Some("2"));
        assert_eq!(s.details.get("driver").map(String::as_str), Some("x"));
        assert!(!s.merge(&SessionInfoPacket::default()));
        assert_eq!(s.details.len(), 2);
    }

    #[test]
    fn merge_ignores_the_packets_data_source() {
        let mut s = session();
        assert!(!s.merge(&SessionInfoPacket {
            data_source: "other".into(),
            ..Default::default()
        }));
        assert_eq!(s.data_source, "ds");
    }

    #[test]
    fn only_the_first_end_completes_a_session() {
        let mut s = session();
        let first = EndOfSessionPacket {
            termination_time: Some(Timestamp {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        };
        let second = EndOfSessionPacket {
            termination_time: Some(Timestamp {
                seconds: 20,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert!(s.complete(&first));
        assert!(!s.complete(&second));
        assert_eq!(s.end, Some(Box::new(first)));
    }

    #[test]
    fn embedded_info_is_kept_even_with_an_empty_data_source() {
        let s = Session::start(
            "k",
            0,
            &NewSessionPacket {
                session_info: Some(SessionInfoPacket {
                    identifier: "kept".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert_eq!(s.identifier, "kept");
    }

    #[test]
    fn offset_keys_without_partition_read_as_partition_zero() {
        let s = Session::start(
            "k",
            0,
            &NewSessionPacket {
                topic_partition_offsets: [("DS".to_owned(), 10), ("DS:1".to_owned(), 4)].into(),
                ..Default::default()
            },
        );
        assert_eq!(
            *s.start_offsets(),
            BTreeMap::from([("DS:0".to_owned(), 10), ("DS:1".to_owned(), 4)])
        );
        assert_eq!(s.start_offset_of("DS"), 10);
    }

    #[test]
    fn embedded_offsets_are_not_stored_per_session_but_still_reported() {
        let packet = NewSessionPacket {
            data_source: "ds".into(),
            topic_partition_offsets: embedded_offsets("ds"),
            ..Default::default()
        };
        let s = Session::start("k", 0, &packet);
        assert_eq!(s.start_offsets, None);
        assert_eq!(*s.start_offsets(), embedded_offsets("ds"));
        assert_eq!(Session::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn encoding_round_trips_every_field() {
        let mut s = session();
        s.sequence = 42;
        s.utc_offset = Duration {
            seconds: 3600,
            nanos: 0,
        };
        s.creation_time = Some(Timestamp {
            seconds: 5,
            nanos: 6,
        });
        s.start_offsets = Some([("ds:0".to_owned(), 3)].into());
        s.complete(&EndOfSessionPacket {
            data_source: "ds".into(),
            topic_partition_offsets: [("ds:0".to_owned(), 9)].into(),
            termination_time: Some(Timestamp {
                seconds: 7,
                nanos: 0,
            }),
        });
        assert_eq!(Session::decode(&s.encode()).unwrap(), s);
        assert_eq!(s.encoded_len(), s.encode().len());
    }
}
