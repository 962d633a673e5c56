//! prompt-guard through the core pipeline on the fake host (phases set as Envoy would).

use super::*;
use serde_json::json;
use sluice_core::encoding::test_encode_metadata;
use sluice_core::host::{CallKind, CountingHost, FakeHost, Phase};
use sluice_core::metrics::tagged_name;
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;
use std::cell::RefCell;

const CONFIG: &str = r#"{
  "default_policy": "strict",
  "max_request_bytes": 4096,
  "max_response_bytes": 4096,
  "policies": {
    "strict": {
      "request_rules": [
        {"name": "credit-card-talk", "phrase": "credit card", "case_insensitive": true, "action": "reject",
         "message": "Rejected due to inappropriate content"},
        {"builtin": "aws_access_key", "action": "reject", "status": 422},
        {"builtin": "credit_card", "action": "mask"},
        {"builtin": "email", "action": "mask", "replacement": "<email>"}
      ],
      "response_rules": [
        {"name": "mastercard", "regex": "5[1-5][0-9]{2}[ -]?[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}", "action": "mask"}
      ]
    },
    "users-only": {
      "roles": ["user"],
      "request_rules": [{"name": "cc", "phrase": "credit card", "action": "reject"}]
    },
    "shadow": {
      "shadow": true,
      "request_rules": [{"name": "cc", "phrase": "credit card", "action": "reject"}, {"builtin": "email", "action": "mask"}],
      "response_rules": [{"builtin": "credit_card", "action": "mask"}]
    },
    "hooked": {
      "request_rules": [{"builtin": "email", "action": "mask"}],
      "webhook": {"cluster": "guard", "timeout": "200ms", "failure_mode": "deny"}
    },
    "hooked-open": {
      "webhook": {"cluster": "guard", "failure_mode": "allow"}
    },
    "answers": {
      "response_rules": [{"builtin": "credit_card", "action": "mask"}, {"builtin": "email", "action": "mask", "replacement": "[EMAIL]"}]
    }
  }
}"#;

fn plugin() -> GuardPlugin {
    GuardPlugin::new(Config::from_json(CONFIG.as_bytes()).unwrap())
}

fn pipeline_of(slots: Vec<Slot>) -> Pipeline {
    Pipeline::new(1, slots, Rc::new(RefCell::new(RouteCache::default())))
}

fn pipeline(p: &GuardPlugin) -> Pipeline {
    pipeline_of(vec![Slot::of(p)])
}

fn host_at(path: &str, policy: Option<&str>, body: &[u8]) -> FakeHost {
    let mut h = FakeHost::with_request_headers(&[
        (":method", "POST"),
        (":path", path),
        ("content-type", "application/json"),
        ("content-length", &body.len().to_string()),
        ("accept-encoding", "gzip"),
    ]);
    let meta = match policy {
        Some(p) => json!({"guard_policy": p}),
        None => json!({}),
    };
    h.set_prop(&["xds", "route_name"], policy.unwrap_or("default"));
    h.properties.insert("xds/route_metadata".into(), test_encode_metadata("sluice", &meta));
    h.req_body = body.to_vec();
    h
}

fn host(policy: Option<&str>, body: &Value) -> FakeHost {
    host_at("/v1/chat/completions", policy, &serde_json::to_vec(body).unwrap())
}

/// Headers, then the body in two chunks (the second ends the stream, or trailers do).
fn send(p: &mut Pipeline, h: &mut FakeHost, trailers: bool) -> Act {
    let first = p.on_request_headers(h, false);
    if first != Act::Pause {
        return first;
    }
    h.phase = Phase::RequestBody;
    let n = h.req_body.len();
    assert_eq!(p.on_request_body(h, n / 2, false), Act::Pause);
    if trailers {
        assert_eq!(p.on_request_body(h, n, false), Act::Pause);
        return p.on_request_trailers(h);
    }
    p.on_request_body(h, n, true)
}

/// Run the request side of `body` on the route of `policy`.
fn request(policy: Option<&str>, body: Value) -> (Pipeline, FakeHost, Act) {
    request_with(policy, body, false)
}

fn request_with(policy: Option<&str>, body: Value, trailers: bool) -> (Pipeline, FakeHost, Act) {
    let pl = plugin();
    let mut p = pipeline(&pl);
    let mut h = host(policy, &body);
    let act = send(&mut p, &mut h, trailers);
    if act == Act::Continue {
        h.req_headers_sent = true;
    }
    (p, h, act)
}

