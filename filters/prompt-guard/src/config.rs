//! Configuration: strict serde read (`RawConfig`), then `Config::try_from` compiles the
//! rules of every policy and checks that response rules have a bounded match length.

use crate::builtins;
use crate::rules::{GuardRule, Replacement, RuleAction, RuleSet};
use serde::Deserialize;
use sluice_core::config::{de_opt_duration, parse_json_config, ConfigError, FailureMode};
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

/// Filter name used in logs and error messages.
pub const FILTER: &str = "prompt-guard";
/// Default request/response body cap (bytes).
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
/// Largest `max_match_len` accepted (bytes): the streaming hold-back.
pub const MAX_HOLD_BACK: usize = 64 * 1024;

/// The plugin configuration as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Named policies.
    pub policies: BTreeMap<String, RawPolicy>,
    /// Policy for routes without the metadata key; none = such routes are not guarded.
    #[serde(default)]
    pub default_policy: Option<String>,
    /// Route metadata key (namespace `sluice`) naming the policy.
    #[serde(default)]
    pub route_metadata_key: Option<String>,
    /// Request body cap in bytes (413 above it).
    #[serde(default)]
    pub max_request_bytes: Option<usize>,
    /// Buffered (non-streaming) response body cap in bytes.
    #[serde(default)]
    pub max_response_bytes: Option<usize>,
}

/// One policy as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Message roles inspected on the request; absent = every role.
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// Rules applied to the request.
    #[serde(default)]
    pub request_rules: Vec<RawRule>,
    /// Rules applied to the response (mask only).
    #[serde(default)]
    pub response_rules: Vec<RawRule>,
    /// Count what would happen, change nothing.
    #[serde(default)]
    pub shadow: bool,
    /// Optional external check of the request.
    #[serde(default)]
    pub webhook: Option<RawWebhook>,
}

/// One rule as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Rule name (defaults to the built-in's name).
    #[serde(default)]
    pub name: Option<String>,
    /// A regular expression (Rust `regex` syntax).
    #[serde(default)]
    pub regex: Option<String>,
    /// One literal phrase.
    #[serde(default)]
    pub phrase: Option<String>,
    /// Several literal phrases.
    #[serde(default)]
    pub phrases: Option<Vec<String>>,
    /// A built-in detector name.
    #[serde(default)]
    pub builtin: Option<String>,
    /// Match regardless of case.
    #[serde(default)]
    pub case_insensitive: bool,
    /// `reject` or `mask`.
    pub action: RawAction,
    /// Reject status (default 403).
    #[serde(default)]
    pub status: Option<u32>,
    /// Reject message.
    #[serde(default)]
    pub message: Option<String>,
    /// Mask: replace the whole match with this text.
    #[serde(default)]
    pub replacement: Option<String>,
    /// Mask: replace each character with this one (default `X`).
    #[serde(default)]
    pub mask_char: Option<char>,
    /// Longest match in bytes, required for unbounded patterns in response rules.
    #[serde(default)]
    pub max_match_len: Option<usize>,
}

/// Rule action as written.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawAction {
    /// Refuse.
    #[default]
    Reject,
    /// Replace matches.
    Mask,
}

/// Webhook as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    /// Envoy cluster.
    pub cluster: String,
    /// Request path (default `/check`).
    #[serde(default)]
    pub path: Option<String>,
    /// `:authority` (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Timeout (default 1s).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    /// `deny` (default) or `allow` when the webhook fails.
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
}

/// The external check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Envoy cluster.
    pub cluster: String,
    /// Path.
    pub path: String,
    /// Authority.
    pub authority: String,
    /// Timeout.
    pub timeout: Duration,
    /// What to do when it fails.
    pub failure_mode: FailureMode,
}

/// One compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Name.
    pub name: String,
    /// Roles inspected (`None` = all).
    pub roles: Option<Vec<String>>,
    /// Request rules.
    pub request: RuleSet,
    /// Response rules (mask only, bounded).
    pub response: RuleSet,
    /// Shadow mode.
    pub shadow: bool,
    /// External check.
    pub webhook: Option<Webhook>,
}

/// The compiled configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Policies by name.
    pub policies: BTreeMap<String, Rc<Policy>>,
    /// Default policy name.
    pub default_policy: Option<String>,
    /// Route metadata key.
    pub route_metadata_key: String,
    /// Request body cap.
    pub max_request_bytes: usize,
    /// Buffered response body cap.
    pub max_response_bytes: usize,
}

