//! Following the session feed: catch up from the kept history, then follow live, until the
//! client goes away, the server stops, or the follower falls too far behind.
//!
//! One loop for every kind of follower (the gRPC `Watch`, the board's event stream); each says
//! through [`FeedSink`] how it sends what the loop hands it, and how it tells its client why
//! the stream ended ([`Ended`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::feed::{Compacted, Feed, FeedItem, Follow, HistoryError};

/// Events read from the disk history per step of a catch-up.
const HISTORY_PAGE: usize = 512;

/// Where a follower's events go.
pub trait FeedSink: Send {
    /// Published groups taken together when more are already waiting, and handed to
    /// [`FeedSink::send`] at once: one write for a burst instead of one per group.
    const COALESCE: usize = 1;

    /// How long the stream may stay silent before [`FeedSink::keep_alive`] is called.
    const KEEP_ALIVE: Option<Duration> = None;

    /// Once a group arrives, how long to wait for more before sending them together: caps
    /// how often a follower is written to, whatever the write rate, at the cost of this much
    /// latency.
    const LINGER: Option<Duration> = None;

    /// Every event up to this sequence has been sent (or filtered out): where a resume
    /// starts.
    fn position(&self) -> u64;

    /// Sends what of `events` (whole store positions, in sequence order) lies after
    /// [`FeedSink::position`].
    fn send(&mut self, events: &[Arc<FeedItem>]) -> impl Future<Output = Result<(), Gone>> + Send;

    /// Everything kept has been sent; what follows is live.
    fn caught_up(&mut self) -> impl Future<Output = Result<(), Gone>> + Send;

    /// Resolves once the client has gone away.
    fn gone(&self) -> impl Future<Output = ()> + Send;

    /// The stream has been silent for [`FeedSink::KEEP_ALIVE`].
    fn keep_alive(&mut self) -> impl Future<Output = Result<(), Gone>> + Send {
        async { Ok(()) }
    }
}

/// The client went away (or stopped reading): nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Why following ended.
#[derive(Debug)]
pub enum Ended {
    /// The server is shutting down; every event of an acknowledged write was sent first.
    Closed,
    /// The client went away.
    Gone,
    /// The history asked for is no longer kept.
    Compacted(Compacted),
    /// The follower fell more than `queue` published groups behind; it may resume from its
    /// position.
    CutOff { queue: usize },
    /// The history could not be read.
    Unavailable(String),
    /// Reading the history failed unexpectedly.
    Internal(String),
}

impl From<Gone> for Ended {
    fn from(Gone: Gone) -> Self {
        Ended::Gone
    }
}

/// Follows the feed after `sink.position()` until the stream ends, and says why.
pub async fn follow<S: FeedSink>(feed: &Arc<Feed>, sink: &mut S) -> Ended {
    match run(feed, sink).await {
        Ok(never) => match never {},
        Err(ended) => ended,
    }
}

async fn run<S: FeedSink>(
    feed: &Arc<Feed>,
    sink: &mut S,
) -> Result<std::convert::Infallible, Ended> {
    let mut live = loop {
        match feed.follow(sink.position()) {
            Err(e) => return Err(Ended::Compacted(e)),
            Ok(Follow::Live { tail, live }) => {
                sink.send(&tail).await?;
                break live;
            }
            Ok(Follow::Behind) => {
                let (history, after) = (feed.clone(), sink.position());
                let page =
                    tokio::task::spawn_blocking(move || history.history_after(after, HISTORY_PAGE))
                        .await
                        .map_err(|e| Ended::Internal(e.to_string()))?;
                let page = match page {
                    Ok(page) => page,
                    Err(HistoryError::Compacted(e)) => return Err(Ended::Compacted(e)),
                    Err(e) => return Err(Ended::Unavailable(e.to_string())),
                };
                if page.is_empty() {
                    // Nothing on disk after the position: memory has caught up meanwhile.
                    continue;
                }
                let page: Vec<Arc<FeedItem>> = page.into_iter().map(Arc::new).collect();
                sink.send(&page).await?;
            }
        }
    };
    sink.caught_up().await?;
    let quiet = S::KEEP_ALIVE.unwrap_or(Duration::MAX);
    loop {
        let group = tokio::select! {
            group = live.recv() => match group {
                Some(group) => group,
                // Shutdown: closed once every acknowledged write's events were queued.
                None if feed.is_closed() => return Err(Ended::Closed),
                None => return Err(Ended::CutOff { queue: feed.queue() }),
            },
            () = sink.gone() => return Err(Ended::Gone),
            () = tokio::time::sleep(quiet), if S::KEEP_ALIVE.is_some() => {
                sink.keep_alive().await?;
                continue;
            }
        };
        if let Some(linger) = S::LINGER {
            tokio::select! {
                () = tokio::time::sleep(linger) => {}
                () = sink.gone() => return Err(Ended::Gone),
            }
        }
        if S::COALESCE > 1 {
            let mut events = group.to_vec();
            for _ in 1..S::COALESCE {
                match live.try_recv() {
                    Some(more) => events.extend(more.iter().cloned()),
                    None => break,
                }
            }
            sink.send(&events).await?;
        } else {
            sink.send(&group).await?;
        }
    }
}
