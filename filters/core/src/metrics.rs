//! Metric names with embedded tags, and the Envoy `stats_tags` that turn them into
//! Prometheus labels.
//!
//! A wasm filter can only define flat stat names, so labels are embedded Istio-style:
//! `sluice_tokens.gen_ai_token_type=.=input;.;gen_ai_provider_name=.=openai;.;`.
//! Envoy's tag extractors (one regex per tag name, listed by [`stats_tags_yaml`]) cut each
//! `name=.=value;.;` group out of the name and make it a label, so Prometheus shows
//! `sluice_tokens{gen_ai_token_type="input",gen_ai_provider_name="openai"}`.
//! Values may contain dots (`gpt-4.1`); characters outside `[A-Za-z0-9._:/-]` become `_`.

use crate::host::Host;
use std::cell::RefCell;
use std::collections::HashMap;

/// Counter of metric updates dropped because a VM reached its cap of distinct names.
pub const DROPPED: &str = "sluice_metrics_dropped";

/// Every tag name a sluice metric may carry. No name is a suffix of another, so each
/// extractor regex matches only its own tag.
pub const TAG_NAMES: &[&str] = &[
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "gen_ai_token_type",
    "sluice_filter",
    "sluice_phase",
    "sluice_action",
    "sluice_rule",
    "sluice_reason",
    "sluice_status_class",
    "sluice_window",
    "sluice_user",
    "sluice_team",
    "sluice_currency",
];

/// Longest value kept in a tag; longer values are cut (bounded stat-name size).
pub const MAX_TAG_VALUE_LEN: usize = 64;

/// Replace characters that would break tag extraction or Prometheus output.
pub fn sanitize_tag_value(v: &str) -> String {
    let mut out: String = v
        .chars()
        .take(MAX_TAG_VALUE_LEN)
        .map(|c| if c.is_ascii_alphanumeric() || "._:/-".contains(c) { c } else { '_' })
        .collect();
    if out.is_empty() {
        out.push_str("unknown");
    }
    out
}

/// The flat stat name for `base` with `tags` embedded. Tag names must come from
/// [`TAG_NAMES`] for Envoy to extract them.
pub fn tagged_name(base: &str, tags: &[(&str, &str)]) -> String {
    let mut name = String::with_capacity(base.len() + tags.len() * 32);
    name.push_str(base);
    if !tags.is_empty() {
        name.push('.');
    }
    for (k, v) in tags {
        name.push_str(k);
        name.push_str("=.=");
        name.push_str(&sanitize_tag_value(v));
        name.push_str(";.;");
    }
    name
}

/// The RE2 regex Envoy needs to extract `tag` (first capture group is removed from the
/// name, second is the value). The optional leading dot covers the first tag.
pub fn stats_tag_regex(tag: &str) -> String {
    format!("(\\.?{tag}=\\.=(.*?);\\.;)")
}

/// The `stats_config.stats_tags` list for an Envoy bootstrap, as YAML (indented for
/// placement under `stats_config:`).
pub fn stats_tags_yaml() -> String {
    let mut out = String::from("  stats_tags:\n");
    for t in TAG_NAMES {
        // YAML double-quoted string: each backslash doubled.
        let re = stats_tag_regex(t).replace('\\', "\\\\");
        out.push_str(&format!("  - {{ tag_name: {t}, regex: \"{re}\" }}\n"));
    }
    out
}

/// The kind of a metric, mirroring proxy-wasm's metric types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// Monotonic counter.
    Counter,
    /// Up/down gauge.
    Gauge,
    /// Histogram of recorded values.
    Histogram,
}

/// Per-VM cache of metric ids, so `define_metric` runs once per distinct name.
/// Bounded: past `max_names` distinct names, new names are not recorded (and counted in
/// [`DROPPED`] so the loss is visible).
#[derive(Debug, Default)]
pub struct MetricIds {
    ids: HashMap<String, u32>,
    max_names: usize,
}

impl MetricIds {
    /// A cache holding at most `max_names` distinct names.
    pub fn new(max_names: usize) -> Self {
        Self { ids: HashMap::new(), max_names }
    }

