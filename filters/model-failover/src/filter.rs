//! proxy-wasm glue: the root context loads the config; HTTP contexts run the upstream or
//! downstream role through `ProxyHost`.

use crate::config::{load, Config, Role};
use crate::upstream::{Step, UpstreamAttempt, MAX_METRIC_NAMES};
use crate::{downstream, FILTER, VERSION};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use sluice_core::metrics::MetricIds;
use sluice_core::proxy_host::ProxyHost;
use std::cell::RefCell;
use std::rc::Rc;

/// Register the root context (called from `proxy_wasm::main!`).
pub fn start() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root {
            config: Rc::new(Config::default()),
            ids: Rc::new(RefCell::new(MetricIds::new(MAX_METRIC_NAMES))),
        })
    });
}

struct Root {
    config: Rc<Config>,
    ids: Rc<RefCell<MetricIds>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        log::info!("{FILTER}: sluice-model-failover {VERSION} starting");
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let bytes =
            proxy_wasm::hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX)
                .ok()
                .flatten()
                .unwrap_or_default();
        match load(&bytes) {
            Ok(c) => {
                log::info!(
                    "{FILTER}: configured role={:?} backup_models={} providers={}",
                    c.role,
                    c.backup_models.len(),
                    c.providers.len()
                );
                self.config = Rc::new(c);
                true
            }
            Err(e) => {
                log::error!("{FILTER}: invalid config: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            config: Rc::clone(&self.config),
            ids: Rc::clone(&self.ids),
            attempt: UpstreamAttempt::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    id: u32,
    config: Rc<Config>,
    ids: Rc<RefCell<MetricIds>>,
    attempt: UpstreamAttempt,
}

impl Context for Stream {}

impl Stream {
    /// Run `f` with the VM's metric-id cache. Callbacks do not nest (Envoy defers a wasm
    /// local reply until the callback returns), but a nested call gets a scratch cache rather
    /// than a RefCell panic.
    fn with_ids<T>(&self, f: impl FnOnce(&mut MetricIds) -> T) -> T {
        match self.ids.try_borrow_mut() {
            Ok(mut ids) => f(&mut ids),
            Err(_) => f(&mut MetricIds::new(MAX_METRIC_NAMES)),
        }
    }
}

fn action(step: Step) -> Action {
    match step {
        Step::Continue => Action::Continue,
        Step::Pause | Step::Replied => Action::Pause,
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if self.config.role != Role::Upstream {
            return Action::Continue;
        }
        let config = Rc::clone(&self.config);
        let mut attempt = std::mem::take(&mut self.attempt);
        let step = self.with_ids(|ids| attempt.on_request_headers(&config, &mut ProxyHost, ids, end_of_stream));
        self.attempt = attempt;
        log::trace!("{FILTER} [{}]: request headers -> {step:?}", self.id);
        action(step)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.config.role != Role::Upstream {
            return Action::Continue;
        }
        let config = Rc::clone(&self.config);
        let mut attempt = std::mem::take(&mut self.attempt);
        let step = self.with_ids(|ids| attempt.on_request_body(&config, &mut ProxyHost, ids, body_size, end_of_stream));
        self.attempt = attempt;
        action(step)
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let config = Rc::clone(&self.config);
        match config.role {
            Role::Upstream => {
                let mut attempt = std::mem::take(&mut self.attempt);
                let step = self.with_ids(|ids| attempt.on_response_headers(&config, &mut ProxyHost, ids));
                self.attempt = attempt;
                action(step)
            }
            Role::Downstream => {
                self.with_ids(|ids| downstream::on_response_headers(&mut ProxyHost, ids));
                Action::Continue
            }
        }
    }
}
