//! Plugin configuration (the defaults) and the per-route settings (route metadata
//! `sluice.rag`), both read with the one core reader.

use crate::embeddings::Embeddings;
use crate::store::{check_collection_name, load_store, Chroma};
use serde_json::Value;
use sluice_core::config::{ConfigError, FailureMode, Obj};

/// Default passages retrieved.
pub const DEFAULT_TOP_K: usize = 3;
/// Default cap on the tokens the passages add (estimated, 4 bytes a token).
pub const DEFAULT_MAX_ADDED_TOKENS: u64 = 1024;
/// Default largest cosine distance of a passage that is added.
pub const DEFAULT_MAX_DISTANCE: f64 = 0.8;
/// Default template of the added system text; `{{passages}}` is replaced.
pub const DEFAULT_TEMPLATE: &str = "Use the following context to answer the user's question. \
If the context does not contain the answer, say so.\n\nContext:\n{{passages}}";
/// Default template of one passage; `{{text}}`, `{{source}}` and `{{distance}}` are replaced.
pub const DEFAULT_PASSAGE_TEMPLATE: &str = "{{text}}";
/// Default text between passages.
pub const DEFAULT_SEPARATOR: &str = "\n\n";
/// Default cap on a request body read.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;

/// What is retrieved and how it is added: the plugin's defaults, overridden per route.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieval {
    /// The collection.
    pub collection: Option<String>,
    /// Passages retrieved.
    pub top_k: usize,
    /// Most tokens added (estimated).
    pub max_added_tokens: u64,
    /// Largest cosine distance added.
    pub max_distance: f32,
    /// The added text; `{{passages}}` is replaced.
    pub template: String,
    /// One passage; `{{text}}`, `{{source}}`, `{{distance}}` are replaced.
    pub passage_template: String,
    /// Between passages.
    pub separator: String,
}

impl Default for Retrieval {
    fn default() -> Self {
        Self {
            collection: None,
            top_k: DEFAULT_TOP_K,
            max_added_tokens: DEFAULT_MAX_ADDED_TOKENS,
            max_distance: DEFAULT_MAX_DISTANCE as f32,
            template: DEFAULT_TEMPLATE.into(),
            passage_template: DEFAULT_PASSAGE_TEMPLATE.into(),
            separator: DEFAULT_SEPARATOR.into(),
        }
    }
}

/// The fields of [`Retrieval`], in plugin config and route metadata alike.
pub const RETRIEVAL_FIELDS: &[&str] =
    &["collection", "top_k", "max_added_tokens", "max_distance", "template", "passage_template", "separator"];

/// A number that may arrive as text: Envoy turns a YAML float in route metadata
/// (`max_distance: 0.6`) into the string `"0.6"` (integers stay numbers).
fn number(o: &Obj<'_>, key: &str) -> Result<Option<f64>, ConfigError> {
    match o.get(key) {
        Some(Value::String(s)) => {
            // serde_json's parser, not str::parse (which links another float parser into the wasm).
            serde_json::from_slice::<Value>(s.trim().as_bytes())
                .ok()
                .and_then(|v| v.as_f64())
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| o.err(key, format!("expected a number, got {s:?}")))
        }
        _ => o.number(key),
    }
}

/// An integer in `[min, max]` that may arrive as text (see [`number`]).
fn ranged(o: &Obj<'_>, key: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
    match o.get(key) {
        Some(Value::String(s)) => match s.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            Ok(n) => Err(o.err(key, format!("must be between {min} and {max}, got {n}"))),
            Err(_) => Err(o.err(key, format!("expected a non-negative integer, got {s:?}"))),
        },
        _ => o.ranged(key, min, max),
    }
}