    /// The cached id for `name`, defining it through `define` on first use.
    /// Returns `None` when the host refused or the cache is full.
    pub fn get_or_define(&mut self, name: &str, define: impl FnOnce(&str) -> Option<u32>) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        if self.ids.len() >= self.max_names {
            return None;
        }
        let id = define(name)?;
        self.ids.insert(name.to_string(), id);
        Some(id)
    }

    /// Number of distinct names defined.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when nothing is defined yet.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The one metrics helper: defines each name once per VM (cached id) and updates it.
/// Interior mutability is local to each call (no borrow is held across host calls that could
/// re-enter), so it is never busy.
#[derive(Debug)]
pub struct Metrics {
    ids: RefCell<MetricIds>,
    dropped: RefCell<Option<u32>>,
}

impl Metrics {
    /// At most `max_names` distinct names per VM.
    pub fn new(max_names: usize) -> Self {
        Self { ids: RefCell::new(MetricIds::new(max_names)), dropped: RefCell::new(None) }
    }

    fn id(&self, host: &mut dyn Host, kind: MetricKind, name: &str) -> Option<u32> {
        let found = match self.ids.try_borrow_mut() {
            Ok(mut ids) => ids.get_or_define(name, |n| host.define_metric(kind, n)),
            Err(_) => None,
        };
        if found.is_none() {
            let id = match self.dropped.try_borrow_mut() {
                Ok(mut d) => {
                    *d.get_or_insert_with(|| host.define_metric(MetricKind::Counter, DROPPED).unwrap_or(u32::MAX))
                }
                Err(_) => u32::MAX,
            };
            if id != u32::MAX {
                host.increment_metric(id, 1);
            }
        }
        found
    }

    /// Add `by` to the counter `base` with `tags`.
    pub fn count(&self, host: &mut dyn Host, base: &str, tags: &[(&str, &str)], by: u64) {
        let name = tagged_name(base, tags);
        if let Some(id) = self.id(host, MetricKind::Counter, &name) {
            host.increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }

    /// Record `value` in the histogram `base` with `tags`.
    pub fn record(&self, host: &mut dyn Host, base: &str, tags: &[(&str, &str)], value: u64) {
        let name = tagged_name(base, tags);
        if let Some(id) = self.id(host, MetricKind::Histogram, &name) {
            host.record_metric(id, value);
        }
    }

    /// Add `by` (may be negative) to the gauge `base` with `tags`.
    pub fn gauge(&self, host: &mut dyn Host, base: &str, tags: &[(&str, &str)], by: i64) {
        let name = tagged_name(base, tags);
        if let Some(id) = self.id(host, MetricKind::Gauge, &name) {
            host.increment_metric(id, by);
        }
    }

    /// Distinct names defined so far.
    pub fn len(&self) -> usize {
        self.ids.try_borrow().map_or(0, |i| i.len())
    }

    /// True when nothing is defined yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bounds a label to values the operator declared (e.g. the models the gateway serves):
/// anything else is reported as `other`, so client input cannot create series.
#[derive(Debug, Clone, Default)]
pub struct KnownValues {
    values: Vec<String>,
    /// Prefix patterns (`gpt-4o*`).
    prefixes: Vec<String>,
}

impl KnownValues {
    /// Values and `prefix*` patterns.
    pub fn new(items: &[String]) -> Self {
        let mut out = Self::default();
        for i in items {
            match i.strip_suffix('*') {
                Some(p) => out.prefixes.push(p.to_string()),
                None => out.values.push(i.clone()),
            }
        }
        out
    }

    /// Add a value learnt from trusted config (route or endpoint metadata).
    pub fn learn(&mut self, v: &str) {
        if !v.is_empty() && !self.values.iter().any(|x| x == v) && self.values.len() < 4096 {
            self.values.push(v.to_string());
        }
    }

    /// Whether `v` is known.
    pub fn contains(&self, v: &str) -> bool {
        self.values.iter().any(|x| x == v) || self.prefixes.iter().any(|p| v.starts_with(p.as_str()))
    }

    /// The label for `v`: itself when known, else `other`.
    pub fn label<'a>(&self, v: &'a str) -> &'a str {
        if self.contains(v) {
            v
        } else {
            "other"
        }
    }
}

/// Caps the distinct values one label may take (user and team labels), so a hostile caller
/// cannot grow the stats without bound. Values past the cap are reported as `other`.
#[derive(Debug, Default)]
pub struct LabelCap {
    seen: std::collections::HashSet<String>,
    max: usize,
}

