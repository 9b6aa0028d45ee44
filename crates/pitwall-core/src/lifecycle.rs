//! When a session ends or leaves without anyone asking: auto-end of abandoned sessions (the
//! policies, global and per data source, and when one is due) and retention of completed ones.
//! Pure rules over a session and a time the caller passes in.

use std::collections::BTreeMap;
use std::time::Duration;

use prost_types::Timestamp;

use crate::session::Session;

/// The detail an auto-ended session gets, saying why it was ended.
pub const END_REASON_DETAIL: &str = "pitwall.end_reason";

/// When live sessions of a data source are ended for them. `None` turns a rule off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AutoEndPolicy {
    /// No create, update or end recorded for this long.
    pub idle_after: Option<Duration>,
    /// This long after creation.
    pub max_duration: Option<Duration>,
}

impl AutoEndPolicy {
    pub fn is_off(&self) -> bool {
        self.idle_after.is_none() && self.max_duration.is_none()
    }
}

/// Auto-end rules: one policy for every data source, and per data source changes to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoEndConfig {
    pub default: AutoEndPolicy,
    pub data_sources: BTreeMap<String, PolicyOverride>,
}

/// A data source's auto-end rules: `None` keeps the global rule, `Some(None)` turns it off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyOverride {
    pub idle_after: Option<Option<Duration>>,
    pub max_duration: Option<Option<Duration>>,
}

impl AutoEndConfig {
    pub fn policy_for(&self, data_source: &str) -> AutoEndPolicy {
        let changes = self
            .data_sources
            .get(data_source)
            .copied()
            .unwrap_or_default();
        AutoEndPolicy {
            idle_after: changes.idle_after.unwrap_or(self.default.idle_after),
            max_duration: changes.max_duration.unwrap_or(self.default.max_duration),
        }
    }

    /// Whether any data source can be auto-ended.
    pub fn is_on(&self) -> bool {
        !self.default.is_off()
            || self.data_sources.values().any(|changes| {
                changes.idle_after.flatten().is_some() || changes.max_duration.flatten().is_some()
            })
    }

    /// The shortest rule, which decides how often sessions are looked at.
    pub fn shortest(&self) -> Option<Duration> {
        let overrides = self
            .data_sources
            .values()
            .flat_map(|changes| [changes.idle_after.flatten(), changes.max_duration.flatten()]);
        [self.default.idle_after, self.default.max_duration]
            .into_iter()
            .chain(overrides)
            .flatten()
            .min()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Idle,
    MaxDuration,
}

impl EndReason {
    /// The value of [`END_REASON_DETAIL`].
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Idle => "idle",
            EndReason::MaxDuration => "max_duration",
        }
    }
}

/// An auto-end that is due: why, and the termination time the session gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoEnd {
    pub reason: EndReason,
    pub termination_time: Timestamp,
}

/// Whether `session` is due to be ended at `now` under `policy`. Idle sessions end at their last
/// activity, overlong ones at creation + `max_duration`; when both are due, the rule whose
/// deadline passed first decides.
pub fn auto_end_due(session: &Session, policy: &AutoEndPolicy, now: Timestamp) -> Option<AutoEnd> {
    if session.is_complete() {
        return None;
    }
    let last_activity = session.last_activity.or(session.creation_time)?;
    let started = session.creation_time.unwrap_or(last_activity);
    let idle = policy.idle_after.map(|idle_after| {
        (
            add(last_activity, idle_after),
            AutoEnd {
                reason: EndReason::Idle,
                termination_time: last_activity,
            },
        )
    });
    let overlong = policy.max_duration.map(|max_duration| {
        let deadline = add(started, max_duration);
        (
            deadline,
            AutoEnd {
                reason: EndReason::MaxDuration,
                termination_time: deadline,
            },
        )
    });
    [idle, overlong]
        .into_iter()
        .flatten()
        .filter(|(deadline, _)| order(*deadline) <= order(now))
        .min_by_key(|(deadline, _)| order(*deadline))
        .map(|(_, due)| due)
}

/// Whether a completed session has been kept `completed_for` since it ended, at `now`.
pub fn retention_expired(session: &Session, completed_for: Duration, now: Timestamp) -> bool {
    let Some(ended) = session
        .end
        .as_ref()
        .and(session.last_activity.or(session.termination_time()))
    else {
        return false;
    };
    order(add(ended, completed_for)) <= order(now)
}

