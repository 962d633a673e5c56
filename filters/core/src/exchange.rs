//! One request/response exchange, shared by every stage that runs on it.
//!
//! The pipeline fills it from the host once per callback (all request headers in one call,
//! the route's settings from a per-VM cache, the body once, the response headers once, each
//! chunk once) and hands it to the stages in order; stages read and change it instead of
//! calling the host again. What other, separate filters or access logs need is published as
//! Envoy filter state (`crate::keys`); what stages of one composed filter need travels here.

use crate::api::Api;
use crate::host::{HeaderPairs, Host};
use crate::json::{self, JsonError};
use crate::keys;
use crate::route::Route;
use crate::sse::SseEvent;
use crate::usage::{StreamUsage, TokenUsage};
use serde_json::Value;
use std::rc::Rc;
use std::time::SystemTime;

/// How much of the request body a stage needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum BodyUse {
    /// Not at all.
    #[default]
    None,
    /// The bytes (sizes, pass-through).
    Bytes,
    /// The parsed JSON.
    Json,
    /// The parsed JSON, possibly changed (`content-length` is dropped up front).
    Modify,
}

/// How a stage reads the response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ResponseUse {
    /// Not at all.
    #[default]
    None,
    /// Usage and generated text (tracked by the pipeline, never holding data back).
    Track,
    /// Each chunk / SSE event, possibly changed (`content-length` is dropped).
    Modify,
    /// The whole body at once (non-streaming only: the pipeline holds it to the end).
    Buffer,
}

/// Who the caller is, as established by auth.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Identity {
    /// `jwt`, `jwt_authn` or `api_key`.
    pub method: String,
    /// Subject.
    pub user: Option<String>,
    /// Team.
    pub team: Option<String>,
    /// Stable id of the credential (hash of an API key, never the key).
    pub key_id: Option<String>,
    /// The claims (in-process only; separate filters see `sluice.claim.*`).
    pub claims: Option<Rc<Value>>,
}

impl Identity {
    /// The compact filter-state form (`sluice.identity`).
    pub fn encode(&self) -> String {
        let mut m = serde_json::Map::new();
        m.insert("m".into(), Value::String(self.method.clone()));
        for (k, v) in [("u", &self.user), ("t", &self.team), ("k", &self.key_id)] {
            if let Some(v) = v {
                m.insert(k.into(), Value::String(v.clone()));
            }
        }
        Value::Object(m).to_string()
    }

    /// Parse [`Identity::encode`].
    pub fn decode(s: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(s).ok()?;
        let get = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Some(Self { method: get("m")?, user: get("u"), team: get("t"), key_id: get("k"), claims: None })
    }
}

/// The request as the stages see it.
#[derive(Debug, Default)]
pub struct Request {
    /// `:method`.
    pub method: String,
    /// `:path` (as received; an upstream stage may rewrite it).
    pub path: String,
    /// The API the path speaks.
    pub api: Api,
    /// All headers, as read once in the headers callback (kept in step with changes made
    /// through [`Exchange::set_request_header`]).
    pub headers: HeaderPairs,
    /// The request had no body (end of stream with the headers).
    pub no_body: bool,
    /// The body, once complete (when a stage asked for it).
    pub body: Option<Vec<u8>>,
    json: Option<Result<Value, JsonError>>,
    changed: bool,
    prompt_bytes: Option<usize>,
}

impl Request {
    /// A header value (first copy).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// A header value as text.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name).map(json::lossy)
    }

    /// How many copies of a header arrived.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(k, _)| k == name).count()
    }

    /// The content type is JSON, or absent.
    pub fn json_content(&self) -> bool {
        self.header("content-type").is_none_or(|v| {
            let v = json::lossy(v).to_ascii_lowercase();
            v.contains("json")
        })
    }

    /// The parsed body, when it is a JSON object (parsed once, duplicate keys refused).
    pub fn json(&mut self) -> Option<&Value> {
        self.parse();
        self.json.as_ref().and_then(|r| r.as_ref().ok())
    }

    /// Why the body is not a JSON object (`None` when it is, or there is no body).
    pub fn json_error(&mut self) -> Option<&JsonError> {
        self.parse();
        self.json.as_ref().and_then(|r| r.as_ref().err())
    }

    /// The parsed body for changing; the pipeline serializes it once after the stages ran.
    pub fn json_mut(&mut self) -> Option<&mut Value> {
        self.parse();
        self.changed = true;
        self.prompt_bytes = None;
        self.json.as_mut().and_then(|r| r.as_mut().ok())
    }

    /// Whether a stage changed the body.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Forget a change (a stage that rolled it back).
    pub fn mark_unchanged(&mut self) {
        self.changed = false;
    }

    fn parse(&mut self) {
        if self.json.is_none() {
            if let Some(b) = &self.body {
                if !b.is_empty() {
                    self.json = Some(json::parse_object(b));
                }
            }
        }
    }

    /// Bytes of every text the model reads (estimates); the whole body when not JSON.
    pub fn prompt_bytes(&mut self) -> usize {
        if let Some(n) = self.prompt_bytes {
            return n;
        }
        let n = match self.json() {
            Some(v) => crate::api::prompt_bytes(v),
            None => self.body.as_ref().map_or(0, Vec::len),
        };
        self.prompt_bytes = Some(n);
        n
    }

    /// The body to forward: the re-serialized JSON when changed.
    pub fn serialized(&self) -> Option<Vec<u8>> {
        match &self.json {
            Some(Ok(v)) if self.changed => serde_json::to_vec(v).ok(),
            _ => None,
        }
    }

    /// `"stream": true` in the body.
    pub fn stream(&mut self) -> bool {
        self.json().is_some_and(crate::api::is_stream)
    }
}

