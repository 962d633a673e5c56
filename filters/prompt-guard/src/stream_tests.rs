//! The stream masker over parsed events, chunked every way (as the pipeline feeds it).

use super::*;
use crate::config::Config;
use serde_json::json;
use sluice_core::sse::SseParser;

fn rules(extra: &str) -> RuleSet {
    let cfg = format!(
        r#"{{"policies":{{"p":{{"response_rules":[
            {{"name":"mastercard","regex":"5[1-5][0-9]{{2}}[ -]?[0-9]{{4}}[ -]?[0-9]{{4}}[ -]?[0-9]{{4}}","action":"mask"}},
            {{"builtin":"email","action":"mask","replacement":"[email]"}}{extra}]}}}}}}"#
    );
    Config::from_json(cfg.as_bytes()).unwrap().policy("p").unwrap().response.clone()
}

fn card_rules() -> RuleSet {
    let cfg = r#"{"policies":{"p":{"response_rules":[{"builtin":"credit_card","action":"mask"}]}}}"#;
    Config::from_json(cfg.as_bytes()).unwrap().policy("p").unwrap().response.clone()
}

/// Feed `stream` in `chunk`-byte network chunks through a parser and the masker, the way
/// the pipeline does; returns the bytes sent on.
fn run_with(api: Api, rules: &RuleSet, stream: &[u8], chunk: usize, apply: bool) -> (Vec<u8>, StreamMasker) {
    let mut parser = SseParser::new();
    let mut m = StreamMasker::new(api, rules.max_mask_len(), apply);
    let mut out = Vec::new();
    let pieces: Vec<&[u8]> = stream.chunks(chunk.max(1)).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let end = i + 1 == pieces.len();
        let mut raw = parser.feed(piece);
        if end {
            raw.extend(parser.finish());
        }
        let mut c = Chunk { end, events: raw.into_iter().map(Event::new).collect(), ..Chunk::default() };
        m.on_chunk(rules, &mut c);
        for ev in &c.events {
            out.extend(ev.bytes());
        }
        if end {
            out.extend(parser.take_pending());
        }
    }
    (out, m)
}

fn run(stream: &[u8], chunk: usize) -> Vec<u8> {
    run_with(Api::Chat, &rules(""), stream, chunk, true).0
}

fn events(bytes: &[u8]) -> Vec<SseEvent> {
    let mut p = SseParser::new();
    let mut e = p.feed(bytes);
    e.extend(p.finish());
    e
}

