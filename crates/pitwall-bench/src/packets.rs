//! The data plane's packets and the client side of its services: 1 KiB `Packet`s whose content
//! starts with a stamp (which writer, its sequence number, when the packet was due) followed by
//! random bytes, and the writer loop that streams them through `WriteDataPackets`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use pitwall_proto::api::connection_manager_service_client::ConnectionManagerServiceClient;
use pitwall_proto::api::packet_reader_service_client::PacketReaderServiceClient;
use pitwall_proto::api::packet_writer_service_client::PacketWriterServiceClient;
use pitwall_proto::api::{
    ConnectionDetails, DataPacketDetails, NewConnectionRequest, ReadPacketsRequest,
    ReadPacketsResponse, WriteDataPacketsRequest,
};
use pitwall_proto::open_data::Packet;
use pitwall_proto::raw_packet::PacketHeader;
use prost::Message;
use prost::bytes::Bytes;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::driver::{Step, StepError};

pub type WriterClient = PacketWriterServiceClient<Channel>;
pub type ReaderClient = PacketReaderServiceClient<Channel>;
pub type ConnectionClient = ConnectionManagerServiceClient<Channel>;

/// Size of every packet the benchmarks write: the encoded `Packet`, the bytes the server
/// stores and serves.
pub const PACKET_BYTES: usize = 1024;
/// The type of measured packets.
pub const DATA_TYPE: &str = "PeriodicData";
/// The type of the packets that only tell a reader it is following (see `crate::dataplane`).
pub const SYNC_TYPE: &str = "BenchSync";
/// Stamp at the start of a packet's content: writer (u32), sequence (u64), due time (u64).
const STAMP_BYTES: usize = 4 + 8 + 8;

/// What a measured packet says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The writer loop that wrote it.
    pub writer: u32,
    /// Its place in that writer's packets, from 0.
    pub sequence: u64,
    /// When it was due to be sent, in nanoseconds since the run's [`Epoch`].
    pub due_nanos: u64,
}

impl Stamp {
    /// The stamp as one number, for receipts and order checks.
    pub fn key(&self) -> u128 {
        (u128::from(self.writer) << 64) | u128::from(self.sequence)
    }
}

/// The instant due times are counted from; shared by the writers and readers of one run (one
/// process, so one clock).
#[derive(Debug, Clone, Copy)]
pub struct Epoch(pub Instant);

impl Epoch {
    pub fn now() -> Epoch {
        Epoch(Instant::now())
    }

    pub fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.0).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn instant(&self, nanos: u64) -> Instant {
        self.0 + Duration::from_nanos(nanos)
    }
}

/// A small, fast random source (SplitMix64): packet contents must not compress, and need not be
/// secret.
#[derive(Debug, Clone)]
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Random {
        Random(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, bytes: &mut [u8]) {
        let mut chunks = bytes.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// Content bytes that make a `Packet` of type `kind` exactly `total` bytes long.
fn content_len(kind: &str, total: usize) -> usize {
    let kind_field = 1 + prost::encoding::encoded_len_varint(kind.len() as u64) + kind.len();
    let mut len = total.saturating_sub(kind_field + 2);
    while len > 0 && kind_field + 1 + prost::encoding::encoded_len_varint(len as u64) + len > total
    {
        len -= 1;
    }
    len
}

/// An encoded `Packet` of [`PACKET_BYTES`] with `stamp` and random content.
pub fn data_packet(stamp: Stamp, random: &mut Random) -> Bytes {
    let mut content = vec![0; content_len(DATA_TYPE, PACKET_BYTES)];
    content[0..4].copy_from_slice(&stamp.writer.to_le_bytes());
    content[4..12].copy_from_slice(&stamp.sequence.to_le_bytes());
    content[12..20].copy_from_slice(&stamp.due_nanos.to_le_bytes());
    random.fill(&mut content[STAMP_BYTES..]);
    Bytes::from(
        Packet {
            r#type: DATA_TYPE.to_owned(),
            content,
            ..Packet::default()
        }
        .encode_to_vec(),
    )
}

/// A small packet that readers recognise and do not count.
pub fn sync_packet() -> Bytes {
    Bytes::from(
        Packet {
            r#type: SYNC_TYPE.to_owned(),
            ..Packet::default()
        }
        .encode_to_vec(),
    )
}

/// What a packet read back is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Data(Stamp),
    Sync,
}

/// Reads a packet's type and stamp without copying its content.
pub fn read_packet(packet: Bytes) -> anyhow::Result<Read> {
    let header = PacketHeader::decode(packet).context("a packet read back is not a Packet")?;
    if header.r#type == SYNC_TYPE {
        return Ok(Read::Sync);
    }
    let content = &header.content;
    anyhow::ensure!(
        header.r#type == DATA_TYPE && content.len() >= STAMP_BYTES,
        "a packet read back is not one this benchmark wrote (type '{}', {} content bytes)",
        header.r#type,
        content.len()
    );
    let u64_at = |at: usize| u64::from_le_bytes(content[at..at + 8].try_into().unwrap_or([0; 8]));
    Ok(Read::Data(Stamp {
        writer: u32::from_le_bytes(content[0..4].try_into().unwrap_or([0; 4])),
        sequence: u64_at(4),
        due_nanos: u64_at(12),
    }))
}

/// How writer loops shape their `WriteDataPackets` calls.
#[derive(Debug, Clone, Copy)]
pub struct CallShape {
    /// Packets in one message of the client stream.
    pub packets_per_request: usize,
    /// Packets in one call: the stream is closed after them and the answer (every packet
    /// durable) awaited; only then do they count.
    pub packets_per_call: usize,
}

