//! The enrichment itself, pure: apply a profile to a parsed request body of a given format.
//!
//! Per format (`sluice_core::api::Api`):
//! - chat (and legacy completions, embeddings, unknown paths): profile messages are spliced
//!   into `messages` (when the body has them), any role;
//! - Responses: system/developer messages become `instructions` (prepended or appended to
//!   the client's), other roles become `input` items;
//! - Anthropic Messages (and `count_tokens`): system/developer messages become `system`,
//!   other roles `messages`.
//!
//! Fields: defaults (absent or `null`), then overrides, then caps. The output cap applies to
//! every output-cap field of the format (`api::output_cap_fields`: chat `max_tokens` **and**
//! `max_completion_tokens`, Responses `max_output_tokens`, Messages `max_tokens`), so one
//! cap bounds whatever the client sends; a default or override of an output cap is written
//! to the format's own field. `stream_options` is only set on chat/completions streams.

use crate::config::{OnMissing, Profile, PromptMessage};
use crate::shape::OUTPUT_FIELDS;
use crate::template::{ValueTemplate, Variable};
use serde_json::{Map, Number, Value};
use sluice_core::api::{self, Api};

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A template variable without a value under `on_missing_variable: refuse`.
    MissingVariable(Variable),
    /// A capped field of the wrong type (message text).
    InvalidRequest(String),
}

type Lookup<'a> = dyn FnMut(&Variable) -> Option<String> + 'a;

/// The format's field for an output cap named `field` in the config, or `None` when the
/// format has no output cap (embeddings, `count_tokens`).
fn output_field(api: Api, field: &str) -> Option<&'static str> {
    match api {
        Api::Chat | Api::Other => OUTPUT_FIELDS.iter().copied().find(|f| *f == field).map(|f| {
            if f == "max_output_tokens" && api == Api::Chat {
                "max_tokens"
            } else {
                f
            }
        }),
        Api::Completions | Api::Messages => Some("max_tokens"),
        Api::Responses => Some("max_output_tokens"),
        Api::Embeddings | Api::CountTokens | Api::Models => None,
    }
}

/// The output-cap fields a request of `api` may carry (unknown paths: any of them).
fn output_fields(api: Api) -> &'static [&'static str] {
    match api {
        Api::Other => OUTPUT_FIELDS,
        _ => api::output_cap_fields(api),
    }
}

fn is_set(map: &Map<String, Value>, field: &str) -> bool {
    map.get(field).is_some_and(|v| !v.is_null())
}

/// Whether `stream_options` may be written for `api` (providers reject it elsewhere).
fn takes_stream_options(api: Api) -> bool {
    api.supports_include_usage() || api == Api::Other
}

/// Apply `profile` to `body` (a JSON object whose shape was checked). Returns whether the
/// body changed.
pub fn apply(api: Api, body: &mut Value, profile: &Profile, lookup: &mut Lookup<'_>) -> Result<bool, Refusal> {
    let refuse = profile.on_missing == OnMissing::Refuse;
    let Some(map) = body.as_object_mut() else { return Ok(false) };
    let mut changed = false;

    // Fields. stream_options last, once `stream` is final.
    let ops =
        profile.defaults.iter().map(|(k, t)| (k, t, false)).chain(profile.overrides.iter().map(|(k, t)| (k, t, true)));
    let (plain, stream_opts): (Vec<_>, Vec<_>) = ops.partition(|(k, _, _)| k.as_str() != "stream_options");
    for (field, template, always) in plain.into_iter().chain(stream_opts) {
        let target = if OUTPUT_FIELDS.contains(&field.as_str()) {
            let Some(target) = output_field(api, field) else { continue };
            // A default applies only when the client set no output cap of its own.
            if !always && output_fields(api).iter().any(|f| is_set(map, f)) {
                continue;
            }
            target
        } else {
            if field == "stream_options"
                && !(takes_stream_options(api) && map.get("stream") == Some(&Value::Bool(true)))
            {
                continue;
            }
            if !always && is_set(map, field) {
                continue;
            }
            field.as_str()
        };
        changed |= set_field(map, target, template, lookup, refuse)?;
    }

    if let Some(cap) = profile.output_cap {
        for field in output_fields(api) {
            changed |= cap_field(map, field, &Number::from(cap))?;
        }
    }
    for (field, cap) in &profile.caps {
        changed |= cap_field(map, field, cap)?;
    }

    if profile.has_message_ops() {
        changed |= match api {
            Api::Responses => add_responses(body, profile, lookup, refuse)?,
            Api::Messages | Api::CountTokens => add_messages_api(api, body, profile, lookup, refuse)?,
            _ => add_chat(body, profile, lookup, refuse)?,
        };
    }
    Ok(changed)
}

