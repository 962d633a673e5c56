//! Fuzz-style tests for the wire types and usage extraction.
//!
//! Valid request/response bodies are mutated at random (byte flips, truncations, insertions of
//! JSON punctuation, deep nesting, value swaps) and fed to every parse function: nothing may
//! panic, and whatever parses must serialize back to a JSON value equal to its input.
//! A deterministic xorshift PRNG keeps failures reproducible (the seed is printed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use serde_json::{json, Value};
use sluice_core::sse::{SseEvent, SseParser};
use sluice_core::usage::{usage_from_json, usage_from_value, StreamUsage};
use sluice_core::wire::{ChatRequest, ChatResponse, ErrorBody, WireError};

mod common;
use common::Rng;

fn fixtures() -> Vec<Value> {
    vec![
        json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this image? 日本 😀"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_abc", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temp\":21}"}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "auto",
            "parallel_tool_calls": true,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}},
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 100,
            "max_completion_tokens": null,
            "temperature": 0.7,
            "x_vendor": {"a": [1, 2]}
        }),
        json!({"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"], "max_tokens": 5, "messages": []}),
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                      "prompt_tokens_details": {"cached_tokens": 0}}
        }),
        json!({"id": "c", "object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": null,
                   "tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]},
                   "finish_reason": null}], "usage": null}),
        json!({"id": "c", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
        json!({"type": "message", "usage": {"input_tokens": 4, "output_tokens": 5}}),
        json!({"error": {"message": "m", "type": "invalid_request_error", "param": null, "code": "x"}}),
    ]
}

const INSERTS: &[&str] =
    &["{", "[", "\"", "\\", "}", "]", ",", ":", "null", "-1", "1.5", "\"x\"", "é", "😀", "\\u0000", "\\ud800"];

/// One random byte-level mutation.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    let at = rng.below(input.len() + 1);
    match rng.below(7) {
        0 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] = rng.next() as u8;
        }
        1 => input.truncate(at),
        2 => {
            let s = rng.pick(INSERTS).as_bytes().to_vec();
            input.splice(at..at, s);
        }
        3 => {
            // Deep nesting, closed or not.
            let depth = *rng.pick(&[10usize, 127, 128, 129, 500, 5000]);
            let open = *rng.pick(&["[", "{\"a\":"]);
            let mut s = open.repeat(depth);
            if rng.below(2) == 0 {
                s.push('1');
                s.push_str(&(if open == "[" { "]" } else { "}" }).repeat(depth));
            }
            input.splice(at..at, s.into_bytes());
        }
        4 if !input.is_empty() => {
            let end = at + rng.below(input.len() - at.min(input.len()) + 1);
            input.drain(at..end.min(input.len()));
        }
        5 => {
            let end = (at + rng.below(32)).min(input.len());
            let copy = input[at..end].to_vec();
            input.splice(at..at, copy);
        }
        _ => input.insert(at, rng.next() as u8),
    }
}

/// A random JSON value, shallow.
fn random_value(rng: &mut Rng) -> Value {
    match rng.below(9) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.next() >> rng.below(64)),
        3 => json!(-(rng.below(1000) as i64)),
        4 => json!(rng.below(1000) as f64 / 7.0),
        5 => json!(*rng.pick(&["", "x", "日本", "[DONE]", "assistant"])),
        6 => json!([]),
        7 => json!({}),
        _ => json!([null, {"type": "text", "text": "t"}, 1]),
    }
}

/// Replace, add or remove a random value somewhere in the tree (keeps valid JSON).
fn mutate_value(rng: &mut Rng, value: &mut Value) {
    match value {
        Value::Object(map) if !map.is_empty() && rng.below(4) != 0 => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            match rng.below(5) {
                0 => *map.get_mut(&key).unwrap() = random_value(rng),
                1 => {
                    map.remove(&key);
                }
                _ => mutate_value(rng, map.get_mut(&key).unwrap()),
            }
        }
        Value::Array(items) if !items.is_empty() && rng.below(4) != 0 => {
            let i = rng.below(items.len());
            if rng.below(4) == 0 {
                items[i] = random_value(rng);
            } else {
                mutate_value(rng, &mut items[i]);
            }
        }
        Value::Object(map) => {
            let key = (*rng.pick(&["content", "role", "messages", "choices", "usage", "delta", "x", "type", "text"]))
                .to_string();
            map.insert(key, random_value(rng));
        }
        _ => *value = random_value(rng),
    }
}

