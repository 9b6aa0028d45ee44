//! `PacketReaderService`: reads that follow a connection's plan.
//!
//! Each call starts one read of the packet log (an owned task feeding a bounded channel) and
//! turns its batches into responses as the client takes them: a client that reads slowly
//! slows its own read and nothing else. A read ends when the client goes, when its connection
//! is closed, or at shutdown; `ReadEssentials` also ends once it has sent what the essentials
//! held when it started.

use std::pin::Pin;
use std::time::Instant;

use futures::{Stream, StreamExt};
use pitwall_proto::api::packet_reader_service_server::PacketReaderService;
use pitwall_proto::api::{
    Connection, PacketResponse, ReadDataPacketsRequest, ReadDataPacketsResponse,
    ReadEssentialsRequest, ReadEssentialsResponse, ReadPacketsRequest, ReadPacketsResponse,
};
use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use super::connections::Open;
use super::{Batching, DataPlane, status_of};
use crate::log::packets::{PacketStream, ReadPacket, ReadPlan, ReadSpace, Space, Start};
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
                start: Start::from_api(details.main_offset),
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
                start: Start::from_api(details.stream_offsets.get(index).copied().unwrap_or(0)),
            });
        }
        Ok(ReadPlan {
            data_source: details.data_source.clone(),
            spaces,
            session_key: details.session_key.clone(),
            finite: false,
        })
    }

    fn start(&self, open: &Open, plan: ReadPlan) -> Result<PacketStream, Status> {
        Ok(self.plane.packets()?.read(plan, open.closed.clone()))
    }
}

/// Responses of a read: one packet each, or batched within the configured limits.
fn responses<T: Send + 'static>(
    plane: &DataPlane,
    data_source: String,
    stream: PacketStream,
    batching: Option<Batching>,
    make: fn(Vec<PacketResponse>) -> T,
) -> ResponseStream<T> {
    let delivered = plane
        .metrics
        .packets_delivered
        .with_label_values(&[data_source.as_str()]);
    let responses = tokio_stream::wrappers::ReceiverStream::new(stream).flat_map(move |batch| {
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
        let result = (|| {
            let open = self.connection(request.into_inner().connection)?;
            let plan = self.plan(&open)?;
            let stream = self.start(&open, plan)?;
            Ok(responses(
                &self.plane,
                open.details.data_source.clone(),
                stream,
                Some(self.plane.batching),
                |response| ReadPacketsResponse { response },
            ))
        })();
        answer_status(&self.plane.metrics, "ReadPackets", started, result)
    }

    type ReadEssentialsStream = ResponseStream<ReadEssentialsResponse>;

    async fn read_essentials(
        &self,
        request: Request<ReadEssentialsRequest>,
    ) -> Result<Response<Self::ReadEssentialsStream>, Status> {
        let started = Instant::now();
        let result = (|| {
            let open = self.connection(request.into_inner().connection)?;
            let details = &open.details;
            let plan = ReadPlan {
                data_source: details.data_source.clone(),
                spaces: vec![ReadSpace {
                    space: Space::Essentials,
                    label: String::new(),
                    start: Start::from_api(details.essentials_offset),
                }],
                session_key: details.session_key.clone(),
                finite: true,
            };
            let stream = self.start(&open, plan)?;
            // Never batched, as in the reference: one packet per response.
            Ok(responses(
                &self.plane,
                details.data_source.clone(),
                stream,
                None,
                |response| ReadEssentialsResponse { response },
            ))
        })();
        answer_status(&self.plane.metrics, "ReadEssentials", started, result)
    }

    type ReadDataPacketsStream = ResponseStream<ReadDataPacketsResponse>;

    async fn read_data_packets(
        &self,
        _request: Request<ReadDataPacketsRequest>,
    ) -> Result<Response<Self::ReadDataPacketsStream>, Status> {
        Err(Status::unimplemented(
            "ReadDataPackets comes with data formats",
        ))
    }
}
