//! Listing sessions: the filters of `pitwall.v1.ListSessions` and its stable paging.
//!
//! Pages follow creation order and the page token is the creation sequence of the last session
//! a page looked at, so a session that exists for the whole listing is listed exactly once
//! however many sessions are created or purged between pages.

use globset::{Glob, GlobMatcher};
use pitwall_proto::feed::{self, SessionFilter, SessionState, TimeRange};
use prost::Message;
use prost_types::Timestamp;

use crate::lifecycle::order;
use crate::projection::Projection;
use crate::rejection::{Rejection, quote};
use crate::session::Session;

/// Sessions a page holds when the request names no size, and at most.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

const TOKEN_PREFIX: &str = "after-";

/// A validated [`SessionFilter`].
#[derive(Debug, Clone)]
pub struct Query {
    data_sources: Vec<String>,
    state: SessionState,
    identifier: Option<GlobMatcher>,
    details: Vec<(String, String)>,
    created: Interval,
    ended: Option<Interval>,
}

/// `[from, to)` with open ends.
#[derive(Debug, Clone, Copy, Default)]
struct Interval {
    from: Option<Timestamp>,
    to: Option<Timestamp>,
}

impl Interval {
    fn parse(name: &str, range: Option<TimeRange>) -> Result<Interval, Rejection> {
        let range = range.unwrap_or_default();
        if let (Some(from), Some(to)) = (range.from, range.to)
            && order(from) > order(to)
        {
            return Err(Rejection::invalid(format!(
                "filter.{name}: 'from' {from} is after 'to' {to}"
            )));
        }
        Ok(Interval {
            from: range.from,
            to: range.to,
        })
    }

    fn contains(&self, time: Option<Timestamp>) -> bool {
        if self.from.is_none() && self.to.is_none() {
            return true;
        }
        let Some(time) = time else {
            return false;
        };
        self.from.is_none_or(|from| order(from) <= order(time))
            && self.to.is_none_or(|to| order(time) < order(to))
    }
}

impl Query {
    pub fn new(filter: SessionFilter) -> Result<Query, Rejection> {
        let state = SessionState::try_from(filter.state).map_err(|_| {
            Rejection::invalid(format!(
                "filter.state {} is not a session state (0 all, 1 live, 2 complete)",
                filter.state
            ))
        })?;
        let identifier = if filter.identifier_glob.is_empty() {
            None
        } else {
            let glob = Glob::new(&filter.identifier_glob).map_err(|e| {
                Rejection::invalid(format!(
                    "filter.identifier_glob {} is not a valid pattern: {}",
                    quote(&filter.identifier_glob),
                    e.kind()
                ))
            })?;
            Some(glob.compile_matcher())
        };
        let ended = filter
            .ended
            .map(|range| Interval::parse("ended", Some(range)))
            .transpose()?;
        Ok(Query {
            data_sources: filter.data_sources,
            state,
            identifier,
            details: filter
                .details
                .into_iter()
                .map(|detail| (detail.key, detail.value))
                .collect(),
            created: Interval::parse("created", filter.created)?,
            ended,
        })
    }

    pub fn matches(&self, session: &Session) -> bool {
        self.matches_fields(Fields {
            complete: session.is_complete(),
            data_source: &session.data_source,
            identifier: &session.identifier,
            detail: &|key| session.details.get(key),
            creation_time: session.creation_time,
            termination_time: session.termination_time(),
        })
    }

    /// [`Query::matches`] for a session as `pitwall.v1` shows it (a feed event's session).
    pub fn matches_view(&self, session: &feed::Session) -> bool {
        self.matches_fields(Fields {
            complete: session.is_complete,
            data_source: &session.data_source,
            identifier: &session.identifier,
            detail: &|key| session.details.get(key),
            creation_time: session.creation_time,
            termination_time: session.termination_time,
        })
    }

    /// Whether the filter lets every session through (nothing to check per session).
    pub fn is_everything(&self) -> bool {
        self.data_sources.is_empty()
            && self.state == SessionState::All
            && self.identifier.is_none()
            && self.details.is_empty()
            && self.created.from.is_none()
            && self.created.to.is_none()
            && self.ended.is_none()
    }

    fn matches_fields(&self, session: Fields<'_>) -> bool {
        let state = match self.state {
            SessionState::All => true,
            SessionState::Live => !session.complete,
            SessionState::Complete => session.complete,
        };
        state
            && (self.data_sources.is_empty()
                || self.data_sources.iter().any(|d| d == session.data_source))
            && self
                .identifier
                .as_ref()
                .is_none_or(|glob| glob.is_match(session.identifier))
            && self
                .details
                .iter()
                .all(|(key, value)| (session.detail)(key) == Some(value))
            && self.created.contains(session.creation_time)
            && self
                .ended
                .as_ref()
                .is_none_or(|ended| session.complete && ended.contains(session.termination_time))
    }
}

