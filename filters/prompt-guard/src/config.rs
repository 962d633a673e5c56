//! Configuration, read with the one core reader (`sluice_core::config::Obj`): every policy's
//! rules are compiled at load, response rules must have a bounded match length, and every
//! error names its field (`policies.<name>.request_rules[<i>].<field>`).

use crate::builtins::{self, Check};
use crate::rules::{GuardRule, Replacement, RuleAction, RuleSet};
use sluice_core::config::{ConfigError, FailureMode, Obj};
use std::collections::HashSet;
use std::rc::Rc;
use std::time::Duration;

/// Default request/response body cap (bytes).
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
/// Largest `max_match_len` accepted (bytes): the streaming hold-back.
pub const MAX_HOLD_BACK: usize = 64 * 1024;

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

impl Policy {
    /// Response rules that change answers (not shadow).
    pub fn masks_responses(&self) -> bool {
        !self.response.is_empty() && !self.shadow
    }
}

/// The compiled configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Policies, in document order.
    pub policies: Vec<(String, Rc<Policy>)>,
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
    /// Parse and compile a whole configuration document (config-check, tests).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        sluice_core::config::read(bytes, Self::load)
    }

    /// Read and compile the plugin configuration.
    pub fn load(o: Obj<'_>) -> Result<Self, ConfigError> {
        o.known(&["policies", "default_policy", "route_metadata_key", "max_request_bytes", "max_response_bytes"])?;
        let policies = o
            .named("policies", |name, p| {
                if name.is_empty() {
                    return Err(o.err("policies", "policy names must not be empty"));
                }
                compile_policy(name, p).map(Rc::new)
            })?
            .unwrap_or_default();
        if policies.is_empty() {
            return Err(o.err("policies", "at least one policy is required"));
        }
        let default_policy = o.string("default_policy")?;
        if let Some(d) = &default_policy {
            if !policies.iter().any(|(n, _)| n == d) {
                return Err(o.err("default_policy", format!("no policy named {d:?}")));
            }
        }
        let route_metadata_key = o.string("route_metadata_key")?.unwrap_or_else(|| "guard_policy".to_string());
        if route_metadata_key.is_empty() {
            return Err(o.err("route_metadata_key", "must not be empty"));
        }
        let max_request_bytes = o.count("max_request_bytes")?.unwrap_or(DEFAULT_MAX_BODY);
        let max_response_bytes = o.count("max_response_bytes")?.unwrap_or(DEFAULT_MAX_BODY);
        if max_request_bytes == 0 {
            return Err(o.err("max_request_bytes", "must be greater than 0"));
        }
        if max_response_bytes == 0 {
            return Err(o.err("max_response_bytes", "must be greater than 0"));
        }
        Ok(Config { policies, default_policy, route_metadata_key, max_request_bytes, max_response_bytes })
    }

    /// A policy by name.
    pub fn policy(&self, name: &str) -> Option<&Rc<Policy>> {
        self.policies.iter().find(|(n, _)| n == name).map(|(_, p)| p)
    }

    /// The policy for a route: its metadata value, else the default; `Err(name)` when the
    /// route names a policy that does not exist.
    pub fn policy_for(&self, route_value: Option<&str>) -> Result<Option<Rc<Policy>>, String> {
        match route_value.or(self.default_policy.as_deref()) {
            None => Ok(None),
            Some(name) => self.policy(name).cloned().map(Some).ok_or_else(|| name.to_string()),
        }
    }
}

fn compile_policy(name: &str, p: Obj<'_>) -> Result<Policy, ConfigError> {
    p.known(&["roles", "request_rules", "response_rules", "shadow", "webhook"])?;
    let roles = p.strings("roles")?;
    if roles.as_ref().is_some_and(Vec::is_empty) {
        return Err(p.err("roles", "must list at least one role (omit it to inspect every role)"));
    }
    let request = compile_rules(&p, "request_rules", false)?;
    let response = compile_rules(&p, "response_rules", true)?;
    let webhook = p.object("webhook", compile_webhook)?;
    Ok(Policy { name: name.to_string(), roles, request, response, shadow: p.flag("shadow", false)?, webhook })
}

