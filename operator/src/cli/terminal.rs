//! Text from users, manifests, agents and the controller made safe to show on a terminal.
//!
//! Names, messages, reasons and events reach the CLI from people and machines it does not
//! control. A control character in them is an instruction to the terminal: ESC or CSI
//! (`\u{9b}`) sequences can move the cursor, rewrite lines already printed, retitle the
//! window or, on some terminals, answer back with keystrokes. So every control character
//! (C0, DEL, C1) is shown as an escape instead of being sent to the terminal, and so are
//! the Unicode line separators and bidirectional overrides, which do not steer the terminal
//! but can make a forged line or a reversed name look genuine.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` as one line a terminal shows as is: every control character, newline included, is
/// written as an escape (`\n`, `\r`, `\t`, `\x1b`, `\x7f`, `\u{9b}`). For names, fields and
/// the cells of a table, where a newline would forge a line.
pub fn printable(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// Like [`printable`], but newlines stay: for whole reports the CLI composes, whose lines
/// are meant (their fields having gone through [`printable`] already).
pub fn printable_lines(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

/// Whether `c` must not reach the terminal as it is.
fn is_unsafe(c: char) -> bool {
    // `is_control` is exactly C0, DEL and C1 (general category Cc).
    c.is_control()
        || matches!(c,
            // LINE SEPARATOR, PARAGRAPH SEPARATOR.
            '\u{2028}' | '\u{2029}'
            // Bidirectional embeddings, overrides and isolates (LRE … RLO, LRI … PDI).
            | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Pretty JSON safe to show on a terminal and still the same JSON: serde_json escapes C0
/// controls but writes DEL, C1 and the other unsafe characters as they are; those can
/// only occur inside strings, where `\u00XX` denotes the same character.
pub fn printable_json(json: &str) -> Cow<'_, str> {
    // Pretty JSON's only controls outside strings are its newlines; inside strings
    // serde_json has already escaped every C0 control, newline included.
    let unsafe_char = |c: char| is_unsafe(c) && c != '\n';
    if !json.chars().any(unsafe_char) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if unsafe_char(c) {
            // Every unsafe character is in the Basic Multilingual Plane: one `\u` escape.
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn escape(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    let unsafe_char = |c: char| is_unsafe(c) && !(keep_newlines && c == '\n');
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !unsafe_char(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // C0 and DEL fit two hex digits; the rest is written as Rust writes a char.
            c if u32::from(c) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        assert!(matches!(printable("db/pg: Syncing 40% – ok"), Cow::Borrowed("db/pg: Syncing 40% – ok")));
        assert!(matches!(printable_lines("a\nb\n"), Cow::Borrowed("a\nb\n")));
        assert!(matches!(printable_json("{\n  \"a\": \"b\"\n}"), Cow::Borrowed(_)));
        assert!(matches!(printable(""), Cow::Borrowed("")));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("\x1b[2J\x1b]0;owned\x07pg"), "\\x1b[2J\\x1b]0;owned\\x07pg");
        assert_eq!(printable("a\u{9b}31mb\u{80}\u{9f}"), "a\\u{9b}31mb\\u{80}\\u{9f}");
        assert_eq!(printable("del\x7f nul\0 bs\x08"), "del\\x7f nul\\x00 bs\\x08");
        assert_eq!(printable("one\ntwo\rthree\tfour"), "one\\ntwo\\rthree\\tfour");
        // Printable non-ASCII text is left alone: only controls are escaped.
        assert_eq!(printable("é\u{a0}ü日本\x1b"), "é\u{a0}ü日本\\x1b");
    }

    #[test]
    fn every_c0_c1_and_del_character_is_escaped() {
        for code in (0u32..0x20).chain(0x7f..0xa0) {
            let c = char::from_u32(code).unwrap_or_else(|| panic!("{code:x}"));
            let shown = printable(&c.to_string()).into_owned();
            assert!(shown.starts_with('\\'), "{code:#x} shown as {shown:?}");
            assert!(!shown.chars().any(char::is_control), "{code:#x} shown as {shown:?}");
        }
    }

    #[test]
    fn line_separators_and_bidi_overrides_are_escaped() {
        assert_eq!(printable("a\u{2028}b\u{2029}c"), "a\\u{2028}b\\u{2029}c");
        assert_eq!(printable("\u{202e}gp\u{202c} \u{2066}x\u{2069}"), "\\u{202e}gp\\u{202c} \\u{2066}x\\u{2069}");
    }

    #[test]
    fn report_lines_stay_but_nothing_else_does() {
        assert_eq!(printable_lines("one\ntwo\r\x1b[1A\n"), "one\ntwo\\r\\x1b[1A\n");
        // Windows line ends are shown, not obeyed: `\r` could overwrite the line.
        assert_eq!(printable_lines("a\r\nb"), "a\\r\nb");
        // Escaping twice only adds backslashes: the escapes themselves are plain text.
        let once = printable("\x1b\n").into_owned();
        assert_eq!(printable(&once), once);
    }

    #[test]
    fn json_stays_json_with_the_same_strings() {
        let value = serde_json::json!({"name": "a\u{9b}b\x7fc\x1bd\ne\u{202e}f"});
        let text = serde_json::to_string_pretty(&value).unwrap_or_default();
        let shown = printable_json(&text);
        assert_eq!(shown, "{\n  \"name\": \"a\\u009bb\\u007fc\\u001bd\\ne\\u202ef\"\n}");
        assert!(!shown.chars().any(|c| is_unsafe(c) && c != '\n'), "{shown}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&shown).ok(), Some(value));
    }
}
