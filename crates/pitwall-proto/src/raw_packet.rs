//! The two Stream API messages that carry a client's `open_data.Packet`, written by hand so that
//! the packet stays the client's bytes: `DataPacketDetails` (a write) and `PacketResponse` (a
//! read). A server stores what the writer sent and serves it as it is, without decoding and
//! encoding it again; on the wire they are the messages of `api.proto`, so any client
//! generated from it reads and writes them unchanged.

use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};
use prost_types::Timestamp;

use crate::open_data::Packet;

/// An embedded message kept as its encoding. Several occurrences of the field on the wire merge
/// like protobuf messages do: their encodings concatenate.
fn merge_raw(
    wire_type: WireType,
    raw: &mut Option<Bytes>,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    let mut bytes = Bytes::new();
    encoding::bytes::merge(wire_type, &mut bytes, buf, ctx)?;
    *raw = Some(match raw.take() {
        None => bytes,
        Some(before) => {
            let mut merged = BytesMut::with_capacity(before.len() + bytes.len());
            merged.extend_from_slice(&before);
            merged.extend_from_slice(&bytes);
            merged.freeze()
        }
    });
    Ok(())
}

fn encode_raw_field(tag: u32, raw: &Option<Bytes>, buf: &mut impl BufMut) {
    if let Some(bytes) = raw {
        encoding::encode_key(tag, WireType::LengthDelimited, buf);
        encoding::encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }
}

fn raw_field_len(tag: u32, raw: &Option<Bytes>) -> usize {
    raw.as_ref().map_or(0, |bytes| {
        encoding::key_len(tag) + encoding::encoded_len_varint(bytes.len() as u64) + bytes.len()
    })
}

fn string_len(tag: u32, value: &String) -> usize {
    if value.is_empty() {
        0
    } else {
        encoding::string::encoded_len(tag, value)
    }
}

fn encode_string(tag: u32, value: &String, buf: &mut impl BufMut) {
    if !value.is_empty() {
        encoding::string::encode(tag, value, buf);
    }
}

/// What a server reads of a `Packet` without copying its content: decoding the encoded packet
/// into it checks that the whole encoding is a valid `Packet`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PacketHeader {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(string, tag = "2")]
    pub session_key: String,
    #[prost(bool, tag = "3")]
    pub is_essential: bool,
    /// Shares the encoded packet's buffer.
    #[prost(bytes = "bytes", tag = "4")]
    pub content: Bytes,
    #[prost(uint64, tag = "5")]
    pub id: u64,
}

/// See `DataPacketDetails` in `proto/ma/streaming/api/v1/api.proto`.
#[derive(Clone, PartialEq, Eq, Hash, Default, Debug)]
pub struct DataPacketDetails {
    /// The encoded `Packet` as the client sent it; `None` when the field is absent.
    pub message: Option<Bytes>,
    pub data_source: String,
    pub stream: String,
    pub session_key: String,
}

impl DataPacketDetails {
    /// Details carrying `packet`, encoded.
    pub fn new(packet: &Packet, data_source: &str, stream: &str, session_key: &str) -> Self {
        DataPacketDetails {
            message: Some(Bytes::from(packet.encode_to_vec())),
            data_source: data_source.to_owned(),
            stream: stream.to_owned(),
            session_key: session_key.to_owned(),
        }
    }

    /// The packet, decoded; `None` when there is none.
    pub fn packet(&self) -> Option<Result<Packet, DecodeError>> {
        self.message.clone().map(Packet::decode)
    }
}

