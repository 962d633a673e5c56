//! proxy-wasm glue: the root context loads the config; each HTTP context forwards to
//! [`GuardSession`] with the real host.

use crate::config::{Config, FILTER};
use crate::session::{GuardSession, Step};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use sluice_core::metrics::MetricIds;
use sluice_core::proxy_host::ProxyHost;
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(GuardRoot { config: None, metrics: Rc::new(RefCell::new(MetricIds::new(1024))) })
    });
}}

struct GuardRoot {
    config: Option<Rc<Config>>,
    metrics: Rc<RefCell<MetricIds>>,
}

impl Context for GuardRoot {}

impl RootContext for GuardRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        log::info!("{FILTER}: version {}", env!("CARGO_PKG_VERSION"));
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes =
            proxy_wasm::hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX)
                .ok()
                .flatten()
                .unwrap_or_default();
        match Config::from_json(&bytes) {
            Ok(c) => {
                log::info!("{FILTER}: loaded {} guard policies", c.policies.len());
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                log::error!("{FILTER}: invalid config: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(GuardHttp {
            context_id,
            session: self.config.clone().map(|c| GuardSession::new(c, self.metrics.clone())),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct GuardHttp {
    context_id: u32,
    session: Option<GuardSession>,
}

fn action(step: Step) -> Action {
    match step {
        Step::Continue => Action::Continue,
        Step::Pause => Action::Pause,
    }
}

impl Context for GuardHttp {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(s) = self.session.as_mut() else {
            let _ = proxy_wasm::hostcalls::resume_http_request();
            return;
        };
        log::debug!("{FILTER} #{}: webhook answered", self.context_id);
        if s.on_webhook_response(&mut ProxyHost, token_id, body_size) == Step::Continue {
            if let Err(e) = proxy_wasm::hostcalls::resume_http_request() {
                log::warn!("{FILTER} #{}: resume failed: {e:?}", self.context_id);
            }
        }
    }
}

impl HttpContext for GuardHttp {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        match self.session.as_mut() {
            Some(s) => action(s.on_request_headers(&mut ProxyHost, end_of_stream)),
            None => {
                let r = sluice_core::errors::LocalReply::misconfigured(FILTER);
                sluice_core::host::Host::send_reply(&mut ProxyHost, &r);
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.session
            .as_mut()
            .map_or(Action::Continue, |s| action(s.on_request_body(&mut ProxyHost, size, end_of_stream)))
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.session.as_mut().map_or(Action::Continue, |s| action(s.on_response_headers(&mut ProxyHost, end_of_stream)))
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.session
            .as_mut()
            .map_or(Action::Continue, |s| action(s.on_response_body(&mut ProxyHost, size, end_of_stream)))
    }
}
