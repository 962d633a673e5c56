//! proxy-wasm glue, the same for every sluice filter: a root context that loads the
//! plugins (one config reader, one error wording) and does their per-VM work, and an HTTP
//! context that hands every callback to the [`Pipeline`]. A filter crate's `lib.rs` only says
//! which plugins it is made of: `sluice_core::filter_main!(NAME, assemble);`.

use crate::config::refused;
use crate::host::Host;
use crate::pipeline::{Act, Pipeline, Slot};
use crate::proxy_host::ProxyHost;
use crate::route::RouteCache;
use crate::stage::{Assemble, CalloutResponse, Plugin};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::cell::RefCell;
use std::rc::Rc;

thread_local! {
    /// What `start` registered: the SDK takes a plain `fn` for root contexts, not a closure.
    static FILTER: std::cell::Cell<Option<(&'static str, &'static str, Assemble)>> = const { std::cell::Cell::new(None) };
}

fn new_root(_: u32) -> Box<dyn RootContext> {
    let (name, version, assemble) = FILTER.with(std::cell::Cell::get).unwrap_or(("sluice", "?", refuse_all));
    Box::new(Root { name, version, assemble, plugins: Rc::new(Vec::new()), routes: Rc::default(), ok: false })
}

fn refuse_all(
    _: &[u8],
    _: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Box<dyn Plugin>>, crate::config::ConfigError> {
    Err(crate::config::ConfigError::new(".", "no filter registered"))
}

/// Register the root context of a filter made of the plugins `assemble` builds.
pub fn start(name: &'static str, version: &'static str, assemble: Assemble) {
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    FILTER.with(|f| f.set(Some((name, version, assemble))));
    proxy_wasm::set_root_context(new_root);
}

struct Root {
    name: &'static str,
    version: &'static str,
    assemble: Assemble,
    plugins: Rc<Vec<Box<dyn Plugin>>>,
    routes: Rc<RefCell<RouteCache>>,
    ok: bool,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let mut h = ProxyHost;
        let headers = h.call_response_headers();
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| String::from_utf8_lossy(v).trim().parse().ok());
        let body = if body_size > 0 { h.call_response_body(body_size) } else { None };
        let r = CalloutResponse { token, status, grpc_status: None, headers, body };
        for p in self.plugins.iter() {
            if p.on_root_callout(&mut h, &r) {
                return;
            }
        }
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        let mut h = ProxyHost;
        let body = if status == 0 { h.grpc_response_body(size) } else { None };
        let r = CalloutResponse { token, status: None, grpc_status: Some(status), headers: Vec::new(), body };
        for p in self.plugins.iter() {
            if p.on_root_callout(&mut h, &r) {
                return;
            }
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        log::info!("{}: sluice {} starting", self.name, self.version);
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let mut h = ProxyHost;
        let bytes = h.plugin_config();
        let env = |n: &str| std::env::var(n).ok();
        match (self.assemble)(&bytes, &env) {
            Ok(plugins) => {
                let names: Vec<&str> = plugins.iter().map(|p| p.name()).collect();
                log::info!("{}: configured stages {names:?}", self.name);
                for p in &plugins {
                    p.on_start(&mut h);
                }
                if let Some(t) = plugins.iter().filter_map(|p| p.tick_period()).min() {
                    h.set_tick_period(t);
                }
                self.plugins = Rc::new(plugins);
                self.routes = Rc::default();
                self.ok = true;
                true
            }
            Err(e) => {
                log::error!("{}", refused(self.name, &e));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let mut h = ProxyHost;
        for p in self.plugins.iter() {
            p.on_tick(&mut h);
        }
    }

    fn on_queue_ready(&mut self, queue: u32) {
        let mut h = ProxyHost;
        for p in self.plugins.iter() {
            p.on_queue_ready(&mut h, queue);
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        let pipeline = if self.ok {
            let slots = self.plugins.iter().map(|p| Slot::of(p.as_ref())).collect();
            Pipeline::new(id, slots, Rc::clone(&self.routes))
        } else {
            Pipeline::misconfigured(id, self.name)
        };
        Some(Box::new(Http { p: pipeline }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    p: Pipeline,
}

fn action(a: Act) -> Action {
    match a {
        Act::Continue => Action::Continue,
        Act::Pause => Action::Pause,
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        self.p.on_callout(&mut ProxyHost, token, None, body_size);
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        self.p.on_callout(&mut ProxyHost, token, Some(status), size);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        action(self.p.on_request_headers(&mut ProxyHost, end_of_stream))
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        action(self.p.on_request_body(&mut ProxyHost, size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        action(self.p.on_request_trailers(&mut ProxyHost))
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        action(self.p.on_response_headers(&mut ProxyHost, end_of_stream))
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        action(self.p.on_response_body(&mut ProxyHost, size, end_of_stream))
    }

    fn on_http_response_trailers(&mut self, _: usize) -> Action {
        action(self.p.on_response_trailers(&mut ProxyHost))
    }

    fn on_log(&mut self) {
        self.p.on_log(&mut ProxyHost);
    }
}
