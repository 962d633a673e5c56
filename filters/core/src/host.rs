//! The host operations filter logic needs, as a trait.
//!
//! Every stage and the pipeline are written against [`Host`]; on wasm32 the real adapter
//! (`proxy_host::ProxyHost`) calls the proxy-wasm ABI directly and turns every host status
//! into an `Option`/`Result` (the SDK's `hostcalls` functions panic on an unexpected status,
//! which traps the VM). Native tests use [`FakeHost`], which behaves like Envoy 1.40 in the
//! corners that matter (each checked by an e2e probe, `tests/e2e/test_host_probe.py`):
//! - an empty shared-data value reads as `(None, Some(cas))`, a missing key as `(None, None)`,
//!   and a write to a missing key ignores the CAS token;
//! - response headers can be read only while the response headers are being processed (in a
//!   body or trailers callback Envoy answers `BadArgument`), request headers can be changed
//!   only before they were forwarded;
//! - a local reply passes through the replying filter's own response callbacks;
//! - response headers a filter holds (its headers callback paused, with
//!   `allow_on_headers_stop_iteration: true`) stay readable and changeable in its body
//!   callbacks until it continues (`FakeHost::resp_headers_held`).
//!
//! [`CountingHost`] wraps a host and counts the calls that return a value, the expensive kind
//! in V8 (≈ 2–3.5 µs each, see `docs/benchmarks.md`); tests hold each filter to a budget.
//! It also records property (filter-state) writes: cheaper, but a composed request makes
//! enough of them that the gateway keeps a budget for those too.

use crate::errors::LocalReply;
use crate::metrics::MetricKind;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

/// Why a shared-data write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedDataError {
    /// Someone else wrote since our read: read again and retry.
    CasMismatch,
    /// Any other host failure.
    Failed,
}

/// Header pairs as Envoy hands them over: lowercase names, raw values, repeats kept.
pub type HeaderPairs = Vec<(String, Vec<u8>)>;

/// Host operations available to a filter.
pub trait Host {
    /// All request headers (pseudo-headers included), in one call.
    fn request_headers(&self) -> HeaderPairs;
    /// One request header (for the upstream role's rare single reads).
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Set (replace) a request header; `None` removes it.
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>);
    /// All response headers, in one call (only during response headers).
    fn response_headers(&self) -> HeaderPairs;
    /// Set (replace) a response header; `None` removes it.
    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>);
    /// Bytes `[start, start+size)` of the buffered request body.
    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>>;
    /// Replace `[start, start+size)` of the request body with `data`.
    fn set_request_body(&mut self, start: usize, size: usize, data: &[u8]);
    /// Bytes of the current response body chunk (or buffered body).
    fn response_body(&self, start: usize, size: usize) -> Option<Vec<u8>>;
    /// Replace `[start, start+size)` of the response body with `data`.
    fn set_response_body(&mut self, start: usize, size: usize, data: &[u8]);
    /// Send a local reply instead of forwarding.
    fn send_reply(&mut self, reply: &LocalReply);
    /// Resume a request paused in a callout.
    fn resume_request(&mut self);
    /// Resume a response paused in a callout.
    fn resume_response(&mut self);
    /// A stream property such as `["xds","route_name"]`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Write a property (filter state when the path is one `sluice.*` segment).
    fn set_property(&mut self, path: &[&str], value: &[u8]);
    /// Wall-clock time as the host sees it.
    fn now(&self) -> SystemTime;
    /// An environment variable passed to the VM (`vm_config.environment_variables`).
    fn env_var(&self, name: &str) -> Option<String>;
    /// Shared data value and its CAS token (see the module docs for Envoy's corners).
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Write shared data; with `cas`, only if nobody wrote since that read.
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedDataError>;
    /// Register a shared queue this VM consumes (root contexts).
    fn register_queue(&mut self, name: &str) -> Option<u32>;
    /// Find a queue by VM id and name.
    fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32>;
    /// Add an item to a queue.
    fn enqueue(&mut self, queue: u32, data: &[u8]) -> bool;
    /// Take the next item of a queue.
    fn dequeue(&mut self, queue: u32) -> Option<Vec<u8>>;
    /// Define a metric; `None` if the host refused.
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32>;
    /// Add to a counter or gauge.
    fn increment_metric(&mut self, id: u32, by: i64);
    /// Record a histogram value.
    fn record_metric(&mut self, id: u32, value: u64);
    /// Start an HTTP callout to an Envoy cluster; returns its token.
    fn dispatch_http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Option<u32>;
    /// Headers of the callout response being delivered.
    fn call_response_headers(&self) -> HeaderPairs;
    /// The callout response body being delivered.
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Start a unary gRPC call to an Envoy cluster; returns its token.
    fn dispatch_grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Option<u32>;
    /// The gRPC response message being delivered.
    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// The plugin configuration (root context, `on_configure`).
    fn plugin_config(&self) -> Vec<u8>;
    /// Ask for `on_tick` every `period` (root context).
    fn set_tick_period(&mut self, period: Duration);
    /// Call a host extension function by name (`proxy_call_foreign_function`), e.g. Envoy's
    /// `clear_route_cache`. `None`: the host does not know the function or it failed;
    /// `Some(result)` otherwise (often empty).
    fn call_foreign_function(&mut self, name: &str, args: &[u8]) -> Option<Vec<u8>>;
}

