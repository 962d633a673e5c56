//! `{{variable}}` templates in message text and field values.
//!
//! Syntax: text with `{{ <variable> }}` placeholders (spaces inside the braces are optional).
//! Variables: `user`, `team`, `claim.<name>`, `header.<name>`, `route.<key>`. A quoted string
//! `{{"{{"}}` (or `{{'...'}}`) renders its content verbatim, which is how a literal `{{` is
//! written. Templates are parsed once at config load: an unknown variable kind or an unclosed
//! `{{` is a config error. A lone `}}` is ordinary text. `header.<name>` takes its value from
//! the client, so the config reader refuses it unless the profile opts in (see `config`).

use serde_json::{Map, Value};
use std::fmt;

/// A value a template can refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Variable {
    /// Authenticated subject (filter state `sluice.user`, written by auth).
    User,
    /// Caller's team (filter state `sluice.team`, written by auth).
    Team,
    /// A claim copied by auth (filter state `sluice.claim.<name>`).
    Claim(String),
    /// A request header (lowercase name). Client input: only with `allow_header_variables`.
    Header(String),
    /// Route metadata `filter_metadata.sluice.<key>`.
    Route(String),
}

impl fmt::Display for Variable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User => f.write_str("user"),
            Self::Team => f.write_str("team"),
            Self::Claim(n) => write!(f, "claim.{n}"),
            Self::Header(n) => write!(f, "header.{n}"),
            Self::Route(k) => write!(f, "route.{k}"),
        }
    }
}

impl Variable {
    fn parse(s: &str) -> Result<Self, String> {
        let known = "use user, team, claim.<name>, header.<name> or route.<key>";
        match s {
            "user" => return Ok(Self::User),
            "team" => return Ok(Self::Team),
            _ => {}
        }
        let Some((kind, name)) = s.split_once('.') else {
            return Err(format!("unknown template variable {{{{{s}}}}}: {known}"));
        };
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '{' || c == '}') {
            return Err(format!("template variable {{{{{s}}}}}: invalid {kind} name {name:?}"));
        }
        match kind {
            "claim" => Ok(Self::Claim(name.to_string())),
            "header" => {
                let lower = name.to_ascii_lowercase();
                sluice_core::config::validate_header_name(&lower)
                    .map_err(|why| format!("template variable {{{{{s}}}}}: {why}"))?;
                Ok(Self::Header(lower))
            }
            "route" => Ok(Self::Route(name.to_string())),
            _ => Err(format!("unknown template variable {{{{{s}}}}}: {known}")),
        }
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Text(String),
    Var(Variable),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

impl Template {
    /// Parse `src`; the error says what is wrong and where.
    pub fn parse(src: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut text = String::new();
        let mut rest = src;
        while let Some(open) = rest.find("{{") {
            let (before, after_open) = rest.split_at(open);
            text.push_str(before);
            let inner_start = after_open.get(2..).unwrap_or_default();
            let offset = src.len() - rest.len() + open;
            let inner = inner_start.trim_start();
            if let Some(quote) = inner.chars().next().filter(|c| *c == '"' || *c == '\'') {
                // {{"literal"}}: the quoted text, verbatim.
                let body = inner.get(1..).unwrap_or_default();
                let Some(end) = body.find(quote) else {
                    return Err(format!("unclosed quoted literal in {{{{ at byte {offset}"));
                };
                let (lit, after_lit) = body.split_at(end);
                let after = after_lit.get(1..).unwrap_or_default().trim_start();
                let Some(after_close) = after.strip_prefix("}}") else {
                    return Err(format!("expected }}}} after the quoted literal at byte {offset}"));
                };
                text.push_str(lit);
                rest = after_close;
                continue;
            }
            let Some(close) = inner_start.find("}}") else {
                return Err(format!("unclosed {{{{ at byte {offset} (no matching }}}})"));
            };
            let (name, after_name) = inner_start.split_at(close);
            let var = Variable::parse(name.trim())?;
            if !text.is_empty() {
                segments.push(Segment::Text(std::mem::take(&mut text)));
            }
            segments.push(Segment::Var(var));
            rest = after_name.get(2..).unwrap_or_default();
        }
        text.push_str(rest);
        if !text.is_empty() {
            segments.push(Segment::Text(text));
        }
        Ok(Self { segments })
    }

