//! Connection handling and routing: traffic endpoints (chat completions,
//! legacy completions, responses, embeddings, Anthropic messages, models,
//! health), the `/__mock/*` control API, the request log.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::http::{self, Conn, Framing, HttpError, Request};
use crate::provider::{self, ChatRequest, Extras, Failure, FailureCounters, Reply, UsageReport};
use crate::settings::Settings;
use crate::{anthropic, codec, embeddings, responses};

/// Pause between the two halves of an event with `split_writes`.
const SPLIT_PAUSE: Duration = Duration::from_millis(20);
/// `body_text` in the log is cut to this many bytes.
const MAX_LOGGED_BODY_TEXT: usize = 65536;
/// The trailer field sent with `--response-trailers` / `x-mock-trailers`.
const TRAILER_NAME: &str = "x-mock-trailer";
const TRAILER_VALUE: &str = "done";

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
    /// Send nothing more; keep the connection open until the client closes
    /// it or the timeout passes, then close (stall failures).
    Stall(Duration),
}

fn after(close: bool) -> Next {
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// Which kind of traffic a path is (the log's `endpoint` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Messages,
    CountTokens,
    Models,
    Other,
}

impl Endpoint {
    /// Routes on the path suffix (the query string is already removed).
    pub fn from_path(path: &str) -> Endpoint {
        if path.ends_with("/chat/completions") {
            Endpoint::Chat
        } else if path.ends_with("/completions") {
            Endpoint::Completions
        } else if path.ends_with("/responses") {
            Endpoint::Responses
        } else if path.ends_with("/embeddings") {
            Endpoint::Embeddings
        } else if path.ends_with("/messages/count_tokens") {
            Endpoint::CountTokens
        } else if path.ends_with("/messages") {
            Endpoint::Messages
        } else if path.ends_with("/models") {
            Endpoint::Models
        } else {
            Endpoint::Other
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
            Endpoint::Models => "models",
            Endpoint::Other => "other",
        }
    }

    /// Anthropic endpoints answer errors in Anthropic's shape.
    fn anthropic(self) -> bool {
        matches!(self, Endpoint::Messages | Endpoint::CountTokens)
    }

    /// Endpoints that can answer with a stream.
    fn streams(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Messages)
    }

    /// Endpoints whose prompt is checked against `--context-window`.
    fn has_context_window(self) -> bool {
        self.streams()
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
    match next {
        Next::Close => {
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
        Next::Stall(timeout) => hold_open(&mut writer, timeout),
        Next::KeepAlive | Next::Abort => {}
    }
    // Dropping `writer` (and the reader clone inside `conn`) closes the socket.
}

/// Sends nothing and waits until the peer closes the connection or
/// `timeout` passes; whatever the peer sends meanwhile is discarded.
fn hold_open(stream: &mut TcpStream, timeout: Duration) {
    let deadline = Instant::now().checked_add(timeout);
    let mut sink = [0u8; 4096];
    loop {
        let left = match deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(1),
        };
        if left.is_zero() || stream.set_read_timeout(Some(left.min(Duration::from_secs(1)))).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
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
    let (body, trailers) = match conn.read_body(&head) {
        Ok(body) => body,
        Err(e) => return reject(state, w, e),
    };
    handle(state, &Request { head, body, trailers }, w)
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
    let mut headers = json_headers(name);
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
    match Endpoint::from_path(path) {
        Endpoint::Models => {
            let status = if method == "GET" { 200 } else { 405 };
            state.record(&settings, log_entry(&settings, req, Endpoint::Models, None, status));
            if status == 200 {
                let body = provider::models_body(&settings.model_list(), name);
                send_json(w, name, 200, Vec::new(), &body, close)
            } else {
                method_not_allowed(w, name, close)
            }
        }
        Endpoint::Other => {
            state.record(&settings, log_entry(&settings, req, Endpoint::Other, None, 404));
            let body = provider::error_body(
                &format!("Unknown path {path} (mock {name})"),
                "invalid_request_error",
                Some("unknown_url"),
            );
            send_json(w, name, 404, Vec::new(), &body, close)
        }
        endpoint if method == "POST" => model_request(state, &settings, req, endpoint, w, close),
        endpoint => {
            state.record(&settings, log_entry(&settings, req, endpoint, None, 405));
            method_not_allowed(w, name, close)
        }
    }
}

fn method_not_allowed<W: Write>(w: &mut W, name: &str, close: bool) -> io::Result<Next> {
    let body = provider::error_body("Method not allowed", "invalid_request_error", None);
    send_json(w, name, 405, Vec::new(), &body, close)
}

/// Header fields joined into a JSON object (repeats joined with `", "`).
fn fields_json(fields: &[(String, String)]) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, value) in fields {
        match out.get_mut(name) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(value);
            }
            _ => {
                out.insert(name.clone(), json!(value));
            }
        }
    }
    out
}

