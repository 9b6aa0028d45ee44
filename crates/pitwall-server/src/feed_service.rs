//! `pitwall.v1.SessionFeed`: the resumable feed, filtered listings and associate trees.
//!
//! Pitwall's own service, so failures are gRPC statuses (INVALID_ARGUMENT, NOT_FOUND,
//! FAILED_PRECONDITION for history no longer kept) rather than the Stream API's
//! `success = false`.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::Stream;
use pitwall_core::Limits;
use pitwall_core::query::{self, PageLimits, Query};
use pitwall_core::tree::session_tree;
use pitwall_proto::feed::session_feed_server::SessionFeed;
use pitwall_proto::feed::{
    GetSessionTreeRequest, GetSessionTreeResponse, ListSessionsRequest, ListSessionsResponse,
    WatchRequest, WatchResponse,
};
use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::engine::Engine;
use crate::feed::{Compacted, Feed, FeedItem};
use crate::follow::{Ended, FeedSink, Gone, follow};
use crate::metrics::Metrics;
use crate::service::{answer_status, starting};

/// A filtered watcher that has been sent nothing for this long is sent its position, so it can
/// resume from there instead of from a sequence that may have left the window.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Responses waiting to be written to one watcher's connection.
const WATCH_RESPONSES_BUFFERED: usize = 16;

pub struct FeedService {
    engine: Arc<OnceLock<Engine>>,
    feed: Arc<Feed>,
    metrics: Metrics,
    /// Data source names in filters follow the same rules as in writes.
    limits: Limits,
    /// Room for sessions in one response (the message limit, less headroom for framing).
    message_budget: usize,
    /// Owns the watch tasks: closed and awaited at shutdown, after the feed has ended them.
    tasks: TaskTracker,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

impl FeedService {
    pub fn new(
        engine: Arc<OnceLock<Engine>>,
        feed: Arc<Feed>,
        metrics: Metrics,
        limits: Limits,
        max_message_bytes: usize,
        tasks: TaskTracker,
    ) -> FeedService {
        FeedService {
            engine,
            feed,
            metrics,
            limits,
            message_budget: max_message_bytes.saturating_sub(64 * 1024).max(1),
            tasks,
        }
    }

    fn engine(&self) -> Result<&Engine, Status> {
        self.engine.get().ok_or_else(starting)
    }
}

#[tonic::async_trait]
impl SessionFeed for FeedService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = self.engine().and_then(|engine| {
            if !request.data_source.is_empty() {
                self.limits
                    .check_data_source(&request.data_source)
                    .map_err(invalid)?;
            }
            if let Some(reason) = self.feed.unavailable() {
                return Err(Status::failed_precondition(format!(
                    "the feed is not available on this server: {reason}"
                )));
            }
            let after = match request.from_sequence {
                0 => self.feed.head(),
                from => {
                    self.feed.check_kept(from).map_err(compacted)?;
                    let applied = engine.read().position();
                    if let Some(newest) = self.feed.is_unknown(from, applied) {
                        return Err(Status::invalid_argument(format!(
                            "from_sequence {from} is ahead of the newest sequence {newest}; pass \
                             a sequence this server sent, or 0 to follow from now"
                        )));
                    }
                    from
                }
            };
            let (sender, receiver) = mpsc::channel(WATCH_RESPONSES_BUFFERED);
            let watch = Watch {
                data_source: request.data_source,
                last: after,
                budget: self.message_budget,
                sender,
                last_sent: Instant::now(),
            };
            self.tasks.spawn(watch.run(self.feed.clone()));
            Ok(Box::pin(ReceiverStream::new(receiver)) as WatchStream)
        });
        answer_status(&self.metrics, "Watch", started, result)
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = self.engine().and_then(|engine| {
            let filter = request.filter.unwrap_or_default();
            for data_source in &filter.data_sources {
                self.limits
                    .check_data_source(data_source)
                    .map_err(invalid)?;
            }
            let query = Query::new(filter).map_err(invalid)?;
            let limits = PageLimits::for_request(request.page_size, self.message_budget);
            let projection = engine.read();
            let page =
                query::page(&projection, &query, &request.page_token, limits).map_err(invalid)?;
            Ok(ListSessionsResponse {
                sessions: page.sessions,
                next_page_token: page.next_page_token,
                sequence: projection.position(),
            })
        });
        answer_status(&self.metrics, "ListSessions", started, result)
    }

    async fn get_session_tree(
        &self,
        request: Request<GetSessionTreeRequest>,
    ) -> Result<Response<GetSessionTreeResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = self.engine().and_then(|engine| {
            if request.session_key.is_empty() {
                return Err(Status::invalid_argument("session_key is empty"));
            }
            let root = session_tree(&engine.read(), &request.session_key, request.depth)
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "session {} not found",
                        pitwall_core::quote(&request.session_key)
                    ))
                })?;
            Ok(GetSessionTreeResponse { root: Some(root) })
        });
        answer_status(&self.metrics, "GetSessionTree", started, result)
    }
}

