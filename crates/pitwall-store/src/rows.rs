//! The stored form of a row (a session or a feed event): its encoding behind a checksum.
//!
//! A row is `[0x01][CRC32C of the payload, 4 bytes little-endian][payload]`. Rows written before
//! checksums existed are the bare protobuf encoding, which starts with a field tag: a tag of
//! field 0 does not exist, so a valid encoding never starts with a byte from 0x00 to 0x07, and
//! 0x01 tells the two apart. Old rows are read as they are (with no checksum to verify) and get
//! one when they are next written.

use std::fmt;

use pitwall_core::{Session, quote};
use pitwall_proto::feed::SessionEvent;
use prost::Message;

/// First byte of a row with a CRC32C checksum.
const FRAMED_CRC32C: u8 = 0x01;
/// Marker and checksum.
const HEADER_BYTES: usize = 5;
/// First bytes that no bare protobuf encoding starts with (tags of field number 0).
const RESERVED_MARKERS: std::ops::RangeInclusive<u8> = 0x00..=0x07;

/// Appends the stored form of `payload` to `row` (cleared first).
pub(crate) fn frame_into(row: &mut Vec<u8>, payload: &[u8]) {
    row.clear();
    row.reserve(HEADER_BYTES + payload.len());
    row.push(FRAMED_CRC32C);
    row.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    row.extend_from_slice(payload);
}

/// The stored form of `payload`, in a buffer of its own.
pub(crate) fn framed(payload: &[u8]) -> Vec<u8> {
    let mut row = Vec::new();
    frame_into(&mut row, payload);
    row
}

/// What is wrong with a stored row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowDamage {
    /// The payload does not match its checksum: bytes changed after it was written.
    Checksum { stored: u32, computed: u32 },
    /// Too short to hold its own header.
    Truncated,
    /// Starts with a marker of no known format.
    UnknownFormat(u8),
    /// The payload is not a valid encoding (a row without a checksum, or one whose checksum
    /// matched garbage written as such).
    Undecodable(String),
}

impl fmt::Display for RowDamage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowDamage::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
            RowDamage::Truncated => f.write_str("row too short to hold its checksum"),
            RowDamage::UnknownFormat(marker) => write!(f, "unknown row format {marker:#04x}"),
            RowDamage::Undecodable(why) => write!(f, "cannot be decoded: {why}"),
        }
    }
}

/// A stored row that failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DamagedRow {
    /// A session row, keyed by creation sequence; the key when the payload still decodes.
    Session {
        sequence: u64,
        key: Option<String>,
        damage: RowDamage,
    },
    /// A feed event, keyed by its feed sequence.
    FeedEvent { sequence: u64, damage: RowDamage },
}

impl fmt::Display for DamagedRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DamagedRow::Session {
                sequence,
                key: Some(key),
                damage,
            } => write!(
                f,
                "session {} (creation sequence {sequence}): {damage}",
                quote(key)
            ),
            DamagedRow::Session {
                sequence,
                key: None,
                damage,
            } => write!(
                f,
                "session at creation sequence {sequence} (key unreadable): {damage}"
            ),
            DamagedRow::FeedEvent { sequence, damage } => {
                write!(f, "feed event {sequence}: {damage}")
            }
        }
    }
}

/// The payload of a stored row, its checksum verified when it has one.
pub(crate) fn unframe(row: &[u8]) -> Result<&[u8], RowDamage> {
    match row.first() {
        Some(&FRAMED_CRC32C) => {
            if row.len() < HEADER_BYTES {
                return Err(RowDamage::Truncated);
            }
            let stored = u32::from_le_bytes([row[1], row[2], row[3], row[4]]);
            let payload = &row[HEADER_BYTES..];
            let computed = crc32c::crc32c(payload);
            if stored != computed {
                return Err(RowDamage::Checksum { stored, computed });
            }
            Ok(payload)
        }
        Some(marker) if RESERVED_MARKERS.contains(marker) => Err(RowDamage::UnknownFormat(*marker)),
        // A row from before checksums (or an empty one, which decodes as nothing).
        _ => Ok(row),
    }
}

/// A stored session row, checked and decoded; when damaged, its key if the bytes still say it.
pub(crate) fn read_session(row: &[u8]) -> Result<Session, (Option<String>, RowDamage)> {
    let payload_of = |row: &[u8]| row.get(HEADER_BYTES..).map(<[u8]>::to_vec);
    match unframe(row) {
        Ok(payload) => {
            Session::decode(payload).map_err(|e| (None, RowDamage::Undecodable(e.to_string())))
        }
        Err(damage) => {
            // The damage may lie outside the key: name the session when the bytes still decode.
            let key = payload_of(row)
                .and_then(|payload| Session::decode(&payload).ok())
                .map(|session| session.key)
                .filter(|key| !key.is_empty());
            Err((key, damage))
        }
    }
}

/// A stored feed event row, checked; its payload is the encoded `SessionEvent`.
pub(crate) fn read_event(row: &[u8]) -> Result<&[u8], RowDamage> {
    let payload = unframe(row)?;
    if payload.len() == row.len() {
        // No checksum to rely on: at least the encoding must hold.
        SessionEvent::decode(payload).map_err(|e| RowDamage::Undecodable(e.to_string()))?;
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use pitwall_proto::open_data::NewSessionPacket;

    use super::*;

    fn session() -> Session {
        Session::start(
            "k1",
            7,
            &NewSessionPacket {
                data_source: "ds".into(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_framed_row_reads_back_and_a_changed_byte_names_the_session() {
        let mut row = Vec::new();
        frame_into(&mut row, &session().encode());
        assert_eq!(read_session(&row).unwrap(), session());
        // A byte of the data source: the key still reads.
        let at = row.windows(2).position(|w| w == b"ds").unwrap();
        row[at] ^= 0x20;
        let (key, damage) = read_session(&row).unwrap_err();
        assert!(matches!(damage, RowDamage::Checksum { .. }), "{damage}");
        assert_eq!(key.as_deref(), Some("k1"));
    }

    #[test]
    fn rows_written_before_checksums_still_read() {
        let bare = session().encode();
        assert!(!RESERVED_MARKERS.contains(&bare[0]));
        assert_eq!(read_session(&bare).unwrap(), session());
        let event = SessionEvent {
            sequence: 3,
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(read_event(&event).unwrap(), event.as_slice());
    }

    #[test]
    fn a_row_with_an_unknown_marker_or_cut_short_is_damaged() {
        assert_eq!(
            read_event(&[0x05, 1, 2]),
            Err(RowDamage::UnknownFormat(0x05))
        );
        assert_eq!(read_event(&[0x01, 1, 2]), Err(RowDamage::Truncated));
    }
}
