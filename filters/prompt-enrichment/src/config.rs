//! Configuration, read with the one core reader (`sluice_core::config::Obj`) and compiled
//! into [`Config`]: every template is parsed here, so a request never meets a malformed one,
//! and every error names the field by its dotted path
//! (`profiles.csv.prepend[0].content: unclosed {{ at byte 6 (no matching }})`).

use crate::shape::{self, OUTPUT_FIELDS};
use crate::template::{ValueTemplate, Variable};
use serde_json::{Number, Value};
use sluice_core::config::{ConfigError, FailureMode, Obj};

/// Default cap on the buffered request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default route-metadata key naming the profile.
pub const DEFAULT_PROFILE_METADATA_KEY: &str = "enrichment_profile";

/// What a template variable without a value does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMissing {
    /// Render it as an empty string.
    #[default]
    Empty,
    /// Refuse the request (400) naming the variable.
    Refuse,
}

/// A gateway-managed message: its role (never templated) and the message as a template.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptMessage {
    /// `system`, `developer`, `user`, ...
    pub role: String,
    /// The whole message object.
    pub value: ValueTemplate,
}

impl PromptMessage {
    /// A system prompt: goes to the format's own place (`instructions`, `system`) on the
    /// APIs that have one.
    pub fn is_system(&self) -> bool {
        self.role == "system" || self.role == "developer"
    }
}

/// A compiled profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Its name.
    pub name: String,
    /// Messages put first.
    pub prepend: Vec<PromptMessage>,
    /// Messages put last.
    pub append: Vec<PromptMessage>,
    /// Fields set when absent or `null`.
    pub defaults: Vec<(String, ValueTemplate)>,
    /// Fields always set.
    pub overrides: Vec<(String, ValueTemplate)>,
    /// Numeric upper bounds of fields other than the output caps.
    pub caps: Vec<(String, Number)>,
    /// The cap on output tokens (the smallest of the configured `max_tokens`,
    /// `max_completion_tokens`, `max_output_tokens` caps), applied to every output-cap field
    /// of the request's format.
    pub output_cap: Option<u64>,
    /// Missing-variable policy.
    pub on_missing: OnMissing,
}

impl Profile {
    /// True when the profile adds messages.
    pub fn has_message_ops(&self) -> bool {
        !self.prepend.is_empty() || !self.append.is_empty()
    }
}

/// The compiled configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Profiles, in config order.
    pub profiles: Vec<Profile>,
    /// Profile used when the route names none.
    pub default_profile: Option<String>,
    /// Route-metadata key naming the profile.
    pub profile_metadata_key: String,
    /// Body cap in bytes.
    pub max_body_bytes: usize,
    /// Failure mode.
    pub failure_mode: FailureMode,
}

const CONFIG_FIELDS: &[&str] = &[
    "profiles",
    "default_profile",
    "profile_metadata_key",
    "max_body_bytes",
    "failure_mode",
    "on_missing_variable",
    "allow_header_variables",
];
const PROFILE_FIELDS: &[&str] =
    &["prepend", "append", "defaults", "overrides", "caps", "on_missing_variable", "allow_header_variables"];

/// Settings a profile inherits from the top level.
#[derive(Clone, Copy)]
struct Inherited {
    on_missing: OnMissing,
    allow_headers: bool,
}

impl Config {
    /// Read and compile the configuration object.
    pub fn load(o: Obj<'_>) -> Result<Self, ConfigError> {
        o.known(CONFIG_FIELDS)?;
        let inherited = Inherited {
            on_missing: on_missing(&o)?.unwrap_or_default(),
            allow_headers: o.flag("allow_header_variables", false)?,
        };
        let profiles = o
            .named("profiles", |name, p| {
                check_profile_name(name).map_err(|why| p.err(".", why))?;
                compile_profile(name, p, inherited)
            })?
            .unwrap_or_default();
        if profiles.is_empty() {
            return Err(o.err("profiles", "at least one profile is required"));
        }
        let profiles: Vec<Profile> = profiles.into_iter().map(|(_, p)| p).collect();
        let default_profile = o.string("default_profile")?;
        if let Some(d) = &default_profile {
            if !profiles.iter().any(|p| p.name == *d) {
                return Err(o.err("default_profile", format!("no profile named {d:?}")));
            }
        }
        let key = o.string("profile_metadata_key")?.unwrap_or_else(|| DEFAULT_PROFILE_METADATA_KEY.to_string());
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            return Err(o.err("profile_metadata_key", "must be a non-empty key without spaces"));
        }
        let max_body_bytes = match o.get("max_body_bytes") {
            None => DEFAULT_MAX_BODY_BYTES,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| o.err("max_body_bytes", "must be a positive integer (bytes)"))?,
        };
        let failure_mode = o.failure_mode("failure_mode")?.unwrap_or(FailureMode::Allow);
        Ok(Self { profiles, default_profile, profile_metadata_key: key, max_body_bytes, failure_mode })
    }

    /// Parse and compile a whole document (empty means `{}`): tests and config-check.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        sluice_core::config::read(bytes, Self::load)
    }

    /// A profile by name (with its index).
    pub fn profile(&self, name: &str) -> Option<(usize, &Profile)> {
        self.profiles.iter().enumerate().find(|(_, p)| p.name == name)
    }
}