/// What the response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyKind {
    /// Not known yet.
    #[default]
    Unknown,
    /// Server-sent events.
    Sse,
    /// JSON (or no content type).
    Json,
    /// Anything else.
    Other,
}

/// The response as the stages see it.
#[derive(Debug, Default)]
pub struct Response {
    /// `:status` (0 until known).
    pub status: u32,
    /// All response headers, read once.
    pub headers: HeaderPairs,
    /// Kind of body.
    pub kind: BodyKind,
    /// `content-encoding` other than identity was set by the provider.
    pub encoded: bool,
    /// This response is a local reply sent by a stage of this filter.
    pub local: bool,
    /// The body reached its end (end of stream or trailers).
    pub complete: bool,
    /// Bytes seen.
    pub bytes: usize,
    /// When the first and the last body byte passed.
    pub first_byte: Option<SystemTime>,
    /// When the last body byte passed.
    pub last_byte: Option<SystemTime>,
    /// Stream usage tracking (SSE).
    pub stream: Option<StreamUsage>,
    /// Copy of a JSON body (for usage), up to the cap; `None` after overflow.
    pub copy: Option<Vec<u8>>,
    json: Option<Option<Value>>,
    changed: bool,
}

impl Response {
    /// A response header.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// True for 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The complete JSON body (parsed once from the copy, or the buffered body).
    pub fn json(&mut self) -> Option<&Value> {
        if self.json.is_none() {
            self.json = Some(self.copy.as_deref().and_then(json::parse_lenient).filter(Value::is_object));
        }
        self.json.as_ref().and_then(Option::as_ref)
    }

    /// The JSON body for changing (buffered responses): serialized once by the pipeline.
    pub fn json_mut(&mut self) -> Option<&mut Value> {
        self.json();
        self.changed = true;
        self.json.as_mut().and_then(Option::as_mut)
    }

    /// Whether a stage changed the JSON body.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Forget a change (a stage that asked for `json_mut` and found nothing to change; check
    /// [`Response::changed`] before, so another stage's change is kept).
    pub fn mark_unchanged(&mut self) {
        self.changed = false;
    }

    pub(crate) fn serialized(&self) -> Option<Vec<u8>> {
        match &self.json {
            Some(Some(v)) if self.changed => serde_json::to_vec(v).ok(),
            _ => None,
        }
    }
}

/// One SSE event of a response chunk, with its JSON parsed once.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event as parsed (its `raw` bytes are forwarded unless changed).
    pub sse: SseEvent,
    /// `data` parsed as JSON (`None`: not JSON, e.g. `[DONE]`).
    pub json: Option<Value>,
    dirty: bool,
}

impl Event {
    /// Wrap a parsed SSE event.
    pub fn new(sse: SseEvent) -> Self {
        let json = if sse.is_done() { None } else { json::parse_lenient(sse.data.as_bytes()) };
        Self { sse, json, dirty: false }
    }

    /// A new event from JSON (`name`: the SSE `event:` field).
    pub fn from_json(name: Option<String>, data: Value) -> Self {
        let sse = SseEvent { event: name, data: data.to_string(), ..SseEvent::default() };
        Self { sse, json: Some(data), dirty: true }
    }

    /// The `[DONE]` sentinel.
    pub fn is_done(&self) -> bool {
        self.sse.is_done()
    }

    /// The JSON for changing (the event is re-serialized).
    pub fn json_mut(&mut self) -> Option<&mut Value> {
        self.dirty = true;
        self.json.as_mut()
    }

    /// The bytes to forward.
    pub fn bytes(&self) -> Vec<u8> {
        if !self.dirty {
            return self.sse.raw.clone();
        }
        let data = self.json.as_ref().map_or_else(|| self.sse.data.clone(), Value::to_string);
        SseEvent {
            data,
            event: self.sse.event.clone(),
            id: self.sse.id.clone(),
            retry: self.sse.retry,
            raw: Vec::new(),
        }
        .to_bytes()
    }
}