impl Retrieval {
    /// `self` with the fields present in `o` replaced.
    pub fn merge(&self, o: &Obj<'_>) -> Result<Self, ConfigError> {
        let mut r = self.clone();
        if let Some(c) = o.non_empty("collection")? {
            r.collection = Some(check_collection_name(&c).map_err(|why| o.err("collection", why))?);
        }
        if let Some(k) = ranged(o, "top_k", 1, 100)? {
            r.top_k = usize::try_from(k).unwrap_or(DEFAULT_TOP_K);
        }
        if let Some(t) = ranged(o, "max_added_tokens", 1, 1_000_000)? {
            r.max_added_tokens = t;
        }
        match number(o, "max_distance")? {
            Some(d) if !(0.0..=2.0).contains(&d) => {
                return Err(o.err("max_distance", "must be between 0 and 2 (cosine distance)"))
            }
            Some(d) => r.max_distance = d as f32,
            None => {}
        }
        if let Some(t) = o.string("template")? {
            if !t.contains("{{passages}}") {
                return Err(o.err("template", "must contain {{passages}}"));
            }
            r.template = t;
        }
        if let Some(t) = o.string("passage_template")? {
            if !t.contains("{{text}}") {
                return Err(o.err("passage_template", "must contain {{text}}"));
            }
            r.passage_template = t;
        }
        if let Some(s) = o.string("separator")? {
            r.separator = s;
        }
        Ok(r)
    }

    /// The settings of a route: its `sluice.rag` metadata over the plugin's defaults.
    /// `Ok(None)`: RAG is off on this route (no `rag` key, or `rag: false`).
    pub fn for_route(&self, meta: Option<&Value>) -> Result<Option<Self>, ConfigError> {
        let r = match meta {
            None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(None),
            Some(Value::Bool(true)) => self.clone(),
            Some(Value::String(s)) if s == "false" => return Ok(None),
            Some(Value::String(s)) => {
                let mut r = self.clone();
                r.collection = Some(check_collection_name(s).map_err(|why| ConfigError::new("rag", why))?);
                r
            }
            Some(v) => {
                let o = Obj::new(v, "rag")?;
                o.known(RETRIEVAL_FIELDS)?;
                self.merge(&o)?
            }
        };
        if r.collection.is_none() {
            return Err(ConfigError::new(
                "rag.collection",
                "missing (no collection in the route metadata nor in the filter config)",
            ));
        }
        Ok(Some(r))
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The embeddings endpoint.
    pub embeddings: Embeddings,
    /// The vector store.
    pub store: Chroma,
    /// Defaults for every route.
    pub defaults: Retrieval,
    /// Embeddings or store down or slow: forward unchanged (`Allow`) or answer 503 (`Deny`).
    pub failure_mode: FailureMode,
    /// Largest request body read; a larger one gets 413.
    pub max_request_body_bytes: usize,
}

impl Config {
    /// Read and check the configuration object.
    pub fn load(o: Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut known = vec!["embeddings", "store", "failure_mode", "max_request_body_bytes"];
        known.extend(RETRIEVAL_FIELDS.iter().filter(|f| **f != "collection"));
        o.known(&known)?;
        let embeddings = o
            .object("embeddings", |e| Embeddings::load(e, env))?
            .ok_or_else(|| o.err("embeddings", "missing field"))?;
        let (store, collection) =
            o.object("store", |s| load_store(s, env, None))?.ok_or_else(|| o.err("store", "missing field"))?;
        let mut defaults = Retrieval::default().merge(&o)?;
        defaults.collection = collection;
        let max_request_body_bytes = match o.count("max_request_body_bytes")? {
            None => DEFAULT_MAX_REQUEST_BODY_BYTES,
            Some(0) => return Err(o.err("max_request_body_bytes", "must be greater than 0")),
            Some(n) => n,
        };
        Ok(Self {
            embeddings,
            store,
            defaults,
            failure_mode: o.failure_mode("failure_mode")?.unwrap_or(FailureMode::Allow),
            max_request_body_bytes,
        })
    }

    /// Parse a whole document (tests, config-check).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        sluice_core::config::read(bytes, |o| Self::load(o, &|_| None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = r#""embeddings":{"cluster":"emb","model":"m"},"store":{"cluster":"chroma""#;