fn sse_stream(pieces: &[&str]) -> Vec<u8> {
    let mut s = String::new();
    let head = r#""id":"c1","object":"chat.completion.chunk","created":1,"model":"m""#;
    s.push_str(&format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n"));
    for p in pieces {
        let c = serde_json::to_string(p).unwrap();
        s.push_str(&format!(
            "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{c}}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    s.push_str(&format!(
        "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
    ));
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

/// The text of `pointer` in every JSON event (e.g. `/choices/0/delta/content`), and whether
/// `[DONE]` came last.
fn texts(bytes: &[u8], pointer: &str) -> (Vec<String>, bool) {
    let evs = events(bytes);
    let done_last = evs.last().is_some_and(SseEvent::is_done);
    let out = evs
        .iter()
        .filter(|e| !e.is_done())
        .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
        .filter_map(|v| v.pointer(pointer).and_then(Value::as_str).map(str::to_string))
        .collect();
    (out, done_last)
}

fn contents(bytes: &[u8]) -> (Vec<String>, bool) {
    texts(bytes, "/choices/0/delta/content")
}

#[test]
fn card_split_across_events_and_chunks_is_masked() {
    let pieces = ["Try 5555 55", "55 5555 44", "44 or mail a@b", ".example now."];
    let stream = sse_stream(&pieces);
    for chunk in [1, 2, 3, 7, 13, 64, 100_000] {
        let out = run(&stream, chunk);
        let (parts, done_last) = contents(&out);
        assert!(done_last, "chunk {chunk}");
        assert_eq!(parts.concat(), "Try XXXXXXXXXXXXXXXXXXX or mail [email] now.", "chunk {chunk}");
        for p in &parts {
            assert!(!p.chars().any(|c| c.is_ascii_digit()), "digit leaked in {p:?} (chunk {chunk})");
        }
    }
}

#[test]
fn clean_stream_passes_byte_for_byte_except_hold_back() {
    let stream = sse_stream(&["Hello", " world"]);
    let out = run(&stream, 5);
    assert_eq!(contents(&out).0.concat(), "Hello world");
    // The role chunk, the finish chunk and [DONE] pass untouched.
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\""));
    assert!(text.ends_with("\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n"), "{text}");
    // Text longer than the hold-back flows without waiting for the end.
    let r = rules("");
    let long = "a".repeat(500);
    let mut p = SseParser::new();
    let mut m = StreamMasker::new(Api::Chat, r.max_mask_len(), true);
    let mut c = Chunk {
        events: p.feed(&sse_stream(&[&long])).into_iter().take(2).map(Event::new).collect(),
        ..Chunk::default()
    };
    m.on_chunk(&r, &mut c);
    let sent = c.events[1].json.as_ref().unwrap()["choices"][0]["delta"]["content"].as_str().unwrap().len();
    assert_eq!(sent, 500 - r.max_mask_len());
    assert_eq!(m.held_bytes(), r.max_mask_len());
}

#[test]
fn held_text_is_flushed_before_done_without_finish_event() {
    let s = "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"card 5555555555554444\"}}]}\n\ndata: [DONE]\n\n";
    let out = run(s.as_bytes(), 4);
    let (parts, done_last) = contents(&out);
    assert!(done_last);
    assert_eq!(parts.concat(), "card XXXXXXXXXXXXXXXX");
}

#[test]
fn non_json_is_masked_as_text_and_usage_events_pass_unchanged() {
    let s = ": ping\n\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n";
    assert_eq!(run(s.as_bytes(), 3), s.as_bytes());
    let s = "data: plain 5555 5555 5555 4444 text\n\n";
    assert_eq!(run(s.as_bytes(), 3), b"data: plain XXXXXXXXXXXXXXXXXXX text\n\n");
}

#[test]
fn unterminated_stream_still_flushes() {
    let s = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x 5555 5555 5555 4444\"}}]}\n\ndata: {\"partial";
    let out = run(s.as_bytes(), 5);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("x XXXXXXXXXXXXXXXXXXX"), "{text}");
    assert!(text.ends_with("data: {\"partial"));
    assert!(!text.contains("4444"));
}

#[test]
fn shadow_counts_without_masking() {
    let r = rules("");
    let (_, m) = run_with(Api::Chat, &r, &sse_stream(&["5555 5555 5555 4444"]), 7, false);
    assert_eq!(m.matched, vec![0]);
    assert!(m.applied.is_empty());
}

#[test]
fn multibyte_text_is_cut_on_char_boundaries() {
    let pieces = ["héllo wörld 🎉 ", "5555 5555 5555 4444 ", "ünïcödé"];
    let out = run(&sse_stream(&pieces), 1);
    assert_eq!(contents(&out).0.concat(), "héllo wörld 🎉 XXXXXXXXXXXXXXXXXXX ünïcödé");
}

