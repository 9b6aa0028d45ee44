//! Why a request was refused. Each variant is an expected failure that the contract answers with
//! `success = false` and a reason; the message is what the client reads.

use std::fmt;

use thiserror::Error;

/// A request refused because of its content or the state it refers to. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejection {
    #[error("session {} not found", quote(.0))]
    UnknownSession(String),
    #[error("{0}")]
    Invalid(String),
    #[error("session management is disabled on this server (IntegrateSessionManagement = false)")]
    Disabled,
}

impl Rejection {
    /// A short, fixed label for metrics and logs: `not_found`, `invalid` or `disabled`.
    pub fn class(&self) -> &'static str {
        match self {
            Rejection::UnknownSession(_) => "not_found",
            Rejection::Invalid(_) => "invalid",
            Rejection::Disabled => "disabled",
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Rejection::Invalid(message.into())
    }
}

/// Most bytes of a client's value that a reason or a log line quotes. Enough to recognise the
/// value; small enough that a reason fits in gRPC metadata (clients accept 8–16 KiB of it), and
/// that a 4 MB key does not make a 4 MB log line.
pub const QUOTE_BYTES: usize = 200;

/// A client's value as reasons and logs quote it: in single quotes, control characters escaped
/// (so a value cannot forge a log line or drive a terminal), and cut to [`QUOTE_BYTES`] with its
/// full length when longer: `'0123…' (17000 bytes)`.
pub fn quote(value: &str) -> Quoted<'_> {
    Quoted(value)
}

/// See [`quote`].
#[derive(Debug, Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.0;
        let shown = cut(value, QUOTE_BYTES);
        f.write_str("'")?;
        for c in shown.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        if shown.len() < value.len() {
            write!(f, "…' ({} bytes)", value.len())
        } else {
            f.write_str("'")
        }
    }
}

/// The first `max` bytes of `text` at most, cut at a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_value_is_cut_to_a_few_hundred_bytes_with_its_length() {
        let key = "k".repeat(17_000);
        let reason = Rejection::UnknownSession(key).to_string();
        assert!(reason.len() < QUOTE_BYTES + 50, "{reason}");
        assert!(reason.ends_with("…' (17000 bytes) not found"), "{reason}");
        assert_eq!(
            Rejection::UnknownSession("short".into()).to_string(),
            "session 'short' not found"
        );
    }

    #[test]
    fn a_quoted_value_is_cut_at_a_character_boundary_and_escapes_control_characters() {
        let long = "é".repeat(150);
        let quoted = quote(&long).to_string();
        assert!(
            quoted.starts_with(&format!("'{}…'", "é".repeat(100))),
            "{quoted}"
        );
        assert_eq!(quote("a\nb\u{1b}[2J").to_string(), "'a\\nb\\u{1b}[2J'");
    }
}
