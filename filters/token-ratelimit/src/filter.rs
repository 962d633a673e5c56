//! proxy-wasm glue: root context (config, cleanup tick) and HTTP context (maps the
//! limiter's verdicts to actions, performs the RLS gRPC calls).

use crate::budget::Store;
use crate::config::{Config, Mode, FILTER};
use crate::limiter::{RequestLimiter, Verdict};
use crate::rls;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType};
use sluice_core::host::Host;
use sluice_core::metrics::{tagged_name, MetricIds, MetricKind};
use sluice_core::proxy_host::ProxyHost;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

#[allow(unsafe_code)]
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| Box::new(super::Root::default()));
    }}
}

type Metrics = Rc<RefCell<MetricIds>>;

fn count_decision(metrics: &Metrics, action: &str) {
    count(metrics, "sluice_ratelimit_requests", action);
}

fn count(metrics: &Metrics, base: &str, action: &str) {
    let name = tagged_name(base, &[("sluice_action", action)]);
    let mut host = ProxyHost;
    let id = metrics.borrow_mut().get_or_define(&name, |n| host.define_metric(MetricKind::Counter, n));
    if let Some(id) = id {
        host.increment_metric(id, 1);
    }
}

#[derive(Default)]
struct Root {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        log::info!("{FILTER}: sluice-token-ratelimit {} starting", env!("CARGO_PKG_VERSION"));
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        match Config::from_json(&bytes) {
            Ok(cfg) => {
                if cfg.mode == Mode::Local {
                    let mut host = ProxyHost;
                    if host.shared_data(crate::budget::INDEX_KEY).0.is_none() {
                        let _ = host.set_shared_data(crate::budget::INDEX_KEY, b"", None);
                    }
                    if let Err(e) = hostcalls::set_tick_period(cfg.cleanup_interval) {
                        log::warn!("{FILTER}: set_tick_period: {e:?}");
                    }
                }
                self.config = Some(Rc::new(cfg));
                self.metrics = Some(Rc::new(RefCell::new(MetricIds::new(32))));
                true
            }
            Err(e) => {
                log::error!("{FILTER}: invalid config: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(cfg) = &self.config else { return };
        let mut host = ProxyHost;
        let now = host.now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        let n = Store::new(&mut host, cfg.cas_retries, cfg.max_counters).cleanup(now);
        if n > 0 {
            log::debug!("{FILTER}: emptied {n} stale counters");
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            id: context_id,
            limiter: self.config.clone().map(RequestLimiter::new),
            metrics: self.metrics.clone().unwrap_or_else(|| Rc::new(RefCell::new(MetricIds::new(0)))),
            rls_token: None,
            correction_token: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    id: u32,
    limiter: Option<RequestLimiter>,
    metrics: Metrics,
    rls_token: Option<u32>,
    correction_token: Option<u32>,
}

impl Http {
    fn settle_metric(&mut self) {
        if let Some(action) = self.limiter.as_mut().and_then(|l| l.settled.take()) {
            count(&self.metrics, "sluice_ratelimit_settled", action);
        }
    }

    fn decision_metric(&self) {
        let state =
            ProxyHost.property(&[sluice_core::keys::RATELIMIT]).map(|b| String::from_utf8_lossy(&b).into_owned());
        let action = match state.as_deref() {
            Some("ok") => "allow",
            Some(s) if s.starts_with("refused:") => "deny",
            Some(s) if s.starts_with("shadow:") => "shadow",
            Some(s) if s.starts_with("error:") => "error",
            _ => return,
        };
        count_decision(&self.metrics, action);
    }

    fn act(&mut self, verdict: Verdict) -> Action {
        match verdict {
            Verdict::Continue => {
                self.decision_metric();
                Action::Continue
            }
            Verdict::Pause => Action::Pause,
            Verdict::Replied => {
                self.decision_metric();
                Action::Pause
            }
            Verdict::CallRls(bytes) => {
                let Some(Mode::Rls(rls_cfg)) = self.limiter.as_ref().map(|l| l.mode()) else {
                    return Action::Continue;
                };
                match hostcalls::dispatch_grpc_call(
                    &rls_cfg.cluster,
                    rls::SERVICE,
                    rls::METHOD,
                    vec![],
                    Some(&bytes),
                    rls_cfg.timeout,
                ) {
                    Ok(token) => {
                        self.rls_token = Some(token);
                        Action::Pause
                    }
                    Err(e) => {
                        log::warn!("{FILTER} #{}: dispatch_grpc_call to {}: {e:?}", self.id, rls_cfg.cluster);
                        let v = match self.limiter.as_mut() {
                            Some(l) => l.on_rls_response(&mut ProxyHost, 14, None),
                            None => Verdict::Continue,
                        };
                        self.act(v)
                    }
                }
            }
        }
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if self.correction_token == Some(token_id) {
            // The correction was recorded (or failed: logged); let the held last chunk go.
            self.correction_token = None;
            if status_code != 0 {
                log::warn!("{FILTER} #{}: RLS correction failed with gRPC status {status_code}", self.id);
            }
            let _ = hostcalls::resume_http_response();
            return;
        }
        if self.rls_token != Some(token_id) {
            return;
        }
        self.rls_token = None;
        let body = if status_code == 0 {
            hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size).ok().flatten()
        } else {
            None
        };
        let verdict = match self.limiter.as_mut() {
            Some(l) => l.on_rls_response(&mut ProxyHost, status_code, body.as_deref()),
            None => Verdict::Continue,
        };
        // On Replied, send_http_response already ended the stream.
        if self.act(verdict) == Action::Continue {
            let _ = hostcalls::resume_http_request();
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let Some(l) = self.limiter.as_mut() else {
            // No valid config (cannot happen: on_configure refused): fail closed.
            ProxyHost.send_reply(&crate::limiter::error_reply(
                500,
                "server_error",
                "gateway_misconfigured",
                "token-ratelimit: gateway filter is misconfigured",
            ));
            return Action::Pause;
        };
        let v = l.on_request_headers(&mut ProxyHost, end_of_stream);
        self.act(v)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(l) = self.limiter.as_mut() else { return Action::Continue };
        let v = l.on_request_body(&mut ProxyHost, body_size, end_of_stream);
        self.act(v)
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if let Some(l) = self.limiter.as_mut() {
            l.on_response_headers(&mut ProxyHost, end_of_stream);
        }
        self.settle_metric();
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(l) = self.limiter.as_mut() else { return Action::Continue };
        l.on_response_body(&mut ProxyHost, body_size, end_of_stream);
        let corrections = l.corrections.take();
        let mode = l.mode();
        self.settle_metric();
        let Some(bytes) = corrections else { return Action::Continue };
        let Mode::Rls(rls_cfg) = mode else { return Action::Continue };
        // Hold the last chunk until the RLS has the correction, so the client's next request
        // sees it (and the call is not cancelled with the finished stream).
        match hostcalls::dispatch_grpc_call(
            &rls_cfg.cluster,
            rls::SERVICE,
            rls::METHOD,
            vec![],
            Some(&bytes),
            rls_cfg.timeout,
        ) {
            Ok(token) => {
                self.correction_token = Some(token);
                Action::Pause
            }
            Err(e) => {
                log::warn!("{FILTER} #{}: RLS correction not sent: {e:?}", self.id);
                Action::Continue
            }
        }
    }

    fn on_log(&mut self) {
        if let Some(l) = self.limiter.as_mut() {
            l.on_log(&mut ProxyHost);
        }
        self.settle_metric();
    }
}
