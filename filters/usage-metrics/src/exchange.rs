//! One request/response exchange: what the client asked for, what the provider answered,
//! and the usage accounting done when it ends.
//!
//! Request: a POST with a JSON (or untyped) body is read whole (it is small and needed for the
//! model, the stream flag and the prompt size). A streaming request without
//! `stream_options.include_usage` gets `include_usage: true` on the way up, so the provider
//! reports usage; that extra usage-only chunk is removed again on the way down.
//!
//! Response: never held. A non-streaming JSON body is *copied* chunk by chunk (up to a cap)
//! and parsed at the end; a stream is parsed event by event with `SseParser`, every event
//! that is passed on keeps its exact bytes. Without usage from the provider, the counts are
//! estimated from sizes and marked as estimated.

use crate::config::Config;
use crate::recorder::{Recorder, RequestLabels, TIME_PER_OUTPUT_TOKEN, TIME_TO_FIRST_TOKEN};
use serde_json::Value;
use sluice_core::errors::LocalReply;
use sluice_core::host::Host;
use sluice_core::keys;
use sluice_core::sse::{SseEvent, SseParser};
use sluice_core::usage::{estimate_usage, usage_from_value, Observed, StreamUsage, TokenUsage};
use std::rc::Rc;
use std::time::SystemTime;

/// Name used in logs and error bodies.
pub const FILTER: &str = "usage-metrics";

/// What the glue should return to Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Let the data through.
    Continue,
    /// Hold it (buffering the request body, or after a local reply).
    Pause,
}

/// Why a request's usage had to be estimated (`sluice_reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimateReason {
    /// The response was complete and valid but carried no usage.
    NoUsage,
    /// A usage object was present but malformed (a count not a non-negative integer).
    InvalidUsage,
    /// The response body was not a JSON object.
    InvalidBody,
    /// The response ended early (connection reset, truncated stream).
    Incomplete,
    /// The response body exceeded `max_response_body_bytes`.
    TooLarge,
}

impl EstimateReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoUsage => "no_usage",
            Self::InvalidUsage => "invalid_usage",
            Self::InvalidBody => "invalid_body",
            Self::Incomplete => "incomplete",
            Self::TooLarge => "too_large",
        }
    }
}

/// How the response body is being read.
#[derive(Debug)]
enum ResponseBody {
    /// Not read: not tracked, not 2xx, or headers not seen yet.
    Unread,
    /// An SSE stream, parsed event by event.
    Stream(Box<StreamState>),
    /// A JSON body, copied up to the cap.
    Json { copy: Vec<u8>, total: usize, overflow: bool },
    /// Some other content type: only its size is counted.
    Opaque { total: usize },
}

#[derive(Debug)]
struct StreamState {
    parser: SseParser,
    usage: StreamUsage,
    /// Remove usage-only chunks (we asked for them, the client did not).
    strip_usage: bool,
    /// A usage object was seen that did not parse.
    saw_invalid_usage: bool,
}

impl StreamState {
    /// Account for one event; `true` when it goes on to the client.
    fn pass(&mut self, event: &SseEvent) -> bool {
        match self.usage.observe(event) {
            Observed::UsageOnly => !self.strip_usage,
            Observed::Other if is_usage_only_chunk(&event.data) => {
                // A usage-only chunk whose usage did not parse: still ours to hide.
                self.saw_invalid_usage = true;
                !self.strip_usage
            }
            _ => true,
        }
    }
}

/// `{"choices": [], "usage": <not null>, ...}`: the chunk `include_usage` adds.
fn is_usage_only_chunk(data: &str) -> bool {
    let Ok(Value::Object(chunk)) = serde_json::from_str::<Value>(data) else {
        return false;
    };
    let no_choices = chunk.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
    let has_usage = chunk.get("usage").is_some_and(|u| !u.is_null());
    no_choices && has_usage
}

/// What the end of the exchange found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Token counts (reported or estimated).
    pub usage: TokenUsage,
    /// Set when `usage` is an estimate.
    pub reason: Option<EstimateReason>,
    /// Model named by the response.
    pub response_model: Option<String>,
}

/// Per-request state.
#[derive(Debug)]
pub struct Exchange {
    config: Rc<Config>,
    tracked: bool,
    operation: &'static str,
    started: Option<SystemTime>,
    request_body_done: bool,
    request_model: Option<String>,
    prompt_bytes: usize,
    injected: bool,
    status: Option<u32>,
    body: ResponseBody,
    first_byte: Option<SystemTime>,
    last_byte: Option<SystemTime>,
    finished: bool,
}

/// `gen_ai_operation_name` for a request path.
pub fn operation_for_path(path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or_default();
    if path.ends_with("/chat/completions") {
        "chat"
    } else if path.ends_with("/embeddings") {
        "embeddings"
    } else if path.ends_with("/completions") {
        "text_completion"
    } else {
        "chat"
    }
}

fn millis_between(from: Option<SystemTime>, to: Option<SystemTime>) -> Option<u64> {
    let d = to?.duration_since(from?).ok()?;
    u64::try_from(d.as_millis()).ok()
}

fn status_class(status: Option<u32>) -> String {
    match status {
        Some(s @ 100..=599) => format!("{}xx", s / 100),
        Some(_) => "other".into(),
        None => "none".into(),
    }
}

/// For a streaming request (`"stream": true`) without `stream_options.include_usage: true`,
/// set it. Returns `true` when the request changed. Other `stream_options` are kept; a
/// `stream_options` that is not an object is left alone (the provider will reject it).
pub fn ensure_include_usage(request: &mut serde_json::Map<String, Value>) -> bool {
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        return false;
    }
    let options = request.entry("stream_options").or_insert_with(|| Value::Object(serde_json::Map::new()));
    if options.is_null() {
        *options = Value::Object(serde_json::Map::new());
    }
    let Some(options) = options.as_object_mut() else {
        return false;
    };
    if options.get("include_usage").and_then(Value::as_bool) == Some(true) {
        return false;
    }
    options.insert("include_usage".into(), Value::Bool(true));
    true
}

