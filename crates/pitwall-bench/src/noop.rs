//! The transport's limit for packet writes: an in-process tonic server on loopback whose
//! `WriteDataPackets` reads the client's stream, decodes each message as Pitwall does (the
//! packets stay bytes) and discards it. Driven by the same writer loops as Pitwall, it measures
//! what gRPC, HTTP/2 and TCP on this machine cost for the same bytes, with no storage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use pitwall_proto::api::packet_writer_service_server::{
    PacketWriterService, PacketWriterServiceServer,
};
use pitwall_proto::api::{
    WriteDataPacketRequest, WriteDataPacketResponse, WriteDataPacketsRequest,
    WriteDataPacketsResponse, WriteInfoPacketRequest, WriteInfoPacketResponse,
    WriteInfoPacketsRequest, WriteInfoPacketsResponse,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

/// Counts what it discards, so the benchmark can check every packet got there.
#[derive(Default)]
struct Discard {
    packets: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl PacketWriterService for Discard {
    async fn write_data_packet(
        &self,
        request: Request<WriteDataPacketRequest>,
    ) -> Result<Response<WriteDataPacketResponse>, Status> {
        let packets = u64::from(request.into_inner().detail.is_some());
        self.packets.fetch_add(packets, Ordering::Relaxed);
        Ok(Response::new(WriteDataPacketResponse {}))
    }

    async fn write_data_packets(
        &self,
        request: Request<Streaming<WriteDataPacketsRequest>>,
    ) -> Result<Response<WriteDataPacketsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut packets = 0;
        while let Some(request) = stream.message().await? {
            packets += request.details.len() as u64;
        }
        self.packets.fetch_add(packets, Ordering::Relaxed);
        Ok(Response::new(WriteDataPacketsResponse {}))
    }

    async fn write_info_packet(
        &self,
        _request: Request<WriteInfoPacketRequest>,
    ) -> Result<Response<WriteInfoPacketResponse>, Status> {
        Ok(Response::new(WriteInfoPacketResponse {}))
    }

    async fn write_info_packets(
        &self,
        request: Request<Streaming<WriteInfoPacketsRequest>>,
    ) -> Result<Response<WriteInfoPacketsResponse>, Status> {
        let mut stream = request.into_inner();
        while stream.message().await?.is_some() {}
        Ok(Response::new(WriteInfoPacketsResponse {}))
    }
}

/// A running no-op server; [`NoopServer::stop`] ends it.
pub struct NoopServer {
    pub url: String,
    packets: Arc<AtomicU64>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl NoopServer {
    /// Serves on an ephemeral loopback port, with the message limit Pitwall has by default.
    pub async fn start() -> anyhow::Result<NoopServer> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("cannot bind the no-op server")?;
        let url = format!("http://{}", listener.local_addr()?);
        let incoming = TcpListenerStream::new(listener).map(|tcp| {
            // As Pitwall does for the connections it accepts.
            tcp.inspect(|tcp| {
                let _ = tcp.set_nodelay(true);
            })
        });
        let discard = Discard::default();
        let packets = discard.packets.clone();
        let (shutdown, stopped) = oneshot::channel();
        let service = PacketWriterServiceServer::new(discard)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.await;
                }),
        );
        Ok(NoopServer {
            url,
            packets,
            shutdown,
            task,
        })
    }

    /// Packets received so far.
    pub fn packets(&self) -> u64 {
        self.packets.load(Ordering::Relaxed)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        self.task
            .await
            .context("the no-op server's task failed")?
            .context("the no-op server failed")
    }
}

/// Pitwall's default `--max-message-bytes`.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