fn on_missing(o: &Obj<'_>) -> Result<Option<OnMissing>, ConfigError> {
    Ok(match o.choice("on_missing_variable", &["empty", "refuse"])?.as_deref() {
        Some("refuse") => Some(OnMissing::Refuse),
        Some(_) => Some(OnMissing::Empty),
        None => None,
    })
}

fn check_profile_name(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err("profile names use letters, digits, '-', '_' and '.'".into());
    }
    Ok(())
}

/// The variable policy of a profile: client headers only when opted in.
fn variable_policy(allow_headers: bool) -> impl Fn(&Variable) -> Result<(), String> {
    move |v: &Variable| match v {
        Variable::Header(_) if !allow_headers => Err(format!(
            "template variable {{{{{v}}}}} takes its value from a client request header; set \
             allow_header_variables: true to use it (the value is client input, scanned by \
             prompt-guard only when prompt-guard runs after prompt-enrichment)"
        )),
        _ => Ok(()),
    }
}

/// A template compile error below `path` as a config error.
fn template_error(path: &str, sub: &str, why: String) -> ConfigError {
    let field = if sub.is_empty() {
        path.to_string()
    } else if sub.starts_with('[') {
        format!("{path}{sub}")
    } else {
        format!("{path}.{sub}")
    };
    ConfigError::new(field, why)
}

fn compile_profile(name: &str, p: Obj<'_>, inherited: Inherited) -> Result<Profile, ConfigError> {
    p.known(PROFILE_FIELDS)?;
    let allow_headers = p.flag("allow_header_variables", inherited.allow_headers)?;
    let policy = variable_policy(allow_headers);
    let prepend = p.list("prepend", |v, path| compile_message(v, path, &policy))?.unwrap_or_default();
    let append = p.list("append", |v, path| compile_message(v, path, &policy))?.unwrap_or_default();
    let (caps, output_cap) = p.object("caps", compile_caps)?.unwrap_or_default();
    let defaults = p.object("defaults", |d| compile_fields(d, &caps, output_cap, &policy))?.unwrap_or_default();
    let overrides = p.object("overrides", |d| compile_fields(d, &caps, output_cap, &policy))?.unwrap_or_default();
    let on_missing = on_missing(&p)?.unwrap_or(inherited.on_missing);
    if prepend.is_empty()
        && append.is_empty()
        && defaults.is_empty()
        && overrides.is_empty()
        && caps.is_empty()
        && output_cap.is_none()
    {
        return Err(p.err(".", "profile does nothing: set prepend, append, defaults, overrides or caps"));
    }
    Ok(Profile { name: name.to_string(), prepend, append, defaults, overrides, caps, output_cap, on_missing })
}