impl Config {
    /// Parse and compile the plugin configuration.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_json_config(bytes)?;
        Self::try_from(raw)
    }

    /// The policy for a route: its metadata value, else the default.
    pub fn policy_for(&self, route_value: Option<&str>) -> Result<Option<Rc<Policy>>, String> {
        match route_value.or(self.default_policy.as_deref()) {
            None => Ok(None),
            Some(name) => self.policies.get(name).cloned().map(Some).ok_or_else(|| name.to_string()),
        }
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        if raw.policies.is_empty() {
            return Err(ConfigError::new("policies", "at least one policy is required"));
        }
        let mut policies = BTreeMap::new();
        for (name, p) in raw.policies {
            let field = format!("policies.{name}");
            if name.is_empty() {
                return Err(ConfigError::new("policies", "policy names must not be empty"));
            }
            let policy = compile_policy(&name, p).map_err(|e| e.within(&field))?;
            policies.insert(name, Rc::new(policy));
        }
        if let Some(d) = &raw.default_policy {
            if !policies.contains_key(d) {
                return Err(ConfigError::new("default_policy", format!("no policy named {d:?}")));
            }
        }
        let key = raw.route_metadata_key.unwrap_or_else(|| "guard_policy".to_string());
        if key.is_empty() {
            return Err(ConfigError::new("route_metadata_key", "must not be empty"));
        }
        let max_request_bytes = raw.max_request_bytes.unwrap_or(DEFAULT_MAX_BODY);
        let max_response_bytes = raw.max_response_bytes.unwrap_or(DEFAULT_MAX_BODY);
        if max_request_bytes == 0 {
            return Err(ConfigError::new("max_request_bytes", "must be greater than 0"));
        }
        if max_response_bytes == 0 {
            return Err(ConfigError::new("max_response_bytes", "must be greater than 0"));
        }
        Ok(Config {
            policies,
            default_policy: raw.default_policy,
            route_metadata_key: key,
            max_request_bytes,
            max_response_bytes,
        })
    }
}

fn compile_policy(name: &str, p: RawPolicy) -> Result<Policy, ConfigError> {
    if let Some(roles) = &p.roles {
        if roles.is_empty() {
            return Err(ConfigError::new("roles", "must list at least one role (omit it to inspect every role)"));
        }
    }
    let request = compile_rules(p.request_rules, false).map_err(|e| e.within("request_rules"))?;
    let response = compile_rules(p.response_rules, true).map_err(|e| e.within("response_rules"))?;
    let webhook = p.webhook.map(compile_webhook).transpose().map_err(|e| e.within("webhook"))?;
    Ok(Policy { name: name.to_string(), roles: p.roles, request, response, shadow: p.shadow, webhook })
}

fn compile_webhook(w: RawWebhook) -> Result<Webhook, ConfigError> {
    if w.cluster.is_empty() {
        return Err(ConfigError::new("cluster", "must not be empty"));
    }
    let path = w.path.unwrap_or_else(|| "/check".to_string());
    if !path.starts_with('/') {
        return Err(ConfigError::new("path", "must start with /"));
    }
    let timeout = w.timeout.unwrap_or(Duration::from_secs(1));
    if timeout.is_zero() {
        return Err(ConfigError::new("timeout", "must be greater than 0"));
    }
    Ok(Webhook {
        authority: w.authority.unwrap_or_else(|| w.cluster.clone()),
        cluster: w.cluster,
        path,
        timeout,
        failure_mode: w.failure_mode.unwrap_or(FailureMode::Deny),
    })
}

fn compile_rules(raw: Vec<RawRule>, response: bool) -> Result<RuleSet, ConfigError> {
    let mut rules = Vec::with_capacity(raw.len());
    let mut patterns = Vec::with_capacity(raw.len());
    let mut names = HashSet::new();
    for (i, r) in raw.into_iter().enumerate() {
        let (rule, pattern) = compile_rule(r, response).map_err(|e| e.within(&format!("[{i}]")))?;
        if !names.insert(rule.name.clone()) {
            return Err(ConfigError::new(format!("[{i}].name"), format!("duplicate rule name {:?}", rule.name)));
        }
        rules.push(rule);
        patterns.push(pattern);
    }
    RuleSet::new(rules, &patterns).map_err(|e| ConfigError::new(".", format!("cannot compile the rule set: {e}")))
}