/// One log line (see README.md for the format).
fn log_entry(settings: &Settings, req: &Request, endpoint: Endpoint, failure: Option<Failure>, status: u16) -> Value {
    let parsed: Option<Value> = serde_json::from_slice(&req.body).ok();
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
        "headers": fields_json(&req.head.headers),
        "model": model,
        "body_size": req.body.len(),
        "body": parsed,
        "body_text": body_text,
        "stream": stream,
        "status": status,
        "failure": failure.map(Failure::as_str),
        "attempt": attempt,
        "endpoint": endpoint.as_str(),
        "trailers": fields_json(&req.trailers),
    })
}

/// A numeric request header; absent or unparsable values are ignored.
fn header_u64(req: &Request, name: &str) -> Option<u64> {
    req.head.header(name).and_then(|v| v.trim().parse::<u64>().ok())
}

/// Everything derived from one model request before answering it.
struct Ctx<'a> {
    n: u64,
    endpoint: Endpoint,
    settings: &'a Settings,
    req: &'a Request,
    /// The parsed body, or `null` when it is not JSON.
    body: &'a Value,
    chat: ChatRequest,
    model: String,
    text: String,
    pieces: usize,
    /// Effective prompt tokens (the formula or `--prompt-tokens`).
    prompt: u64,
    usage: UsageReport,
    extras: Extras,
}

/// A rendered successful answer, and what the failures send instead.
struct Answer {
    /// The non-streaming body.
    body: Value,
    /// The `malformed` non-streaming body.
    malformed: Vec<u8>,
    /// `Some` when the request asked for a stream.
    stream: Option<StreamAnswer>,
}

struct StreamAnswer {
    events: Vec<String>,
    /// Events sent before a `truncate` / `stall_mid_stream` cut.
    cut: usize,
    /// The `malformed` stream.
    malformed: Vec<String>,
}