/// One writer loop: each step is one `WriteDataPackets` call of [`CallShape::packets_per_call`]
/// packets to the main stream of one data source, built as the stream is sent.
pub struct StreamWriter {
    client: WriterClient,
    data_source: Arc<str>,
    writer: u32,
    next: u64,
    shape: CallShape,
    epoch: Epoch,
    /// Packets left for all loops together; `None` runs until the deadline.
    quota: Option<Arc<AtomicUsize>>,
    /// Packets of this loop whose call was answered OK.
    pub acknowledged: u64,
}

impl StreamWriter {
    pub fn new(
        channel: Channel,
        data_source: &str,
        writer: u32,
        shape: CallShape,
        epoch: Epoch,
    ) -> StreamWriter {
        StreamWriter {
            client: WriterClient::new(channel),
            data_source: data_source.into(),
            writer,
            next: 0,
            shape,
            epoch,
            quota: None,
            acknowledged: 0,
        }
    }

    /// Writes until `quota` packets were written by all loops sharing it.
    pub fn with_quota(mut self, quota: Arc<AtomicUsize>) -> StreamWriter {
        self.quota = Some(quota);
        self
    }

    /// Packets of the next call: the whole call, or what is left of the quota.
    fn claim(&self) -> usize {
        let want = self.shape.packets_per_call.max(1);
        match &self.quota {
            None => want,
            Some(quota) => {
                match quota.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                    (left > 0).then(|| left - want.min(left))
                }) {
                    Ok(left) => want.min(left),
                    Err(_) => 0,
                }
            }
        }
    }
}

impl Step for StreamWriter {
    async fn step(&mut self, scheduled: Instant) -> Result<(), StepError> {
        let count = self.claim();
        if count == 0 {
            return Err(StepError::Exhausted);
        }
        let per_request = self.shape.packets_per_request.max(1);
        let (data_source, writer, first) = (self.data_source.clone(), self.writer, self.next);
        let due_nanos = self.epoch.nanos(scheduled);
        let mut random = Random::new((u64::from(writer) << 40) ^ first);
        let requests = (0..count.div_ceil(per_request)).map(move |r| {
            let from = r * per_request;
            let details = (from..count.min(from + per_request))
                .map(|i| {
                    let stamp = Stamp {
                        writer,
                        sequence: first + i as u64,
                        due_nanos,
                    };
                    DataPacketDetails {
                        message: Some(data_packet(stamp, &mut random)),
                        data_source: data_source.to_string(),
                        ..DataPacketDetails::default()
                    }
                })
                .collect();
            WriteDataPacketsRequest { details }
        });
        self.next += count as u64;
        self.client
            .write_data_packets(futures::stream::iter(requests))
            .await
            .map_err(|status| {
                StepError::Failed(format!("{}: {}", status.code(), status.message()))
            })?;
        self.acknowledged += count as u64;
        Ok(())
    }
}

/// Opens a read connection on the main stream of `data_source` from `main_offset` (0 the
/// first packet kept, -1 the latest) and starts `ReadPackets` on it; returns once the call is
/// answered (its response headers came).
pub async fn open_read(
    channel: Channel,
    data_source: &str,
    main_offset: i64,
) -> anyhow::Result<Streaming<ReadPacketsResponse>> {
    let connection = new_connection(channel.clone(), data_source, main_offset).await?;
    ReaderClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .read_packets(ReadPacketsRequest {
            connection: Some(connection),
        })
        .await
        .context("ReadPackets failed")
        .map(|response| response.into_inner())
}

/// A read connection on the main stream of `data_source`.
pub async fn new_connection(
    channel: Channel,
    data_source: &str,
    main_offset: i64,
) -> anyhow::Result<pitwall_proto::api::Connection> {
    ConnectionClient::new(channel)
        .new_connection(NewConnectionRequest {
            details: Some(ConnectionDetails {
                data_source: data_source.to_owned(),
                main_offset,
                essentials_offset: -1,
                ..ConnectionDetails::default()
            }),
        })
        .await
        .context("NewConnection failed")?
        .into_inner()
        .connection
        .context("NewConnection answered no connection")
}

/// A data source name for one measurement, unique to the run.
pub fn data_source(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_1_kib_and_carry_their_stamp() {
        let stamp = Stamp {
            writer: 7,
            sequence: 123_456_789,
            due_nanos: 42,
        };
        let packet = data_packet(stamp, &mut Random::new(1));
        assert_eq!(packet.len(), PACKET_BYTES);
        assert_eq!(read_packet(packet).unwrap(), Read::Data(stamp));
        assert_eq!(read_packet(sync_packet()).unwrap(), Read::Sync);
    }

    #[test]
    fn contents_differ_between_packets() {
        let mut random = Random::new(3);
        let stamp = Stamp {
            writer: 0,
            sequence: 0,
            due_nanos: 0,
        };
        let (a, b) = (
            data_packet(stamp, &mut random),
            data_packet(stamp, &mut random),
        );
        assert_ne!(a[100..], b[100..]);
    }

    #[test]
    fn keys_order_by_writer_then_sequence() {
        let key = |writer, sequence| {
            Stamp {
                writer,
                sequence,
                due_nanos: 0,
            }
            .key()
        };
        assert!(key(0, u64::MAX) < key(1, 0));
        assert!(key(1, 1) < key(1, 2));
    }
}