fn compile_rule(r: RawRule, response: bool) -> Result<(GuardRule, String), ConfigError> {
    let sources = [r.regex.is_some(), r.phrase.is_some(), r.phrases.is_some(), r.builtin.is_some()];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(ConfigError::new(".", "exactly one of regex, phrase, phrases, builtin is required"));
    }
    let mut validator = None;
    let (field, base, default_name) = if let Some(re) = r.regex {
        if re.is_empty() {
            return Err(ConfigError::new("regex", "must not be empty"));
        }
        ("regex", re, None)
    } else if let Some(p) = r.phrase {
        if p.is_empty() {
            return Err(ConfigError::new("phrase", "must not be empty"));
        }
        ("phrase", regex::escape(&p), None)
    } else if let Some(ps) = r.phrases {
        if ps.is_empty() || ps.iter().any(String::is_empty) {
            return Err(ConfigError::new("phrases", "must be a non-empty list of non-empty phrases"));
        }
        ("phrases", ps.iter().map(|p| regex::escape(p)).collect::<Vec<_>>().join("|"), None)
    } else {
        let name = r.builtin.unwrap_or_default();
        let Some(b) = builtins::find(&name) else {
            let known: Vec<&str> = builtins::ALL.iter().map(|b| b.name).collect();
            return Err(ConfigError::new("builtin", format!("unknown built-in {name:?}; known: {}", known.join(", "))));
        };
        validator = b.validator;
        ("builtin", b.pattern.to_string(), Some(b.name))
    };
    let pattern = if r.case_insensitive { format!("(?i:{base})") } else { base };
    let name = match (r.name, default_name) {
        (Some(n), _) => n,
        (None, Some(d)) => d.to_string(),
        (None, None) => return Err(ConfigError::new("name", "required (except for built-ins)")),
    };
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(ConfigError::new("name", format!("{name:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")));
    }
    let regex = regex::Regex::new(&pattern).map_err(|e| ConfigError::new(field, format!("rule {name:?}: {e}")))?;
    let hir = regex_syntax::Parser::new().parse(&pattern).ok();
    let computed = hir.as_ref().and_then(|h| h.properties().maximum_len());
    if hir.as_ref().is_some_and(|h| h.properties().look_set().contains_word_unicode()) {
        // The lazy DFA gives up on a Unicode word boundary as soon as a prompt has a non-ASCII
        // byte, and the slow fallback engine takes over.
        log::warn!(
            "{FILTER}: rule {name:?}: a Unicode \\b makes scanning non-ASCII text about 400x slower; use (?-u:\\b)"
        );
    }
    let max_match_len = match r.max_match_len {
        Some(0) => return Err(ConfigError::new("max_match_len", "must be greater than 0")),
        Some(n) if n > MAX_HOLD_BACK => {
            return Err(ConfigError::new("max_match_len", format!("at most {MAX_HOLD_BACK} bytes")))
        }
        Some(n) if computed.is_some_and(|c| n < c) => {
            return Err(ConfigError::new(
                "max_match_len",
                format!(
                    "rule {name:?}: {n} is below the pattern's longest match ({} bytes); omit it",
                    computed.unwrap_or(0)
                ),
            ))
        }
        Some(n) => Some(n),
        None => computed,
    };
    let action = match r.action {
        RawAction::Reject => {
            if response {
                return Err(ConfigError::new("action", format!("rule {name:?}: response rules can only mask")));
            }
            if r.replacement.is_some() || r.mask_char.is_some() {
                return Err(ConfigError::new("replacement", format!("rule {name:?}: only for action mask")));
            }
            let status = r.status.unwrap_or(403);
            if !(400..=599).contains(&status) {
                return Err(ConfigError::new("status", format!("rule {name:?}: must be 400-599")));
            }
            let message = r.message.unwrap_or_else(|| format!("request blocked by prompt guard rule {name}"));
            RuleAction::Reject { status, message }
        }
        RawAction::Mask => {
            if r.status.is_some() || r.message.is_some() {
                return Err(ConfigError::new(
                    "status",
                    format!("rule {name:?}: status and message are only for action reject"),
                ));
            }
            let rep = match (r.replacement, r.mask_char) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        "replacement",
                        format!("rule {name:?}: set replacement or mask_char, not both"),
                    ))
                }
                (Some(t), None) => Replacement::Text(t),
                (None, Some(c)) => Replacement::EachChar(c),
                (None, None) => Replacement::EachChar('X'),
            };
            if response {
                match max_match_len {
                    None => {
                        return Err(ConfigError::new(
                            field,
                            format!(
                                "rule {name:?}: the pattern can match unboundedly long text, so a stream cannot be masked with a bounded hold-back; use bounded repetitions (e.g. \\d{{1,20}} instead of \\d+) or set max_match_len"
                            ),
                        ))
                    }
                    Some(n) if n > MAX_HOLD_BACK => {
                        return Err(ConfigError::new(
                            field,
                            format!("rule {name:?}: longest match is {n} bytes, above the {MAX_HOLD_BACK}-byte hold-back limit; set a smaller max_match_len"),
                        ))
                    }
                    Some(_) => {}
                }
            }
            RuleAction::Mask(rep)
        }
    };
    let rule = GuardRule { name, action, regex, validator, max_match_len };
    Ok((rule, pattern))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn err(json: &str) -> ConfigError {
        Config::from_json(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn minimal_policy() {
        let c = Config::from_json(br#"{"policies":{"p":{"request_rules":[{"name":"cc","phrase":"credit card","action":"reject"}]}},"default_policy":"p"}"#).unwrap();
        let p = c.policy_for(None).unwrap().unwrap();
        assert_eq!(p.request.rules().len(), 1);
        assert_eq!(c.route_metadata_key, "guard_policy");
        assert!(c.policy_for(Some("nope")).is_err());
    }

    #[test]
    fn unbounded_response_rule_is_refused_with_its_name() {
        let e = err(r#"{"policies":{"p":{"response_rules":[{"name":"digits","regex":"\\d+","action":"mask"}]}}}"#);
        assert_eq!(e.field, "policies.p.response_rules[0].regex");
        assert!(e.reason.contains("\"digits\""), "{e}");
        assert!(e.reason.contains("unbounded"), "{e}");
        // The same pattern is fine with max_match_len, or on the request side.
        Config::from_json(br#"{"policies":{"p":{"response_rules":[{"name":"d","regex":"\\d+","action":"mask","max_match_len":20}]}}}"#).unwrap();
        Config::from_json(br#"{"policies":{"p":{"request_rules":[{"name":"d","regex":"\\d+","action":"mask"}]}}}"#)
            .unwrap();
        let e = err(
            r#"{"policies":{"p":{"response_rules":[{"name":"d","regex":"[0-9]{16}","action":"mask","max_match_len":10}]}}}"#,
        );
        assert_eq!(e.field, "policies.p.response_rules[0].max_match_len");
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(err(r#"{"policies":{}}"#).field, "policies");
        assert_eq!(err(r#"{"policies":{"p":{}},"default_policy":"q"}"#).field, "default_policy");
        assert_eq!(
            err(r#"{"policies":{"p":{"request_rules":[{"name":"x","regex":"(","action":"reject"}]}}}"#).field,
            "policies.p.request_rules[0].regex"
        );
        assert_eq!(
            err(r#"{"policies":{"p":{"request_rules":[{"name":"x","action":"reject"}]}}}"#).field,
            "policies.p.request_rules[0]"
        );
        assert_eq!(
            err(r#"{"policies":{"p":{"request_rules":[{"builtin":"nope","action":"mask"}]}}}"#).field,
            "policies.p.request_rules[0].builtin"
        );
        assert_eq!(
            err(r#"{"policies":{"p":{"response_rules":[{"name":"a","phrase":"x","action":"reject"}]}}}"#).field,
            "policies.p.response_rules[0].action"
        );
        assert_eq!(
            err(r#"{"policies":{"p":{"request_rules":[{"name":"a","phrase":"x","action":"block"}]}}}"#).field,
            "policies.p.request_rules[0].action"
        );
        assert_eq!(
            err(r#"{"policies":{"p":{"webhook":{"cluster":"c","timeout":"0"}}}}"#).field,
            "policies.p.webhook.timeout"
        );
        assert_eq!(err(r#"{"policies":{"p":{"unknown":1}}}"#).field, "policies.p.unknown");
        let dup = err(
            r#"{"policies":{"p":{"request_rules":[{"builtin":"email","action":"mask"},{"builtin":"email","action":"mask"}]}}}"#,
        );
        assert_eq!(dup.field, "policies.p.request_rules[1].name");
    }

    #[test]
    fn builtins_are_bounded_except_private_key() {
        for b in builtins::ALL {
            let json =
                format!(r#"{{"policies":{{"p":{{"response_rules":[{{"builtin":"{}","action":"mask"}}]}}}}}}"#, b.name);
            let r = Config::from_json(json.as_bytes());
            assert_eq!(r.is_ok(), b.name != "private_key", "{}: {:?}", b.name, r.err());
        }
    }
}