impl<'a> Ctx<'a> {
    fn new(n: u64, endpoint: Endpoint, settings: &'a Settings, req: &'a Request, body: &'a Value) -> Self {
        let chat = ChatRequest::from_json(body);
        let model = chat.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| settings.model.clone());
        let text = match (req.head.header("x-mock-text"), header_u64(req, "x-mock-words")) {
            (Some(text), _) => text.to_string(),
            (None, Some(words)) => provider::words_text(words),
            (None, None) => settings.default_text(),
        };
        let pieces = header_u64(req, "x-mock-stream-chunks")
            .and_then(|p| usize::try_from(p).ok())
            .unwrap_or(settings.stream_chunks);
        let prompt_bytes = match endpoint {
            Endpoint::Chat | Endpoint::Completions => chat.prompt_bytes,
            Endpoint::Responses => responses::prompt_bytes(body),
            Endpoint::Embeddings => embeddings::input_bytes(body),
            Endpoint::Messages | Endpoint::CountTokens => anthropic::prompt_bytes(body),
            Endpoint::Models | Endpoint::Other => 0,
        };
        let header_text = |name: &str| req.head.header(name).map(str::to_string);
        let extras = match endpoint {
            Endpoint::Chat => Extras {
                reasoning: header_text("x-mock-reasoning"),
                refusal: header_text("x-mock-refusal"),
                tool_args: header_text("x-mock-tool-args"),
                audio_transcript: header_text("x-mock-audio-transcript"),
                logprobs: chat.logprobs,
            },
            Endpoint::Completions => Extras { logprobs: chat.logprobs, ..Extras::default() },
            Endpoint::Messages => Extras { tool_args: header_text("x-mock-tool-args"), ..Extras::default() },
            _ => Extras::default(),
        };
        let prompt = settings.prompt_tokens.unwrap_or_else(|| provider::prompt_tokens(prompt_bytes));
        let usage = if settings.no_usage {
            UsageReport::Omitted
        } else if settings.malformed_usage {
            UsageReport::Garbage
        } else {
            let words = match endpoint {
                Endpoint::Chat | Endpoint::Messages => extras.output_words(&text),
                Endpoint::Embeddings | Endpoint::CountTokens => 0,
                _ => provider::completion_tokens(&text),
            };
            UsageReport::Counts {
                prompt,
                completion: settings.completion_tokens.unwrap_or(words),
                cached: header_u64(req, "x-mock-cached-tokens").or(settings.cached_tokens),
                reasoning: header_u64(req, "x-mock-reasoning-tokens").or(settings.reasoning_tokens),
            }
        };
        Ctx { n, endpoint, settings, req, body, chat, model, text, pieces, prompt, usage, extras }
    }

    fn reply(&self, id: String) -> Reply {
        Reply { id, model: self.model.clone(), text: self.text.clone(), usage: self.usage, extras: self.extras.clone() }
    }

    fn streaming(&self) -> bool {
        self.chat.stream && self.endpoint.streams()
    }

    /// Renders the answer leniently (also for bodies that fail validation,
    /// because injected failures still need something to cut off).
    fn render(&self) -> Answer {
        let n = self.n;
        let stream = |events: Vec<String>, cut: usize, malformed: Vec<String>| {
            self.streaming().then_some(StreamAnswer { events, cut, malformed })
        };
        match self.endpoint {
            Endpoint::Chat => {
                let reply = self.reply(format!("chatcmpl-mock-{n}"));
                Answer {
                    body: provider::completion_body(&reply),
                    malformed: provider::malformed_body(&reply.id).into_bytes(),
                    stream: stream(
                        provider::stream_events(&reply, self.pieces, self.chat.include_usage),
                        2,
                        provider::malformed_stream_events(&reply),
                    ),
                }
            }
            Endpoint::Completions => {
                let reply = self.reply(format!("cmpl-mock-{n}"));
                let body = provider::text_completion_body(&reply);
                Answer {
                    malformed: first_half(&body),
                    body,
                    stream: stream(
                        provider::text_completion_events(&reply, self.pieces, self.chat.include_usage),
                        1,
                        provider::malformed_text_completion_events(&reply),
                    ),
                }
            }
            Endpoint::Responses => {
                let reply = self.reply(format!("resp_mock_{n}"));
                let body = responses::response_object(&reply, true);
                Answer {
                    malformed: first_half(&body),
                    body,
                    stream: stream(
                        responses::stream_events(&reply, self.pieces),
                        responses::STREAM_CUT,
                        responses::malformed_stream_events(&reply),
                    ),
                }
            }
            Endpoint::Messages => {
                let reply = self.reply(format!("msg_mock_{n}"));
                let body = anthropic::message_body(&reply);
                Answer {
                    malformed: first_half(&body),
                    body,
                    stream: stream(
                        anthropic::stream_events(&reply, self.pieces),
                        anthropic::STREAM_CUT,
                        anthropic::malformed_stream_events(&reply),
                    ),
                }
            }
            Endpoint::Embeddings => {
                let default_dim = self.settings.embedding_dim;
                let (base64, dim) = embeddings::parse_options(self.body, default_dim).unwrap_or((false, default_dim));
                let inputs = embeddings::input_strings(self.body);
                let body = embeddings::body(&inputs, dim, base64, &self.model, self.usage);
                Answer { malformed: first_half(&body), body, stream: None }
            }
            Endpoint::CountTokens | Endpoint::Models | Endpoint::Other => {
                let body = anthropic::count_tokens_body(self.prompt);
                Answer { malformed: first_half(&body), body, stream: None }
            }
        }
    }

    /// The 4xx this request gets when no failure is injected, if any.
    fn validate(&self, parsed: &Result<Value, serde_json::Error>) -> Option<(u16, Value)> {
        let anthropic = self.endpoint.anthropic();
        if anthropic {
            let key = self.req.head.header("x-api-key").map(str::trim).filter(|k| !k.is_empty());
            if self.settings.require_api_key && key.is_none() {
                return Some((401, anthropic::error_body("authentication_error", "x-api-key header is required")));
            }
            if let Err(message) = anthropic::check_version(self.req.head.header("anthropic-version")) {
                return Some((400, anthropic::invalid_request(&message)));
            }
        }
        let body = match parsed {
            Ok(body) => body,
            Err(e) if anthropic => {
                let message = format!("There was an error parsing the body of your request: {e}");
                return Some((400, anthropic::invalid_request(&message)));
            }
            Err(e) => return Some((400, provider::invalid_json_error(&e.to_string()))),
        };
        let invalid = |message: &str, param: &str| {
            Some((400, provider::error_body_param(message, "invalid_request_error", Some(param), None)))
        };
        match self.endpoint {
            Endpoint::Responses if body.get("stream_options").is_some() => {
                return Some((400, responses::unknown_parameter_error("stream_options")));
            }
            Endpoint::Embeddings => {
                if let Err(message) = embeddings::parse_input(body) {
                    return invalid(&message, "input");
                }
                if let Err(message) = embeddings::parse_options(body, self.settings.embedding_dim) {
                    let param = if message.contains("encoding_format") { "encoding_format" } else { "dimensions" };
                    return invalid(&message, param);
                }
            }
            Endpoint::Messages | Endpoint::CountTokens => {
                if let Err(message) = anthropic::validate(body, self.endpoint == Endpoint::CountTokens) {
                    return Some((400, anthropic::invalid_request(&message)));
                }
            }
            _ => {}
        }
        match self.settings.context_window {
            Some(window) if self.endpoint.has_context_window() && self.prompt > window => {
                Some((400, self.context_error()))
            }
            _ => None,
        }
    }

    /// The context-length 400 body (forced with `x-mock-fail: context_length`
    /// even under the window; then the window is `--context-window` or, when
    /// unset, `P - 1`).
    fn context_error(&self) -> Value {
        let window = self.settings.context_window.unwrap_or(self.prompt.saturating_sub(1));
        if self.endpoint.anthropic() {
            anthropic::context_length_error(window, self.prompt)
        } else {
            provider::context_length_error(window, self.prompt)
        }
    }

    fn rate_limit_error(&self) -> Value {
        if self.endpoint.anthropic() {
            anthropic::rate_limit_error(&self.model, &self.settings.name)
        } else {
            provider::rate_limit_error(&self.model, &self.settings.name)
        }
    }

    fn unavailable_error(&self) -> Value {
        if self.endpoint.anthropic() {
            anthropic::unavailable_error(&self.settings.name)
        } else {
            provider::unavailable_error(&self.settings.name)
        }
    }
}