/// A chat stream whose delta carries `field` (a JSON pointer under the delta) pieces.
fn chat_channel_stream(make: &dyn Fn(&str) -> Value, pieces: &[&str]) -> Vec<u8> {
    let mut s = String::new();
    for p in pieces {
        let chunk = json!({"id": "c", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": make(p), "finish_reason": null}]});
        s.push_str(&format!("data: {chunk}\n\n"));
    }
    s.push_str(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
    );
    s.into_bytes()
}

#[test]
fn every_chat_channel_is_masked_in_streams() {
    let pieces = ["card 5555 55", "55 5555 4444 end"];
    type Make = Box<dyn Fn(&str) -> Value>;
    let cases: [(&str, Make); 5] = [
        ("/choices/0/delta/reasoning_content", Box::new(|p| json!({"reasoning_content": p}))),
        ("/choices/0/delta/reasoning", Box::new(|p| json!({"reasoning": p}))),
        ("/choices/0/delta/refusal", Box::new(|p| json!({"refusal": p}))),
        ("/choices/0/delta/audio/transcript", Box::new(|p| json!({"audio": {"transcript": p}}))),
        (
            "/choices/0/delta/tool_calls/0/function/arguments",
            Box::new(|p| json!({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})),
        ),
    ];
    for (pointer, make) in &cases {
        let stream = chat_channel_stream(make.as_ref(), &pieces);
        for chunk in [1, 9, 1000] {
            let out = run(&stream, chunk);
            let (parts, done) = texts(&out, pointer);
            assert!(done);
            assert_eq!(parts.concat(), "card XXXXXXXXXXXXXXXXXXX end", "{pointer} chunk {chunk}");
            assert!(!String::from_utf8_lossy(&out).contains("4444"), "{pointer}");
        }
    }
}

#[test]
fn streamed_logprobs_are_removed() {
    let s = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"logprobs\":{\"content\":[{\"token\":\"hi\",\"logprob\":-0.1}]}}]}\n\ndata: [DONE]\n\n";
    let out = run(s.as_bytes(), 1000);
    let evs = events(&out);
    let v: Value = serde_json::from_str(&evs[0].data).unwrap();
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
}

fn responses_stream(pieces: &[&str]) -> Vec<u8> {
    let full: String = pieces.concat();
    let mut evs = vec![
        json!({"type": "response.created", "sequence_number": 0, "response": {"id": "r", "output": [], "status": "in_progress"}}),
        json!({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
            "item": {"type": "message", "id": "msg_1", "content": []}}),
        json!({"type": "response.content_part.added", "sequence_number": 2, "item_id": "msg_1", "output_index": 0,
            "content_index": 0, "part": {"type": "output_text", "text": ""}}),
    ];
    for (i, p) in pieces.iter().enumerate() {
        evs.push(json!({"type": "response.output_text.delta", "sequence_number": 3 + i, "item_id": "msg_1",
            "output_index": 0, "content_index": 0, "delta": p}));
    }
    let n = 3 + pieces.len();
    evs.push(json!({"type": "response.output_text.done", "sequence_number": n, "item_id": "msg_1", "output_index": 0,
        "content_index": 0, "text": full}));
    evs.push(json!({"type": "response.completed", "sequence_number": n + 1, "response": {"id": "r", "status": "completed",
        "output": [{"type": "message", "id": "msg_1", "content": [{"type": "output_text", "text": full, "annotations": []}]}]}}));
    let mut s = String::new();
    for e in evs {
        s.push_str(&format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()));
    }
    s.into_bytes()
}

#[test]
fn responses_streams_are_masked() {
    let stream = responses_stream(&["Try 5555 55", "55 5555 44", "44 now."]);
    for chunk in [1, 5, 64, 100_000] {
        let out = run_with(Api::Responses, &rules(""), &stream, chunk, true).0;
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(!text.contains("5555") && !text.contains("4444"), "chunk {chunk}: {text}");
        let evs = events(&out);
        let deltas: String = evs
            .iter()
            .filter(|e| e.event.as_deref() == Some("response.output_text.delta"))
            .map(|e| serde_json::from_str::<Value>(&e.data).unwrap()["delta"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(deltas, "Try XXXXXXXXXXXXXXXXXXX now.", "chunk {chunk}");
        // The flush delta goes before `.done`, which carries the whole text masked.
        let names: Vec<&str> = evs.iter().filter_map(|e| e.event.as_deref()).collect();
        let done = names.iter().position(|n| *n == "response.output_text.done").unwrap();
        assert_eq!(names[done - 1], "response.output_text.delta");
        assert!(text.contains("\"text\":\"Try XXXXXXXXXXXXXXXXXXX now.\""));
    }
}

fn messages_stream(pieces: &[&str]) -> Vec<u8> {
    let mut evs = vec![
        json!({"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [],
            "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "ping"}),
    ];
    for p in pieces {
        evs.push(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}));
    }
    evs.push(json!({"type": "content_block_stop", "index": 0}));
    evs.push(json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}));
    evs.push(json!({"type": "message_stop"}));
    let mut s = String::new();
    for e in evs {
        s.push_str(&format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()));
    }
    s.into_bytes()
}

