//! proxy-wasm glue: config loading in the root context, one [`RequestState`] per request.

use crate::config::Config;
use crate::enrich::{Metrics, RequestState, Step};
use crate::FILTER_NAME;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};
use sluice_core::proxy_host::ProxyHost;
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(EnrichmentRoot::default()) });
}}

#[derive(Default)]
struct EnrichmentRoot {
    config: Option<Rc<Config>>,
    metrics: Rc<RefCell<Metrics>>,
}

impl Context for EnrichmentRoot {}

impl RootContext for EnrichmentRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        log::info!("{FILTER_NAME}: sluice-prompt-enrichment {} starting", env!("CARGO_PKG_VERSION"));
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        match Config::from_json(&bytes) {
            Ok(cfg) => {
                log::info!(
                    "{FILTER_NAME}: configured {} profile(s), default {:?}",
                    cfg.profiles.len(),
                    cfg.default_profile
                );
                self.config = Some(Rc::new(cfg));
                true
            }
            Err(e) => {
                log::error!("{FILTER_NAME}: invalid config: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(EnrichmentHttp {
            context_id,
            config: self.config.clone(),
            metrics: Rc::clone(&self.metrics),
            state: RequestState::new(context_id),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct EnrichmentHttp {
    context_id: u32,
    config: Option<Rc<Config>>,
    metrics: Rc<RefCell<Metrics>>,
    state: RequestState,
}

impl EnrichmentHttp {
    fn action(step: Step) -> Action {
        match step {
            Step::Continue => Action::Continue,
            Step::Pause => Action::Pause,
        }
    }
}

impl Context for EnrichmentHttp {}

impl HttpContext for EnrichmentHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(cfg) = self.config.clone() else {
            log::error!("{FILTER_NAME}[{}]: no configuration loaded; request passed unchanged", self.context_id);
            return Action::Continue;
        };
        let Ok(mut metrics) = self.metrics.try_borrow_mut() else {
            return Action::Continue;
        };
        Self::action(self.state.on_request_headers(&mut ProxyHost, &cfg, &mut metrics, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(cfg) = self.config.clone() else {
            return Action::Continue;
        };
        let Ok(mut metrics) = self.metrics.try_borrow_mut() else {
            return Action::Continue;
        };
        Self::action(self.state.on_request_body(&mut ProxyHost, &cfg, &mut metrics, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let Ok(mut metrics) = self.metrics.try_borrow_mut() else {
            return Action::Continue;
        };
        Self::action(self.state.on_request_trailers(&mut ProxyHost, &mut metrics))
    }
}