    /// `Some(text)` when the template has no variables.
    pub fn as_literal(&self) -> Option<String> {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Text(t) => out.push_str(t),
                Segment::Var(_) => return None,
            }
        }
        Some(out)
    }

    /// The variables the template uses, in order.
    pub fn variables(&self) -> impl Iterator<Item = &Variable> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Var(v) => Some(v),
            Segment::Text(_) => None,
        })
    }

    /// Render with `lookup`; a variable without a value renders as empty, or makes the render
    /// fail with that variable when `refuse_missing`.
    pub fn render(
        &self,
        lookup: &mut dyn FnMut(&Variable) -> Option<String>,
        refuse_missing: bool,
    ) -> Result<String, Variable> {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Text(t) => out.push_str(t),
                Segment::Var(v) => match lookup(v).filter(|s| !s.is_empty()) {
                    Some(value) => out.push_str(&value),
                    None if refuse_missing => return Err(v.clone()),
                    None => {}
                },
            }
        }
        Ok(out)
    }
}

/// A JSON value whose strings may be templates; literal parts are kept as they are.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueTemplate {
    /// A value without templates.
    Literal(Value),
    /// A string with at least one variable.
    Text(Template),
    /// An array with at least one templated element.
    Array(Vec<ValueTemplate>),
    /// An object with at least one templated value.
    Object(Vec<(String, ValueTemplate)>),
}

impl ValueTemplate {
    /// Compile every string in `value` as a template; `allow` vets each variable (a policy
    /// such as "no client headers"). Errors are prefixed with the path below `value`
    /// (`[1].text: unclosed {{ ...`), empty for the value itself.
    pub fn compile(value: Value, allow: &dyn Fn(&Variable) -> Result<(), String>) -> Result<Self, (String, String)> {
        match value {
            Value::String(s) => {
                let t = Template::parse(&s).map_err(|why| (String::new(), why))?;
                for v in t.variables() {
                    allow(v).map_err(|why| (String::new(), why))?;
                }
                Ok(match t.as_literal() {
                    Some(lit) => Self::Literal(Value::String(lit)),
                    None => Self::Text(t),
                })
            }
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    out.push(Self::compile(item, allow).map_err(|(p, why)| (format!("[{i}]{}", dot(&p)), why))?);
                }
                if out.iter().all(|t| matches!(t, Self::Literal(_))) {
                    Ok(Self::Literal(Value::Array(out.into_iter().map(Self::into_literal).collect())))
                } else {
                    Ok(Self::Array(out))
                }
            }
            Value::Object(map) => {
                let mut out = Vec::with_capacity(map.len());
                for (k, v) in map {
                    let t = Self::compile(v, allow).map_err(|(p, why)| (format!("{k}{}", dot(&p)), why))?;
                    out.push((k, t));
                }
                if out.iter().all(|(_, t)| matches!(t, Self::Literal(_))) {
                    Ok(Self::Literal(Value::Object(out.into_iter().map(|(k, t)| (k, t.into_literal())).collect())))
                } else {
                    Ok(Self::Object(out))
                }
            }
            other => Ok(Self::Literal(other)),
        }
    }

    fn into_literal(self) -> Value {
        match self {
            Self::Literal(v) => v,
            // Only called when every element is a literal.
            _ => Value::Null,
        }
    }

    /// The value as it is when no variable is involved.
    pub fn literal(&self) -> Option<&Value> {
        match self {
            Self::Literal(v) => Some(v),
            _ => None,
        }
    }

    /// Render to a JSON value.
    pub fn render(
        &self,
        lookup: &mut dyn FnMut(&Variable) -> Option<String>,
        refuse_missing: bool,
    ) -> Result<Value, Variable> {
        Ok(match self {
            Self::Literal(v) => v.clone(),
            Self::Text(t) => Value::String(t.render(lookup, refuse_missing)?),
            Self::Array(items) => {
                Value::Array(items.iter().map(|t| t.render(lookup, refuse_missing)).collect::<Result<_, _>>()?)
            }
            Self::Object(fields) => {
                let mut map = Map::new();
                for (k, t) in fields {
                    map.insert(k.clone(), t.render(lookup, refuse_missing)?);
                }
                Value::Object(map)
            }
        })
    }
}