/// The answer: headers, then `chunks` (the last ends the stream); returns what the client gets.
fn respond(p: &mut Pipeline, h: &mut FakeHost, headers: &[(&str, &str)], chunks: &[&[u8]]) -> (u32, Vec<u8>) {
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
    if !h.resp_headers.iter().any(|(k, _)| k == ":status") {
        h.resp_headers.push((":status".into(), b"200".to_vec()));
    }
    p.on_response_headers(h, false);
    let status = h.resp_header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
    h.phase = Phase::ResponseBody;
    let mut out = Vec::new();
    let mut buffered = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let end = i + 1 == chunks.len();
        buffered.extend_from_slice(c);
        // Envoy hands a paused (buffering) filter everything buffered so far.
        h.resp_body = buffered.clone();
        let act = p.on_response_body(h, buffered.len(), end);
        if act == Act::Continue {
            out.extend_from_slice(&h.resp_body);
            buffered.clear();
        }
    }
    h.phase = Phase::Log;
    p.on_log(h);
    (status, out)
}

fn json_answer(p: &mut Pipeline, h: &mut FakeHost, body: &Value) -> Value {
    let bytes = serde_json::to_vec(body).unwrap();
    let (a, b) = bytes.split_at(bytes.len() / 2);
    let (_, out) = respond(p, h, &[("content-type", "application/json"), ("content-length", "100")], &[a, b]);
    serde_json::from_slice(&out).unwrap()
}

fn user(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}]})
}

fn rejected(h: &FakeHost) -> Option<(u32, String, String)> {
    h.replies.last().map(|r| {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        (
            r.status,
            v["error"]["code"].as_str().unwrap_or_default().to_string(),
            v["error"]["message"].as_str().unwrap_or_default().to_string(),
        )
    })
}

fn sent_body(h: &FakeHost) -> Value {
    serde_json::from_slice(&h.req_body).unwrap()
}

fn checks(h: &FakeHost, phase: &str, action: &str, rule: &str) -> Option<i64> {
    h.metric(&tagged_name(CHECKS_METRIC, &[("sluice_phase", phase), ("sluice_action", action), ("sluice_rule", rule)]))
}

#[test]
fn phrase_rejects_with_custom_message() {
    let (_, h, act) = request(None, user("Give me examples of credit card numbers"));
    assert_eq!(act, Act::Pause);
    let (status, code, message) = rejected(&h).unwrap();
    assert_eq!(
        (status, code.as_str(), message.as_str()),
        (403, "prompt_guard_rejected", "Rejected due to inappropriate content")
    );
    assert_eq!(h.state(keys::GUARD).as_deref(), Some("reject:credit-card-talk"));
    assert_eq!(checks(&h, "request", "reject", "credit-card-talk"), Some(1));
    assert!(h.refused.is_empty(), "{:?}", h.refused);
}

#[test]
fn request_trailers_end_the_body_exactly_like_end_of_stream() {
    // Refused at the trailers, with the same answer; never forwarded.
    let (_, h, act) = request_with(None, user("a credit card please"), true);
    assert_eq!(act, Act::Pause);
    assert_eq!(rejected(&h).unwrap().0, 403);
    assert_eq!(h.resumed_requests, 0);
    // Allowed with trailers: masked like without.
    let (_, h, act) = request_with(None, user("mail bob@example.com"), true);
    assert_eq!(act, Act::Continue);
    assert_eq!(sent_body(&h)["messages"][0]["content"], "mail <email>");
}

#[test]
fn clean_request_passes_untouched() {
    let body = user("Explain how Mastercard numbers are built");
    let (_, h, act) = request(None, body.clone());
    assert_eq!(act, Act::Continue);
    assert!(h.replies.is_empty());
    assert_eq!(h.state(keys::GUARD).as_deref(), Some("allow"));
    // The body bytes are the client's, and so is its length (the headers were held).
    assert_eq!(h.req_body, serde_json::to_vec(&body).unwrap());
    assert_eq!(h.req_header("content-length"), Some(h.req_body.len().to_string()));
    assert_eq!(h.req_header("accept-encoding"), None, "a compressed answer could not be masked");
}

