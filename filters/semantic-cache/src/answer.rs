//! A cached answer: what is stored (one compact record, whether the provider's answer was JSON
//! or a stream) and how a hit is replayed — a `chat.completion` JSON body, or for
//! `stream: true` SSE chunks in OpenAI's format (role chunk, content chunks, finish chunk,
//! the usage chunk when the client asked for `stream_options.include_usage`, `[DONE]`).

use serde_json::{json, Map, Value};

/// Record format version (a change makes old entries misses, never wrong answers).
pub const VERSION: u64 = 1;

/// Content bytes per replayed SSE chunk (at least; chunks end after a space).
pub const REPLAY_CHUNK_BYTES: usize = 24;

/// One cached answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Model the provider named.
    pub model: String,
    /// The assistant's text.
    pub text: String,
    /// `finish_reason` (only `stop` answers are stored).
    pub finish_reason: String,
    /// Prompt tokens the original call used.
    pub input_tokens: u64,
    /// Completion tokens the original call used (the saving of a hit).
    pub output_tokens: u64,
}

impl Answer {
    /// From a non-streaming `chat.completion` body: one choice with text content, `stop`.
    pub fn from_chat_json(body: &Value) -> Option<Self> {
        let choices = body.get("choices")?.as_array()?;
        let [choice] = choices.as_slice() else { return None };
        let message = choice.get("message")?;
        if message.get("tool_calls").is_some_and(|t| !t.is_null()) {
            return None;
        }
        let text = message.get("content")?.as_str()?.to_string();
        let finish_reason = choice.get("finish_reason")?.as_str()?.to_string();
        let usage = body.get("usage");
        let n = |k: &str| usage.and_then(|u| u.get(k)).and_then(Value::as_u64).unwrap_or(0);
        let model = body.get("model").and_then(Value::as_str).unwrap_or_default().to_string();
        Some(Self {
            model,
            text,
            finish_reason,
            input_tokens: n("prompt_tokens"),
            output_tokens: n("completion_tokens"),
        })
    }

    /// Whether this answer may be stored: complete (`stop`) and not empty.
    pub fn storable(&self) -> bool {
        self.finish_reason == "stop" && !self.text.is_empty()
    }

    /// The stored record.
    pub fn encode(&self) -> String {
        json!({"v": VERSION, "model": self.model, "text": self.text, "finish_reason": self.finish_reason,
               "input_tokens": self.input_tokens, "output_tokens": self.output_tokens})
        .to_string()
    }

    /// Parse [`Answer::encode`] (`None` for another version or a damaged record).
    pub fn decode(s: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(s).ok()?;
        if v.get("v").and_then(Value::as_u64) != Some(VERSION) {
            return None;
        }
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some(Self {
            model: text("model")?,
            text: text("text")?,
            finish_reason: text("finish_reason")?,
            input_tokens: num("input_tokens"),
            output_tokens: num("output_tokens"),
        })
    }

    fn usage(&self) -> Value {
        json!({"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens,
               "total_tokens": self.input_tokens.saturating_add(self.output_tokens)})
    }

    /// The replay as a `chat.completion` body.
    pub fn chat_json(&self, id: &str, created: u64, model: &str) -> Vec<u8> {
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": self.reply_model(model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text, "refusal": null},
                         "logprobs": null, "finish_reason": self.finish_reason}],
            "usage": self.usage(),
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }

    fn reply_model<'a>(&'a self, requested: &'a str) -> &'a str {
        if self.model.is_empty() {
            requested
        } else {
            &self.model
        }
    }

    /// The replay as SSE chunks (`include_usage`: the client asked for the usage chunk).
    pub fn chat_sse(&self, id: &str, created: u64, model: &str, include_usage: bool) -> Vec<u8> {
        let model = self.reply_model(model);
        let mut out = Vec::with_capacity(self.text.len() * 2 + 512);
        let mut push = |choices: Value, usage: Option<Value>| {
            let mut chunk = Map::new();
            chunk.insert("id".into(), Value::from(id));
            chunk.insert("object".into(), Value::from("chat.completion.chunk"));
            chunk.insert("created".into(), Value::from(created));
            chunk.insert("model".into(), Value::from(model));
            chunk.insert("choices".into(), choices);
            if include_usage {
                chunk.insert("usage".into(), usage.unwrap_or(Value::Null));
            }
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(Value::Object(chunk).to_string().as_bytes());
            out.extend_from_slice(b"\n\n");
        };
        let delta =
            |d: Value, finish: Value| json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}]);
        push(delta(json!({"role": "assistant", "content": ""}), Value::Null), None);
        for piece in pieces(&self.text, REPLAY_CHUNK_BYTES) {
            push(delta(json!({"content": piece}), Value::Null), None);
        }
        push(delta(json!({}), Value::from(self.finish_reason.as_str())), None);
        if include_usage {
            push(json!([]), Some(self.usage()));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }
}

