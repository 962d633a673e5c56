//! RBAC rules over claims: `equals`, `one_of`, `contains`, `exists`, `prefix` on a claim
//! path (`llms.openai`), combined with `all`, `any`, `not`.
//!
//! ```json
//! {"all": [{"claim": "org", "equals": "solo.io"}, {"claim": "team", "one_of": ["dev", "ml"]},
//!          {"not": {"claim": "groups", "contains": "suspended"}}]}
//! ```

use serde_json::Value;
use sluice_core::config::ConfigError;

/// Maximum nesting of all/any/not (config sanity).
const MAX_DEPTH: usize = 16;

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Every sub-rule holds.
    All(Vec<Rule>),
    /// At least one sub-rule holds.
    Any(Vec<Rule>),
    /// The sub-rule does not hold.
    Not(Box<Rule>),
    /// A test on one claim.
    Claim { path: String, test: Test },
}

/// A test on a claim value.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// Equal (JSON equality).
    Equals(Value),
    /// Equal to one of.
    OneOf(Vec<Value>),
    /// The claim (a list, or a string) contains the value (element / substring).
    Contains(Value),
    /// The claim is present (true) or absent (false).
    Exists(bool),
    /// The claim is a string starting with this.
    Prefix(String),
}

/// The value at a dotted claim path (`llms.openai`); a key containing dots can be reached
/// whole first (`"https://example.com/roles"`).
pub fn lookup<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let mut cur = claims;
    for seg in path.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

impl Rule {
    /// Compile a rule from JSON; errors name the offending field.
    pub fn compile(v: &Value) -> Result<Rule, ConfigError> {
        Self::compile_at(v, 0)
    }

    fn compile_at(v: &Value, depth: usize) -> Result<Rule, ConfigError> {
        if depth > MAX_DEPTH {
            return Err(ConfigError::new(".", "rules nested too deep"));
        }
        let Value::Object(m) = v else {
            return Err(ConfigError::new(".", "a rule must be an object"));
        };
        let list = |key: &str, items: &Value| -> Result<Vec<Rule>, ConfigError> {
            let Value::Array(a) = items else {
                return Err(ConfigError::new(key, "must be a list of rules"));
            };
            if a.is_empty() {
                return Err(ConfigError::new(key, "empty list"));
            }
            a.iter()
                .enumerate()
                .map(|(i, r)| Self::compile_at(r, depth + 1).map_err(|e| e.within(&format!("{key}[{i}]"))))
                .collect()
        };
        if let Some(items) = m.get("all") {
            only_keys(m, &["all"])?;
            return Ok(Rule::All(list("all", items)?));
        }
        if let Some(items) = m.get("any") {
            only_keys(m, &["any"])?;
            return Ok(Rule::Any(list("any", items)?));
        }
        if let Some(inner) = m.get("not") {
            only_keys(m, &["not"])?;
            return Ok(Rule::Not(Box::new(Self::compile_at(inner, depth + 1).map_err(|e| e.within("not"))?)));
        }
        let path = match m.get("claim") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(ConfigError::new("claim", "must be a non-empty string")),
            None => return Err(ConfigError::new(".", "expected all, any, not or claim")),
        };
        let tests: Vec<&String> = m.keys().filter(|k| *k != "claim").collect();
        if tests.len() != 1 {
            return Err(ConfigError::new(
                ".",
                "a claim rule needs exactly one of equals, one_of, contains, exists, prefix",
            ));
        }
        let (name, arg) = match m.iter().find(|(k, _)| *k != "claim") {
            Some(kv) => kv,
            None => return Err(ConfigError::new(".", "missing test")),
        };
        let test = match name.as_str() {
            "equals" => Test::Equals(arg.clone()),
            "one_of" => match arg {
                Value::Array(a) if !a.is_empty() => Test::OneOf(a.clone()),
                _ => return Err(ConfigError::new("one_of", "must be a non-empty list")),
            },
            "contains" => Test::Contains(arg.clone()),
            "exists" => match arg {
                Value::Bool(b) => Test::Exists(*b),
                _ => return Err(ConfigError::new("exists", "must be true or false")),
            },
            "prefix" => match arg {
                Value::String(s) => Test::Prefix(s.clone()),
                _ => return Err(ConfigError::new("prefix", "must be a string")),
            },
            other => return Err(ConfigError::new(other, "unknown test (equals, one_of, contains, exists, prefix)")),
        };
        Ok(Rule::Claim { path, test })
    }

    /// Evaluate against a claims object.
    pub fn eval(&self, claims: &Value) -> bool {
        match self {
            Rule::All(rs) => rs.iter().all(|r| r.eval(claims)),
            Rule::Any(rs) => rs.iter().any(|r| r.eval(claims)),
            Rule::Not(r) => !r.eval(claims),
            Rule::Claim { path, test } => {
                let v = lookup(claims, path);
                match test {
                    Test::Exists(want) => v.is_some() == *want,
                    Test::Equals(x) => v == Some(x),
                    Test::OneOf(xs) => v.is_some_and(|v| xs.contains(v)),
                    Test::Contains(x) => match v {
                        Some(Value::Array(a)) => a.contains(x),
                        Some(Value::String(s)) => x.as_str().is_some_and(|x| s.split(' ').any(|w| w == x)),
                        _ => false,
                    },
                    Test::Prefix(p) => v.and_then(Value::as_str).is_some_and(|s| s.starts_with(p.as_str())),
                }
            }
        }
    }
}

