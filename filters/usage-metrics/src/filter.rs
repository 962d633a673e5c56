//! proxy-wasm glue: the root context parses the config and owns the per-VM metric state;
//! each HTTP context drives an [`Exchange`] over the real host.

use crate::config::Config;
use crate::exchange::{Exchange, Flow, FILTER};
use crate::recorder::Recorder;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};
use sluice_core::proxy_host::ProxyHost;
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(UsageRoot::default()) });
}}

#[derive(Default)]
struct UsageRoot {
    config: Rc<Config>,
    recorder: Option<Rc<RefCell<Recorder>>>,
}

impl Context for UsageRoot {}

impl RootContext for UsageRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        log::info!("{FILTER}: sluice-usage-metrics {} starting", env!("CARGO_PKG_VERSION"));
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, plugin_configuration_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(config) => {
                self.recorder =
                    Some(Rc::new(RefCell::new(Recorder::new(config.max_metric_names, config.max_label_values))));
                self.config = Rc::new(config);
                true
            }
            Err(e) => {
                log::error!("{FILTER}: invalid config: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let recorder = self.recorder.clone().unwrap_or_else(|| {
            Rc::new(RefCell::new(Recorder::new(self.config.max_metric_names, self.config.max_label_values)))
        });
        Some(Box::new(UsageHttp { context_id, exchange: Exchange::new(Rc::clone(&self.config)), recorder }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct UsageHttp {
    context_id: u32,
    exchange: Exchange,
    recorder: Rc<RefCell<Recorder>>,
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl UsageHttp {
    /// Run `f` with the VM's recorder; skipped (logged) in the impossible case it is busy.
    fn with_recorder(&mut self, f: impl FnOnce(&mut Exchange, &mut Recorder) -> Flow) -> Flow {
        match self.recorder.try_borrow_mut() {
            Ok(mut rec) => f(&mut self.exchange, &mut rec),
            Err(_) => {
                log::warn!("{FILTER}[{}]: recorder busy; metrics skipped", self.context_id);
                Flow::Continue
            }
        }
    }
}

impl Context for UsageHttp {}

impl HttpContext for UsageHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.exchange.on_request_headers(&mut ProxyHost, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.exchange.on_request_body(&mut ProxyHost, body_size, end_of_stream))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.with_recorder(|x, rec| x.on_response_headers(&mut ProxyHost, rec, end_of_stream)))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.with_recorder(|x, rec| x.on_response_body(&mut ProxyHost, rec, body_size, end_of_stream)))
    }

    fn on_log(&mut self) {
        self.with_recorder(|x, rec| {
            x.on_log(&mut ProxyHost, rec);
            Flow::Continue
        });
    }
}
