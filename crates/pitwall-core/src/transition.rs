//! The one transition of a session: what a record does to it.
//!
//! The writer's batch [`Overlay`](crate::overlay::Overlay) and the
//! [`Projection`](crate::projection::Projection) both fold records with [`Session::begin`] and
//! [`Session::apply`], so the state a batch decides (and the embedded store persists) is the
//! state a replay of the same records rebuilds.

use prost_types::Timestamp;

use crate::record::Record;
use crate::session::Session;

/// What a record did to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Started,
    Updated,
    Ended,
    Purged,
}

/// A change to a session, as notifications and metrics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub session_key: String,
    pub data_source: String,
}

impl Session {
    /// The session a record starts, numbered `sequence` in creation order, recorded at `at`:
    /// a `NewSession`'s; nothing for any other record (they need a session to apply to).
    pub fn begin(record: &Record, sequence: u64, at: Timestamp) -> Option<Session> {
        let Record::NewSession {
            session_key,
            packet,
        } = record
        else {
            return None;
        };
        let mut session = Session::start(session_key, sequence, packet);
        session.last_activity = Some(at);
        Some(session)
    }

    /// [`Session::begin`], moving the record's fields instead of copying them; any other record
    /// comes back as it was.
    // The error is the caller's own record handed back to keep, not an error to propagate.
    #[allow(clippy::result_large_err)]
    pub fn begin_owned(record: Record, sequence: u64, at: Timestamp) -> Result<Session, Record> {
        let Record::NewSession {
            session_key,
            packet,
        } = record
        else {
            return Err(record);
        };
        let mut session = Session::start_owned(session_key, sequence, packet);
        session.last_activity = Some(at);
        Ok(session)
    }

    /// Applies a record of this session's key, recorded at `at`, and says what it did: a second
    /// `NewSession` does nothing (the first wins), `SessionInfo` merges, `EndOfSession`
    /// completes a live session once, `Purge` removes it (the caller drops it). A record that
    /// changes something is the session's latest activity.
    pub fn apply(&mut self, record: &Record, at: Timestamp) -> Option<EventKind> {
        let kind = match record {
            Record::NewSession { .. } => None,
            Record::SessionInfo { packet, .. } => self.merge(packet).then_some(EventKind::Updated),
            Record::EndOfSession { packet, .. } => {
                self.complete(packet).then_some(EventKind::Ended)
            }
            Record::Purge { .. } => return Some(EventKind::Purged),
        }?;
        self.last_activity = Some(at);
        Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use pitwall_proto::open_data::{EndOfSessionPacket, NewSessionPacket, SessionInfoPacket};

    use super::*;

    const AT: Timestamp = Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    };
    const LATER: Timestamp = Timestamp {
        seconds: 1_700_000_100,
        nanos: 0,
    };

    fn started() -> Session {
        let record = Record::NewSession {
            session_key: "k".into(),
            packet: NewSessionPacket {
                data_source: "ds".into(),
                ..Default::default()
            },
        };
        Session::begin(&record, 7, AT).unwrap()
    }

    #[test]
    fn only_a_new_session_begins_a_session_and_it_is_active_from_then() {
        let session = started();
        assert_eq!((session.sequence, session.last_activity), (7, Some(AT)));
        let end = Record::EndOfSession {
            session_key: "k".into(),
            packet: EndOfSessionPacket::default(),
        };
        assert!(Session::begin(&end, 0, AT).is_none());
    }

    #[test]
    fn a_change_is_activity_and_no_change_is_not() {
        let mut session = started();
        let same = Record::SessionInfo {
            session_key: "k".into(),
            packet: SessionInfoPacket::default(),
        };
        assert_eq!(session.apply(&same, LATER), None);
        assert_eq!(session.last_activity, Some(AT));
        let renamed = Record::SessionInfo {
            session_key: "k".into(),
            packet: SessionInfoPacket {
                identifier: "id".into(),
                ..Default::default()
            },
        };
        assert_eq!(session.apply(&renamed, LATER), Some(EventKind::Updated));
        assert_eq!(session.last_activity, Some(LATER));
    }

    #[test]
    fn the_first_new_session_and_the_first_end_win() {
        let mut session = started();
        let again = Record::NewSession {
            session_key: "k".into(),
            packet: NewSessionPacket {
                data_source: "other".into(),
                ..Default::default()
            },
        };
        assert_eq!(session.apply(&again, LATER), None);
        assert_eq!(session.data_source, "ds");
        let end = |seconds| Record::EndOfSession {
            session_key: "k".into(),
            packet: EndOfSessionPacket {
                termination_time: Some(Timestamp { seconds, nanos: 0 }),
                ..Default::default()
            },
        };
        assert_eq!(session.apply(&end(5), LATER), Some(EventKind::Ended));
        assert_eq!(session.apply(&end(9), LATER), None);
        assert_eq!(session.termination_time().unwrap().seconds, 5);
    }
}
