//! The embedded log: the redb store in the data directory.
//!
//! It keeps the state a batch leaves (one row per session) and the batch's feed events, in one
//! durable commit (a synced journal frame, see the store's `journal`; the database file gets it
//! behind the writer); positions are the feed sequences it numbers itself. Once the commit
//! returns, the batch is applied at once: this instance is the only writer.
//!
//! A commit that fails (a full disk, say) fails the store: redb refuses every later write
//! until the database is reopened. Writes are refused with the reason while it is failed, and
//! reopening is tried again with back-off, on a write or when the server asks
//! ([`Log::recover`]), until a write succeeds: no restart needed, nothing committed lost.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pitwall_core::Record;
use pitwall_core::command::embedded_offsets;
use pitwall_core::overlay::Changed;
use pitwall_store::embedded::{Changes, FeedWindow as StoreWindow};
use pitwall_store::{EmbeddedStore, StoreError};
use prost_types::Timestamp;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::packets::PacketLog;
use super::{Batch, Context, Log, LogError, LogHealth, Position, StartLogError, StreamLayout};
use crate::apply::{Applied, Applier};
use crate::feed::{FeedItem, FeedWindow, feed_event};

pub use pitwall_store::EmbeddedOptions as Options;

/// Files smaller than this are not worth a compaction (which holds up writes while it runs).
const MIN_COMPACTED_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// How long a failed store waits before it is reopened, at first and at most: soon enough to
/// come back quickly once space is freed, seldom enough not to churn while it is not.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// The store opened and locked, not read yet.
pub struct Opened {
    store: EmbeddedStore,
}

impl Opened {
    pub fn open(data_dir: &Path, options: Options) -> Result<Opened, StoreError> {
        Ok(Opened {
            store: EmbeddedStore::open(data_dir, &options)?,
        })
    }

    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// Reads every session into the projection (one row each: the state after the last
    /// commit) and the recent feed into memory.
    pub fn start(self, context: Context) -> Result<EmbeddedLog, StartLogError> {
        let Context {
            applier,
            feed_window,
            layout,
            packets,
            ..
        } = context;
        let store = Arc::new(self.store);
        {
            // Nothing reads the projection before startup finishes; the lock is uncontended.
            let mut projection = applier
                .projection
                .write()
                .unwrap_or_else(|e| e.into_inner());
            projection.reserve(store.len()? as usize);
            store.load(|session| projection.restore(session))?;
            applier.feed.use_disk(store.clone())?;
            projection.set_position(applier.feed.head());
        }
        let next = store.feed_bounds()?.next;
        Ok(EmbeddedLog {
            store,
            applier,
            next: AtomicU64::new(next),
            feed_window,
            health: watch::channel(LogHealth::Serving).0,
            failed: Mutex::new(None),
            packets,
            layout,
        })
    }
}

pub struct EmbeddedLog {
    store: Arc<EmbeddedStore>,
    applier: Applier,
    /// The position the next record gets. Only the writer thread appends; atomic only so the
    /// log can be shared.
    next: AtomicU64,
    feed_window: FeedWindow,
    health: watch::Sender<LogHealth>,
    /// Set while the store is failed. A `std` mutex: only the writer thread takes it.
    failed: Mutex<Option<Failed>>,
    /// The packet log beside the sessions: where sessions start and end, and their streams.
    packets: Option<Arc<dyn PacketLog>>,
    layout: StreamLayout,
}

/// Why the store is failed, and when to try it again.
struct Failed {
    reason: String,
    retry_at: Instant,
    backoff: Duration,
}

impl EmbeddedLog {
    fn store_window(&self, window: FeedWindow, now: Timestamp) -> StoreWindow {
        StoreWindow {
            max_events: window.max_events,
            oldest: window.oldest(now),
        }
    }
}

impl Log for EmbeddedLog {
    fn append(&self, batch: Batch) -> Vec<Result<Position, LogError>> {
        let Batch {
            records,
            changes,
            sessions,
            at,
        } = batch;
        if records.is_empty() {
            return Vec::new();
        }
        if let Err(reason) = self.writable() {
            return vec![Err(LogError::Unavailable(reason)); records.len()];
        }
        let first = self.next.load(Ordering::Acquire);
        let through = first + records.len() as u64 - 1;
        let ends_with_event = changes.last().is_some_and(Option::is_some);
        // Each event is encoded once: the bytes are stored and sent to every watcher.
        let items: Vec<FeedItem> = (first..)
            .zip(changes)
            .filter_map(|(position, change)| {
                let (kind, session) = change?;
                Some(FeedItem::encode(&feed_event(position, kind, session, at)))
            })
            .collect();
        let mut rows = Vec::new();
        let mut purged = Vec::new();
        for changed in &sessions {
            match changed {
                Changed::Live(session) => rows.push(session),
                Changed::Purged(session) => purged.push(session.sequence),
            }
        }
        let purges = purged.len();
        let started = Instant::now();
        let committed = self.store.commit(Changes {
            sessions: rows,
            purged,
            events: items
                .iter()
                .map(|item| (item.sequence, at, item.bytes.clone()))
                .collect(),
            window: self.store_window(self.feed_window, at),
            // A batch ending in records that change nothing has no event to mark its end.
            next: (!ends_with_event).then_some(through + 1),
        });
        let metrics = &self.applier.metrics;
        metrics
            .commit_duration
            .observe(started.elapsed().as_secs_f64());
        let first_kept = match committed {
            Ok(first_kept) => first_kept,
            Err(e) => {
                error!(error = %e, records = records.len(), "commit failed; the batch is refused");
                let reason = format!("storage unavailable: {e}");
                self.fail(reason.clone());
                return vec![Err(LogError::Unavailable(reason)); records.len()];
            }
        };
        self.next.store(through + 1, Ordering::Release);
        let positioned: Vec<(Position, Record)> = (first..).zip(records).collect();
        self.applier.apply(Applied {
            records: positioned,
            through,
            at,
            events: Some(items),
            first_kept: Some(first_kept),
        });
        if purges > 0 {
            info!(sessions = purges, "completed sessions purged (retention)");
            self.compact_if_sparse();
        }
        (first..=through).map(Ok).collect()
    }

