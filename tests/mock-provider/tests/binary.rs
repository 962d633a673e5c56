//! Spawns the real binary on an ephemeral loopback port and talks raw
//! HTTP/1.1 to it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-mock-provider");

/// The running binary; killed on drop, also when a test fails.
struct Mock {
    child: Child,
    addr: String,
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Mock {
    let child = Command::new(BIN)
        .args(["--port", "0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mock provider");
    let mut mock = Mock { child, addr: String::new() };
    let stdout = mock.child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    mock.addr = line
        .trim_end()
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(mock.addr.starts_with("127.0.0.1:"), "{}", mock.addr);
    mock
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Number of HTTP chunks when the body was chunked.
    chunks: usize,
    /// Trailer fields after the last chunk (names lowercased).
    trailers: Vec<(String, String)>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }
}

/// One keep-alive connection.
struct Client {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(mock: &Mock) -> Client {
        let stream = TcpStream::connect(&mock.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line.trim_end_matches(['\r', '\n']).to_string()
    }

    fn send(&mut self, raw: &[u8]) -> Response {
        self.writer.write_all(raw).unwrap();
        self.read_response()
    }

    fn request(&mut self, method: &str, path: &str, extra: &[(&str, &str)], body: &str) -> Response {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: mock\r\n");
        for (name, value) in extra {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        self.send(raw.as_bytes())
    }

    fn read_response(&mut self) -> Response {
        let status_line = self.line();
        let status: u16 =
            status_line.split(' ').nth(1).unwrap_or_else(|| panic!("bad status line {status_line:?}")).parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut response = Response { status, headers, body: Vec::new(), chunks: 0, trailers: Vec::new() };
        if response.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line(), 16).unwrap();
                if size == 0 {
                    loop {
                        let line = self.line();
                        if line.is_empty() {
                            break;
                        }
                        let (name, value) = line.split_once(':').unwrap();
                        response.trailers.push((name.to_ascii_lowercase(), value.trim().to_string()));
                    }
                    break;
                }
                let mut data = vec![0; size];
                self.reader.read_exact(&mut data).unwrap();
                response.body.extend(data);
                assert_eq!(self.line(), "");
                response.chunks += 1;
            }
        } else if let Some(len) = response.header("content-length") {
            let mut data = vec![0; len.parse().unwrap()];
            self.reader.read_exact(&mut data).unwrap();
            response.body = data;
        } else {
            self.reader.read_to_end(&mut response.body).unwrap();
        }
        response
    }
}

fn sse_data(body: &str) -> Vec<String> {
    body.split_terminator("\n\n").map(|e| e.strip_prefix("data: ").unwrap().to_string()).collect()
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Say hi"}]}]}"#;

#[test]
fn completion_and_keep_alive() {
    let mock = start(&["--name", "alpha", "--model", "alpha-default"]);
    let mut client = Client::connect(&mock);

    let first = client.request("POST", "/v1/chat/completions", &[], CHAT);
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-mock-provider"), Some("alpha"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    let body = first.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello from alpha.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    // "Be brief." (9) + "Say hi" (6) = 15 bytes -> ceil(15/4) = 4; "Hello from alpha." = 3 words.
    assert_eq!(body["usage"], json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}));

    // Same connection, empty model falls back to --model.
    let second = client.request(
        "POST",
        "/openai/v1/chat/completions",
        &[("x-mock-text", "one two")],
        r#"{"model":"","messages":[]}"#,
    );
    assert_eq!(second.status, 200);
    let body = second.json();
    assert_eq!(body["model"], "alpha-default");
    assert_eq!(body["choices"][0]["message"]["content"], "one two");
    assert_eq!(body["usage"]["completion_tokens"], 2);
    assert_ne!(body["id"], first.json()["id"]);

    let models = client.request("GET", "/v1/models", &[], "");
    assert_eq!(models.json()["data"][0]["id"], "alpha-default");
    let health = client.request("GET", "/health", &[], "");
    assert_eq!(health.json(), json!({"status": "ok", "name": "alpha"}));
}

