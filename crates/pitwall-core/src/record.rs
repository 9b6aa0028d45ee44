//! The records of the session log and their `Packet` encoding.
//!
//! On a broker a record is a `Packet` whose `type` names the packet in `content`; the current
//! names drop the `Packet` suffix, the first reference release used the full message names, and
//! both are read. [`Record::Purge`] is Pitwall's own (retention): a reference server reading the
//! topic logs its type as unknown and skips it.

use pitwall_proto::open_data::{EndOfSessionPacket, NewSessionPacket, Packet, SessionInfoPacket};
use prost::Message;
use thiserror::Error;

/// One change to one session.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    NewSession {
        session_key: String,
        packet: NewSessionPacket,
    },
    SessionInfo {
        session_key: String,
        packet: SessionInfoPacket,
    },
    EndOfSession {
        session_key: String,
        packet: EndOfSessionPacket,
    },
    /// The session leaves for good (retention decided it had been complete long enough).
    Purge { session_key: String },
}

/// The `Packet.type` of [`Record::Purge`].
pub const PURGE_TYPE: &str = "PitwallPurgeSession";

/// A `Packet` that is not a session record this service can apply.
#[derive(Debug, Error)]
pub enum RecordDecodeError {
    #[error("packet is not valid protobuf: {0}")]
    Packet(prost::DecodeError),
    #[error("packet type '{0}' is not a session record")]
    UnknownType(String),
    #[error("{kind} content is not valid protobuf: {source}")]
    Content {
        kind: &'static str,
        source: prost::DecodeError,
    },
}

impl Record {
    pub fn session_key(&self) -> &str {
        match self {
            Record::NewSession { session_key, .. }
            | Record::SessionInfo { session_key, .. }
            | Record::EndOfSession { session_key, .. }
            | Record::Purge { session_key } => session_key,
        }
    }

    /// The `Packet.type` this record is written with.
    pub fn type_name(&self) -> &'static str {
        match self {
            Record::NewSession { .. } => "NewSession",
            Record::SessionInfo { .. } => "SessionInfo",
            Record::EndOfSession { .. } => "EndOfSession",
            Record::Purge { .. } => PURGE_TYPE,
        }
    }

    /// The record wrapped as the reference writes it: `is_essential = false`, `id = 0`.
    pub fn to_packet(&self) -> Packet {
        let content = match self {
            Record::NewSession { packet, .. } => packet.encode_to_vec(),
            Record::SessionInfo { packet, .. } => packet.encode_to_vec(),
            Record::EndOfSession { packet, .. } => packet.encode_to_vec(),
            Record::Purge { .. } => Vec::new(),
        };
        Packet {
            r#type: self.type_name().to_owned(),
            session_key: self.session_key().to_owned(),
            is_essential: false,
            content,
            id: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        self.to_packet().encode_to_vec()
    }

    /// Reads a serialized `Packet`. The session key is the packet's, as the reference reads it.
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordDecodeError> {
        let packet = Packet::decode(bytes).map_err(RecordDecodeError::Packet)?;
        Record::from_packet(packet)
    }

    pub fn from_packet(packet: Packet) -> Result<Record, RecordDecodeError> {
        let session_key = packet.session_key;
        let content = packet.content.as_slice();
        let content_error = |kind| move |source| RecordDecodeError::Content { kind, source };
        match packet.r#type.as_str() {
            "NewSession" | "NewSessionPacket" => Ok(Record::NewSession {
                session_key,
                packet: NewSessionPacket::decode(content).map_err(content_error("NewSession"))?,
            }),
            "SessionInfo" | "SessionInfoPacket" => Ok(Record::SessionInfo {
                session_key,
                packet: SessionInfoPacket::decode(content).map_err(content_error("SessionInfo"))?,
            }),
            "EndOfSession" | "EndOfSessionPacket" => Ok(Record::EndOfSession {
                session_key,
                packet: EndOfSessionPacket::decode(content)
                    .map_err(content_error("EndOfSession"))?,
            }),
            PURGE_TYPE => Ok(Record::Purge { session_key }),
            _ => Err(RecordDecodeError::UnknownType(packet.r#type)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        vec![
            Record::NewSession {
                session_key: "k".into(),
                packet: NewSessionPacket {
                    data_source: "ds".into(),
                    topic_partition_offsets: [("ds:0".to_owned(), 0)].into(),
                    ..Default::default()
                },
            },
            Record::SessionInfo {
                session_key: "k".into(),
                packet: SessionInfoPacket {
                    identifier: "id".into(),
                    ..Default::default()
                },
            },
            Record::EndOfSession {
                session_key: "k".into(),
                packet: EndOfSessionPacket::default(),
            },
        ]
    }

    #[test]
    fn purges_round_trip_under_their_own_type() {
        let purge = Record::Purge {
            session_key: "k".into(),
        };
        assert_eq!(purge.to_packet().r#type, PURGE_TYPE);
        assert_eq!(Record::decode(&purge.encode()).unwrap(), purge);
    }

    #[test]
    fn records_round_trip_through_packets() {
        for record in samples() {
            assert_eq!(Record::decode(&record.encode()).unwrap(), record);
        }
    }

    #[test]
    fn packets_are_written_as_the_reference_writes_them() {
        let packet = samples()[0].to_packet();
        assert_eq!(packet.r#type, "NewSession");
        assert_eq!(packet.session_key, "k");
        assert!(!packet.is_essential);
        assert_eq!(packet.id, 0);
    }

    #[test]
    fn old_type_names_are_read() {
        for record in samples() {
            let mut packet = record.to_packet();
            packet.r#type.push_str("Packet");
            assert_eq!(Record::from_packet(packet).unwrap(), record);
        }
    }

    #[test]
    fn other_packet_types_are_refused() {
        let packet = Packet {
            r#type: "DataFormatDefinition".into(),
            ..Default::default()
        };
        assert!(matches!(
            Record::from_packet(packet),
            Err(RecordDecodeError::UnknownType(t)) if t == "DataFormatDefinition"
        ));
    }
}
