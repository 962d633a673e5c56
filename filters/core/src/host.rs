//! The few host operations filter logic needs, as a trait.
//!
//! Filter behaviour is written against [`Host`]; on wasm32 the real adapter
//! (`proxy_host::ProxyHost`) forwards to proxy-wasm hostcalls and turns every host status
//! into an `Option`/`Result` (the SDK's own context methods `unwrap` them). Native tests use
//! [`FakeHost`], which records what the filter did.

use crate::errors::LocalReply;
use crate::metrics::MetricKind;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// Why a shared-data write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedDataError {
    /// Someone else wrote since our read: read again and retry.
    CasMismatch,
    /// Any other host failure.
    Failed,
}

/// Host operations available to a filter during one HTTP stream.
pub trait Host {
    /// A request header (lowercase name), raw bytes.
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// All request headers, in order; a name may repeat.
    fn request_headers(&self) -> Vec<(String, Vec<u8>)>;
    /// Set (replace) a request header; `None` removes it.
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>);
    /// Append a request header value.
    fn add_request_header(&mut self, name: &str, value: &[u8]);
    /// A response header (lowercase name), raw bytes.
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Set (replace) a response header; `None` removes it.
    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>);
    /// Bytes `[start, start+size)` of the buffered request body.
    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>>;
    /// Replace `[start, start+size)` of the request body with `data`.
    fn set_request_body(&mut self, start: usize, size: usize, data: &[u8]);
    /// Bytes of the current response body chunk (or buffered body).
    fn response_body(&self, start: usize, size: usize) -> Option<Vec<u8>>;
    /// Replace `[start, start+size)` of the response body chunk with `data`.
    fn set_response_body(&mut self, start: usize, size: usize, data: &[u8]);
    /// A stream property such as `["xds","route_metadata","filter_metadata","sluice","policy"]`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Write a property (filter state when the path is one `sluice.*` segment).
    fn set_property(&mut self, path: &[&str], value: &[u8]);
    /// Send a local reply instead of forwarding.
    fn send_reply(&mut self, reply: &LocalReply);
    /// Wall-clock time as the host sees it.
    fn now(&self) -> SystemTime;
    /// Shared data value and its CAS token.
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Write shared data; with `cas`, only if nobody wrote since that read.
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedDataError>;
    /// Define a metric; `None` if the host refused.
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32>;
    /// Add to a counter or gauge.
    fn increment_metric(&mut self, id: u32, by: i64);
    /// Record a histogram value (or set a gauge).
    fn record_metric(&mut self, id: u32, value: u64);
    /// Start an HTTP callout to an Envoy cluster; returns its token.
    fn dispatch_http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Option<u32>;
    /// A header of the callout response being delivered.
    fn call_response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// The callout response body being delivered.
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// An environment variable passed to the VM (`vm_config.environment_variables`).
    fn env_var(&self, name: &str) -> Option<String>;
}