fn compile_message(
    raw: &Value,
    path: &str,
    policy: &dyn Fn(&Variable) -> Result<(), String>,
) -> Result<PromptMessage, ConfigError> {
    let Value::Object(obj) = raw else {
        return Err(ConfigError::new(path, "a message is an object with role and content"));
    };
    let field = |k: &str| format!("{path}.{k}");
    let role = match obj.get("role") {
        Some(Value::String(r)) if !r.trim().is_empty() => {
            if r.contains("{{") {
                return Err(ConfigError::new(field("role"), "the role cannot use template variables"));
            }
            r.clone()
        }
        Some(_) => return Err(ConfigError::new(field("role"), "must be a non-empty string such as \"system\"")),
        None => return Err(ConfigError::new(field("role"), "missing; use e.g. \"system\", \"developer\" or \"user\"")),
    };
    match obj.get("content") {
        None | Some(Value::Null) => {
            return Err(ConfigError::new(field("content"), "missing; a string or an array of parts"))
        }
        Some(Value::String(_) | Value::Array(_)) => {}
        Some(_) => return Err(ConfigError::new(field("content"), "must be a string or an array of content parts")),
    }
    // The same shape rules as client messages (content parts need a "type", ...).
    shape::message(raw, "").map_err(|e| shape_error(path, &e))?;
    let value = ValueTemplate::compile(raw.clone(), policy).map_err(|(sub, why)| template_error(path, &sub, why))?;
    Ok(PromptMessage { role, value })
}

/// A shape error `sub: why` (sub relative to `path`) as a config error.
fn shape_error(path: &str, e: &str) -> ConfigError {
    match e.split_once(": ") {
        Some((sub, why)) => template_error(path, sub, why.to_string()),
        None => ConfigError::new(path, e),
    }
}

type Caps = (Vec<(String, Number)>, Option<u64>);

fn compile_caps(o: Obj<'_>) -> Result<Caps, ConfigError> {
    let mut caps = Vec::with_capacity(o.len());
    let mut output: Option<u64> = None;
    for (field, v) in o.entries() {
        let path = o.field_path(field);
        check_field_name(&path, field)?;
        let n = match v {
            Value::Number(n) if n.as_f64().is_some_and(|f| f.is_finite() && f >= 0.0) => n,
            _ => return Err(ConfigError::new(path, "a cap is a non-negative number")),
        };
        // A cap is written into the request: it must fit the field (max_tokens an integer).
        shape::check_field(field, v).map_err(|why| ConfigError::new(&path, why))?;
        if OUTPUT_FIELDS.contains(&field.as_str()) {
            let c = n.as_u64().unwrap_or(0);
            output = Some(output.map_or(c, |o| o.min(c)));
        } else {
            caps.push((field.clone(), n.clone()));
        }
    }
    Ok((caps, output))
}

fn compile_fields(
    o: Obj<'_>,
    caps: &[(String, Number)],
    output_cap: Option<u64>,
    policy: &dyn Fn(&Variable) -> Result<(), String>,
) -> Result<Vec<(String, ValueTemplate)>, ConfigError> {
    let mut out = Vec::with_capacity(o.len());
    for (field, v) in o.entries() {
        let path = o.field_path(field);
        check_field_name(&path, field)?;
        // Values of typed request fields must have the right type (max_tokens an integer, ...).
        shape::check_field(field, v).map_err(|why| ConfigError::new(&path, why))?;
        let cap = if OUTPUT_FIELDS.contains(&field.as_str()) {
            output_cap.map(|c| (c as f64, c.to_string()))
        } else {
            caps.iter().find(|(f, _)| f == field).and_then(|(_, c)| Some((c.as_f64()?, c.to_string())))
        };
        if let (Some((cap, shown)), Some(n)) = (cap, v.as_f64()) {
            if n > cap {
                return Err(ConfigError::new(path, format!("{v} is above the cap on {field} ({shown})")));
            }
        }
        let t = ValueTemplate::compile(v.clone(), policy).map_err(|(sub, why)| template_error(&path, &sub, why))?;
        out.push((field.clone(), t));
    }
    Ok(out)
}

