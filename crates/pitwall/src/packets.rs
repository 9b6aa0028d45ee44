//! `pitwall packets tail`: follows a data source's packets through the Stream API's
//! `ConnectionManagerService` and `PacketReaderService`, one line per packet, until Ctrl-C; the
//! read connection it opens is closed on the way out.
//!
//! `pitwall packets send`: writes packets through `PacketWriterService`, at a rate or as fast as
//! the server takes them, and prints how many were acknowledged durable.

use std::time::Duration;

use pitwall_proto::api::connection_manager_service_client::ConnectionManagerServiceClient;
use pitwall_proto::api::packet_reader_service_client::PacketReaderServiceClient;
use pitwall_proto::api::packet_writer_service_client::PacketWriterServiceClient;
use pitwall_proto::api::{
    CloseConnectionRequest, Connection, ConnectionDetails, DataPacketDetails, NewConnectionRequest,
    ReadPacketsRequest, WriteDataPacketsRequest,
};
use pitwall_proto::open_data::{
    DataStatus, DoubleSample, DoubleSampleList, Packet, PeriodicDataPacket, SampleColumn,
    SampleDataFormat, sample_column, sample_data_format,
};
use pitwall_proto::raw_packet::{PacketHeader, PacketResponse};
use prost::Message;
use serde_json::json;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::cli::{ClientArgs, Output, PacketsArgs, PacketsCommand};
use crate::client::{self, Bearer, ClientError};
use crate::output;
use crate::values::format_time;

/// Packets of one `WriteDataPackets` call at most. A call is answered once all its packets are
/// durable, so the count acknowledged moves on call by call.
const PACKETS_PER_CALL: u64 = 1000;
/// Packets of one request of a call: well below the server's 4 MiB message limit.
const PACKETS_PER_REQUEST: usize = 100;
/// The data format id the packets name (`DataFormatManagerService` gives real ones).
const DATA_FORMAT: u64 = 1;

pub async fn run(args: PacketsArgs) -> Result<(), ClientError> {
    let (channel, bearer) = client::connect(&args.client).await?;
    match args.command {
        PacketsCommand::Tail {
            data_source,
            session,
            streams,
            from_start,
        } => {
            let tail = Tail {
                data_source,
                session,
                streams,
                from_start,
            };
            tail.run(&args.client, channel, bearer).await
        }
        PacketsCommand::Send {
            data_source,
            session,
            stream,
            count,
            rate,
        } => {
            let send = Send {
                data_source,
                session: session.unwrap_or_default(),
                stream: stream.unwrap_or_default(),
                count,
                rate,
            };
            send.run(&args.client, channel, bearer).await
        }
    }
}

struct Tail {
    data_source: String,
    session: Option<String>,
    streams: Vec<String>,
    from_start: bool,
}

impl Tail {
    async fn run(
        self,
        args: &ClientArgs,
        channel: Channel,
        bearer: Bearer,
    ) -> Result<(), ClientError> {
        let url = args.server.clone();
        let Tail {
            data_source,
            session,
            streams,
            from_start,
        } = self;
        // From the start: offset 0 (the first packet kept); otherwise -1, only what comes next.
        let offset = if from_start { 0 } else { -1 };
        let mut connections =
            ConnectionManagerServiceClient::with_interceptor(channel.clone(), bearer.clone());
        let connection = connections
            .new_connection(NewConnectionRequest {
                details: Some(ConnectionDetails {
                    data_source,
                    session_key: session.unwrap_or_default(),
                    stream_offsets: vec![offset; streams.len()],
                    streams,
                    main_offset: offset,
                    ..Default::default()
                }),
            })
            .await
            .map_err(|status| client::failure(&url, status))?
            .into_inner()
            .connection
            .unwrap_or_default();
        let mut reader = PacketReaderServiceClient::with_interceptor(channel, bearer);
        let followed = async {
            let mut stream = reader
                .read_packets(ReadPacketsRequest {
                    connection: Some(connection),
                })
                .await
                .map_err(|status| client::failure(&url, status))?
                .into_inner();
            eprintln!(
                "following the packets of connection {} ({}); Ctrl-C to stop",
                connection.id,
                if from_start {
                    "from the first kept"
                } else {
                    "from now"
                }
            );
            if args.output == Output::Table {
                output::text("time  stream  type  bytes  essential  session");
            }
            loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        for packet in response.response {
                            print(&packet, args.output);
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(client::failure(&url, status)),
                }
            }
        };
        let result = tokio::select! {
            result = followed => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
        };
        close(&mut connections, connection).await;
        result
    }
}

struct Send {
    data_source: String,
    session: String,
    stream: String,
    count: u64,
    rate: Option<f64>,
}