/// The first half of a serialised body (never valid JSON).
fn first_half(body: &Value) -> Vec<u8> {
    let bytes = body.to_string().into_bytes();
    let half = bytes.len() / 2;
    bytes.into_iter().take(half).collect()
}

/// Answers a POST to a model endpoint (see README.md for the order of
/// failures, validation and the answer).
fn model_request<W: Write>(
    state: &State,
    settings: &Settings,
    req: &Request,
    endpoint: Endpoint,
    w: &mut W,
    close: bool,
) -> io::Result<Next> {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed).saturating_add(1);
    let scheduled =
        if endpoint == Endpoint::CountTokens { None } else { lock(&state.counters).decide(settings.rates()) };
    let name = settings.name.as_str();

    let delay_ms = header_u64(req, "x-mock-delay-ms").unwrap_or(settings.first_byte_delay_ms);
    if delay_ms > 0 {
        sleep(Duration::from_millis(delay_ms));
    }

    let forced = match req.head.header("x-mock-fail").map(Failure::from_header) {
        None => None,
        Some(Ok(forced)) => forced,
        Some(Err(message)) => {
            state.record(settings, log_entry(settings, req, endpoint, None, 400));
            let body = if endpoint.anthropic() {
                anthropic::invalid_request(&message)
            } else {
                provider::error_body(&message, "invalid_request_error", Some("invalid_mock_fail"))
            };
            return send_json(w, name, 400, Vec::new(), &body, close);
        }
    };
    let failure = forced.or(scheduled);

    let parsed = serde_json::from_slice::<Value>(&req.body);
    let null = Value::Null;
    let ctx = Ctx::new(n, endpoint, settings, req, parsed.as_ref().unwrap_or(&null));
    let answer = ctx.render();
    let rejection = if failure.is_none() { ctx.validate(&parsed) } else { None };
    // Log before answering so a test that got the answer finds the entry.
    let status = match failure {
        Some(Failure::Reset | Failure::Stall) => 0,
        Some(Failure::RateLimited) => 429,
        Some(Failure::Unavailable) => 503,
        Some(Failure::ContextLength) => 400,
        Some(Failure::Malformed | Failure::Truncate | Failure::StallMidStream) => 200,
        None => rejection.as_ref().map_or(200, |(status, _)| *status),
    };
    state.record(settings, log_entry(settings, req, endpoint, failure, status));

    let chunked = req.head.minor_version >= 1;
    let stall = Next::Stall(Duration::from_millis(settings.stall_timeout_ms));
    match failure {
        Some(Failure::Reset) => Ok(Next::Abort),
        Some(Failure::Stall) => Ok(stall),
        Some(Failure::RateLimited) => {
            let mut headers = vec![("retry-after".to_string(), settings.retry_after.clone())];
            if let Some(ms) = settings.retry_after_ms {
                headers.push(("retry-after-ms".into(), ms.to_string()));
            }
            if let Some(reset) = &settings.ratelimit_reset {
                headers.push(("x-ratelimit-reset-requests".into(), reset.clone()));
                headers.push(("x-ratelimit-reset-tokens".into(), reset.clone()));
            }
            send_json(w, name, 429, headers, &ctx.rate_limit_error(), close)
        }
        Some(Failure::Unavailable) => send_json(w, name, 503, Vec::new(), &ctx.unavailable_error(), close),
        Some(Failure::ContextLength) => send_json(w, name, 400, Vec::new(), &ctx.context_error(), close),
        Some(Failure::Malformed) => match &answer.stream {
            Some(stream) => {
                send_stream(w, settings, &sse_headers(name), &stream.malformed, chunked, close, End::Finish)
            }
            None => {
                http::write_response(w, 200, &json_headers(name), &answer.malformed, close)?;
                Ok(after(close))
            }
        },
        Some(Failure::Truncate) => {
            send_cut(w, settings, &answer, chunked, close)?;
            Ok(Next::Abort)
        }
        Some(Failure::StallMidStream) => {
            send_cut(w, settings, &answer, chunked, close)?;
            Ok(stall)
        }
        None => match rejection {
            Some((status, body)) => send_json(w, name, status, Vec::new(), &body, close),
            None => send_answer(w, &ctx, &answer, chunked, close),
        },
    }
}

