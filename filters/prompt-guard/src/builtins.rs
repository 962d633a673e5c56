//! Built-in detectors: a bounded regex says where candidates may be; a check (Luhn, IBAN
//! mod-97, SSN ranges, digit context) keeps only the real thing.
//!
//! A longer run of digits may hold a valid number that the regex's leftmost-longest match
//! hides: `4111 1111 1111 1111 12/26` (card and expiry), `4111111111111111 123` (card and
//! CVV), `BE68 5390 0754 7034 SWIFT`. So the card and IBAN built-ins do not validate regex
//! matches: a [`Finder`] enumerates **every** substring of the detector's shape (every start
//! and every end, each on an ASCII word boundary) and keeps those whose checksum holds. The
//! other validated built-ins retry the search one character after a refused candidate, so a
//! valid number that starts inside a refused one is still found.
//!
//! Every span a built-in reports has the shape of its regex, so the regex's longest match
//! (the streaming hold-back) bounds it, and each span is decided by its own characters and
//! the one character on each side.

/// Checks a regex candidate `text[start..end]`; may look at the characters around it.
pub type Validator = fn(text: &str, start: usize, end: usize) -> bool;

/// Pushes every valid span `(start, end)` of a detector in `text`, sorted by start.
pub type Finder = fn(text: &str, out: &mut Vec<(usize, usize)>);

/// How a built-in decides what its regex found.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// Every regex match counts.
    None,
    /// A regex match counts when the validator accepts it (refused: search again one
    /// character later).
    Validate(Validator),
    /// The regex only pre-filters; the finder lists the spans.
    Find(Finder),
}

/// One built-in detector.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    /// Name used in config (`"builtin": "credit_card"`) and as the default rule name.
    pub name: &'static str,
    /// Candidate pattern (Rust `regex` syntax): matches wherever a valid span exists.
    pub pattern: &'static str,
    /// How candidates are decided.
    pub check: Check,
    /// What it finds, for the README and errors.
    pub about: &'static str,
}

/// Every built-in, in documentation order.
pub const ALL: &[Builtin] = &[
    Builtin {
        name: "credit_card",
        pattern: r"(?-u:\b)(?:[0-9][ -]?){12,18}[0-9](?-u:\b)",
        check: Check::Find(card_spans),
        about: "payment card numbers, 13-19 digits, spaces or dashes allowed, Luhn-checked, also inside longer runs of digits",
    },
    Builtin {
        name: "us_ssn",
        pattern: r"(?-u:\b)[0-9]{3}-[0-9]{2}-[0-9]{4}(?-u:\b)",
        check: Check::Validate(valid_ssn),
        about: "US social security numbers NNN-NN-NNNN (area not 000/666/9xx, group not 00, serial not 0000)",
    },
    Builtin {
        name: "email",
        pattern: r"(?-u:\b)[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,4}[A-Za-z]{2,24}(?-u:\b)",
        check: Check::None,
        about: "e-mail addresses",
    },
    Builtin {
        name: "phone",
        pattern: r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{3}\)|[0-9]{3})[ .-]?[0-9]{3}[ .-]?[0-9]{4}(?-u:\b)",
        check: Check::Validate(standalone_number),
        about: "phone numbers: 10 digits in NANP shapes ((555) 123-4567, 555.123.4567, +1 555 123 4567), not inside a longer number",
    },
    Builtin {
        name: "iban",
        pattern: r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?-u:\b)",
        check: Check::Find(iban_spans),
        about: "IBANs (country code, check digits, mod-97 checksum), spaces every 4 allowed, also followed by more groups",
    },
    Builtin {
        name: "openai_api_key",
        pattern: r"(?-u:\b)sk-[A-Za-z0-9_-]{20,200}",
        check: Check::None,
        about: "`sk-…` API keys (OpenAI, Anthropic `sk-ant-…`, project keys `sk-proj-…`)",
    },
    Builtin {
        name: "aws_access_key",
        pattern: r"(?-u:\b)(?:AKIA|ASIA)[A-Z0-9]{16}(?-u:\b)",
        check: Check::None,
        about: "AWS access key ids (AKIA…, ASIA…)",
    },
    Builtin {
        name: "private_key",
        pattern: r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[\s\S]*?-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?",
        check: Check::None,
        about: "PEM private-key blocks (the whole block when its END line is present, else the BEGIN line); unbounded, so a response rule needs max_match_len",
    },
];