/// Lower `field` to `cap` when above it; a non-number is refused, never forwarded past the cap.
fn cap_field(map: &mut Map<String, Value>, field: &str, cap: &Number) -> Result<bool, Refusal> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Number(n)) => match (n.as_f64(), cap.as_f64()) {
            (Some(have), Some(max)) if have > max => {
                map.insert(field.to_string(), Value::Number(cap.clone()));
                Ok(true)
            }
            _ => Ok(false),
        },
        Some(_) => {
            Err(Refusal::InvalidRequest(format!("field {field} must be a number (the gateway caps it at {cap})")))
        }
    }
}

/// Set `field` to the rendered template; `Ok(true)` when the value changed.
fn set_field(
    map: &mut Map<String, Value>,
    field: &str,
    template: &ValueTemplate,
    lookup: &mut Lookup<'_>,
    refuse: bool,
) -> Result<bool, Refusal> {
    let value = template.render(lookup, refuse).map_err(Refusal::MissingVariable)?;
    if map.get(field) == Some(&value) {
        return Ok(false);
    }
    map.insert(field.to_string(), value);
    Ok(true)
}

fn render(messages: &[PromptMessage], lookup: &mut Lookup<'_>, refuse: bool) -> Result<Vec<Value>, Refusal> {
    messages.iter().map(|m| m.value.render(lookup, refuse).map_err(Refusal::MissingVariable)).collect()
}

/// Chat: splice into `messages`, when the body has them.
fn add_chat(body: &mut Value, profile: &Profile, lookup: &mut Lookup<'_>, refuse: bool) -> Result<bool, Refusal> {
    let Some(Value::Array(messages)) = body.get_mut("messages") else { return Ok(false) };
    let pre = render(&profile.prepend, lookup, refuse)?;
    let post = render(&profile.append, lookup, refuse)?;
    messages.splice(0..0, pre);
    messages.extend(post);
    Ok(true)
}

/// The system text of rendered system messages, in order.
fn system_text(rendered: &[(bool, Value)]) -> Option<String> {
    let texts: Vec<String> = rendered
        .iter()
        .filter(|(sys, _)| *sys)
        .map(|(_, m)| m.get("content").map(api::content_text).unwrap_or_default())
        .collect();
    (!texts.is_empty()).then(|| texts.join("\n\n"))
}

fn render_tagged(
    messages: &[PromptMessage],
    lookup: &mut Lookup<'_>,
    refuse: bool,
) -> Result<Vec<(bool, Value)>, Refusal> {
    messages
        .iter()
        .map(|m| Ok((m.is_system(), m.value.render(lookup, refuse).map_err(Refusal::MissingVariable)?)))
        .collect()
}

/// Append `text` after the format's system text (`instructions` / `system`).
fn append_system_text(body: &mut Value, key: &str, text: &str) {
    let Some(root) = body.as_object_mut() else { return };
    match root.get_mut(key) {
        Some(Value::String(old)) if !old.is_empty() => {
            old.push_str("\n\n");
            old.push_str(text);
        }
        Some(Value::Array(blocks)) => blocks.push(serde_json::json!({"type": "text", "text": text})),
        _ => {
            root.insert(key.to_string(), Value::String(text.to_string()));
        }
    }
}

/// A conversation item for the Responses API: text parts are `input_text` (`output_text`
/// for assistant messages).
fn responses_item(mut m: Value) -> Value {
    let assistant = m.get("role").and_then(Value::as_str) == Some("assistant");
    if let Some(Value::Array(parts)) = m.get_mut("content") {
        for p in parts {
            if p.get("type").and_then(Value::as_str) == Some("text") {
                if let Some(o) = p.as_object_mut() {
                    let kind = if assistant { "output_text" } else { "input_text" };
                    o.insert("type".into(), Value::String(kind.into()));
                }
            }
        }
    }
    m
}

