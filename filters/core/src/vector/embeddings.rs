//! The embeddings client: any OpenAI-compatible `POST /v1/embeddings` (OpenAI, Azure OpenAI,
//! Ollama, vLLM, LiteLLM, the mock provider, or this gateway itself). Pure request builder
//! and response parser; the stage sends the call with [`Upstream::dispatch`].

use super::upstream::{HttpCall, Upstream, UpstreamDefaults, UPSTREAM_FIELDS};
use crate::config::{ConfigError, Obj};
use serde_json::{json, Value};
use std::time::Duration;

/// Longest text sent to be embedded (cut on a char boundary): embedding models take a few
/// thousand tokens at most.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 16 * 1024;

/// The configured embeddings endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// Where to send it.
    pub upstream: Upstream,
    /// `:path`.
    pub path: String,
    /// `model` of the request.
    pub model: String,
    /// `dimensions` of the request, when set.
    pub dimensions: Option<u64>,
    /// Longest input sent (bytes).
    pub max_input_bytes: usize,
}

/// Why an embeddings answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingError {
    /// No answer or a non-2xx status.
    Status(Option<u16>),
    /// The body is not an embeddings list with a float vector.
    Malformed(String),
}

impl std::fmt::Display for EmbeddingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(Some(s)) => write!(f, "status {s}"),
            Self::Status(None) => f.write_str("no response (timeout, reset or no upstream)"),
            Self::Malformed(why) => write!(f, "malformed answer: {why}"),
        }
    }
}

const FIELDS: &[&str] = &["path", "model", "dimensions", "max_input_bytes"];

impl Embeddings {
    /// Read the `embeddings` block.
    pub fn load(o: Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let known: Vec<&str> = UPSTREAM_FIELDS.iter().chain(FIELDS).copied().collect();
        o.known(&known)?;
        let upstream = Upstream::load(
            &o,
            env,
            &UpstreamDefaults {
                authority: "api.openai.com",
                timeout: Duration::from_secs(2),
                credential_header: "authorization",
                credential_prefix: "Bearer ",
            },
        )?;
        let path = o.non_empty("path")?.unwrap_or_else(|| "/v1/embeddings".to_string());
        if !path.starts_with('/') {
            return Err(o.err("path", "must start with /"));
        }
        let model = o.non_empty("model")?.ok_or_else(|| o.err("model", "missing field"))?;
        let dimensions = o.ranged("dimensions", 1, 65536)?;
        let max_input_bytes = match o.count("max_input_bytes")? {
            None => DEFAULT_MAX_INPUT_BYTES,
            Some(0) => return Err(o.err("max_input_bytes", "must be greater than 0")),
            Some(n) => n,
        };
        Ok(Self { upstream, path, model, dimensions, max_input_bytes })
    }

    /// The request embedding `text` (cut to `max_input_bytes`).
    pub fn request(&self, text: &str) -> HttpCall {
        let mut body = json!({"model": self.model, "input": crate::json::cut(text, self.max_input_bytes)});
        if let (Some(d), Some(o)) = (self.dimensions, body.as_object_mut()) {
            o.insert("dimensions".into(), Value::from(d));
        }
        HttpCall::post(self.path.clone(), &body)
    }
}

/// The first vector of an embeddings answer (`{"data":[{"embedding":[...]}]}`), checked:
/// non-empty, finite numbers only.
pub fn parse_embedding(status: Option<u16>, body: Option<&[u8]>) -> Result<Vec<f32>, EmbeddingError> {
    if !status.is_some_and(|s| (200..300).contains(&s)) {
        return Err(EmbeddingError::Status(status));
    }
    let v: Value = body
        .and_then(|b| serde_json::from_slice(b).ok())
        .ok_or_else(|| EmbeddingError::Malformed("not JSON".into()))?;
    let first = v
        .get("data")
        .and_then(Value::as_array)
        .and_then(|d| d.iter().find(|item| item.get("index").and_then(Value::as_u64).unwrap_or(0) == 0))
        .ok_or_else(|| EmbeddingError::Malformed("no data[0]".into()))?;
    let nums = first
        .get("embedding")
        .and_then(Value::as_array)
        .ok_or_else(|| EmbeddingError::Malformed("data[0].embedding is not a list of floats".into()))?;
    if nums.is_empty() {
        return Err(EmbeddingError::Malformed("empty embedding".into()));
    }
    let mut out = Vec::with_capacity(nums.len());
    for n in nums {
        let f = n
            .as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| EmbeddingError::Malformed("non-numeric component".into()))?;
        out.push(f as f32);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::read;

    fn load(doc: &str) -> Result<Embeddings, ConfigError> {
        read(doc.as_bytes(), |o| Embeddings::load(o, &|_| None))
    }

    #[test]
    fn builds_an_openai_request() {
        let e =
            load(r#"{"cluster":"emb","model":"text-embedding-3-small","dimensions":256,"max_input_bytes":5}"#).unwrap();
        let call = e.request("héllo world");
        assert_eq!(call.path, "/v1/embeddings");
        let body: Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert_eq!(body, json!({"model": "text-embedding-3-small", "input": "héll", "dimensions": 256}));
        assert_eq!(e.upstream.timeout, Duration::from_secs(2));
        let plain = load(r#"{"cluster":"emb","model":"m","path":"/openai/v1/embeddings"}"#).unwrap();
        let body: Value = serde_json::from_slice(plain.request("x").body.as_ref().unwrap()).unwrap();
        assert!(body.get("dimensions").is_none());
    }

    #[test]
    fn config_errors() {
        for (doc, field) in [
            (r#"{"cluster":"c"}"#, "model"),
            (r#"{"cluster":"c","model":"m","path":"v1"}"#, "path"),
            (r#"{"cluster":"c","model":"m","dimensions":0}"#, "dimensions"),
            (r#"{"cluster":"c","model":"m","max_input_bytes":0}"#, "max_input_bytes"),
            (r#"{"cluster":"c","model":"m","extra":1}"#, "extra"),
        ] {
            assert_eq!(load(doc).unwrap_err().field, field, "{doc}");
        }
    }

    #[test]
    fn parses_vectors_and_refuses_everything_else() {
        let ok =
            br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,-0.25,1]}],"model":"m"}"#;
        assert_eq!(parse_embedding(Some(200), Some(ok)).unwrap(), vec![0.5, -0.25, 1.0]);
        assert_eq!(parse_embedding(Some(503), Some(ok)), Err(EmbeddingError::Status(Some(503))));
        assert_eq!(parse_embedding(None, None), Err(EmbeddingError::Status(None)));
        for bad in [
            &b"nope"[..],
            br#"{"data":[]}"#,
            br#"{"data":[{"index":0,"embedding":"AAAA"}]}"#,
            br#"{"data":[{"index":0,"embedding":[]}]}"#,
            br#"{"data":[{"index":0,"embedding":[1,"x"]}]}"#,
        ] {
            assert!(matches!(parse_embedding(Some(200), Some(bad)), Err(EmbeddingError::Malformed(_))), "{bad:?}");
        }
    }
}