/// `time + duration`, saturating instead of overflowing.
pub fn add(time: Timestamp, duration: Duration) -> Timestamp {
    let nanos = i64::from(time.nanos) + i64::from(duration.subsec_nanos());
    let seconds = time
        .seconds
        .saturating_add(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX))
        .saturating_add(nanos / 1_000_000_000);
    Timestamp {
        seconds,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

/// `time - duration`, saturating.
pub fn sub(time: Timestamp, duration: Duration) -> Timestamp {
    let mut seconds = time
        .seconds
        .saturating_sub(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX));
    let mut nanos = i64::from(time.nanos) - i64::from(duration.subsec_nanos());
    if nanos < 0 {
        nanos += 1_000_000_000;
        seconds = seconds.saturating_sub(1);
    }
    Timestamp {
        seconds,
        nanos: nanos as i32,
    }
}

/// A timestamp as a sortable pair.
pub fn order(time: Timestamp) -> (i64, i32) {
    (time.seconds, time.nanos)
}

#[cfg(test)]
mod tests {
    use pitwall_proto::open_data::{EndOfSessionPacket, NewSessionPacket};

    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    /// A live session created at `created`, last active at `active`.
    fn session(created: i64, active: i64) -> Session {
        let mut session = Session::start(
            "k",
            0,
            &NewSessionPacket {
                data_source: "ds".into(),
                creation_time: Some(at(created)),
                ..Default::default()
            },
        );
        session.last_activity = Some(at(active));
        session
    }

    fn policy(idle_after: Option<Duration>, max_duration: Option<Duration>) -> AutoEndPolicy {
        AutoEndPolicy {
            idle_after,
            max_duration,
        }
    }

    #[test]
    fn an_idle_session_ends_at_its_last_activity() {
        let s = session(0, 100);
        let idle = policy(Some(MINUTE), None);
        assert_eq!(auto_end_due(&s, &idle, at(159)), None);
        assert_eq!(
            auto_end_due(&s, &idle, at(160)),
            Some(AutoEnd {
                reason: EndReason::Idle,
                termination_time: at(100)
            })
        );
    }

    #[test]
    fn an_overlong_session_ends_at_creation_plus_max_duration() {
        let s = session(0, 1_000);
        let max = policy(None, Some(10 * MINUTE));
        assert_eq!(auto_end_due(&s, &max, at(599)), None);
        assert_eq!(
            auto_end_due(&s, &max, at(1_001)),
            Some(AutoEnd {
                reason: EndReason::MaxDuration,
                termination_time: at(600)
            })
        );
    }

    #[test]
    fn when_both_rules_are_due_the_earlier_deadline_decides() {
        let both = policy(Some(MINUTE), Some(10 * MINUTE));
        // Idle since 100 (deadline 160) before the max deadline 600.
        let due = auto_end_due(&session(0, 100), &both, at(700)).unwrap();
        assert_eq!(due.reason, EndReason::Idle);
        // Active until 590: idle deadline 650, max deadline 600.
        let due = auto_end_due(&session(0, 590), &both, at(700)).unwrap();
        assert_eq!(due.reason, EndReason::MaxDuration);
    }

    #[test]
    fn completed_sessions_and_policies_that_are_off_end_nothing() {
        let mut s = session(0, 0);
        assert_eq!(
            auto_end_due(&s, &AutoEndPolicy::default(), at(1_000_000)),
            None
        );
        s.complete(&EndOfSessionPacket::default());
        assert_eq!(
            auto_end_due(&s, &policy(Some(MINUTE), None), at(1_000_000)),
            None
        );
    }

    #[test]
    fn retention_counts_from_the_end() {
        let mut s = session(0, 0);
        assert!(
            !retention_expired(&s, MINUTE, at(1_000)),
            "live sessions are kept"
        );
        s.complete(&EndOfSessionPacket::default());
        s.last_activity = Some(at(500));
        assert!(!retention_expired(&s, MINUTE, at(559)));
        assert!(retention_expired(&s, MINUTE, at(560)));
    }

    #[test]
    fn time_arithmetic_carries_nanoseconds() {
        let t = Timestamp {
            seconds: 10,
            nanos: 900_000_000,
        };
        let d = Duration::from_millis(200);
        assert_eq!(
            add(t, d),
            Timestamp {
                seconds: 11,
                nanos: 100_000_000
            }
        );
        assert_eq!(sub(add(t, d), d), t);
    }
}