    /// The packet log's offsets, named as a broker's topics and partitions would be, so that
    /// clients read them as they read the reference's: `{ds}:0` (main), `{ds}_essential:0`, and
    /// each stream's (`{ds}.{stream}:0`, or `{ds}:{partition}` for a mapped stream).
    fn offsets(&self, data_source: &str) -> Result<BTreeMap<String, i64>, LogError> {
        let Some(packets) = &self.packets else {
            return Ok(embedded_offsets(data_source));
        };
        let ends = packets.ends(data_source);
        let offset = |next: u64| i64::try_from(next).unwrap_or(i64::MAX);
        let mut offsets = BTreeMap::from([
            (format!("{data_source}:0"), offset(ends.main)),
            (
                format!("{data_source}_essential:0"),
                offset(ends.essentials),
            ),
        ]);
        match &self.layout {
            StreamLayout::TopicBased => {
                for (stream, next) in &ends.streams {
                    offsets.insert(format!("{data_source}.{stream}:0"), offset(*next));
                }
            }
            StreamLayout::PartitionBased(mappings) => {
                for (stream, partition) in mappings {
                    let next = ends.streams.get(stream).copied().unwrap_or(0);
                    offsets.insert(format!("{data_source}:{partition}"), offset(next));
                }
            }
        }
        Ok(offsets)
    }

    fn streams(&self, _data_source: &str, session_key: &str) -> Vec<String> {
        self.packets
            .as_ref()
            .map(|packets| packets.session_streams(session_key))
            .unwrap_or_default()
    }

    fn trim(&self, window: FeedWindow, now: Timestamp) {
        if self.writable().is_err() {
            return;
        }
        let committed = self.store.commit(Changes {
            window: self.store_window(window, now),
            ..Changes::default()
        });
        match committed {
            Ok(first_kept) => self.applier.apply(Applied {
                records: Vec::new(),
                through: self.next.load(Ordering::Acquire) - 1,
                at: now,
                events: Some(Vec::new()),
                first_kept: Some(first_kept),
            }),
            Err(e) => {
                warn!(error = %e, "trimming the feed failed; it is retried later");
                self.fail(format!("storage unavailable: {e}"));
            }
        }
    }

    fn recover(&self) {
        let _ = self.writable();
    }

    fn health(&self) -> watch::Receiver<LogHealth> {
        self.health.subscribe()
    }

    fn close(&self) {
        info!(path = %self.store.path().display(), "store closed");
    }
}

impl EmbeddedLog {
    /// Whether the store can be written: it has not failed, or it was reopened now. While it
    /// is failed and not due for another try, says why.
    fn writable(&self) -> Result<(), String> {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(failure) = failed.as_mut() else {
            return Ok(());
        };
        let now = Instant::now();
        if now < failure.retry_at {
            return Err(refused(&failure.reason));
        }
        match self.store.reopen() {
            Ok(()) => {
                info!(path = %self.store.path().display(), "store writable again; writes are taken");
                *failed = None;
                self.health.send_replace(LogHealth::Serving);
                Ok(())
            }
            Err(e) => {
                failure.backoff = (failure.backoff * 2).min(MAX_RETRY);
                failure.retry_at = now + failure.backoff;
                warn!(error = %e, retry_ms = failure.backoff.as_millis() as u64, "the store cannot be written yet");
                Err(refused(&failure.reason))
            }
        }
    }

    /// Marks the store failed: health says so, and writes wait for a reopen that can write.
    fn fail(&self, reason: String) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_none() {
            error!(path = %self.store.path().display(), %reason, "the store failed; writes are refused until it can be written again");
            self.health.send_replace(LogHealth::Failed(reason.clone()));
        }
        *failed = Some(Failed {
            reason,
            retry_at: Instant::now() + FIRST_RETRY,
            backoff: FIRST_RETRY,
        });
    }

    /// Shrinks the file after retention removed sessions, when less than half of it is used
    /// (redb does not shrink files by itself).
    fn compact_if_sparse(&self) {
        let started = Instant::now();
        match self.store.compact_if_sparse(MIN_COMPACTED_FILE_BYTES) {
            Ok(Some(compacted)) => info!(
                before_bytes = compacted.before,
                after_bytes = compacted.after,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "store file compacted after retention"
            ),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "compacting the store file failed; it stays as large"),
        }
    }
}

/// The answer to a write while the store is failed.
fn refused(reason: &str) -> String {
    format!("{reason}; writes are refused until the store can be written again (retried by itself)")
}