fn compile_webhook(w: Obj<'_>) -> Result<Webhook, ConfigError> {
    w.known(&["cluster", "path", "authority", "timeout", "failure_mode"])?;
    let cluster = w.required("cluster")?;
    if cluster.is_empty() {
        return Err(w.err("cluster", "must not be empty"));
    }
    let path = w.string("path")?.unwrap_or_else(|| "/check".to_string());
    if !path.starts_with('/') {
        return Err(w.err("path", "must start with /"));
    }
    let timeout = w.duration("timeout")?.unwrap_or(Duration::from_secs(1));
    if timeout.is_zero() {
        return Err(w.err("timeout", "must be greater than 0"));
    }
    Ok(Webhook {
        authority: w.string("authority")?.unwrap_or_else(|| cluster.clone()),
        cluster,
        path,
        timeout,
        failure_mode: w.failure_mode("failure_mode")?.unwrap_or(FailureMode::Deny),
    })
}

fn compile_rules(p: &Obj<'_>, key: &str, response: bool) -> Result<RuleSet, ConfigError> {
    let compiled = p.objects(key, |r| compile_rule(&r, response))?.unwrap_or_default();
    let mut rules = Vec::with_capacity(compiled.len());
    let mut patterns = Vec::with_capacity(compiled.len());
    let mut names = HashSet::new();
    for (i, (rule, pattern)) in compiled.into_iter().enumerate() {
        if !names.insert(rule.name.clone()) {
            let field = format!("{}[{i}].name", p.field_path(key));
            return Err(ConfigError::new(field, format!("duplicate rule name {:?}", rule.name)));
        }
        rules.push(rule);
        patterns.push(pattern);
    }
    RuleSet::new(rules, &patterns).map_err(|e| p.err(key, format!("cannot compile the rule set: {e}")))
}