/// One response body chunk as the stages see it.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Bytes of this chunk (the whole body when buffered; empty for SSE).
    pub bytes: Vec<u8>,
    /// SSE: the complete events in this chunk.
    pub events: Vec<Event>,
    /// The last chunk.
    pub end: bool,
    /// Set by a stage that changed `bytes` (events track their own changes).
    pub bytes_changed: bool,
    /// Set by a stage that removed or added events.
    pub events_changed: bool,
}

/// The per-request state shared by the stages of one filter.
#[derive(Debug, Default)]
pub struct Exchange {
    /// Envoy's context id (logs).
    pub id: u32,
    /// When the request headers arrived.
    pub started: Option<SystemTime>,
    /// The request.
    pub request: Request,
    /// The route's settings (`sluice` route metadata).
    pub route: Rc<Route>,
    /// The response.
    pub response: Response,
    identity: Option<Identity>,
    identity_read: bool,
    model: Option<String>,
    usage: Option<TokenUsage>,
    /// Set by a stage that answered the request itself without a provider (cache hit): later
    /// accounting treats it as a saving, not usage.
    pub served_locally: bool,
    pub(crate) body_use: BodyUse,
    pub(crate) response_use: ResponseUse,
    pub(crate) read_response: bool,
    pub(crate) hold_response: bool,
    pending: Option<u32>,
}

impl Exchange {
    /// A fresh exchange for context `id`.
    pub fn new(id: u32) -> Self {
        Self { id, ..Self::default() }
    }

    /// Ask for the request body (the strongest use of all stages wins).
    pub fn want_body(&mut self, u: BodyUse) {
        self.body_use = self.body_use.max(u);
    }

    /// The body use asked for so far.
    pub fn body_use(&self) -> BodyUse {
        self.body_use
    }

    /// Ask for the response body (the strongest use of all stages wins). Call in the request
    /// headers phase to also ask the provider for an uncompressed answer.
    pub fn want_response(&mut self, u: ResponseUse) {
        self.response_use = self.response_use.max(u);
        if u != ResponseUse::None {
            self.read_response = true;
        }
    }

    /// The response use asked for so far.
    pub fn response_use(&self) -> ResponseUse {
        self.response_use
    }

    /// In `on_response_headers`: hold the response headers until the whole (non-streaming)
    /// body is there, so a stage can still change them once it read the body (e.g. mark a
    /// provider error retriable before the router decides). Implies
    /// `want_response(ResponseUse::Buffer)`; ignored for SSE and for a response that ends with
    /// its headers. Needs Envoy's `allow_on_headers_stop_iteration: true` (Envoy keeps the
    /// header map while the filter holds it); keep it to small bodies (error answers).
    pub fn hold_response_headers(&mut self) {
        self.want_response(ResponseUse::Buffer);
        self.hold_response = true;
    }

    /// Whether a stage asked to hold the response headers.
    pub fn response_headers_held(&self) -> bool {
        self.hold_response
    }

    /// Record the callout this stage waits for (then return `Flow::Wait`).
    pub fn await_callout(&mut self, token: u32) {
        self.pending = Some(token);
    }

    pub(crate) fn take_pending(&mut self) -> Option<u32> {
        self.pending.take()
    }

    /// Set a request header (host and the local copy).
    pub fn set_request_header(&mut self, h: &mut dyn Host, name: &str, value: Option<&[u8]>) {
        h.set_request_header(name, value);
        self.request.headers.retain(|(k, _)| k != name);
        if let Some(v) = value {
            self.request.headers.push((name.to_string(), v.to_vec()));
        }
        if name == ":path" {
            if let Some(v) = value {
                self.request.path = json::lossy(v);
            }
        }
    }

    /// The caller, as auth established it (in this filter, or in a separate auth filter
    /// before it: read once from `sluice.identity` filter state).
    pub fn identity(&mut self, h: &dyn Host) -> Option<&Identity> {
        if self.identity.is_none() && !self.identity_read {
            self.identity_read = true;
            self.identity = keys::filter_state(h, keys::IDENTITY).and_then(|s| Identity::decode(&s));
        }
        self.identity.as_ref()
    }

    /// Establish the caller (auth): kept here and published for separate filters and logs.
    pub fn set_identity(&mut self, h: &mut dyn Host, id: Identity) {
        keys::set_filter_state(h, keys::IDENTITY, &id.encode());
        keys::set_filter_state(h, keys::AUTH_METHOD, &id.method);
        if let Some(u) = &id.user {
            keys::set_filter_state(h, keys::USER, u);
        }
        if let Some(t) = &id.team {
            keys::set_filter_state(h, keys::TEAM, t);
        }
        if let Some(k) = &id.key_id {
            keys::set_filter_state(h, keys::KEY_ID, k);
        }
        self.identity_read = true;
        self.identity = Some(id);
    }

