//! Text a client chose (a client id, a topic, a filter, a user name), as
//! it goes into the log and into refusal reasons.

use std::fmt;

/// Characters of client text a log line carries; the rest is counted, not
/// written, so that a client cannot grow the log by more than a line's
/// worth per refusal (a client id may be 64 KiB).
pub const SHOWN_MAX: usize = 96;

/// Client text, quoted and escaped as Rust's `Debug` escapes it (a line
/// break in it cannot start a forged log line) and cut after
/// [`SHOWN_MAX`] characters, with its length in bytes when it is cut.
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(SHOWN_MAX) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

/// The same for bytes that should be UTF-8 (a topic): invalid sequences
/// shown as U+FFFD.
pub fn shown_bytes(bytes: &[u8]) -> String {
    Shown(&String::from_utf8_lossy(bytes)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_is_escaped_and_cut() {
        let forged = "dev-1\n2026-11-26T16:00:00Z INFO device activated";
        let shown = Shown(forged).to_string();
        assert!(!shown.contains('\n'), "{shown}");
        assert_eq!(shown, format!("{forged:?}"));
        let long = "é".repeat(10_000);
        let shown = Shown(&long).to_string();
        assert_eq!(shown.chars().filter(|&c| c == 'é').count(), SHOWN_MAX);
        assert!(shown.ends_with("… (20000 bytes)"), "{shown}");
        assert_eq!(shown_bytes(b"a\xffb\r"), "\"a\u{fffd}b\\r\"");
    }
}
