//! The real [`Host`]: proxy-wasm hostcalls, with every status turned into `Option`/`Result`
//! (the SDK's context methods `unwrap` host statuses, which would trap the VM).

use crate::errors::LocalReply;
use crate::host::{Host, SharedDataError};
use crate::metrics::MetricKind;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use std::time::{Duration, SystemTime};

/// Zero-sized adapter: hostcalls act on the context the host is currently calling into.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyHost;

impl Host for ProxyHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name).ok().flatten()
    }
    fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default()
    }
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) {
        let r = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, value);
        if let Err(e) = r {
            log::debug!("set_request_header {name}: {e:?}");
        }
    }
    fn add_request_header(&mut self, name: &str, value: &[u8]) {
        if let Err(e) = hostcalls::add_map_value_bytes(MapType::HttpRequestHeaders, name, value) {
            log::debug!("add_request_header {name}: {e:?}");
        }
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name).ok().flatten()
    }
    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) {
        if let Err(e) = hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, value) {
            log::debug!("set_response_header {name}: {e:?}");
        }
    }
    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, start, size).ok().flatten()
    }
    fn set_request_body(&mut self, start: usize, size: usize, data: &[u8]) {
        if let Err(e) = hostcalls::set_buffer(BufferType::HttpRequestBody, start, size, data) {
            log::warn!("set_request_body: {e:?}");
        }
    }
    fn response_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, start, size).ok().flatten()
    }
    fn set_response_body(&mut self, start: usize, size: usize, data: &[u8]) {
        if let Err(e) = hostcalls::set_buffer(BufferType::HttpResponseBody, start, size, data) {
            log::warn!("set_response_body: {e:?}");
        }
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) {
        if let Err(e) = hostcalls::set_property(path.to_vec(), Some(value)) {
            log::debug!("set_property {path:?}: {e:?}");
        }
    }
    fn send_reply(&mut self, reply: &LocalReply) {
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if let Err(e) = hostcalls::send_http_response(reply.status, headers, Some(&reply.body)) {
            log::warn!("send_http_response: {e:?}");
        }
    }
    fn now(&self) -> SystemTime {
        hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH)
    }
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedDataError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SharedDataError::CasMismatch),
            Err(_) => Err(SharedDataError::Failed),
        }
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        let t = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(t, name).ok()
    }
    fn increment_metric(&mut self, id: u32, by: i64) {
        let _ = hostcalls::increment_metric(id, by);
    }
    fn record_metric(&mut self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }
    fn dispatch_http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Option<u32> {
        match hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout) {
            Ok(token) => Some(token),
            Err(e) => {
                log::warn!("dispatch_http_call to {cluster}: {e:?}");
                None
            }
        }
    }
    fn call_response_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name).ok().flatten()
    }
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size).ok().flatten()
    }
    fn env_var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}
