//! Text from outside touchctl made safe to print for a person: file names, field names and values
//! from touchpoint files, ids and reasons from endpoints and users, anything the registry or the
//! queue hands back.
//!
//! Such text could carry terminal escape sequences (clear the screen, set the window title, write
//! the clipboard with OSC 52, hide text, fake a hyperlink) or Unicode bidi controls that reorder
//! what a reader sees (`invoice\u{202e}fdp.exe` reads as `invoiceexe.pdf`). Every human-readable
//! output passes such text through [`escape`] (one value) or [`escape_text`] (a message of
//! lines) where it is printed, so the raw characters never reach the terminal; the stored data is
//! left as it came.
//!
//! What is escaped: C0 controls, DEL, C1 controls, the Unicode bidi controls (U+061C, U+200E,
//! U+200F, U+202A..U+202E, U+2066..U+2069) and the line and paragraph separators (U+2028,
//! U+2029). They are shown as `\n`, `\r`, `\t`, `\x1b` (below U+0100) or `\u{202e}`. Backslashes
//! are left as they are, so the escaped form is for reading, not for parsing back: the JSON
//! outputs carry the exact text, and [`json`] makes those safe for a terminal too.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` must not reach a terminal as it is.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// Escapes every character of `s` that `keep` does not keep and [`unsafe_char`] flags.
fn escape_with(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    let flagged = |c: char| unsafe_char(c) && !keep(c);
    let Some(start) = s.find(flagged) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(&s[..start]);
    for c in s[start..].chars() {
        if !flagged(c) {
            out.push(c);
            continue;
        }
        let _ = match c {
            '\n' => out.write_str("\\n"),
            '\r' => out.write_str("\\r"),
            '\t' => out.write_str("\\t"),
            c if u32::from(c) < 0x100 => write!(out, "\\x{:02x}", u32::from(c)),
            c => write!(out, "\\u{{{:x}}}", u32::from(c)),
        };
    }
    Cow::Owned(out)
}

/// One value (a name, an id, a reason, a path) as a single line safe for a terminal: every
/// control character, line breaks and tabs included, and every bidi control is escaped.
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_with(s, |_| false)
}

/// A message that may span lines, safe for a terminal: line breaks and tabs are kept, every
/// other control character and every bidi control is escaped.
pub fn escape_text(s: &str) -> Cow<'_, str> {
    escape_with(s, |c| c == '\n' || c == '\t')
}

/// A JSON document from `serde_json`, safe for a terminal and still the same JSON: the
/// characters serde_json leaves as they are but a terminal acts on (DEL, C1 controls, bidi
/// controls, line separators) are written as `\uXXXX` escapes. Outside strings a JSON document
/// holds only ASCII punctuation, digits, letters and whitespace, so every such character is inside
/// a string, where the escape means the same character.
pub fn json(document: String) -> String {
    // serde_json escapes C0 inside strings itself; the line breaks and indentation of a pretty
    // document are whitespace between tokens.
    let flagged = |c: char| unsafe_char(c) && !matches!(c, '\n' | '\t' | '\r');
    if !document.contains(flagged) {
        return document;
    }
    let mut out = String::with_capacity(document.len() + 16);
    for c in document.chars() {
        if flagged(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in [
            "sms-gateway",
            "会员日满100减20",
            "café ☕",
            "C:\\path\\x1b",
            "",
        ] {
            assert!(matches!(escape(s), Cow::Borrowed(t) if t == s), "{s:?}");
            assert!(
                matches!(escape_text(s), Cow::Borrowed(t) if t == s),
                "{s:?}"
            );
        }
    }

    #[test]
    fn escape_sequences_are_shown_not_sent() {
        assert_eq!(escape("\x1b]0;pwned\x07"), "\\x1b]0;pwned\\x07");
        assert_eq!(escape("\x1b[2J"), "\\x1b[2J");
        assert_eq!(escape("a\u{9b}31mb\u{7f}"), "a\\x9b31mb\\x7f");
        assert_eq!(escape("nul\0"), "nul\\x00");
    }

    #[test]
    fn line_breaks_and_tabs_are_escaped_in_values_and_kept_in_messages() {
        assert_eq!(escape("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(escape_text("a\nb\r\tc\x1b"), "a\nb\\r\tc\\x1b");
    }

    #[test]
    fn bidi_controls_and_line_separators_are_escaped() {
        assert_eq!(escape("invoice\u{202e}fdp.exe"), "invoice\\u{202e}fdp.exe");
        let all = "\u{61c}\u{200e}\u{200f}\u{202a}\u{202b}\u{202c}\u{202d}\u{202e}\u{2066}\u{2067}\u{2068}\u{2069}\u{2028}\u{2029}";
        let out = escape(all);
        assert!(!out.chars().any(unsafe_char), "{out}");
        assert_eq!(out.matches("\\u{").count(), all.chars().count(), "{out}");
        // Neighbours of the ranges are ordinary characters.
        assert_eq!(
            escape("\u{200d}\u{202f}\u{2065}\u{206a}"),
            "\u{200d}\u{202f}\u{2065}\u{206a}"
        );
    }

    #[test]
    fn json_for_a_terminal_is_the_same_document() {
        let value = serde_json::json!({
            "reason": "\x1b]0;pwned\x07 \u{9b}2J \u{202e}evil \u{7f}",
            "user_id": "\x1b[2J",
            "plain": "会员",
        });
        let text = json(serde_json::to_string_pretty(&value).unwrap());
        assert!(!text.chars().any(|c| unsafe_char(c) && c != '\n'), "{text}");
        assert!(text.contains("\\u009b") && text.contains("\\u202e") && text.contains("\\u007f"));
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
        let plain = serde_json::to_string_pretty(&serde_json::json!({"a": [1, "b"]})).unwrap();
        assert_eq!(json(plain.clone()), plain);
    }
}
