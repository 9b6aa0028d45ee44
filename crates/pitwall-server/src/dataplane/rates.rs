//! Packets made durable per (session key, stream), and their rate: what the board's telemetry
//! panel shows.
//!
//! The writer records a batch once the packet log has acknowledged it durable, so the counts are
//! the same whichever [`PacketLog`](crate::log::packets::PacketLog) is behind it. They live in
//! memory: they count from the server's start (or from when a pair was last evicted). The rate is
//! over the last [`WINDOW_SECONDS`] whole seconds of the injected clock, or fewer while a stream
//! is younger than that, so a test that moves a manual clock gets exact rates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prost_types::Timestamp;

use crate::clock::Clock;

/// Whole seconds a rate is taken over: long enough to smooth a writer's bursts, short enough
/// that a stream that stops shows it within a few seconds.
pub const WINDOW_SECONDS: i64 = 5;
/// One slot per whole second of the window, and one for the second under way.
const SLOTS: usize = WINDOW_SECONDS as usize + 1;
/// (session key, stream) pairs counted at most; beyond it the least recently written go.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// The counts of every (session key, stream) pair, behind one short lock.
pub struct Rates {
    clock: Clock,
    capacity: usize,
    started: Timestamp,
    /// A `std` mutex, not a sharded map: a hold is a hash lookup and a few additions (a
    /// batch's pairs, recorded by the RPC's task after the ack, not by the log's writer; one
    /// session's streams for a read), never across an await. The one longer hold is an
    /// eviction pass, once per eighth of the capacity of new pairs when full.
    pairs: Mutex<Pairs>,
    /// Every active session's rate, and the clock's second it is for.
    by_session: Mutex<Option<(i64, SessionRates)>>,
}

/// Packets and bytes of one batch for one (session key, stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub session_key: String,
    pub stream: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Packets per second of each session writing, in session key order; shared by every board
/// asking within the same second.
pub type SessionRates = Arc<Vec<(String, f64)>>;

/// What a session's stream has had made durable, as the board reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRate {
    pub stream: String,
    pub packets: u64,
    pub bytes: u64,
    pub packets_per_second: f64,
}

#[derive(Default)]
struct Pairs {
    /// Session key → stream → counts: a lookup by borrowed names, so an existing pair costs no
    /// allocation.
    sessions: HashMap<String, HashMap<String, Counts>>,
    len: usize,
    /// Bumped by every record: orders pairs by when they were last written.
    tick: u64,
}

struct Counts {
    packets: u64,
    bytes: u64,
    last_written: u64,
    /// The second the pair was first written: a younger stream's rate is over its life.
    first_second: i64,
    window: Window,
}

/// Packets per second of the clock, for the last [`SLOTS`] seconds up to `latest`.
struct Window {
    latest: i64,
    slots: [u64; SLOTS],
}

impl Window {
    fn slot(second: i64) -> usize {
        second.rem_euclid(SLOTS as i64) as usize
    }

    fn add(&mut self, second: i64, packets: u64) {
        if second > self.latest {
            let gap = second - self.latest;
            if gap >= SLOTS as i64 {
                self.slots = [0; SLOTS];
            } else {
                for passed in self.latest + 1..=second {
                    self.slots[Window::slot(passed)] = 0;
                }
            }
            self.latest = second;
        }
        // A clock stepped back past the window counts into the latest second: its own slot now
        // holds a later second.
        let second = if second <= self.latest - SLOTS as i64 {
            self.latest
        } else {
            second
        };
        self.slots[Window::slot(second)] += packets;
    }

    fn packets_in(&self, from: i64, to: i64) -> u64 {
        (from..=to)
            .filter(|second| *second <= self.latest && *second > self.latest - SLOTS as i64)
            .map(|second| self.slots[Window::slot(second)])
            .sum()
    }
}

impl Rates {
    pub fn new(clock: Clock, capacity: usize) -> Rates {
        Rates {
            started: clock.now(),
            clock,
            capacity: capacity.max(1),
            pairs: Mutex::new(Pairs::default()),
            by_session: Mutex::new(None),
        }
    }

    /// When counting began: the counts are of packets made durable since.
    pub fn started(&self) -> Timestamp {
        self.started
    }

