//! Text forms of the values the command line reads and prints: details, UTC offsets, times.

pub use pitwall_proto::json::{format_time, format_utc_offset};
use prost_types::{Duration, Timestamp};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `key=value`; the value may contain `=` and may be empty, the key may not be empty.
pub fn parse_detail(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("'{text}' is not key=value")),
    }
}

/// `±HH:MM` (also `Z` for zero).
pub fn parse_utc_offset(text: &str) -> Result<Duration, String> {
    let invalid = || format!("'{text}' is not a UTC offset like +01:00 or -05:30");
    if text == "Z" {
        return Ok(Duration::default());
    }
    let (sign, rest) = match text.split_at_checked(1) {
        Some(("+", rest)) => (1, rest),
        Some(("-", rest)) => (-1, rest),
        _ => return Err(invalid()),
    };
    let (hours, minutes) = rest.split_once(':').ok_or_else(invalid)?;
    let hours: i64 = hours.parse().map_err(|_| invalid())?;
    let minutes: i64 = minutes.parse().map_err(|_| invalid())?;
    if hours > 24 || minutes > 59 || hours.to_string().len() > 2 {
        return Err(invalid());
    }
    Ok(Duration {
        seconds: sign * (hours * 3600 + minutes * 60),
        nanos: 0,
    })
}

/// An RFC 3339 time, e.g. `2026-05-01T14:03:00Z` or `2026-05-01T16:03:00+02:00`.
pub fn parse_time(text: &str) -> Result<Timestamp, String> {
    let time = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("'{text}' is not an RFC 3339 time like 2026-05-01T14:03:00Z ({e})"))?;
    let nanos = time.unix_timestamp_nanos();
    Ok(Timestamp {
        seconds: nanos.div_euclid(1_000_000_000) as i64,
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_split_at_the_first_equals_sign() {
        assert_eq!(parse_detail("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_detail("a="), Ok(("a".into(), String::new())));
        assert!(parse_detail("novalue").is_err());
        assert!(parse_detail("=v").is_err());
    }

    #[test]
    fn utc_offsets_read_and_print_as_hours_and_minutes() {
        let offset = parse_utc_offset("-05:30").unwrap();
        assert_eq!(offset.seconds, -(5 * 3600 + 30 * 60));
        assert_eq!(format_utc_offset(&offset), "-05:30");
        assert_eq!(
            format_utc_offset(&parse_utc_offset("+01:00").unwrap()),
            "+01:00"
        );
        assert!(parse_utc_offset("01:00").is_err());
        assert!(parse_utc_offset("+1:75").is_err());
    }

    #[test]
    fn times_read_any_offset_and_print_in_utc() {
        let time = parse_time("2026-05-01T16:03:00.5+02:00").unwrap();
        assert_eq!(format_time(&time), "2026-05-01T14:03:00.5Z");
        assert!(parse_time("yesterday").is_err());
    }
}