/// Foreign functions Envoy 1.40 registers for wasm filters (the fake host knows these).
pub const ENVOY_FOREIGN_FUNCTIONS: &[&str] =
    &["clear_route_cache", "set_envoy_filter_state", "declare_property", "compress", "uncompress"];

/// Lossy UTF-8 view of a header value.
pub fn header_str(v: Option<Vec<u8>>) -> Option<String> {
    v.map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Which callback the fake host is in (Envoy allows some calls only in some of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Root context (configure, tick, queue).
    Root,
    /// Request headers callback.
    #[default]
    RequestHeaders,
    /// Request body or trailers callback (headers held).
    RequestBody,
    /// A callout answered while the request is paused.
    Callout,
    /// Response headers callback.
    ResponseHeaders,
    /// Response body or trailers callback.
    ResponseBody,
    /// Access-log time.
    Log,
}

/// A callout recorded by [`FakeHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCall {
    /// Envoy cluster.
    pub cluster: String,
    /// Request headers (HTTP) or `[(":service", s), (":method", m)]` (gRPC).
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Option<Vec<u8>>,
    /// Timeout asked for.
    pub timeout: Duration,
}

/// An in-memory host for native tests: set inputs, run the filter, inspect what it did.
#[derive(Debug, Clone, Default)]
pub struct FakeHost {
    /// The callback being simulated.
    pub phase: Phase,
    /// Request headers (lowercase names).
    pub req_headers: HeaderPairs,
    /// Request headers were forwarded (changes are refused, like Envoy).
    pub req_headers_sent: bool,
    /// Response headers (lowercase names).
    pub resp_headers: HeaderPairs,
    /// Request body.
    pub req_body: Vec<u8>,
    /// Current response body chunk (or buffer).
    pub resp_body: Vec<u8>,
    /// Properties by joined path (`a/b/c`).
    pub properties: HashMap<String, Vec<u8>>,
    /// Local replies sent, in order.
    pub replies: Vec<LocalReply>,
    /// `resume_request` / `resume_response` calls.
    pub resumed_requests: u32,
    /// `resume_response` calls.
    pub resumed_responses: u32,
    /// Current time.
    pub time: Option<SystemTime>,
    /// Shared data: value and version.
    pub shared: HashMap<String, (Vec<u8>, u32)>,
    /// Shared-data version counter (Envoy's is process-wide).
    pub shared_version: u32,
    /// Shared-data writes made (to count CAS rounds).
    pub shared_writes: u32,
    /// Queues by id: name and items.
    pub queues: Vec<(String, VecDeque<Vec<u8>>)>,
    /// Metric definitions: id -> (kind, name).
    pub metric_defs: Vec<(MetricKind, String)>,
    /// Metric values by id (counters and gauges add; histograms keep the last sample).
    pub metric_values: HashMap<u32, i64>,
    /// Histogram samples by id.
    pub histogram_samples: HashMap<u32, Vec<u64>>,
    /// Callouts dispatched, in order (HTTP and gRPC).
    pub calls: Vec<FakeCall>,
    /// When true, dispatching a callout fails.
    pub fail_calls: bool,
    /// Headers of the callout response being delivered.
    pub call_resp_headers: HeaderPairs,
    /// Body of the callout (or gRPC) response being delivered.
    pub call_resp_body: Vec<u8>,
    /// Environment variables.
    pub env: HashMap<String, String>,
    /// Plugin configuration.
    pub config: Vec<u8>,
    /// Tick period asked for.
    pub tick: Option<Duration>,
    /// Calls the real host would refuse (with why); tests assert this stays empty.
    pub refused: Vec<String>,
    /// The response headers callback paused (headers held): Envoy keeps the header map, so
    /// the body callbacks may still read and change it. Tests set it as the real host would.
    pub resp_headers_held: bool,
    /// Foreign functions called, in order: name and arguments.
    pub foreign_calls: Vec<(String, Vec<u8>)>,
}