#[test]
fn streaming_with_include_usage() {
    let mock = start(&["--response-text", "héllo wörld from the mock", "--stream-chunks", "3"]);
    let mut client = Client::connect(&mock);
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"12345678"}]}"#;
    let response = client.request("POST", "/v1/chat/completions", &[], body);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    assert_eq!(response.header("x-mock-provider"), Some("mock"));
    let events = sse_data(&response.text());
    // role + 3 content + finish + usage + [DONE], each in its own HTTP chunk.
    assert_eq!(events.len(), 7);
    assert_eq!(response.chunks, 7);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let chunks: Vec<Value> = events[..6].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let with_usage: Vec<&Value> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
    assert_eq!(with_usage.len(), 1, "exactly one usage chunk");
    assert_eq!(with_usage[0]["choices"], json!([]));
    assert_eq!(with_usage[0]["usage"], json!({"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[1..4].iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap()).collect();
    assert_eq!(text, "héllo wörld from the mock");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");

    // The connection is still usable after a stream.
    let again = client.request("GET", "/health", &[], "");
    assert_eq!(again.status, 200);
}

#[test]
fn chunked_request_body() {
    let mock = start(&[]);
    let mut client = Client::connect(&mock);
    let body = CHAT.as_bytes();
    let (a, b) = body.split_at(20);
    let mut raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\nX-Envoy-Attempt-Count: 3\r\n\r\n".to_vec();
    raw.extend(format!("{:x};ext=1\r\n", a.len()).bytes());
    raw.extend(a);
    raw.extend(format!("\r\n{:X}\r\n", b.len()).bytes());
    raw.extend(b);
    raw.extend(b"\r\n0\r\nx-trailer: 1\r\n\r\n");
    let response = client.send(&raw);
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["usage"]["prompt_tokens"], 4);

    let log = client.request("GET", "/__mock/log", &[], "").json();
    let entry = &log[0];
    assert_eq!(entry["body_size"], CHAT.len());
    assert_eq!(entry["body"]["model"], "gpt-4o-mini");
    assert_eq!(entry["headers"]["transfer-encoding"], "chunked");
    assert_eq!(entry["attempt"], 3);
}

#[test]
fn forced_429_with_retry_after() {
    let mock = start(&["--name", "beta", "--retry-after", "7", "--retry-after-ms", "7000"]);
    let mut client = Client::connect(&mock);
    let response = client.request("POST", "/v1/chat/completions", &[("x-mock-fail", "429")], CHAT);
    assert_eq!(response.status, 429);
    assert_eq!(response.header("retry-after"), Some("7"));
    assert_eq!(response.header("retry-after-ms"), Some("7000"));
    assert_eq!(response.header("x-ratelimit-reset-requests"), None);
    assert_eq!(response.header("x-mock-provider"), Some("beta"));
    let error = response.json();
    assert_eq!(error["error"]["type"], "rate_limit_error");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["message"], "Rate limit reached for gpt-4o-mini (mock beta)");
    // Still keep-alive after an error.
    let ok = client.request("POST", "/v1/chat/completions", &[], CHAT);
    assert_eq!(ok.status, 200);
}

#[test]
fn control_api() {
    let log_dir = std::env::temp_dir().join(format!("sluice-mock-test-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).unwrap();
    let log_file = log_dir.join("requests.jsonl");
    let _ = std::fs::remove_file(&log_file);
    let mock = start(&["--log", log_file.to_str().unwrap()]);
    let mut client = Client::connect(&mock);

    let config = client.request("GET", "/__mock/config", &[], "").json();
    assert_eq!(config["rate_503"], 0);
    assert_eq!(config["retry_after"], "1");

    let update = client.request("POST", "/__mock/config", &[], r#"{"rate_503": 50, "response_text": "changed text"}"#);
    assert_eq!(update.status, 200);
    assert_eq!(update.json()["rate_503"], 50);
    let bad = client.request("POST", "/__mock/config", &[], r#"{"no_such_thing": 1}"#);
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]["message"].as_str().unwrap().contains("no_such_thing"));

    let statuses: Vec<u16> = (0..4).map(|_| client.request("POST", "/v1/chat/completions", &[], CHAT).status).collect();
    assert_eq!(statuses, vec![200, 503, 200, 503]);
    let first = client.request("POST", "/v1/chat/completions", &[], CHAT);
    assert_eq!(first.json()["choices"][0]["message"]["content"], "changed text");

    let stats = client.request("GET", "/__mock/stats", &[], "").json();
    assert_eq!(stats, json!({"requests": 5, "by_status": {"200": 3, "503": 2}, "by_failure": {"503": 2}}));
    let log = client.request("GET", "/__mock/log", &[], "").json();
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 5);
    assert_eq!(log[1]["failure"], "503");
    assert_eq!(log[1]["status"], 503);
    assert_eq!(log[0]["provider"], "mock");
    assert_eq!(log[0]["method"], "POST");
    assert!(log[0]["ts"].as_f64().unwrap() > 1.7e9);

    let on_disk = std::fs::read_to_string(&log_file).unwrap();
    let lines: Vec<Value> = on_disk.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.as_slice(), log.as_slice());

    let cleared = client.request("DELETE", "/__mock/log", &[], "");
    assert_eq!(cleared.json(), json!({"cleared": 5}));
    let log = client.request("GET", "/__mock/log", &[], "").json();
    assert_eq!(log, json!([]));

    let reset = client.request("POST", "/__mock/reset", &[], "");
    assert_eq!(reset.json()["rate_503"], 0);
    let _ = std::fs::remove_dir_all(&log_dir);
}

#[test]
fn connection_close_and_garbage() {
    let mock = start(&[]);
    let mut client = Client::connect(&mock);
    let response = client.request("GET", "/health", &[("Connection", "close")], "");
    assert_eq!(response.header("connection"), Some("close"));
    let mut rest = Vec::new();
    client.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    let mut client = Client::connect(&mock);
    let response = client.send(b"\x16\x03\x01 not http at all\r\n\r\n");
    assert_eq!(response.status, 400);
    assert_eq!(response.header("x-mock-provider"), Some("mock"));

    // Reset: the connection closes without a status line.
    let mut client = Client::connect(&mock);
    client
        .writer
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nx-mock-fail: reset\r\nContent-Length: {}\r\n\r\n{CHAT}",
                CHAT.len()
            )
            .as_bytes(),
        )
        .unwrap();
    let mut rest = Vec::new();
    let _ = client.reader.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