/// What a filter looks at, from either form of a session.
struct Fields<'a> {
    complete: bool,
    data_source: &'a str,
    identifier: &'a str,
    detail: &'a dyn Fn(&str) -> Option<&'a String>,
    creation_time: Option<Timestamp>,
    termination_time: Option<Timestamp>,
}

/// How much one page may cost.
#[derive(Debug, Clone, Copy)]
pub struct PageLimits {
    /// Sessions in the page.
    pub size: usize,
    /// Encoded bytes of the page's sessions (the response must fit the message limit).
    pub bytes: usize,
    /// Sessions looked at: a filter that matches little ends the page early, with a token to
    /// go on, instead of holding the projection for a whole scan.
    pub scanned: usize,
}

impl PageLimits {
    /// Limits for a requested `page_size` (0 for the default).
    pub fn for_request(page_size: u32, bytes: usize) -> PageLimits {
        let size = match page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        PageLimits {
            size,
            bytes,
            scanned: 100_000,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub sessions: Vec<feed::Session>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// The page after `page_token` of the sessions matching `query`, oldest first.
pub fn page(
    projection: &Projection,
    query: &Query,
    page_token: &str,
    limits: PageLimits,
) -> Result<Page, Rejection> {
    let after = parse_token(page_token)?;
    let mut sessions = Vec::new();
    let mut bytes = 0;
    let mut last_seen = None;
    let mut candidates = projection
        .in_creation_order(&query.data_sources, after)
        .peekable();
    let mut scanned = 0;
    while let Some(session) = candidates.next_if(|_| {
        sessions.len() < limits.size && scanned < limits.scanned && bytes < limits.bytes
    }) {
        scanned += 1;
        last_seen = Some(session.sequence);
        if !query.matches(session) {
            continue;
        }
        let view = session.to_view();
        bytes += view.encoded_len();
        sessions.push(view);
    }
    let more = candidates.peek().is_some();
    let next_page_token = match (more, last_seen) {
        (true, Some(sequence)) => format!("{TOKEN_PREFIX}{sequence}"),
        _ => String::new(),
    };
    Ok(Page {
        sessions,
        next_page_token,
    })
}

/// The sessions a live board shows for a filter: the live ones, oldest first, up to a cap, and
/// the ones that ended last. Gathered a step at a time, so that the projection's lock is held
/// briefly however many sessions there are; a session that changes between steps is shown as
/// one step saw it, and the feed events after the first step's position bring it up to date.
#[derive(Debug)]
pub struct BoardListing {
    query: Query,
    /// Creation sequence of the last session looked at.
    after: Option<u64>,
    live: Vec<feed::Session>,
    max_live: usize,
    /// Live sessions matching beyond `max_live`.
    more_live: usize,
    /// Candidates for the latest ends, trimmed to `max_ended` whenever twice that gathered.
    ended: Vec<(EndOrder, feed::Session)>,
    max_ended: usize,
    /// Once `max_ended` are kept, an end no later than this cannot make the list.
    threshold: Option<EndOrder>,
}

/// Termination time, then creation sequence: the order of "ended last".
type EndOrder = ((i64, i32), u64);

/// What a [`BoardListing`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardSessions {
    /// Oldest first.
    pub live: Vec<feed::Session>,
    /// Live sessions that matched beyond the cap.
    pub more_live: usize,
    /// The latest end first.
    pub ended: Vec<feed::Session>,
}

impl BoardListing {
    /// `query`'s state is ignored: the board shows live and ended sessions apart.
    pub fn new(mut query: Query, max_live: usize, max_ended: usize) -> BoardListing {
        query.state = SessionState::All;
        BoardListing {
            query,
            after: None,
            live: Vec::new(),
            max_live,
            more_live: 0,
            ended: Vec::new(),
            max_ended,
            threshold: None,
        }
    }

    /// Looks at up to `budget` more sessions; true once every session has been looked at.
    pub fn step(&mut self, projection: &Projection, budget: usize) -> bool {
        let mut candidates = projection.in_creation_order(&self.query.data_sources, self.after);
        for _ in 0..budget {
            let Some(session) = candidates.next() else {
                return true;
            };
            self.after = Some(session.sequence);
            if !self.query.matches(session) {
                continue;
            }
            match session.termination_time() {
                None if self.live.len() < self.max_live => self.live.push(session.to_view()),
                None => self.more_live += 1,
                Some(ended) => {
                    let at = (order(ended), session.sequence);
                    if self.threshold.is_none_or(|threshold| at > threshold) {
                        self.ended.push((at, session.to_view()));
                        if self.ended.len() >= 2 * self.max_ended.max(1) {
                            self.trim_ended();
                        }
                    }
                }
            }
        }
        false
    }

    pub fn finish(mut self) -> BoardSessions {
        self.trim_ended();
        BoardSessions {
            live: self.live,
            more_live: self.more_live,
            ended: self.ended.into_iter().map(|(_, session)| session).collect(),
        }
    }

    fn trim_ended(&mut self) {
        self.ended.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        self.ended.truncate(self.max_ended);
        if self.ended.len() == self.max_ended {
            self.threshold = self.ended.last().map(|(at, _)| *at);
        }
    }
}

fn parse_token(page_token: &str) -> Result<Option<u64>, Rejection> {
    if page_token.is_empty() {
        return Ok(None);
    }
    page_token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|sequence| sequence.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            Rejection::invalid(format!(
                "page_token {} was not returned by ListSessions; pass next_page_token \
                 unchanged, or nothing for the first page",
                quote(page_token)
            ))
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use pitwall_proto::feed::DetailEquals;
    use pitwall_proto::open_data::{EndOfSessionPacket, NewSessionPacket, SessionInfoPacket};
    use proptest::prelude::*;

    use super::*;
    use crate::record::Record;

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    /// Session `i`: data source `ds{i % 3}`, identifier `run {i}`, detail `car` = `i % 2`,
    /// created at `i`, ended at `i + 10` when `i % 4 == 0`.
    fn projection(n: usize) -> Projection {
        let mut p = Projection::default();
        for i in 0..n {
            let key = format!("k{i}");
            p.apply(
                Record::NewSession {
                    session_key: key.clone(),
                    packet: NewSessionPacket {
                        data_source: format!("ds{}", i % 3),
                        creation_time: Some(at(i as i64)),
                        session_info: Some(SessionInfoPacket {
                            identifier: format!("run {i}"),
                            details: BTreeMap::from([("car".into(), (i % 2).to_string())]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                },
                at(i as i64),
            );
            if i % 4 == 0 {
                p.apply(
                    Record::EndOfSession {
                        session_key: key,
                        packet: EndOfSessionPacket {
                            termination_time: Some(at(i as i64 + 10)),
                            ..Default::default()
                        },
                    },
                    at(i as i64 + 10),
                );
            }
        }
        p
    }

    /// Every page of a listing, following the tokens.
    fn all_pages(p: &Projection, filter: SessionFilter, size: u32) -> Vec<String> {
        let query = Query::new(filter).unwrap();
        let mut token = String::new();
        let mut keys = Vec::new();
        loop {
            let page = page(
                p,
                &query,
                &token,
                PageLimits {
                    scanned: 7,
                    ..PageLimits::for_request(size, usize::MAX)
                },
            )
            .unwrap();
            keys.extend(page.sessions.into_iter().map(|s| s.session_key));
            if page.next_page_token.is_empty() {
                return keys;
            }
            token = page.next_page_token;
        }
    }

    fn filter_strategy() -> impl Strategy<Value = SessionFilter> {
        (
            proptest::collection::vec(0..4usize, 0..3),
            0..3i32,
            prop_oneof![Just(""), Just("run 1*"), Just("run ?"), Just("*[05]")],
            proptest::option::of(0..2usize),
            proptest::option::of((0..40i64, 0..40i64)),
            proptest::option::of((0..50i64, 0..50i64)),
        )
            .prop_map(|(sources, state, glob, car, created, ended)| {
                let range = |(a, b): (i64, i64)| TimeRange {
                    from: Some(at(a.min(b))),
                    to: Some(at(a.max(b))),
                };
                SessionFilter {
                    data_sources: sources.into_iter().map(|i| format!("ds{i}")).collect(),
                    state,
                    identifier_glob: glob.into(),
                    details: car
                        .map(|car| DetailEquals {
                            key: "car".into(),
                            value: car.to_string(),
                        })
                        .into_iter()
                        .collect(),
                    created: created.map(range),
                    ended: ended.map(range),
                }
            })
    }

    /// The same filter written out plainly over the generated sessions.
    fn model(n: usize, filter: &SessionFilter) -> Vec<String> {
        let within = |range: &Option<TimeRange>, t: i64| {
            range.as_ref().is_none_or(|r| {
                r.from.is_none_or(|f| f.seconds <= t) && r.to.is_none_or(|to| t < to.seconds)
            })
        };
        (0..n)
            .filter(|&i| {
                let ended = i % 4 == 0;
                let id = format!("run {i}");
                (filter.data_sources.is_empty()
                    || filter.data_sources.contains(&format!("ds{}", i % 3)))
                    && match filter.state {
                        1 => !ended,
                        2 => ended,
                        _ => true,
                    }
                    && match filter.identifier_glob.as_str() {
                        "run 1*" => id.starts_with("run 1"),
                        "run ?" => id.len() == 5,
                        "*[05]" => id.ends_with('0') || id.ends_with('5'),
                        _ => true,
                    }
                    && filter
                        .details
                        .iter()
                        .all(|d| d.value == (i % 2).to_string())
                    && within(&filter.created, i as i64)
                    && (filter.ended.is_none() || (ended && within(&filter.ended, i as i64 + 10)))
            })
            .map(|i| format!("k{i}"))
            .collect()
    }

    proptest! {
        #[test]
        fn filters_and_paging_agree_with_a_model(filter in filter_strategy(), size in 1..6u32) {
            let p = projection(40);
            prop_assert_eq!(all_pages(&p, filter.clone(), size), model(40, &filter));
        }

        #[test]
        fn a_filter_reads_both_forms_of_a_session_alike(filter in filter_strategy()) {
            let p = projection(40);
            let query = Query::new(filter).unwrap();
            for session in p.sessions() {
                prop_assert_eq!(query.matches(session), query.matches_view(&session.to_view()));
            }
        }
    }

    #[test]
    fn paging_is_stable_while_sessions_come_and_go() {
        let mut p = projection(30);
        let query = Query::new(SessionFilter::default()).unwrap();
        let limits = PageLimits::for_request(10, usize::MAX);
        let first = page(&p, &query, "", limits).unwrap();
        // Between pages: one listed session and one not yet listed leave, a new one comes.
        p.apply(
            Record::Purge {
                session_key: "k3".into(),
            },
            at(100),
        );
        p.apply(
            Record::Purge {
                session_key: "k15".into(),
            },
            at(100),
        );
        p.apply(
            Record::NewSession {
                session_key: "new".into(),
                packet: NewSessionPacket {
                    data_source: "ds0".into(),
                    ..Default::default()
                },
            },
            at(100),
        );
        let second = page(&p, &query, &first.next_page_token, limits).unwrap();
        let keys: Vec<_> = second
            .sessions
            .iter()
            .map(|s| s.session_key.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "k10", "k11", "k12", "k13", "k14", "k16", "k17", "k18", "k19", "k20"
            ]
        );
    }

    #[test]
    fn pages_stop_at_the_byte_budget_but_always_hold_one_session() {
        let p = projection(5);
        let query = Query::new(SessionFilter::default()).unwrap();
        let page = page(&p, &query, "", PageLimits::for_request(0, 1)).unwrap();
        assert_eq!(page.sessions.len(), 1);
        assert!(!page.next_page_token.is_empty());
    }

    #[test]
    fn a_board_lists_live_sessions_oldest_first_and_the_latest_ends_first() {
        let p = projection(40);
        let query = Query::new(SessionFilter {
            data_sources: vec!["ds0".into(), "ds1".into()],
            ..Default::default()
        })
        .unwrap();
        let mut listing = BoardListing::new(query, 5, 3);
        // A step at a time, as the server takes the lock.
        while !listing.step(&p, 4) {}
        let board = listing.finish();
        let keys = |sessions: &[feed::Session]| {
            sessions
                .iter()
                .map(|s| s.session_key.clone())
                .collect::<Vec<_>>()
        };
        // Live: i % 4 != 0 and i % 3 != 2, oldest first.
        assert_eq!(keys(&board.live), ["k1", "k3", "k6", "k7", "k9"]);
        assert_eq!(board.more_live, 20 - 5);
        // Ended: i % 4 == 0 and i % 3 != 2, ended at i + 10, latest first.
        assert_eq!(keys(&board.ended), ["k36", "k28", "k24"]);
        let everything = Query::new(SessionFilter::default()).unwrap();
        assert!(everything.is_everything());
        assert!(everything.matches_view(&board.live[0]));
        let glob = Query::new(SessionFilter {
            identifier_glob: "run 3*".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(!glob.is_everything());
        assert!(glob.matches_view(&board.live[1]));
        assert!(!glob.matches_view(&board.live[0]));
    }

    #[test]
    fn malformed_filters_and_tokens_are_refused_with_the_field_named() {
        let bad_glob = Query::new(SessionFilter {
            identifier_glob: "run [".into(),
            ..Default::default()
        });
        assert!(matches!(bad_glob, Err(Rejection::Invalid(m)) if m.contains("identifier_glob")));
        let backwards = Query::new(SessionFilter {
            created: Some(TimeRange {
                from: Some(at(5)),
                to: Some(at(1)),
            }),
            ..Default::default()
        });
        assert!(matches!(backwards, Err(Rejection::Invalid(m)) if m.contains("created")));
        let bad_state = Query::new(SessionFilter {
            state: 9,
            ..Default::default()
        });
        assert!(bad_state.is_err());
        let query = Query::new(SessionFilter::default()).unwrap();
        let token = page(&projection(1), &query, "12", PageLimits::for_request(0, 1));
        assert!(matches!(token, Err(Rejection::Invalid(m)) if m.contains("page_token")));
    }
}