    /// Counts a batch the packet log has made durable.
    pub fn record(&self, written: &[Written]) {
        let second = self.clock.now().seconds;
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        for batch in written {
            pairs.tick += 1;
            let tick = pairs.tick;
            let known = pairs
                .sessions
                .get(&batch.session_key)
                .is_some_and(|streams| streams.contains_key(&batch.stream));
            if !known {
                if pairs.len >= self.capacity {
                    pairs.evict(self.capacity);
                }
                pairs.len += 1;
                pairs
                    .sessions
                    .entry(batch.session_key.clone())
                    .or_default()
                    .insert(
                        batch.stream.clone(),
                        Counts {
                            packets: 0,
                            bytes: 0,
                            last_written: tick,
                            first_second: second,
                            window: Window {
                                latest: second,
                                slots: [0; SLOTS],
                            },
                        },
                    );
            }
            let Some(counts) = pairs
                .sessions
                .get_mut(&batch.session_key)
                .and_then(|streams| streams.get_mut(&batch.stream))
            else {
                continue;
            };
            counts.packets += batch.packets;
            counts.bytes += batch.bytes;
            counts.last_written = tick;
            counts.window.add(second, batch.packets);
        }
    }

    /// The streams of a session that have had packets made durable, in name order (the main
    /// stream, `""`, first), with their rates now.
    pub fn session(&self, session_key: &str) -> Vec<StreamRate> {
        let now = self.clock.now().seconds;
        let pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(streams) = pairs.sessions.get(session_key) else {
            return Vec::new();
        };
        let mut rates: Vec<StreamRate> = streams
            .iter()
            .map(|(stream, counts)| StreamRate {
                stream: stream.clone(),
                packets: counts.packets,
                bytes: counts.bytes,
                packets_per_second: counts.per_second(now),
            })
            .collect();
        rates.sort_by(|a, b| a.stream.cmp(&b.stream));
        rates
    }

    /// Packets per second of every session with packets in the window (its streams together),
    /// in key order: worked out at most once per second of the clock, however many boards ask.
    pub fn sessions(&self) -> SessionRates {
        let now = self.clock.now().seconds;
        // Held while working it out, so that boards asking at once wait for one pass rather
        // than each making its own.
        let mut cached = self.by_session.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((second, sessions)) = &*cached
            && *second == now
        {
            return sessions.clone();
        }
        let mut sessions: Vec<(String, f64)> = {
            let pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
            pairs
                .sessions
                .iter()
                .map(|(session_key, streams)| {
                    let rate = streams.values().map(|counts| counts.per_second(now)).sum();
                    (session_key, rate)
                })
                .filter(|(_, rate)| *rate > 0.0)
                .map(|(session_key, rate)| (session_key.clone(), rate))
                .collect()
        };
        sessions.sort_by(|a, b| a.0.cmp(&b.0));
        let sessions = Arc::new(sessions);
        *cached = Some((now, sessions.clone()));
        sessions
    }

