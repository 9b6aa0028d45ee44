//! `pitwall packets tail`: follows a data source's packets through the Stream API's
//! `ConnectionManagerService` and `PacketReaderService`, one line per packet, until Ctrl-C; the
//! read connection it opens is closed on the way out.

use pitwall_proto::api::connection_manager_service_client::ConnectionManagerServiceClient;
use pitwall_proto::api::packet_reader_service_client::PacketReaderServiceClient;
use pitwall_proto::api::{
    CloseConnectionRequest, Connection, ConnectionDetails, NewConnectionRequest, ReadPacketsRequest,
};
use pitwall_proto::raw_packet::{PacketHeader, PacketResponse};
use prost::Message;
use serde_json::json;

use crate::cli::{Output, PacketsArgs, PacketsCommand};
use crate::client::{self, ClientError};
use crate::output;
use crate::values::format_time;

pub async fn run(args: PacketsArgs) -> Result<(), ClientError> {
    let (channel, bearer) = client::connect(&args.client).await?;
    let url = args.client.server.clone();
    let PacketsCommand::Tail {
        data_source,
        session,
        streams,
        from_start,
    } = args.command;
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
        if args.client.output == Output::Table {
            output::text("time  stream  type  bytes  essential  session");
        }
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    for packet in response.response {
                        print(&packet, args.client.output);
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