#[test]
fn bad_command_lines_exit_2() {
    let out = Command::new(BIN).arg("--bogus-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus-flag"));
    assert!(out.stdout.is_empty());

    let out = Command::new(BIN).args(["--host", "0.0.0.0", "--port", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

// ---------------------------------------------------------------------------
// Endpoints and features beyond chat completions.
// ---------------------------------------------------------------------------

/// `event:` + `data:` SSE events as (event name, parsed data).
fn typed_events(body: &str) -> Vec<(String, Value)> {
    body.split_terminator("\n\n")
        .map(|e| {
            let (head, data) = e.split_once('\n').unwrap_or_else(|| panic!("event without data: {e:?}"));
            let name = head.strip_prefix("event: ").unwrap().to_string();
            (name, serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap())
        })
        .collect()
}

fn parsed_chunks(body: &str) -> Vec<Value> {
    let events = sse_data(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

fn cosine(a: &Value, b: &Value) -> f64 {
    let a = a.as_array().unwrap();
    let b = b.as_array().unwrap();
    a.iter().zip(b).map(|(x, y)| x.as_f64().unwrap() * y.as_f64().unwrap()).sum()
}

fn last_log(client: &mut Client) -> Value {
    let log = client.request("GET", "/__mock/log", &[], "").json();
    log.as_array().unwrap().last().unwrap().clone()
}

/// Decodes standard padded base64.
fn unbase64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64 byte {c}"),
        }
    };
    let mut out = Vec::new();
    for quad in text.as_bytes().chunks(4) {
        let pad = quad.iter().filter(|&&c| c == b'=').count();
        let n = quad.iter().take(4 - pad).fold(0u32, |acc, &c| (acc << 6) | value(c)) << (6 * pad);
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..3 - pad]);
    }
    out
}