/// Feed `body` to every parser; check round trips where parsing succeeds.
fn exercise(body: &[u8], context: &str) -> usize {
    let mut parsed = 0;
    let as_value: Option<Value> = serde_json::from_slice(body).ok();
    match ChatRequest::parse(body) {
        Ok(req) => {
            parsed += 1;
            let out = req.to_vec();
            let back: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(Some(&back), as_value.as_ref(), "{context}: request round trip");
            assert_eq!(ChatRequest::parse(&out).unwrap(), req, "{context}: reparse");
            let _ = (req.prompt_bytes(), req.include_usage());
            for m in &req.messages {
                let _ = m.text_len();
            }
        }
        Err(WireError::NotJson | WireError::NotUtf8) => assert!(as_value.is_none(), "{context}"),
        Err(WireError::Shape(why)) => assert!(!why.is_empty() && as_value.is_some(), "{context}"),
    }
    match ChatResponse::parse(body) {
        Ok(resp) => {
            parsed += 1;
            let back: Value = serde_json::from_slice(&resp.to_vec()).unwrap();
            assert_eq!(Some(&back), as_value.as_ref(), "{context}: response round trip");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if let Ok(err) = ErrorBody::parse(body) {
        parsed += 1;
        assert_eq!(ErrorBody::parse(&err.to_vec()).unwrap(), err, "{context}");
    }
    let usage = usage_from_json(body);
    assert!(usage.is_none_or(|u| !u.estimated), "{context}");
    if let Some(v) = &as_value {
        let _ = usage_from_value(v);
        if let Some(inner) = v.get("usage") {
            assert_eq!(usage_from_value(inner), usage, "{context}");
        }
    }

    // As a stream chunk: data lines of an SSE event.
    let data = String::from_utf8_lossy(body);
    let mut stream = StreamUsage::new();
    let _ = stream.observe(&SseEvent::data_event(&data));
    let mut parser = SseParser::new();
    let mut framed = b"data: ".to_vec();
    framed.extend_from_slice(body);
    framed.extend_from_slice(b"\n\n");
    for event in parser.feed(&framed) {
        let _ = stream.observe(&event);
    }
    let _ = (stream.usage(), stream.output_chars(), stream.response_model(), stream.saw_done());
    parsed
}

#[test]
fn byte_mutations_never_panic() {
    let fixtures: Vec<Vec<u8>> = fixtures().iter().map(|v| serde_json::to_vec(v).unwrap()).collect();
    let mut parsed = 0;
    for seed in 0..3000u64 {
        let mut rng = Rng::new(seed);
        let mut body = rng.pick(&fixtures).clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut body);
        }
        parsed += exercise(&body, &format!("seed {seed}"));
    }
    assert!(parsed > 100, "some mutations still parse: {parsed}");
}

#[test]
fn value_mutations_round_trip() {
    let mut parsed = 0;
    let mut rejected = 0;
    let fixtures = fixtures();
    for seed in 0..3000u64 {
        let mut rng = Rng::new(seed ^ 0x5EED);
        let mut value = rng.pick(&fixtures).clone();
        for _ in 0..1 + rng.below(3) {
            mutate_value(&mut rng, &mut value);
        }
        let body = serde_json::to_vec(&value).unwrap();
        let n = exercise(&body, &format!("seed {seed}: {value}"));
        parsed += n;
        if n == 0 {
            rejected += 1;
        }
    }
    assert!(parsed > 1000 && rejected > 100, "both outcomes exercised: {parsed} parsed, {rejected} rejected");
}

#[test]
fn deep_nesting_everywhere_is_an_error() {
    for depth in [129usize, 1000, 10_000, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let body = format!(
                "{{\"messages\":[{{\"role\":\"user\",\"content\":{}1{}}}]}}",
                open.repeat(depth),
                close.repeat(depth)
            );
            assert_eq!(ChatRequest::parse(body.as_bytes()), Err(WireError::NotJson), "depth {depth}");
            assert_eq!(ChatResponse::parse(body.as_bytes()), Err(WireError::NotJson));
            assert_eq!(usage_from_json(body.as_bytes()), None);
            exercise(body.as_bytes(), "deep");
        }
    }
}
