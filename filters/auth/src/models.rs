//! The models endpoints, per caller (issue 13 §7): the list (`…/v1/models`, `…/v1/models/`)
//! is filtered to the models the caller may use; a single model (`…/v1/models/{id}`) the
//! caller may not use is answered 404 as OpenAI does, without forwarding.

use crate::rules::model_allowed;
use serde_json::Value;

/// What a request path asks of the models endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelsPath<'a> {
    /// The list (`models_path`, with or without a trailing `/`).
    List,
    /// One model: the id as sent (everything after `models_path/`, trailing `/` removed; ids
    /// may contain `/`, as Hugging Face names do; percent-escapes are not decoded, so an
    /// encoded id only matches a claim written the same way).
    Retrieve(&'a str),
    /// Not a models endpoint.
    Neither,
}

/// Classify `path` (query ignored) against the configured `models_path` (no trailing `/`).
pub fn classify<'a>(path: &'a str, models_path: &str) -> ModelsPath<'a> {
    let p = path.split(['?', '#']).next().unwrap_or_default();
    if p.trim_end_matches('/').ends_with(models_path) {
        return ModelsPath::List;
    }
    // The first `models_path/` in the path: what a provider routing `/v1/models/{id:path}`
    // would read as the id.
    for (at, _) in p.match_indices(models_path) {
        let rest = p.get(at.saturating_add(models_path.len())..).unwrap_or_default();
        if let Some(id) = rest.strip_prefix('/') {
            return ModelsPath::Retrieve(id.trim_end_matches('/'));
        }
    }
    ModelsPath::Neither
}

/// Keep only the caller's models in a list body (`{"object":"list","data":[{"id":…},…]}`).
/// Returns false when the body is not such a list (nothing changed).
pub fn filter_list(v: &mut Value, allowed: &[String]) -> bool {
    let Some(Value::Array(data)) = v.get_mut("data") else { return false };
    data.retain(|m| m.get("id").and_then(Value::as_str).is_some_and(|id| model_allowed(allowed, id)));
    true
}

/// Whether a body is a models list (has a `data` array).
pub fn is_list(v: &Value) -> bool {
    v.get("data").is_some_and(Value::is_array)
}

/// What replaces a successful answer that is not a list the filter understands: nothing
/// leaks unfiltered.
pub const EMPTY_LIST: &[u8] = br#"{"object":"list","data":[]}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        let m = "/v1/models";
        for list in ["/v1/models", "/v1/models/", "/openai/v1/models?x=1", "/openai/v1/models//"] {
            assert_eq!(classify(list, m), ModelsPath::List, "{list}");
        }
        assert_eq!(classify("/openai/v1/models/gpt-4o", m), ModelsPath::Retrieve("gpt-4o"));
        assert_eq!(classify("/v1/models/gpt-4o/?a=b", m), ModelsPath::Retrieve("gpt-4o"));
        assert_eq!(classify("/v1/models/meta-llama/Llama-3-8B", m), ModelsPath::Retrieve("meta-llama/Llama-3-8B"));
        assert_eq!(classify("/v1/models/a/../b", m), ModelsPath::Retrieve("a/../b"), "never matches a plain id");
        for other in ["/v1/chat/completions", "/v1/modelsx", "/v1/models-x/y", "/openai"] {
            assert_eq!(classify(other, m), ModelsPath::Neither, "{other}");
        }
        assert_eq!(classify("/models/x", "/models"), ModelsPath::Retrieve("x"));
        assert_eq!(classify("/v1/models-x/v1/models/y", m), ModelsPath::Retrieve("y"));
    }

    #[test]
    fn lists_are_filtered() {
        let mut v = json!({"object": "list", "data": [{"id": "a"}, {"id": "b"}, {"x": 1}]});
        assert!(filter_list(&mut v, &["b".into()]));
        assert_eq!(v["data"], json!([{"id": "b"}]));
        let mut all = json!({"data": [{"id": "a"}]});
        assert!(filter_list(&mut all, &["*".into()]));
        assert_eq!(all["data"].as_array().unwrap().len(), 1);
        let mut err = json!({"error": {"message": "no"}});
        assert!(!filter_list(&mut err, &[]));
        assert!(!is_list(&err));
        assert!(is_list(&json!({"data": []})));
    }
}