fn text_bytes(content: Option<&Value>) -> usize {
    match content {
        Some(Value::String(s)) => s.len(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(str::len)
            .fold(0, usize::saturating_add),
        _ => 0,
    }
}

/// UTF-8 bytes of a request's prompt: message texts (string or text parts), tool-call
/// arguments, and a legacy `prompt` (string or list of strings). Input to estimates.
pub fn prompt_bytes(request: &serde_json::Map<String, Value>) -> usize {
    let mut n: usize = 0;
    for message in request.get("messages").and_then(Value::as_array).into_iter().flatten() {
        n = n.saturating_add(text_bytes(message.get("content")));
        for call in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let args = call.get("function").and_then(|f| f.get("arguments")).and_then(Value::as_str);
            n = n.saturating_add(args.map_or(0, str::len));
        }
    }
    match request.get("prompt") {
        Some(Value::String(s)) => n = n.saturating_add(s.len()),
        Some(Value::Array(items)) => {
            for item in items.iter().filter_map(Value::as_str) {
                n = n.saturating_add(item.len());
            }
        }
        _ => {}
    }
    n
}

/// UTF-8 bytes of generated text in a non-streaming response's choices.
fn response_text_bytes(body: &Value) -> usize {
    let Some(choices) = body.get("choices").and_then(Value::as_array) else {
        return 0;
    };
    let mut n: usize = 0;
    for choice in choices {
        let Some(message) = choice.get("message").or_else(|| choice.get("text")) else {
            continue;
        };
        if let Some(text) = message.as_str() {
            n = n.saturating_add(text.len()); // legacy completions: `text`
            continue;
        }
        for key in ["content", "refusal", "reasoning_content"] {
            match message.get(key) {
                Some(Value::String(s)) => n = n.saturating_add(s.len()),
                Some(Value::Array(parts)) => {
                    for part in parts {
                        n = n.saturating_add(part.get("text").and_then(Value::as_str).map_or(0, str::len));
                    }
                }
                _ => {}
            }
        }
        for call in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let args = call.get("function").and_then(|f| f.get("arguments")).and_then(Value::as_str);
            n = n.saturating_add(args.map_or(0, str::len));
        }
    }
    n
}

impl Exchange {
    /// A new exchange under `config`.
    pub fn new(config: Rc<Config>) -> Self {
        Self {
            config,
            tracked: false,
            operation: "chat",
            started: None,
            request_body_done: false,
            request_model: None,
            prompt_bytes: 0,
            injected: false,
            status: None,
            body: ResponseBody::Unread,
            first_byte: None,
            last_byte: None,
            finished: false,
        }
    }

    /// `true` when this exchange is an LLM call the filter accounts for.
    pub fn tracked(&self) -> bool {
        self.tracked
    }

    /// `true` when the filter added `include_usage` to the request.
    pub fn injected(&self) -> bool {
        self.injected
    }

    /// Request headers: decide whether to read the body.
    pub fn on_request_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Flow {
        self.started = Some(host.now());
        let method = host.request_header(":method").unwrap_or_default();
        let path = String::from_utf8_lossy(&host.request_header(":path").unwrap_or_default()).into_owned();
        let content_type =
            host.request_header("content-type").map(|v| String::from_utf8_lossy(&v).to_ascii_lowercase());
        let json_body = content_type.as_deref().is_none_or(|c| c.contains("json"));
        if method != b"POST" || end_of_stream || !json_body {
            return Flow::Continue;
        }
        self.tracked = true;
        self.operation = operation_for_path(&path);
        if self.config.inject_include_usage {
            // The body may grow by `"stream_options":{"include_usage":true}`.
            host.set_request_header("content-length", None);
        }
        Flow::Continue
    }

