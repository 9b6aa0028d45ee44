//! `PacketWriterService`: data packets into the packet log, info packets into the sessions.
//!
//! A data packet is checked (a valid `Packet`, valid data source, stream and session key) and
//! stored as the client's bytes; the answer comes once it is durable. `WriteDataPackets`
//! keeps a bounded number of appends in flight while the client streams, and answers once every
//! packet of the stream is durable. An info packet of a session (`NewSession`, `SessionInfo`,
//! `EndOfSession`) becomes a session record, decided like any session write; info packets of
//! other types are not session records and are counted and left alone, as the reference's
//! session service does.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use pitwall_core::record::RecordDecodeError;
use pitwall_core::{Command, Record, Rejection};
use pitwall_proto::api::packet_writer_service_server::PacketWriterService;
use pitwall_proto::api::{
    DataPacketDetails, WriteDataPacketRequest, WriteDataPacketResponse, WriteDataPacketsRequest,
    WriteDataPacketsResponse, WriteInfoPacketRequest, WriteInfoPacketResponse,
    WriteInfoPacketsRequest, WriteInfoPacketsResponse,
};
use pitwall_proto::open_data::Packet;
use pitwall_proto::raw_packet::PacketHeader;
use prost::Message;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::rates::Written;
use super::{DataPlane, invalid, status_of};
use crate::engine::WriteError;
use crate::log::packets::{PacketLogError, PacketWrite};
use crate::service::{answer_status, starting};

/// Appends of one `WriteDataPackets` stream waiting to be durable at most: the stream is read
/// on while they are, and paused when this many are.
const MAX_IN_FLIGHT: usize = 32;

/// The data source label of info packets, as the reference counts them.
const INFO_LABEL: &str = "Info";

pub struct PacketWriter {
    plane: DataPlane,
}

type Pending = oneshot::Receiver<Result<(), PacketLogError>>;

impl PacketWriter {
    pub fn new(plane: DataPlane) -> PacketWriter {
        PacketWriter { plane }
    }

    /// A data packet, checked, as the log stores it.
    fn check(&self, detail: DataPacketDetails) -> Result<PacketWrite, Status> {
        let limits = &self.plane.limits;
        let message = detail.message.ok_or_else(|| {
            Status::invalid_argument("detail.message is missing: a data packet carries a Packet")
        })?;
        let header = PacketHeader::decode(message.clone()).map_err(|e| {
            Status::invalid_argument(format!("detail.message is not a valid Packet: {e}"))
        })?;
        limits
            .check_data_source(&detail.data_source)
            .map_err(invalid)?;
        if !detail.stream.is_empty() {
            limits
                .check_stream(&detail.data_source, &detail.stream)
                .map_err(invalid)?;
        }
        limits
            .check_packet_session_key(&detail.session_key)
            .map_err(invalid)?;
        Ok(PacketWrite {
            data_source: detail.data_source,
            stream: detail.stream,
            session_key: detail.session_key,
            packet: message,
            essential: header.is_essential,
        })
    }

    /// Queues checked packets; counts them as published.
    fn append(&self, writes: Vec<PacketWrite>) -> Result<(Pending, Counts), Status> {
        let counts = Counts::of(&writes);
        counts.add_to(&self.plane, |m| &m.data_packets_published, false);
        let pending = self.plane.packets()?.append(writes).map_err(status_of)?;
        Ok((pending, counts))
    }

    async fn durable(&self, pending: Pending, counts: Counts) -> Result<(), Status> {
        pending
            .await
            .unwrap_or_else(|_| {
                Err(PacketLogError::Unavailable(
                    "the server is shutting down".into(),
                ))
            })
            .map_err(status_of)?;
        counts.add_to(&self.plane, |m| &m.data_packets_routed, false);
        counts.add_to(&self.plane, |m| &m.data_packets_routed_bytes, true);
        self.plane.rates.record(&counts.by_session);
        Ok(())
    }

    async fn write_stream(
        &self,
        mut stream: Streaming<WriteDataPacketsRequest>,
    ) -> Result<(), Status> {
        let mut pending: VecDeque<(Pending, Counts)> = VecDeque::new();
        let mut written = 0usize;
        let failed = |written: usize, status: Status| {
            Status::new(
                status.code(),
                format!(
                    "{} ({written} packets of this stream were written before)",
                    status.message()
                ),
            )
        };
        while let Some(request) = stream.message().await? {
            let writes = request
                .details
                .into_iter()
                .enumerate()
                .map(|(index, detail)| {
                    self.check(detail).map_err(|status| {
                        Status::invalid_argument(format!("details[{index}]: {}", status.message()))
                    })
                })
                .collect::<Result<Vec<_>, Status>>()
                .map_err(|status| failed(written, status))?;
            if writes.is_empty() {
                continue;
            }
            pending.push_back(self.append(writes).map_err(|s| failed(written, s))?);
            while pending.len() > MAX_IN_FLIGHT {
                if let Some((answer, counts)) = pending.pop_front() {
                    let packets = counts.packets;
                    self.durable(answer, counts)
                        .await
                        .map_err(|s| failed(written, s))?;
                    written += packets;
                }
            }
        }
        while let Some((answer, counts)) = pending.pop_front() {
            let packets = counts.packets;
            self.durable(answer, counts)
                .await
                .map_err(|s| failed(written, s))?;
            written += packets;
        }
        Ok(())
    }

