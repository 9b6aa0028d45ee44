//! One fan-out primitive for everything that follows the log live: start/stop notification
//! subscribers and session feed watchers.
//!
//! Each subscriber has a bounded queue. Publishing never waits: a subscriber whose queue is
//! full is cut off (and told so) instead of slowing the publisher or anyone else. Dropping a
//! [`Subscriber`] unregisters it at once, without waiting for the next publish; closing the
//! fan-out (shutdown) ends every subscriber after what is already queued.

use std::collections::HashMap;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

/// When a cut-off subscriber hears of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutOffNotice {
    /// Ahead of whatever is still queued: it must start over and re-read state anyway.
    AtOnce,
    /// After what is queued: it can resume from the last item it got.
    AfterQueued,
}

/// The subscriber fell more than its queue behind and was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutOff {
    pub queue: usize,
}

/// What one publish did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    pub sent: u64,
    pub cut_off: u64,
}

/// Called with a subscriber's key each time one leaves (dropped, cut off or closed), so gauges
/// of open subscriptions are kept in one place.
type OnLeave<K> = Box<dyn Fn(&K) + Send + Sync>;

pub struct Fanout<K, T> {
    /// A `std` mutex: held only to look up or change subscriber lists, never across an await,
    /// and `try_send` inside it does not block.
    inner: Mutex<Inner<K, T>>,
    queue: usize,
    notice: CutOffNotice,
    on_leave: OnLeave<K>,
}

struct Inner<K, T> {
    lists: HashMap<K, Vec<Slot<T>>>,
    next_id: u64,
    closed: bool,
}

struct Slot<T> {
    id: u64,
    sender: mpsc::Sender<T>,
    cut_off: Arc<AtomicBool>,
}

