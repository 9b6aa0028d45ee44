//! The notification hub: start and stop subscribers per data source, fed from applied events.
//!
//! Only the [`Applier`](crate::apply::Applier) publishes, in apply order, so every subscriber
//! sees events in log order. Subscribers are a [`Fanout`]: publishing never waits, and a
//! subscriber whose queue is full is cut off (its stream ends with `RESOURCE_EXHAUSTED`) instead
//! of slowing writers or others.

use std::sync::Arc;

use pitwall_core::{Event, EventKind};
use tracing::warn;

use crate::fanout::{CutOff, CutOffNotice, Fanout, Subscriber};
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
pub type FellBehind = CutOff;

/// A subscriber's stream of session keys, ending with [`FellBehind`] if it was cut off.
pub type Subscription = Subscriber<(Kind, String), Arc<str>>;

pub struct Hub {
    subscribers: Arc<Fanout<(Kind, String), Arc<str>>>,
    metrics: Metrics,
}

impl Hub {
    /// `queue`: notifications a subscriber may have waiting before it is cut off.
    pub fn new(queue: usize, metrics: Metrics) -> Arc<Hub> {
        let gauge = metrics.clone();
        // A cut-off subscriber must subscribe again and re-read the sessions anyway, so it is
        // told at once rather than after a backlog it would discard.
        let subscribers = Fanout::new(
            queue,
            CutOffNotice::AtOnce,
            move |(kind, _): &(Kind, String)| {
                gauge
                    .notification_streams
                    .with_label_values(&[kind.label()])
                    .dec();
            },
        );
        Arc::new(Hub {
            subscribers,
            metrics,
        })
    }

    /// Registers a subscriber. From the moment this returns, every matching event is delivered.
    /// After [`Hub::close`] the subscription ends at once.
    pub fn subscribe(&self, kind: Kind, data_source: &str) -> Subscription {
        let (subscription, registered) = self.subscribers.subscribe((kind, data_source.to_owned()));
        if registered {
            self.metrics
                .notification_streams
                .with_label_values(&[kind.label()])
                .inc();
        }
        subscription
    }

    /// Queues each event to its subscribers, in order. Never waits.
    pub fn publish(&self, events: &[Event]) {
        for event in events {
            let Some(kind) = Kind::of(event.kind) else {
                continue;
            };
            let key = (kind, event.data_source.clone());
            let delivered = self
                .subscribers
                .publish(&key, Arc::from(event.session_key.as_str()));
            self.metrics
                .notifications_sent
                .with_label_values(&[kind.label()])
                .inc_by(delivered.sent);
            if delivered.cut_off > 0 {
                self.metrics
                    .subscribers_cut_off
                    .with_label_values(&[kind.label()])
                    .inc_by(delivered.cut_off);
                warn!(
                    kind = kind.label(),
                    data_source = %event.data_source,
                    subscribers = delivered.cut_off,
                    queue = self.subscribers.queue(),
                    "notification subscriber fell behind and was cut off"
                );
            }
        }
    }

    /// Ends every stream (status OK) after what is queued for it, and refuses new ones: the
    /// server is shutting down.
    pub fn close(&self) {
        self.subscribers.close();
    }

    /// Subscribers currently registered for `kind` and `data_source`.
    pub fn subscriber_count(&self, kind: Kind, data_source: &str) -> usize {
        self.subscribers.count(&(kind, data_source.to_owned()))
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