fn compile_rule(r: &Obj<'_>, response: bool) -> Result<(GuardRule, String), ConfigError> {
    r.known(&[
        "name",
        "regex",
        "phrase",
        "phrases",
        "builtin",
        "case_insensitive",
        "action",
        "status",
        "message",
        "replacement",
        "mask_char",
        "max_match_len",
    ])?;
    let sources = ["regex", "phrase", "phrases", "builtin"].iter().filter(|k| r.has(k)).count();
    if sources != 1 {
        return Err(r.err(".", "exactly one of regex, phrase, phrases, builtin is required"));
    }
    let mut check = Check::None;
    let (field, base, default_name) = if let Some(re) = r.string("regex")? {
        if re.is_empty() {
            return Err(r.err("regex", "must not be empty"));
        }
        ("regex", re, None)
    } else if let Some(p) = r.string("phrase")? {
        if p.is_empty() {
            return Err(r.err("phrase", "must not be empty"));
        }
        ("phrase", regex::escape(&p), None)
    } else if let Some(ps) = r.strings("phrases")? {
        if ps.is_empty() || ps.iter().any(String::is_empty) {
            return Err(r.err("phrases", "must be a non-empty list of non-empty phrases"));
        }
        ("phrases", ps.iter().map(|p| regex::escape(p)).collect::<Vec<_>>().join("|"), None)
    } else {
        let name = r.string("builtin")?.unwrap_or_default();
        let Some(b) = builtins::find(&name) else {
            let known: Vec<&str> = builtins::ALL.iter().map(|b| b.name).collect();
            return Err(r.err("builtin", format!("unknown built-in {name:?}; known: {}", known.join(", "))));
        };
        check = b.check;
        ("builtin", b.pattern.to_string(), Some(b.name))
    };
    let pattern = if r.flag("case_insensitive", false)? { format!("(?i:{base})") } else { base };
    let name = match (r.string("name")?, default_name) {
        (Some(n), _) => n,
        (None, Some(d)) => d.to_string(),
        (None, None) => return Err(r.err("name", "required (except for built-ins)")),
    };
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(r.err("name", format!("{name:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")));
    }
    let action = r.choice("action", &["reject", "mask"])?.ok_or_else(|| r.err("action", "missing field"))?;
    let regex = regex::Regex::new(&pattern).map_err(|e| r.err(field, format!("rule {name:?}: {e}")))?;
    let hir = regex_syntax::Parser::new().parse(&pattern).ok();
    let computed = hir.as_ref().and_then(|h| h.properties().maximum_len());
    if hir.as_ref().is_some_and(|h| h.properties().look_set().contains_word_unicode()) {
        // The lazy DFA gives up on a Unicode word boundary as soon as a prompt has a non-ASCII
        // byte, and the slow fallback engine takes over.
        log::warn!(
            "{}: rule {name:?}: a Unicode \\b makes scanning non-ASCII text about 400x slower; use (?-u:\\b)",
            crate::NAME
        );
    }
    let max_match_len = match r.count("max_match_len")? {
        Some(0) => return Err(r.err("max_match_len", "must be greater than 0")),
        Some(n) if n > MAX_HOLD_BACK => return Err(r.err("max_match_len", format!("at most {MAX_HOLD_BACK} bytes"))),
        Some(n) if computed.is_some_and(|c| n < c) => {
            return Err(r.err(
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
    let replacement = r.string("replacement")?;
    let mask_char = match r.string("mask_char")? {
        None => None,
        Some(s) => {
            let mut chars = s.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Some(c),
                _ => return Err(r.err("mask_char", format!("rule {name:?}: expected exactly one character"))),
            }
        }
    };
    let action = if action == "reject" {
        if response {
            return Err(r.err("action", format!("rule {name:?}: response rules can only mask")));
        }
        if replacement.is_some() || mask_char.is_some() {
            return Err(r.err("replacement", format!("rule {name:?}: only for action mask")));
        }
        let status = r.u64("status")?.unwrap_or(403);
        if !(400..=599).contains(&status) {
            return Err(r.err("status", format!("rule {name:?}: must be 400-599")));
        }
        let message = r.string("message")?.unwrap_or_else(|| format!("request blocked by prompt guard rule {name}"));
        RuleAction::Reject { status: u32::try_from(status).unwrap_or(403), message }
    } else {
        if r.has("status") || r.has("message") {
            return Err(r.err("status", format!("rule {name:?}: status and message are only for action reject")));
        }
        let rep = match (replacement, mask_char) {
            (Some(_), Some(_)) => {
                return Err(r.err("replacement", format!("rule {name:?}: set replacement or mask_char, not both")))
            }
            (Some(t), None) => Replacement::Text(t),
            (None, Some(c)) => Replacement::EachChar(c),
            (None, None) => Replacement::EachChar('X'),
        };
        if response {
            match max_match_len {
                None => {
                    return Err(r.err(
                        field,
                        format!(
                            "rule {name:?}: the pattern can match unboundedly long text, so a stream cannot be masked with a bounded hold-back; use bounded repetitions (e.g. \\d{{1,20}} instead of \\d+) or set max_match_len"
                        ),
                    ))
                }
                Some(n) if n > MAX_HOLD_BACK => {
                    return Err(r.err(
                        field,
                        format!("rule {name:?}: longest match is {n} bytes, above the {MAX_HOLD_BACK}-byte hold-back limit; set a smaller max_match_len"),
                    ))
                }
                Some(_) => {}
            }
        }
        RuleAction::Mask(rep)
    };
    Ok((GuardRule { name, action, regex, check, max_match_len }, pattern))
}

#[cfg(test)]
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
            err(r#"{"policies":{"p":{"request_rules":[{"name":"a","phrase":"x"}]}}}"#).field,
            "policies.p.request_rules[0].action"
        );
        assert_eq!(
            err(r#"{"policies":{"p":{"webhook":{"cluster":"c","timeout":"0"}}}}"#).field,
            "policies.p.webhook.timeout"
        );
        assert_eq!(err(r#"{"policies":{"p":{"webhook":{"path":"/x"}}}}"#).field, "policies.p.webhook.cluster");
        assert_eq!(err(r#"{"policies":{"p":{"unknown":1}}}"#).field, "policies.p.unknown");
        assert_eq!(err(r#"{"policies":{"p":{}},"extra":1}"#).field, "extra");
        assert_eq!(
            err(r#"{"policies":{"p":{"request_rules":[{"name":"a","phrase":"x","action":"mask","mask_char":"ab"}]}}}"#)
                .field,
            "policies.p.request_rules[0].mask_char"
        );
        let dup = err(
            r#"{"policies":{"p":{"request_rules":[{"builtin":"email","action":"mask"},{"builtin":"email","action":"mask"}]}}}"#,
        );
        assert_eq!(dup.field, "policies.p.request_rules[1].name");
        assert_eq!(err(r#"{"policies":{"p":{"roles":[]}}}"#).field, "policies.p.roles");
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
