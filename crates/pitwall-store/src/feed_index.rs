//! The kept feed as the writer knows it: each event's sequence and time, so that a commit
//! decides what it trims from the front without reading the database, which the checkpointer
//! writes behind the writer. The decision travels in the batch's journal frame, so the database
//! and a replay after a crash trim exactly what the writer reported.
//!
//! 24 bytes per kept event: 2.4 MB for the default window of 100,000.

use std::collections::VecDeque;

use pitwall_core::lifecycle::order;
use prost_types::Timestamp;

use crate::embedded::{FeedBounds, FeedWindow};

/// How far beyond its count the feed may grow before it is trimmed back (less for small
/// windows): most commits trim nothing and the others a run, which costs the database less
/// than one deletion per commit.
const TRIM_SLACK: u64 = 1024;

/// Events one commit trims at most, so catching up with a lowered window spreads over
/// several commits instead of stalling one.
const MAX_TRIM_PER_COMMIT: usize = 10_000;

pub(crate) struct FeedIndex {
    events: VecDeque<(u64, Timestamp)>,
    first_kept: u64,
    next: u64,
}

impl FeedIndex {
    /// The feed stored with these bounds and these kept events (in sequence order).
    pub fn new(bounds: FeedBounds, events: VecDeque<(u64, Timestamp)>) -> FeedIndex {
        FeedIndex {
            events,
            first_kept: bounds.first_kept,
            next: bounds.next,
        }
    }

    pub fn first_kept(&self) -> u64 {
        self.first_kept
    }

    /// Adds a batch's events (in sequence order), trims to `window`, then takes the batch's
    /// numbering; returns the first sequence kept (all of them were trimmed: the next one).
    pub fn push(
        &mut self,
        events: impl IntoIterator<Item = (u64, Timestamp)>,
        window: FeedWindow,
        next: Option<u64>,
    ) -> u64 {
        self.add(events);
        let kept = self.events.len() as u64;
        let most = self.events.len().min(MAX_TRIM_PER_COMMIT);
        let excess = kept.saturating_sub(window.max_events);
        // A small window is kept exactly; a large one may run over by an eighth at most.
        let slack = TRIM_SLACK.min(window.max_events / 8).max(1);
        let mut cut = if excess >= slack {
            usize::try_from(excess).unwrap_or(usize::MAX).min(most)
        } else {
            0
        };
        if let Some(oldest) = window.oldest {
            while cut < most && order(self.events[cut].1) < order(oldest) {
                cut += 1;
            }
        }
        self.events.drain(..cut);
        let first_kept = self
            .events
            .front()
            .map_or(self.next, |(sequence, _)| *sequence);
        self.keep_from(first_kept, next)
    }

    /// Adds a replayed batch's events and numbering, and trims as the writer decided then:
    /// `first_kept` is the first sequence kept after it.
    pub fn replay(
        &mut self,
        events: impl IntoIterator<Item = (u64, Timestamp)>,
        first_kept: u64,
        next: Option<u64>,
    ) -> u64 {
        self.add(events);
        while self
            .events
            .front()
            .is_some_and(|(sequence, _)| *sequence < first_kept)
        {
            self.events.pop_front();
        }
        self.keep_from(first_kept, next)
    }

    fn add(&mut self, events: impl IntoIterator<Item = (u64, Timestamp)>) {
        for (sequence, time) in events {
            self.next = self.next.max(sequence + 1);
            self.events.push_back((sequence, time));
        }
    }

    fn keep_from(&mut self, first_kept: u64, next: Option<u64>) -> u64 {
        self.first_kept = first_kept;
        if let Some(next) = next {
            self.next = self.next.max(next);
        }
        first_kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    fn window(max_events: u64, oldest: Option<i64>) -> FeedWindow {
        FeedWindow {
            max_events,
            oldest: oldest.map(at),
        }
    }

    fn empty() -> FeedIndex {
        FeedIndex::new(
            FeedBounds {
                first_kept: 1,
                next: 1,
            },
            VecDeque::new(),
        )
    }

    #[test]
    fn a_small_window_is_kept_exactly_and_age_trims_the_rest() {
        let mut index = empty();
        let first = index.push((1..=5).map(|s| (s, at(s as i64))), window(3, None), None);
        assert_eq!(first, 3);
        assert_eq!(index.push([], window(3, Some(5)), None), 5);
        // Everything trimmed: history starts at what comes next.
        assert_eq!(index.push([], window(3, Some(9)), Some(8)), 6);
        assert_eq!(index.push([(9, at(10))], window(3, Some(9)), None), 9);
    }

    #[test]
    fn a_replayed_batch_trims_where_the_writer_decided() {
        let mut index = empty();
        index.push((1..=5).map(|s| (s, at(s as i64))), window(100, None), None);
        assert_eq!(index.replay([(6, at(6))], 4, Some(9)), 4);
        // Numbering went on to 9 and history starts at 4: the next batch's trim agrees.
        assert_eq!(index.push([], window(2, None), None), 5);
        assert_eq!(index.replay([], 9, None), 9);
        assert_eq!(index.push([(9, at(9))], window(2, None), None), 9);
    }

    #[test]
    fn a_large_window_trims_in_runs_and_never_too_much_at_once() {
        let mut index = empty();
        let big = window(100_000, None);
        let first = index.push((1..=100_500).map(|s| (s, at(0))), big, None);
        assert_eq!(first, 1, "under the slack nothing goes");
        let first = index.push((100_501..=101_024).map(|s| (s, at(0))), big, None);
        assert_eq!(first, 1025);
        let first = index.push(
            (101_025..=200_000).map(|s| (s, at(0))),
            window(10, None),
            None,
        );
        assert_eq!(first, 1025 + MAX_TRIM_PER_COMMIT as u64);
    }
}
