//! Compiled guard rules.
//!
//! Scanning is two passes. The pre-filter: one `RegexSet` pass over **all** texts of a body
//! joined with `\n` finds the rules that may match anywhere (most bodies match none, and then
//! nothing else runs: one scan instead of one per text, which matters for bodies with many
//! small texts such as tool schemas). Then, per text, only those rules run, with their own
//! regexes and checks, to decide and to find the spans to mask. Joining with `\n` keeps every
//! match of a single text a match of the joined text (`\n` is a non-word character and a
//! line end, as a text edge is) except for patterns anchored to the whole text (`^`, `$`,
//! `\A`, `\z` without `(?m)`): a rule set holding one is scanned per text, as before.

#[cfg(test)]
use crate::builtins::Builtin;
use crate::builtins::Check;
use regex::{Regex, RegexSet};

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    /// Refuse the request with this status and message (OpenAI-style error).
    Reject {
        /// HTTP status (default 403).
        status: u32,
        /// Message in the error body.
        message: String,
    },
    /// Replace every match before it goes on.
    Mask(Replacement),
}

/// How a masked match is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replacement {
    /// Every character of the match becomes this character (`X` by default).
    EachChar(char),
    /// The whole match becomes this text.
    Text(String),
}

impl Replacement {
    /// Append the replacement of `matched` to `out`.
    pub fn apply(&self, matched: &str, out: &mut String) {
        match self {
            Replacement::EachChar(c) => out.extend(std::iter::repeat_n(*c, matched.chars().count())),
            Replacement::Text(t) => out.push_str(t),
        }
    }
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct GuardRule {
    /// Name (metrics, filter state, logs).
    pub name: String,
    /// Reject or mask.
    pub action: RuleAction,
    /// The rule's own regex (the same pattern as its `RegexSet` entry).
    pub regex: Regex,
    /// How candidates are decided (built-ins).
    pub check: Check,
    /// Longest match in bytes, when bounded (computed or configured).
    pub max_match_len: Option<usize>,
}

impl GuardRule {
    /// Whether the rule masks.
    pub fn masks(&self) -> bool {
        matches!(self.action, RuleAction::Mask(_))
    }

    /// Every valid span of this rule in `text`, sorted by start (may overlap).
    pub fn spans(&self, text: &str) -> Vec<(usize, usize)> {
        self.spans_from(text, 0)
    }

    /// Every valid span starting at or after `from`; the text before `from` is context only
    /// (look-behind such as `\b`, validators that look at the character before).
    pub fn spans_from(&self, text: &str, from: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        match self.check {
            Check::Find(f) => {
                f(text, &mut out);
                out.retain(|(s, _)| *s >= from);
            }
            Check::None | Check::Validate(_) => {
                let mut at = from;
                while at <= text.len() {
                    let Some(m) = self.regex.find_at(text, at) else { break };
                    let ok = match self.check {
                        Check::Validate(v) => m.start() < m.end() && v(text, m.start(), m.end()),
                        _ => true,
                    };
                    if ok && m.start() < m.end() {
                        out.push((m.start(), m.end()));
                        at = m.end();
                    } else {
                        // Refused (or empty): a valid candidate may start inside it.
                        at = next_char(text, m.start());
                    }
                }
            }
        }
        out.retain(|(s, e)| s < e);
        out
    }

    /// True when the rule has at least one valid match in `text`.
    pub fn has_match(&self, text: &str) -> bool {
        self.has_match_from(text, 0)
    }

    /// True when the rule has a valid match starting at or after `from`.
    pub fn has_match_from(&self, text: &str, from: usize) -> bool {
        match self.check {
            Check::None => self.regex.is_match_at(text, from),
            _ => !self.spans_from(text, from).is_empty(),
        }
    }

    /// A mask rule for a built-in (tests).
    #[cfg(test)]
    pub fn builtin_for_tests(b: &Builtin) -> Option<Self> {
        Some(Self {
            name: b.name.to_string(),
            action: RuleAction::Mask(Replacement::EachChar('X')),
            regex: Regex::new(b.pattern).ok()?,
            check: b.check,
            max_match_len: None,
        })
    }
}

/// The byte offset of the character after the one at `at`.
fn next_char(text: &str, at: usize) -> usize {
    let mut n = at.saturating_add(1);
    while n < text.len() && !text.is_char_boundary(n) {
        n += 1;
    }
    n
}

/// A span to replace: `[start, end)` and the rule that found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Byte offset of the first masked byte.
    pub start: usize,
    /// Byte offset after the last masked byte.
    pub end: usize,
    /// Index of the rule.
    pub rule: usize,
}