    /// Request body: buffer to the end, then read (and maybe rewrite) it.
    pub fn on_request_body<H: Host>(&mut self, host: &mut H, size: usize, end_of_stream: bool) -> Flow {
        if !self.tracked || self.request_body_done {
            return Flow::Continue;
        }
        if size > self.config.max_request_body_bytes {
            self.request_body_done = true;
            log::info!("{FILTER}: request body over {} bytes: 413", self.config.max_request_body_bytes);
            host.send_reply(&LocalReply::body_too_large(FILTER, self.config.max_request_body_bytes));
            return Flow::Pause;
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        self.request_body_done = true;
        let body = host.request_body(0, size).unwrap_or_default();
        let state_model = keys::filter_state(host, keys::REQUESTED_MODEL);
        let parsed = serde_json::from_slice::<Value>(&body).ok();
        let Some(Value::Object(mut request)) = parsed else {
            // Not ours to judge: the provider answers it. Estimates fall back to the raw size.
            self.prompt_bytes = body.len();
            self.request_model = state_model;
            return Flow::Continue;
        };
        self.prompt_bytes = prompt_bytes(&request);
        let body_model = request.get("model").and_then(Value::as_str).filter(|m| !m.is_empty()).map(str::to_string);
        if state_model.is_none() {
            if let Some(model) = &body_model {
                keys::set_filter_state(host, keys::REQUESTED_MODEL, model);
            }
        }
        self.request_model = state_model.or(body_model);
        if self.config.inject_include_usage && ensure_include_usage(&mut request) {
            if let Ok(new) = serde_json::to_vec(&request) {
                host.set_request_body(0, size, &new);
                self.injected = true;
            }
        }
        Flow::Continue
    }

    /// Response headers: pick how to read the body.
    pub fn on_response_headers<H: Host>(&mut self, host: &mut H, rec: &mut Recorder, end_of_stream: bool) -> Flow {
        if !self.tracked || self.finished {
            return Flow::Continue;
        }
        self.status =
            host.response_header(":status").and_then(|v| String::from_utf8_lossy(&v).trim().parse::<u32>().ok());
        let ok = matches!(self.status, Some(200..=299));
        let content_type = host
            .response_header("content-type")
            .map(|v| String::from_utf8_lossy(&v).to_ascii_lowercase())
            .unwrap_or_default();
        self.body = if !ok {
            ResponseBody::Unread
        } else if content_type.starts_with("text/event-stream") {
            if self.injected {
                // Chunks may shrink (the usage-only chunk is removed).
                host.set_response_header("content-length", None);
            }
            ResponseBody::Stream(Box::new(StreamState {
                parser: SseParser::new(),
                usage: StreamUsage::new(),
                strip_usage: self.injected,
                saw_invalid_usage: false,
            }))
        } else if content_type.is_empty() || content_type.contains("json") {
            ResponseBody::Json { copy: Vec::new(), total: 0, overflow: false }
        } else {
            ResponseBody::Opaque { total: 0 }
        };
        if end_of_stream {
            self.finish(host, rec, true);
        }
        Flow::Continue
    }

    /// One response body chunk (never held).
    pub fn on_response_body<H: Host>(
        &mut self,
        host: &mut H,
        rec: &mut Recorder,
        size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if !self.tracked || self.finished {
            return Flow::Continue;
        }
        if size > 0 {
            let now = host.now();
            self.first_byte.get_or_insert(now);
            self.last_byte = Some(now);
        }
        let max_copy = self.config.max_response_body_bytes;
        match &mut self.body {
            ResponseBody::Unread => {}
            ResponseBody::Stream(stream) => {
                let chunk = if size > 0 { host.response_body(0, size).unwrap_or_default() } else { Vec::new() };
                let mut events = stream.parser.feed(&chunk);
                if end_of_stream {
                    events.extend(stream.parser.finish());
                }
                if stream.strip_usage {
                    let mut out = Vec::with_capacity(chunk.len());
                    for event in &events {
                        if stream.pass(event) {
                            out.extend_from_slice(&event.raw);
                        }
                    }
                    if end_of_stream {
                        out.extend(stream.parser.take_pending());
                    }
                    if out != chunk {
                        host.set_response_body(0, size, &out);
                    }
                } else {
                    for event in &events {
                        stream.pass(event);
                    }
                }
            }
            ResponseBody::Json { copy, total, overflow } => {
                *total = total.saturating_add(size);
                if !*overflow && size > 0 {
                    if *total > max_copy {
                        *overflow = true;
                        *copy = Vec::new();
                    } else if let Some(chunk) = host.response_body(0, size) {
                        copy.extend_from_slice(&chunk);
                    }
                }
            }
            ResponseBody::Opaque { total } => *total = total.saturating_add(size),
        }
        if end_of_stream {
            self.finish(host, rec, true);
        }
        Flow::Continue
    }

    /// The stream is over (access-log time): account for an exchange that never reached
    /// its end of stream (reset, truncated).
    pub fn on_log<H: Host>(&mut self, host: &mut H, rec: &mut Recorder) {
        if self.tracked && !self.finished {
            if self.status.is_none() {
                self.status = host
                    .property(&["response", "code"])
                    .and_then(|v| bytes_to_u64(&v))
                    .and_then(|c| u32::try_from(c).ok())
                    .filter(|c| *c > 0);
            }
            self.finish(host, rec, false);
        }
    }

    /// The usage found (or estimated) for a 2xx response; `complete` is false when the body
    /// never reached its end.
    fn outcome(&mut self, complete: bool) -> Option<Outcome> {
        let prompt_bytes = self.prompt_bytes;
        let estimate = |output_bytes: usize, reason| Outcome {
            usage: estimate_usage(prompt_bytes, output_bytes),
            reason: Some(reason),
            response_model: None,
        };
        match &mut self.body {
            ResponseBody::Unread => None,
            ResponseBody::Stream(stream) => {
                for event in stream.parser.finish() {
                    stream.pass(&event);
                }
                let response_model = stream.usage.response_model().map(str::to_string);
                let mut out = match stream.usage.usage() {
                    Some(usage) => Outcome { usage, reason: None, response_model: None },
                    None => {
                        let reason = if !complete || !stream.usage.saw_done() {
                            EstimateReason::Incomplete
                        } else if stream.saw_invalid_usage {
                            EstimateReason::InvalidUsage
                        } else {
                            EstimateReason::NoUsage
                        };
                        estimate(stream.usage.output_chars(), reason)
                    }
                };
                out.response_model = response_model;
                Some(out)
            }
            ResponseBody::Json { copy, total, overflow } => {
                if *overflow {
                    return Some(estimate(*total, EstimateReason::TooLarge));
                }
                let parsed = serde_json::from_slice::<Value>(copy).ok().filter(Value::is_object);
                let Some(body) = parsed else {
                    let reason = if complete { EstimateReason::InvalidBody } else { EstimateReason::Incomplete };
                    return Some(estimate(*total, reason));
                };
                let response_model = body.get("model").and_then(Value::as_str).map(str::to_string);
                let reported = body.get("usage").filter(|u| !u.is_null());
                let mut out = match reported.map(usage_from_value) {
                    Some(Some(usage)) => Outcome { usage, reason: None, response_model: None },
                    Some(None) => estimate(response_text_bytes(&body), EstimateReason::InvalidUsage),
                    None => estimate(response_text_bytes(&body), EstimateReason::NoUsage),
                };
                out.response_model = response_model;
                Some(out)
            }
            ResponseBody::Opaque { total } => {
                let reason = if complete { EstimateReason::InvalidBody } else { EstimateReason::Incomplete };
                Some(estimate(*total, reason))
            }
        }
    }

    fn finish<H: Host>(&mut self, host: &mut H, rec: &mut Recorder, complete: bool) {
        self.finished = true;
        let provider = keys::filter_state(host, keys::PROVIDER)
            .or_else(|| keys::route_metadata(host, "provider"))
            .or_else(|| {
                host.property(&["xds", "cluster_name"])
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "unknown".into());
        if keys::filter_state(host, keys::PROVIDER).is_none() {
            keys::set_filter_state(host, keys::PROVIDER, &provider);
        }
        let user = self
            .config
            .user_label
            .then(|| keys::filter_state(host, keys::USER).map_or_else(|| "none".to_string(), |u| rec.user_label(&u)));
        let team = self
            .config
            .team_label
            .then(|| keys::filter_state(host, keys::TEAM).map_or_else(|| "none".to_string(), |t| rec.team_label(&t)));
        let mut labels = RequestLabels {
            operation: self.operation.to_string(),
            provider,
            request_model: self.request_model.clone().unwrap_or_else(|| "unknown".into()),
            response_model: String::new(),
            user,
            team,
        };
        rec.count(host, &labels.requests(&status_class(self.status)), 1);

        let Some(outcome) = self.outcome(complete) else {
            return;
        };
        let response_model = outcome.response_model.clone().filter(|m| !m.is_empty());
        labels.response_model = response_model.clone().unwrap_or_else(|| labels.request_model.clone());
        let usage = outcome.usage;
        rec.count(host, &labels.token_usage("input"), usage.input);
        rec.count(host, &labels.token_usage("output"), usage.output);
        if let Some(reason) = outcome.reason {
            log::debug!("{FILTER}: usage estimated ({})", reason.as_str());
            rec.count(host, &labels.estimated(reason.as_str()), 1);
            rec.count(host, &labels.estimated_tokens("input"), usage.input);
            rec.count(host, &labels.estimated_tokens("output"), usage.output);
        }
        let ttft = millis_between(self.started, self.first_byte);
        if matches!(self.body, ResponseBody::Stream(_)) {
            if let Some(ttft) = ttft {
                rec.observe(host, &labels.latency(TIME_TO_FIRST_TOKEN), ttft);
            }
            if let (Some(span), true) = (millis_between(self.first_byte, self.last_byte), usage.output > 1) {
                rec.observe(host, &labels.latency(TIME_PER_OUTPUT_TOKEN), span / (usage.output - 1));
            }
        }

        keys::set_filter_state(host, keys::INPUT_TOKENS, &usage.input.to_string());
        keys::set_filter_state(host, keys::OUTPUT_TOKENS, &usage.output.to_string());
        keys::set_filter_state(host, keys::TOTAL_TOKENS, &usage.total.to_string());
        keys::set_filter_state(host, keys::USAGE_ESTIMATED, if outcome.reason.is_some() { "true" } else { "false" });
        if let Some(model) = &response_model {
            keys::set_filter_state(host, keys::RESPONSE_MODEL, model);
        }
        if let Some(ttft) = ttft {
            keys::set_filter_state(host, keys::TTFT_MS, &ttft.to_string());
        }
    }
}

/// A property holding a number: Envoy encodes integers as 8 little-endian bytes.
fn bytes_to_u64(v: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = v.try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use sluice_core::host::FakeHost;
    use std::time::Duration;

    const PROVIDER_META: [&str; 5] = ["xds", "route_metadata", "filter_metadata", "sluice", "provider"];

    fn config() -> Rc<Config> {
        Rc::new(Config::default())
    }

    fn host() -> FakeHost {
        let mut h = FakeHost::with_request_headers(&[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("content-type", "application/json"),
            ("content-length", "99"),
        ]);
        h.set_prop(&PROVIDER_META, "openai");
        h.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000));
        h
    }

