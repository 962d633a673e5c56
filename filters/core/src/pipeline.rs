//! The pipeline: runs a list of stages over one exchange, callback by callback, and is the
//! only code that decides what Envoy is told (continue, pause, reply). Pure Rust over
//! [`Host`], so native tests drive every path with `FakeHost`; `crate::glue` maps proxy-wasm
//! callbacks onto it.
//!
//! Request: headers are read once; each stage's `on_request_headers` runs in order. If any
//! stage asked for the body, the headers are held (`allow_on_headers_stop_iteration`) and the
//! body buffered until its end — **end of stream or request trailers**, whichever ends it —
//! then each stage's `on_request` runs and a changed body is written back once. A stage may
//! wait for a callout in either phase; the stream stays paused until it answers and the
//! pipeline resumes it (or replies). A body with a duplicate JSON key is refused here, for
//! every stage, before any stage reads it.
//!
//! Response: headers are read once; stages run in reverse order. Bodies are never held
//! except when a stage needs a whole non-streaming body (and the headers only when a stage
//! asks, `Exchange::hold_response_headers`); SSE is parsed event by event and a
//! changed event re-serialized; **response trailers end the body** too. A local reply sent by
//! stage `i` passes through stages `0..i` only (as it would through earlier Envoy filters).

use crate::api::Api;
use crate::errors::LocalReply;
use crate::exchange::{BodyKind, BodyUse, Chunk, Event, Exchange, ResponseUse};
use crate::host::Host;
use crate::json::{self, JsonError};
use crate::keys;
use crate::route::RouteCache;
use crate::sse::SseParser;
use crate::stage::{CalloutResponse, Flow, Stage};
use crate::usage::StreamUsage;
use std::cell::RefCell;
use std::rc::Rc;

/// What to tell Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Let the data through.
    Continue,
    /// Hold it (buffer, or wait for a callout, or after a local reply).
    Pause,
}

/// Largest JSON response body copied for usage (larger ones are estimated).
pub const MAX_RESPONSE_COPY: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Running `on_request_headers`.
    Headers,
    /// Headers done, waiting for the end of the body.
    AwaitBody,
    /// Running `on_request`.
    Request,
    /// Request forwarded.
    Forwarded,
}

/// One stage with what the pipeline needs to know about its plugin.
pub struct Slot {
    /// The stage.
    pub stage: Box<dyn Stage>,
    /// The plugin's name (error bodies).
    pub name: &'static str,
    /// The plugin's body limit.
    pub limit: Option<usize>,
    /// The plugin holds request headers until its decision (`Plugin::holds_headers`).
    pub hold: bool,
    /// The plugin's filter may publish `sluice.model` (`Plugin::publishes_model`).
    pub publish_model: bool,
}

impl Slot {
    /// The slot of one plugin's stage for one request.
    pub fn of(p: &dyn crate::stage::Plugin) -> Self {
        Self {
            stage: p.stage(),
            name: p.name(),
            limit: p.body_limit(),
            hold: p.holds_headers(),
            publish_model: p.publishes_model(),
        }
    }
}

/// The state of one HTTP stream through the stages.
pub struct Pipeline {
    slots: Vec<Slot>,
    /// The shared exchange.
    pub x: Exchange,
    routes: Rc<RefCell<RouteCache>>,
    phase: Phase,
    cursor: usize,
    /// Stage waiting for a callout, and the token.
    waiting: Option<(usize, u32)>,
    waiting_response: bool,
    body_size: usize,
    body_done: bool,
    replied: Option<usize>,
    resp_started: bool,
    resp_buffer: bool,
    resp_modify: bool,
    sse: Option<SseParser>,
    replaced: Option<LocalReply>,
    published_usage: bool,
    resp_size: usize,
    held: bool,
    done: bool,
}

impl Pipeline {
    /// A pipeline for context `id` over `slots`.
    pub fn new(id: u32, slots: Vec<Slot>, routes: Rc<RefCell<RouteCache>>) -> Self {
        Self {
            slots,
            x: Exchange::new(id),
            routes,
            phase: Phase::Headers,
            cursor: 0,
            waiting: None,
            waiting_response: false,
            body_size: 0,
            body_done: false,
            replied: None,
            resp_started: false,
            resp_buffer: false,
            resp_modify: false,
            sse: None,
            replaced: None,
            published_usage: false,
            resp_size: 0,
            held: false,
            done: false,
        }
    }