/// Responses: system messages into `instructions`, others into `input`.
fn add_responses(body: &mut Value, profile: &Profile, lookup: &mut Lookup<'_>, refuse: bool) -> Result<bool, Refusal> {
    let pre = render_tagged(&profile.prepend, lookup, refuse)?;
    let post = render_tagged(&profile.append, lookup, refuse)?;
    let mut changed = false;
    if let Some(text) = system_text(&pre) {
        changed |= api::add_system_text(Api::Responses, body, &text);
    }
    if let Some(text) = system_text(&post) {
        append_system_text(body, "instructions", &text);
        changed = true;
    }
    let items = |v: Vec<(bool, Value)>| -> Vec<Value> {
        v.into_iter().filter(|(s, _)| !s).map(|(_, m)| responses_item(m)).collect()
    };
    let (pre, post) = (items(pre), items(post));
    if pre.is_empty() && post.is_empty() {
        return Ok(changed);
    }
    let Some(root) = body.as_object_mut() else { return Ok(changed) };
    let input = match root.get_mut("input") {
        Some(Value::Array(a)) => a,
        Some(v @ Value::String(_)) => {
            let text = std::mem::take(v);
            *v = Value::Array(vec![serde_json::json!({"role": "user", "content": text})]);
            match v {
                Value::Array(a) => a,
                _ => return Ok(changed),
            }
        }
        _ => return Ok(changed),
    };
    input.splice(0..0, pre);
    input.extend(post);
    Ok(true)
}

