//! The server's time: the system clock, or a manual one that tests move forward.
//!
//! Every decision that depends on time (creation and termination defaults, auto-end, retention,
//! the feed's age window) asks one [`Clock`] passed in at startup, so a test can advance time
//! instead of sleeping through it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pitwall_core::lifecycle::add;
use prost_types::Timestamp;
use tokio::sync::watch;

/// A cheap handle to the server's clock.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<ManualClock>>,
}

/// A clock that only moves when told to.
pub struct ManualClock {
    /// A `std` mutex: read and set in a few instructions, never across an await.
    now: Mutex<Timestamp>,
    /// Tells waiting tasks (the sweeper) that time moved.
    moved: watch::Sender<()>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A manual clock starting at `start`, and the handle that moves it.
    pub fn manual(start: Timestamp) -> (Clock, Arc<ManualClock>) {
        let manual = Arc::new(ManualClock {
            now: Mutex::new(start),
            moved: watch::channel(()).0,
        });
        (
            Clock {
                manual: Some(manual.clone()),
            },
            manual,
        )
    }

    pub fn now(&self) -> Timestamp {
        match &self.manual {
            Some(manual) => manual.now(),
            None => system_now(),
        }
    }

    /// Tells its holder each time a manual clock is moved from now on; the system clock's
    /// time passes without telling anyone.
    pub fn moves(&self) -> Moves {
        Moves {
            receiver: self.manual.as_ref().map(|manual| manual.moved.subscribe()),
        }
    }
}

/// Moves of a manual clock since the last [`Moves::next`].
pub struct Moves {
    receiver: Option<watch::Receiver<()>>,
}

impl Moves {
    /// Resolves once the clock has moved since the previous call; never for the system clock.
    pub async fn next(&mut self) {
        match &mut self.receiver {
            // The sender lives in the clock, which outlives every holder of its moves.
            Some(receiver) => {
                if receiver.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl ManualClock {
    pub fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the clock forward by `by` and wakes whoever waits for time to pass.
    pub fn advance(&self, by: Duration) {
        {
            let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
            *now = add(*now, by);
        }
        self.moved.send_replace(());
    }
}

/// The system's wall clock now.
pub fn system_now() -> Timestamp {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            Some(manual) => write!(f, "Clock::manual({:?})", manual.now()),
            None => f.write_str("Clock::system"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_moves_only_when_advanced_and_says_so() {
        let start = Timestamp {
            seconds: 100,
            nanos: 0,
        };
        let (clock, hand) = Clock::manual(start);
        assert_eq!(clock.now(), start);
        let mut moves = clock.moves();
        hand.advance(Duration::from_millis(1500));
        moves.next().await;
        assert_eq!(
            clock.now(),
            Timestamp {
                seconds: 101,
                nanos: 500_000_000
            }
        );
    }
}