fn check_field_name(path: &str, field: &str) -> Result<(), ConfigError> {
    if field.is_empty() {
        return Err(ConfigError::new(path.trim_end_matches('.'), "empty field name"));
    }
    if field == "messages" {
        return Err(ConfigError::new(path, "messages are changed with prepend and append"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> ConfigError {
        Config::from_json(v.to_string().as_bytes()).unwrap_err()
    }

    #[test]
    fn full_config() {
        let c = Config::from_json(
            json!({
                "default_profile": "csv",
                "max_body_bytes": 4096,
                "failure_mode": "deny",
                "on_missing_variable": "refuse",
                "profiles": {
                    "csv": {
                        "prepend": [{"role": "system", "content": "Team {{team}}"}],
                        "append": [{"role": "user", "content": [{"type": "text", "text": "Be brief."}]}],
                        "defaults": {"temperature": 0.2, "max_tokens": 256, "user": "{{user}}"},
                        "overrides": {"stream_options": {"include_usage": true}},
                        "caps": {"max_tokens": 1024, "temperature": 1.5},
                        "on_missing_variable": "empty"
                    },
                    "other": {"caps": {"max_completion_tokens": 10, "max_output_tokens": 20}}
                }
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.max_body_bytes, 4096);
        assert_eq!(c.failure_mode, FailureMode::Deny);
        assert_eq!(c.profile_metadata_key, "enrichment_profile");
        let (i, p) = c.profile("csv").unwrap();
        assert_eq!(i, 0);
        assert_eq!(p.on_missing, OnMissing::Empty);
        let (_, other) = c.profile("other").unwrap();
        assert_eq!(other.on_missing, OnMissing::Refuse);
        assert_eq!(other.output_cap, Some(10), "the smallest output cap wins");
        assert_eq!(p.prepend.len(), 1);
        assert!(p.prepend[0].is_system());
        assert!(p.prepend[0].value.literal().is_none());
        assert!(p.append[0].value.literal().is_some());
        assert_eq!(p.defaults.len(), 3);
        assert_eq!(p.output_cap, Some(1024));
        assert_eq!(p.caps[0].0, "temperature");
        assert!(p.has_message_ops());
    }

    #[test]
    fn minimal_defaults() {
        let c = Config::from_json(br#"{"profiles":{"p":{"caps":{"max_tokens":5}}}}"#).unwrap();
        assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.failure_mode, FailureMode::Allow);
        assert_eq!(c.default_profile, None);
        assert_eq!(c.profile("p").unwrap().1.on_missing, OnMissing::Empty);
    }

    #[test]
    fn header_variables_are_opt_in() {
        let uses = |extra: Value| {
            let mut p = json!({"prepend": [{"role": "system", "content": "Team {{header.x-team}}"}]});
            p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            json!({"profiles": {"t": p}})
        };
        let e = err(uses(json!({})));
        assert_eq!(e.field, "profiles.t.prepend[0].content");
        assert!(e.reason.contains("client request header") && e.reason.contains("allow_header_variables"), "{e}");
        assert!(Config::from_json(uses(json!({"allow_header_variables": true})).to_string().as_bytes()).is_ok());
        let mut top = uses(json!({}));
        top["allow_header_variables"] = json!(true);
        assert!(Config::from_json(top.to_string().as_bytes()).is_ok(), "inherited from the top level");
        let e = err(json!({"profiles": {"t": {"defaults": {"user": "{{header.x-user}}"}}}}));
        assert_eq!(e.field, "profiles.t.defaults.user");
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (json!({}), "profiles", "at least one"),
            (json!({"profiles": {"p": {}}}), "profiles.p", "does nothing"),
            (json!({"profiles": {"p p": {"caps": {"a": 1}}}}), "profiles.p p", "profile names"),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "default_profile": "q"}),
                "default_profile",
                "no profile named",
            ),
            (json!({"profiles": {"p": {"caps": {"a": 1}}}, "max_body_bytes": 0}), "max_body_bytes", "positive integer"),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "max_body_bytes": -1}),
                "max_body_bytes",
                "positive integer",
            ),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "max_body_bytes": 1.5}),
                "max_body_bytes",
                "positive integer",
            ),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "default_profile": 3}),
                "default_profile",
                "expected a string",
            ),
            (json!({"profiles": []}), "profiles", "expected an object"),
            (json!({"profiles": {"p": []}}), "profiles.p", "expected an object"),
            (json!({"profiles": {"p": {"prepend": {}}}}), "profiles.p.prepend", "expected a list"),
            (json!({"profiles": {"p": {"defaults": []}}}), "profiles.p.defaults", "expected an object"),
            (json!([1]), ".", "expected an object"),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "profile_metadata_key": ""}),
                "profile_metadata_key",
                "non-empty",
            ),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "failure_mode": "maybe"}),
                "failure_mode",
                "expected \"allow\" or \"deny\"",
            ),
            (json!({"profiles": {"p": {"caps": {"a": 1}}}, "extra": 1}), "extra", "unknown field"),
            (json!({"profiles": {"p": {"caps": {"a": 1}, "bogus": 1}}}), "profiles.p.bogus", "unknown field"),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "system", "content": "{{team"}]}}}),
                "profiles.p.prepend[0].content",
                "unclosed {{",
            ),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "system", "content": "{{nope}}"}]}}}),
                "profiles.p.prepend[0].content",
                "unknown template variable {{nope}}",
            ),
            (
                json!({"profiles": {"p": {"append": [{"role": "user", "content": [{"type": "text", "text": "{{x.y}}"}]}]}}}),
                "profiles.p.append[0].content[0].text",
                "unknown template variable",
            ),
            (json!({"profiles": {"p": {"prepend": [{"content": "x"}]}}}), "profiles.p.prepend[0].role", "missing"),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "", "content": "x"}]}}}),
                "profiles.p.prepend[0].role",
                "non-empty",
            ),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "{{header.r}}", "content": "x"}]}}}),
                "profiles.p.prepend[0].role",
                "cannot use template",
            ),
            (json!({"profiles": {"p": {"prepend": [{"role": "system"}]}}}), "profiles.p.prepend[0].content", "missing"),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "system", "content": 3}]}}}),
                "profiles.p.prepend[0].content",
                "string or an array",
            ),
            (json!({"profiles": {"p": {"prepend": ["x"]}}}), "profiles.p.prepend[0]", "object with role"),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "system", "content": [{"text": "x"}]}]}}}),
                "profiles.p.prepend[0].content[0].type",
                "missing required field",
            ),
            (
                json!({"profiles": {"p": {"defaults": {"messages": []}}}}),
                "profiles.p.defaults.messages",
                "prepend and append",
            ),
            (
                json!({"profiles": {"p": {"overrides": {"max_tokens": "ten"}}}}),
                "profiles.p.overrides.max_tokens",
                "non-negative integer",
            ),
            (
                json!({"profiles": {"p": {"overrides": {"stream_options": true}}}}),
                "profiles.p.overrides.stream_options",
                "expected an object",
            ),
            (json!({"profiles": {"p": {"defaults": {"user": "{{who}}"}}}}), "profiles.p.defaults.user", "{{who}}"),
            (
                json!({"profiles": {"p": {"defaults": {"metadata": {"a": ["{{x"]}}}}}),
                "profiles.p.defaults.metadata.a[0]",
                "unclosed",
            ),
            (
                json!({"profiles": {"p": {"caps": {"max_tokens": "1"}}}}),
                "profiles.p.caps.max_tokens",
                "non-negative number",
            ),
            (
                json!({"profiles": {"p": {"caps": {"max_tokens": -1}}}}),
                "profiles.p.caps.max_tokens",
                "non-negative number",
            ),
            (json!({"profiles": {"p": {"caps": {"": 1}}}}), "profiles.p.caps", "empty field name"),
            (
                json!({"profiles": {"p": {"caps": {"max_tokens": 10.5}}}}),
                "profiles.p.caps.max_tokens",
                "non-negative integer",
            ),
            (
                json!({"profiles": {"p": {"caps": {"max_tokens": 100}, "defaults": {"max_tokens": 200}}}}),
                "profiles.p.defaults.max_tokens",
                "above the cap on max_tokens",
            ),
            (
                json!({"profiles": {"p": {"caps": {"max_tokens": 100}, "defaults": {"max_completion_tokens": 200}}}}),
                "profiles.p.defaults.max_completion_tokens",
                "above the cap",
            ),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}, "on_missing_variable": "skip"}}}),
                "profiles.p.on_missing_variable",
                "expected one of empty, refuse",
            ),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}, "allow_header_variables": "yes"}}}),
                "profiles.p.allow_header_variables",
                "true or false",
            ),
        ];
        for (cfg, field, why) in cases {
            let e = err(cfg.clone());
            assert_eq!(e.field, field, "{cfg}: {e}");
            assert!(e.reason.contains(why), "{cfg}: {e}");
        }
    }

    #[test]
    fn empty_config_is_rejected() {
        assert_eq!(Config::from_json(b"").unwrap_err().field, "profiles");
        assert_eq!(Config::from_json(b" \n").unwrap_err().field, "profiles");
        let e = Config::from_json(br#"{"profiles":{}} x"#).unwrap_err();
        assert_eq!(e.field, ".");
        assert!(!e.reason.contains("line 1"), "{e}");
        assert_eq!(Config::from_json(b"{").unwrap_err().field, ".");
    }
}
