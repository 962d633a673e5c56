//! Compiled guard rules: one `RegexSet` pass per text finds which rules may match; only
//! those rules' own regexes then run, to validate candidates and find spans to mask.

use crate::builtins::Validator;
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
    fn apply(&self, matched: &str, out: &mut String) {
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
    /// Extra candidate check (built-ins).
    pub validator: Option<Validator>,
    /// Longest match in bytes, when bounded (computed or configured).
    pub max_match_len: Option<usize>,
}

impl GuardRule {
    fn accepts(&self, text: &str, start: usize, end: usize) -> bool {
        self.validator.is_none_or(|v| v(text, start, end))
    }

    /// True when the rule has at least one valid match in `text`.
    fn has_match(&self, text: &str) -> bool {
        if self.validator.is_none() {
            return true; // the set already said so
        }
        self.regex.find_iter(text).any(|m| self.accepts(text, m.start(), m.end()))
    }
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
}

/// What one scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// Indices of matched rules, in rule order.
    pub matched: Vec<usize>,
}

impl RuleSet {
    /// Compile the set. `rules` must already have compiled regexes; the patterns are given
    /// again so the set uses the identical syntax.
    pub fn new(rules: Vec<GuardRule>, patterns: &[String]) -> Result<Self, regex::Error> {
        let set = if patterns.is_empty() { None } else { Some(RegexSet::new(patterns)?) };
        Ok(Self { rules, set })
    }

    /// An empty set.
    pub fn empty() -> Self {
        Self { rules: Vec::new(), set: None }
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
        self.rules.iter().any(|r| matches!(r.action, RuleAction::Mask(_)))
    }

    /// Longest possible match of any mask rule, in bytes (the streaming hold-back).
    pub fn max_mask_len(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| matches!(r.action, RuleAction::Mask(_)))
            .filter_map(|r| r.max_match_len)
            .max()
            .unwrap_or(0)
    }

    /// Rules with a valid match in `text`: one set pass, then only the candidates' regexes
    /// when they have a validator.
    pub fn scan(&self, text: &str) -> Findings {
        let Some(set) = &self.set else { return Findings::default() };
        let hits = set.matches(text);
        if !hits.matched_any() {
            return Findings::default();
        }
        let matched = hits.iter().filter(|i| self.rules.get(*i).is_some_and(|r| r.has_match(text))).collect();
        Findings { matched }
    }

    /// Spans of the mask rules among `matched`, sorted, overlaps merged (the span that starts
    /// first, the longest at equal starts, decides the replacement).
    pub fn mask_spans(&self, text: &str, matched: &[usize]) -> Vec<Span> {
        let mut spans = Vec::new();
        for &i in matched {
            let Some(rule) = self.rules.get(i) else { continue };
            if !matches!(rule.action, RuleAction::Mask(_)) {
                continue;
            }
            for m in rule.regex.find_iter(text) {
                if m.start() < m.end() && rule.accepts(text, m.start(), m.end()) {
                    spans.push(Span { start: m.start(), end: m.end(), rule: i });
                }
            }
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
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
        let rules = &c.policies["p"].request;
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
    }
}
