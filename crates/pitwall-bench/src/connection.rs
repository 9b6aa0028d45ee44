//! HTTP/2 connections to a server. Loops are spread over a fixed set of connections, so the
//! benchmark controls how many requests share one connection, as real client pools do.

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

/// `count` separate HTTP/2 connections to `url` (each `connect` opens its own).
pub async fn connect(url: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("'{url}' is not a valid server URL"))?
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(count.max(1));
    for _ in 0..count.max(1) {
        channels.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("cannot connect to {url}"))?,
        );
    }
    Ok(channels)
}

/// The connection loop `index` uses: round-robin over the connections.
pub fn pick(channels: &[Channel], index: usize) -> Channel {
    channels[index % channels.len()].clone()
}
