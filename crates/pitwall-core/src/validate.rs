//! Request checks that need no state: names, sizes, counts, times. The contract's limits are
//! inclusive and configurable; they hold for updates as well as creates.

use pitwall_proto::api::ConnectionDetails;
use prost_types::{Duration, Timestamp};

use crate::rejection::{Rejection, quote};

/// Size and count limits on session content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub data_source_bytes: usize,
    pub detail_key_bytes: usize,
    pub detail_value_bytes: usize,
    pub details_per_session: usize,
    pub associates_per_session: usize,
    pub type_bytes: usize,
    pub identifier_bytes: usize,
    /// Encoded size of a whole session, so every response fits the message limit.
    pub session_bytes: usize,
    /// How far ahead of the server's clock a `creation_time` may lie; `None` allows any time.
    /// A session created in the future cannot be ended by the server's clock until then.
    pub creation_time_skew: Option<std::time::Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Kafka's topic name limit: the data source names topics in the data plane.
            data_source_bytes: 249,
            detail_key_bytes: 256,
            detail_value_bytes: 64 * 1024,
            details_per_session: 1024,
            associates_per_session: 256,
            type_bytes: 256,
            identifier_bytes: 1024,
            session_bytes: 1024 * 1024,
            // Covers clocks of logging hosts that drift or are set by hand, and nothing more.
            creation_time_skew: Some(std::time::Duration::from_secs(5 * 60)),
        }
    }
}

/// The reference's internal stream name of the essentials route.
pub const RESERVED_STREAM: &str = "@stream@::_essential";

/// Session keys are UUIDs here and short strings elsewhere; anything longer is a mistake.
pub const MAX_SESSION_KEY_BYTES: usize = 1024;
/// A consumer group name of a read connection at most (a broker keeps it with every commit).
pub const MAX_CONSUMER_GROUP_BYTES: usize = 255;

/// Seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: protobuf's valid timestamp range.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;
const MAX_NANOS: i32 = 999_999_999;
const MAX_UTC_OFFSET_SECONDS: i64 = 24 * 60 * 60;

