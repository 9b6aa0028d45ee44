//! The notification hub: start and stop subscribers per data source, fed from applied events.
//!
//! Only the engine's writer publishes, in apply order, so every subscriber sees events in log
//! order. Publishing never waits: each subscriber has a bounded queue, and one that is full is
//! cut off (its stream ends with `RESOURCE_EXHAUSTED`) instead of slowing writers or others.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use futures::Stream;
use pitwall_core::{Event, EventKind};
use tokio::sync::mpsc;
use tracing::warn;

use crate::metrics::Metrics;

/// Which notification stream a subscriber holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Start,
    Stop,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Start => "start",
            Kind::Stop => "stop",
        }
    }

    fn of(event: EventKind) -> Option<Kind> {
        match event {
            EventKind::Started => Some(Kind::Start),
            EventKind::Ended => Some(Kind::Stop),
            EventKind::Updated | EventKind::Purged => None,
        }
    }
}

/// The subscriber fell behind by more than its queue and was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FellBehind {
    pub queue: usize,
}

pub struct Hub {
    /// A `std` mutex: held only to look up or change subscriber lists, never across an await,
    /// and `try_send` inside it does not block.
    inner: Mutex<Inner>,
    queue: usize,
    metrics: Metrics,
}

#[derive(Default)]
struct Inner {
    subscribers: HashMap<(Kind, String), Vec<Subscriber>>,
    next_id: u64,
    closed: bool,
}

struct Subscriber {
    id: u64,
    sender: mpsc::Sender<Arc<str>>,
    cut_off: Arc<AtomicBool>,
}

impl Hub {
    /// `queue`: notifications a subscriber may have waiting before it is cut off.
    pub fn new(queue: usize, metrics: Metrics) -> Arc<Hub> {
        Arc::new(Hub {
            inner: Mutex::new(Inner::default()),
            queue: queue.max(1),
            metrics,
        })
    }

    /// Registers a subscriber. From the moment this returns, every matching event is delivered.
    /// After [`Hub::close`] the subscription ends at once.
    pub fn subscribe(self: &Arc<Self>, kind: Kind, data_source: &str) -> Subscription {
        let (sender, receiver) = mpsc::channel(self.queue);
        let cut_off = Arc::new(AtomicBool::new(false));
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        if !inner.closed {
            inner
                .subscribers
                .entry((kind, data_source.to_owned()))
                .or_default()
                .push(Subscriber {
                    id,
                    sender,
                    cut_off: cut_off.clone(),
                });
            self.metrics
                .notification_streams
                .with_label_values(&[kind.label()])
                .inc();
        }
        Subscription {
            receiver,
            cut_off,
            queue: self.queue,
            registration: Some(Registration {
                hub: Arc::downgrade(self),
                kind,
                data_source: data_source.to_owned(),
                id,
            }),
        }
    }

    /// Queues each event to its subscribers, in order. Never waits.
    pub fn publish(&self, events: &[Event]) {
        let mut inner = self.lock();
        for event in events {
            let Some(kind) = Kind::of(event.kind) else {
                continue;
            };
            let Some(subscribers) = inner
                .subscribers
                .get_mut(&(kind, event.data_source.clone()))
            else {
                continue;
            };
            let key: Arc<str> = Arc::from(event.session_key.as_str());
            let before = subscribers.len();
            let mut sent = 0;
            subscribers.retain(|subscriber| match subscriber.sender.try_send(key.clone()) {
                Ok(()) => {
                    sent += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subscriber.cut_off.store(true, Ordering::Release);
                    self.metrics
                        .subscribers_cut_off
                        .with_label_values(&[kind.label()])
                        .inc();
                    warn!(
                        kind = kind.label(),
                        data_source = %event.data_source,
                        queue = self.queue,
                        "notification subscriber fell behind and was cut off"
                    );
                    false
                }
                // The subscription is being dropped; its guard removes it too.
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            let removed = before - subscribers.len();
            if subscribers.is_empty() {
                inner.subscribers.remove(&(kind, event.data_source.clone()));
            }
            self.metrics
                .notifications_sent
                .with_label_values(&[kind.label()])
                .inc_by(sent);
            self.metrics
                .notification_streams
                .with_label_values(&[kind.label()])
                .sub(removed as i64);
        }
    }

    /// Ends every stream (status OK) and refuses new ones: the server is shutting down.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for ((kind, _), subscribers) in inner.subscribers.drain() {
            self.metrics
                .notification_streams
                .with_label_values(&[kind.label()])
                .sub(subscribers.len() as i64);
        }
    }

    /// Subscribers currently registered for `kind` and `data_source`.
    pub fn subscriber_count(&self, kind: Kind, data_source: &str) -> usize {
        self.lock()
            .subscribers
            .get(&(kind, data_source.to_owned()))
            .map_or(0, Vec::len)
    }

