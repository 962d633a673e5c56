//! `POST …/responses` (OpenAI Responses API): the response object and the
//! typed SSE stream. No I/O here.

use serde_json::{json, Map, Value};

use crate::provider::{self, content_bytes, sse_named, Reply, UsageReport, CREATED};

/// Prompt bytes: `instructions` (a string) plus `input` (a string, or items
/// whose `content` is a string or parts with a string `text`).
pub fn prompt_bytes(body: &Value) -> usize {
    let instructions = body.get("instructions").and_then(Value::as_str).map_or(0, str::len);
    let input = match body.get("input") {
        Some(Value::String(s)) => s.len(),
        Some(Value::Array(items)) => items.iter().map(|item| content_bytes(item.get("content"))).sum(),
        _ => 0,
    };
    instructions + input
}

/// The 400 the real API gives for `stream_options` (it has no such key).
pub fn unknown_parameter_error(param: &str) -> Value {
    provider::error_body_param(
        &format!("Unknown parameter: '{param}'."),
        "invalid_request_error",
        Some(param),
        Some("unknown_parameter"),
    )
}

/// The `usage` object (`None` with `--no-usage`).
pub fn usage_json(usage: UsageReport) -> Option<Value> {
    match usage {
        UsageReport::Omitted => None,
        UsageReport::Garbage => Some(json!({"input_tokens": "x", "output_tokens": -3, "total_tokens": "lots"})),
        UsageReport::Counts { prompt, completion, cached, reasoning } => Some(json!({
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached.unwrap_or(0)},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning.unwrap_or(0)},
            "total_tokens": prompt.saturating_add(completion),
        })),
    }
}

/// `msg_mock_<n>` for `resp_mock_<n>`.
fn message_id(reply: &Reply) -> String {
    reply.id.replacen("resp_", "msg_", 1)
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

fn message_item(reply: &Reply, status: &str, content: Vec<Value>) -> Value {
    json!({"type": "message", "id": message_id(reply), "status": status, "role": "assistant", "content": content})
}

/// The response object; `completed == false` gives the in-progress form
/// (empty output, `usage: null`) used by the first stream events.
pub fn response_object(reply: &Reply, completed: bool) -> Value {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(reply.id));
    obj.insert("object".into(), json!("response"));
    obj.insert("created_at".into(), json!(CREATED));
    obj.insert("status".into(), json!(if completed { "completed" } else { "in_progress" }));
    obj.insert("model".into(), json!(reply.model));
    if completed {
        obj.insert("output".into(), json!([message_item(reply, "completed", vec![output_text(&reply.text)])]));
        if let Some(usage) = usage_json(reply.usage) {
            obj.insert("usage".into(), usage);
        }
    } else {
        obj.insert("output".into(), json!([]));
        obj.insert("usage".into(), Value::Null);
    }
    Value::Object(obj)
}

/// One typed event: `event: <type>` and `data: {"type", "sequence_number", …}`.
fn event(kind: &str, sequence: usize, fields: Value) -> String {
    let mut obj = Map::new();
    obj.insert("type".into(), json!(kind));
    obj.insert("sequence_number".into(), json!(sequence));
    if let Value::Object(rest) = fields {
        obj.extend(rest);
    }
    sse_named(kind, &Value::Object(obj).to_string())
}