    /// A pipeline that refuses every request with 500 (no valid configuration: unreachable,
    /// since Envoy refuses a filter whose `on_configure` failed, but never a silent pass).
    pub fn misconfigured(id: u32, name: &'static str) -> Self {
        let slots =
            vec![Slot { stage: Box::new(Misconfigured(name)), name, limit: None, hold: true, publish_model: false }];
        Self::new(id, slots, Rc::new(RefCell::new(RouteCache::default())))
    }

    fn limit(&self) -> Option<(usize, &'static str)> {
        self.slots.iter().filter_map(|s| s.limit.map(|l| (l, s.name))).min_by_key(|(l, _)| *l)
    }

    fn reply(&mut self, h: &mut dyn Host, i: usize, r: &LocalReply) -> Act {
        log::debug!("{} #{}: local reply {}", self.slots.get(i).map_or("?", |s| s.name), self.x.id, r.status);
        h.send_reply(r);
        self.replied = Some(i);
        self.waiting = None;
        self.x.response.local = true;
        Act::Pause
    }

    fn too_large(&mut self, h: &mut dyn Host) -> Act {
        let (limit, name) = self.limit().unwrap_or((0, "gateway"));
        let i = self.slots.iter().position(|s| s.name == name).unwrap_or(0);
        self.reply(h, i, &LocalReply::body_too_large(name, limit))
    }

    // ----- request ---------------------------------------------------------------------------