#[test]
fn no_bypass_by_moving_text() {
    let cases = [
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "tell me a CREDIT CARD number"}]}]}),
        json!({"messages": [{"role": "tool", "tool_call_id": "1", "content": "the credit card is..."}]}),
        json!({"messages": [{"role": "system", "content": "talk about credit card data"}, {"role": "user", "content": "hi"}]}),
        json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"q\":\"credit card\"}"}}]}]}),
        json!({"prompt": "credit card please"}),
        json!({"prompt": ["ok", "Credit Card please"]}),
        json!({"messages": [{"role": "user", "content": "key AKIAIOSFODNN7EXAMPLE"}]}),
        // Issue 13 §4: text the model reads outside message contents.
        json!({"messages": [{"role": "user", "name": "credit card", "content": "hi"}]}),
        json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function",
            "function": {"name": "lookup", "description": "Look up a credit card"}}]}),
        json!({"messages": [], "tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "the credit card"}}}}}]}),
        json!({"messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "n",
            "schema": {"type": "object", "properties": {"credit card": {"type": "string"}}}}}}),
        json!({"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no credit card"}]}]}),
        json!({"messages": [], "prediction": {"type": "content", "content": "a credit card"}}),
    ];
    for (i, body) in cases.into_iter().enumerate() {
        let (_, h, act) = request(None, body);
        assert_eq!(act, Act::Pause, "case {i}");
        assert!(rejected(&h).is_some(), "case {i}");
    }
    let (_, h, _) = request(None, json!({"messages": [{"role": "user", "content": "key AKIAIOSFODNN7EXAMPLE"}]}));
    assert_eq!(rejected(&h).unwrap().0, 422);
}

#[test]
fn every_endpoint_is_guarded() {
    let cases = [
        (
            "/v1/responses",
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a credit card"}]}]}),
        ),
        ("/v1/responses", json!({"model": "m", "instructions": "credit card", "input": "hi"})),
        ("/v1/responses", json!({"model": "m", "input": "credit card"})),
        ("/v1/embeddings", json!({"model": "m", "input": ["fine", "credit card"]})),
        ("/v1/embeddings", json!({"model": "m", "input": "credit card"})),
        ("/v1/completions", json!({"model": "m", "prompt": ["fine", "credit card"]})),
        (
            "/v1/messages",
            json!({"model": "m", "max_tokens": 5, "system": "credit card", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": "credit card"}]}]}),
        ),
        ("/v1/messages/count_tokens", json!({"model": "m", "messages": [{"role": "user", "content": "credit card"}]})),
    ];
    for (path, body) in cases {
        let pl = plugin();
        let mut p = pipeline(&pl);
        let mut h = host_at(path, None, &serde_json::to_vec(&body).unwrap());
        assert_eq!(send(&mut p, &mut h, false), Act::Pause, "{path} {body}");
        assert_eq!(rejected(&h).unwrap().1, "prompt_guard_rejected", "{path} {body}");
    }
}

#[test]
fn documented_gaps() {
    // Split across two messages: each text is scanned on its own.
    let body = json!({"messages": [{"role": "user", "content": "credit"}, {"role": "user", "content": "card"}]});
    let (_, h, act) = request(None, body);
    assert_eq!(act, Act::Continue);
    assert!(h.replies.is_empty());
    // Unicode look-alikes (Cyrillic 'с') are not folded.
    let (_, h, act) = request(None, user("\u{0441}redit \u{0441}ard"));
    assert_eq!(act, Act::Continue);
    assert!(h.replies.is_empty());
}

#[test]
fn roles_limit_what_is_inspected() {
    let body = json!({"messages": [{"role": "system", "content": "credit card"}, {"role": "user", "content": "hi"}]});
    let (_, h, act) = request(Some("users-only"), body);
    assert_eq!(act, Act::Continue);
    assert!(h.replies.is_empty());
    let (_, h, _) = request(Some("users-only"), user("credit card"));
    assert!(rejected(&h).is_some());
}

#[test]
fn mask_rewrites_request() {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "card 4111 1111 1111 1111, mail bob@example.com, order 4111111111111112"}]});
    let (_, h, act) = request(None, body);
    assert_eq!(act, Act::Continue);
    let v = sent_body(&h);
    assert_eq!(v["messages"][0]["content"], "card XXXXXXXXXXXXXXXXXXX, mail <email>, order 4111111111111112");
    assert_eq!(v["model"], "m");
    assert_eq!(h.req_header("content-length"), Some(h.req_body.len().to_string()), "the new length");
    assert_eq!(h.state(keys::GUARD).as_deref(), Some("mask:credit_card"));
    // Issue 13 §3: the valid card inside a longer run of digits.
    let (_, h, _) = request(None, user("card 4111 1111 1111 1111 12/26 and 4111111111111111 123"));
    assert_eq!(sent_body(&h)["messages"][0]["content"], "card XXXXXXXXXXXXXXXXXXX 12/26 and XXXXXXXXXXXXXXXX 123");
}