impl Limits {
    /// A data source names Kafka topics: 1 to 249 bytes of `A-Z a-z 0-9 . _ -`, not `.` or `..`
    /// (Kafka refuses them), not starting with `__` (Kafka's internal topics) and not ending in
    /// `_essential` (the essentials topic of another data source).
    pub fn check_data_source(&self, data_source: &str) -> Result<(), Rejection> {
        if data_source.is_empty() {
            return Err(Rejection::invalid(
                "data_source is empty; name the data source (A-Z a-z 0-9 . _ -)",
            ));
        }
        if data_source.len() > self.data_source_bytes {
            return Err(Rejection::invalid(format!(
                "data_source is {} bytes; at most {} are allowed",
                data_source.len(),
                self.data_source_bytes
            )));
        }
        if let Some(bad) = data_source
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(Rejection::invalid(format!(
                "data_source {} contains {}; use A-Z a-z 0-9 . _ -",
                quote(data_source),
                describe_char(bad)
            )));
        }
        if data_source == "." || data_source == ".." {
            return Err(Rejection::invalid(format!(
                "data_source '{data_source}' is not a valid Kafka topic name; choose another name"
            )));
        }
        if data_source.starts_with("__") {
            return Err(Rejection::invalid(format!(
                "data_source '{data_source}' starts with '__', which Kafka reserves for its \
                 internal topics; choose another name"
            )));
        }
        if let Some(main) = data_source.strip_suffix(ESSENTIALS_SUFFIX) {
            return Err(Rejection::invalid(format!(
                "data_source '{data_source}' ends in '{ESSENTIALS_SUFFIX}', which names the \
                 essentials topic of data source '{main}'; choose another name"
            )));
        }
        Ok(())
    }

    /// A stream names a topic `{data_source}.{stream}` on a broker: 1 to 249 bytes of
    /// `A-Z a-z 0-9 . _ -` in all, not the reference's internal name of the essentials route.
    pub fn check_stream(&self, data_source: &str, stream: &str) -> Result<(), Rejection> {
        if stream == RESERVED_STREAM {
            return Err(Rejection::invalid(format!(
                "stream '{RESERVED_STREAM}' is the name of the essentials; mark the packet \
                 is_essential instead"
            )));
        }
        if let Some(bad) = stream
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(Rejection::invalid(format!(
                "stream {} contains {}; use A-Z a-z 0-9 . _ -",
                quote(stream),
                describe_char(bad)
            )));
        }
        let topic = data_source.len() + 1 + stream.len();
        if topic > self.data_source_bytes {
            return Err(Rejection::invalid(format!(
                "data_source and stream make a topic name of {topic} bytes; at most {} are \
                 allowed",
                self.data_source_bytes
            )));
        }
        Ok(())
    }

    /// The session key a packet is written with: the broker's record key, up to
    /// [`MAX_SESSION_KEY_BYTES`], no control characters.
    pub fn check_packet_session_key(&self, session_key: &str) -> Result<(), Rejection> {
        check_len("session_key", session_key, MAX_SESSION_KEY_BYTES)?;
        check_no_control("session_key", session_key)
    }

    /// The details a read can follow: a valid data source and streams, one offset per stream (or
    /// none at all, which reads each stream from its first packet), a valid session key.
    pub fn check_connection(&self, details: &ConnectionDetails) -> Result<(), Rejection> {
        self.check_data_source(&details.data_source)?;
        for stream in &details.streams {
            if stream.is_empty() {
                return Err(Rejection::invalid(
                    "a stream name is empty; the main stream is read unless exclude_main_stream",
                ));
            }
            self.check_stream(&details.data_source, stream)?;
        }
        if !details.stream_offsets.is_empty()
            && details.stream_offsets.len() != details.streams.len()
        {
            return Err(Rejection::invalid(format!(
                "{} stream_offsets for {} streams; give one offset per stream, in the same order, or \
                 none",
                details.stream_offsets.len(),
                details.streams.len()
            )));
        }
        self.check_packet_session_key(&details.session_key)?;
        check_len(
            "consumer_group",
            &details.consumer_group,
            MAX_CONSUMER_GROUP_BYTES,
        )?;
        check_no_control("consumer_group", &details.consumer_group)?;
        if details.exclude_main_stream && details.streams.is_empty() {
            return Err(Rejection::invalid(
                "exclude_main_stream with no streams leaves nothing to read; name a stream or read the \
                 main stream",
            ));
        }
        Ok(())
    }

    pub fn check_type(&self, session_type: &str) -> Result<(), Rejection> {
        check_len("type", session_type, self.type_bytes)?;
        check_no_control("type", session_type)
    }

    pub fn check_identifier(&self, identifier: &str) -> Result<(), Rejection> {
        check_len("identifier", identifier, self.identifier_bytes)?;
        check_no_control("identifier", identifier)
    }

    /// A `creation_time` no further ahead of `now` (the server's clock) than the allowed skew.
    pub fn check_creation_time(
        &self,
        creation_time: Timestamp,
        now: Timestamp,
    ) -> Result<(), Rejection> {
        let Some(skew) = self.creation_time_skew else {
            return Ok(());
        };
        let latest = crate::lifecycle::add(now, skew);
        if crate::lifecycle::order(creation_time) > crate::lifecycle::order(latest) {
            return Err(Rejection::invalid(format!(
                "creation_time {creation_time} is more than {}s ahead of the server's clock \
                 ({now}); send the real time, or none for the server's clock",
                skew.as_secs()
            )));
        }
        Ok(())
    }

    /// One detail entry: key 1 to `detail_key_bytes`, value up to `detail_value_bytes`.
    pub fn check_detail(&self, name: &str, value: &str) -> Result<(), Rejection> {
        if name.is_empty() {
            return Err(Rejection::invalid(
                "a detail key is empty; detail keys need 1 byte or more",
            ));
        }
        if name.len() > self.detail_key_bytes {
            return Err(Rejection::invalid(format!(
                "detail key {} is {} bytes; at most {} are allowed",
                quote(name),
                name.len(),
                self.detail_key_bytes
            )));
        }
        check_no_control("detail key", name)?;
        if value.len() > self.detail_value_bytes {
            return Err(Rejection::invalid(format!(
                "detail {} has a value of {} bytes; at most {} are allowed",
                quote(name),
                value.len(),
                self.detail_value_bytes
            )));
        }
        Ok(())
    }

    pub fn check_detail_count(&self, count: usize) -> Result<(), Rejection> {
        if count > self.details_per_session {
            return Err(Rejection::invalid(format!(
                "the session would have {count} details; at most {} are allowed",
                self.details_per_session
            )));
        }
        Ok(())
    }

    pub fn check_associate_count(&self, count: usize) -> Result<(), Rejection> {
        if count > self.associates_per_session {
            return Err(Rejection::invalid(format!(
                "the session would have {count} associate sessions; at most {} are allowed",
                self.associates_per_session
            )));
        }
        Ok(())
    }

    pub fn check_session_size(&self, encoded_bytes: usize) -> Result<(), Rejection> {
        if encoded_bytes > self.session_bytes {
            return Err(Rejection::invalid(format!(
                "the session would take {encoded_bytes} bytes encoded; at most {} are allowed",
                self.session_bytes
            )));
        }
        Ok(())
    }
}