    #[test]
    fn defaults_and_all_fields() {
        let c = Config::parse(format!("{{{BASE}}}}}").as_bytes()).unwrap();
        assert_eq!(c.defaults, Retrieval::default());
        assert_eq!(c.failure_mode, FailureMode::Allow);
        let c = Config::parse(
            format!(
                r#"{{{BASE},"collection":"docs"}},"top_k":5,"max_added_tokens":100,"max_distance":0.5,
                "template":"Ctx: {{{{passages}}}}","passage_template":"[{{{{source}}}}] {{{{text}}}}","separator":"\n",
                "failure_mode":"deny","max_request_body_bytes":10}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let d = &c.defaults;
        assert_eq!((d.collection.as_deref(), d.top_k, d.max_added_tokens), (Some("docs"), 5, 100));
        assert_eq!(
            (d.template.as_str(), d.passage_template.as_str(), d.separator.as_str()),
            ("Ctx: {{passages}}", "[{{source}}] {{text}}", "\n")
        );
        assert_eq!((c.failure_mode, c.max_request_body_bytes), (FailureMode::Deny, 10));
    }

    #[test]
    fn errors_name_the_field() {
        for (doc, field) in [
            ("{}".to_string(), "embeddings"),
            (r#"{"embeddings":{"cluster":"e","model":"m"}}"#.to_string(), "store"),
            (format!(r#"{{{BASE}}},"top_k":0}}"#), "top_k"),
            (format!(r#"{{{BASE}}},"max_distance":-1}}"#), "max_distance"),
            (format!(r#"{{{BASE}}},"template":"no placeholder"}}"#), "template"),
            (format!(r#"{{{BASE}}},"passage_template":"x"}}"#), "passage_template"),
            (format!(r#"{{{BASE}}},"collection":"docs"}}"#), "collection"),
            (format!(r#"{{{BASE},"collection":"d"}}}}"#), "store.collection"),
        ] {
            let e = Config::parse(doc.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{doc}: {e}");
        }
    }

    #[test]
    fn route_settings_override_the_defaults() {
        let d = Retrieval { collection: Some("docs".into()), ..Retrieval::default() };
        assert_eq!(d.for_route(None).unwrap(), None);
        assert_eq!(d.for_route(Some(&json!(false))).unwrap(), None);
        assert_eq!(d.for_route(Some(&json!(true))).unwrap(), Some(d.clone()));
        assert_eq!(d.for_route(Some(&json!("cheeses"))).unwrap().unwrap().collection.as_deref(), Some("cheeses"));
        let r = d.for_route(Some(&json!({"collection": "cheeses", "top_k": 1, "max_distance": 0.3}))).unwrap().unwrap();
        assert_eq!(
            (r.collection.as_deref(), r.top_k, r.max_added_tokens),
            (Some("cheeses"), 1, DEFAULT_MAX_ADDED_TOKENS)
        );
        assert!((r.max_distance - 0.3).abs() < 1e-6);
        // Envoy hands a YAML float in route metadata over as a string.
        let r = d.for_route(Some(&json!({"max_distance": "0.6", "top_k": "2"}))).unwrap().unwrap();
        assert!((r.max_distance - 0.6).abs() < 1e-6 && r.top_k == 2);
        assert_eq!(d.for_route(Some(&json!({"max_distance": "near"}))).unwrap_err().field, "rag.max_distance");
        assert_eq!(d.for_route(Some(&json!({"top_k": "0"}))).unwrap_err().field, "rag.top_k");
        assert_eq!(d.for_route(Some(&json!({"topk": 1}))).unwrap_err().field, "rag.topk");
        assert_eq!(d.for_route(Some(&json!({"top_k": "x"}))).unwrap_err().field, "rag.top_k");
        assert_eq!(d.for_route(Some(&json!({"top_k": true}))).unwrap_err().field, "rag.top_k");
        assert_eq!(Retrieval::default().for_route(Some(&json!(true))).unwrap_err().field, "rag.collection");
        assert_eq!(d.for_route(Some(&json!(7))).unwrap_err().field, "rag");
    }
}