/// The start of the answer, for `truncate` and `stall_mid_stream`: the
/// first `cut` stream events without the terminating chunk, or the head
/// with the full `content-length` and the first half of the body.
fn send_cut<W: Write>(w: &mut W, settings: &Settings, answer: &Answer, chunked: bool, close: bool) -> io::Result<()> {
    match &answer.stream {
        Some(stream) => {
            let first: Vec<String> = stream.events.iter().take(stream.cut).cloned().collect();
            send_stream(w, settings, &sse_headers(&settings.name), &first, chunked, close, End::Cut).map(|_| ())
        }
        None => {
            let body = answer.body.to_string().into_bytes();
            let mut headers = json_headers(&settings.name);
            headers.push(("content-length".into(), body.len().to_string()));
            let mut out = http::head_bytes(200, &headers);
            out.extend(body.iter().take(body.len() / 2));
            w.write_all(&out)?;
            w.flush()
        }
    }
}

/// Per-request response format overrides (successful answers only).
struct Format {
    /// `None`: the normal type; `Some(None)`: no `content-type` header.
    content_type: Option<Option<String>>,
    text_body: bool,
    gzip: bool,
    trailers: bool,
}

impl Format {
    fn from_request(req: &Request, settings: &Settings) -> Format {
        let header = |name: &str| req.head.header(name).map(str::trim);
        let trailers = match header("x-mock-trailers").map(str::to_ascii_lowercase).as_deref() {
            Some("1" | "true" | "yes" | "on") => true,
            Some("0" | "false" | "no" | "off") => false,
            _ => settings.response_trailers,
        };
        Format {
            content_type: header("x-mock-content-type").map(|v| {
                if v.eq_ignore_ascii_case("none") {
                    None
                } else {
                    Some(v.to_string())
                }
            }),
            text_body: header("x-mock-body").is_some_and(|v| v.eq_ignore_ascii_case("text")),
            gzip: header("x-mock-content-encoding").is_some_and(|v| v.eq_ignore_ascii_case("gzip")),
            trailers,
        }
    }

    /// The `content-type` header to send in place of `default`, if any.
    fn content_type(&self, default: &str) -> Option<(String, String)> {
        match &self.content_type {
            None => Some(("content-type".into(), default.into())),
            Some(Some(value)) => Some(("content-type".into(), value.clone())),
            Some(None) => None,
        }
    }
}

fn trailer_fields() -> Vec<(String, String)> {
    vec![(TRAILER_NAME.into(), TRAILER_VALUE.into())]
}

/// Sends the successful answer, applying the [`Format`] overrides.
fn send_answer<W: Write>(w: &mut W, ctx: &Ctx<'_>, answer: &Answer, chunked: bool, close: bool) -> io::Result<Next> {
    let settings = ctx.settings;
    let format = Format::from_request(ctx.req, settings);
    // Trailers need chunked encoding, which HTTP/1.0 clients do not get.
    let trailers = format.trailers && chunked;
    let name = settings.name.as_str();
    if let (Some(stream), false) = (&answer.stream, format.text_body) {
        let mut headers: Vec<(String, String)> = format.content_type("text/event-stream").into_iter().collect();
        headers.push(("cache-control".into(), "no-cache".into()));
        headers.push(("x-mock-provider".into(), name.into()));
        if trailers {
            headers.push(("trailer".into(), TRAILER_NAME.into()));
        }
        let end = if trailers { End::FinishWithTrailers } else { End::Finish };
        return send_stream(w, settings, &headers, &stream.events, chunked, close, end);
    }
    let (default_type, mut body) = if format.text_body {
        ("text/plain; charset=utf-8", ctx.text.clone().into_bytes())
    } else {
        ("application/json", answer.body.to_string().into_bytes())
    };
    let mut headers: Vec<(String, String)> = format.content_type(default_type).into_iter().collect();
    headers.push(("x-mock-provider".into(), name.into()));
    if format.gzip {
        body = codec::gzip(&body);
        headers.push(("content-encoding".into(), "gzip".into()));
    }
    if trailers {
        headers.push(("trailer".into(), TRAILER_NAME.into()));
        http::write_chunked_response(w, 200, &headers, &body, &trailer_fields(), close)?;
    } else {
        http::write_response(w, 200, &headers, &body, close)?;
    }
    Ok(after(close))
}

fn json_headers(name: &str) -> Vec<(String, String)> {
    vec![("content-type".into(), "application/json".into()), ("x-mock-provider".into(), name.into())]
}

fn sse_headers(name: &str) -> Vec<(String, String)> {
    vec![
        ("content-type".into(), "text/event-stream".into()),
        ("cache-control".into(), "no-cache".into()),
        ("x-mock-provider".into(), name.into()),
    ]
}

