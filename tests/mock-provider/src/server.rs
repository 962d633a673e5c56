//! Connection handling and routing: traffic endpoints (chat completions,
//! models, health), the `/__mock/*` control API, the request log.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::http::{self, Conn, Framing, HttpError, Request};
use crate::provider::{self, ChatRequest, Failure, FailureCounters, Reply, UsageReport};
use crate::settings::Settings;

/// Pause between the two halves of an event with `split_writes`.
const SPLIT_PAUSE: Duration = Duration::from_millis(20);
/// `body_text` in the log is cut to this many bytes.
const MAX_LOGGED_BODY_TEXT: usize = 65536;

/// Shared server state.
pub struct State {
    settings: Mutex<Settings>,
    initial: Settings,
    counters: Mutex<FailureCounters>,
    log: Mutex<Vec<Value>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What to do with the connection after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    KeepAlive,
    /// Close gracefully (the response said `connection: close` or was
    /// delimited by the close).
    Close,
    /// Drop the connection at once (reset / truncate failures).
    Abort,
}

fn after(close: bool) -> Next {
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

impl State {
    pub fn new(settings: Settings) -> Self {
        State {
            initial: settings.clone(),
            settings: Mutex::new(settings),
            counters: Mutex::new(FailureCounters::default()),
            log: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        }
    }

    fn settings(&self) -> Settings {
        lock(&self.settings).clone()
    }

    /// Appends a log entry to memory and, if configured, to the log file.
    fn record(&self, settings: &Settings, entry: Value) {
        let mut log = lock(&self.log);
        if let Some(path) = &settings.log {
            let line = format!("{entry}\n");
            let written =
                OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                eprintln!("sluice-mock-provider: cannot write log {path}: {e}");
            }
        }
        log.push(entry);
    }

    fn stats(&self) -> Value {
        let log = lock(&self.log);
        let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_failure: BTreeMap<String, u64> = BTreeMap::new();
        for entry in log.iter() {
            let status = entry.get("status").map_or(String::new(), Value::to_string);
            *by_status.entry(status).or_default() += 1;
            if let Some(f) = entry.get("failure").and_then(Value::as_str) {
                *by_failure.entry(f.to_string()).or_default() += 1;
            }
        }
        json!({"requests": log.len(), "by_status": by_status, "by_failure": by_failure})
    }
}

/// Serves one TCP connection until the peer closes it or a response ends it.
pub fn serve_connection(state: &State, stream: TcpStream) {
    // Every SSE event should leave as its own segment.
    let _ = stream.set_nodelay(true);
    let reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-mock-provider: cannot clone socket: {e}");
            return;
        }
    };
    let mut conn = Conn::new(reader);
    let mut writer = stream;
    let next = loop {
        match serve_one(state, &mut conn, &mut writer) {
            Ok(Next::KeepAlive) => continue,
            Ok(next) => break next,
            Err(_) => break Next::Abort,
        }
    };
    if next == Next::Close {
        // Let the client read the response before the socket goes away:
        // half-close, then drain what the client still sends (briefly).
        let _ = writer.shutdown(Shutdown::Write);
        let _ = writer.set_read_timeout(Some(Duration::from_millis(500)));
        let mut sink = [0u8; 4096];
        let mut drained = 0usize;
        while let Ok(n @ 1..) = writer.read(&mut sink) {
            drained += n;
            if drained > 1024 * 1024 {
                break;
            }
        }
    }
    // Dropping `writer` (and the reader clone inside `conn`) closes the socket.
}

/// Reads and answers one request.
pub fn serve_one<R: Read, W: Write>(state: &State, conn: &mut Conn<R>, w: &mut W) -> io::Result<Next> {
    let head = match conn.read_head() {
        Ok(Some(head)) => head,
        Ok(None) => return Ok(Next::Close),
        Err(e) => return reject(state, w, e),
    };
    if head.expects_continue() && head.framing().is_ok_and(|f| f != Framing::None) {
        http::write_continue(w)?;
    }
    let body = match conn.read_body(&head) {
        Ok(body) => body,
        Err(e) => return reject(state, w, e),
    };
    handle(state, &Request { head, body }, w)
}

