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
        let mut response = Response { status, headers, body: Vec::new(), chunks: 0 };
        if response.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line(), 16).unwrap();
                if size == 0 {
                    assert_eq!(self.line(), "", "no trailers expected");
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