/// An associate key must be non-empty and not the session's own key.
pub fn check_associate(session_key: &str, associate: &str) -> Result<(), Rejection> {
    if associate.is_empty() {
        return Err(Rejection::invalid("associate session key is empty"));
    }
    if associate == session_key {
        return Err(Rejection::invalid(format!(
            "session {} cannot be its own associate",
            quote(session_key)
        )));
    }
    Ok(())
}

/// A valid protobuf timestamp: years 1 to 9999, nanos 0 to 999,999,999.
pub fn check_timestamp(field: &str, timestamp: &Timestamp) -> Result<(), Rejection> {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&timestamp.seconds) {
        return Err(Rejection::invalid(format!(
            "{field} has seconds {}; timestamps must fall in years 1 to 9999",
            timestamp.seconds
        )));
    }
    if !(0..=MAX_NANOS).contains(&timestamp.nanos) {
        return Err(Rejection::invalid(format!(
            "{field} has nanos {}; use 0 to 999999999",
            timestamp.nanos
        )));
    }
    Ok(())
}

/// A valid protobuf duration within ±24 h, as a UTC offset must be.
pub fn check_utc_offset(offset: &Duration) -> Result<(), Rejection> {
    if !(-MAX_NANOS..=MAX_NANOS).contains(&offset.nanos) {
        return Err(Rejection::invalid(format!(
            "utc_offset has nanos {}; use -999999999 to 999999999",
            offset.nanos
        )));
    }
    if (offset.seconds > 0 && offset.nanos < 0) || (offset.seconds < 0 && offset.nanos > 0) {
        return Err(Rejection::invalid(
            "utc_offset has seconds and nanos of opposite signs; give both the same sign",
        ));
    }
    let beyond_a_day = offset.seconds.unsigned_abs() > MAX_UTC_OFFSET_SECONDS as u64
        || (offset.seconds.unsigned_abs() == MAX_UTC_OFFSET_SECONDS as u64 && offset.nanos != 0);
    if beyond_a_day {
        return Err(Rejection::invalid(format!(
            "utc_offset is {}s; it must be within ±24 h",
            offset.seconds
        )));
    }
    Ok(())
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), Rejection> {
    if value.len() > max {
        return Err(Rejection::invalid(format!(
            "{field} is {} bytes; at most {max} are allowed",
            value.len()
        )));
    }
    Ok(())
}

/// Control characters other than tab: they can clear a terminal or forge a line wherever the
/// value is printed, and no identifier, type or detail key needs one.
pub(crate) fn check_no_control(field: &str, value: &str) -> Result<(), Rejection> {
    match value
        .char_indices()
        .find(|(_, c)| c.is_control() && *c != '\t')
    {
        None => Ok(()),
        Some((at, c)) => Err(Rejection::invalid(format!(
            "{field} {} contains {} at byte {at}; control characters (other than tab) are not \
             allowed",
            quote(value),
            describe_char(c)
        ))),
    }
}

fn describe_char(c: char) -> String {
    match c {
        ' ' => "a space".to_owned(),
        c if c.is_control() => format!("control character {:?}", c),
        c => format!("'{c}'"),
    }
}