/// The built-in called `name`.
pub fn find(name: &str) -> Option<&'static Builtin> {
    ALL.iter().find(|b| b.name == name)
}

/// An ASCII word character, as `(?-u:\b)` sees it (any non-ASCII byte is not one).
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn char_before(text: &str, at: usize) -> Option<char> {
    text.get(..at).and_then(|s| s.chars().next_back())
}

fn char_after(text: &str, at: usize) -> Option<char> {
    text.get(at..).and_then(|s| s.chars().next())
}

/// A word boundary before `at` (the byte before is not a word byte).
fn boundary_before(b: &[u8], at: usize) -> bool {
    at == 0 || at.checked_sub(1).and_then(|i| b.get(i)).is_none_or(|c| !is_word(*c))
}

/// A word boundary after `at` (the byte at `at` is not a word byte).
fn boundary_after(b: &[u8], at: usize) -> bool {
    b.get(at).is_none_or(|c| !is_word(*c))
}

/// Every card number in `text`: each substring of 13-19 ASCII digits, single spaces or
/// dashes allowed between digits, on word boundaries, that passes Luhn. Starts and ends are
/// all tried, so the valid number inside a longer run (card + expiry, card + CVV) is found.
pub fn card_spans(text: &str, out: &mut Vec<(usize, usize)>) {
    let b = text.as_bytes();
    let mut digits: Vec<u32> = Vec::with_capacity(19);
    for start in 0..b.len() {
        if !b.get(start).is_some_and(u8::is_ascii_digit) || !boundary_before(b, start) {
            continue;
        }
        digits.clear();
        let mut i = start;
        while let Some(&c) = b.get(i) {
            if !c.is_ascii_digit() || digits.len() == 19 {
                break;
            }
            digits.push(u32::from(c - b'0'));
            i += 1;
            if digits.len() >= 13 && boundary_after(b, i) && luhn(&digits) {
                out.push((start, i));
            }
            match b.get(i) {
                Some(n) if n.is_ascii_digit() => {}
                Some(b' ' | b'-') if b.get(i + 1).is_some_and(u8::is_ascii_digit) => i += 1,
                _ => break,
            }
        }
    }
}