    fn remove(&self, kind: Kind, data_source: &str, id: u64) {
        let mut inner = self.lock();
        let key = (kind, data_source.to_owned());
        let Some(subscribers) = inner.subscribers.get_mut(&key) else {
            return;
        };
        let before = subscribers.len();
        subscribers.retain(|s| s.id != id);
        if before != subscribers.len() {
            self.metrics
                .notification_streams
                .with_label_values(&[kind.label()])
                .dec();
        }
        if subscribers.is_empty() {
            inner.subscribers.remove(&key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves the lists consistent (every change
        // is a single retain/push), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A subscriber's stream of session keys. Dropping it (the client went away) unregisters it at
/// once, without waiting for the next event.
pub struct Subscription {
    receiver: mpsc::Receiver<Arc<str>>,
    cut_off: Arc<AtomicBool>,
    queue: usize,
    registration: Option<Registration>,
}

struct Registration {
    hub: Weak<Hub>,
    kind: Kind,
    data_source: String,
    id: u64,
}

impl Stream for Subscription {
    type Item = Result<Arc<str>, FellBehind>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.registration.is_none() {
            return Poll::Ready(None);
        }
        // A cut-off subscriber is told at once, ahead of what is still queued: it must
        // re-subscribe and re-read state anyway.
        if self.cut_off.load(Ordering::Acquire) {
            self.registration = None;
            return Poll::Ready(Some(Err(FellBehind { queue: self.queue })));
        }
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(key)) => Poll::Ready(Some(Ok(key))),
            Poll::Ready(None) if self.cut_off.load(Ordering::Acquire) => {
                self.registration = None;
                Poll::Ready(Some(Err(FellBehind { queue: self.queue })))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(registration) = self.registration.take()
            && let Some(hub) = registration.hub.upgrade()
        {
            hub.remove(
                registration.kind,
                &registration.data_source,
                registration.id,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn event(kind: EventKind, key: &str, data_source: &str) -> Event {
        Event {
            kind,
            session_key: key.into(),
            data_source: data_source.into(),
        }
    }

    #[tokio::test]
    async fn subscribers_get_their_kind_and_data_source_in_order() {
        let hub = Hub::new(10, Metrics::new());
        let mut starts = hub.subscribe(Kind::Start, "ds");
        let mut stops = hub.subscribe(Kind::Stop, "ds");
        hub.publish(&[
            event(EventKind::Started, "a", "ds"),
            event(EventKind::Started, "x", "other"),
            event(EventKind::Updated, "a", "ds"),
            event(EventKind::Started, "b", "ds"),
            event(EventKind::Ended, "a", "ds"),
        ]);
        hub.close();
        let starts: Vec<_> = starts
            .by_ref()
            .map(|k| k.unwrap().to_string())
            .collect()
            .await;
        let stops: Vec<_> = stops
            .by_ref()
            .map(|k| k.unwrap().to_string())
            .collect()
            .await;
        assert_eq!(starts, vec!["a", "b"]);
        assert_eq!(stops, vec!["a"]);
    }

    #[tokio::test]
    async fn a_full_queue_cuts_the_subscriber_off_with_a_reason() {
        let hub = Hub::new(2, Metrics::new());
        let mut slow = hub.subscribe(Kind::Start, "ds");
        let mut fast = hub.subscribe(Kind::Start, "ds");
        hub.publish(&[
            event(EventKind::Started, "a", "ds"),
            event(EventKind::Started, "b", "ds"),
        ]);
        assert_eq!(&*fast.next().await.unwrap().unwrap(), "a");
        assert_eq!(&*fast.next().await.unwrap().unwrap(), "b");
        hub.publish(&[event(EventKind::Started, "c", "ds")]);
        assert_eq!(slow.next().await, Some(Err(FellBehind { queue: 2 })));
        assert_eq!(slow.next().await, None);
        assert_eq!(&*fast.next().await.unwrap().unwrap(), "c");
        assert_eq!(hub.subscriber_count(Kind::Start, "ds"), 1);
    }

    #[tokio::test]
    async fn dropping_a_subscription_unregisters_it_at_once() {
        let hub = Hub::new(10, Metrics::new());
        let subscription = hub.subscribe(Kind::Stop, "ds");
        assert_eq!(hub.subscriber_count(Kind::Stop, "ds"), 1);
        drop(subscription);
        assert_eq!(hub.subscriber_count(Kind::Stop, "ds"), 0);
    }

    #[tokio::test]
    async fn close_ends_every_stream_and_later_subscriptions() {
        let hub = Hub::new(10, Metrics::new());
        let mut open = hub.subscribe(Kind::Start, "ds");
        hub.close();
        assert_eq!(open.next().await, None);
        let mut late = hub.subscribe(Kind::Start, "ds");
        assert_eq!(late.next().await, None);
    }
}
