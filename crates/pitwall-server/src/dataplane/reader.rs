//! `PacketReaderService`: reads that follow a connection's plan.
//!
//! Each call starts one read of the packet log (an owned task feeding a bounded channel) and
//! turns its batches into responses as the client takes them: a client that reads slowly
//! slows its own read and nothing else. A read ends when the client goes, when its connection
//! is closed, or at shutdown; `ReadEssentials` also ends once it has sent what the essentials
//! held when it started. `ReadDataPackets` reads like `ReadPackets` and keeps only the data
//! packets its filter passes (`pitwall_core::data_filter`), resolving data format ids in the
//! formats of the connection's data source; its patterns are checked before the read starts.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use pitwall_core::data_filter::{DataPacketFilter, FormatLookup, Verdict};
use pitwall_core::data_format::{FormatContent, FormatKind};
use pitwall_proto::api::packet_reader_service_server::PacketReaderService;
use pitwall_proto::api::{
    Connection, PacketResponse, ReadDataPacketsRequest, ReadDataPacketsResponse,
    ReadEssentialsRequest, ReadEssentialsResponse, ReadPacketsRequest, ReadPacketsResponse,
};
use pitwall_proto::raw_packet::PacketHeader;
use prost::Message;
use prost_types::Timestamp;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::connections::Open;
use super::formats::{Formats, SourceFormats};
use super::{Batching, DataPlane, invalid, status_of};
use crate::log::packets::{
    PacketLogError, PacketStream, ReadPacket, ReadPlan, ReadSpace, Space, Start,
};
use crate::service::answer_status;

pub struct PacketReader {
    plane: DataPlane,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl PacketReader {
    pub fn new(plane: DataPlane) -> PacketReader {
        PacketReader { plane }
    }

    fn connection(&self, connection: Option<Connection>) -> Result<Open, Status> {
        let id = connection
            .ok_or_else(|| Status::invalid_argument("connection is missing"))?
            .id;
        self.plane.connections.get(id).ok_or_else(|| {
            Status::not_found(format!(
                "connection {id} is not open on this server (closed, or opened before a \
                 restart); open one with NewConnection"
            ))
        })
    }

    /// The main stream (unless excluded) and each named stream with a space of its own, from
    /// the connection's offsets.
    fn plan(&self, open: &Open) -> Result<ReadPlan, Status> {
        let packets = self.plane.packets()?;
        let details = &open.details;
        let mut spaces = Vec::new();
        if !details.exclude_main_stream {
            spaces.push(ReadSpace {
                space: Space::Main,
                label: String::new(),
                start: Start::from_api(details.main_offset, &details.consumer_group),
            });
        }
        for (index, stream) in details.streams.iter().enumerate() {
            let space = packets.space_of(stream);
            // A stream the layout keeps in the main stream has no packets of its own to read:
            // they come labelled "" with the main stream.
            if space == Space::Main {
                continue;
            }
            spaces.push(ReadSpace {
                space,
                label: stream.clone(),
                start: Start::from_api(
                    details.stream_offsets.get(index).copied().unwrap_or(0),
                    &details.consumer_group,
                ),
            });
        }
        Ok(ReadPlan {
            data_source: details.data_source.clone(),
            spaces,
            session_key: details.session_key.clone(),
            finite: false,
            consumer_group: details.consumer_group.clone(),
        })
    }

    /// Starts the read, and returns once its start positions are fixed: the call is answered
    /// then, so a client that writes after it gets its packets.
    async fn start(&self, open: &Open, plan: ReadPlan) -> Result<PacketStream, Status> {
        let mut stream = self.plane.packets()?.read(plan, open.closed.clone());
        match stream.recv().await {
            Some(Err(e)) => Err(status_of(e)),
            // The read's first message is empty (it only says the read has started).
            Some(Ok(_)) | None => Ok(stream),
        }
    }
}

/// Responses of a read: one packet each, or batched within the configured limits.
fn responses<T: Send + 'static>(
    plane: &DataPlane,
    data_source: String,
    stream: impl Stream<Item = Result<Vec<ReadPacket>, PacketLogError>> + Send + 'static,
    batching: Option<Batching>,
    make: fn(Vec<PacketResponse>) -> T,
) -> ResponseStream<T> {
    let delivered = plane
        .metrics
        .packets_delivered
        .with_label_values(&[data_source.as_str()]);
    let responses = stream.flat_map(move |batch| {
        let items: Vec<Result<T, Status>> = match batch {
            Err(e) => vec![Err(status_of(e))],
            Ok(packets) => {
                delivered.inc_by(packets.len() as u64);
                group(packets, batching)
                    .into_iter()
                    .map(|group| Ok(make(group)))
                    .collect()
            }
        };
        futures::stream::iter(items)
    });
    Box::pin(responses)
}