    fn at(h: &mut FakeHost, ms: u64) {
        h.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000) + Duration::from_millis(ms));
    }

    /// Run the request phase with `body`; returns the exchange.
    fn request(h: &mut FakeHost, cfg: Rc<Config>, body: &str) -> Exchange {
        let mut x = Exchange::new(cfg);
        assert_eq!(x.on_request_headers(h, false), Flow::Continue);
        h.req_body = body.as_bytes().to_vec();
        let n = h.req_body.len();
        assert_eq!(x.on_request_body(h, n, false), Flow::Pause);
        assert_eq!(x.on_request_body(h, n, true), Flow::Continue);
        x
    }

    fn respond_headers(h: &mut FakeHost, x: &mut Exchange, rec: &mut Recorder, status: &str, ctype: &str) {
        h.resp_headers = vec![(":status".into(), status.into()), ("content-type".into(), ctype.into())];
        assert_eq!(x.on_response_headers(h, rec, false), Flow::Continue);
    }

    /// Feed `chunks` as response body chunks; returns what the client receives.
    fn respond_body(h: &mut FakeHost, x: &mut Exchange, rec: &mut Recorder, chunks: &[&[u8]], eos: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            h.resp_body = chunk.to_vec();
            let last = eos && i + 1 == chunks.len();
            assert_eq!(x.on_response_body(h, rec, chunk.len(), last), Flow::Continue);
            out.extend_from_slice(&h.resp_body);
        }
        if eos && chunks.is_empty() {
            h.resp_body.clear();
            x.on_response_body(h, rec, 0, true);
        }
        out
    }

    fn rec() -> Recorder {
        Recorder::new(1000, 10)
    }

    fn tokens(h: &FakeHost, provider: &str, model: &str, resp_model: &str, ty: &str) -> Option<i64> {
        let l = RequestLabels {
            operation: "chat".into(),
            provider: provider.into(),
            request_model: model.into(),
            response_model: resp_model.into(),
            user: None,
            team: None,
        };
        h.metric(&l.token_usage(ty))
    }

    fn labels(model: &str) -> RequestLabels {
        RequestLabels {
            operation: "chat".into(),
            provider: "openai".into(),
            request_model: model.into(),
            response_model: model.into(),
            user: None,
            team: None,
        }
    }

    fn chunk(model: &str, content: &str) -> String {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
        )
    }

    fn usage_chunk(model: &str, p: u64, c: u64) -> String {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}\n\n",
            p + c
        )
    }

    const DONE: &str = "data: [DONE]\n\n";

    #[test]
    fn non_streaming_usage_is_counted_exactly() {
        let mut h = host();
        let mut r = rec();
        let mut x = request(&mut h, config(), r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#);
        assert!(x.tracked() && !x.injected());
        assert_eq!(h.req_header("content-length"), None, "dropped: the body may change");
        assert_eq!(h.prop(&[keys::REQUESTED_MODEL]).as_deref(), Some("gpt-4o"));
        respond_headers(&mut h, &mut x, &mut r, "200", "application/json");
        let body = r#"{"id":"x","model":"gpt-4o-2024","choices":[{"index":0,"message":{"role":"assistant","content":"hello there"}}],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        let (a, b) = body.as_bytes().split_at(40);
        at(&mut h, 25);
        let seen = respond_body(&mut h, &mut x, &mut r, &[a, b], true);
        assert_eq!(seen, body.as_bytes(), "non-streaming responses pass untouched");
        assert_eq!(tokens(&h, "openai", "gpt-4o", "gpt-4o-2024", "input"), Some(7));
        assert_eq!(tokens(&h, "openai", "gpt-4o", "gpt-4o-2024", "output"), Some(3));
        assert_eq!(h.metric(&labels("gpt-4o").requests("2xx")), Some(1));
        for (k, v) in [
            (keys::INPUT_TOKENS, "7"),
            (keys::OUTPUT_TOKENS, "3"),
            (keys::TOTAL_TOKENS, "10"),
            (keys::USAGE_ESTIMATED, "false"),
            (keys::RESPONSE_MODEL, "gpt-4o-2024"),
            (keys::TTFT_MS, "25"),
            (keys::PROVIDER, "openai"),
        ] {
            assert_eq!(h.prop(&[k]).as_deref(), Some(v), "{k}");
        }
        assert!(h.histogram_samples.is_empty(), "latency histograms are for streams");
        // on_log after the end changes nothing.
        x.on_log(&mut h, &mut r);
        assert_eq!(h.metric(&labels("gpt-4o").requests("2xx")), Some(1));
    }

    #[test]
    fn stream_without_include_usage_gets_it_and_the_client_does_not_see_it() {
        let mut h = host();
        let mut r = rec();
        let mut x = request(
            &mut h,
            config(),
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert!(x.injected());
        let sent: Value = serde_json::from_slice(&h.req_body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["messages"][0]["content"], "hi");
        h.resp_headers = vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "text/event-stream".into()),
            ("content-length".into(), "1".into()),
        ];
        x.on_response_headers(&mut h, &mut r, false);
        assert_eq!(h.resp_header("content-length"), None);
        let stream =
            format!("{}{}{}{}", chunk("gpt-4o", "Hello"), chunk("gpt-4o", " world"), usage_chunk("gpt-4o", 5, 2), DONE);
        let want = format!("{}{}{}", chunk("gpt-4o", "Hello"), chunk("gpt-4o", " world"), DONE);
        // Split at every position: the usage chunk is removed wherever the cut falls.
        for cut in 0..=stream.len() {
            let mut h2 = h.clone();
            let mut x2 = request(
                &mut h2,
                config(),
                r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            );
            let mut r2 = rec();
            respond_headers(&mut h2, &mut x2, &mut r2, "200", "text/event-stream");
            let (a, b) = stream.as_bytes().split_at(cut);
            let seen = respond_body(&mut h2, &mut x2, &mut r2, &[a, b], true);
            assert_eq!(String::from_utf8(seen).unwrap(), want, "cut {cut}");
            assert_eq!(tokens(&h2, "openai", "gpt-4o", "gpt-4o", "input"), Some(5));
            assert_eq!(tokens(&h2, "openai", "gpt-4o", "gpt-4o", "output"), Some(2));
        }
        // Byte by byte, with CRLF framing kept exactly.
        let crlf = stream.replace("\n", "\r\n");
        let want_crlf = want.replace("\n", "\r\n");
        let chunks: Vec<&[u8]> = crlf.as_bytes().chunks(1).collect();
        at(&mut h, 5);
        let seen = respond_body(&mut h, &mut x, &mut r, &chunks, true);
        assert_eq!(String::from_utf8(seen).unwrap(), want_crlf);
        assert_eq!(h.prop(&[keys::USAGE_ESTIMATED]).as_deref(), Some("false"));
        assert_eq!(h.prop(&[keys::TOTAL_TOKENS]).as_deref(), Some("7"));
        assert_eq!(h.histogram_samples.len(), 2, "ttft and time per output token");
    }

    #[test]
    fn stream_with_include_usage_is_untouched() {
        let mut h = host();
        let mut r = rec();
        let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
        let mut x = request(&mut h, config(), body);
        assert!(!x.injected());
        assert_eq!(h.req_body, body.as_bytes(), "request not rewritten");
        respond_headers(&mut h, &mut x, &mut r, "200", "text/event-stream");
        let stream = format!("{}{}{}", chunk("gpt-4o", "Hi"), usage_chunk("gpt-4o", 4, 1), DONE);
        let chunks: Vec<&[u8]> = stream.as_bytes().chunks(7).collect();
        let seen = respond_body(&mut h, &mut x, &mut r, &chunks, true);
        assert_eq!(seen, stream.as_bytes());
        assert_eq!(tokens(&h, "openai", "gpt-4o", "gpt-4o", "input"), Some(4));
    }

    #[test]
    fn injection_can_be_disabled() {
        let mut h = host();
        let mut r = rec();
        let cfg = Rc::new(Config { inject_include_usage: false, ..Config::default() });
        let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"12345678"}]}"#;
        let mut x = request(&mut h, cfg, body);
        assert!(!x.injected());
        assert_eq!(h.req_header("content-length").as_deref(), Some("99"));
        assert_eq!(h.req_body, body.as_bytes());
        respond_headers(&mut h, &mut x, &mut r, "200", "text/event-stream");
        let stream = format!("{}{}", chunk("m", "abcdefghi"), DONE);
        respond_body(&mut h, &mut x, &mut r, &[stream.as_bytes()], true);
        // Estimate: 8 prompt bytes -> 2, 9 output bytes -> 3.
        assert_eq!(tokens(&h, "openai", "m", "m", "input"), Some(2));
        assert_eq!(tokens(&h, "openai", "m", "m", "output"), Some(3));
        assert_eq!(h.metric(&labels("m").estimated("no_usage")), Some(1));
        assert_eq!(h.metric(&labels("m").estimated_tokens("output")), Some(3));
        assert_eq!(h.prop(&[keys::USAGE_ESTIMATED]).as_deref(), Some("true"));
    }

    #[test]
    fn bad_responses_are_estimated_with_a_reason() {
        let req = r#"{"model":"m","messages":[{"role":"user","content":"12345678"}]}"#;
        let cases: &[(&str, &str, &[u8], &str, i64)] = &[
            ("json without usage", "application/json", br#"{"model":"m","choices":[{"message":{"content":"abcd"}}]}"#, "no_usage", 1),
            (
                "malformed usage",
                "application/json",
                br#"{"model":"m","choices":[{"message":{"content":"abcd"}}],"usage":{"prompt_tokens":"x","completion_tokens":-3}}"#,
                "invalid_usage",
                1,
            ),
            ("cut-off json", "application/json", br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"mess"#, "invalid_body", 16),
            ("not json", "application/json", b"\xff\xfe<html>", "invalid_body", 2),
            ("html", "text/html", b"<html>oops</html>", "invalid_body", 5),
            ("json array", "application/json", b"[1,2]", "invalid_body", 2),
        ];
        for (what, ctype, body, reason, output) in cases {
            let mut h = host();
            let mut r = rec();
            let mut x = request(&mut h, config(), req);
            respond_headers(&mut h, &mut x, &mut r, "200", ctype);
            let seen = respond_body(&mut h, &mut x, &mut r, &[body], true);
            assert_eq!(seen, *body, "{what}");
            assert_eq!(h.metric(&labels("m").estimated(reason)), Some(1), "{what}");
            assert_eq!(tokens(&h, "openai", "m", "m", "input"), Some(2), "{what}");
            assert_eq!(tokens(&h, "openai", "m", "m", "output"), Some(*output), "{what}");
            assert_eq!(h.prop(&[keys::USAGE_ESTIMATED]).as_deref(), Some("true"), "{what}");
        }
    }

    #[test]
    fn streams_with_bad_usage_or_cut_off() {
        let req = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"12345678"}]}"#;
        let bad_usage =
            "data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":\"x\",\"completion_tokens\":-3}}\n\n";
        // Malformed usage: the chunk is still ours and hidden, the estimate says why.
        let mut h = host();
        let mut r = rec();
        let mut x = request(&mut h, config(), req);
        respond_headers(&mut h, &mut x, &mut r, "200", "text/event-stream");
        let stream = format!("{}{bad_usage}{DONE}", chunk("m", "abcd"));
        let seen = respond_body(&mut h, &mut x, &mut r, &[stream.as_bytes()], true);
        assert_eq!(String::from_utf8(seen).unwrap(), format!("{}{DONE}", chunk("m", "abcd")));
        assert_eq!(h.metric(&labels("m").estimated("invalid_usage")), Some(1));

        // Broken JSON inside an event, then [DONE]: no usage.
        let mut h = host();
        let mut r = rec();
        let mut x = request(&mut h, config(), req);
        respond_headers(&mut h, &mut x, &mut r, "200", "text/event-stream");
        let stream = format!("{}data: {{\"choices\":[{{\"delta\":{{\"cont\n\n{DONE}", chunk("m", "abcd"));
        let seen = respond_body(&mut h, &mut x, &mut r, &[stream.as_bytes()], true);
        assert_eq!(seen, stream.as_bytes());
        assert_eq!(h.metric(&labels("m").estimated("no_usage")), Some(1));

        // Cut off: no end of stream; on_log accounts for it.
        let mut h = host();
        let mut r = rec();
        let mut x = request(&mut h, config(), req);
        respond_headers(&mut h, &mut x, &mut r, "200", "text/event-stream");
        let partial = format!("{}data: {{\"choi", chunk("m", "abcdefgh"));
        let seen = respond_body(&mut h, &mut x, &mut r, &[partial.as_bytes()], false);
        assert_eq!(String::from_utf8(seen).unwrap(), chunk("m", "abcdefgh"), "a partial event waits for its end");
        x.on_log(&mut h, &mut r);
        assert_eq!(h.metric(&labels("m").estimated("incomplete")), Some(1));
        assert_eq!(tokens(&h, "openai", "m", "m", "output"), Some(2));
        assert_eq!(h.metric(&labels("m").requests("2xx")), Some(1));
        x.on_log(&mut h, &mut r);
        assert_eq!(h.metric(&labels("m").requests("2xx")), Some(1), "counted once");
    }

    #[test]
    fn truncated_json_accounted_at_log_time() {
        let mut h = host();
        let mut r = rec();
        let mut x = request(&mut h, config(), r#"{"model":"m","messages":[{"role":"user","content":"12345678"}]}"#);
        respond_headers(&mut h, &mut x, &mut r, "200", "application/json");
        respond_body(&mut h, &mut x, &mut r, &[b"{\"id\":\"x\",\"choi"], false);
        x.on_log(&mut h, &mut r);
        assert_eq!(h.metric(&labels("m").estimated("incomplete")), Some(1));
    }

    #[test]
    fn over_cap_response_is_not_copied() {
        let mut h = host();
        let mut r = rec();
        let cfg = Rc::new(Config { max_response_body_bytes: 10, ..Config::default() });
        let mut x = request(&mut h, cfg, r#"{"model":"m","messages":[]}"#);
        respond_headers(&mut h, &mut x, &mut r, "200", "application/json");
        let body = br#"{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        respond_body(&mut h, &mut x, &mut r, &[&body[..8], &body[8..]], true);
        assert_eq!(h.metric(&labels("m").estimated("too_large")), Some(1));
    }

    #[test]
    fn errors_count_requests_but_no_tokens() {
        let mut h = host();
        let mut r = rec();
        let mut x = request(&mut h, config(), r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#);
        respond_headers(&mut h, &mut x, &mut r, "429", "application/json");
        respond_body(&mut h, &mut x, &mut r, &[br#"{"error":{"message":"slow down"}}"#], true);
        assert_eq!(h.metric(&labels("m").requests("4xx")), Some(1));
        assert_eq!(tokens(&h, "openai", "m", "m", "input"), None);
        assert_eq!(h.prop(&[keys::INPUT_TOKENS]), None);
        assert_eq!(h.prop(&[keys::PROVIDER]).as_deref(), Some("openai"));

        // Reset before any response: status from the property, or none.
        let mut h = host();
        let mut x = request(&mut h, config(), r#"{"model":"m","messages":[]}"#);
        x.on_log(&mut h, &mut r);
        assert_eq!(h.metric(&labels("m").requests("none")), Some(1));
        let mut h = host();
        h.properties.insert("response/code".into(), 503u64.to_le_bytes().to_vec());
        let mut x = request(&mut h, config(), r#"{"model":"m","messages":[]}"#);
        x.on_log(&mut h, &mut r);
        assert_eq!(h.metric(&labels("m").requests("5xx")), Some(1));
    }

    #[test]
    fn untracked_requests_are_left_alone() {
        for headers in [
            vec![(":method", "GET"), (":path", "/v1/models")],
            vec![(":method", "POST"), (":path", "/upload"), ("content-type", "multipart/form-data")],
        ] {
            let mut h = FakeHost::with_request_headers(&headers);
            h.req_headers.push(("content-length".into(), b"5".to_vec()));
            let mut r = rec();
            let mut x = Exchange::new(config());
            assert_eq!(x.on_request_headers(&mut h, false), Flow::Continue);
            assert_eq!(x.on_request_body(&mut h, 5, true), Flow::Continue);
            assert!(!x.tracked());
            assert_eq!(h.req_header("content-length").as_deref(), Some("5"));
            respond_headers(&mut h, &mut x, &mut r, "200", "application/json");
            respond_body(&mut h, &mut x, &mut r, &[b"{}"], true);
            x.on_log(&mut h, &mut r);
            assert!(h.metric_defs.is_empty());
        }
        // A POST without a body is not an LLM call either.
        let mut h = host();
        let mut x = Exchange::new(config());
        x.on_request_headers(&mut h, true);
        assert!(!x.tracked());
    }

    #[test]
    fn oversized_request_gets_413() {
        let mut h = host();
        let cfg = Rc::new(Config { max_request_body_bytes: 10, ..Config::default() });
        let mut x = Exchange::new(cfg);
        x.on_request_headers(&mut h, false);
        assert_eq!(x.on_request_body(&mut h, 11, false), Flow::Pause);
        assert_eq!(h.replies.len(), 1);
        assert_eq!(h.replies[0].status, 413);
        assert_eq!(x.on_request_body(&mut h, 20, true), Flow::Continue, "no second reply");
        assert_eq!(h.replies.len(), 1);
    }

    #[test]
    fn non_json_request_is_forwarded_untouched() {
        let mut h = host();
        let mut r = rec();
        let mut x = request(&mut h, config(), "not json at all");
        assert_eq!(h.req_body, b"not json at all");
        respond_headers(&mut h, &mut x, &mut r, "400", "application/json");
        respond_body(&mut h, &mut x, &mut r, &[b"{}"], true);
        assert_eq!(h.metric(&labels("unknown").requests("4xx")), Some(1));
    }

    #[test]
    fn provider_and_model_precedence() {
        // Filter state from model-failover wins over route metadata; cluster name is last.
        let mut h = host();
        h.set_prop(&[keys::PROVIDER], "anthropic");
        h.set_prop(&[keys::REQUESTED_MODEL], "route-default");
        let mut r = rec();
        let mut x = request(&mut h, config(), r#"{"model":"from-body","messages":[]}"#);
        respond_headers(&mut h, &mut x, &mut r, "200", "application/json");
        respond_body(&mut h, &mut x, &mut r, &[br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#], true);
        assert_eq!(tokens(&h, "anthropic", "route-default", "route-default", "output"), Some(2));
        assert_eq!(h.prop(&[keys::REQUESTED_MODEL]).as_deref(), Some("route-default"), "not overwritten");

        let mut h = host();
        h.properties.clear();
        h.set_prop(&["xds", "cluster_name"], "local-llm");
        let mut x = request(&mut h, config(), r#"{"messages":[]}"#);
        respond_headers(&mut h, &mut x, &mut r, "200", "application/json");
        respond_body(&mut h, &mut x, &mut r, &[br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#], true);
        assert_eq!(tokens(&h, "local-llm", "unknown", "unknown", "input"), Some(1));
        assert_eq!(h.prop(&[keys::PROVIDER]).as_deref(), Some("local-llm"));
    }

    #[test]
    fn user_and_team_labels_are_opt_in_and_capped() {
        let cfg = Rc::new(Config { user_label: true, team_label: true, max_label_values: 2, ..Config::default() });
        let mut r = Recorder::new(1000, cfg.max_label_values);
        // One host for every request: the recorder caches metric ids per VM.
        let mut h = host();
        for user in ["alice", "bob", "mallory", "alice"] {
            h.set_prop(&[keys::USER], user);
            h.set_prop(&[keys::TEAM], "dev");
            let mut x = request(&mut h, cfg.clone(), r#"{"model":"m","messages":[]}"#);
            respond_headers(&mut h, &mut x, &mut r, "200", "application/json");
            respond_body(&mut h, &mut x, &mut r, &[br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#], true);
        }
        for (user, want) in [("alice", 2), ("bob", 1), ("other", 1), ("mallory", 0)] {
            let mut l = labels("m");
            l.user = Some(user.into());
            l.team = Some("dev".into());
            assert_eq!(h.metric(&l.token_usage("input")).unwrap_or(0), want, "{user}");
        }
        // Without a user in filter state: `none`.
        h.properties.remove(keys::USER);
        h.properties.remove(keys::TEAM);
        let mut x = request(&mut h, cfg, r#"{"model":"m","messages":[]}"#);
        respond_headers(&mut h, &mut x, &mut r, "200", "application/json");
        respond_body(&mut h, &mut x, &mut r, &[br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#], true);
        let mut l = labels("m");
        l.user = Some("none".into());
        l.team = Some("none".into());
        assert_eq!(h.metric(&l.requests("2xx")), Some(1));
    }

    #[test]
    fn latency_histograms_for_streams() {
        let mut h = host();
        let mut r = rec();
        let mut x = request(
            &mut h,
            config(),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        );
        respond_headers(&mut h, &mut x, &mut r, "200", "text/event-stream");
        at(&mut h, 120);
        respond_body(&mut h, &mut x, &mut r, &[chunk("m", "a").as_bytes()], false);
        at(&mut h, 320);
        let tail = format!("{}{DONE}", usage_chunk("m", 3, 5));
        respond_body(&mut h, &mut x, &mut r, &[tail.as_bytes()], true);
        let l = labels("m");
        let ttft = h.metric_defs.iter().position(|(_, n)| *n == l.latency(TIME_TO_FIRST_TOKEN)).unwrap();
        let tpot = h.metric_defs.iter().position(|(_, n)| *n == l.latency(TIME_PER_OUTPUT_TOKEN)).unwrap();
        assert_eq!(h.histogram_samples[&(ttft as u32)], vec![120]);
        assert_eq!(h.histogram_samples[&(tpot as u32)], vec![50], "200 ms over 4 tokens after the first");
        assert_eq!(h.prop(&[keys::TTFT_MS]).as_deref(), Some("120"));
    }

    #[test]
    fn include_usage_injection_table() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"{"stream":true}"#, Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)),
            (
                r#"{"stream":true,"stream_options":null}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            ),
            (
                r#"{"stream":true,"stream_options":{"include_obfuscation":false,"include_usage":false},"z":1}"#,
                Some(r#"{"stream":true,"stream_options":{"include_obfuscation":false,"include_usage":true},"z":1}"#),
            ),
            (r#"{"stream":true,"stream_options":{"include_usage":true}}"#, None),
            (r#"{"stream":true,"stream_options":"weird"}"#, None),
            (r#"{"stream":false}"#, None),
            (r#"{"stream":"true"}"#, None),
            (r#"{}"#, None),
        ];
        for (input, want) in cases {
            let Value::Object(mut req) = serde_json::from_str(input).unwrap() else { panic!() };
            let changed = ensure_include_usage(&mut req);
            assert_eq!(changed, want.is_some(), "{input}");
            if let Some(want) = want {
                assert_eq!(serde_json::to_string(&req).unwrap(), *want);
            }
        }
    }

    #[test]
    fn prompt_bytes_table() {
        let req = r#"{"messages":[{"role":"system","content":"abc"},{"role":"user","content":[{"type":"text","text":"héllo"},{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}],"prompt":["ab","c"]}"#;
        let Value::Object(req) = serde_json::from_str(req).unwrap() else { panic!() };
        assert_eq!(prompt_bytes(&req), 3 + 6 + 2 + 3);
    }

    #[test]
    fn operations_by_path() {
        assert_eq!(operation_for_path("/v1/chat/completions"), "chat");
        assert_eq!(operation_for_path("/openai/v1/chat/completions?x=1"), "chat");
        assert_eq!(operation_for_path("/v1/completions"), "text_completion");
        assert_eq!(operation_for_path("/v1/embeddings"), "embeddings");
        assert_eq!(operation_for_path("/v1/responses"), "chat");
    }

    #[test]
    fn hostile_inputs_do_not_panic() {
        let bodies: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\xff\xfe\xfd".to_vec(),
            "[".repeat(100_000).into_bytes(),
            br#"{"model":123,"stream":"yes"}"#.to_vec(),
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#
                .to_vec(),
        ];
        let responses: Vec<Vec<u8>> = vec![
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":18446744073709551615}}\n\n".to_vec(),
            b"data: \xff\n\n".to_vec(),
            format!("data: {}\n\n", "[".repeat(100_000)).into_bytes(),
            b"event: error\ndata: {\"error\":{}}\n\n".to_vec(),
        ];
        for body in &bodies {
            for resp in &responses {
                for ctype in ["text/event-stream", "application/json"] {
                    let mut h = host();
                    let mut r = rec();
                    let mut x = Exchange::new(config());
                    x.on_request_headers(&mut h, false);
                    h.req_body = body.clone();
                    x.on_request_body(&mut h, body.len(), true);
                    respond_headers(&mut h, &mut x, &mut r, "200", ctype);
                    let chunks: Vec<&[u8]> = resp.chunks(3).collect();
                    respond_body(&mut h, &mut x, &mut r, &chunks, true);
                    x.on_log(&mut h, &mut r);
                }
            }
        }
    }
}