/// Anthropic Messages: system messages into `system`, others into `messages`.
fn add_messages_api(
    api: Api,
    body: &mut Value,
    profile: &Profile,
    lookup: &mut Lookup<'_>,
    refuse: bool,
) -> Result<bool, Refusal> {
    let pre = render_tagged(&profile.prepend, lookup, refuse)?;
    let post = render_tagged(&profile.append, lookup, refuse)?;
    let mut changed = false;
    if let Some(text) = system_text(&pre) {
        changed |= api::add_system_text(api, body, &text);
    }
    if let Some(text) = system_text(&post) {
        append_system_text(body, "system", &text);
        changed = true;
    }
    let others = |v: Vec<(bool, Value)>| -> Vec<Value> { v.into_iter().filter(|(s, _)| !s).map(|(_, m)| m).collect() };
    let (pre, post) = (others(pre), others(post));
    if pre.is_empty() && post.is_empty() {
        return Ok(changed);
    }
    let Some(Value::Array(messages)) = body.get_mut("messages") else { return Ok(changed) };
    messages.splice(0..0, pre);
    messages.extend(post);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    fn profile(p: Value) -> Profile {
        let c = Config::from_json(json!({"profiles": {"p": p}}).to_string().as_bytes()).unwrap();
        c.profiles[0].clone()
    }

    fn vars(v: &Variable) -> Option<String> {
        match v {
            Variable::Team => Some("dev".into()),
            _ => None,
        }
    }

    fn run(api: Api, p: &Profile, body: Value) -> (Value, bool) {
        let mut b = body;
        let changed = apply(api, &mut b, p, &mut vars).unwrap();
        (b, changed)
    }

    #[test]
    fn system_prompts_in_each_format() {
        let p = profile(json!({
            "prepend": [{"role": "system", "content": "S1 {{team}}"}, {"role": "user", "content": [{"type": "text", "text": "U1"}]}],
            "append": [{"role": "system", "content": "S2"}, {"role": "user", "content": "U2"}]
        }));
        let (chat, _) = run(Api::Chat, &p, json!({"messages": [{"role": "user", "content": "hi"}]}));
        let roles: Vec<&str> =
            chat["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "user", "system", "user"]);
        assert_eq!(chat["messages"][0]["content"], "S1 dev");

        let (r, changed) = run(Api::Responses, &p, json!({"instructions": "client", "input": "hi"}));
        assert!(changed);
        assert_eq!(r["instructions"], "S1 dev\n\nclient\n\nS2");
        assert_eq!(
            r["input"],
            json!([
                {"role": "user", "content": [{"type": "input_text", "text": "U1"}]},
                {"role": "user", "content": "hi"},
                {"role": "user", "content": "U2"}
            ])
        );
        let (r, _) = run(Api::Responses, &p, json!({"input": [{"role": "user", "content": "x"}]}));
        assert_eq!(r["instructions"], "S1 dev\n\nS2");
        assert_eq!(r["input"].as_array().unwrap().len(), 3);

        let (m, _) = run(Api::Messages, &p, json!({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}));
        assert_eq!(m["system"], "S1 dev\n\nS2");
        assert_eq!(m["messages"][0]["content"][0]["text"], "U1");
        assert_eq!(m["messages"].as_array().unwrap().len(), 3);
        let (m, _) = run(Api::Messages, &p, json!({"system": [{"type": "text", "text": "client"}], "messages": []}));
        assert_eq!(
            m["system"],
            json!([{"type": "text", "text": "S1 dev"}, {"type": "text", "text": "client"}, {"type": "text", "text": "S2"}])
        );
    }

    #[test]
    fn one_output_cap_bounds_every_output_field_of_the_format() {
        let p = profile(json!({"caps": {"max_tokens": 100}}));
        let (c, changed) = run(Api::Chat, &p, json!({"max_tokens": 500, "max_completion_tokens": 900}));
        assert!(changed);
        assert_eq!((c["max_tokens"].as_u64(), c["max_completion_tokens"].as_u64()), (Some(100), Some(100)));
        let (c, _) = run(Api::Chat, &p, json!({"max_completion_tokens": 900}));
        assert_eq!(c, json!({"max_completion_tokens": 100}), "an absent field stays absent");
        let (r, _) = run(Api::Responses, &p, json!({"max_output_tokens": 900}));
        assert_eq!(r["max_output_tokens"], 100);
        let (m, _) = run(Api::Messages, &p, json!({"max_tokens": 900}));
        assert_eq!(m["max_tokens"], 100);
        let (e, changed) = run(Api::Embeddings, &p, json!({"input": "x"}));
        assert!(!changed && e == json!({"input": "x"}));
        let (_, changed) = run(Api::Chat, &p, json!({"max_tokens": 50}));
        assert!(!changed, "below the cap: untouched");
    }

    #[test]
    fn output_defaults_use_the_formats_field() {
        let p = profile(
            json!({"defaults": {"max_tokens": 256, "temperature": 0.2, "stream_options": {"include_usage": true}}}),
        );
        let (c, _) = run(Api::Chat, &p, json!({"stream": true}));
        assert_eq!(
            c,
            json!({"stream": true, "max_tokens": 256, "temperature": 0.2, "stream_options": {"include_usage": true}})
        );
        let (c, _) = run(Api::Chat, &p, json!({"max_completion_tokens": 10}));
        assert!(c.get("max_tokens").is_none(), "the client bounded the output already: {c}");
        let (r, _) = run(Api::Responses, &p, json!({"stream": true, "input": "x"}));
        assert_eq!(r, json!({"stream": true, "input": "x", "max_output_tokens": 256, "temperature": 0.2}));
        let (m, _) = run(Api::Messages, &p, json!({"max_tokens": 10}));
        assert_eq!(m, json!({"max_tokens": 10, "temperature": 0.2}));
        let (e, _) = run(Api::Embeddings, &p, json!({"input": "x"}));
        assert_eq!(e, json!({"input": "x", "temperature": 0.2}));
    }

    #[test]
    fn refusals() {
        let p = profile(
            json!({"prepend": [{"role": "system", "content": "{{claim.t}}"}], "on_missing_variable": "refuse"}),
        );
        let mut b = json!({"messages": []});
        assert_eq!(apply(Api::Chat, &mut b, &p, &mut vars), Err(Refusal::MissingVariable(Variable::Claim("t".into()))));
        // Not rendered when it is not applied: no messages, no refusal.
        let mut b = json!({"input": "x"});
        assert_eq!(apply(Api::Embeddings, &mut b, &p, &mut vars), Ok(false));
        let p = profile(json!({"caps": {"temperature": 1}}));
        let mut b = json!({"temperature": "2"});
        assert!(
            matches!(apply(Api::Chat, &mut b, &p, &mut vars), Err(Refusal::InvalidRequest(m)) if m.contains("temperature must be a number"))
        );
    }
}
