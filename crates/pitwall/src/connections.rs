//! `pitwall connections list`: the read connections open on a server, through Pitwall's own
//! `pitwall.v1.ReadConnections`.

use pitwall_proto::feed::ListConnectionsRequest;
use pitwall_proto::feed::read_connections_client::ReadConnectionsClient;
use serde_json::json;

use crate::cli::{ConnectionsArgs, ConnectionsCommand, Output};
use crate::client::{self, ClientError};
use crate::output;

pub async fn run(args: ConnectionsArgs) -> Result<(), ClientError> {
    let (channel, bearer) = client::connect(&args.client).await?;
    let ConnectionsCommand::List = args.command;
    let connections = ReadConnectionsClient::with_interceptor(channel, bearer)
        .list_connections(ListConnectionsRequest {})
        .await
        .map_err(|status| client::failure(&args.client.server, status))?
        .into_inner()
        .connections;
    match args.client.output {
        Output::Json => {
            for c in &connections {
                output::json(&json!({
                    "id": c.id,
                    "data_source": c.data_source,
                    "session_key": c.session_key,
                    "streams": c.streams,
                    "stream_offsets": c.stream_offsets,
                    "main_offset": c.main_offset,
                    "essentials_offset": c.essentials_offset,
                    "exclude_main_stream": c.exclude_main_stream,
                }));
            }
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = connections
                .iter()
                .map(|c| {
                    let streams: Vec<String> = c
                        .streams
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            format!("{s}@{}", c.stream_offsets.get(i).copied().unwrap_or(0))
                        })
                        .collect();
                    vec![
                        c.id.to_string(),
                        c.data_source.clone(),
                        if c.session_key.is_empty() {
                            "-".into()
                        } else {
                            c.session_key.clone()
                        },
                        if c.exclude_main_stream {
                            "excluded".into()
                        } else {
                            c.main_offset.to_string()
                        },
                        if streams.is_empty() {
                            "-".into()
                        } else {
                            streams.join(",")
                        },
                    ]
                })
                .collect();
            output::table(&["id", "data_source", "session", "main", "streams"], &rows);
        }
    }
    Ok(())
}