/// Answers an unreadable request (400/413/431) and closes.
fn reject<W: Write>(state: &State, w: &mut W, error: HttpError) -> io::Result<Next> {
    let status = match &error {
        HttpError::Io(_) | HttpError::Closed => return Ok(Next::Abort),
        HttpError::Malformed(_) => 400,
        HttpError::TooLarge { status, .. } => *status,
    };
    let body = provider::error_body(&error.to_string(), "invalid_request_error", Some("bad_request"));
    send_json(w, &state.settings().name, status, Vec::new(), &body, true)
}

fn send_json<W: Write>(
    w: &mut W,
    name: &str,
    status: u16,
    extra_headers: Vec<(String, String)>,
    body: &Value,
    close: bool,
) -> io::Result<Next> {
    let mut headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("x-mock-provider".to_string(), name.to_string()),
    ];
    headers.extend(extra_headers);
    http::write_response(w, status, &headers, body.to_string().as_bytes(), close)?;
    Ok(after(close))
}

/// Routes one complete request.
pub fn handle<W: Write>(state: &State, req: &Request, w: &mut W) -> io::Result<Next> {
    let close = !req.head.keep_alive();
    let path = req.head.path();
    let method = req.head.method.as_str();
    if let Some(rest) = path.strip_prefix("/__mock/") {
        return control(state, req, rest, w, close);
    }
    let settings = state.settings();
    let name = settings.name.as_str();
    if path == "/health" {
        return if method == "GET" {
            send_json(w, name, 200, Vec::new(), &json!({"status": "ok", "name": name}), close)
        } else {
            method_not_allowed(w, name, close)
        };
    }
    if path.ends_with("/chat/completions") {
        if method == "POST" {
            return chat(state, settings, req, w, close);
        }
        state.record(&settings, log_entry(&settings, req, None, 405));
        return method_not_allowed(w, name, close);
    }
    if path.ends_with("/models") {
        let status = if method == "GET" { 200 } else { 405 };
        state.record(&settings, log_entry(&settings, req, None, status));
        return if status == 200 {
            let body = provider::models_body(&settings.model_list(), name);
            send_json(w, name, 200, Vec::new(), &body, close)
        } else {
            method_not_allowed(w, name, close)
        };
    }
    state.record(&settings, log_entry(&settings, req, None, 404));
    let body = provider::error_body(
        &format!("Unknown path {path} (mock {name})"),
        "invalid_request_error",
        Some("unknown_url"),
    );
    send_json(w, name, 404, Vec::new(), &body, close)
}

fn method_not_allowed<W: Write>(w: &mut W, name: &str, close: bool) -> io::Result<Next> {
    let body = provider::error_body("Method not allowed", "invalid_request_error", None);
    send_json(w, name, 405, Vec::new(), &body, close)
}

/// One log line (see README.md for the format).
fn log_entry(settings: &Settings, req: &Request, failure: Option<Failure>, status: u16) -> Value {
    let parsed: Option<Value> = serde_json::from_slice(&req.body).ok();
    let mut headers = Map::new();
    for (name, value) in &req.head.headers {
        match headers.get_mut(name) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(value);
            }
            _ => {
                headers.insert(name.clone(), json!(value));
            }
        }
    }
    let body_text = if parsed.is_none() && !req.body.is_empty() {
        let cut = req.body.get(..MAX_LOGGED_BODY_TEXT).unwrap_or(&req.body);
        json!(String::from_utf8_lossy(cut))
    } else {
        Value::Null
    };
    let model = parsed.as_ref().and_then(|b| b.get("model")).and_then(Value::as_str);
    let stream = parsed.as_ref().and_then(|b| b.get("stream")).and_then(Value::as_bool) == Some(true);
    let attempt = req.head.header("x-envoy-attempt-count").and_then(|v| v.trim().parse::<u64>().ok());
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    json!({
        "ts": ts,
        "provider": settings.name,
        "method": req.head.method,
        "path": req.head.target,
        "headers": headers,
        "model": model,
        "body_size": req.body.len(),
        "body": parsed,
        "body_text": body_text,
        "stream": stream,
        "status": status,
        "failure": failure.map(Failure::as_str),
        "attempt": attempt,
    })
}