impl Message for DataPacketDetails {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_raw_field(1, &self.message, buf);
        encode_string(2, &self.data_source, buf);
        encode_string(3, &self.stream, buf);
        encode_string(4, &self.session_key, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => merge_raw(wire_type, &mut self.message, buf, ctx),
            2 => encoding::string::merge(wire_type, &mut self.data_source, buf, ctx),
            3 => encoding::string::merge(wire_type, &mut self.stream, buf, ctx),
            4 => encoding::string::merge(wire_type, &mut self.session_key, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        raw_field_len(1, &self.message)
            + string_len(2, &self.data_source)
            + string_len(3, &self.stream)
            + string_len(4, &self.session_key)
    }

    fn clear(&mut self) {
        *self = DataPacketDetails::default();
    }
}

/// See `PacketResponse` in `proto/ma/streaming/api/v1/api.proto`.
#[derive(Clone, PartialEq, Eq, Hash, Default, Debug)]
pub struct PacketResponse {
    /// The encoded `Packet`, as it was written.
    pub packet: Option<Bytes>,
    pub stream: String,
    pub submit_time: Option<Timestamp>,
}

impl PacketResponse {
    /// The packet, decoded; `None` when there is none.
    pub fn decode_packet(&self) -> Option<Result<Packet, DecodeError>> {
        self.packet.clone().map(Packet::decode)
    }
}

impl Message for PacketResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_raw_field(1, &self.packet, buf);
        encode_string(2, &self.stream, buf);
        if let Some(time) = &self.submit_time {
            encoding::message::encode(3, time, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => merge_raw(wire_type, &mut self.packet, buf, ctx),
            2 => encoding::string::merge(wire_type, &mut self.stream, buf, ctx),
            3 => encoding::message::merge(
                wire_type,
                self.submit_time.get_or_insert_with(Timestamp::default),
                buf,
                ctx,
            ),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        raw_field_len(1, &self.packet)
            + string_len(2, &self.stream)
            + self
                .submit_time
                .as_ref()
                .map_or(0, |time| encoding::message::encoded_len(3, time))
    }

    fn clear(&mut self) {
        *self = PacketResponse::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages as protobuf generates them, to check the hand-written ones against.
    mod generated {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct DataPacketDetails {
            #[prost(message, optional, tag = "1")]
            pub message: Option<crate::open_data::Packet>,
            #[prost(string, tag = "2")]
            pub data_source: String,
            #[prost(string, tag = "3")]
            pub stream: String,
            #[prost(string, tag = "4")]
            pub session_key: String,
        }

        #[derive(Clone, PartialEq, prost::Message)]
        pub struct PacketResponse {
            #[prost(message, optional, tag = "1")]
            pub packet: Option<crate::open_data::Packet>,
            #[prost(string, tag = "2")]
            pub stream: String,
            #[prost(message, optional, tag = "3")]
            pub submit_time: Option<prost_types::Timestamp>,
        }
    }

    fn packet() -> Packet {
        Packet {
            r#type: "PeriodicData".into(),
            session_key: "k".into(),
            is_essential: true,
            content: vec![1, 2, 3],
            id: 9,
        }
    }

    #[test]
    fn details_read_what_a_generated_client_writes_and_keep_its_bytes() {
        let sent = generated::DataPacketDetails {
            message: Some(packet()),
            data_source: "Car1".into(),
            stream: "laps".into(),
            session_key: "s".into(),
        };
        let wire = sent.encode_to_vec();
        let read = DataPacketDetails::decode(wire.as_slice()).unwrap();
        assert_eq!(
            read.message.as_deref(),
            Some(packet().encode_to_vec().as_slice())
        );
        assert_eq!(read.packet().unwrap().unwrap(), packet());
        assert_eq!(
            (read.data_source.as_str(), read.stream.as_str()),
            ("Car1", "laps")
        );
        assert_eq!(read.encode_to_vec(), wire);
        assert_eq!(read.encoded_len(), wire.len());
    }

    #[test]
    fn a_response_is_what_a_generated_client_reads() {
        let sent = PacketResponse {
            packet: Some(Bytes::from(packet().encode_to_vec())),
            stream: "laps".into(),
            submit_time: Some(Timestamp {
                seconds: 5,
                nanos: 6,
            }),
        };
        let wire = sent.encode_to_vec();
        assert_eq!(wire.len(), sent.encoded_len());
        let read = generated::PacketResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(read.packet, Some(packet()));
        assert_eq!(read.stream, "laps");
        assert_eq!(read.submit_time, sent.submit_time);
        assert_eq!(PacketResponse::decode(wire.as_slice()).unwrap(), sent);
    }
}