/// `.x` for a field path continuing with a key, as-is for an index or nothing.
fn dot(p: &str) -> String {
    if p.is_empty() || p.starts_with('[') {
        p.to_string()
    } else {
        format!(".{p}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: &Variable) -> Option<String> {
        match v {
            Variable::User => Some("alice".into()),
            Variable::Team => Some("dev".into()),
            Variable::Claim(n) if n == "org" => Some("acme".into()),
            Variable::Header(h) if h == "x-team" => Some("ops".into()),
            Variable::Route(k) if k == "tier" => Some("gold".into()),
            Variable::Route(k) if k == "empty" => Some(String::new()),
            _ => None,
        }
    }

    fn any(_: &Variable) -> Result<(), String> {
        Ok(())
    }

    fn render(src: &str, refuse: bool) -> Result<String, Variable> {
        Template::parse(src).unwrap().render(&mut vars, refuse)
    }

    #[test]
    fn renders_every_kind() {
        let cases = [
            ("plain", "plain"),
            ("", ""),
            ("You answer for team {{team}}.", "You answer for team dev."),
            ("{{ user }}/{{team}}", "alice/dev"),
            ("{{claim.org}}-{{header.x-team}}-{{route.tier}}", "acme-ops-gold"),
            ("{{header.X-Team}}", "ops"),
            ("a }} b { c", "a }} b { c"),
            ("{{\"{{\"}}team}}", "{{team}}"),
            ("{{ '{{x}}' }}", "{{x}}"),
            ("missing:[{{claim.nope}}]", "missing:[]"),
            ("empty:[{{route.empty}}]", "empty:[]"),
            ("héllo {{user}} 日本", "héllo alice 日本"),
        ];
        for (src, want) in cases {
            assert_eq!(render(src, false).unwrap(), want, "{src}");
        }
    }

    #[test]
    fn refuse_names_the_variable() {
        assert_eq!(render("x {{claim.nope}}", true), Err(Variable::Claim("nope".into())));
        assert_eq!(render("{{route.empty}}", true), Err(Variable::Route("empty".into())));
        assert_eq!(render("{{team}}", true).unwrap(), "dev");
        assert_eq!(Variable::Header("x-a".into()).to_string(), "header.x-a");
    }

    #[test]
    fn parse_errors() {
        let cases = [
            ("{{team", "unclosed {{ at byte 0"),
            ("ab {{team} x", "unclosed {{ at byte 3"),
            ("{{teams}}", "unknown template variable {{teams}}"),
            ("{{}}", "unknown template variable {{}}"),
            ("{{env.HOME}}", "unknown template variable {{env.HOME}}"),
            ("{{claim.}}", "invalid claim name"),
            ("{{header.a b}}", "invalid header name"),
            ("{{header.a:b}}", "invalid header name"),
            ("{{\"x}}", "unclosed quoted literal"),
            ("{{\"x\" y}}", "expected }} after the quoted literal"),
        ];
        for (src, want) in cases {
            let e = Template::parse(src).unwrap_err();
            assert!(e.contains(want), "{src}: {e}");
        }
    }

    #[test]
    fn variables_and_literals() {
        let t = Template::parse("{{user}} {{claim.a.b}}").unwrap();
        assert_eq!(t.variables().cloned().collect::<Vec<_>>(), [Variable::User, Variable::Claim("a.b".into())]);
        assert_eq!(Template::parse("x {{'{{'}}").unwrap().as_literal().as_deref(), Some("x {{"));
        assert!(t.as_literal().is_none());
    }

    #[test]
    fn value_templates() {
        let v = json!({"a": 1, "b": ["x", "{{team}}"], "c": {"d": "{{user}}"}, "e": null});
        let t = ValueTemplate::compile(v, &any).unwrap();
        assert!(t.literal().is_none());
        assert_eq!(
            t.render(&mut vars, false).unwrap(),
            json!({"a": 1, "b": ["x", "dev"], "c": {"d": "alice"}, "e": null})
        );
        let lit = ValueTemplate::compile(json!([1, "two", {"three": [3]}]), &any).unwrap();
        assert_eq!(lit.literal(), Some(&json!([1, "two", {"three": [3]}])));
        let e = ValueTemplate::compile(json!({"a": [{"b": "{{oops}}"}]}), &any).unwrap_err();
        assert_eq!(e.0, "a[0].b");
        assert!(e.1.contains("{{oops}}"));
        let e = ValueTemplate::compile(json!("{{x"), &any).unwrap_err();
        assert_eq!(e.0, "");
        assert_eq!(
            ValueTemplate::compile(json!({"k": "{{claim.none}}"}), &any).unwrap().render(&mut vars, true),
            Err(Variable::Claim("none".into()))
        );
        let no_headers = |v: &Variable| match v {
            Variable::Header(_) => Err("no headers".to_string()),
            _ => Ok(()),
        };
        assert_eq!(
            ValueTemplate::compile(json!({"a": ["x", "{{header.x-a}}"]}), &no_headers).unwrap_err(),
            ("a[1]".to_string(), "no headers".to_string())
        );
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let pieces =
            ["{{", "}}", "{", "}", "\"", "'", " ", "team", "claim.", "header.x", "route.k", "é", "日", "user", "."];
        let mut state: u64 = 42;
        for _ in 0..5000 {
            let mut src = String::new();
            for _ in 0..(state % 9) {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                src.push_str(pieces[(state >> 33) as usize % pieces.len()]);
            }
            state = state.wrapping_add(1);
            if let Ok(t) = Template::parse(&src) {
                let _ = t.render(&mut vars, false).unwrap();
                let _ = t.render(&mut vars, true);
            }
        }
    }
}