impl FakeHost {
    /// A fake host with the given request headers.
    pub fn with_request_headers(headers: &[(&str, &str)]) -> Self {
        Self {
            req_headers: headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())).collect(),
            ..Self::default()
        }
    }

    /// Set a property for `path`.
    pub fn set_prop(&mut self, path: &[&str], value: &str) {
        self.properties.insert(path.join("/"), value.as_bytes().to_vec());
    }

    /// A property as a string.
    pub fn prop(&self, path: &[&str]) -> Option<String> {
        self.properties.get(&path.join("/")).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// A filter-state value written by a filter (`sluice.*` key).
    pub fn state(&self, key: &str) -> Option<String> {
        self.prop(&[key])
    }

    /// A request header as a string.
    pub fn req_header(&self, name: &str) -> Option<String> {
        get_header(&self.req_headers, name).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// A response header as a string (whatever the phase).
    pub fn resp_header(&self, name: &str) -> Option<String> {
        get_header(&self.resp_headers, name).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// The value of a metric by its name.
    pub fn metric(&self, name: &str) -> Option<i64> {
        let id = self.metric_defs.iter().position(|(_, n)| n == name)?;
        let id = u32::try_from(id).ok()?;
        Some(self.metric_values.get(&id).copied().unwrap_or(0))
    }

    /// Metric names defined so far that start with `prefix`.
    pub fn metric_names(&self, prefix: &str) -> Vec<String> {
        self.metric_defs.iter().filter(|(_, n)| n.starts_with(prefix)).map(|(_, n)| n.clone()).collect()
    }

    fn refuse(&mut self, why: String) {
        self.refused.push(why);
    }

    /// Envoy hands out the response header map during the headers callback, and in the body
    /// callbacks only while the filter still holds the headers.
    fn response_headers_available(&self) -> bool {
        self.phase == Phase::ResponseHeaders || (self.phase == Phase::ResponseBody && self.resp_headers_held)
    }
}

fn get_header(list: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    let name = name.to_ascii_lowercase();
    list.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
}

fn set_header(list: &mut HeaderPairs, name: &str, value: Option<&[u8]>) {
    let name = name.to_ascii_lowercase();
    list.retain(|(k, _)| *k != name);
    if let Some(v) = value {
        list.push((name, v.to_vec()));
    }
}

fn splice(buf: &mut Vec<u8>, start: usize, size: usize, data: &[u8]) {
    let start = start.min(buf.len());
    let end = start.saturating_add(size).min(buf.len());
    buf.splice(start..end, data.iter().copied());
}

fn slice(buf: &[u8], start: usize, size: usize) -> Option<Vec<u8>> {
    if buf.is_empty() {
        return None; // Envoy hands back no buffer rather than an empty one
    }
    let end = start.saturating_add(size).min(buf.len());
    buf.get(start..end).map(<[u8]>::to_vec)
}

impl Host for FakeHost {
    fn request_headers(&self) -> HeaderPairs {
        self.req_headers.clone()
    }
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        get_header(&self.req_headers, name)
    }
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) {
        if self.req_headers_sent || matches!(self.phase, Phase::ResponseHeaders | Phase::ResponseBody | Phase::Log) {
            self.refuse(format!("set_request_header({name}) after the request headers were sent"));
            return;
        }
        set_header(&mut self.req_headers, name, value);
    }
    fn response_headers(&self) -> HeaderPairs {
        if !self.response_headers_available() {
            return Vec::new();
        }
        self.resp_headers.clone()
    }
    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) {
        if !self.response_headers_available() {
            self.refuse(format!("set_response_header({name}) outside the response headers callback"));
            return;
        }
        set_header(&mut self.resp_headers, name, value);
    }
    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        slice(&self.req_body, start, size)
    }
    fn set_request_body(&mut self, start: usize, size: usize, data: &[u8]) {
        splice(&mut self.req_body, start, size, data);
    }
    fn response_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        slice(&self.resp_body, start, size)
    }
    fn set_response_body(&mut self, start: usize, size: usize, data: &[u8]) {
        splice(&mut self.resp_body, start, size, data);
    }
    fn send_reply(&mut self, reply: &LocalReply) {
        self.replies.push(reply.clone());
    }
    fn resume_request(&mut self) {
        self.resumed_requests = self.resumed_requests.saturating_add(1);
    }
    fn resume_response(&mut self) {
        self.resumed_responses = self.resumed_responses.saturating_add(1);
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.properties.get(&path.join("/")).cloned()
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) {
        self.properties.insert(path.join("/"), value.to_vec());
    }
    fn now(&self) -> SystemTime {
        self.time.unwrap_or(SystemTime::UNIX_EPOCH)
    }
    fn env_var(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.get(key) {
            Some((v, cas)) if v.is_empty() => (None, Some(*cas)),
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedDataError> {
        let current = self.shared.get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas, current) {
            if want != 0 && want != have {
                return Err(SharedDataError::CasMismatch);
            }
        }
        self.shared_version = self.shared_version.wrapping_add(1).max(1);
        self.shared_writes = self.shared_writes.saturating_add(1);
        self.shared.insert(key.to_string(), (value.to_vec(), self.shared_version));
        Ok(())
    }
    fn register_queue(&mut self, name: &str) -> Option<u32> {
        if let Some(i) = self.queues.iter().position(|(n, _)| n == name) {
            return u32::try_from(i).ok();
        }
        self.queues.push((name.to_string(), VecDeque::new()));
        u32::try_from(self.queues.len() - 1).ok()
    }
    fn resolve_queue(&self, _vm_id: &str, name: &str) -> Option<u32> {
        self.queues.iter().position(|(n, _)| n == name).and_then(|i| u32::try_from(i).ok())
    }
    fn enqueue(&mut self, queue: u32, data: &[u8]) -> bool {
        match usize::try_from(queue).ok().and_then(|i| self.queues.get_mut(i)) {
            Some((_, q)) => {
                q.push_back(data.to_vec());
                true
            }
            None => false,
        }
    }
    fn dequeue(&mut self, queue: u32) -> Option<Vec<u8>> {
        usize::try_from(queue).ok().and_then(|i| self.queues.get_mut(i)).and_then(|(_, q)| q.pop_front())
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(i) = self.metric_defs.iter().position(|(_, n)| n == name) {
            return u32::try_from(i).ok();
        }
        self.metric_defs.push((kind, name.to_string()));
        u32::try_from(self.metric_defs.len() - 1).ok()
    }
    fn increment_metric(&mut self, id: u32, by: i64) {
        let v = self.metric_values.entry(id).or_insert(0);
        *v = v.saturating_add(by);
    }
    fn record_metric(&mut self, id: u32, value: u64) {
        self.histogram_samples.entry(id).or_default().push(value);
        self.metric_values.insert(id, i64::try_from(value).unwrap_or(i64::MAX));
    }
    fn dispatch_http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Option<u32> {
        if self.fail_calls {
            return None;
        }
        self.calls.push(FakeCall {
            cluster: cluster.to_string(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.map(<[u8]>::to_vec),
            timeout,
        });
        u32::try_from(self.calls.len()).ok()
    }
    fn call_response_headers(&self) -> HeaderPairs {
        self.call_resp_headers.clone()
    }
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        slice(&self.call_resp_body, 0, size)
    }
    fn dispatch_grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Option<u32> {
        if self.fail_calls {
            return None;
        }
        self.calls.push(FakeCall {
            cluster: cluster.to_string(),
            headers: vec![(":service".into(), service.into()), (":method".into(), method.into())],
            body: Some(body.to_vec()),
            timeout,
        });
        u32::try_from(self.calls.len()).ok()
    }
    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>> {
        slice(&self.call_resp_body, 0, size)
    }
    fn plugin_config(&self) -> Vec<u8> {
        self.config.clone()
    }
    fn set_tick_period(&mut self, period: Duration) {
        self.tick = Some(period);
    }
    fn call_foreign_function(&mut self, name: &str, args: &[u8]) -> Option<Vec<u8>> {
        self.foreign_calls.push((name.to_string(), args.to_vec()));
        ENVOY_FOREIGN_FUNCTIONS.contains(&name).then(Vec::new)
    }
}