#[test]
fn bad_input_gets_documented_answers() {
    let run = |body: &[u8]| {
        let pl = plugin();
        let mut p = pipeline(&pl);
        let mut h = host_at("/v1/chat/completions", None, body);
        let act = send(&mut p, &mut h, false);
        (act, rejected(&h))
    };
    assert_eq!(run(b"not json").1.unwrap().1, "invalid_json");
    let (act, r) = run(b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}");
    assert_eq!(act, Act::Pause);
    assert_eq!(r.unwrap().1, "invalid_encoding");
    assert_eq!(run(b"[1]").1.unwrap().1, "invalid_json");
    assert_eq!(run(br#"{"model":"a","model":"b"}"#).1.unwrap().1, "duplicate_json_key");

    // Over the cap: by content-length in the headers, or by the body size.
    let pl = plugin();
    let mut p = pipeline(&pl);
    let mut h = host(None, &user("hi"));
    h.set_request_header("content-length", Some(b"5000"));
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    assert_eq!(rejected(&h).unwrap().1, "request_too_large");
    assert_eq!(checks(&h, "request", "too_large", "none"), Some(1));
    let pl = plugin(); // metric ids are cached per plugin (VM), the fake host is new
    let mut p = pipeline(&pl);
    let mut h = host(None, &user("hi"));
    h.set_request_header("content-length", None);
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    h.phase = Phase::RequestBody;
    assert_eq!(p.on_request_body(&mut h, 5000, false), Act::Pause);
    assert_eq!(rejected(&h).unwrap().0, 413);
    respond(&mut p, &mut h, &[(":status", "413"), ("content-type", "application/json")], &[b"{}"]);
    assert_eq!(checks(&h, "request", "too_large", "none"), Some(1));
    // A request without a body is not inspected.
    let mut p = pipeline(&pl);
    let mut h = host(None, &user("hi"));
    assert_eq!(p.on_request_headers(&mut h, true), Act::Continue);
    assert!(h.replies.is_empty());
}

#[test]
fn unknown_route_policy_fails_closed() {
    let pl = plugin();
    let mut p = pipeline(&pl);
    let mut h = host(Some("nope"), &user("hi"));
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    assert_eq!(rejected(&h).unwrap().1, "guard_policy_unknown");
}

#[test]
fn shadow_counts_without_acting() {
    let (mut p, mut h, act) = request(Some("shadow"), user("credit card to bob@example.com"));
    assert_eq!(act, Act::Continue);
    assert!(h.replies.is_empty());
    assert_eq!(sent_body(&h), user("credit card to bob@example.com"));
    assert_eq!(h.state(keys::GUARD).as_deref(), Some("shadow_reject:cc"));
    assert_eq!(checks(&h, "request", "shadow_reject", "cc"), Some(1));
    // Response: counted, not masked, not held.
    let body = json!({"choices": [{"message": {"role": "assistant", "content": "4111 1111 1111 1111"}}]});
    let bytes = serde_json::to_vec(&body).unwrap();
    let (a, b) = bytes.split_at(10);
    let (_, out) = respond(&mut p, &mut h, &[("content-type", "application/json"), ("content-length", "10")], &[a, b]);
    assert_eq!(out, bytes);
    assert_eq!(h.resp_header("content-length").as_deref(), Some("10"), "shadow changes nothing");
    assert_eq!(checks(&h, "response", "shadow_mask", "credit_card"), Some(1));
    assert_eq!(h.state(keys::GUARD).as_deref(), Some("shadow_reject:cc;response_shadow_mask:credit_card"));
}

#[test]
fn response_json_is_masked() {
    let (mut p, mut h, _) = request(None, user("Give me example numbers"));
    let body = json!({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Try 5555 5555 5555 4444 or 5105-1051-0510-5100.",
        "tool_calls": [{"function": {"name": "f", "arguments": "{\"n\":\"5555555555554444\"}"}}]}}]});
    let v = json_answer(&mut p, &mut h, &body);
    assert_eq!(h.resp_header("content-length"), None);
    assert_eq!(v["choices"][0]["message"]["content"], "Try XXXXXXXXXXXXXXXXXXX or XXXXXXXXXXXXXXXXXXX.");
    assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"n\":\"XXXXXXXXXXXXXXXX\"}");
    assert_eq!(h.state(keys::GUARD).as_deref(), Some("allow;response_mask:mastercard"));
    assert!(h.refused.is_empty(), "{:?}", h.refused);
}