/// The suffix of a data source's essentials topic.
const ESSENTIALS_SUFFIX: &str = "_essential";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_source_accepts_kafka_topic_characters_up_to_249_bytes() {
        let limits = Limits::default();
        assert!(limits.check_data_source("Car_1.dyno-A").is_ok());
        assert!(limits.check_data_source(&"a".repeat(249)).is_ok());
        assert!(limits.check_data_source(&"a".repeat(250)).is_err());
        assert!(limits.check_data_source("").is_err());
    }

    #[test]
    fn data_source_with_a_space_is_refused_with_the_allowed_set() {
        let err = Limits::default().check_data_source("a b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "data_source 'a b' contains a space; use A-Z a-z 0-9 . _ -"
        );
    }

    #[test]
    fn data_sources_that_kafka_refuses_or_reserves_are_refused() {
        let limits = Limits::default();
        for name in [
            ".",
            "..",
            "__consumer_offsets",
            "__x",
            "Car1_essential",
            "_essential",
        ] {
            let err = limits.check_data_source(name).unwrap_err().to_string();
            assert!(err.contains(&format!("data_source '{name}'")), "{err}");
        }
        for name in [
            "...",
            "_x",
            "a__b",
            "Car1_essentials",
            "essential",
            "_",
            "a.b",
        ] {
            assert!(limits.check_data_source(name).is_ok(), "{name}");
        }
        let err = limits.check_data_source("Car1_essential").unwrap_err();
        assert!(
            err.to_string()
                .contains("essentials topic of data source 'Car1'")
        );
    }

    #[test]
    fn control_characters_are_refused_in_identifier_type_and_detail_keys_but_tab_is_allowed() {
        let limits = Limits::default();
        for text in [
            "a\u{1b}[2J",
            "line\nforged",
            "nul\0",
            "del\u{7f}",
            "csi\u{9b}",
        ] {
            let err = limits.check_identifier(text).unwrap_err().to_string();
            assert!(err.starts_with("identifier '"), "{err}");
            assert!(err.contains("control character"), "{err}");
            assert!(!err.contains('\u{1b}') && !err.contains('\n'), "{err:?}");
            assert!(limits.check_type(text).is_err());
            assert!(limits.check_detail(text, "v").is_err());
        }
        assert!(limits.check_identifier("tab\there").is_ok());
        assert!(limits.check_type("tab\there").is_ok());
        assert!(
            limits
                .check_detail("tab\there", "value\nwith\u{1b}anything")
                .is_ok()
        );
    }

    #[test]
    fn a_creation_time_may_lie_at_most_the_skew_in_the_servers_future() {
        let limits = Limits::default();
        let now = Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        };
        let at = |seconds| Timestamp {
            seconds: now.seconds + seconds,
            nanos: 0,
        };
        assert!(limits.check_creation_time(at(-86_400), now).is_ok());
        assert!(limits.check_creation_time(at(300), now).is_ok());
        let err = limits.check_creation_time(at(301), now).unwrap_err();
        assert!(
            err.to_string().contains("ahead of the server's clock"),
            "{err}"
        );
        let year_2100 = Timestamp {
            seconds: 4_102_444_800,
            nanos: 0,
        };
        assert!(limits.check_creation_time(year_2100, now).is_err());
        let anything = Limits {
            creation_time_skew: None,
            ..Limits::default()
        };
        assert!(anything.check_creation_time(year_2100, now).is_ok());
    }

    #[test]
    fn detail_limits_are_inclusive() {
        let limits = Limits::default();
        assert!(
            limits
                .check_detail(&"k".repeat(256), &"v".repeat(65536))
                .is_ok()
        );
        assert!(limits.check_detail(&"k".repeat(257), "v").is_err());
        assert!(limits.check_detail("k", &"v".repeat(65537)).is_err());
        assert!(limits.check_detail("", "v").is_err());
        assert!(limits.check_detail_count(1024).is_ok());
        assert!(limits.check_detail_count(1025).is_err());
    }

    #[test]
    fn type_identifier_and_associate_limits_are_inclusive() {
        let limits = Limits::default();
        assert!(limits.check_type(&"t".repeat(256)).is_ok());
        assert!(limits.check_type(&"t".repeat(257)).is_err());
        assert!(limits.check_identifier(&"i".repeat(1024)).is_ok());
        assert!(limits.check_identifier(&"i".repeat(1025)).is_err());
        assert!(limits.check_associate_count(256).is_ok());
        assert!(limits.check_associate_count(257).is_err());
    }

    #[test]
    fn associates_must_be_non_empty_and_not_the_session_itself() {
        assert!(check_associate("s", "other").is_ok());
        assert!(check_associate("s", "").is_err());
        assert!(check_associate("s", "s").is_err());
    }

    #[test]
    fn timestamps_must_be_valid_protobuf_values() {
        let ts = |seconds, nanos| Timestamp { seconds, nanos };
        assert!(check_timestamp("t", &ts(0, 0)).is_ok());
        assert!(check_timestamp("t", &ts(MIN_TIMESTAMP_SECONDS, 0)).is_ok());
        assert!(check_timestamp("t", &ts(MAX_TIMESTAMP_SECONDS, MAX_NANOS)).is_ok());
        assert!(check_timestamp("t", &ts(MIN_TIMESTAMP_SECONDS - 1, 0)).is_err());
        assert!(check_timestamp("t", &ts(MAX_TIMESTAMP_SECONDS + 1, 0)).is_err());
        assert!(check_timestamp("t", &ts(0, -1)).is_err());
        assert!(check_timestamp("t", &ts(0, 1_000_000_000)).is_err());
    }

    #[test]
    fn utc_offsets_must_be_valid_durations_within_a_day() {
        let d = |seconds, nanos| Duration { seconds, nanos };
        assert!(check_utc_offset(&d(86_400, 0)).is_ok());
        assert!(check_utc_offset(&d(-86_400, 0)).is_ok());
        assert!(check_utc_offset(&d(-3600, -5)).is_ok());
        assert!(check_utc_offset(&d(86_400, 1)).is_err());
        assert!(check_utc_offset(&d(86_401, 0)).is_err());
        assert!(check_utc_offset(&d(1, -1)).is_err());
        assert!(check_utc_offset(&d(0, 1_000_000_000)).is_err());
    }
}