/// The rules of one phase of one policy.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<GuardRule>,
    set: Option<RegexSet>,
    /// No pattern is anchored to the whole text: the joined pre-filter is exact.
    joinable: bool,
}

/// What one scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// Indices of matched rules, in rule order.
    pub matched: Vec<usize>,
}

/// Whether a pattern is anchored to the start or end of the whole text.
pub fn anchored_to_text(pattern: &str) -> bool {
    use regex_syntax::hir::Look;
    regex_syntax::Parser::new().parse(pattern).map_or(true, |h| {
        let looks = h.properties().look_set();
        looks.contains(Look::Start) || looks.contains(Look::End)
    })
}

impl RuleSet {
    /// Compile the set. `rules` must already have compiled regexes; the patterns are given
    /// again so the set uses the identical syntax.
    pub fn new(rules: Vec<GuardRule>, patterns: &[String]) -> Result<Self, regex::Error> {
        let set = if patterns.is_empty() { None } else { Some(RegexSet::new(patterns)?) };
        let joinable = !patterns.iter().any(|p| anchored_to_text(p));
        Ok(Self { rules, set, joinable })
    }

    /// An empty set.
    pub fn empty() -> Self {
        Self { rules: Vec::new(), set: None, joinable: true }
    }

    /// The rules, in config order.
    pub fn rules(&self) -> &[GuardRule] {
        &self.rules
    }

