//! The real [`Host`]: the proxy-wasm ABI called directly, every status turned into an
//! `Option`/`Result`.
//!
//! Why not the SDK's `proxy_wasm::hostcalls`: each of its functions panics on a status it
//! does not expect (e.g. reading a response header from a body callback answers
//! `BadArgument`; the SDK panics, the VM traps, and every later request on that worker
//! fails). The raw imports below return the status as a plain `u32`, so no host answer can
//! trap the VM.
//!
//! What can still trap, all inside the SDK (listed in docs/security.md):
//! - callouts go through `hostcalls::dispatch_http_call` / `dispatch_grpc_call`, because the
//!   SDK's dispatcher must register the token to route the answer to this context; they panic
//!   only on statuses Envoy 1.40 never returns for them (it returns Ok, BadArgument,
//!   ParseFailure or InternalFailure, all handled);
//! - the SDK dispatcher's own bookkeeping (`invalid context_id`, `invalid token_id`,
//!   `set_effective_context(..).unwrap()` when delivering a callout answer): Envoy only hands
//!   out ids it created.

#![allow(unsafe_code)] // The one module that talks to the host ABI.

use crate::encoding::{decode_map, encode_map};
use crate::errors::LocalReply;
use crate::host::{HeaderPairs, Host, SharedDataError};
use crate::metrics::MetricKind;
use std::ptr::{null, null_mut};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const OK: u32 = 0;
const CAS_MISMATCH: u32 = 8;

// Map types.
const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
const CALL_RESPONSE_HEADERS: u32 = 6;
// Buffer types.
const REQUEST_BODY: u32 = 0;
const RESPONSE_BODY: u32 = 1;
const CALL_RESPONSE_BODY: u32 = 4;
const GRPC_RECEIVE_BUFFER: u32 = 5;
const PLUGIN_CONFIGURATION: u32 = 7;
// Stream types.
const STREAM_REQUEST: u32 = 0;
const STREAM_RESPONSE: u32 = 1;

#[allow(clashing_extern_declarations)] // the SDK declares the same imports with enum types
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_buffer_bytes(buffer: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_set_buffer_bytes(buffer: u32, start: usize, size: usize, data: *const u8, data_size: usize) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_get_property(path: *const u8, path_size: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, value_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32) -> u32;
    fn proxy_register_shared_queue(name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_resolve_shared_queue(
        vm_id: *const u8,
        vm_id_size: usize,
        name: *const u8,
        name_size: usize,
        id: *mut u32,
    ) -> u32;
    fn proxy_enqueue_shared_queue(id: u32, value: *const u8, value_size: usize) -> u32;
    fn proxy_dequeue_shared_queue(id: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_size: usize,
        args: *const u8,
        args_size: usize,
        results: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
}

/// Take ownership of a host-allocated buffer (allocated through the SDK's exported
/// `proxy_on_memory_allocate`, i.e. the Rust global allocator).
fn owned(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host wrote `size` bytes into memory it obtained from our allocator for
    // exactly `size` bytes; we are its only owner from here on (what the SDK does too).
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

fn get_map(map: u32) -> HeaderPairs {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers to locals.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
    if status != OK {
        return Vec::new();
    }
    owned(data, size).map(|b| decode_map(&b)).unwrap_or_default()
}

fn get_map_value(map: u32, key: &str) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: key is a live slice; out-pointers to locals.
    let status = unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut data, &mut size) };
    if status != OK {
        return None;
    }
    Some(owned(data, size).unwrap_or_default())
}

fn set_map_value(map: u32, key: &str, value: Option<&[u8]>) -> u32 {
    // SAFETY: key and value are live slices.
    unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(map, key.as_ptr(), key.len(), v.as_ptr(), v.len()),
            None => proxy_remove_header_map_value(map, key.as_ptr(), key.len()),
        }
    }
}

fn get_buffer(buffer: u32, start: usize, max: usize) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers to locals.
    let status = unsafe { proxy_get_buffer_bytes(buffer, start, max, &mut data, &mut size) };
    if status != OK {
        return None;
    }
    owned(data, size)
}

fn set_buffer(buffer: u32, start: usize, size: usize, data: &[u8]) -> u32 {
    // SAFETY: data is a live slice.
    unsafe { proxy_set_buffer_bytes(buffer, start, size, data.as_ptr(), data.len()) }
}

