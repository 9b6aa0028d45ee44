//! `pitwall.v1.WatchResponse`, written by hand so that a server can send events it encoded once
//! to every watcher: an event already encoded is written as it is, which is the same bytes on the
//! wire as the message itself. Clients decode every event into [`SessionEvent`] as usual.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};

use crate::feed::SessionEvent;

const EVENTS: u32 = 1;
const SEQUENCE: u32 = 2;

/// See `WatchResponse` in `proto/pitwall/v1/feed.proto`.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct WatchResponse {
    /// Decoded events (what a client reads; a server may also send these).
    pub events: Vec<SessionEvent>,
    /// Every event up to this sequence has been sent or filtered out.
    pub sequence: u64,
    /// Events encoded once by the server, sent after `events`.
    encoded: Vec<Bytes>,
}

impl WatchResponse {
    /// A response of events already encoded as `SessionEvent`s.
    pub fn encoded(encoded: Vec<Bytes>, sequence: u64) -> WatchResponse {
        WatchResponse {
            events: Vec::new(),
            sequence,
            encoded,
        }
    }
}

impl prost::Message for WatchResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for event in &self.events {
            encoding::message::encode(EVENTS, event, buf);
        }
        for event in &self.encoded {
            encoding::encode_key(EVENTS, WireType::LengthDelimited, buf);
            encoding::encode_varint(event.len() as u64, buf);
            buf.put_slice(event);
        }
        if self.sequence != 0 {
            encoding::uint64::encode(SEQUENCE, &self.sequence, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            EVENTS => encoding::message::merge_repeated(wire_type, &mut self.events, buf, ctx),
            SEQUENCE => encoding::uint64::merge(wire_type, &mut self.sequence, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let encoded: usize = self
            .encoded
            .iter()
            .map(|event| {
                encoding::key_len(EVENTS)
                    + encoding::encoded_len_varint(event.len() as u64)
                    + event.len()
            })
            .sum();
        let sequence = if self.sequence != 0 {
            encoding::uint64::encoded_len(SEQUENCE, &self.sequence)
        } else {
            0
        };
        encoding::message::encoded_len_repeated(EVENTS, &self.events) + encoded + sequence
    }

    fn clear(&mut self) {
        self.events.clear();
        self.encoded.clear();
        self.sequence = 0;
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn event(sequence: u64) -> SessionEvent {
        SessionEvent {
            sequence,
            session_key: format!("k{sequence}"),
            data_source: "ds".into(),
            ..Default::default()
        }
    }

    #[test]
    fn pre_encoded_events_decode_as_events() {
        let sent = WatchResponse::encoded(
            vec![
                Bytes::from(event(7).encode_to_vec()),
                Bytes::from(event(8).encode_to_vec()),
            ],
            9,
        );
        let bytes = sent.encode_to_vec();
        assert_eq!(bytes.len(), sent.encoded_len());
        let received = WatchResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(received.events, [event(7), event(8)]);
        assert_eq!(received.sequence, 9);
        // The same bytes as the decoded form encodes to.
        assert_eq!(received.encode_to_vec(), bytes);
    }
}