    /// A rule by index.
    pub fn rule(&self, i: usize) -> Option<&GuardRule> {
        self.rules.get(i)
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True when some rule masks.
    pub fn has_mask_rules(&self) -> bool {
        self.rules.iter().any(GuardRule::masks)
    }

    /// Whether the joined pre-filter may be used ([`RuleSet::candidates`]).
    pub fn joinable(&self) -> bool {
        self.joinable
    }

    /// Longest possible match of any mask rule, in bytes (the streaming hold-back).
    pub fn max_mask_len(&self) -> usize {
        self.rules.iter().filter(|r| r.masks()).filter_map(|r| r.max_match_len).max().unwrap_or(0)
    }

    /// Rules whose pattern matches somewhere in `joined` (all texts joined with `\n`): the
    /// only ones that can match any single text. One set pass.
    pub fn candidates(&self, joined: &str) -> Vec<usize> {
        match &self.set {
            Some(set) => set.matches(joined).iter().collect(),
            None => Vec::new(),
        }
    }

    /// Rules with a valid match in `text`: one set pass, then only the candidates' checks.
    pub fn scan(&self, text: &str) -> Findings {
        self.scan_from(text, 0)
    }

    /// Like [`RuleSet::scan`], for matches starting at or after `from` (the text before is
    /// context: a stream's text already sent).
    pub fn scan_from(&self, text: &str, from: usize) -> Findings {
        let Some(set) = &self.set else { return Findings::default() };
        let hits = set.matches_at(text, from);
        if !hits.matched_any() {
            return Findings::default();
        }
        let matched = hits
            .iter()
            .filter(|i| {
                self.rules.get(*i).is_some_and(|r| matches!(r.check, Check::None) || r.has_match_from(text, from))
            })
            .collect();
        Findings { matched }
    }

    /// Rules among `candidates` (from [`RuleSet::candidates`]) with a valid match in `text`.
    pub fn scan_among(&self, text: &str, candidates: &[usize]) -> Findings {
        let matched =
            candidates.iter().copied().filter(|i| self.rules.get(*i).is_some_and(|r| r.has_match(text))).collect();
        Findings { matched }
    }

    /// Spans of the mask rules among `matched`, sorted, overlaps merged (the span that starts
    /// first, the longest at equal starts, decides the replacement).
    pub fn mask_spans(&self, text: &str, matched: &[usize]) -> Vec<Span> {
        self.mask_spans_from(text, matched, 0)
    }

    /// Like [`RuleSet::mask_spans`], for spans starting at or after `from`.
    pub fn mask_spans_from(&self, text: &str, matched: &[usize], from: usize) -> Vec<Span> {
        let mut spans = Vec::new();
        for &i in matched {
            let Some(rule) = self.rules.get(i) else { continue };
            if !rule.masks() {
                continue;
            }
            spans.extend(rule.spans_from(text, from).into_iter().map(|(start, end)| Span { start, end, rule: i }));
        }
        merge(spans)
    }

    /// `text` with `spans` replaced (spans sorted, disjoint, within `text`).
    pub fn apply_spans(&self, text: &str, spans: &[Span]) -> String {
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for s in spans {
            let (Some(keep), Some(hit)) = (text.get(at..s.start), text.get(s.start..s.end)) else { continue };
            out.push_str(keep);
            match self.rules.get(s.rule).map(|r| &r.action) {
                Some(RuleAction::Mask(rep)) => rep.apply(hit, &mut out),
                _ => out.push_str(hit),
            }
            at = s.end;
        }
        out.push_str(text.get(at..).unwrap_or_default());
        out
    }

    /// The replacement of rule `i` (mask rules).
    pub fn replacement(&self, i: usize) -> Option<&Replacement> {
        match self.rules.get(i).map(|r| &r.action) {
            Some(RuleAction::Mask(rep)) => Some(rep),
            _ => None,
        }
    }

    /// Mask `text`: the masked text and the rules that masked, or `None` when nothing matched.
    pub fn mask(&self, text: &str) -> Option<(String, Vec<usize>)> {
        let found = self.scan(text);
        if found.matched.is_empty() {
            return None;
        }
        let spans = self.mask_spans(text, &found.matched);
        if spans.is_empty() {
            return None;
        }
        let mut rules: Vec<usize> = spans.iter().map(|s| s.rule).collect();
        rules.sort_unstable();
        rules.dedup();
        Some((self.apply_spans(text, &spans), rules))
    }
}

/// Sort spans and merge overlaps.
pub fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
    let mut merged: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans {
        match merged.last_mut() {
            Some(last) if s.start < last.end => last.end = last.end.max(s.end),
            _ => merged.push(s),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn one_set_pass_then_spans_merged() {
        let c = Config::from_json(
            br##"{"policies":{"p":{"request_rules":[
                {"name":"digits","regex":"[0-9]{4}","action":"mask","mask_char":"#"},
                {"name":"card","builtin":"credit_card","action":"mask","replacement":"[card]"},
                {"name":"bad","phrase":"forbidden","case_insensitive":true,"action":"reject"}]}}}"##,
        )
        .unwrap();
        let rules = &c.policy("p").unwrap().request;
        assert!(rules.scan("nothing here").matched.is_empty());
        assert_eq!(rules.scan("FORBIDDEN").matched, vec![2]);
        // Overlapping spans merge; the span starting first (the longest at equal starts) decides
        // the replacement.
        let (masked, applied) = rules.mask("a 4111111111111111 b 1234").unwrap();
        assert_eq!(masked, "a [card] b ####");
        assert_eq!(applied, vec![0, 1]);
        let (masked, _) = rules.mask("x 4111 1111 1111 1111").unwrap();
        assert_eq!(masked, "x [card]");
        assert_eq!(rules.mask("nothing"), None);
        assert_eq!(rules.max_mask_len(), 37);
        assert!(rules.joinable());
        assert_eq!(rules.candidates("hello\nsay forbidden\n1234"), vec![0, 2]);
        assert_eq!(rules.scan_among("1234", &[0, 2]).matched, vec![0]);
    }

    #[test]
    fn anchored_patterns_disable_the_joined_prefilter() {
        for (pattern, anchored) in
            [("^secret", true), ("secret$", true), ("\\Asecret", true), ("(?m)^secret", false), ("\\bsecret\\b", false)]
        {
            assert_eq!(super::anchored_to_text(pattern), anchored, "{pattern}");
        }
        let c = Config::from_json(
            br#"{"policies":{"p":{"request_rules":[{"name":"a","regex":"^secret","action":"reject"}]}}}"#,
        )
        .unwrap();
        assert!(!c.policy("p").unwrap().request.joinable());
    }
}