fn path_bytes(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

/// Zero-sized adapter: hostcalls act on the context the host is currently calling into.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyHost;

impl Host for ProxyHost {
    fn request_headers(&self) -> HeaderPairs {
        get_map(REQUEST_HEADERS)
    }
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        get_map_value(REQUEST_HEADERS, name)
    }
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) {
        let s = set_map_value(REQUEST_HEADERS, name, value);
        if s != OK {
            log::debug!("set_request_header {name}: status {s}");
        }
    }
    fn response_headers(&self) -> HeaderPairs {
        get_map(RESPONSE_HEADERS)
    }
    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) {
        let s = set_map_value(RESPONSE_HEADERS, name, value);
        if s != OK {
            log::debug!("set_response_header {name}: status {s}");
        }
    }
    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        get_buffer(REQUEST_BODY, start, size)
    }
    fn set_request_body(&mut self, start: usize, size: usize, data: &[u8]) {
        let s = set_buffer(REQUEST_BODY, start, size, data);
        if s != OK {
            log::warn!("set_request_body: status {s}");
        }
    }
    fn response_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        get_buffer(RESPONSE_BODY, start, size)
    }
    fn set_response_body(&mut self, start: usize, size: usize, data: &[u8]) {
        let s = set_buffer(RESPONSE_BODY, start, size, data);
        if s != OK {
            log::warn!("set_response_body: status {s}");
        }
    }
    fn send_reply(&mut self, reply: &LocalReply) {
        let pairs: Vec<(&str, &[u8])> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
        let headers = encode_map(&pairs);
        // SAFETY: body and headers are live slices.
        let s = unsafe {
            proxy_send_local_response(
                reply.status,
                null(),
                0,
                reply.body.as_ptr(),
                reply.body.len(),
                headers.as_ptr(),
                headers.len(),
                -1,
            )
        };
        if s != OK {
            log::warn!("send_local_response: status {s}");
        }
    }
    fn resume_request(&mut self) {
        // SAFETY: plain call.
        let s = unsafe { proxy_continue_stream(STREAM_REQUEST) };
        if s != OK {
            log::warn!("resume request: status {s}");
        }
    }
    fn resume_response(&mut self) {
        // SAFETY: plain call.
        let s = unsafe { proxy_continue_stream(STREAM_RESPONSE) };
        if s != OK {
            log::warn!("resume response: status {s}");
        }
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let p = path_bytes(path);
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: p is live; out-pointers to locals.
        let status = unsafe { proxy_get_property(p.as_ptr(), p.len(), &mut data, &mut size) };
        if status != OK {
            return None;
        }
        owned(data, size)
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) {
        let p = path_bytes(path);
        // SAFETY: p and value are live slices.
        let s = unsafe { proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) };
        if s != OK {
            log::debug!("set_property {path:?}: status {s}");
        }
    }
    fn now(&self) -> SystemTime {
        let mut ns: u64 = 0;
        // SAFETY: out-pointer to a local.
        let s = unsafe { proxy_get_current_time_nanoseconds(&mut ns) };
        if s != OK {
            return UNIX_EPOCH;
        }
        UNIX_EPOCH + Duration::from_nanos(ns)
    }
    fn env_var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
        // SAFETY: key is live; out-pointers to locals.
        let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
        if status != OK {
            return (None, None);
        }
        (owned(data, size).filter(|v| !v.is_empty()), Some(cas))
    }
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedDataError> {
        // SAFETY: key and value are live slices.
        let s =
            unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0)) };
        match s {
            OK => Ok(()),
            CAS_MISMATCH => Err(SharedDataError::CasMismatch),
            _ => Err(SharedDataError::Failed),
        }
    }
    fn register_queue(&mut self, name: &str) -> Option<u32> {
        let mut id = 0u32;
        // SAFETY: name is live; out-pointer to a local.
        let s = unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) };
        (s == OK).then_some(id)
    }
    fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        let mut id = 0u32;
        // SAFETY: vm_id and name are live; out-pointer to a local.
        let s = unsafe { proxy_resolve_shared_queue(vm_id.as_ptr(), vm_id.len(), name.as_ptr(), name.len(), &mut id) };
        (s == OK).then_some(id)
    }
    fn enqueue(&mut self, queue: u32, data: &[u8]) -> bool {
        // SAFETY: data is live.
        unsafe { proxy_enqueue_shared_queue(queue, data.as_ptr(), data.len()) == OK }
    }
    fn dequeue(&mut self, queue: u32) -> Option<Vec<u8>> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: out-pointers to locals.
        let s = unsafe { proxy_dequeue_shared_queue(queue, &mut data, &mut size) };
        if s != OK {
            return None;
        }
        Some(owned(data, size).unwrap_or_default())
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        let k = match kind {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        let mut id = 0u32;
        // SAFETY: name is live; out-pointer to a local.
        let s = unsafe { proxy_define_metric(k, name.as_ptr(), name.len(), &mut id) };
        (s == OK).then_some(id)
    }
    fn increment_metric(&mut self, id: u32, by: i64) {
        // SAFETY: plain call.
        let _ = unsafe { proxy_increment_metric(id, by) };
    }
    fn record_metric(&mut self, id: u32, value: u64) {
        // SAFETY: plain call.
        let _ = unsafe { proxy_record_metric(id, value) };
    }
    fn dispatch_http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Option<u32> {
        match proxy_wasm::hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout) {
            Ok(token) => Some(token),
            Err(e) => {
                log::warn!("dispatch_http_call to {cluster}: {e:?}");
                None
            }
        }
    }
    fn call_response_headers(&self) -> HeaderPairs {
        get_map(CALL_RESPONSE_HEADERS)
    }
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        get_buffer(CALL_RESPONSE_BODY, 0, size)
    }
    fn dispatch_grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Option<u32> {
        match proxy_wasm::hostcalls::dispatch_grpc_call(cluster, service, method, vec![], Some(body), timeout) {
            Ok(token) => Some(token),
            Err(e) => {
                log::warn!("dispatch_grpc_call to {cluster}: {e:?}");
                None
            }
        }
    }
    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>> {
        get_buffer(GRPC_RECEIVE_BUFFER, 0, size)
    }
    fn plugin_config(&self) -> Vec<u8> {
        get_buffer(PLUGIN_CONFIGURATION, 0, usize::MAX).unwrap_or_default()
    }
    fn set_tick_period(&mut self, period: Duration) {
        let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
        // SAFETY: plain call.
        let s = unsafe { proxy_set_tick_period_milliseconds(ms) };
        if s != OK {
            log::warn!("set_tick_period: status {s}");
        }
    }
    fn call_foreign_function(&mut self, name: &str, args: &[u8]) -> Option<Vec<u8>> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: name and args are live slices; out-pointers to locals.
        let s = unsafe {
            proxy_call_foreign_function(name.as_ptr(), name.len(), args.as_ptr(), args.len(), &mut data, &mut size)
        };
        if s != OK {
            log::debug!("call_foreign_function {name}: status {s}");
            return None;
        }
        Some(owned(data, size).unwrap_or_default())
    }
}
