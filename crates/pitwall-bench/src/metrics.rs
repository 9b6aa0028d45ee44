//! The server's Prometheus metrics (`/metrics` on its admin address), read with a plain HTTP/1.0
//! GET, for what the gRPC answers do not say: how many packets the server's commits held.

use std::collections::HashMap;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every sample of the exposition, summed over label sets, by metric name.
pub async fn scrape(addr: &str) -> anyhow::Result<HashMap<String, f64>> {
    Ok(parse(&exposition(addr).await?))
}

/// The text exposition at `addr`'s `/metrics`.
pub async fn exposition(addr: &str) -> anyhow::Result<String> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to the metrics address {addr}"))?;
    tcp.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).await?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("the metrics answer has no body");
    };
    if !head.starts_with("HTTP/1.") || !head.contains(" 200") {
        bail!(
            "the metrics answer is not 200 OK: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_owned())
}

/// Sums the samples of a text exposition by metric name.
pub fn parse(text: &str) -> HashMap<String, f64> {
    let mut sums = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => continue,
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        if let Ok(value) = value.trim().parse::<f64>() {
            *sums.entry(name.to_owned()).or_insert(0.0) += value;
        }
    }
    sums
}

/// Packets routed (made durable) and packet commits so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Commits {
    pub packets: f64,
    pub commits: f64,
}

impl Commits {
    pub async fn read(addr: Option<&str>) -> Option<Commits> {
        let metrics = scrape(addr?).await.ok()?;
        Some(Commits {
            packets: *metrics.get("stream_api_data_packets_routed_total")?,
            commits: *metrics.get("pitwall_packet_commit_duration_seconds_count")?,
        })
    }

    /// Mean packets per commit between `self` and `later`.
    pub fn per_commit(&self, later: &Commits) -> Option<f64> {
        let commits = later.commits - self.commits;
        (commits > 0.0).then(|| (later.packets - self.packets) / commits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_over_labels() {
        let text = "# HELP x y\n# TYPE x counter\n\
                    stream_api_data_packets_routed_total{data_source=\"a\",stream=\"\"} 10\n\
                    stream_api_data_packets_routed_total{data_source=\"b\",stream=\"s\"} 5\n\
                    pitwall_packet_commit_duration_seconds_count 3\n";
        let sums = parse(text);
        assert_eq!(sums["stream_api_data_packets_routed_total"], 15.0);
        assert_eq!(sums["pitwall_packet_commit_duration_seconds_count"], 3.0);
    }
}
