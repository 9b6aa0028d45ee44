//! Printing results: aligned tables for people, JSON for scripts.
//!
//! Whatever is printed comes from a server and may hold control characters (a detail value may
//! hold anything, and sessions written by other servers were never checked): they are escaped,
//! so that no value can clear the terminal, move the cursor or forge a line.

use std::io::Write;

use serde_json::Value;

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        text.trim_end().to_owned()
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
}

/// Prints `name  value` pairs, names aligned.
pub fn fields(pairs: &[(&str, String)]) {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(name, value)| (escape(name), escape(value)))
        .collect();
    let width = pairs
        .iter()
        .map(|(name, _)| name.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for (name, value) in pairs {
        let _ = writeln!(out, "{}", format!("{name:<width$}  {value}").trim_end());
    }
}

/// Prints one JSON value on one line.
pub fn json(value: &Value) {
    let _ = json_line(value);
}

/// Prints one JSON value on one line and flushes it; fails when nobody reads standard output.
pub fn json_line(value: &Value) -> std::io::Result<()> {
    write_line(&json_text(value))
}

/// Prints one line of text.
pub fn text(text: &str) {
    let _ = line(text);
}

/// Prints one line and flushes it at once (a reader may be waiting for it); fails when nobody
/// reads standard output any more.
pub fn line(text: &str) -> std::io::Result<()> {
    write_line(&escape(text))
}

fn write_line(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// `text` with every control character written as an escape (`\n`, `\u{1b}`); everything
/// else, other languages' letters included, as it is.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

/// JSON on one line. serde_json escapes C0 controls itself but writes DEL and the C1 controls
/// (a terminal reads U+009B as CSI) raw; they get `\u` escapes too, which is still valid JSON.
fn json_text(value: &Value) -> String {
    let text = value.to_string();
    if !text.chars().any(char::is_control) {
        return text;
    }
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            escaped.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            escaped.push(c);
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_other_text_is_kept() {
        assert_eq!(escape("a\u{1b}[2Jb\nc\té"), "a\\u{1b}[2Jb\\nc\\té");
    }

    #[test]
    fn json_output_escapes_del_and_c1_controls_and_stays_valid() {
        let value = serde_json::json!({ "v": "x\u{9b}31m\u{7f}\n" });
        let text = json_text(&value);
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
    }
}