    /// The model the client asked for (after route defaults and enrichment): set by a stage,
    /// else the body's `model`, else the route's `default_model`.
    pub fn model(&mut self) -> Option<String> {
        if self.model.is_some() {
            return self.model.clone();
        }
        self.request
            .json()
            .and_then(crate::api::model)
            .map(str::to_string)
            .or_else(|| self.route.str("default_model").map(str::to_string))
    }

    /// Set the requested model (a stage that changed it) and publish it.
    pub fn set_model(&mut self, h: &mut dyn Host, model: &str) {
        keys::set_filter_state(h, keys::REQUESTED_MODEL, model);
        self.model = Some(model.to_string());
    }

    /// The usage of this exchange once the response ended: the provider's, else another
    /// filter's published record, else an estimate from the prompt and the output seen.
    pub fn usage(&mut self, h: &dyn Host) -> Option<TokenUsage> {
        if let Some(u) = self.usage {
            return Some(u);
        }
        let reported = match &self.response.stream {
            Some(s) if s.complete_usage() => s.usage(),
            Some(_) => None,
            None => self.response.json().and_then(crate::usage::usage_from_body),
        };
        let u = match reported {
            Some(u) => u,
            None => match keys::filter_state(h, keys::USAGE).and_then(|s| TokenUsage::decode(&s)) {
                Some(u) if !u.estimated => u,
                _ => self.estimate(),
            },
        };
        self.usage = Some(u);
        Some(u)
    }

    fn estimate(&mut self) -> TokenUsage {
        let prompt = self.request.prompt_bytes();
        match &self.response.stream {
            Some(s) => s.usage_or_estimate(prompt),
            None => {
                let out = match self.response.json() {
                    Some(v) => crate::api::response_text_bytes(v),
                    None => self.response.bytes,
                };
                crate::usage::estimate_usage(prompt, out)
            }
        }
    }

    /// Provider-reported usage (not an estimate) seen so far in this filter.
    pub fn reported_usage(&mut self) -> Option<TokenUsage> {
        match &self.response.stream {
            Some(s) => s.usage().filter(|_| s.complete_usage()),
            None => self.response.json().and_then(crate::usage::usage_from_body),
        }
    }

    /// Whether the provider produced any output (bytes of a 2xx body).
    pub fn produced_output(&self) -> bool {
        self.response.ok() && !self.response.local && self.response.bytes > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;

    #[test]
    fn identity_round_trips_through_filter_state() {
        let mut h = FakeHost::default();
        let mut x = Exchange::new(1);
        let id = Identity {
            method: "jwt".into(),
            user: Some("alice".into()),
            team: Some("ml".into()),
            ..Identity::default()
        };
        x.set_identity(&mut h, id.clone());
        assert_eq!(h.state(keys::USER).as_deref(), Some("alice"));
        let mut other = Exchange::new(2);
        assert_eq!(other.identity(&h), Some(&id));
    }

    #[test]
    fn request_json_is_parsed_once_and_serialized_when_changed() {
        let mut x = Exchange::new(1);
        x.request.body = Some(br#"{"model":"a","messages":[{"role":"user","content":"hello"}]}"#.to_vec());
        assert_eq!(x.model().as_deref(), Some("a"));
        assert_eq!(x.request.prompt_bytes(), 5);
        assert!(x.request.serialized().is_none());
        x.request.json_mut().unwrap()["model"] = "b".into();
        assert!(String::from_utf8(x.request.serialized().unwrap()).unwrap().contains("\"b\""));
        let mut d = Exchange::new(2);
        d.request.body = Some(br#"{"model":"a","model":"b"}"#.to_vec());
        assert_eq!(d.request.json_error(), Some(&JsonError::DuplicateKey("model".into())));
    }

    #[test]
    fn usage_prefers_reported_then_published_then_estimate() {
        let h = FakeHost::default();
        let mut x = Exchange::new(1);
        x.request.body = Some(br#"{"messages":[{"role":"user","content":"12345678"}]}"#.to_vec());
        x.response.copy = Some(br#"{"choices":[{"message":{"content":"abcd"}}]}"#.to_vec());
        let u = x.usage(&h).unwrap();
        assert!(u.estimated);
        assert_eq!((u.input, u.output), (2, 1));
        let mut h = FakeHost::default();
        keys::set_filter_state(&mut h, keys::USAGE, &TokenUsage::reported(5, 6).encode());
        let mut y = Exchange::new(2);
        y.response.stream = Some(StreamUsage::new(Api::Chat));
        assert_eq!(y.usage(&h).unwrap(), TokenUsage::reported(5, 6));
    }
}