/// Kinds of value-returning host calls, counted by [`CountingHost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallKind {
    /// All request or response headers at once.
    HeaderMap,
    /// One header.
    Header,
    /// A body read.
    Body,
    /// A property or filter-state read.
    Property,
    /// A shared-data read.
    SharedData,
    /// A callout response read.
    Callout,
    /// A foreign function call (`clear_route_cache` re-matches the route).
    Foreign,
}

/// A [`Host`] that counts the calls returning a value (the costly kind in V8), by kind.
#[derive(Debug)]
pub struct CountingHost<H> {
    /// The wrapped host.
    pub inner: H,
    counts: Cell<[u32; 7]>,
    /// Property paths read, in order (to see what a budget overrun is made of).
    pub property_reads: std::cell::RefCell<Vec<String>>,
    /// Property paths written (`set_property`, i.e. filter state), in order. Not part of
    /// [`CountingHost::total`]: a write returns nothing.
    pub property_writes: std::cell::RefCell<Vec<String>>,
}

impl<H> CountingHost<H> {
    /// Wrap `inner`.
    pub fn new(inner: H) -> Self {
        Self {
            inner,
            counts: Cell::new([0; 7]),
            property_reads: std::cell::RefCell::new(Vec::new()),
            property_writes: std::cell::RefCell::new(Vec::new()),
        }
    }