/// Split `text` into pieces of at least `min` bytes that end after whitespace (or at the end),
/// always on char boundaries. Concatenated, the pieces are `text`.
pub fn pieces(text: &str, min: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut since = 0usize;
    for (i, c) in text.char_indices() {
        since = since.saturating_add(c.len_utf8());
        if c.is_whitespace() && since >= min {
            let end = i + c.len_utf8();
            if let Some(p) = text.get(start..end) {
                out.push(p);
            }
            start = end;
            since = 0;
        }
    }
    if let Some(rest) = text.get(start..).filter(|r| !r.is_empty()) {
        out.push(rest);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> Answer {
        Answer {
            model: "gpt-4o-2024".into(),
            text: "Paris is the capital of France, on the Seine.".into(),
            finish_reason: "stop".into(),
            input_tokens: 12,
            output_tokens: 9,
        }
    }

    fn events(sse: &[u8]) -> Vec<String> {
        String::from_utf8(sse.to_vec())
            .unwrap()
            .split("\n\n")
            .filter(|b| !b.is_empty())
            .map(|b| b.strip_prefix("data: ").unwrap().to_string())
            .collect()
    }

    #[test]
    fn from_provider_json_and_round_trip() {
        let body = json!({"id": "chatcmpl-1", "model": "gpt-4o-2024", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "Paris is the capital of France, on the Seine."},
            "finish_reason": "stop"}], "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}});
        let a = Answer::from_chat_json(&body).unwrap();
        assert_eq!(a, answer());
        assert!(a.storable());
        assert_eq!(Answer::decode(&a.encode()), Some(a));
        assert_eq!(Answer::decode(r#"{"v":2,"model":"m","text":"t","finish_reason":"stop"}"#), None);
        assert_eq!(Answer::decode("garbage"), None);

        let mut cut = body.clone();
        cut["choices"][0]["finish_reason"] = json!("length");
        assert!(!Answer::from_chat_json(&cut).unwrap().storable(), "a cut answer is not stored");
        let mut tool = body.clone();
        tool["choices"][0]["message"]["tool_calls"] = json!([{"id": "c"}]);
        assert_eq!(Answer::from_chat_json(&tool), None);
        let mut two = body.clone();
        two["choices"] = json!([body["choices"][0], body["choices"][0]]);
        assert_eq!(Answer::from_chat_json(&two), None);
        let mut refusal = body;
        refusal["choices"][0]["message"]["content"] = Value::Null;
        assert_eq!(Answer::from_chat_json(&refusal), None);
    }

    #[test]
    fn json_replay_is_a_chat_completion() {
        let v: Value = serde_json::from_slice(&answer().chat_json("chatcmpl-cache-1", 1730000000, "gpt-4o")).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-4o-2024");
        assert_eq!(v["choices"][0]["message"]["content"], "Paris is the capital of France, on the Seine.");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"], json!({"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}));
    }

    #[test]
    fn sse_replay_has_openai_chunks_and_usage_only_when_asked() {
        let sse = answer().chat_sse("chatcmpl-cache-1", 1730000000, "gpt-4o", true);
        let ev = events(&sse);
        assert_eq!(ev.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0)?.pointer("/delta/content")?.as_str().map(str::to_string))
            .collect();
        assert_eq!(text, answer().text);
        assert!(chunks.len() > 4, "the text comes in several chunks: {}", chunks.len());
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert_eq!(finish["usage"], Value::Null);
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 21);
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], "chatcmpl-cache-1");
        }

        let plain = events(&answer().chat_sse("x", 1, "gpt-4o", false));
        assert!(plain.iter().all(|e| !e.contains("\"usage\"")), "no usage key without include_usage: {plain:?}");
    }

    #[test]
    fn pieces_cover_the_text_on_char_boundaries() {
        for text in
            ["", "one", "Paris is the capital of France, on the Seine.", "héllo wörld ünïcode çà et là ok", "a  b   c"]
        {
            for min in [1, 5, 24] {
                let p = pieces(text, min);
                assert_eq!(p.concat(), text);
                assert!(p.iter().all(|s| !s.is_empty()));
            }
        }
        assert_eq!(pieces("aa bb cc", 3), ["aa ", "bb ", "cc"]);
        assert_eq!(pieces("aa bb cc", 4), ["aa bb ", "cc"]);
    }
}
