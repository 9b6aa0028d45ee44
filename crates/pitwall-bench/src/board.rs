//! Board fan-out: browsers following the board's event stream (Server-Sent Events on the admin
//! port, `/api/events`), each on its own HTTP/1.1 connection as a browser's `EventSource`,
//! while sessions are created at a fixed rate. Checked and timed like the gRPC fan-out
//! ([`crate::fanout`]): every board must get every session once, in creation order; the
//! latency is from the create's acknowledgement (and from its send) to each receipt, and the
//! writes' own latency says whether the open boards slowed the writer.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prost::bytes::Bytes;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::fanout::{self, Creates, Feed, key_number};
use crate::report::FanoutResult;
use crate::server::Target;

/// Streams opened at once while connecting the boards.
const CONNECT_PARALLELISM: usize = 64;
/// How long a board may take to open its stream and catch up.
const OPEN_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Args)]
pub struct BoardArgs {
    /// Boards following the event stream, one connection each (0: the writes alone, as a
    /// baseline).
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    #[command(flatten)]
    pub creates: Creates,
}

/// Runs the board fan-out against `target`.
pub async fn run(target: &Target, args: &BoardArgs) -> anyhow::Result<FanoutResult> {
    let data_source = fanout::fresh_data_source("board");
    let addr = target.admin_addr()?.to_owned();
    let feeds: Vec<BoardFeed> = futures::stream::iter(0..args.clients)
        .map(|_| BoardFeed::open(addr.clone(), data_source.clone()))
        .buffer_unordered(CONNECT_PARALLELISM)
        .try_collect()
        .await?;
    fanout::measure_pitwall(
        target,
        "pitwall board (SSE)",
        &data_source,
        feeds,
        &args.creates,
    )
    .await
}

/// One board's event stream.
struct BoardFeed {
    body: Incoming,
    /// Received bytes not yet a whole message.
    pending: Vec<u8>,
    _connection: JoinHandle<()>,
}

impl BoardFeed {
    /// Opens the stream of `data_source`'s board and reads until it has caught up (`live`),
    /// so that every later session reaches it.
    async fn open(addr: String, data_source: String) -> anyhow::Result<BoardFeed> {
        let stream = TcpStream::connect(&addr)
            .await
            .with_context(|| format!("cannot connect to the admin port {addr}"))?;
        stream.set_nodelay(true)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(async move {
            // Ends when the stream does; its error, if any, shows as the body's.
            let _ = connection.await;
        });
        let request = http::Request::get(format!("/api/events?data_source={data_source}"))
            .header("host", &addr)
            .header("accept", "text/event-stream")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        if !response.status().is_success() {
            bail!(
                "the board's event stream answered {} (is the board served on {addr}?)",
                response.status()
            );
        }
        let mut feed = BoardFeed {
            body: response.into_body(),
            pending: Vec::new(),
            _connection: connection,
        };
        tokio::time::timeout(OPEN_PATIENCE, async {
            let mut live = false;
            while !live {
                feed.take(|event, _| {
                    live |= event == "live";
                    Ok(())
                })?;
                if !live && !feed.read().await? {
                    bail!("the board's event stream ended before it was live");
                }
            }
            Ok(())
        })
        .await
        .context("the board's event stream did not catch up in time")??;
        Ok(feed)
    }

    /// Reads what comes next into `pending`; false when the stream ended.
    async fn read(&mut self) -> anyhow::Result<bool> {
        match self.body.frame().await {
            None => Ok(false),
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    self.pending.extend_from_slice(&data);
                }
                Ok(true)
            }
        }
    }

    /// Hands each whole message received to `each` (its event name and data), and forgets
    /// them. Works on the bytes as they came, without copying a message: at a million
    /// messages a second the client's cost per message matters.
    fn take(
        &mut self,
        mut each: impl FnMut(&str, &str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // A chunk may end inside a character; everything up to the last message end is text.
        let text = match std::str::from_utf8(&self.pending) {
            Ok(text) => text,
            Err(e) => std::str::from_utf8(&self.pending[..e.valid_up_to()])?,
        };
        let Some(end) = text.rfind("\n\n") else {
            return Ok(());
        };
        for message in text[..end].split("\n\n") {
            let (mut event, mut data) = ("", "");
            for line in message.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event = name;
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = value;
                }
            }
            each(event, data)?;
        }
        self.pending.drain(..end + 2);
        Ok(())
    }
}

impl Feed for BoardFeed {
    /// The keys of the sessions started, as a browser would read them from the messages.
    async fn next(&mut self) -> anyhow::Result<Option<Vec<u128>>> {
        loop {
            let mut keys = Vec::new();
            self.take(|event, data| match event {
                "change" => {
                    keys.extend(started_keys(data)?);
                    Ok(())
                }
                // Comments (keep-alive) and `retry` have no event name.
                "" | "live" => Ok(()),
                other => bail!("the board's stream ended with '{other}': {data}"),
            })?;
            if !keys.is_empty() {
                return Ok(Some(keys));
            }
            if !self.read().await? {
                return Ok(None);
            }
        }
    }
}

/// Keys of the sessions a `change` message says started. Only creates happen in this
/// benchmark, so a message is one event whose session comes first; reading the key without
/// parsing the whole JSON keeps the client's cost per event small.
fn started_keys(data: &str) -> anyhow::Result<Vec<u128>> {
    const KEY: &str = "\"session_key\":\"";
    if !data.contains("\"kind\":\"STARTED\"") {
        return Ok(Vec::new());
    }
    let start = data
        .find(KEY)
        .map(|at| at + KEY.len())
        .with_context(|| format!("a change without a session key: {data}"))?;
    let key = data
        .get(start..start + 36)
        .with_context(|| format!("a change with a short session key: {data}"))?;
    Ok(vec![key_number(key)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_session_is_read_from_its_change() {
        let key = "6ab95ec2-f8c4-4281-8133-73ac6103f755";
        let data = format!(
            r#"{{"sequence":3,"events":[{{"data_source":"b","kind":"STARTED","sequence":3,"session":{{"associate_session_keys":[],"session_key":"{key}"}},"session_key":"{key}"}}],"matching":[true]}}"#
        );
        assert_eq!(
            started_keys(&data).unwrap(),
            [uuid::Uuid::parse_str(key).unwrap().as_u128()]
        );
        assert!(
            started_keys(&data.replace("STARTED", "UPDATED"))
                .unwrap()
                .is_empty()
        );
    }
}
