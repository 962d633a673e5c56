//! proxy-wasm glue: the root context loads the config and refreshes remote JWKS on a
//! timer; each HTTP context runs an [`AuthFlow`].

use crate::config::{Config, FILTER};
use crate::flow::{AuthFlow, Step};
use crate::jwks::{fetch_headers, publish, VmState};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use sluice_core::host::Host;
use sluice_core::proxy_host::ProxyHost;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// Timer period: JWKS refreshes are checked this often (cheap when nothing is due).
const TICK: Duration = Duration::from_millis(500);

#[allow(unsafe_code)] // proxy_wasm::main! expands to the module's exported initializer.
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> { Box::new(super::AuthRoot::default()) });
    }}
}

#[derive(Default)]
struct AuthRoot {
    config: Option<Rc<Config>>,
    vm: Option<Rc<RefCell<VmState>>>,
    /// Outstanding timer fetches: callout token -> provider index.
    calls: Vec<(u32, usize)>,
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn call_status() -> Option<u16> {
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status").ok().flatten().and_then(|s| s.parse().ok())
}

impl Context for AuthRoot {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(pos) = self.calls.iter().position(|(t, _)| *t == token) else { return };
        let (_, provider) = self.calls.swap_remove(pos);
        let (Some(vm), Some(cfg)) = (&self.vm, &self.config) else { return };
        let status = call_status();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten();
        let name = cfg.providers.get(provider).map_or("?", |p| p.name.as_str());
        if let Some(r) = vm.borrow_mut().remote.get_mut(provider) {
            match r.finished(status, body.as_deref()) {
                Ok(true) => {
                    log::info!("{FILTER}: JWKS for {name} loaded ({} keys)", r.keys.keys.len());
                    if let Some(b) = &body {
                        publish(&mut ProxyHost, name, b);
                    }
                }
                Ok(false) => log::debug!("{FILTER}: JWKS for {name} unchanged"),
                Err(e) => log::warn!("{FILTER}: JWKS for {name}: {e}; keeping {} cached keys", r.keys.keys.len()),
            }
        }
    }
}

impl RootContext for AuthRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        log::info!("{FILTER}: sluice-auth {} starting", env!("CARGO_PKG_VERSION"));
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        let env = |name: &str| ProxyHost.env_var(name);
        match Config::from_json(&bytes, &env) {
            Ok(cfg) => {
                let remote = cfg.providers.iter().any(|p| p.remote.is_some());
                self.vm = Some(Rc::new(RefCell::new(VmState::new(&cfg))));
                self.config = Some(Rc::new(cfg));
                if remote {
                    if let Err(e) = hostcalls::set_tick_period(TICK) {
                        log::warn!("{FILTER}: set_tick_period: {e:?}");
                    }
                }
                true
            }
            Err(e) => {
                log::error!("{FILTER}: invalid config: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let (Some(vm), Some(cfg)) = (&self.vm, &self.config) else { return };
        let now = now_ms();
        for (i, p) in cfg.providers.iter().enumerate() {
            let Some(remote) = &p.remote else { continue };
            if let Some(r) = vm.borrow_mut().remote.get_mut(i) {
                if r.sync_shared(&ProxyHost, &p.name) {
                    log::info!("{FILTER}: JWKS for {} taken from another worker", p.name);
                }
            }
            let due = vm.borrow().remote.get(i).is_some_and(|r| r.refresh_due(now, remote));
            if !due {
                continue;
            }
            let headers = fetch_headers(remote);
            match hostcalls::dispatch_http_call(&remote.cluster, headers, None, vec![], remote.timeout) {
                Ok(token) => {
                    self.calls.push((token, i));
                    if let Some(r) = vm.borrow_mut().remote.get_mut(i) {
                        r.started(now);
                    }
                }
                Err(e) => {
                    log::warn!("{FILTER}: JWKS fetch for {} not dispatched: {e:?}", p.name);
                    if let Some(r) = vm.borrow_mut().remote.get_mut(i) {
                        r.started(now);
                        r.in_flight_since_ms = None;
                    }
                }
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        let flow = match (&self.config, &self.vm) {
            (Some(c), Some(v)) => Some(AuthFlow::new(c.clone(), v.clone())),
            _ => None,
        };
        Some(Box::new(AuthHttp { flow }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AuthHttp {
    flow: Option<AuthFlow>,
}

fn action(step: Step) -> Action {
    match step {
        Step::Continue => Action::Continue,
        Step::Pause | Step::Replied => Action::Pause,
    }
}

impl Context for AuthHttp {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(flow) = self.flow.as_mut() else { return };
        if flow.pending_call() != Some(token) {
            return;
        }
        let status = call_status();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten();
        let mut host = ProxyHost;
        if flow.on_jwks_response(&mut host, status, body) == Step::Continue {
            if let Err(e) = hostcalls::resume_http_request() {
                log::warn!("{FILTER}: resume_http_request: {e:?}");
            }
        }
    }
}

impl HttpContext for AuthHttp {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        let mut host = ProxyHost;
        match self.flow.as_mut() {
            Some(flow) => action(flow.on_request_headers(&mut host, end_of_stream)),
            None => {
                host.send_reply(&sluice_core::errors::LocalReply::misconfigured(FILTER));
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let mut host = ProxyHost;
        match self.flow.as_mut() {
            Some(flow) => action(flow.on_request_body(&mut host, size, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let mut host = ProxyHost;
        match self.flow.as_mut() {
            Some(flow) => action(flow.on_response_headers(&mut host)),
            None => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let mut host = ProxyHost;
        match self.flow.as_mut() {
            Some(flow) => action(flow.on_response_body(&mut host, size, end_of_stream)),
            None => Action::Continue,
        }
    }
}