#[test]
fn embeddings_are_deterministic_and_semantic() {
    let mock = start(&["--model", "emb-default"]);
    let mut client = Client::connect(&mock);
    let body = json!({
        "model": "text-embedding-3-small",
        "input": ["What is the capital of France?", "Tell me the capital city of France", "How do I bake sourdough bread at home"]
    })
    .to_string();
    let response = client.request("POST", "/v1/embeddings", &[], &body);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    let json = response.json();
    assert_eq!(json["object"], "list");
    assert_eq!(json["model"], "text-embedding-3-small");
    let data = json["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert_eq!(item["embedding"].as_array().unwrap().len(), 256);
        assert!((cosine(&item["embedding"], &item["embedding"]) - 1.0).abs() < 1e-5, "unit length");
    }
    assert!(cosine(&data[0]["embedding"], &data[1]["embedding"]) > 0.8);
    assert!(cosine(&data[0]["embedding"], &data[2]["embedding"]).abs() < 0.1);
    // 30 + 34 + 37 = 101 bytes -> ceil(101/4) = 26
    assert_eq!(json["usage"], json!({"prompt_tokens": 26, "total_tokens": 26}));

    // Same input, same vector; a string input; --model fallback; dimensions.
    let again = client.request("POST", "/v1/embeddings", &[], r#"{"input":"What is the capital of France?"}"#).json();
    assert_eq!(again["data"][0]["embedding"], data[0]["embedding"]);
    assert_eq!(again["model"], "emb-default");
    let small = client.request("POST", "/v1/embeddings", &[], r#"{"input":"x","dimensions":8}"#).json();
    assert_eq!(small["data"][0]["embedding"].as_array().unwrap().len(), 8);

    // base64: little-endian f32 of the same vector.
    let b64 = client
        .request(
            "POST",
            "/v1/embeddings",
            &[],
            r#"{"input":"What is the capital of France?","encoding_format":"base64"}"#,
        )
        .json();
    let bytes = unbase64(b64["data"][0]["embedding"].as_str().unwrap());
    let floats: Vec<f64> = bytes.chunks(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect();
    let expected: Vec<f64> = data[0]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(floats, expected);

    // Token-id arrays are rejected.
    for bad in [r#"{"input":[1,2,3]}"#, r#"{"input":[[1,2],[3]]}"#] {
        let response = client.request("POST", "/v1/embeddings", &[], bad);
        assert_eq!(response.status, 400, "{bad}");
        assert_eq!(response.json()["error"]["type"], "invalid_request_error");
        assert_eq!(response.json()["error"]["param"], "input");
    }
    let entry = last_log(&mut client);
    assert_eq!(entry["endpoint"], "embeddings");
    assert_eq!(entry["status"], 400);

    // Failure injection applies.
    let failed = client.request("POST", "/v1/embeddings", &[("x-mock-fail", "429")], r#"{"input":"a"}"#);
    assert_eq!(failed.status, 429);
    assert_eq!(last_log(&mut client)["failure"], "429");
    let truncated = client.request("POST", "/v1/embeddings", &[("x-mock-fail", "malformed")], r#"{"input":"a"}"#);
    assert_eq!(truncated.status, 200);
    assert!(serde_json::from_slice::<Value>(&truncated.body).is_err());
}

#[test]
fn responses_api_json_and_stream() {
    let mock = start(&["--response-text", "one two three four", "--stream-chunks", "2"]);
    let mut client = Client::connect(&mock);
    let body = json!({
        "model": "gpt-4.1", "instructions": "Be nice.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}, {"role": "user", "content": "ab"}]
    })
    .to_string();
    let headers = [("x-mock-cached-tokens", "2"), ("x-mock-reasoning-tokens", "1")];
    let response = client.request("POST", "/v1/responses", &headers, &body);
    assert_eq!(response.status, 200);
    let json = response.json();
    let id = json["id"].as_str().unwrap().to_string();
    let n = id.strip_prefix("resp_mock_").unwrap();
    // 8 + 6 + 2 = 16 bytes -> 4 tokens; 4 words.
    assert_eq!(
        json,
        json!({
            "id": id, "object": "response", "created_at": 1730000000, "status": "completed", "model": "gpt-4.1",
            "output": [{"type": "message", "id": format!("msg_mock_{n}"), "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "one two three four", "annotations": []}]}],
            "usage": {"input_tokens": 4, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 4,
                      "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 8}
        })
    );

    let stream_body = json!({"model": "gpt-4.1", "input": "hi", "stream": true}).to_string();
    let response = client.request("POST", "/v1/responses", &[], &stream_body);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let text = response.text();
    assert!(!text.contains("[DONE]"));
    let events = typed_events(&text);
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
    let deltas: String = events[4..6].iter().map(|(_, d)| d["delta"].as_str().unwrap()).collect();
    assert_eq!(deltas, "one two three four");
    assert_eq!(events[4].1["output_index"], 0);
    assert_eq!(events[4].1["content_index"], 0);
    assert!(events[4].1["item_id"].as_str().unwrap().starts_with("msg_mock_"));
    let completed = &events[9].1["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["usage"]["input_tokens"], 1);
    assert_eq!(completed["usage"]["output_tokens"], 4);

    // stream_options is not a Responses parameter.
    let bad = json!({"model": "m", "input": "hi", "stream": true, "stream_options": {"include_usage": true}});
    let response = client.request("POST", "/v1/responses", &[], &bad.to_string());
    assert_eq!(response.status, 400);
    assert_eq!(
        response.json(),
        json!({"error": {"message": "Unknown parameter: 'stream_options'.", "type": "invalid_request_error",
                          "param": "stream_options", "code": "unknown_parameter"}})
    );
    let entry = last_log(&mut client);
    assert_eq!(entry["endpoint"], "responses");
    assert_eq!(entry["model"], "m");
    assert_eq!(entry["stream"], true);
}

const MESSAGES: &str = r#"{"model":"claude-sonnet-4","max_tokens":256,"system":"Be brief.","messages":[{"role":"user","content":[{"type":"text","text":"Say hi"}]}]}"#;

#[test]
fn anthropic_messages() {
    let mock = start(&["--name", "claude", "--cached-tokens", "3"]);
    let mut client = Client::connect(&mock);
    let version = [("anthropic-version", "2023-06-01")];

    let response = client.request("POST", "/v1/messages", &version, MESSAGES);
    assert_eq!(response.status, 200);
    let json = response.json();
    let id = json["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("msg_mock_"));
    // "Be brief." (9) + "Say hi" (6) = 15 bytes -> 4; "Hello from claude." = 3 words.
    assert_eq!(
        json,
        json!({"id": id, "type": "message", "role": "assistant", "model": "claude-sonnet-4",
               "content": [{"type": "text", "text": "Hello from claude."}], "stop_reason": "end_turn",
               "stop_sequence": null,
               "usage": {"input_tokens": 4, "output_tokens": 3, "cache_creation_input_tokens": 0,
                         "cache_read_input_tokens": 3}})
    );
    let entry = last_log(&mut client);
    assert_eq!(entry["endpoint"], "messages");
    assert_eq!(entry["model"], "claude-sonnet-4");
    assert_eq!(entry["headers"]["anthropic-version"], "2023-06-01");

    // Streaming.
    let stream_body = MESSAGES.replacen("\"max_tokens\":256", "\"max_tokens\":256,\"stream\":true", 1);
    let response = client.request("POST", "/v1/messages", &version, &stream_body);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let events = typed_events(&response.text());
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(
        events[0].1["message"]["usage"],
        json!({"input_tokens": 4, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3})
    );
    let text: String = events[3..7].iter().map(|(_, d)| d["delta"]["text"].as_str().unwrap()).collect();
    assert_eq!(text, "Hello from claude.");
    assert_eq!(
        events[8].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": 3}})
    );

    // count_tokens: same validation without max_tokens.
    let count = client.request(
        "POST",
        "/v1/messages/count_tokens",
        &version,
        r#"{"model":"claude-sonnet-4","system":"Be brief.","messages":[{"role":"user","content":"Say hi"}]}"#,
    );
    assert_eq!(count.status, 200);
    assert_eq!(count.json(), json!({"input_tokens": 4}));
    assert_eq!(last_log(&mut client)["endpoint"], "count_tokens");
    let count = client.request("POST", "/v1/messages/count_tokens", &version, r#"{"model":"c","messages":[]}"#);
    assert_eq!(count.status, 400);

    // Validation errors, in Anthropic's shape.
    let error =
        |message: &str| json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}});
    let response = client.request("POST", "/v1/messages", &[], MESSAGES);
    assert_eq!(response.status, 400);
    assert_eq!(response.json(), error("anthropic-version: header is required"));
    let cases = [
        (MESSAGES.replacen("\"system\"", "\"stream_options\":{},\"system\"", 1), "stream_options: Extra inputs are not permitted"),
        (r#"{"model":"c","messages":[{"role":"user","content":"x"}]}"#.to_string(), "max_tokens: Field required"),
        (r#"{"model":"c","max_tokens":0,"messages":[{"role":"user","content":"x"}]}"#.to_string(), "max_tokens: Input should be greater than or equal to 1"),
        (r#"{"model":"c","max_tokens":5,"messages":[]}"#.to_string(), "messages: at least one message is required"),
        (r#"{"max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#.to_string(), "model: Field required"),
        (r#"{"model":"c","max_tokens":5,"temperature":2,"messages":[{"role":"user","content":"x"}]}"#.to_string(), "temperature: Input should be less than or equal to 1"),
        (r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":[{"type":"video"}]}]}"#.to_string(), "messages.0.content.0: Input tag 'video' found using 'type' does not match any of the expected tags: 'text', 'image', 'tool_use', 'tool_result', 'document'"),
        (r#"{"model":"c","max_tokens":5,"tools":[{"name":"f"}],"messages":[{"role":"user","content":"x"}]}"#.to_string(), "tools.0.input_schema: Field required"),
    ];
    for (body, message) in cases {
        let response = client.request("POST", "/v1/messages", &version, &body);
        assert_eq!(response.status, 400, "{body}");
        assert_eq!(response.json(), error(message), "{body}");
    }
    let system_role = r#"{"model":"c","max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#;
    let response = client.request("POST", "/v1/messages", &version, system_role);
    assert_eq!(response.status, 400);
    assert!(response.json()["error"]["message"].as_str().unwrap().contains("Unexpected role \"system\""));
    let entry = last_log(&mut client);
    assert_eq!((entry["status"].clone(), entry["failure"].clone()), (json!(400), Value::Null));

    // Injected failures use Anthropic's error shape too.
    let response = client.request(
        "POST",
        "/v1/messages",
        &[("anthropic-version", "2023-06-01"), ("x-mock-fail", "429")],
        MESSAGES,
    );
    assert_eq!(response.status, 429);
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(response.json()["type"], "error");
    assert_eq!(response.json()["error"]["type"], "rate_limit_error");
    let response = client.request(
        "POST",
        "/v1/messages",
        &[("anthropic-version", "2023-06-01"), ("x-mock-fail", "503")],
        MESSAGES,
    );
    assert_eq!(response.status, 503);
    assert_eq!(response.json()["error"]["type"], "overloaded_error");
}

#[test]
fn context_window() {
    let mock = start(&["--context-window", "3"]);
    let mut client = Client::connect(&mock);
    // CHAT has 4 prompt tokens.
    let response = client.request("POST", "/v1/chat/completions", &[], CHAT);
    assert_eq!(response.status, 400);
    assert_eq!(
        response.json(),
        json!({"error": {"message": "This model's maximum context length is 3 tokens. However, your messages resulted in 4 tokens. Please reduce the length of the messages.",
                         "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
    );
    let entry = last_log(&mut client);
    assert_eq!((entry["status"].clone(), entry["failure"].clone()), (json!(400), Value::Null));
    let legacy = client.request("POST", "/v1/completions", &[], r#"{"model":"m","prompt":"1234567890123"}"#);
    assert_eq!(legacy.status, 400);
    assert_eq!(legacy.json()["error"]["code"], "context_length_exceeded");
    let responses = client.request("POST", "/v1/responses", &[], r#"{"model":"m","input":"1234567890123"}"#);
    assert_eq!(responses.json()["error"]["code"], "context_length_exceeded");
    let messages = client.request("POST", "/v1/messages", &[("anthropic-version", "2023-06-01")], MESSAGES);
    assert_eq!(messages.status, 400);
    assert_eq!(
        messages.json(),
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 4 tokens > 3 maximum"}})
    );
    // Under the window it answers; the window is in the config.
    let short = client.request("POST", "/v1/chat/completions", &[], r#"{"messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(short.status, 200);
    assert_eq!(client.request("GET", "/__mock/config", &[], "").json()["context_window"], 3);
    client.request("POST", "/__mock/config", &[], r#"{"context_window": null}"#);
    assert_eq!(client.request("POST", "/v1/chat/completions", &[], CHAT).status, 200);
    // Forced.
    let forced = client.request("POST", "/v1/chat/completions", &[("x-mock-fail", "context_length")], CHAT);
    assert_eq!(forced.status, 400);
    assert_eq!(forced.json()["error"]["code"], "context_length_exceeded");
    assert_eq!(last_log(&mut client)["failure"], "context_length");
}

/// Sends a raw request on a fresh connection and returns everything the
/// server sent until `quiet` passes without data (`true`), or until the
/// server closed the connection (`false`).
fn read_until_quiet(mock: &Mock, raw: &[u8], quiet: Duration) -> (Vec<u8>, bool) {
    let mut stream = TcpStream::connect(&mock.addr).unwrap();
    stream.set_read_timeout(Some(quiet)).unwrap();
    stream.write_all(raw).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return (got, true)
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

fn raw_post(path: &str, extra: &str, body: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: mock\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

#[test]
fn stalls() {
    let mock = start(&["--stall-timeout-ms", "1500"]);
    // Nothing is sent and the connection stays open.
    let (got, open) = read_until_quiet(
        &mock,
        &raw_post("/v1/chat/completions", "x-mock-fail: stall\r\n", CHAT),
        Duration::from_millis(400),
    );
    assert!(got.is_empty());
    assert!(open, "connection still open");

    // Mid-stream: headers, role chunk, one content chunk, then silence.
    let stream_chat = r#"{"stream":true,"messages":[]}"#;
    let (got, open) = read_until_quiet(
        &mock,
        &raw_post("/v1/chat/completions", "x-mock-fail: stall_mid_stream\r\n", stream_chat),
        Duration::from_millis(400),
    );
    let text = String::from_utf8(got).unwrap();
    assert!(open);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
    assert_eq!(text.matches("data: ").count(), 2);
    assert!(text.contains(r#""role":"assistant""#));
    assert!(text.contains(r#""content":"Hell""#), "{text}");
    assert!(!text.contains("[DONE]") && !text.ends_with("0\r\n\r\n"));

    // Mid-body for a non-streaming request.
    let (got, open) = read_until_quiet(
        &mock,
        &raw_post("/v1/chat/completions", "x-mock-fail: stall_mid_stream\r\n", CHAT),
        Duration::from_millis(400),
    );
    assert!(open);
    let text = String::from_utf8(got).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let declared: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
    assert_eq!(body.len(), declared / 2);

    // After the stall timeout the server closes the connection.
    let (got, open) = read_until_quiet(
        &mock,
        &raw_post("/v1/embeddings", "x-mock-fail: stall\r\n", r#"{"input":"a"}"#),
        Duration::from_secs(5),
    );
    assert!(got.is_empty());
    assert!(!open, "closed after --stall-timeout-ms");

    let mut client = Client::connect(&mock);
    let log = client.request("GET", "/__mock/log", &[], "").json();
    let summary: Vec<(Value, Value)> =
        log.as_array().unwrap().iter().map(|e| (e["status"].clone(), e["failure"].clone())).collect();
    assert_eq!(
        summary,
        vec![
            (json!(0), json!("stall")),
            (json!(200), json!("stall_mid_stream")),
            (json!(200), json!("stall_mid_stream")),
            (json!(0), json!("stall")),
        ]
    );

    // The schedule: --rate-stall through the config.
    client.request("POST", "/__mock/config", &[], r#"{"rate_stall": 100}"#);
    let (got, open) = read_until_quiet(&mock, &raw_post("/v1/chat/completions", "", CHAT), Duration::from_millis(300));
    assert!(got.is_empty() && open);
    let stats = client.request("GET", "/__mock/stats", &[], "").json();
    assert_eq!(stats["by_failure"]["stall"], 3);
}

#[test]
fn long_outputs() {
    let mock = start(&["--completion-words", "2000", "--stream-chunks", "50"]);
    let mut client = Client::connect(&mock);
    let body = r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"go"}]}"#;
    let response = client.request("POST", "/v1/chat/completions", &[], body);
    assert_eq!(response.status, 200);
    let chunks = parsed_chunks(&response.text());
    // role + 50 content + finish + usage
    assert_eq!(chunks.len(), 53);
    let text: String = chunks[1..51].iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap()).collect();
    let expected: Vec<String> = (1..=2000).map(|i| format!("w{i}")).collect();
    assert_eq!(text, expected.join(" "));
    assert_eq!(chunks[52]["usage"]["completion_tokens"], 2000);

    // Per request: x-mock-words and x-mock-stream-chunks.
    let response = client.request(
        "POST",
        "/v1/chat/completions",
        &[("x-mock-words", "5"), ("x-mock-stream-chunks", "2")],
        r#"{"stream":true,"messages":[]}"#,
    );
    let chunks = parsed_chunks(&response.text());
    assert_eq!(chunks.len(), 1 + 2 + 1);
    let json = client.request("POST", "/v1/chat/completions", &[("x-mock-words", "5")], CHAT).json();
    assert_eq!(json["choices"][0]["message"]["content"], "w1 w2 w3 w4 w5");
    assert_eq!(json["usage"]["completion_tokens"], 5);
    assert_eq!(client.request("GET", "/__mock/config", &[], "").json()["completion_words"], 2000);
}

#[test]
fn chat_extra_channels_and_logprobs() {
    let mock = start(&["--stream-chunks", "2"]);
    let mut client = Client::connect(&mock);
    let headers = [
        ("x-mock-reasoning", "secret plan"),
        ("x-mock-tool-args", r#"{"city":"Paris"}"#),
        ("x-mock-audio-transcript", "said aloud"),
    ];
    let body = r#"{"model":"m","logprobs":true,"top_logprobs":2,"messages":[]}"#;
    let json = client.request("POST", "/v1/chat/completions", &headers, body).json();
    let choice = &json["choices"][0];
    let message = &choice["message"];
    assert_eq!(message["content"], "Hello from mock.");
    assert_eq!(message["reasoning_content"], "secret plan");
    assert_eq!(
        message["tool_calls"],
        json!([{"id": "call_mock_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"city\":\"Paris\"}"}}])
    );
    assert_eq!(
        message["audio"],
        json!({"id": "audio_mock_1", "data": "", "expires_at": 1730003600, "transcript": "said aloud"})
    );
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        choice["logprobs"]["content"][1],
        json!({"token": " from", "logprob": -0.1, "bytes": [32, 102, 114, 111, 109],
               "top_logprobs": [{"token": " from", "logprob": -0.1, "bytes": [32, 102, 114, 111, 109]},
                                {"token": " FROM", "logprob": -1.1, "bytes": [32, 70, 82, 79, 77]}]})
    );
    assert!(choice["logprobs"]["refusal"].is_null());
    // C = 3 (content) + 2 (reasoning) + 1 (tool args) + 2 (transcript)
    assert_eq!(json["usage"]["completion_tokens"], 8);

    let stream = client.request(
        "POST",
        "/v1/chat/completions",
        &headers,
        r#"{"model":"m","stream":true,"logprobs":true,"messages":[]}"#,
    );
    let chunks = parsed_chunks(&stream.text());
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    let reasoning: String = deltas.iter().filter_map(|d| d["reasoning_content"].as_str()).collect();
    let content: String = deltas.iter().filter_map(|d| d["content"].as_str()).collect();
    let transcript: String = deltas.iter().filter_map(|d| d["audio"]["transcript"].as_str()).collect();
    let args: String = deltas.iter().filter_map(|d| d["tool_calls"][0]["function"]["arguments"].as_str()).collect();
    assert_eq!(
        (reasoning.as_str(), content.as_str(), transcript.as_str(), args.as_str()),
        ("secret plan", "Hello from mock.", "said aloud", r#"{"city":"Paris"}"#)
    );
    let first_reasoning = deltas.iter().position(|d| d.get("reasoning_content").is_some()).unwrap();
    let first_content = deltas.iter().position(|d| d["content"].as_str().is_some_and(|c| !c.is_empty())).unwrap();
    assert!(first_reasoning < first_content);
    let tool_head = deltas.iter().find(|d| d["tool_calls"][0].get("id").is_some()).unwrap();
    assert_eq!(tool_head["tool_calls"][0]["function"], json!({"name": "lookup", "arguments": ""}));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    let lp_tokens: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(lp_tokens, "Hello from mock.");

    // Refusal: content null, refusal text, in JSON and in the stream.
    let refusal = [("x-mock-refusal", "I cannot do that")];
    let json = client.request("POST", "/v1/chat/completions", &refusal, CHAT).json();
    assert!(json["choices"][0]["message"]["content"].is_null());
    assert_eq!(json["choices"][0]["message"]["refusal"], "I cannot do that");
    let stream = client.request("POST", "/v1/chat/completions", &refusal, r#"{"stream":true,"messages":[]}"#);
    let refused: String = parsed_chunks(&stream.text())
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["refusal"].as_str().map(str::to_string))
        .collect();
    assert_eq!(refused, "I cannot do that");
}

#[test]
fn legacy_completions_and_usage_details() {
    let mock = start(&["--cached-tokens", "2", "--reasoning-tokens", "1"]);
    let mut client = Client::connect(&mock);
    let json = client.request("POST", "/v1/completions", &[], r#"{"model":"davinci","prompt":"12345678"}"#).json();
    let id = json["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("cmpl-mock-"));
    assert_eq!(json["object"], "text_completion");
    assert_eq!(json["model"], "davinci");
    assert_eq!(
        json["choices"],
        json!([{"index": 0, "text": "Hello from mock.", "finish_reason": "stop", "logprobs": null}])
    );
    assert_eq!(
        json["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
               "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 1, "audio_tokens": 0,
                                             "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}})
    );
    assert_eq!(last_log(&mut client)["endpoint"], "completions");

    let body = r#"{"model":"davinci","prompt":["ab","cd"],"stream":true,"stream_options":{"include_usage":true},"logprobs":1}"#;
    let stream = client.request("POST", "/v1/completions", &[("x-mock-cached-tokens", "0")], body);
    let chunks = parsed_chunks(&stream.text());
    assert_eq!(chunks.len(), 4 + 1 + 1);
    let text: String = chunks[..4].iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(text, "Hello from mock.");
    assert_eq!(chunks[0]["object"], "text_completion");
    assert!(chunks[0]["choices"][0]["logprobs"]["tokens"].is_array());
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(chunks[5]["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // Chat: details in JSON and in the include_usage chunk; header overrides.
    let json = client.request("POST", "/v1/chat/completions", &[("x-mock-reasoning-tokens", "7")], CHAT).json();
    assert_eq!(json["usage"]["prompt_tokens_details"], json!({"cached_tokens": 2, "audio_tokens": 0}));
    assert_eq!(json["usage"]["completion_tokens_details"]["reasoning_tokens"], 7);
    let body = r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let chunks = parsed_chunks(&client.request("POST", "/v1/chat/completions", &[], body).text());
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens_details"]["reasoning_tokens"], 1);
}

#[test]
fn response_format_overrides() {
    let mock = start(&[]);
    let mut client = Client::connect(&mock);
    let response =
        client.request("POST", "/v1/chat/completions", &[("x-mock-content-type", "text/html; charset=utf-8")], CHAT);
    assert_eq!(response.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(response.json()["object"], "chat.completion");
    let response = client.request("POST", "/v1/chat/completions", &[("x-mock-content-type", "none")], CHAT);
    assert_eq!(response.header("content-type"), None);
    assert_eq!(response.json()["object"], "chat.completion");
    let response = client.request(
        "POST",
        "/v1/chat/completions",
        &[("x-mock-content-type", "application/json")],
        r#"{"stream":true,"messages":[]}"#,
    );
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert!(response.text().ends_with("data: [DONE]\n\n"));

    let response = client.request("POST", "/v1/chat/completions", &[("x-mock-body", "text")], CHAT);
    assert_eq!(response.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(response.text(), "Hello from mock.");

    let response = client.request("POST", "/v1/chat/completions", &[("x-mock-content-encoding", "gzip")], CHAT);
    assert_eq!(response.header("content-encoding"), Some("gzip"));
    assert_eq!(&response.body[..2], &[0x1f, 0x8b]);
    let mut python = Command::new("python3")
        .args(["-c", "import gzip,sys; sys.stdout.buffer.write(gzip.decompress(sys.stdin.buffer.read()))"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    python.stdin.take().unwrap().write_all(&response.body).unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(out.status.success());
    let decoded: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decoded["choices"][0]["message"]["content"], "Hello from mock.");
}

#[test]
fn trailers_both_ways() {
    let mock = start(&[]);
    let mut client = Client::connect(&mock);
    let response = client.request("POST", "/v1/chat/completions", &[("x-mock-trailers", "1")], CHAT);
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.header("trailer"), Some("x-mock-trailer"));
    assert_eq!(response.header("content-length"), None);
    assert_eq!(response.trailers, vec![("x-mock-trailer".to_string(), "done".to_string())]);
    assert_eq!(response.json()["object"], "chat.completion");
    let response = client.request("POST", "/v1/chat/completions", &[("x-mock-trailers", "1")], r#"{"stream":true}"#);
    assert_eq!(response.trailers, vec![("x-mock-trailer".to_string(), "done".to_string())]);
    assert!(response.text().ends_with("data: [DONE]\n\n"));
    let plain = client.request("POST", "/v1/chat/completions", &[], CHAT);
    assert!(plain.trailers.is_empty() && plain.header("content-length").is_some());

    // --response-trailers turns them on for every answer; x-mock-trailers: 0 turns them off.
    let mock = start(&["--response-trailers"]);
    let mut client = Client::connect(&mock);
    let response = client.request("POST", "/v1/messages", &[("anthropic-version", "2023-06-01")], MESSAGES);
    assert_eq!(response.trailers, vec![("x-mock-trailer".to_string(), "done".to_string())]);
    let response = client.request("POST", "/v1/chat/completions", &[("x-mock-trailers", "0")], CHAT);
    assert!(response.trailers.is_empty());

    // Request trailers are parsed and logged.
    let mut raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\nTrailer: x-client-sig\r\n\r\n".to_vec();
    raw.extend(format!("{:x}\r\n{CHAT}\r\n0\r\nX-Client-Sig: abc\r\nX-Other: 1\r\n\r\n", CHAT.len()).bytes());
    let response = client.send(&raw);
    assert_eq!(response.status, 200);
    let entry = last_log(&mut client);
    assert_eq!(entry["trailers"], json!({"x-client-sig": "abc", "x-other": "1"}));
    assert_eq!(entry["endpoint"], "chat");
    assert_eq!(entry["body_size"], CHAT.len());
}

#[test]
fn log_endpoint_field() {
    let mock = start(&[]);
    let mut client = Client::connect(&mock);
    client.request("POST", "/v1/chat/completions", &[], CHAT);
    client.request("POST", "/v1/completions", &[], r#"{"prompt":"x"}"#);
    client.request("POST", "/v1/responses", &[], r#"{"input":"x"}"#);
    client.request("POST", "/v1/embeddings", &[], r#"{"input":"x"}"#);
    client.request("POST", "/v1/messages", &[("anthropic-version", "2023-06-01")], MESSAGES);
    client.request("POST", "/v1/messages/count_tokens", &[("anthropic-version", "2023-06-01")], MESSAGES);
    client.request("GET", "/v1/models", &[], "");
    client.request("GET", "/nope", &[], "");
    client.request("GET", "/v1/embeddings", &[], "");
    let log = client.request("GET", "/__mock/log", &[], "").json();
    let endpoints: Vec<&str> = log.as_array().unwrap().iter().map(|e| e["endpoint"].as_str().unwrap()).collect();
    assert_eq!(
        endpoints,
        vec![
            "chat",
            "completions",
            "responses",
            "embeddings",
            "messages",
            "count_tokens",
            "models",
            "other",
            "embeddings"
        ]
    );
    let statuses: Vec<u64> = log.as_array().unwrap().iter().map(|e| e["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 200, 200, 404, 405]);
    for entry in log.as_array().unwrap() {
        for key in [
            "ts",
            "provider",
            "method",
            "path",
            "headers",
            "model",
            "body_size",
            "body",
            "body_text",
            "stream",
            "status",
            "failure",
            "attempt",
            "trailers",
        ] {
            assert!(entry.get(key).is_some(), "{key} missing in {entry}");
        }
    }
}