fn chat<W: Write>(state: &State, settings: Settings, req: &Request, w: &mut W, close: bool) -> io::Result<Next> {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed).saturating_add(1);
    let scheduled = lock(&state.counters).decide(settings.rates());
    let name = settings.name.as_str();

    let delay_ms = req
        .head
        .header("x-mock-delay-ms")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(settings.first_byte_delay_ms);
    if delay_ms > 0 {
        sleep(Duration::from_millis(delay_ms));
    }

    let forced = match req.head.header("x-mock-fail").map(Failure::from_header) {
        None => None,
        Some(Ok(forced)) => forced,
        Some(Err(message)) => {
            state.record(&settings, log_entry(&settings, req, None, 400));
            let body = provider::error_body(&message, "invalid_request_error", Some("invalid_mock_fail"));
            return send_json(w, name, 400, Vec::new(), &body, close);
        }
    };
    let failure = forced.or(scheduled);

    let parsed = serde_json::from_slice::<Value>(&req.body);
    let request = parsed.as_ref().map_or_else(|_| ChatRequest::default(), ChatRequest::from_json);
    let model = request.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| settings.model.clone());
    let text = req.head.header("x-mock-text").map_or_else(|| settings.text(), str::to_string);
    let usage = if settings.no_usage {
        UsageReport::Omitted
    } else if settings.malformed_usage {
        UsageReport::Garbage
    } else {
        UsageReport::Counts {
            prompt: settings.prompt_tokens.unwrap_or_else(|| provider::prompt_tokens(request.prompt_bytes)),
            completion: settings.completion_tokens.unwrap_or_else(|| provider::completion_tokens(&text)),
        }
    };
    let reply = Reply { id: format!("chatcmpl-mock-{n}"), model, text, usage };
    // Log before answering so a test that got the answer finds the entry.
    let status = match (failure, &parsed) {
        (Some(Failure::Reset), _) => 0,
        (Some(Failure::RateLimited), _) => 429,
        (Some(Failure::Unavailable), _) => 503,
        (Some(_), _) | (None, Ok(_)) => 200,
        (None, Err(_)) => 400,
    };
    state.record(&settings, log_entry(&settings, req, failure, status));

    let chunked = req.head.minor_version >= 1;
    match failure {
        Some(Failure::Reset) => Ok(Next::Abort),
        Some(Failure::RateLimited) => {
            let mut headers = vec![("retry-after".to_string(), settings.retry_after.clone())];
            if let Some(ms) = settings.retry_after_ms {
                headers.push(("retry-after-ms".into(), ms.to_string()));
            }
            if let Some(reset) = &settings.ratelimit_reset {
                headers.push(("x-ratelimit-reset-requests".into(), reset.clone()));
                headers.push(("x-ratelimit-reset-tokens".into(), reset.clone()));
            }
            let body = provider::rate_limit_error(&reply.model, name);
            send_json(w, name, 429, headers, &body, close)
        }
        Some(Failure::Unavailable) => send_json(w, name, 503, Vec::new(), &provider::unavailable_error(name), close),
        Some(Failure::Malformed) if request.stream => {
            let events = provider::malformed_stream_events(&reply);
            send_stream(w, &settings, &events, chunked, close, true)
        }
        Some(Failure::Malformed) => {
            let headers = json_headers(name);
            let body = provider::malformed_body(&reply.id);
            http::write_response(w, 200, &headers, body.as_bytes(), close)?;
            Ok(after(close))
        }
        Some(Failure::Truncate) if request.stream => {
            let events = provider::stream_events(&reply, settings.stream_chunks, request.include_usage);
            let first_two: Vec<String> = events.into_iter().take(2).collect();
            send_stream(w, &settings, &first_two, chunked, close, false)
        }
        Some(Failure::Truncate) => {
            let body = provider::completion_body(&reply).to_string().into_bytes();
            let mut headers = json_headers(name);
            headers.push(("content-length".into(), body.len().to_string()));
            let mut out = http::head_bytes(200, &headers);
            out.extend(body.iter().take(body.len() / 2));
            w.write_all(&out)?;
            w.flush()?;
            Ok(Next::Abort)
        }
        None => match parsed {
            Err(e) => {
                let body = provider::invalid_json_error(&e.to_string());
                send_json(w, name, 400, Vec::new(), &body, close)
            }
            Ok(_) if request.stream => {
                let events = provider::stream_events(&reply, settings.stream_chunks, request.include_usage);
                send_stream(w, &settings, &events, chunked, close, true)
            }
            Ok(_) => send_json(w, name, 200, Vec::new(), &provider::completion_body(&reply), close),
        },
    }
}