    /// Pairs counted now.
    pub fn len(&self) -> usize {
        self.pairs.lock().unwrap_or_else(|e| e.into_inner()).len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Counts {
    /// Packets per second over the window's whole seconds (the second under way would read
    /// low until it ends), or over the stream's life while it is younger.
    fn per_second(&self, now: i64) -> f64 {
        let seconds = (now - self.first_second).clamp(0, WINDOW_SECONDS);
        if seconds == 0 {
            return 0.0;
        }
        self.window.packets_in(now - seconds, now - 1) as f64 / seconds as f64
    }
}

impl Pairs {
    /// Removes the least recently written eighth of `capacity` (at least one pair): one pass
    /// over the pairs for many inserts, rather than an ordered index kept up on every write.
    fn evict(&mut self, capacity: usize) {
        let remove = (capacity / 8).max(1);
        let mut ticks: Vec<u64> = self
            .sessions
            .values()
            .flat_map(|streams| streams.values().map(|counts| counts.last_written))
            .collect();
        if ticks.len() <= remove {
            self.sessions.clear();
            self.len = 0;
            return;
        }
        // Ticks are unique, so exactly `remove` pairs are at or below the threshold.
        let (_, threshold, _) = ticks.select_nth_unstable(remove - 1);
        let threshold = *threshold;
        self.sessions.retain(|_, streams| {
            streams.retain(|_, counts| counts.last_written > threshold);
            !streams.is_empty()
        });
        self.len = self.sessions.values().map(HashMap::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn written(session_key: &str, stream: &str, packets: u64) -> Written {
        Written {
            session_key: session_key.into(),
            stream: stream.into(),
            packets,
            bytes: packets * 10,
        }
    }

    fn manual() -> (Clock, std::sync::Arc<crate::clock::ManualClock>) {
        Clock::manual(Timestamp {
            seconds: 1_000,
            nanos: 250_000_000,
        })
    }

    fn rate_of(rates: &Rates, session_key: &str, stream: &str) -> Option<f64> {
        rates
            .session(session_key)
            .into_iter()
            .find(|rate| rate.stream == stream)
            .map(|rate| rate.packets_per_second)
    }

    #[test]
    fn counts_are_per_session_and_stream_and_the_main_stream_sorts_first() {
        let (clock, _) = manual();
        let rates = Rates::new(clock, 100);
        rates.record(&[written("s1", "laps", 3), written("s1", "", 2)]);
        rates.record(&[written("s1", "laps", 4), written("s2", "laps", 1)]);
        let s1 = rates.session("s1");
        assert_eq!(
            s1.iter()
                .map(|r| (r.stream.as_str(), r.packets, r.bytes))
                .collect::<Vec<_>>(),
            [("", 2, 20), ("laps", 7, 70)]
        );
        assert_eq!(rates.session("s2")[0].packets, 1);
        assert!(rates.session("nobody").is_empty());
        assert_eq!(rates.len(), 3);
    }

    #[test]
    fn the_rate_is_over_whole_seconds_of_the_clock_and_falls_to_zero_when_writes_stop() {
        let (clock, hand) = manual();
        let rates = Rates::new(clock, 100);
        rates.record(&[written("s1", "", 12)]);
        assert_eq!(
            rate_of(&rates, "s1", ""),
            Some(0.0),
            "no whole second has passed"
        );
        hand.advance(Duration::from_secs(1));
        assert_eq!(rate_of(&rates, "s1", ""), Some(12.0));
        rates.record(&[written("s1", "", 6)]);
        hand.advance(Duration::from_secs(1));
        assert_eq!(rate_of(&rates, "s1", ""), Some(9.0), "18 packets in 2 s");
        hand.advance(Duration::from_secs(3));
        assert_eq!(rate_of(&rates, "s1", ""), Some(18.0 / 5.0), "a full window");
        hand.advance(Duration::from_secs(1));
        assert_eq!(
            rate_of(&rates, "s1", ""),
            Some(6.0 / 5.0),
            "the first second left"
        );
        hand.advance(Duration::from_secs(60));
        assert_eq!(rate_of(&rates, "s1", ""), Some(0.0));
        assert_eq!(rates.session("s1")[0].packets, 18, "the count stays");
    }

    #[test]
    fn session_rates_add_up_their_streams_and_are_worked_out_once_a_second() {
        let (clock, hand) = manual();
        let rates = Rates::new(clock, 100);
        rates.record(&[
            written("s1", "", 8),
            written("s1", "laps", 2),
            written("s2", "", 1),
        ]);
        hand.advance(Duration::from_secs(1));
        let first = rates.sessions();
        assert_eq!(*first, [("s1".to_owned(), 10.0), ("s2".to_owned(), 1.0)]);
        rates.record(&[written("s3", "", 5)]);
        assert!(
            Arc::ptr_eq(&first, &rates.sessions()),
            "the same second's answer"
        );
        hand.advance(Duration::from_secs(10));
        rates.record(&[written("s3", "", 4)]);
        hand.advance(Duration::from_secs(1));
        assert_eq!(
            *rates.sessions(),
            [("s3".to_owned(), 4.0 / 5.0)],
            "only sessions with packets in the window"
        );
    }

    #[test]
    fn a_full_table_forgets_the_least_recently_written_pair() {
        let (clock, _) = manual();
        let rates = Rates::new(clock, 8);
        for session in 0..8 {
            rates.record(&[written(&format!("s{session}"), "", 1)]);
        }
        rates.record(&[written("s0", "", 1)]);
        rates.record(&[written("new", "laps", 1)]);
        assert_eq!(rates.len(), 8);
        assert!(
            rates.session("s1").is_empty(),
            "s1 was the least recently written"
        );
        assert_eq!(rates.session("s0")[0].packets, 2, "s0 was written again");
        assert_eq!(rates.session("new")[0].packets, 1);
        for session in 0..1_000 {
            rates.record(&[written(&format!("more{session}"), "x", 1)]);
            assert!(rates.len() <= 8);
        }
    }

    #[test]
    fn a_clock_stepped_back_counts_into_the_latest_second() {
        let mut window = Window {
            latest: 100,
            slots: [0; SLOTS],
        };
        window.add(100, 1);
        window.add(90, 2);
        window.add(101, 4);
        assert_eq!(window.packets_in(100, 100), 3);
        assert_eq!(window.packets_in(95, 101), 7);
    }
}