#[test]
fn an_unchanged_answer_is_not_rewritten() {
    let (mut p, mut h, _) = request(None, user("hi"));
    let raw = br#"{"choices": [{"message": {"content": "nothing to see", "x": 1.50}}]}"#;
    let (_, out) = respond(&mut p, &mut h, &[("content-type", "application/json")], &[raw]);
    assert_eq!(out, raw);
}

#[test]
fn every_answer_channel_is_masked_in_json() {
    let card = "4111 1111 1111 1111";
    let masked = "X".repeat(19);
    let cases = [
        ("/v1/chat/completions", json!({"choices": [{"message": {"content": null, "refusal": card}}]})),
        (
            "/v1/chat/completions",
            json!({"choices": [{"message": {"content": "x", "reasoning_content": card, "reasoning": card}}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"choices": [{"message": {"content": "x", "audio": {"id": "a", "data": "", "transcript": card}}}]}),
        ),
        (
            "/v1/responses",
            json!({"output": [{"type": "message", "content": [{"type": "output_text", "text": card}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": card}]}),
        ),
        ("/v1/messages", json!({"content": [{"type": "text", "text": card}, {"type": "thinking", "thinking": card}]})),
    ];
    for (path, body) in cases {
        let pl = plugin();
        let mut p = pipeline(&pl);
        let mut h = host_at(path, Some("answers"), br#"{"model":"m","messages":[],"input":"hi"}"#);
        assert_eq!(send(&mut p, &mut h, false), Act::Continue);
        let v = json_answer(&mut p, &mut h, &body);
        let s = v.to_string();
        assert!(!s.contains("4111") && s.contains(&masked), "{path}: {s}");
    }
}

#[test]
fn logprobs_are_masked_in_json_and_refused_in_streams() {
    // Streaming + logprobs on a masking route: refused up front, nothing forwarded.
    for body in [
        json!({"model": "m", "stream": true, "logprobs": true, "messages": []}),
        json!({"model": "m", "stream": true, "top_logprobs": 2, "messages": []}),
    ] {
        let (_, h, act) = request(Some("answers"), body);
        assert_eq!(act, Act::Pause);
        assert_eq!(rejected(&h).unwrap().1, "logprobs_unavailable");
    }
    // Without stream: served, and the tokens come back masked.
    let (mut p, mut h, act) = request(Some("answers"), json!({"model": "m", "logprobs": true, "messages": []}));
    assert_eq!(act, Act::Continue);
    let tokens = ["Card", " 4111", " 1111", " 1111", " 1111", "."];
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            json!({"token": t, "logprob": -0.1, "bytes": t.bytes().collect::<Vec<_>>(),
            "top_logprobs": [{"token": t, "logprob": -0.1, "bytes": t.bytes().collect::<Vec<_>>()}]})
        })
        .collect();
    let body = json!({"choices": [{"message": {"content": tokens.concat()}, "logprobs": {"content": content, "refusal": null}}]});
    let v = json_answer(&mut p, &mut h, &body);
    let lp = &v["choices"][0]["logprobs"]["content"];
    let joined: String = lp.as_array().unwrap().iter().map(|e| e["token"].as_str().unwrap()).collect();
    assert_eq!(joined, format!("Card {}.", "X".repeat(19)));
    assert!(!v.to_string().contains("4111"), "{v}");
    // A route that only masks answers lets a body that is not JSON through (it cannot ask for
    // log-probabilities), and does not buffer uploads to other endpoints at all.
    let pl = plugin();
    let mut p = pipeline(&pl);
    let mut h = host_at("/v1/chat/completions", Some("answers"), b"not json");
    assert_eq!(send(&mut p, &mut h, false), Act::Continue);
    let mut p = pipeline(&pl);
    let mut h = host_at("/v1/audio/transcriptions", Some("answers"), b"--multipart--");
    assert_eq!(p.on_request_headers(&mut h, false), Act::Continue, "headers go on, nothing is held");
    // A shadow route never refuses.
    let (_, h, act) = request(Some("shadow"), json!({"model": "m", "stream": true, "logprobs": true, "messages": []}));
    assert_eq!(act, Act::Continue);
    assert!(h.replies.is_empty());
}

#[test]
fn answers_that_are_not_json_are_masked_or_refused() {
    let text = b"Your card 4111 1111 1111 1111, mail bob@example.com";
    let masked = format!("Your card {}, mail [EMAIL]", "X".repeat(19));
    for headers in [
        vec![("content-type", "text/plain; charset=utf-8")],
        vec![("content-type", "text/html")],
        vec![],                                     // no content type at all
        vec![("content-type", "application/json")], // says JSON, is not
    ] {
        let (mut p, mut h, _) = request(Some("answers"), json!({"model": "m", "messages": []}));
        let (status, out) = respond(&mut p, &mut h, &headers, &[&text[..10], &text[10..]]);
        assert_eq!(status, 200);
        assert_eq!(String::from_utf8(out).unwrap(), masked, "{headers:?}");
    }
    // A stream behind a wrong content type: masked as a stream (the card is split across events).
    let stream = sse(&[
        json!({"choices": [{"index": 0, "delta": {"content": "card 4111 1111 "}}]}),
        json!({"choices": [{"index": 0, "delta": {"content": "1111 1111 ok"}}]}),
    ]);
    let (mut p, mut h, _) = request(Some("answers"), json!({"model": "m", "messages": []}));
    let (_, out) = respond(&mut p, &mut h, &[("content-type", "text/plain")], &[&stream[..20], &stream[20..]]);
    let out = String::from_utf8(out).unwrap();
    assert!(!out.contains("4111") && !out.contains("1111"), "{out}");
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
    // Binary, or compressed although identity was asked for: replaced with 502 in the headers.
    for headers in [
        vec![("content-type", "application/octet-stream")],
        vec![("content-type", "application/json"), ("content-encoding", "gzip")],
        vec![("content-type", "text/event-stream"), ("content-encoding", "br")],
    ] {
        let (mut p, mut h, _) = request(Some("answers"), json!({"model": "m", "messages": []}));
        let (status, out) = respond(&mut p, &mut h, &headers, &[b"\x1f\x8b\x08\x00binary", b"more"]);
        assert_eq!(status, 502, "{headers:?}");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["code"], "response_unmaskable", "{headers:?}");
        assert_eq!(h.resp_header("content-encoding"), None);
        assert_eq!(checks(&h, "response", "uninspectable", "none"), Some(1));
    }
}

#[test]
fn response_over_cap_fails_closed() {
    // Declared too large: 502 in the headers.
    let (mut p, mut h, _) = request(None, user("hi"));
    let (status, out) =
        respond(&mut p, &mut h, &[("content-type", "application/json"), ("content-length", "5000")], &[b"{}"]);
    assert_eq!(status, 502);
    assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["error"]["code"], "response_too_large");
    // Chunked past the cap: the buffered body is replaced (never passed unmasked).
    let (mut p, mut h, _) = request(None, user("hi"));
    let big = vec![b'a'; 5000];
    let (_, out) = respond(&mut p, &mut h, &[("content-type", "application/json")], &[&big[..2500], &big[2500..]]);
    assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["error"]["code"], "response_too_large");
}

fn sse(events: &[Value]) -> Vec<u8> {
    let mut s = String::new();
    for e in events {
        s.push_str(&format!("data: {e}\n\n"));
    }
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

#[test]
fn response_sse_is_masked_per_chunk() {
    let (mut p, mut h, _) = request(None, user("hi"));
    let stream = sse(&[
        json!({"choices": [{"index": 0, "delta": {"content": "x 5555 55"}}]}),
        json!({"choices": [{"index": 0, "delta": {"content": "55 5555 4444 y"}, "finish_reason": "stop"}]}),
    ]);
    let chunks: Vec<&[u8]> = stream.chunks(7).collect();
    let (_, out) = respond(&mut p, &mut h, &[("content-type", "text/event-stream")], &chunks);
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains("5555"), "{text}");
    assert!(
        text.contains("x XXXXXXXXXXXXXXXXXXX y")
            || text
                .replace("\"}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"", "")
                .contains("x XXXXXXXXXXXXXXXXXXX y"),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(h.state(keys::GUARD).as_deref(), Some("allow;response_mask:mastercard"));
    assert!(h.refused.is_empty(), "{:?}", h.refused);
}

#[test]
fn a_messages_stream_is_masked() {
    let pl = plugin();
    let mut p = pipeline(&pl);
    let mut h =
        host_at("/v1/messages", Some("answers"), br#"{"model":"m","max_tokens":9,"stream":true,"messages":[]}"#);
    assert_eq!(send(&mut p, &mut h, false), Act::Continue);
    let mut s = String::new();
    for e in [
        json!({"type": "message_start", "message": {"id": "m", "content": [], "usage": {"input_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "card 4111 1111 "}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "1111 1111 ok"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_stop"}),
    ] {
        s.push_str(&format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()));
    }
    let chunks: Vec<&[u8]> = s.as_bytes().chunks(11).collect();
    let (_, out) = respond(&mut p, &mut h, &[("content-type", "text/event-stream")], &chunks);
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains("4111") && !text.contains("1111"), "{text}");
    assert!(text.contains("event: content_block_delta"));
}

#[test]
fn a_later_stage_reply_is_masked_too() {
    /// A cache-like stage after the guard: answers the request itself.
    struct Cache;
    impl Stage for Cache {
        fn on_request_headers(&mut self, _x: &mut Exchange, _h: &mut dyn Host) -> Flow {
            let body = json!({"choices": [{"message": {"content": "cached 4111 1111 1111 1111"}}]});
            let mut r = LocalReply::openai_error(200, "x", "x", "x");
            r.body = serde_json::to_vec(&body).unwrap();
            Flow::Reply(r)
        }
    }
    struct CachePlugin;
    impl Plugin for CachePlugin {
        fn name(&self) -> &'static str {
            "cache"
        }
        fn stage(&self) -> Box<dyn Stage> {
            Box::new(Cache)
        }
    }
    let pl = plugin();
    let mut p = pipeline_of(vec![Slot::of(&pl), Slot::of(&CachePlugin)]);
    let mut h = host(Some("answers"), &user("hi"));
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    let reply = h.replies.last().unwrap().clone();
    let (_, out) = respond(&mut p, &mut h, &[("content-type", "application/json")], &[&reply.body]);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], format!("cached {}", "X".repeat(19)));
}

fn webhook_request(policy: &str, body: Value) -> (Pipeline, FakeHost) {
    let (p, h, act) = request(Some(policy), body);
    assert_eq!(act, Act::Pause);
    assert!(h.replies.is_empty());
    assert_eq!(h.calls.len(), 1);
    (p, h)
}

fn answer(p: &mut Pipeline, h: &mut FakeHost, status: &str, body: &str) {
    h.phase = Phase::Callout;
    h.call_resp_headers =
        if status.is_empty() { Vec::new() } else { vec![(":status".into(), status.as_bytes().to_vec())] };
    h.call_resp_body = body.as_bytes().to_vec();
    p.on_callout(h, 1, None, body.len());
}

#[test]
fn webhook_paths_always_resume_or_reply() {
    // allow: the locally masked body goes on.
    let (mut p, mut h) = webhook_request("hooked", user("mail bob@example.com"));
    let call: Value = serde_json::from_slice(h.calls[0].body.as_ref().unwrap()).unwrap();
    assert_eq!(call["messages"][0]["content"], "mail XXXXXXXXXXXXXXX");
    assert_eq!(call["phase"], "request");
    assert_eq!(call["policy"], "hooked");
    assert!(call["prompt"].is_null());
    assert_eq!(h.calls[0].cluster, "guard");
    answer(&mut p, &mut h, "200", r#"{"action":"allow"}"#);
    assert_eq!(h.resumed_requests, 1);
    assert_eq!(sent_body(&h)["messages"][0]["content"], "mail XXXXXXXXXXXXXXX");

    // reject
    let (mut p, mut h) = webhook_request("hooked", user("hi"));
    answer(&mut p, &mut h, "200", r#"{"action":"reject","message":"no way","status":451}"#);
    assert_eq!(rejected(&h).unwrap(), (451, "prompt_guard_rejected".into(), "no way".into()));
    assert_eq!(h.resumed_requests, 0);

    // mask: messages replaced
    let (mut p, mut h) = webhook_request("hooked", user("my name is Bob"));
    answer(&mut p, &mut h, "200", r#"{"action":"mask","messages":[{"role":"user","content":"my name is [name]"}]}"#);
    assert_eq!(h.resumed_requests, 1);
    assert_eq!(sent_body(&h)["messages"][0]["content"], "my name is [name]");
    assert_eq!(sent_body(&h)["model"], "m");

    // failures, fail-closed: 500, timeout (no headers), garbage, unknown action, mask without messages
    for (status, body) in
        [("500", "{}"), ("", ""), ("200", "nope"), ("200", r#"{"action":"maybe"}"#), ("200", r#"{"action":"mask"}"#)]
    {
        let (mut p, mut h) = webhook_request("hooked", user("hi"));
        answer(&mut p, &mut h, status, body);
        assert_eq!(rejected(&h).unwrap().1, "guard_unavailable", "{status} {body}");
        assert_eq!(h.resumed_requests, 0);
    }
    // fail-open
    let (mut p, mut h) = webhook_request("hooked-open", user("hi"));
    answer(&mut p, &mut h, "", "");
    assert_eq!(h.resumed_requests, 1);
    assert!(h.replies.is_empty());
    assert_eq!(checks(&h, "request", "error_allowed", "webhook"), Some(1));

    // dispatch failure, fail-closed: replies at once.
    let pl = plugin();
    let mut p = pipeline(&pl);
    let mut h = host(Some("hooked"), &user("hi"));
    h.fail_calls = true;
    assert_eq!(send(&mut p, &mut h, false), Act::Pause);
    assert_eq!(rejected(&h).unwrap().1, "guard_unavailable");

    // A Responses request: the webhook sees `input` and may replace it.
    let pl = plugin();
    let mut p = pipeline(&pl);
    let mut h =
        host_at("/v1/responses", Some("hooked"), br#"{"model":"m","instructions":"be nice","input":"my name is Bob"}"#);
    assert_eq!(send(&mut p, &mut h, false), Act::Pause);
    let call: Value = serde_json::from_slice(h.calls[0].body.as_ref().unwrap()).unwrap();
    assert_eq!((call["input"].as_str(), call["instructions"].as_str()), (Some("my name is Bob"), Some("be nice")));
    answer(&mut p, &mut h, "200", r#"{"action":"mask","input":"my name is [name]"}"#);
    assert_eq!(sent_body(&h)["input"], "my name is [name]");
}

#[test]
fn host_call_budget() {
    // A guarded, masked, non-streaming chat request. The value-returning calls that remain,
    // each needed once: request headers (1 map), route name + route metadata (2, cached per
    // route after the first request), request body (1), response headers (1 map), the
    // buffered response body (1). Filter state and metrics are writes (not counted).
    let pl = plugin();
    let routes = Rc::new(RefCell::new(RouteCache::default()));
    // The same route twice through one plugin: the second reads only the route name.
    for (round, budget) in [(0, 6), (1, 5)] {
        let mut p = Pipeline::new(1, vec![Slot::of(&pl)], Rc::clone(&routes));
        let mut h = CountingHost::new(host(None, &user("mail bob@example.com")));
        assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
        h.inner.phase = Phase::RequestBody;
        let n = h.inner.req_body.len();
        assert_eq!(p.on_request_body(&mut h, n, true), Act::Continue);
        h.inner.req_headers_sent = true;
        h.inner.phase = Phase::ResponseHeaders;
        h.inner.resp_headers =
            vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"application/json".to_vec())];
        p.on_response_headers(&mut h, false);
        h.inner.phase = Phase::ResponseBody;
        h.inner.resp_body = br#"{"choices":[{"message":{"content":"5555 5555 5555 4444"}}]}"#.to_vec();
        let n = h.inner.resp_body.len();
        assert_eq!(p.on_response_body(&mut h, n, true), Act::Continue);
        h.inner.phase = Phase::Log;
        p.on_log(&mut h);
        assert!(
            h.total() <= budget,
            "round {round}: {} value-returning host calls ({:?})",
            h.total(),
            h.property_reads.borrow()
        );
        assert_eq!(h.count(CallKind::Header), 0, "headers are read once as a map");
        assert!(String::from_utf8_lossy(&h.inner.resp_body).contains("XXXX"));
    }
}

#[test]
fn response_trailers_end_the_answer() {
    // JSON: buffered until the trailers, then masked.
    let (mut p, mut h, _) = request(Some("answers"), user("hi"));
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"application/json".to_vec())];
    p.on_response_headers(&mut h, false);
    h.phase = Phase::ResponseBody;
    h.resp_body = br#"{"choices":[{"message":{"content":"card 4111 1111 1111 1111"}}]}"#.to_vec();
    let n = h.resp_body.len();
    assert_eq!(p.on_response_body(&mut h, n, false), Act::Pause);
    assert_eq!(p.on_response_trailers(&mut h), Act::Continue);
    let v: Value = serde_json::from_slice(&h.resp_body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], format!("card {}", "X".repeat(19)));
    // SSE: the held text goes out at the trailers.
    let (mut p, mut h, _) = request(Some("answers"), user("hi"));
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
    p.on_response_headers(&mut h, false);
    h.phase = Phase::ResponseBody;
    h.resp_body =
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"card 4111 1111 1111 1111\"}}]}\n\n".to_vec();
    let n = h.resp_body.len();
    assert_eq!(p.on_response_body(&mut h, n, false), Act::Continue);
    let mut out = h.resp_body.clone();
    h.resp_body.clear();
    assert_eq!(p.on_response_trailers(&mut h), Act::Continue);
    out.extend_from_slice(&h.resp_body);
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains("4111") && text.contains(&"X".repeat(19)), "{text}");
}