/// One watcher: catches up from history, then follows the live feed.
struct Watch {
    data_source: String,
    /// Everything up to this sequence has been sent (or filtered out).
    last: u64,
    budget: usize,
    sender: mpsc::Sender<Result<WatchResponse, Status>>,
    last_sent: Instant,
}

impl Watch {
    async fn run(mut self, feed: Arc<Feed>) {
        let status = match follow(&feed, &mut self).await {
            Ended::Closed | Ended::Gone => return,
            Ended::Compacted(e) => compacted(e),
            Ended::CutOff { queue } => Status::resource_exhausted(format!(
                "this watcher fell more than {queue} updates behind and was cut off; resume \
                 with from_sequence = {}",
                self.last
            )),
            Ended::Unavailable(reason) => Status::unavailable(reason),
            Ended::Internal(reason) => Status::internal(reason),
        };
        debug!(code = ?status.code(), message = status.message(), "watch ended");
        let _ = self.sender.send(Err(status)).await;
    }

    async fn respond(&mut self, events: Vec<Bytes>) -> Result<(), Gone> {
        let response = WatchResponse::encoded(events, self.last);
        self.last_sent = Instant::now();
        self.sender.send(Ok(response)).await.map_err(|_| Gone)
    }
}

impl FeedSink for Watch {
    fn position(&self) -> u64 {
        self.last
    }

    /// Sends the events after `last` that match the filter, in responses that fit the message
    /// limit without splitting a sequence; a filtered watcher gets its position now and then.
    async fn send(&mut self, events: &[Arc<FeedItem>]) -> Result<(), Gone> {
        let mut batch: Vec<Bytes> = Vec::new();
        let mut bytes = 0;
        let mut advanced = false;
        let from = self.last;
        for event in events.iter().filter(|e| e.sequence > from) {
            // Split only between sequences, so a reply never holds part of one.
            if event.sequence != self.last && bytes >= self.budget / 4 {
                let full = std::mem::take(&mut batch);
                bytes = 0;
                self.respond(full).await?;
            }
            self.last = event.sequence;
            advanced = true;
            if self.data_source.is_empty() || event.data_source == self.data_source {
                bytes += event.bytes.len();
                // The bytes are shared with every other watcher, not copied.
                batch.push(event.bytes.clone());
            }
        }
        if !batch.is_empty() || (advanced && self.last_sent.elapsed() >= PROGRESS_EVERY) {
            self.respond(batch).await?;
        }
        Ok(())
    }

    /// Says so, so the client knows its position even if nothing matched.
    async fn caught_up(&mut self) -> Result<(), Gone> {
        self.respond(Vec::new()).await
    }

    async fn gone(&self) {
        self.sender.closed().await
    }
}

fn compacted(e: Compacted) -> Status {
    Status::failed_precondition(format!(
        "history before sequence {} is no longer kept; resume from sequence {} or later, or \
         list sessions again (ListSessions) and watch from the sequence it returns",
        e.first_kept,
        e.first_kept.saturating_sub(1)
    ))
}

fn invalid(rejection: pitwall_core::Rejection) -> Status {
    Status::invalid_argument(rejection.to_string())
}