impl LabelCap {
    /// A cap of `max` distinct values.
    pub fn new(max: usize) -> Self {
        Self { seen: std::collections::HashSet::new(), max }
    }

    /// The value to use for `v`: itself while under the cap or already seen, else `other`.
    pub fn admit(&mut self, v: &str) -> String {
        let v = sanitize_tag_value(v);
        if self.seen.contains(&v) {
            return v;
        }
        if self.seen.len() < self.max {
            self.seen.insert(v.clone());
            return v;
        }
        "other".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_names() {
        assert_eq!(
            tagged_name("sluice_tokens", &[("gen_ai_token_type", "input"), ("gen_ai_request_model", "gpt-4.1")]),
            "sluice_tokens.gen_ai_token_type=.=input;.;gen_ai_request_model=.=gpt-4.1;.;"
        );
        assert_eq!(tagged_name("sluice_requests", &[]), "sluice_requests");
    }

    #[test]
    fn sanitizes_values() {
        assert_eq!(sanitize_tag_value("gpt-4o mini;.;x=.=y"), "gpt-4o_mini_._x_._y");
        assert_eq!(sanitize_tag_value(""), "unknown");
        assert_eq!(sanitize_tag_value(&"a".repeat(500)).len(), MAX_TAG_VALUE_LEN);
        assert_eq!(sanitize_tag_value("qwen:0.5b"), "qwen:0.5b");
    }

    #[test]
    fn no_tag_name_is_a_suffix_of_another() {
        for a in TAG_NAMES {
            for b in TAG_NAMES {
                if a != b {
                    assert!(!b.ends_with(a), "{a} is a suffix of {b}: its extractor would match both");
                }
            }
        }
    }

    #[test]
    fn yaml_lists_every_tag() {
        let y = stats_tags_yaml();
        for t in TAG_NAMES {
            assert!(y.contains(&format!("tag_name: {t},")), "{t}");
        }
        assert!(y.contains(r#"regex: "(\\.?gen_ai_token_type=\\.=(.*?);\\.;)""#), "{y}");
    }

    #[test]
    fn envoy_bootstrap_carries_the_stats_tags() {
        // envoy/stats-tags.yaml is the copy every example pastes; keep it in sync.
        // Compiled in: a missing file fails the build, and the test also runs inside the wasm
        // runtime, which has no file system.
        let text = include_str!("../../../envoy/stats-tags.yaml");
        assert!(
            text.contains(&stats_tags_yaml()),
            "envoy/stats-tags.yaml is out of date; regenerate with the text of stats_tags_yaml()"
        );
    }

    #[test]
    fn ids_are_cached_and_bounded() {
        let mut ids = MetricIds::new(2);
        let mut calls = 0;
        let mut def = |_: &str| {
            calls += 1;
            Some(calls)
        };
        assert_eq!(ids.get_or_define("a", &mut def), Some(1));
        assert_eq!(ids.get_or_define("a", &mut def), Some(1));
        assert_eq!(ids.get_or_define("b", &mut def), Some(2));
        assert_eq!(ids.get_or_define("c", &mut def), None);
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn metrics_helper_defines_once_and_reports_drops() {
        let mut h = crate::host::FakeHost::default();
        let m = Metrics::new(1);
        m.count(&mut h, "a", &[("sluice_action", "x")], 2);
        m.count(&mut h, "a", &[("sluice_action", "x")], 3);
        assert_eq!(h.metric("a.sluice_action=.=x;.;"), Some(5));
        m.count(&mut h, "b", &[], 1);
        assert_eq!(h.metric("b"), None);
        assert_eq!(h.metric(DROPPED), Some(1));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn known_values_bound_labels() {
        let mut k = KnownValues::new(&["gpt-4o".into(), "llama*".into()]);
        assert_eq!(k.label("gpt-4o"), "gpt-4o");
        assert_eq!(k.label("llama-3.1-8b"), "llama-3.1-8b");
        assert_eq!(k.label("random-xyz"), "other");
        k.learn("random-xyz");
        assert_eq!(k.label("random-xyz"), "random-xyz");
    }

    #[test]
    fn label_cap() {
        let mut cap = LabelCap::new(2);
        assert_eq!(cap.admit("alice"), "alice");
        assert_eq!(cap.admit("bob"), "bob");
        assert_eq!(cap.admit("mallory"), "other");
        assert_eq!(cap.admit("alice"), "alice");
    }
}