fn only_keys(m: &serde_json::Map<String, Value>, allowed: &[&str]) -> Result<(), ConfigError> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ConfigError::new(k.as_str(), format!("unexpected next to {}", allowed.join("/")))),
        None => Ok(()),
    }
}

/// Models a claim allows: a list of strings, a single string, or a space-separated string
/// (OAuth `scope` style). `"*"` allows every model.
pub fn allowed_models(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(Value::String(s)) => s.split([' ', ',']).filter(|x| !x.is_empty()).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// Whether `model` is in the allowed list (`*` allows all).
pub fn model_allowed(allowed: &[String], model: &str) -> bool {
    allowed.iter().any(|m| m == "*" || m == model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alice() -> Value {
        json!({"sub":"alice","org":"solo.io","team":"dev","llms":{"openai":["gpt-4o-mini"]},
               "groups":["a","b"],"scope":"read write","https://x.io/role":"admin"})
    }

    #[test]
    fn lookup_paths() {
        let c = alice();
        assert_eq!(lookup(&c, "llms.openai").unwrap(), &json!(["gpt-4o-mini"]));
        assert_eq!(lookup(&c, "llms.openai.0").unwrap(), "gpt-4o-mini");
        assert_eq!(lookup(&c, "https://x.io/role").unwrap(), "admin");
        assert!(lookup(&c, "llms.mistralai").is_none());
        assert!(lookup(&c, "sub.x").is_none());
    }

    #[test]
    fn table() {
        let c = alice();
        let cases = [
            (json!({"claim":"org","equals":"solo.io"}), true),
            (json!({"claim":"org","equals":"x"}), false),
            (json!({"claim":"team","one_of":["ops","dev"]}), true),
            (json!({"claim":"groups","contains":"b"}), true),
            (json!({"claim":"groups","contains":"z"}), false),
            (json!({"claim":"scope","contains":"write"}), true),
            (json!({"claim":"scope","contains":"writ"}), false),
            (json!({"claim":"llms.openai","exists":true}), true),
            (json!({"claim":"llms.mistralai","exists":false}), true),
            (json!({"claim":"sub","prefix":"ali"}), true),
            (json!({"claim":"missing","prefix":""}), false),
            (json!({"all":[{"claim":"org","equals":"solo.io"},{"claim":"team","equals":"dev"}]}), true),
            (json!({"all":[{"claim":"org","equals":"solo.io"},{"claim":"team","equals":"ops"}]}), false),
            (json!({"any":[{"claim":"team","equals":"ops"},{"claim":"sub","equals":"alice"}]}), true),
            (json!({"not":{"claim":"team","equals":"dev"}}), false),
        ];
        for (rule, want) in cases {
            let r = Rule::compile(&rule).unwrap();
            assert_eq!(r.eval(&c), want, "{rule}");
        }
    }

    #[test]
    fn compile_errors_name_fields() {
        let bad = [
            (json!({"all":[{"claim":"a","equals":1},{"claim":"b"}]}), "all[1]"),
            (json!({"claim":"a","equals":1,"prefix":"x"}), "."),
            (json!({"claim":"a","one_of":[]}), "one_of"),
            (json!({"claim":"a","exists":"yes"}), "exists"),
            (json!({"any":[]}), "any"),
            (json!({"not":{"claim":"a","regex":"x"}}), "not.regex"),
            (json!({"all":[{"claim":"a","equals":1}],"any":[]}), "any"),
            (json!("x"), "."),
        ];
        for (rule, field) in bad {
            let e = Rule::compile(&rule).unwrap_err();
            assert_eq!(e.field, field, "{rule}: {e}");
        }
    }

    #[test]
    fn models() {
        let c = alice();
        let allowed = allowed_models(lookup(&c, "llms.openai"));
        assert!(model_allowed(&allowed, "gpt-4o-mini"));
        assert!(!model_allowed(&allowed, "gpt-4o"));
        assert!(model_allowed(&allowed_models(Some(&json!("*"))), "anything"));
        assert!(allowed_models(Some(&json!(5))).is_empty());
    }
}