/// The stream, in order: created, in_progress, output_item.added,
/// content_part.added, one output_text.delta per piece, output_text.done,
/// content_part.done, output_item.done, completed. No `[DONE]`.
pub fn stream_events(reply: &Reply, pieces: usize) -> Vec<String> {
    let item_id = message_id(reply);
    let mut kinds_and_fields: Vec<(&str, Value)> = vec![
        ("response.created", json!({"response": response_object(reply, false)})),
        ("response.in_progress", json!({"response": response_object(reply, false)})),
        ("response.output_item.added", json!({"output_index": 0, "item": message_item(reply, "in_progress", vec![])})),
        (
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": output_text("")}),
        ),
    ];
    for piece in provider::split_text(&reply.text, pieces) {
        kinds_and_fields.push((
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    kinds_and_fields.extend([
        (
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": reply.text}),
        ),
        (
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": output_text(&reply.text)}),
        ),
        (
            "response.output_item.done",
            json!({"output_index": 0, "item": message_item(reply, "completed", vec![output_text(&reply.text)])}),
        ),
        ("response.completed", json!({"response": response_object(reply, true)})),
    ]);
    kinds_and_fields.into_iter().enumerate().map(|(i, (kind, fields))| event(kind, i, fields)).collect()
}

/// Events sent before a truncate / stall_mid_stream cut: everything up to
/// and including the first text delta.
pub const STREAM_CUT: usize = 5;

/// `response.created`, then a cut-off delta event; the stream then ends.
pub fn malformed_stream_events(reply: &Reply) -> Vec<String> {
    let mut events: Vec<String> = stream_events(reply, 1).into_iter().take(1).collect();
    events.push(sse_named(
        "response.output_text.delta",
        &format!(r#"{{"type":"response.output_text.delta","sequence_number":1,"item_id":"{}","del"#, message_id(reply)),
    ));
    events
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::provider::Extras;

    fn reply() -> Reply {
        Reply {
            id: "resp_mock_7".into(),
            model: "gpt-r".into(),
            text: "Hello from mock.".into(),
            usage: UsageReport::Counts { prompt: 5, completion: 3, cached: Some(2), reasoning: None },
            extras: Extras::default(),
        }
    }

    fn parse(event: &str) -> (String, Value) {
        let (head, data) = event.strip_suffix("\n\n").unwrap().split_once('\n').unwrap();
        let kind = head.strip_prefix("event: ").unwrap().to_string();
        (kind, serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap())
    }

    #[test]
    fn prompt_bytes_counts_instructions_and_input() {
        assert_eq!(prompt_bytes(&json!({"instructions": "abc", "input": "héllo"})), 9);
        let body = json!({"input": [
            {"role": "user", "content": "abcd"},
            {"role": "user", "content": [{"type": "input_text", "text": "xy"}, {"type": "input_image"}]},
            {"type": "function_call_output", "output": "ignored"}
        ]});
        assert_eq!(prompt_bytes(&body), 6);
        assert_eq!(prompt_bytes(&json!({"input": 5})), 0);
    }

    #[test]
    fn body_shape() {
        let body = response_object(&reply(), true);
        assert_eq!(
            body.to_string(),
            r#"{"id":"resp_mock_7","object":"response","created_at":1730000000,"status":"completed","model":"gpt-r","output":[{"type":"message","id":"msg_mock_7","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hello from mock.","annotations":[]}]}],"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":2},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":8}}"#
        );
        let mut omitted = reply();
        omitted.usage = UsageReport::Omitted;
        assert!(response_object(&omitted, true).get("usage").is_none());
    }

    #[test]
    fn stream_order_and_sequence() {
        let events: Vec<(String, Value)> = stream_events(&reply(), 3).iter().map(|e| parse(e)).collect();
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            vec![
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (kind, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], kind.as_str());
            assert_eq!(data["sequence_number"], i);
        }
        let text: String = events[4..7].iter().map(|(_, d)| d["delta"].as_str().unwrap()).collect();
        assert_eq!(text, "Hello from mock.");
        assert_eq!(events[4].1["item_id"], "msg_mock_7");
        assert_eq!(events[0].1["response"]["status"], "in_progress");
        assert_eq!(events[10].1["response"], response_object(&reply(), true));
        assert_eq!(kinds[STREAM_CUT - 1], "response.output_text.delta");
    }

    #[test]
    fn malformed_stream_breaks_json() {
        let events = malformed_stream_events(&reply());
        assert_eq!(events.len(), 2);
        let data = events[1].lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
        assert!(serde_json::from_str::<Value>(data).is_err());
        assert_eq!(
            unknown_parameter_error("stream_options")["error"]["message"],
            "Unknown parameter: 'stream_options'."
        );
    }
}
