//! Built-in detectors: a bounded regex finds candidates, a validator (Luhn, IBAN mod-97,
//! SSN ranges, digit context) drops look-alikes that are not the real thing.

/// Checks a candidate match `text[start..end]`; may look at the characters around it.
pub type Validator = fn(text: &str, start: usize, end: usize) -> bool;

/// One built-in detector.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    /// Name used in config (`"builtin": "credit_card"`) and as the default rule name.
    pub name: &'static str,
    /// Candidate pattern (Rust `regex` syntax).
    pub pattern: &'static str,
    /// Extra check on each candidate.
    pub validator: Option<Validator>,
    /// What it finds, for the README and errors.
    pub about: &'static str,
}

/// Every built-in, in documentation order.
pub const ALL: &[Builtin] = &[
    Builtin {
        name: "credit_card",
        pattern: r"(?-u:\b)(?:[0-9][ -]?){12,18}[0-9](?-u:\b)",
        validator: Some(luhn_card),
        about: "payment card numbers, 13-19 digits, spaces or dashes allowed, Luhn-checked",
    },
    Builtin {
        name: "us_ssn",
        pattern: r"(?-u:\b)[0-9]{3}-[0-9]{2}-[0-9]{4}(?-u:\b)",
        validator: Some(valid_ssn),
        about: "US social security numbers NNN-NN-NNNN (area not 000/666/9xx, group not 00, serial not 0000)",
    },
    Builtin {
        name: "email",
        pattern: r"(?-u:\b)[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,4}[A-Za-z]{2,24}(?-u:\b)",
        validator: None,
        about: "e-mail addresses",
    },
    Builtin {
        name: "phone",
        pattern: r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{3}\)|[0-9]{3})[ .-]?[0-9]{3}[ .-]?[0-9]{4}(?-u:\b)",
        validator: Some(standalone_number),
        about: "phone numbers: 10 digits in NANP shapes ((555) 123-4567, 555.123.4567, +1 555 123 4567), not inside a longer number",
    },
    Builtin {
        name: "iban",
        pattern: r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?-u:\b)",
        validator: Some(valid_iban),
        about: "IBANs (country code, check digits, mod-97 checksum), spaces every 4 allowed",
    },
    Builtin {
        name: "openai_api_key",
        pattern: r"(?-u:\b)sk-[A-Za-z0-9_-]{20,200}",
        validator: None,
        about: "`sk-…` API keys (OpenAI, Anthropic `sk-ant-…`, project keys `sk-proj-…`)",
    },
    Builtin {
        name: "aws_access_key",
        pattern: r"(?-u:\b)(?:AKIA|ASIA)[A-Z0-9]{16}(?-u:\b)",
        validator: None,
        about: "AWS access key ids (AKIA…, ASIA…)",
    },
    Builtin {
        name: "private_key",
        pattern: r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[\s\S]*?-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?",
        validator: None,
        about: "PEM private-key blocks (the whole block when its END line is present, else the BEGIN line); unbounded, so a response rule needs max_match_len",
    },
];

/// The built-in called `name`.
pub fn find(name: &str) -> Option<&'static Builtin> {
    ALL.iter().find(|b| b.name == name)
}

fn char_before(text: &str, at: usize) -> Option<char> {
    text.get(..at).and_then(|s| s.chars().next_back())
}

fn char_after(text: &str, at: usize) -> Option<char> {
    text.get(at..).and_then(|s| s.chars().next())
}

/// Luhn over the digits of a 13-19 digit candidate.
pub fn luhn_card(text: &str, start: usize, end: usize) -> bool {
    let Some(s) = text.get(start..end) else { return false };
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    luhn(&digits)
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
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

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

    #[test]
    fn builtins_find_what_they_claim() {
        let cases = [
            ("credit_card", "pay with 4111 1111 1111 1111 today", Some("4111 1111 1111 1111")),
            ("credit_card", "order 4111 1111 1111 1112", None),
            ("us_ssn", "ssn: 123-45-6789.", Some("123-45-6789")),
            ("email", "to jane.doe+x@mail.example.co.uk,", Some("jane.doe+x@mail.example.co.uk")),
            ("phone", "call (555) 123-4567!", Some("(555) 123-4567")),
            ("phone", "id 15551234567890", None),
            ("iban", "iban GB82 WEST 1234 5698 7654 32 ok", Some("GB82 WEST 1234 5698 7654 32")),
            ("openai_api_key", "key=sk-proj-abcdefghijklmnopqrstuvwx", Some("sk-proj-abcdefghijklmnopqrstuvwx")),
            ("aws_access_key", "AKIAIOSFODNN7EXAMPLE", Some("AKIAIOSFODNN7EXAMPLE")),
            (
                "private_key",
                "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----",
                Some("-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----"),
            ),
        ];
        for (name, text, want) in cases {
            let b = find(name).unwrap();
            let re = regex::Regex::new(b.pattern).unwrap();
            let got = re
                .find_iter(text)
                .find(|m| b.validator.is_none_or(|v| v(text, m.start(), m.end())))
                .map(|m| m.as_str());
            assert_eq!(got, want, "{name} on {text:?}");
        }
    }
}