    /// Request headers.
    pub fn on_request_headers(&mut self, h: &mut dyn Host, end_of_stream: bool) -> Act {
        let now = h.now();
        self.x.started = Some(now);
        let headers = h.request_headers();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| json::lossy(v)).unwrap_or_default();
        self.x.request.method = get(":method");
        self.x.request.path = get(":path");
        self.x.request.api = Api::from_path(&self.x.request.path);
        self.x.request.headers = headers;
        self.x.request.no_body = end_of_stream;
        self.body_done = end_of_stream;
        if end_of_stream {
            self.x.request.body = Some(Vec::new());
        }
        // A busy cache only costs a re-read: an empty route would switch route policies off.
        self.x.route = match self.routes.try_borrow_mut() {
            Ok(mut c) => c.lookup(h),
            Err(_) => RouteCache::default().lookup(h),
        };
        // Route metadata `sluice.disabled_stages: [prompt_enrichment, ...]` switches stages off
        // on a route (the composed filter's form of Envoy's per-filter `disabled: true`).
        if let Some(off) = self.x.route.get("disabled_stages").and_then(serde_json::Value::as_array) {
            let off: Vec<String> = off.iter().filter_map(|v| v.as_str()).map(|v| v.replace('_', "-")).collect();
            self.slots.retain(|s| !off.iter().any(|o| o == s.name));
        }
        self.phase = Phase::Headers;
        self.cursor = 0;
        // The headers are held until a phase lets them go (a body rewrite then sets the new
        // content-length, also when the body completed while a headers-phase callout was out).
        self.held = true;
        self.run_request(h)
    }

    /// Run the request phases from the cursor until a stage waits or replies, or the request
    /// is ready to go on.
    fn run_request(&mut self, h: &mut dyn Host) -> Act {
        loop {
            match self.phase {
                Phase::Headers => {
                    while let Some(slot) = self.slots.get_mut(self.cursor) {
                        let flow = slot.stage.on_request_headers(&mut self.x, h);
                        if let Some(act) = self.handle(h, flow) {
                            return act;
                        }
                        self.cursor += 1;
                    }
                    if let Some(act) = self.after_headers(h) {
                        return act;
                    }
                }
                Phase::AwaitBody => return Act::Pause,
                Phase::Request => {
                    if self.cursor == 0 {
                        if let Some(act) = self.check_body(h) {
                            return act;
                        }
                    }
                    while let Some(slot) = self.slots.get_mut(self.cursor) {
                        let flow = slot.stage.on_request(&mut self.x, h);
                        if let Some(act) = self.handle(h, flow) {
                            return act;
                        }
                        self.cursor += 1;
                    }
                    if let Some(new) = self.x.request.serialized() {
                        h.set_request_body(0, self.body_size, &new);
                        if self.held {
                            // Headers are still held: give the provider the new length.
                            let n = new.len().to_string();
                            self.x.set_request_header(h, "content-length", Some(n.as_bytes()));
                        }
                        self.x.request.body = Some(new);
                        self.x.request.mark_unchanged();
                    }
                    if self.x.body_use() >= BodyUse::Json && self.slots.iter().all(|s| s.publish_model) {
                        // For access logs, traces and separate filters (same value: cheap).
                        if let Some(m) = self.x.model() {
                            keys::set_filter_state(h, keys::REQUESTED_MODEL, &m);
                        }
                    }
                    self.phase = Phase::Forwarded;
                }
                Phase::Forwarded => return Act::Continue,
            }
        }
    }

    /// `None`: go on; `Some(act)`: stop with `act`.
    fn handle(&mut self, h: &mut dyn Host, flow: Flow) -> Option<Act> {
        match flow {
            Flow::Continue => None,
            Flow::Wait => match self.x.take_pending() {
                Some(token) => {
                    self.waiting = Some((self.cursor, token));
                    Some(Act::Pause)
                }
                None => {
                    // A stage that waits without a callout would hang the stream: refuse.
                    let name = self.slots.get(self.cursor).map_or("gateway", |s| s.name);
                    log::error!("{name} #{}: waited without a callout; refusing the request", self.x.id);
                    let i = self.cursor;
                    Some(self.reply(h, i, &LocalReply::internal(name)))
                }
            },
            Flow::Reply(r) => {
                let i = self.cursor;
                Some(self.reply(h, i, &r))
            }
        }
    }

    /// After every stage saw the headers: hold for the body, or decide now.
    fn after_headers(&mut self, h: &mut dyn Host) -> Option<Act> {
        let body_use = self.x.body_use();
        if self.x.read_response && self.x.request.api.is_model_call() {
            // A compressed answer cannot be read: ask for identity encoding.
            self.x.set_request_header(h, "accept-encoding", None);
        }
        self.cursor = 0;
        if body_use == BodyUse::None || self.body_done {
            self.phase = Phase::Request;
            if !self.body_done {
                // No stage reads the body: it streams through; `on_request` runs now.
                self.x.request.body = None;
            }
            return None;
        }
        let declared = self.x.request.header_str("content-length").and_then(|v| v.trim().parse::<usize>().ok());
        if let (Some(n), Some((limit, _))) = (declared, self.limit()) {
            if n > limit {
                return Some(self.too_large(h));
            }
        }
        self.phase = Phase::AwaitBody;
        self.held = self.slots.iter().any(|s| s.hold);
        if body_use == BodyUse::Modify && !self.held {
            // The headers go on before the body is known: its length may change.
            self.x.set_request_header(h, "content-length", None);
        }
        if self.held {
            return Some(Act::Pause);
        }
        // No stage needs the headers held: they go on, the body waits.
        Some(Act::Continue)
    }

    /// The body is complete: refuse what no stage may read.
    fn check_body(&mut self, h: &mut dyn Host) -> Option<Act> {
        // Whatever the content type says: a provider may parse the bytes as JSON anyway.
        if self.x.body_use() < BodyUse::Json {
            return None;
        }
        if let Some(JsonError::DuplicateKey(path)) = self.x.request.json_error().cloned() {
            let r = LocalReply::openai_error(
                400,
                "invalid_request_error",
                "duplicate_json_key",
                &format!("request body has the key {path:?} twice; send each key once"),
            );
            return Some(self.reply(h, 0, &r));
        }
        None
    }

    /// A request body chunk (`size`: everything buffered so far).
    pub fn on_request_body(&mut self, h: &mut dyn Host, size: usize, end_of_stream: bool) -> Act {
        if self.replied.is_some() {
            return Act::Pause;
        }
        match self.phase {
            Phase::Forwarded => Act::Continue,
            Phase::Request => Act::Pause, // waiting in `on_request`: body already complete
            Phase::Headers | Phase::AwaitBody => {
                self.body_size = size;
                if self.limit().is_some_and(|(l, _)| size > l) {
                    return self.too_large(h);
                }
                if !end_of_stream {
                    return Act::Pause;
                }
                self.end_of_body(h)
            }
        }
    }

    /// Request trailers: the end of the body, exactly like end of stream.
    pub fn on_request_trailers(&mut self, h: &mut dyn Host) -> Act {
        if self.replied.is_some() {
            return Act::Pause;
        }
        match self.phase {
            Phase::Forwarded => Act::Continue,
            Phase::Request => Act::Pause,
            Phase::Headers | Phase::AwaitBody => self.end_of_body(h),
        }
    }

    fn end_of_body(&mut self, h: &mut dyn Host) -> Act {
        self.body_done = true;
        self.x.request.body = Some(h.request_body(0, self.body_size).unwrap_or_default());
        if self.phase == Phase::AwaitBody {
            self.phase = Phase::Request;
            self.cursor = 0;
            return self.run_request(h);
        }
        Act::Pause // still in the headers phase (a callout is out): it continues from there
    }

    // ----- callouts --------------------------------------------------------------------------

    /// A callout answered (HTTP: `grpc_status` None; gRPC: `status` None). The glue reads
    /// nothing itself: the pipeline reads headers/body only for the stage that waits.
    pub fn on_callout(&mut self, h: &mut dyn Host, token: u32, grpc_status: Option<u32>, body_size: usize) {
        let Some((i, t)) = self.waiting else { return };
        if t != token {
            return;
        }
        self.waiting = None;
        let mut r = CalloutResponse { token, grpc_status, ..CalloutResponse::default() };
        match grpc_status {
            None => {
                r.headers = h.call_response_headers();
                r.status = r
                    .headers
                    .iter()
                    .find(|(k, _)| k == ":status")
                    .and_then(|(_, v)| json::lossy(v).trim().parse().ok());
                r.body = if body_size > 0 { h.call_response_body(body_size) } else { None };
            }
            Some(0) => r.body = h.grpc_response_body(body_size),
            Some(_) => {}
        }
        let Some(slot) = self.slots.get_mut(i) else { return };
        let flow = slot.stage.on_callout(&mut self.x, h, r);
        self.cursor = i;
        if self.waiting_response {
            self.waiting_response = false;
            match flow {
                Flow::Wait => {
                    if let Some(token) = self.x.take_pending() {
                        self.waiting = Some((i, token));
                        self.waiting_response = true;
                        return;
                    }
                    h.resume_response();
                }
                _ => h.resume_response(),
            }
            return;
        }
        if let Some(_act) = self.handle(h, flow) {
            return; // waiting again, or replied: nothing to resume
        }
        self.cursor = i + 1;
        if self.run_request(h) == Act::Continue {
            h.resume_request();
        }
    }

    // ----- response --------------------------------------------------------------------------

    /// Stages that see the response: all of them, or those before the one that replied.
    fn response_stages(&self) -> usize {
        self.replied.unwrap_or(self.slots.len())
    }

    /// Response headers.
    pub fn on_response_headers(&mut self, h: &mut dyn Host, end_of_stream: bool) -> Act {
        self.resp_started = true;
        let r = &mut self.x.response;
        r.headers = h.response_headers();
        let get = |n: &str| r.headers.iter().find(|(k, _)| k == n).map(|(_, v)| json::lossy(v));
        r.status = get(":status").and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let ct = get("content-type").unwrap_or_default().to_ascii_lowercase();
        r.kind = if ct.starts_with("text/event-stream") {
            BodyKind::Sse
        } else if ct.is_empty() || ct.contains("json") {
            BodyKind::Json
        } else {
            BodyKind::Other
        };
        r.encoded = get("content-encoding").is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
        let n = self.response_stages();
        for i in (0..n).rev() {
            let Some(slot) = self.slots.get_mut(i) else { continue };
            match slot.stage.on_response_headers(&mut self.x, h) {
                Flow::Continue | Flow::Wait => {}
                Flow::Reply(reply) => {
                    self.replace(h, reply);
                    break;
                }
            }
        }
        if self.replaced.is_none() {
            let api = self.x.request.api;
            let use_ = self.x.response_use();
            if use_ >= ResponseUse::Modify {
                h.set_response_header("content-length", None);
            }
            self.resp_modify = use_ >= ResponseUse::Modify;
            if use_ >= ResponseUse::Track {
                match self.x.response.kind {
                    BodyKind::Sse => {
                        self.sse = Some(SseParser::new());
                        let mut s = StreamUsage::new(api);
                        s.collect_text(MAX_RESPONSE_COPY);
                        self.x.response.stream = Some(s);
                    }
                    _ => {
                        self.x.response.copy = Some(Vec::new());
                        self.resp_buffer = use_ == ResponseUse::Buffer;
                    }
                }
            }
        }
        if end_of_stream {
            self.x.response.complete = true;
            return self.run_response_body(h, Chunk { end: true, ..Chunk::default() }, 0);
        }
        if self.x.hold_response {
            if self.resp_buffer && self.replaced.is_none() {
                // Held until the end of the body: stages may still change the headers then.
                return Act::Pause;
            }
            self.x.hold_response = false;
        }
        Act::Continue
    }

    /// A stage refused the provider's answer in its headers: replace it in place.
    fn replace(&mut self, h: &mut dyn Host, reply: LocalReply) {
        h.set_response_header(":status", Some(reply.status.to_string().as_bytes()));
        h.set_response_header("content-length", None);
        h.set_response_header("content-encoding", None);
        for (k, v) in &reply.headers {
            h.set_response_header(k, Some(v.as_bytes()));
        }
        self.x.response.status = reply.status;
        self.replaced = Some(reply);
    }

    /// A response body chunk (`size`: this chunk, or everything buffered so far).
    pub fn on_response_body(&mut self, h: &mut dyn Host, size: usize, end_of_stream: bool) -> Act {
        if let Some(reply) = &self.replaced {
            let out = if end_of_stream { reply.body.clone() } else { Vec::new() };
            h.set_response_body(0, size, &out);
            return Act::Continue;
        }
        if self.x.response.complete {
            return Act::Continue;
        }
        self.resp_size = size;
        let now = h.now();
        if size > 0 {
            self.x.response.first_byte.get_or_insert(now);
            self.x.response.last_byte = Some(now);
        }
        if self.x.response_use() == ResponseUse::None {
            self.x.response.bytes = self.x.response.bytes.saturating_add(size);
            if end_of_stream {
                self.x.response.complete = true;
                return self.run_response_body(h, Chunk { end: true, ..Chunk::default() }, size);
            }
            return Act::Continue;
        }
        if self.resp_buffer && !end_of_stream {
            return Act::Pause;
        }
        let bytes = if size > 0 { h.response_body(0, size).unwrap_or_default() } else { Vec::new() };
        if !self.resp_buffer {
            self.x.response.bytes = self.x.response.bytes.saturating_add(bytes.len());
        } else {
            self.x.response.bytes = bytes.len();
        }
        if end_of_stream {
            self.x.response.complete = true;
        }
        self.chunk(h, bytes, end_of_stream, size)
    }

    /// Response trailers: the end of the body.
    pub fn on_response_trailers(&mut self, h: &mut dyn Host) -> Act {
        let buffered = self.resp_size;
        if self.x.response.complete || self.replaced.is_some() {
            return Act::Continue;
        }
        self.x.response.complete = true;
        if self.x.response_use() == ResponseUse::None {
            return self.run_response_body(h, Chunk { end: true, ..Chunk::default() }, 0);
        }
        let bytes = if self.resp_buffer { h.response_body(0, buffered).unwrap_or_default() } else { Vec::new() };
        if self.resp_buffer {
            self.x.response.bytes = bytes.len();
        }
        let size = bytes.len();
        self.chunk(h, bytes, true, size)
    }

    fn chunk(&mut self, h: &mut dyn Host, bytes: Vec<u8>, end: bool, size: usize) -> Act {
        let mut chunk = Chunk { end, ..Chunk::default() };
        if let Some(parser) = self.sse.as_mut() {
            let mut raw = parser.feed(&bytes);
            if end {
                raw.extend(parser.finish());
            }
            for ev in raw {
                let ev = Event::new(ev);
                if let Some(s) = self.x.response.stream.as_mut() {
                    s.observe(ev.json.as_ref(), ev.is_done());
                }
                chunk.events.push(ev);
            }
            if !self.resp_modify {
                chunk.bytes = bytes;
            }
        } else {
            if let Some(copy) = self.x.response.copy.as_mut() {
                if copy.len().saturating_add(bytes.len()) > MAX_RESPONSE_COPY {
                    self.x.response.copy = None;
                } else {
                    copy.extend_from_slice(&bytes);
                }
            }
            chunk.bytes = bytes;
        }
        self.run_response_body(h, chunk, size)
    }

    fn run_response_body(&mut self, h: &mut dyn Host, mut chunk: Chunk, size: usize) -> Act {
        let n = self.response_stages();
        let mut act = Act::Continue;
        for i in (0..n).rev() {
            let Some(slot) = self.slots.get_mut(i) else { continue };
            match slot.stage.on_response_body(&mut self.x, h, &mut chunk) {
                Flow::Continue => {}
                Flow::Wait => {
                    if let Some(token) = self.x.take_pending() {
                        self.waiting = Some((i, token));
                        self.waiting_response = true;
                        act = Act::Pause;
                    }
                }
                Flow::Reply(reply) => {
                    // Only a buffered (whole) body can still be replaced.
                    if self.resp_buffer || chunk.end && self.x.response.bytes == chunk.bytes.len() {
                        h.set_response_body(0, size, &reply.body);
                        self.replaced = Some(reply);
                        return Act::Continue;
                    }
                    log::warn!("{} #{}: cannot replace a streamed response; ignored", slot.name, self.x.id);
                }
            }
        }
        if chunk.end {
            self.publish_usage(h);
        }
        if self.sse.is_some() && self.resp_modify {
            let mut out = Vec::with_capacity(size);
            for ev in &chunk.events {
                out.extend(ev.bytes());
            }
            if chunk.end {
                if let Some(p) = self.sse.as_mut() {
                    out.extend(p.take_pending());
                }
            }
            let unchanged = !chunk.events_changed && out.len() == size && h_body_equal(&chunk, &out);
            if !unchanged {
                h.set_response_body(0, size, &out);
            }
        } else if let Some(new) = self.x.response.serialized() {
            h.set_response_body(0, size, &new);
        } else if chunk.bytes_changed {
            h.set_response_body(0, size, &chunk.bytes);
        }
        act
    }

    fn publish_usage(&mut self, h: &mut dyn Host) {
        if self.published_usage || self.x.response.local {
            return;
        }
        self.published_usage = true;
        if let Some(u) = self.x.reported_usage() {
            keys::set_filter_state(h, keys::USAGE, &u.encode());
        }
    }

    /// Access-log time: every stage that saw the request hears that the stream is over.
    pub fn on_log(&mut self, h: &mut dyn Host) {
        if self.done {
            return;
        }
        self.done = true;
        for slot in &mut self.slots {
            slot.stage.on_done(&mut self.x, h);
        }
    }
}

/// Whether the re-serialized events equal what arrived (events all unchanged).
fn h_body_equal(chunk: &Chunk, out: &[u8]) -> bool {
    let raw: usize = chunk.events.iter().map(|e| e.sse.raw.len()).sum();
    raw == out.len() && chunk.events.iter().all(|e| e.bytes() == e.sse.raw)
}

/// The stage of a filter without a valid configuration: fail closed.
struct Misconfigured(&'static str);

impl Stage for Misconfigured {
    fn on_request_headers(&mut self, _x: &mut Exchange, _h: &mut dyn Host) -> Flow {
        Flow::Reply(LocalReply::misconfigured(self.0))
    }
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