impl<K, T> Fanout<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + 'static,
{
    /// `queue`: items a subscriber may have waiting before it is cut off.
    pub fn new(
        queue: usize,
        notice: CutOffNotice,
        on_leave: impl Fn(&K) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Fanout {
            inner: Mutex::new(Inner {
                lists: HashMap::new(),
                next_id: 0,
                closed: false,
            }),
            queue: queue.max(1),
            notice,
            on_leave: Box::new(on_leave),
        })
    }

    /// Registers a subscriber of `key`: every item published for it from now on is queued for
    /// it. After [`Fanout::close`] it ends at once. Returns whether it was registered.
    pub fn subscribe(self: &Arc<Self>, key: K) -> (Subscriber<K, T>, bool) {
        let (sender, receiver) = mpsc::channel(self.queue);
        let cut_off = Arc::new(AtomicBool::new(false));
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let registered = !inner.closed;
        if registered {
            inner.lists.entry(key.clone()).or_default().push(Slot {
                id,
                sender,
                cut_off: cut_off.clone(),
            });
        }
        let subscriber = Subscriber {
            receiver,
            cut_off,
            queue: self.queue,
            notice: self.notice,
            registration: registered.then(|| Registration {
                fanout: Arc::downgrade(self),
                key,
                id,
            }),
        };
        (subscriber, registered)
    }

    /// Queues `item` for every subscriber of `key`. Never waits.
    pub fn publish(&self, key: &K, item: T) -> Delivered {
        let mut inner = self.lock();
        let Some(list) = inner.lists.get_mut(key) else {
            return Delivered::default();
        };
        let mut delivered = Delivered::default();
        let mut left = 0;
        list.retain(|slot| match slot.sender.try_send(item.clone()) {
            Ok(()) => {
                delivered.sent += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                slot.cut_off.store(true, Ordering::Release);
                delivered.cut_off += 1;
                left += 1;
                false
            }
            // Its subscriber is being dropped; its guard finds it gone.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                left += 1;
                false
            }
        });
        if list.is_empty() {
            inner.lists.remove(key);
        }
        drop(inner);
        for _ in 0..left {
            (self.on_leave)(key);
        }
        delivered
    }

    /// Ends every subscriber after what is queued for it, and refuses new ones: the server is
    /// shutting down.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        let lists: Vec<(K, Vec<Slot<T>>)> = inner.lists.drain().collect();
        drop(inner);
        for (key, list) in lists {
            for _ in list {
                (self.on_leave)(&key);
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Subscribers of `key` now.
    pub fn count(&self, key: &K) -> usize {
        self.lock().lists.get(key).map_or(0, Vec::len)
    }

    pub fn queue(&self) -> usize {
        self.queue
    }

    fn remove(&self, key: &K, id: u64) {
        let mut inner = self.lock();
        let Some(list) = inner.lists.get_mut(key) else {
            return;
        };
        let before = list.len();
        list.retain(|slot| slot.id != id);
        let removed = before != list.len();
        if list.is_empty() {
            inner.lists.remove(key);
        }
        drop(inner);
        if removed {
            (self.on_leave)(key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, T>> {
        // Every change under the lock is a single push, retain or drain, so a poisoned lock
        // still holds consistent lists.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One subscriber's queue, as a stream of items or a final [`CutOff`]. Dropping it
/// unregisters it at once.
pub struct Subscriber<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + 'static,
{
    receiver: mpsc::Receiver<T>,
    cut_off: Arc<AtomicBool>,
    queue: usize,
    notice: CutOffNotice,
    registration: Option<Registration<K, T>>,
}

struct Registration<K, T> {
    fanout: Weak<Fanout<K, T>>,
    key: K,
    id: u64,
}

impl<K, T> Stream for Subscriber<K, T>
where
    K: Hash + Eq + Clone + Send + Unpin + 'static,
    T: Clone + Send + 'static,
{
    type Item = Result<T, CutOff>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let cut_off = CutOff { queue: self.queue };
        if self.notice == CutOffNotice::AtOnce && self.cut_off.load(Ordering::Acquire) {
            self.cut_off.store(false, Ordering::Release);
            self.receiver.close();
            while self.receiver.try_recv().is_ok() {}
            return Poll::Ready(Some(Err(cut_off)));
        }
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(Ok(item))),
            Poll::Ready(None) if self.cut_off.swap(false, Ordering::AcqRel) => {
                Poll::Ready(Some(Err(cut_off)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<K, T> Drop for Subscriber<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + 'static,
{
    fn drop(&mut self) {
        if let Some(registration) = self.registration.take()
            && let Some(fanout) = registration.fanout.upgrade()
        {
            fanout.remove(&registration.key, registration.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicI64;

    use futures::StreamExt;

    use super::*;

    fn counted(
        queue: usize,
        notice: CutOffNotice,
    ) -> (Arc<Fanout<&'static str, u32>>, Arc<AtomicI64>) {
        let left = Arc::new(AtomicI64::new(0));
        let counter = left.clone();
        let fanout = Fanout::new(queue, notice, move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        (fanout, left)
    }

    #[tokio::test]
    async fn a_full_queue_cuts_off_that_subscriber_only() {
        let (fanout, left) = counted(2, CutOffNotice::AfterQueued);
        let (mut slow, _) = fanout.subscribe("a");
        let (mut fast, _) = fanout.subscribe("a");
        for item in 1..=2 {
            fanout.publish(&"a", item);
            assert_eq!(fast.next().await, Some(Ok(item)));
        }
        let delivered = fanout.publish(&"a", 3);
        assert_eq!(
            delivered,
            Delivered {
                sent: 1,
                cut_off: 1
            }
        );
        assert_eq!(left.load(Ordering::Relaxed), 1);
        // After what was queued, the reason.
        assert_eq!(slow.next().await, Some(Ok(1)));
        assert_eq!(slow.next().await, Some(Ok(2)));
        assert_eq!(slow.next().await, Some(Err(CutOff { queue: 2 })));
        assert_eq!(slow.next().await, None);
        assert_eq!(fast.next().await, Some(Ok(3)));
    }

    #[tokio::test]
    async fn an_at_once_notice_comes_ahead_of_the_queue() {
        let (fanout, _) = counted(1, CutOffNotice::AtOnce);
        let (mut slow, _) = fanout.subscribe("a");
        fanout.publish(&"a", 1);
        fanout.publish(&"a", 2);
        assert_eq!(slow.next().await, Some(Err(CutOff { queue: 1 })));
        assert_eq!(slow.next().await, None);
    }

    #[tokio::test]
    async fn dropping_unregisters_at_once_and_close_ends_after_the_queue() {
        let (fanout, left) = counted(4, CutOffNotice::AtOnce);
        let (dropped, _) = fanout.subscribe("a");
        let (mut open, _) = fanout.subscribe("a");
        drop(dropped);
        assert_eq!(fanout.count(&"a"), 1);
        assert_eq!(left.load(Ordering::Relaxed), 1);
        fanout.publish(&"a", 7);
        fanout.close();
        assert_eq!(left.load(Ordering::Relaxed), 2);
        assert_eq!(open.next().await, Some(Ok(7)));
        assert_eq!(open.next().await, None);
        let (mut late, registered) = fanout.subscribe("a");
        assert!(!registered);
        assert_eq!(late.next().await, None);
    }
}