/// Lossy UTF-8 view of a header value.
pub fn header_str(v: Option<Vec<u8>>) -> Option<String> {
    v.map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A callout recorded by [`FakeHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCall {
    /// Envoy cluster.
    pub cluster: String,
    /// Request headers.
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Option<Vec<u8>>,
}

/// An in-memory host for native tests: set inputs, run the filter, inspect what it did.
#[derive(Debug, Clone, Default)]
pub struct FakeHost {
    /// Request headers (lowercase names).
    pub req_headers: Vec<(String, Vec<u8>)>,
    /// Response headers (lowercase names).
    pub resp_headers: Vec<(String, Vec<u8>)>,
    /// Request body.
    pub req_body: Vec<u8>,
    /// Current response body chunk.
    pub resp_body: Vec<u8>,
    /// Properties by joined path (`a/b/c`).
    pub properties: HashMap<String, Vec<u8>>,
    /// Local replies sent, in order.
    pub replies: Vec<LocalReply>,
    /// Current time.
    pub time: Option<SystemTime>,
    /// Shared data: value and version.
    pub shared: HashMap<String, (Vec<u8>, u32)>,
    /// Metric definitions: id -> (kind, name).
    pub metric_defs: Vec<(MetricKind, String)>,
    /// Metric values by id (counters and gauges add, histograms record the list).
    pub metric_values: HashMap<u32, i64>,
    /// Histogram samples by id.
    pub histogram_samples: HashMap<u32, Vec<u64>>,
    /// Callouts dispatched, in order.
    pub calls: Vec<FakeCall>,
    /// When true, dispatch_http_call fails.
    pub fail_calls: bool,
    /// Headers of the callout response being delivered.
    pub call_resp_headers: Vec<(String, Vec<u8>)>,
    /// Body of the callout response being delivered.
    pub call_resp_body: Vec<u8>,
    /// Environment variables.
    pub env: HashMap<String, String>,
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

    /// A request header as a string.
    pub fn req_header(&self, name: &str) -> Option<String> {
        header_str(self.request_header(name))
    }

    /// A response header as a string.
    pub fn resp_header(&self, name: &str) -> Option<String> {
        header_str(self.response_header(name))
    }

    /// The value of a metric by its name.
    pub fn metric(&self, name: &str) -> Option<i64> {
        let id = self.metric_defs.iter().position(|(_, n)| n == name)?;
        let id = u32::try_from(id).ok()?;
        Some(self.metric_values.get(&id).copied().unwrap_or(0))
    }
}

fn get_header(list: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    let name = name.to_ascii_lowercase();
    list.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
}

fn set_header(list: &mut Vec<(String, Vec<u8>)>, name: &str, value: Option<&[u8]>) {
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
    let end = start.saturating_add(size).min(buf.len());
    buf.get(start..end).map(<[u8]>::to_vec)
}

impl Host for FakeHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        get_header(&self.req_headers, name)
    }
    fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.req_headers.clone()
    }
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) {
        set_header(&mut self.req_headers, name, value);
    }
    fn add_request_header(&mut self, name: &str, value: &[u8]) {
        self.req_headers.push((name.to_ascii_lowercase(), value.to_vec()));
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        get_header(&self.resp_headers, name)
    }
    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) {
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
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.properties.get(&path.join("/")).cloned()
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) {
        self.properties.insert(path.join("/"), value.to_vec());
    }
    fn send_reply(&mut self, reply: &LocalReply) {
        self.replies.push(reply.clone());
    }
    fn now(&self) -> SystemTime {
        self.time.unwrap_or(SystemTime::UNIX_EPOCH)
    }
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedDataError> {
        let current = self.shared.get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas, current) {
            if want != have {
                return Err(SharedDataError::CasMismatch);
            }
        }
        let next = current.unwrap_or(0).wrapping_add(1);
        self.shared.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(i) = self.metric_defs.iter().position(|(_, n)| n == name) {
            return u32::try_from(i).ok();
        }
        self.metric_defs.push((kind, name.to_string()));
        u32::try_from(self.metric_defs.len() - 1).ok()
    }
    fn increment_metric(&mut self, id: u32, by: i64) {
        *self.metric_values.entry(id).or_insert(0) += by;
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
        _timeout: Duration,
    ) -> Option<u32> {
        if self.fail_calls {
            return None;
        }
        self.calls.push(FakeCall {
            cluster: cluster.to_string(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.map(<[u8]>::to_vec),
        });
        u32::try_from(self.calls.len()).ok()
    }
    fn call_response_header(&self, name: &str) -> Option<Vec<u8>> {
        get_header(&self.call_resp_headers, name)
    }
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        slice(&self.call_resp_body, 0, size)
    }
    fn env_var(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn headers_replace_and_remove() {
        let mut h = FakeHost::with_request_headers(&[("Content-Length", "10"), ("x-a", "1")]);
        assert_eq!(h.req_header("content-length").as_deref(), Some("10"));
        h.set_request_header("content-length", None);
        assert_eq!(h.request_header("content-length"), None);
        h.set_request_header("x-a", Some(b"2"));
        h.add_request_header("x-a", b"3");
        assert_eq!(h.request_headers().iter().filter(|(k, _)| k == "x-a").count(), 2);
    }

    #[test]
    fn body_splice() {
        let mut h = FakeHost { req_body: b"hello world".to_vec(), ..FakeHost::default() };
        h.set_request_body(0, 5, b"HELLO!!");
        assert_eq!(h.req_body, b"HELLO!! world");
        assert_eq!(h.request_body(0, 1000).unwrap(), b"HELLO!! world");
        assert_eq!(h.request_body(100, 5), None);
    }

    #[test]
    fn shared_data_cas() {
        let mut h = FakeHost::default();
        h.set_shared_data("k", b"1", None).unwrap();
        let (v, cas) = h.shared_data("k");
        assert_eq!(v.unwrap(), b"1");
        h.set_shared_data("k", b"2", cas).unwrap();
        assert_eq!(h.set_shared_data("k", b"3", cas), Err(SharedDataError::CasMismatch));
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
}
