//! Feed watchers kept busy during a load: `pitwall.v1.SessionFeed.Watch` streams of every data
//! source, each reading everything, to measure what following the feed costs the writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use pitwall_proto::feed::WatchRequest;
use pitwall_proto::feed::session_feed_client::SessionFeedClient;
use tokio::task::JoinHandle;

use crate::connection;

/// Open watchers; [`Watchers::stop`] ends them and says what they received.
pub struct Watchers {
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    events: Arc<AtomicU64>,
}

impl Watchers {
    /// Opens `count` watchers over `connections` HTTP/2 connections, each following from now;
    /// returns once every one is registered (its response headers arrived).
    pub async fn start(url: &str, count: usize, connections: usize) -> anyhow::Result<Watchers> {
        let channels = connection::connect(url, connections).await?;
        let events = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::with_capacity(count);
        for index in 0..count {
            let mut client = SessionFeedClient::new(connection::pick(&channels, index));
            let mut stream = client
                .watch(WatchRequest {
                    data_source: String::new(),
                    from_sequence: 0,
                })
                .await
                .context("cannot open a feed watcher (is pitwall.v1.SessionFeed served?)")?
                .into_inner();
            let events = events.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(message) = stream.message().await? {
                    events.fetch_add(message.events.len() as u64, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        Ok(Watchers { tasks, events })
    }

    /// Ends the watchers. Fails if one was cut off or failed before that: the load outran it.
    pub async fn stop(self) -> anyhow::Result<u64> {
        for task in &self.tasks {
            if task.is_finished() {
                anyhow::bail!("a feed watcher ended during the load (cut off for falling behind?)");
            }
        }
        for task in self.tasks {
            task.abort();
        }
        Ok(self.events.load(Ordering::Relaxed))
    }
}