/// How [`send_stream`] ends the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The terminating zero-size chunk.
    Finish,
    /// The zero-size chunk and the `x-mock-trailer` trailer.
    FinishWithTrailers,
    /// Nothing: the stream is cut off.
    Cut,
}

/// Sends SSE events, one write (or two with `split_writes`) and flush each,
/// `chunk_delay_ms` apart. With [`End::Cut`] the stream is cut off without
/// the terminating zero-size chunk (and the result is [`Next::Abort`]).
fn send_stream<W: Write>(
    w: &mut W,
    settings: &Settings,
    headers: &[(String, String)],
    events: &[String],
    chunked: bool,
    close: bool,
    end: End,
) -> io::Result<Next> {
    http::write_stream_head(w, 200, headers, chunked, close)?;
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
    match end {
        End::Cut => Ok(Next::Abort),
        _ if !chunked => Ok(Next::Close),
        End::Finish => {
            http::write_last_chunk(w)?;
            Ok(after(close))
        }
        End::FinishWithTrailers => {
            http::write_last_chunk_with_trailers(w, &trailer_fields())?;
            Ok(after(close))
        }
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
                if keys.iter().any(|k| Some(k.as_str()) == kind.rate_key()) {
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
            payload.push_str(after.get(..size).unwrap());
            rest = after.get(size + 2..).unwrap();
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
    fn post(path: &str, body: &str, extra: &str) -> Vec<u8> {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
    }

    const MESSAGES: &str =
        r#"{"model":"claude-x","max_tokens":16,"messages":[{"role":"user","content":"Hello there"}]}"#;
    const VERSION: &str = "anthropic-version: 2023-06-01\r\n";

    fn json_of(response: &str) -> Value {
        serde_json::from_str(body_of(response)).unwrap()
    }

    #[test]
    fn endpoint_routing() {
        let cases = [
            ("/v1/chat/completions", Endpoint::Chat),
            ("/openai/deployments/x/chat/completions", Endpoint::Chat),
            ("/v1/completions", Endpoint::Completions),
            ("/v1/responses", Endpoint::Responses),
            ("/v1/embeddings", Endpoint::Embeddings),
            ("/v1/messages", Endpoint::Messages),
            ("/anthropic/v1/messages/count_tokens", Endpoint::CountTokens),
            ("/v1/models", Endpoint::Models),
            ("/v1/responses/resp_1", Endpoint::Other),
            ("/", Endpoint::Other),
        ];
        for (path, endpoint) in cases {
            assert_eq!(Endpoint::from_path(path), endpoint, "{path}");
        }
        let names: Vec<&str> = [
            Endpoint::Chat,
            Endpoint::Completions,
            Endpoint::Responses,
            Endpoint::Embeddings,
            Endpoint::Messages,
            Endpoint::CountTokens,
            Endpoint::Models,
            Endpoint::Other,
        ]
        .iter()
        .map(|e| e.as_str())
        .collect();
        assert_eq!(
            names,
            ["chat", "completions", "responses", "embeddings", "messages", "count_tokens", "models", "other"]
        );
    }

    #[test]
    fn stall_sends_nothing_and_holds_the_connection() {
        let state = state();
        lock(&state.settings).stall_timeout_ms = 1234;
        let (out, next) = exchange(&state, &post_chat(CHAT, "x-mock-fail: stall\r\n"));
        assert_eq!(out, "");
        assert_eq!(next, Next::Stall(Duration::from_millis(1234)));
        let log = lock(&state.log).clone();
        assert_eq!((log[0]["status"].clone(), log[0]["failure"].clone()), (json!(0), json!("stall")));
    }

    #[test]
    fn stall_mid_stream_cuts_each_stream_kind() {
        let state = state();
        let chat = r#"{"stream":true,"messages":[]}"#;
        let (out, next) = exchange(&state, &post_chat(chat, "x-mock-fail: stall_mid_stream\r\n"));
        assert!(matches!(next, Next::Stall(_)));
        assert_eq!(out.matches("data: ").count(), 2);
        assert!(!out.ends_with("0\r\n\r\n"));

        let body = r#"{"model":"m","input":"x","stream":true}"#;
        let (out, _) = exchange(&state, &post("/v1/responses", body, "x-mock-fail: stall_mid_stream\r\n"));
        assert_eq!(out.matches("event: ").count(), responses::STREAM_CUT);
        assert!(out.contains("response.output_text.delta"));
        assert!(!out.contains("response.output_text.done"));

        let body = MESSAGES.replacen("\"max_tokens\":16", "\"max_tokens\":16,\"stream\":true", 1);
        let (out, next) =
            exchange(&state, &post("/v1/messages", &body, &format!("{VERSION}x-mock-fail: truncate\r\n")));
        assert_eq!(next, Next::Abort);
        assert_eq!(out.matches("event: ").count(), anthropic::STREAM_CUT);
        assert!(out.contains("content_block_delta") && !out.contains("content_block_stop"));

        let (out, next) =
            exchange(&state, &post("/v1/embeddings", r#"{"input":"x"}"#, "x-mock-fail: stall_mid_stream\r\n"));
        assert!(matches!(next, Next::Stall(_)));
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        let declared: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert_eq!(body.len(), declared / 2);
        let failures: Vec<Value> = lock(&state.log).iter().map(|e| e["failure"].clone()).collect();
        assert_eq!(
            failures,
            vec![json!("stall_mid_stream"), json!("stall_mid_stream"), json!("truncate"), json!("stall_mid_stream")]
        );
    }

    #[test]
    fn rate_stall_schedule_and_count_tokens_not_counted() {
        let state = state();
        let update = r#"{"rate_stall": 50}"#;
        let mut input =
            format!("POST /__mock/config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{update}", update.len()).into_bytes();
        input.extend(post_chat(CHAT, ""));
        input.extend(post("/v1/messages/count_tokens", MESSAGES, VERSION));
        input.extend(post_chat(CHAT, ""));
        let (out, next) = exchange(&state, &input);
        assert!(matches!(next, Next::Stall(_)));
        // config, chat #1 (200), count_tokens (200, not counted), chat #2 stalls.
        let statuses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|r| r.get(..3).unwrap()).collect();
        assert_eq!(statuses, vec!["200", "200", "200"]);
        assert!(out.contains(r#"{"input_tokens":3}"#));
        let log = lock(&state.log).clone();
        assert_eq!(log[2]["failure"], "stall");
        assert_eq!(log[1]["endpoint"], "count_tokens");
    }

    #[test]
    fn context_window_per_endpoint() {
        let state = state();
        lock(&state.settings).context_window = Some(2);
        let (out, _) = exchange(&state, &post_chat(CHAT, ""));
        assert!(out.starts_with("HTTP/1.1 400 "));
        assert_eq!(json_of(&out)["error"]["code"], "context_length_exceeded");
        assert!(json_of(&out)["error"]["message"].as_str().unwrap().contains("maximum context length is 2 tokens"));
        let (out, _) = exchange(&state, &post("/v1/messages", MESSAGES, VERSION));
        assert_eq!(json_of(&out)["error"]["message"], "prompt is too long: 3 tokens > 2 maximum");
        // Embeddings and count_tokens are not checked.
        let (out, _) = exchange(&state, &post("/v1/embeddings", r#"{"input":"a long input text"}"#, ""));
        assert!(out.starts_with("HTTP/1.1 200 "));
        let (out, _) = exchange(&state, &post("/v1/messages/count_tokens", MESSAGES, VERSION));
        assert!(out.starts_with("HTTP/1.1 200 "));
        // Forced without a window: the window is reported as P - 1.
        lock(&state.settings).context_window = None;
        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-fail: context_length\r\n"));
        assert!(json_of(&out)["error"]["message"].as_str().unwrap().starts_with(
            "This model's maximum context length is 2 tokens. However, your messages resulted in 3 tokens."
        ));
        // --prompt-tokens feeds the check.
        lock(&state.settings).context_window = Some(100);
        lock(&state.settings).prompt_tokens = Some(101);
        let (out, _) = exchange(&state, &post("/v1/responses", r#"{"input":"x"}"#, ""));
        assert!(out.contains("resulted in 101 tokens"));
    }

    #[test]
    fn anthropic_errors_and_injected_failures() {
        let state = state();
        let (out, _) = exchange(&state, &post("/v1/messages", MESSAGES, ""));
        assert_eq!(
            json_of(&out),
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "anthropic-version: header is required"}})
        );
        let (out, _) = exchange(&state, &post("/v1/messages", "{nope", VERSION));
        assert_eq!(json_of(&out)["error"]["type"], "invalid_request_error");
        let (out, _) = exchange(&state, &post("/v1/messages", MESSAGES, &format!("{VERSION}x-mock-fail: bogus\r\n")));
        assert!(out.starts_with("HTTP/1.1 400 "));
        assert_eq!(json_of(&out)["type"], "error");
        let (out, _) =
            exchange(&state, &post("/v1/messages", MESSAGES, &format!("{VERSION}x-mock-fail: malformed\r\n")));
        assert!(out.starts_with("HTTP/1.1 200 "));
        assert!(serde_json::from_str::<Value>(body_of(&out)).is_err());
        // An injected failure wins over validation (no version header here).
        let (out, _) = exchange(&state, &post("/v1/messages", "{}", "x-mock-fail: 503\r\n"));
        assert!(out.starts_with("HTTP/1.1 503 "));
        assert_eq!(json_of(&out)["error"]["type"], "overloaded_error");
    }

    #[test]
    fn format_overrides() {
        let state = state();
        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-content-encoding: gzip\r\n"));
        assert!(out.contains("content-encoding: gzip\r\n"));
        let raw = post_chat(CHAT, "x-mock-content-encoding: gzip\r\n");
        let mut conn = Conn::new(&raw[..]);
        let mut bytes = Vec::new();
        serve_one(&state, &mut conn, &mut bytes).unwrap();
        let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let plain = crate::codec::tests::gunzip_stored(&bytes[split..]);
        let body: Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "Hello from p1.");
        let head = String::from_utf8_lossy(&bytes[..split]);
        let declared: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert_eq!(declared, bytes.len() - split);

        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-content-type: none\r\n"));
        assert!(!out.to_ascii_lowercase().contains("content-type"));
        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-content-type: text/xml\r\nx-mock-body: text\r\n"));
        assert!(out.contains("content-type: text/xml\r\n"));
        assert_eq!(body_of(&out), "Hello from p1.");
        let (out, _) = exchange(&state, &post_chat(r#"{"stream":true}"#, "x-mock-body: text\r\n"));
        assert!(out.contains("content-type: text/plain; charset=utf-8\r\n"));
        assert_eq!(body_of(&out), "Hello from p1.");
        // Overrides do not touch injected failures.
        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-fail: 429\r\nx-mock-content-type: none\r\n"));
        assert!(out.contains("content-type: application/json\r\n"));
    }

    #[test]
    fn response_trailers() {
        let state = state();
        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-trailers: 1\r\n"));
        assert!(out.contains("trailer: x-mock-trailer\r\ntransfer-encoding: chunked\r\n"));
        assert!(!out.contains("content-length"));
        assert!(out.ends_with("\r\n0\r\nx-mock-trailer: done\r\n\r\n"));
        lock(&state.settings).response_trailers = true;
        let (out, _) = exchange(&state, &post("/v1/responses", r#"{"input":"x","stream":true}"#, ""));
        assert!(out.contains("trailer: x-mock-trailer\r\n"));
        assert!(out.ends_with("\r\n0\r\nx-mock-trailer: done\r\n\r\n"));
        let (out, _) = exchange(&state, &post_chat(CHAT, "x-mock-trailers: off\r\n"));
        assert!(out.contains("content-length") && !out.contains("trailer"));
        // HTTP/1.0 has no chunked encoding, hence no trailers.
        let input = format!("POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {}\r\n\r\n{CHAT}", CHAT.len());
        let (out, _) = exchange(&state, input.as_bytes());
        assert!(out.contains("content-length") && !out.contains("trailer"));
    }

    #[test]
    fn request_trailers_and_endpoint_are_logged() {
        let state = state();
        let mut raw = b"POST /v1/embeddings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let body = r#"{"input":"hello"}"#;
        raw.extend(format!("{:x}\r\n{body}\r\n0\r\nX-Sig: a\r\nX-Sig: b\r\n\r\n", body.len()).bytes());
        let (out, _) = exchange(&state, &raw);
        assert!(out.starts_with("HTTP/1.1 200 "));
        let log = lock(&state.log).clone();
        assert_eq!(log[0]["trailers"], json!({"x-sig": "a, b"}));
        assert_eq!(log[0]["endpoint"], "embeddings");
        let (_, _) = exchange(&state, &post_chat(CHAT, ""));
        assert_eq!(lock(&state.log)[1]["trailers"], json!({}));
    }

    #[test]
    fn per_request_text_usage_and_ids() {
        let state = state();
        lock(&state.settings).completion_words = Some(4);
        lock(&state.settings).cached_tokens = Some(1);
        let (out, _) = exchange(&state, &post_chat(CHAT, ""));
        let body = json_of(&out);
        assert_eq!(body["choices"][0]["message"]["content"], "w1 w2 w3 w4");
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
        let (out, _) =
            exchange(&state, &post_chat(CHAT, "x-mock-text: a b\r\nx-mock-words: 9\r\nx-mock-cached-tokens: 5\r\n"));
        let body = json_of(&out);
        assert_eq!(body["choices"][0]["message"]["content"], "a b");
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 5);
        let (out, _) = exchange(&state, &post("/v1/messages", MESSAGES, &format!("{VERSION}x-mock-words: 2\r\n")));
        let body = json_of(&out);
        assert_eq!(body["id"], "msg_mock_3");
        assert_eq!(body["content"][0]["text"], "w1 w2");
        assert_eq!(body["usage"]["output_tokens"], 2);
        assert_eq!(body["usage"]["cache_read_input_tokens"], 1);
        lock(&state.settings).no_usage = true;
        let (out, _) = exchange(&state, &post("/v1/responses", r#"{"input":"x"}"#, ""));
        assert!(json_of(&out).get("usage").is_none());
        assert_eq!(json_of(&out)["id"], "resp_mock_4");
    }
}