/// Packets as responses: each alone, or groups within the batching limits.
fn group(packets: Vec<ReadPacket>, batching: Option<Batching>) -> Vec<Vec<PacketResponse>> {
    let Some(batching) = batching.filter(|b| b.enabled) else {
        return packets.into_iter().map(|p| vec![response(p)]).collect();
    };
    let mut groups = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for packet in packets {
        let size = packet.packet.len();
        if !current.is_empty()
            && (current.len() >= batching.max_packets || bytes + size > batching.max_bytes)
        {
            groups.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(response(packet));
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

fn response(packet: ReadPacket) -> PacketResponse {
    PacketResponse {
        packet: Some(packet.packet),
        stream: packet.stream,
        submit_time: Some(Timestamp {
            seconds: packet.time_nanos.div_euclid(1_000_000_000),
            nanos: packet.time_nanos.rem_euclid(1_000_000_000) as i32,
        }),
    }
}

#[tonic::async_trait]
impl PacketReaderService for PacketReader {
    type ReadPacketsStream = ResponseStream<ReadPacketsResponse>;

    async fn read_packets(
        &self,
        request: Request<ReadPacketsRequest>,
    ) -> Result<Response<Self::ReadPacketsStream>, Status> {
        let started = Instant::now();
        let result = async {
            let open = self.connection(request.into_inner().connection)?;
            let plan = self.plan(&open)?;
            let stream = self.start(&open, plan).await?;
            Ok(responses(
                &self.plane,
                open.details.data_source.clone(),
                tokio_stream::wrappers::ReceiverStream::new(stream),
                Some(self.plane.batching),
                |response| ReadPacketsResponse { response },
            ))
        }
        .await;
        answer_status(&self.plane.metrics, "ReadPackets", started, result)
    }

    type ReadEssentialsStream = ResponseStream<ReadEssentialsResponse>;

    async fn read_essentials(
        &self,
        request: Request<ReadEssentialsRequest>,
    ) -> Result<Response<Self::ReadEssentialsStream>, Status> {
        let started = Instant::now();
        let result = async {
            let open = self.connection(request.into_inner().connection)?;
            let details = &open.details;
            let plan = ReadPlan {
                data_source: details.data_source.clone(),
                spaces: vec![ReadSpace {
                    space: Space::Essentials,
                    label: String::new(),
                    // A finite read of what is there: nothing of it is committed.
                    start: Start::from_api(details.essentials_offset, ""),
                }],
                session_key: details.session_key.clone(),
                finite: true,
                consumer_group: String::new(),
            };
            let stream = self.start(&open, plan).await?;
            // Never batched, as in the reference: one packet per response.
            Ok(responses(
                &self.plane,
                details.data_source.clone(),
                tokio_stream::wrappers::ReceiverStream::new(stream),
                None,
                |response| ReadEssentialsResponse { response },
            ))
        }
        .await;
        answer_status(&self.plane.metrics, "ReadEssentials", started, result)
    }

    type ReadDataPacketsStream = ResponseStream<ReadDataPacketsResponse>;

    async fn read_data_packets(
        &self,
        request: Request<ReadDataPacketsRequest>,
    ) -> Result<Response<Self::ReadDataPacketsStream>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner().request.ok_or_else(|| {
                Status::invalid_argument(
                    "request is missing: ReadDataPackets carries a DataPacketRequest (the \
                     connection and the filters)",
                )
            })?;
            // Patterns are checked before anything is read.
            let filter = DataPacketFilter::new(&request).map_err(invalid)?;
            let open = self.connection(request.connection)?;
            let plan = self.plan(&open)?;
            let formats = self.plane.formats.clone().ok_or_else(|| {
                Status::unavailable("this server keeps no data formats: it has no packet log")
            })?;
            let data_source = open.details.data_source.clone();
            // Every definition stored before the call is merged before its first packet.
            let resolver = formats.resolver(&data_source).await;
            let packets = self.start(&open, plan).await?;
            let read = DataRead {
                packets,
                filter,
                formats,
                data_source: data_source.clone(),
                resolver,
            };
            Ok(responses(
                &self.plane,
                data_source,
                read.into_stream(),
                Some(self.plane.batching),
                |response| ReadDataPacketsResponse { response },
            ))
        }
        .await;
        answer_status(&self.plane.metrics, "ReadDataPackets", started, result)
    }
}

/// A `ReadDataPackets` call: the packets read, and what its filter keeps of them.
struct DataRead {
    packets: PacketStream,
    filter: DataPacketFilter,
    formats: Arc<Formats>,
    data_source: String,
    /// The formats of the connection's data source; `None` while it has no essentials.
    resolver: Option<Arc<SourceFormats>>,
}

/// The formats of a data source that has none yet.
struct NoFormats;

impl FormatLookup for NoFormats {
    fn lookup(&self, _kind: FormatKind, _id: u64) -> Option<Arc<FormatContent>> {
        None
    }
}

impl DataRead {
    /// The batches of kept packets; batches with none kept are not sent. The read's bounded
    /// channel stays the only buffer: a slow client still slows its own read.
    fn into_stream(
        self,
    ) -> impl Stream<Item = Result<Vec<ReadPacket>, PacketLogError>> + Send + 'static {
        futures::stream::unfold(self, |mut read| async move {
            loop {
                match read.packets.recv().await? {
                    Err(e) => return Some((Err(e), read)),
                    Ok(packets) => {
                        let kept = read.keep(packets).await;
                        if !kept.is_empty() {
                            return Some((Ok(kept), read));
                        }
                    }
                }
            }
        })
    }

    async fn keep(&mut self, packets: Vec<ReadPacket>) -> Vec<ReadPacket> {
        let mut kept = Vec::with_capacity(packets.len());
        for packet in packets {
            // Stored packets were checked on write; one that does not decode is not data.
            let Ok(header) = PacketHeader::decode(packet.packet.clone()) else {
                continue;
            };
            let mut verdict = self.decide(&header);
            if let Verdict::UnknownFormat(_) = verdict {
                // Its definition may be stored and not merged yet: bring the formats up to
                // the essentials' end, and look once more.
                self.resolver = self.formats.resolver(&self.data_source).await;
                verdict = self.decide(&header);
            }
            match verdict {
                Verdict::Keep => kept.push(packet),
                Verdict::UnknownFormat(id) => debug!(
                    data_source = %self.data_source,
                    offset = packet.offset,
                    id,
                    "a data packet with an unknown data format id is not delivered"
                ),
                Verdict::NotData | Verdict::Filtered | Verdict::Undecodable => {}
            }
        }
        kept
    }

    fn decide(&mut self, header: &PacketHeader) -> Verdict {
        let formats: &dyn FormatLookup = match &self.resolver {
            Some(source) => source.as_ref(),
            None => &NoFormats,
        };
        self.filter.decide(&header.r#type, &header.content, formats)
    }
}