    /// An info packet: a session record into the sessions, anything else left alone.
    async fn info(&self, message: Option<Packet>) -> Result<(), Status> {
        let packet = message.ok_or_else(|| {
            Status::invalid_argument("message is missing: an info packet carries a Packet")
        })?;
        self.plane
            .metrics
            .info_packets_published
            .with_label_values(&[INFO_LABEL])
            .inc();
        let record = match Record::from_packet(packet) {
            Ok(record) => record,
            Err(RecordDecodeError::UnknownType(kind)) => {
                debug!(packet_type = %kind, "info packet that is not a session record left alone");
                return Ok(());
            }
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        let command = Command::Record(record);
        command.validate(&self.plane.limits).map_err(invalid)?;
        let engine = self.plane.engine.get().ok_or_else(starting)?;
        match engine.submit(command).await {
            Ok(_) => Ok(()),
            Err(WriteError::Rejected(rejection @ Rejection::UnknownSession(_))) => {
                Err(Status::not_found(format!(
                    "{rejection}; a SessionInfo or EndOfSession needs its NewSession first"
                )))
            }
            Err(WriteError::Rejected(rejection)) => Err(invalid(rejection)),
            Err(e @ WriteError::Overloaded(_)) => Err(Status::resource_exhausted(e.to_string())),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}

/// Packets (and bytes) per (data source, stream), to count a batch with one label lookup per
/// pair, and per (session key, stream) for the board's rates.
struct Counts {
    packets: usize,
    by_stream: BTreeMap<(String, String), (u64, u64)>,
    by_session: Vec<Written>,
}

impl Counts {
    fn of(writes: &[PacketWrite]) -> Counts {
        let mut by_stream: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        for write in writes {
            let entry = by_stream
                .entry((write.data_source.clone(), write.stream.clone()))
                .or_default();
            entry.0 += 1;
            entry.1 += write.packet.len() as u64;
        }
        Counts {
            packets: writes.len(),
            by_stream,
            by_session: by_session(writes),
        }
    }

    fn add_to(
        &self,
        plane: &DataPlane,
        counter: impl Fn(&crate::metrics::Metrics) -> &prometheus::IntCounterVec,
        bytes: bool,
    ) {
        for ((data_source, stream), (packets, size)) in &self.by_stream {
            let labels = plane.metrics.stream_labels(data_source, stream);
            counter(&plane.metrics)
                .with_label_values(&labels)
                .inc_by(if bytes { *size } else { *packets });
        }
    }
}

/// A batch's packets grouped by (session key, stream), sorted so that each pair's names are
/// copied once however many packets it has. Packets without a session key belong to no
/// session's panel.
fn by_session(writes: &[PacketWrite]) -> Vec<Written> {
    let mut pairs: Vec<(&str, &str, usize)> = writes
        .iter()
        .filter(|write| !write.session_key.is_empty())
        .map(|write| {
            (
                write.session_key.as_str(),
                write.stream.as_str(),
                write.packet.len(),
            )
        })
        .collect();
    pairs.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut grouped: Vec<Written> = Vec::new();
    for (session_key, stream, bytes) in pairs {
        match grouped.last_mut() {
            Some(last) if last.session_key == session_key && last.stream == stream => {
                last.packets += 1;
                last.bytes += bytes as u64;
            }
            _ => grouped.push(Written {
                session_key: session_key.to_owned(),
                stream: stream.to_owned(),
                packets: 1,
                bytes: bytes as u64,
            }),
        }
    }
    grouped
}

#[tonic::async_trait]
impl PacketWriterService for PacketWriter {
    async fn write_data_packet(
        &self,
        request: Request<WriteDataPacketRequest>,
    ) -> Result<Response<WriteDataPacketResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let detail = request.into_inner().detail.ok_or_else(|| {
                Status::invalid_argument("detail is missing: WriteDataPacket carries one packet")
            })?;
            let write = self.check(detail)?;
            let (pending, counts) = self.append(vec![write])?;
            self.durable(pending, counts).await?;
            Ok(WriteDataPacketResponse {})
        }
        .await;
        answer_status(&self.plane.metrics, "WriteDataPacket", started, result)
    }

    async fn write_data_packets(
        &self,
        request: Request<Streaming<WriteDataPacketsRequest>>,
    ) -> Result<Response<WriteDataPacketsResponse>, Status> {
        let started = Instant::now();
        let result = self
            .write_stream(request.into_inner())
            .await
            .map(|()| WriteDataPacketsResponse {});
        answer_status(&self.plane.metrics, "WriteDataPackets", started, result)
    }

    async fn write_info_packet(
        &self,
        request: Request<WriteInfoPacketRequest>,
    ) -> Result<Response<WriteInfoPacketResponse>, Status> {
        let started = Instant::now();
        let result = self
            .info(request.into_inner().message)
            .await
            .map(|()| WriteInfoPacketResponse {});
        answer_status(&self.plane.metrics, "WriteInfoPacket", started, result)
    }

    async fn write_info_packets(
        &self,
        request: Request<Streaming<WriteInfoPacketsRequest>>,
    ) -> Result<Response<WriteInfoPacketsResponse>, Status> {
        let started = Instant::now();
        let mut stream = request.into_inner();
        let result = async {
            let mut written = 0usize;
            while let Some(request) = stream.message().await? {
                self.info(request.message).await.map_err(|status| {
                    Status::new(
                        status.code(),
                        format!(
                            "{} ({written} info packets of this stream were written before)",
                            status.message()
                        ),
                    )
                })?;
                written += 1;
            }
            Ok(WriteInfoPacketsResponse {})
        }
        .await;
        answer_status(&self.plane.metrics, "WriteInfoPackets", started, result)
    }
}
