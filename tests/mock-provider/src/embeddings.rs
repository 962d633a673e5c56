//! `POST …/embeddings`: deterministic embeddings from hashed word features,
//! so paraphrases land close together and unrelated texts are near
//! orthogonal. No I/O here.

use serde_json::{json, Value};

use crate::codec;
use crate::provider::UsageReport;

/// Words dropped before hashing (lowercase).
pub const STOPWORDS: &[&str] = &[
    "a", "about", "an", "and", "are", "as", "at", "be", "by", "can", "could", "do", "does", "for", "from", "give",
    "how", "i", "in", "is", "it", "me", "my", "of", "on", "or", "please", "show", "tell", "that", "the", "this", "to",
    "was", "we", "what", "which", "who", "with", "would", "you", "your",
];

/// Largest accepted `dimensions` / `--embedding-dim`.
pub const MAX_DIM: usize = 65536;

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The features of `text`: lowercased words split on non-alphanumeric
/// characters, stopwords dropped, a trailing `s` stripped from words longer
/// than 3 characters.
pub fn features(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !STOPWORDS.contains(w))
        .map(|w| match w.strip_suffix('s') {
            Some(stem) if w.chars().count() > 3 => stem.to_string(),
            _ => w.to_string(),
        })
        .collect()
}

/// The unit-length embedding of `text` with `dim` components (at least 1):
/// each feature's FNV-1a hash picks bucket `hash % dim` and adds `+1` or
/// `-1` by the hash's top bit. A text without features gets `[1, 0, 0, …]`.
pub fn embed(text: &str, dim: usize) -> Vec<f32> {
    let dim = dim.clamp(1, MAX_DIM);
    let mut v = vec![0f32; dim];
    let buckets = u64::try_from(dim).unwrap_or(1);
    for word in features(text) {
        let h = fnv1a(word.as_bytes());
        let bucket = usize::try_from(h % buckets).unwrap_or(0);
        let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
        if let Some(slot) = v.get_mut(bucket) {
            *slot += sign;
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    } else if let Some(first) = v.first_mut() {
        *first = 1.0;
    }
    v
}

/// The request's `input` as a list of strings. Token-id arrays and any
/// other shape are rejected with the message to send back.
pub fn parse_input(body: &Value) -> Result<Vec<String>, String> {
    const TOKENS: &str = "Token-id input (arrays of integers) is not supported by the mock provider; send a string or an array of strings.";
    match body.get("input") {
        None | Some(Value::Null) => Err("'input' is a required property".into()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if items.is_empty() => Err("'$.input' is invalid: it must not be empty.".into()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Number(_) | Value::Array(_) => Err(TOKENS.to_string()),
                _ => Err("'$.input' is invalid: expected a string or an array of strings.".to_string()),
            })
            .collect(),
        Some(Value::Number(_)) => Err(TOKENS.into()),
        Some(_) => Err("'$.input' is invalid: expected a string or an array of strings.".into()),
    }
}

/// Lenient version for rendering: whatever strings can be found.
pub fn input_strings(body: &Value) -> Vec<String> {
    match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// UTF-8 bytes of every input string.
pub fn input_bytes(body: &Value) -> usize {
    input_strings(body).iter().map(String::len).sum()
}

/// Checks `encoding_format` and `dimensions`; returns `(base64, dim)`.
pub fn parse_options(body: &Value, default_dim: usize) -> Result<(bool, usize), String> {
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "float" => false,
        Some(Value::String(s)) if s == "base64" => true,
        Some(other) => return Err(format!("{other} is not one of ['float', 'base64'] - 'encoding_format'")),
    };
    let dim = match body.get("dimensions") {
        None | Some(Value::Null) => default_dim,
        Some(v) => match v.as_u64().and_then(|d| usize::try_from(d).ok()) {
            Some(d @ 1..=MAX_DIM) => d,
            _ => return Err(format!("Invalid value for 'dimensions': {v} (expected an integer 1..={MAX_DIM}).")),
        },
    };
    Ok((base64, dim))
}

/// The `embedding` value: a float array, or base64 of little-endian f32.
pub fn encode(vector: &[f32], base64: bool) -> Value {
    if base64 {
        let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        json!(codec::base64(&bytes))
    } else {
        Value::Array(vector.iter().map(|&x| json!(f64::from(x))).collect())
    }
}

/// Usage object of an embeddings answer (`None` with `--no-usage`).
pub fn usage_json(usage: UsageReport) -> Option<Value> {
    match usage {
        UsageReport::Omitted => None,
        UsageReport::Garbage => Some(json!({"prompt_tokens": "x", "total_tokens": "lots"})),
        UsageReport::Counts { prompt, .. } => Some(json!({"prompt_tokens": prompt, "total_tokens": prompt})),
    }
}

/// The whole `list` body.
pub fn body(inputs: &[String], dim: usize, base64: bool, model: &str, usage: UsageReport) -> Value {
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": encode(&embed(text, dim), base64)}))
        .collect();
    let mut body = json!({"object": "list", "data": data, "model": model});
    if let (Some(usage), Some(obj)) = (usage_json(usage), body.as_object_mut()) {
        obj.insert("usage".into(), usage);
    }
    body
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::codec::tests::unbase64;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn norm(a: &[f32]) -> f32 {
        a.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    #[test]
    fn fnv1a_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn features_normalise() {
        assert_eq!(features("What is the capital of France?"), vec!["capital", "france"]);
        assert_eq!(features("Tell me the capital city of France"), vec!["capital", "city", "france"]);
        assert_eq!(features("Capitals, BUS; cats!"), vec!["capital", "bus", "cat"]);
        assert!(features("what is the").is_empty());
    }

    #[test]
    fn paraphrases_are_close_unrelated_are_not() {
        let a = embed("What is the capital of France?", 256);
        let b = embed("Tell me the capital city of France", 256);
        let c = embed("How do I bake sourdough bread at home", 256);
        assert_eq!(a.len(), 256);
        for v in [&a, &b, &c] {
            assert!((norm(v) - 1.0).abs() < 1e-5);
        }
        assert!(cosine(&a, &b) > 0.8, "{}", cosine(&a, &b));
        assert!(cosine(&a, &c).abs() < 0.1, "{}", cosine(&a, &c));
        assert_eq!(embed("What is the capital of France?", 256), a, "deterministic");
        assert!((cosine(&embed("the capitals of france", 256), &a) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn empty_text_gets_fixed_unit_vector() {
        let v = embed("the of a", 8);
        assert_eq!(v, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(embed("", 8), v);
        assert_eq!(embed("x", 0).len(), 1);
    }

    #[test]
    fn input_shapes() {
        assert_eq!(parse_input(&json!({"input": "a"})).unwrap(), vec!["a"]);
        assert_eq!(parse_input(&json!({"input": ["a", "b"]})).unwrap(), vec!["a", "b"]);
        assert!(parse_input(&json!({"input": [1, 2]})).unwrap_err().contains("Token-id"));
        assert!(parse_input(&json!({"input": [[1, 2]]})).unwrap_err().contains("Token-id"));
        assert!(parse_input(&json!({"input": 5})).unwrap_err().contains("Token-id"));
        assert!(parse_input(&json!({})).unwrap_err().contains("required"));
        assert!(parse_input(&json!({"input": []})).is_err());
        assert!(parse_input(&json!({"input": {"a": 1}})).is_err());
        assert_eq!(input_bytes(&json!({"input": ["héllo", "ab", 3]})), 8);
    }

    #[test]
    fn options() {
        assert_eq!(parse_options(&json!({}), 256).unwrap(), (false, 256));
        assert_eq!(parse_options(&json!({"encoding_format": "base64", "dimensions": 8}), 256).unwrap(), (true, 8));
        assert!(parse_options(&json!({"encoding_format": "hex"}), 256).unwrap_err().contains("encoding_format"));
        assert!(parse_options(&json!({"dimensions": 0}), 256).is_err());
    }

    #[test]
    fn body_shape_and_base64() {
        let inputs = vec!["capital of France".to_string(), "bread".to_string()];
        let usage = UsageReport::Counts { prompt: 6, completion: 0, cached: None, reasoning: None };
        let floats = body(&inputs, 16, false, "emb", usage);
        assert_eq!(floats["object"], "list");
        assert_eq!(floats["model"], "emb");
        assert_eq!(floats["usage"], json!({"prompt_tokens": 6, "total_tokens": 6}));
        assert_eq!(floats["data"][1]["index"], 1);
        assert_eq!(floats["data"][0]["object"], "embedding");
        let as_floats: Vec<f64> =
            floats["data"][0]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(as_floats.len(), 16);
        let encoded = body(&inputs, 16, true, "emb", usage);
        let bytes = unbase64(encoded["data"][0]["embedding"].as_str().unwrap());
        let decoded: Vec<f64> = bytes.chunks(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect();
        assert_eq!(decoded, as_floats);
        assert!(body(&inputs, 4, false, "e", UsageReport::Omitted).get("usage").is_none());
    }
}