#[test]
fn messages_streams_are_masked() {
    let stream = messages_stream(&["Try 5555 55", "55 5555 44", "44 now."]);
    for chunk in [1, 5, 100_000] {
        let out = run_with(Api::Messages, &rules(""), &stream, chunk, true).0;
        let evs = events(&out);
        let deltas: String = evs
            .iter()
            .filter(|e| e.event.as_deref() == Some("content_block_delta"))
            .map(|e| serde_json::from_str::<Value>(&e.data).unwrap()["delta"]["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(deltas, "Try XXXXXXXXXXXXXXXXXXX now.", "chunk {chunk}");
        let names: Vec<&str> = evs.iter().filter_map(|e| e.event.as_deref()).collect();
        let stop = names.iter().position(|n| *n == "content_block_stop").unwrap();
        assert_eq!(names[stop - 1], "content_block_delta");
        assert_eq!(names.last(), Some(&"message_stop"));
    }
}

#[test]
fn the_hold_back_cut_creates_no_false_word_boundary() {
    // 17 digits fail Luhn as a whole and hold no card on a word boundary: nothing to mask,
    // wherever the cut falls (the old masker scanned the held tail alone, so a cut after the
    // first digit made "4111111111111111" look like a card on its own).
    let r = card_rules();
    let text = format!("{}54111111111111111 and more words after it, so the cut falls anywhere", "a ".repeat(40));
    for split in 1..text.len() {
        let (a, b) = text.split_at(split);
        let stream = sse_stream(&[a, b]);
        let out = run_with(Api::Chat, &r, &stream, 100_000, true).0;
        assert_eq!(contents(&out).0.concat(), text, "split {split}");
    }
    // And a valid card inside a longer run is masked wherever the events split it.
    let text =
        format!("{}card 4111 1111 1111 1111 12/26 and more words after it, so the cut falls anywhere", "a ".repeat(30));
    let want = text.replace("4111 1111 1111 1111", &"X".repeat(19));
    for split in 1..text.len() {
        let (a, b) = text.split_at(split);
        for chunk in [7, 100_000] {
            let out = run_with(Api::Chat, &r, &sse_stream(&[a, b]), chunk, true).0;
            assert_eq!(contents(&out).0.concat(), want, "split {split} chunk {chunk}");
        }
    }
}

#[test]
fn back_to_back_matches_stay_aligned_across_cuts() {
    // A rule without word boundaries, cards back to back: the scan after a cut starts at the
    // cut (the context is look-behind only), so the matches keep their alignment.
    let text = "5555 5555 5555 4444 ".repeat(300);
    let cfg = r#"{"policies":{"p":{"response_rules":[
        {"name":"mastercard","regex":"5[1-5][0-9]{2}[ -]?[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}","action":"mask"}]}}}"#;
    let r = Config::from_json(cfg.as_bytes()).unwrap().policy("p").unwrap().response.clone();
    for pieces in [2, 3, 4, 7, 50] {
        let n = text.len();
        let parts: Vec<&str> = (0..pieces).map(|i| text.get(i * n / pieces..(i + 1) * n / pieces).unwrap()).collect();
        let out = run_with(Api::Chat, &r, &sse_stream(&parts), 100_000, true).0;
        let joined = contents(&out).0.concat();
        assert_eq!(joined, "XXXXXXXXXXXXXXXXXXX ".repeat(300), "{pieces} pieces");
    }
}