fn json_headers(name: &str) -> Vec<(String, String)> {
    vec![("content-type".into(), "application/json".into()), ("x-mock-provider".into(), name.into())]
}

/// Sends SSE events, one write (or two with `split_writes`) and flush each,
/// `chunk_delay_ms` apart. With `complete == false` the stream is cut off
/// without the terminating zero-size chunk.
fn send_stream<W: Write>(
    w: &mut W,
    settings: &Settings,
    events: &[String],
    chunked: bool,
    close: bool,
    complete: bool,
) -> io::Result<Next> {
    let headers = vec![
        ("content-type".to_string(), "text/event-stream".to_string()),
        ("cache-control".to_string(), "no-cache".to_string()),
        ("x-mock-provider".to_string(), settings.name.clone()),
    ];
    http::write_stream_head(w, 200, &headers, chunked, close)?;
    for (i, event) in events.iter().enumerate() {
        if i > 0 && settings.chunk_delay_ms > 0 {
            sleep(Duration::from_millis(settings.chunk_delay_ms));
        }
        let bytes = event.as_bytes();
        // Split at the byte midpoint, deliberately ignoring UTF-8 boundaries.
        let halves = match bytes.split_at_checked(bytes.len() / 2) {
            Some((a, b)) if settings.split_writes && !a.is_empty() => [a, b],
            _ => [bytes, &[][..]],
        };
        for (j, part) in halves.iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            if j > 0 {
                sleep(SPLIT_PAUSE);
            }
            if chunked {
                http::write_chunk(w, part)?;
            } else {
                w.write_all(part)?;
                w.flush()?;
            }
        }
    }
    if !complete {
        return Ok(Next::Abort);
    }
    if chunked {
        http::write_last_chunk(w)?;
        Ok(after(close))
    } else {
        Ok(Next::Close)
    }
}

/// `/__mock/*`: configuration, log, stats, reset. Not logged as traffic.
fn control<W: Write>(state: &State, req: &Request, what: &str, w: &mut W, close: bool) -> io::Result<Next> {
    let name = state.settings().name;
    let method = req.head.method.as_str();
    let (status, body) = match (method, what) {
        ("GET", "config") => (200, config_json(&state.settings())),
        ("POST" | "PUT" | "PATCH", "config") => update_config(state, &req.body),
        ("GET", "log") => (200, Value::Array(lock(&state.log).clone())),
        ("DELETE", "log") => {
            let mut log = lock(&state.log);
            let cleared = log.len();
            log.clear();
            (200, json!({"cleared": cleared}))
        }
        ("GET", "stats") => (200, state.stats()),
        ("POST", "reset") => {
            *lock(&state.settings) = state.initial.clone();
            *lock(&state.counters) = FailureCounters::default();
            lock(&state.log).clear();
            (200, config_json(&state.initial))
        }
        (_, "config" | "log" | "stats" | "reset") => {
            (405, provider::error_body("Method not allowed", "invalid_request_error", None))
        }
        _ => (
            404,
            provider::error_body(
                &format!("Unknown control endpoint /__mock/{what}"),
                "invalid_request_error",
                Some("unknown_url"),
            ),
        ),
    };
    send_json(w, &name, status, Vec::new(), &body, close)
}

fn config_json(settings: &Settings) -> Value {
    serde_json::to_value(settings).unwrap_or(Value::Null)
}