/// The Luhn checksum (digits most significant first).
pub fn luhn(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                *d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Luhn over the digits of a 13-19 digit candidate.
pub fn luhn_card(text: &str, start: usize, end: usize) -> bool {
    let Some(s) = text.get(start..end) else { return false };
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    (13..=19).contains(&digits.len()) && luhn(&digits)
}

fn upper_or_digit(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit()
}

/// Every IBAN in `text`: each substring of the shape `CCdd` + 2-7 groups of 4 + an optional
/// group of 1-3 (single spaces between groups allowed), on word boundaries, that passes
/// mod-97. Every group end is tried, so an IBAN followed by more capitals or digits is found.
pub fn iban_spans(text: &str, out: &mut Vec<(usize, usize)>) {
    let b = text.as_bytes();
    let mut ends: Vec<usize> = Vec::with_capacity(32);
    for start in 0..b.len() {
        let Some(head) = b.get(start..start + 4) else { break };
        let head_ok = head.iter().take(2).all(u8::is_ascii_uppercase) && head.iter().skip(2).all(u8::is_ascii_digit);
        if !head_ok || !boundary_before(b, start) {
            continue;
        }
        ends.clear();
        let mut p = start + 4;
        for groups in 1..=7 {
            let q = if b.get(p) == Some(&b' ') { p + 1 } else { p };
            if !b.get(q..q + 4).is_some_and(|g| g.iter().all(|c| upper_or_digit(*c))) {
                break;
            }
            p = q + 4;
            if groups >= 2 {
                ends.push(p);
                let r = if b.get(p) == Some(&b' ') { p + 1 } else { p };
                for len in 1..=3 {
                    if !b.get(r..r + len).is_some_and(|g| g.iter().all(|c| upper_or_digit(*c))) {
                        break;
                    }
                    ends.push(r + len);
                }
            }
        }
        ends.sort_unstable();
        ends.dedup();
        for &end in &ends {
            if boundary_after(b, end) && valid_iban(text, start, end) {
                out.push((start, end));
            }
        }
    }
}

fn valid_ssn(text: &str, start: usize, end: usize) -> bool {
    let Some(s) = text.get(start..end) else { return false };
    let mut parts = s.split('-');
    let (Some(area), Some(group), Some(serial)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}

/// A phone candidate must not sit inside a longer run of digits (or letters).
fn standalone_number(text: &str, start: usize, end: usize) -> bool {
    let before_ok = char_before(text, start).is_none_or(|c| !c.is_ascii_alphanumeric());
    let after_ok = char_after(text, end).is_none_or(|c| !c.is_ascii_alphanumeric());
    before_ok && after_ok
}

/// IBAN: 15-34 characters without spaces, mod-97 of the rearranged number is 1.
pub fn valid_iban(text: &str, start: usize, end: usize) -> bool {
    let Some(s) = text.get(start..end) else { return false };
    let compact: Vec<char> = s.chars().filter(|c| *c != ' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.iter().chain(head.iter()) {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        rem = if v >= 10 { (rem * 100 + v) % 97 } else { (rem * 10 + v) % 97 };
    }
    rem == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{merge, GuardRule, Span};

    fn whole(f: Validator, s: &str) -> bool {
        f(s, 0, s.len())
    }

    #[test]
    fn luhn_cards() {
        assert!(whole(luhn_card, "5555 5555 5555 4444"));
        assert!(whole(luhn_card, "5105-1051-0510-5100"));
        assert!(whole(luhn_card, "4111111111111111"));
        assert!(!whole(luhn_card, "4111111111111112"));
        assert!(!whole(luhn_card, "1234"));
    }

    #[test]
    fn ssn_ranges() {
        assert!(whole(valid_ssn, "123-45-6789"));
        assert!(!whole(valid_ssn, "000-45-6789"));
        assert!(!whole(valid_ssn, "666-45-6789"));
        assert!(!whole(valid_ssn, "923-45-6789"));
        assert!(!whole(valid_ssn, "123-00-6789"));
        assert!(!whole(valid_ssn, "123-45-0000"));
    }

    #[test]
    fn iban_checksum() {
        assert!(whole(valid_iban, "GB82 WEST 1234 5698 7654 32"));
        assert!(whole(valid_iban, "DE89370400440532013000"));
        assert!(!whole(valid_iban, "DE89370400440532013001"));
    }

    #[test]
    fn phone_context() {
        let t = "call 555-123-4567 now";
        assert!(standalone_number(t, 5, 17));
        let t = "x1555-123-4567";
        assert!(!standalone_number(t, 2, 14));
    }

    #[test]
    fn every_builtin_compiles_without_unicode_word_boundaries() {
        for b in ALL {
            regex::Regex::new(b.pattern).unwrap();
            // A Unicode \b sends non-ASCII prompts to the slow engine (see README "Performance").
            let hir = regex_syntax::Parser::new().parse(b.pattern).unwrap();
            assert!(!hir.properties().look_set().contains_word_unicode(), "{}", b.name);
        }
    }

    /// What the built-in finds in `text` (merged spans), as substrings.
    fn found(name: &str, text: &str) -> Vec<String> {
        let b = find(name).unwrap();
        let rule = GuardRule::builtin_for_tests(b).unwrap();
        let spans = rule.spans(text).into_iter().map(|(start, end)| Span { start, end, rule: 0 }).collect();
        merge(spans).into_iter().map(|s| text.get(s.start..s.end).unwrap().to_string()).collect()
    }

    /// Table: (built-in, text, what must be found). Every case that holds a valid number
    /// inside a longer run is one the longest-candidate rule missed (issue 13 §3).
    #[test]
    fn builtins_find_every_valid_number() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("credit_card", "pay with 4111 1111 1111 1111 today", &["4111 1111 1111 1111"]),
            ("credit_card", "order 4111 1111 1111 1112", &[]),
            ("credit_card", "card 4111 1111 1111 1111 12/26", &["4111 1111 1111 1111"]),
            ("credit_card", "4111111111111111 123", &["4111111111111111"]),
            ("credit_card", "cvv first 123 4111111111111111", &["4111111111111111"]),
            ("credit_card", "ref 1234 5678 4111 1111 1111 1111 9999", &["4111 1111 1111 1111"]),
            ("credit_card", "5105-1051-0510-5100-77", &["5105-1051-0510-5100"]),
            ("credit_card", "two: 4111111111111111, 5555555555554444.", &["4111111111111111", "5555555555554444"]),
            // Not on a word boundary: part of a longer token, never a card.
            ("credit_card", "id41111111111111111", &[]),
            ("credit_card", "41111111111111110000", &[]),
            ("credit_card", "x4111111111111111", &[]),
            ("credit_card", "4111  1111 1111 1111", &[]),
            ("us_ssn", "ssn: 123-45-6789.", &["123-45-6789"]),
            ("us_ssn", "ssn 123-45-6789-01", &["123-45-6789"]),
            ("us_ssn", "bad 000-45-6789 good 123-45-6789", &["123-45-6789"]),
            ("us_ssn", "1123-45-6789", &[]),
            ("email", "to jane.doe+x@mail.example.co.uk,", &["jane.doe+x@mail.example.co.uk"]),
            ("phone", "call (555) 123-4567!", &["(555) 123-4567"]),
            ("phone", "id 15551234567890", &[]),
            ("phone", "x+1 555 123 4567", &["555 123 4567"]),
            ("phone", "+1 555 123 4567", &["+1 555 123 4567"]),
            ("iban", "iban GB82 WEST 1234 5698 7654 32 ok", &["GB82 WEST 1234 5698 7654 32"]),
            ("iban", "BE68 5390 0754 7034 SWIFT", &["BE68 5390 0754 7034"]),
            ("iban", "BE68 5390 0754 7034 GEBA BE BB", &["BE68 5390 0754 7034"]),
            ("iban", "DE89370400440532013000", &["DE89370400440532013000"]),
            ("iban", "DE89370400440532013001", &[]),
            ("iban", "xDE89370400440532013000", &[]),
            ("openai_api_key", "key=sk-proj-abcdefghijklmnopqrstuvwx", &["sk-proj-abcdefghijklmnopqrstuvwx"]),
            ("aws_access_key", "AKIAIOSFODNN7EXAMPLE", &["AKIAIOSFODNN7EXAMPLE"]),
            (
                "private_key",
                "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----",
                &["-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----"],
            ),
        ];
        for (name, text, want) in cases {
            let got = found(name, text);
            assert_eq!(got, *want, "{name} on {text:?}");
        }
    }

    #[test]
    fn the_regex_prefilter_matches_wherever_a_finder_finds() {
        // The RegexSet pass only asks the finder when the pattern matches somewhere.
        for b in ALL.iter().filter(|b| matches!(b.check, Check::Find(_))) {
            let re = regex::Regex::new(b.pattern).unwrap();
            for text in [
                "4111 1111 1111 1111 12/26",
                "a 4111111111111111 123",
                "BE68 5390 0754 7034 SWIFT",
                "ref 1234 5678 4111 1111 1111 1111 9999",
            ] {
                if !found(b.name, text).is_empty() {
                    assert!(re.is_match(text), "{} on {text:?}", b.name);
                }
            }
        }
    }

    #[test]
    fn finders_are_linear_on_long_runs() {
        let digits = "1".repeat(200_000);
        let spaced = "1 ".repeat(100_000);
        let t = std::time::Instant::now();
        assert!(found("credit_card", &digits).is_empty());
        let _ = found("credit_card", &spaced);
        let _ = found("iban", &"AB12 CDEF ".repeat(20_000));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