    fn bump(&self, k: CallKind) {
        let mut c = self.counts.get();
        if let Some(slot) = c.get_mut(k as usize) {
            *slot = slot.saturating_add(1);
        }
        self.counts.set(c);
    }

    /// Calls of one kind so far.
    pub fn count(&self, k: CallKind) -> u32 {
        self.counts.get().get(k as usize).copied().unwrap_or(0)
    }

    /// All value-returning calls so far.
    pub fn total(&self) -> u32 {
        self.counts.get().iter().sum()
    }

    /// Property (filter-state) writes so far.
    pub fn writes(&self) -> usize {
        self.property_writes.borrow().len()
    }

    /// Start counting again.
    pub fn reset(&self) {
        self.counts.set([0; 7]);
        self.property_reads.borrow_mut().clear();
        self.property_writes.borrow_mut().clear();
    }
}

impl<H: Host> Host for CountingHost<H> {
    fn request_headers(&self) -> HeaderPairs {
        self.bump(CallKind::HeaderMap);
        self.inner.request_headers()
    }
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.bump(CallKind::Header);
        self.inner.request_header(name)
    }
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) {
        self.inner.set_request_header(name, value);
    }
    fn response_headers(&self) -> HeaderPairs {
        self.bump(CallKind::HeaderMap);
        self.inner.response_headers()
    }
    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) {
        self.inner.set_response_header(name, value);
    }
    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        self.bump(CallKind::Body);
        self.inner.request_body(start, size)
    }
    fn set_request_body(&mut self, start: usize, size: usize, data: &[u8]) {
        self.inner.set_request_body(start, size, data);
    }
    fn response_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        self.bump(CallKind::Body);
        self.inner.response_body(start, size)
    }
    fn set_response_body(&mut self, start: usize, size: usize, data: &[u8]) {
        self.inner.set_response_body(start, size, data);
    }
    fn send_reply(&mut self, reply: &LocalReply) {
        self.inner.send_reply(reply);
    }
    fn resume_request(&mut self) {
        self.inner.resume_request();
    }
    fn resume_response(&mut self) {
        self.inner.resume_response();
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.bump(CallKind::Property);
        self.property_reads.borrow_mut().push(path.join("."));
        self.inner.property(path)
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) {
        self.property_writes.borrow_mut().push(path.join("."));
        self.inner.set_property(path, value);
    }
    fn now(&self) -> SystemTime {
        self.inner.now()
    }
    fn env_var(&self, name: &str) -> Option<String> {
        self.inner.env_var(name)
    }
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.bump(CallKind::SharedData);
        self.inner.shared_data(key)
    }
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedDataError> {
        self.inner.set_shared_data(key, value, cas)
    }
    fn register_queue(&mut self, name: &str) -> Option<u32> {
        self.inner.register_queue(name)
    }
    fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.inner.resolve_queue(vm_id, name)
    }
    fn enqueue(&mut self, queue: u32, data: &[u8]) -> bool {
        self.inner.enqueue(queue, data)
    }
    fn dequeue(&mut self, queue: u32) -> Option<Vec<u8>> {
        self.inner.dequeue(queue)
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        self.inner.define_metric(kind, name)
    }
    fn increment_metric(&mut self, id: u32, by: i64) {
        self.inner.increment_metric(id, by);
    }
    fn record_metric(&mut self, id: u32, value: u64) {
        self.inner.record_metric(id, value);
    }
    fn dispatch_http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Option<u32> {
        self.inner.dispatch_http_call(cluster, headers, body, timeout)
    }
    fn call_response_headers(&self) -> HeaderPairs {
        self.bump(CallKind::Callout);
        self.inner.call_response_headers()
    }
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        self.bump(CallKind::Callout);
        self.inner.call_response_body(size)
    }
    fn dispatch_grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Option<u32> {
        self.inner.dispatch_grpc_call(cluster, service, method, body, timeout)
    }
    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>> {
        self.bump(CallKind::Callout);
        self.inner.grpc_response_body(size)
    }
    fn plugin_config(&self) -> Vec<u8> {
        self.inner.plugin_config()
    }
    fn set_tick_period(&mut self, period: Duration) {
        self.inner.set_tick_period(period);
    }
    fn call_foreign_function(&mut self, name: &str, args: &[u8]) -> Option<Vec<u8>> {
        self.bump(CallKind::Foreign);
        self.inner.call_foreign_function(name, args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_replace_and_remove() {
        let mut h = FakeHost::with_request_headers(&[("Content-Length", "10"), ("x-a", "1")]);
        assert_eq!(h.req_header("content-length").as_deref(), Some("10"));
        h.set_request_header("content-length", None);
        assert_eq!(h.request_header("content-length"), None);
        h.set_request_header("x-a", Some(b"2"));
        assert_eq!(h.req_header("x-a").as_deref(), Some("2"));
        h.req_headers_sent = true;
        h.set_request_header("x-a", Some(b"3"));
        assert_eq!(h.req_header("x-a").as_deref(), Some("2"));
        assert_eq!(h.refused.len(), 1);
    }

    #[test]
    fn response_headers_only_in_their_phase() {
        let mut h = FakeHost { resp_headers: vec![(":status".into(), b"200".to_vec())], ..FakeHost::default() };
        h.phase = Phase::ResponseHeaders;
        assert_eq!(h.response_headers().len(), 1);
        h.phase = Phase::ResponseBody;
        assert!(h.response_headers().is_empty(), "Envoy answers BadArgument here");
        h.set_response_header("x", Some(b"1"));
        assert_eq!(h.refused.len(), 1);
    }

    #[test]
    fn held_response_headers_stay_available_in_the_body_callbacks() {
        let mut h = FakeHost { resp_headers: vec![(":status".into(), b"400".to_vec())], ..FakeHost::default() };
        h.phase = Phase::ResponseBody;
        h.resp_headers_held = true;
        assert_eq!(h.response_headers().len(), 1);
        h.set_response_header("x-retry", Some(b"1"));
        assert_eq!(h.resp_header("x-retry").as_deref(), Some("1"));
        assert!(h.refused.is_empty());
    }

    #[test]
    fn foreign_functions_envoy_knows() {
        let mut h = CountingHost::new(FakeHost::default());
        assert_eq!(h.call_foreign_function("clear_route_cache", b""), Some(Vec::new()));
        assert_eq!(h.call_foreign_function("no_such_function", b"x"), None);
        assert_eq!(h.inner.foreign_calls.len(), 2);
        assert_eq!(h.count(CallKind::Foreign), 2);
    }

    #[test]
    fn body_splice_and_empty_buffer() {
        let mut h = FakeHost { req_body: b"hello world".to_vec(), ..FakeHost::default() };
        h.set_request_body(0, 5, b"HELLO!!");
        assert_eq!(h.req_body, b"HELLO!! world");
        assert_eq!(h.request_body(0, 1000).unwrap(), b"HELLO!! world");
        assert_eq!(h.request_body(100, 5), None);
        assert_eq!(FakeHost::default().request_body(0, 10), None);
    }

    #[test]
    fn shared_data_like_envoy() {
        let mut h = FakeHost::default();
        assert_eq!(h.shared_data("k"), (None, None));
        h.set_shared_data("k", b"", Some(77)).unwrap(); // missing key: CAS ignored
        let (v, cas) = h.shared_data("k");
        assert_eq!(v, None, "empty reads as None");
        assert!(cas.is_some(), "but the key exists");
        h.set_shared_data("k", b"1", cas).unwrap();
        let (v, cas) = h.shared_data("k");
        assert_eq!(v.unwrap(), b"1");
        h.set_shared_data("k", b"2", cas).unwrap();
        assert_eq!(h.set_shared_data("k", b"3", cas), Err(SharedDataError::CasMismatch));
    }

    #[test]
    fn queues() {
        let mut h = FakeHost::default();
        let q = h.register_queue("q").unwrap();
        assert_eq!(h.resolve_queue("vm", "q"), Some(q));
        assert!(h.enqueue(q, b"a"));
        assert_eq!(h.dequeue(q).unwrap(), b"a");
        assert_eq!(h.dequeue(q), None);
        assert!(!h.enqueue(9, b"x"));
    }

    #[test]
    fn metrics_by_name() {
        let mut h = FakeHost::default();
        let id = h.define_metric(MetricKind::Counter, "a").unwrap();
        assert_eq!(h.define_metric(MetricKind::Counter, "a"), Some(id));
        h.increment_metric(id, 2);
        h.increment_metric(id, 3);
        assert_eq!(h.metric("a"), Some(5));
        assert_eq!(h.metric("b"), None);
    }

    #[test]
    fn counting_host_counts_value_returning_calls() {
        let mut h = CountingHost::new(FakeHost::with_request_headers(&[("a", "1")]));
        let _ = h.request_headers();
        let _ = h.property(&["xds", "route_name"]);
        h.set_request_header("b", Some(b"2"));
        h.increment_metric(0, 1);
        h.set_property(&["sluice.user"], b"alice");
        assert_eq!(h.count(CallKind::HeaderMap), 1);
        assert_eq!(h.count(CallKind::Property), 1);
        assert_eq!(h.total(), 2, "a write returns nothing: not counted as a read");
        assert_eq!(h.property_reads.borrow().as_slice(), ["xds.route_name"]);
        assert_eq!(h.writes(), 1);
        assert_eq!(h.property_writes.borrow().as_slice(), ["sluice.user"]);
        h.reset();
        assert_eq!((h.total(), h.writes()), (0, 0));
    }
}