impl Send {
    /// Writes the packets, then prints how many were acknowledged, whether all went, Ctrl-C
    /// stopped it or the server refused one (whose reason is the error). Ctrl-C lets the call in
    /// flight finish, so the count printed is every packet the server holds; a second Ctrl-C
    /// abandons that call.
    async fn run(
        self,
        args: &ClientArgs,
        channel: Channel,
        bearer: Bearer,
    ) -> Result<(), ClientError> {
        let mut writer = PacketWriterServiceClient::with_interceptor(channel, bearer);
        let mut acknowledged = 0u64;
        let started = Instant::now();
        // One listener for the whole run: a Ctrl-C between two polls is still seen.
        let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
        let result = async {
            while acknowledged < self.count {
                let due = match self.rate {
                    None => self.count,
                    Some(rate) => {
                        let next = Duration::from_secs_f64(acknowledged as f64 / rate);
                        tokio::select! {
                            () = tokio::time::sleep_until(started + next) => {}
                            _ = &mut interrupted => return Ok(()),
                        }
                        // Every packet due by now: a slow answer is caught up, not dropped.
                        let by_now = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
                        by_now.clamp(acknowledged + 1, self.count)
                    }
                };
                let call = (due - acknowledged).min(PACKETS_PER_CALL);
                let details: Vec<DataPacketDetails> = (acknowledged..acknowledged + call)
                    .map(|number| self.detail(number))
                    .collect();
                let requests: Vec<WriteDataPacketsRequest> = details
                    .chunks(PACKETS_PER_REQUEST)
                    .map(|chunk| WriteDataPacketsRequest {
                        details: chunk.to_vec(),
                    })
                    .collect();
                let mut answer =
                    std::pin::pin!(writer.write_data_packets(futures::stream::iter(requests)));
                tokio::select! {
                    answer = &mut answer => {
                        answer.map_err(|status| client::failure(&args.server, status))?;
                        acknowledged += call;
                        continue;
                    }
                    _ = &mut interrupted => {}
                }
                // Some of this call's packets may be stored already: its answer says whether all
                // are, unless a second Ctrl-C gives up on it.
                tokio::select! {
                    answer = answer => {
                        answer.map_err(|status| client::failure(&args.server, status))?;
                        acknowledged += call;
                    }
                    _ = tokio::signal::ctrl_c() => {}
                }
                return Ok(());
            }
            Ok(())
        }
        .await;
        match args.output {
            Output::Table => output::text(&format!("{acknowledged} packets acknowledged")),
            Output::Json => output::json(&json!({
                "acknowledged": acknowledged,
                "data_source": self.data_source,
                "stream": self.stream,
                "session_key": self.session,
            })),
        }
        result
    }

    /// Packet `number`: one sample whose value is its number, so a reader can tell them apart.
    fn detail(&self, number: u64) -> DataPacketDetails {
        let start_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        let content = PeriodicDataPacket {
            data_format: Some(SampleDataFormat {
                format: Some(sample_data_format::Format::DataFormatIdentifier(
                    DATA_FORMAT,
                )),
            }),
            start_time,
            interval: 0,
            columns: vec![SampleColumn {
                list: Some(sample_column::List::DoubleSamples(DoubleSampleList {
                    samples: vec![DoubleSample {
                        value: number as f64,
                        status: DataStatus::Valid as i32,
                    }],
                })),
            }],
        };
        let packet = Packet {
            r#type: "PeriodicData".into(),
            session_key: self.session.clone(),
            is_essential: false,
            content: content.encode_to_vec(),
            id: number,
        };
        DataPacketDetails::new(&packet, &self.data_source, &self.stream, &self.session)
    }
}

/// Closes the connection the tail opened; the server forgets it either way once it restarts.
async fn close(connections: &mut Connections, connection: Connection) {
    let _ = connections
        .close_connection(CloseConnectionRequest {
            connection: Some(connection),
        })
        .await;
}

type Connections = ConnectionManagerServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, client::Bearer>,
>;

fn print(response: &PacketResponse, format: Output) {
    let bytes = response.packet.as_ref().map_or(0, |p| p.len());
    let header = response
        .packet
        .clone()
        .and_then(|bytes| PacketHeader::decode(bytes).ok())
        .unwrap_or_default();
    let time = response
        .submit_time
        .as_ref()
        .map(format_time)
        .unwrap_or_default();
    match format {
        Output::Table => output::text(&format!(
            "{time}  {}  {}  {bytes}  {}  {}",
            if response.stream.is_empty() {
                "-"
            } else {
                &response.stream
            },
            header.r#type,
            header.is_essential,
            header.session_key,
        )),
        Output::Json => output::json(&json!({
            "time": time,
            "stream": response.stream,
            "type": header.r#type,
            "bytes": bytes,
            "is_essential": header.is_essential,
            "session_key": header.session_key,
            "id": header.id,
        })),
    }
}