fn update_config(state: &State, body: &[u8]) -> (u16, Value) {
    let update: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return (400, provider::invalid_json_error(&e.to_string())),
    };
    let mut settings = lock(&state.settings);
    match settings.apply_json(&update) {
        Ok(keys) => {
            let mut counters = lock(&state.counters);
            for kind in Failure::CHECK_ORDER {
                if keys.iter().any(|k| k == kind.rate_key()) {
                    counters.reset(kind);
                }
            }
            (200, config_json(&settings))
        }
        Err(message) => (400, provider::error_body(&message, "invalid_request_error", Some("invalid_config"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    /// Feeds raw bytes through the server loop; returns the output and how
    /// the connection ended.
    fn exchange(state: &State, input: &[u8]) -> (String, Next) {
        let mut conn = Conn::new(input);
        let mut out = Vec::new();
        loop {
            match serve_one(state, &mut conn, &mut out).unwrap() {
                Next::KeepAlive => continue,
                next => return (String::from_utf8_lossy(&out).into_owned(), next),
            }
        }
    }

    fn post_chat(body: &str, extra: &str) -> Vec<u8> {
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len())
            .into_bytes()
    }

    fn body_of(response: &str) -> &str {
        response.split_once("\r\n\r\n").unwrap().1
    }

    fn state() -> State {
        State::new(Settings { name: "p1".into(), ..Settings::default() })
    }

    const CHAT: &str = r#"{"model":"gpt-x","messages":[{"role":"user","content":"Hello there"}]}"#;

    #[test]
    fn plain_completion_and_log() {
        let state = state();
        let (out, next) = exchange(&state, &post_chat(CHAT, "X-Envoy-Attempt-Count: 2\r\n"));
        assert_eq!(next, Next::Close); // EOF after the request
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(out.contains("x-mock-provider: p1\r\n"));
        let body: Value = serde_json::from_str(body_of(&out)).unwrap();
        assert_eq!(body["model"], "gpt-x");
        assert_eq!(body["id"], "chatcmpl-mock-1");
        assert_eq!(body["choices"][0]["message"]["content"], "Hello from p1.");
        assert_eq!(body["usage"], json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}));
        let log = lock(&state.log).clone();
        assert_eq!(log.len(), 1);
        let e = &log[0];
        assert_eq!(e["provider"], "p1");
        assert_eq!(e["path"], "/v1/chat/completions");
        assert_eq!(e["headers"]["x-envoy-attempt-count"], "2");
        assert_eq!(e["attempt"], 2);
        assert_eq!(e["model"], "gpt-x");
        assert_eq!(e["status"], 200);
        assert_eq!(e["body_size"], CHAT.len());
        assert!(e["body_text"].is_null());
        assert!(e["failure"].is_null());
        assert_eq!(e["stream"], false);
    }

    #[test]
    fn invalid_json_is_400_and_logged() {
        let state = state();
        let (out, _) = exchange(&state, &post_chat("not json", ""));
        assert!(out.starts_with("HTTP/1.1 400 "));
        let body: Value = serde_json::from_str(body_of(&out)).unwrap();
        assert_eq!(body["error"]["code"], "invalid_json");
        let log = lock(&state.log).clone();
        assert_eq!(log[0]["body_text"], "not json");
        assert!(log[0]["body"].is_null());
        assert_eq!(log[0]["status"], 400);
    }

    #[test]
    fn reset_sends_nothing() {
        let state = state();
        let (out, next) = exchange(&state, &post_chat(CHAT, "x-mock-fail: reset\r\n"));
        assert_eq!(out, "");
        assert_eq!(next, Next::Abort);
        let log = lock(&state.log).clone();
        assert_eq!(log[0]["status"], 0);
        assert_eq!(log[0]["failure"], "reset");
    }

    #[test]
    fn truncate_non_stream_declares_more_than_it_sends() {
        let state = state();
        let (out, next) = exchange(&state, &post_chat(CHAT, "x-mock-fail: truncate\r\n"));
        assert_eq!(next, Next::Abort);
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        let declared: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert!(body.len() < declared);
    }

    #[test]
    fn truncate_stream_has_no_last_chunk() {
        let state = state();
        let chat = r#"{"stream":true,"messages":[]}"#;
        let (out, next) = exchange(&state, &post_chat(chat, "x-mock-fail: truncate\r\n"));
        assert_eq!(next, Next::Abort);
        assert!(out.contains("transfer-encoding: chunked"));
        assert_eq!(out.matches("data: ").count(), 2);
        assert!(!out.ends_with("0\r\n\r\n"));
    }

    #[test]
    fn malformed_and_429_and_503() {
        let state = state();
        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-fail: malformed\r\n"));
        assert!(out.starts_with("HTTP/1.1 200 "));
        assert!(serde_json::from_str::<Value>(body_of(&out)).is_err());

        lock(&state.settings).ratelimit_reset = Some("2s".into());
        lock(&state.settings).retry_after_ms = Some(250);
        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-fail: 429\r\n"));
        assert!(out.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(out.contains("retry-after: 1\r\n"));
        assert!(out.contains("retry-after-ms: 250\r\n"));
        assert!(out.contains("x-ratelimit-reset-requests: 2s\r\n"));
        assert!(out.contains("x-ratelimit-reset-tokens: 2s\r\n"));
        let body: Value = serde_json::from_str(body_of(&out)).unwrap();
        assert_eq!(body["error"]["message"], "Rate limit reached for gpt-x (mock p1)");

        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-fail: 503\r\n"));
        assert!(out.starts_with("HTTP/1.1 503 "));
        assert!(out.contains("mock p1 unavailable"));

        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-fail: teapot\r\n"));
        assert!(out.starts_with("HTTP/1.1 400 "));
        assert!(out.contains("invalid_mock_fail"));
    }

    #[test]
    fn scheduled_failures_and_config_update_restarts_schedule() {
        let state = state();
        let update = r#"{"rate_503": 50}"#;
        let req = format!("POST /__mock/config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{update}", update.len());
        let mut input = req.into_bytes();
        for _ in 0..4 {
            input.extend(post_chat(CHAT, ""));
        }
        let (out, _) = exchange(&state, &input);
        let statuses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|r| r.get(..3).unwrap()).collect();
        assert_eq!(statuses, vec!["200", "200", "503", "200", "503"]);
        let stats = state.stats();
        assert_eq!(stats["requests"], 4);
        assert_eq!(stats["by_status"], json!({"200": 2, "503": 2}));
        assert_eq!(stats["by_failure"], json!({"503": 2}));
    }

    #[test]
    fn routes() {
        let state = state();
        let input = b"GET /health HTTP/1.1\r\n\r\n\
            GET /v1/models HTTP/1.1\r\n\r\n\
            GET /nope HTTP/1.1\r\n\r\n\
            GET /v1/chat/completions HTTP/1.1\r\n\r\n\
            GET /__mock/nope HTTP/1.1\r\n\r\n\
            PUT /__mock/log HTTP/1.1\r\n\r\n\
            GET /__mock/stats HTTP/1.1\r\nConnection: close\r\n\r\n";
        let (out, next) = exchange(&state, input);
        assert_eq!(next, Next::Close);
        let statuses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|r| r.get(..3).unwrap()).collect();
        assert_eq!(statuses, vec!["200", "200", "404", "405", "404", "405", "200"]);
        assert!(out.contains(r#"{"status":"ok","name":"p1"}"#));
        assert!(out.contains(r#""data":[{"id":"mock-model","object":"model","created":1730000000,"owned_by":"p1"}]"#));
        assert!(out.ends_with(r#"{"requests":3,"by_status":{"200":1,"404":1,"405":1},"by_failure":{}}"#));
    }

    #[test]
    fn garbage_gets_400_and_close() {
        let state = state();
        let (out, next) = exchange(&state, b"\x00\x01garbage\r\n\r\n");
        assert_eq!(next, Next::Close);
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(out.contains("connection: close\r\n"));
        assert!(out.contains("x-mock-provider: p1\r\n"));
        assert!(lock(&state.log).is_empty());
    }

    #[test]
    fn expect_continue_and_split_writes_stream() {
        let state = state();
        lock(&state.settings).split_writes = true;
        let chat =
            r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"ab"}]}"#;
        let (out, _) = exchange(&state, &post_chat(chat, "Expect: 100-continue\r\n"));
        assert!(out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"));
        assert!(out.contains("content-type: text/event-stream\r\n"));
        assert!(out.ends_with("0\r\n\r\n"));
        // Every event was written as two chunks: 1 role + 4 content + finish + usage + DONE = 8 events.
        let body = body_of(out.split_once("\r\n\r\n").unwrap().1);
        let mut chunks = 0;
        let mut rest = body;
        let mut payload = String::new();
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size, 16).unwrap();
            if size == 0 {
                break;
            }
            payload.push_str(&after[..size]);
            rest = &after[size + 2..];
            chunks += 1;
        }
        assert_eq!(chunks, 16);
        assert_eq!(payload.matches("\n\n").count(), 8);
        assert!(payload.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn http10_stream_is_close_delimited() {
        let state = state();
        let chat = r#"{"stream":true}"#;
        let input = format!(
            "POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{chat}",
            chat.len()
        );
        let (out, next) = exchange(&state, input.as_bytes());
        assert_eq!(next, Next::Close);
        assert!(!out.contains("transfer-encoding"));
        assert!(out.contains("connection: close\r\n"));
        assert!(out.ends_with("data: [DONE]\n\n"));
    }
}
