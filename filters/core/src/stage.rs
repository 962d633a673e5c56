//! The one stage interface. Every sluice filter is a [`Plugin`] (configured once per VM)
//! that makes a [`Stage`] per request; the pipeline (`crate::pipeline`) runs a list of them
//! over one [`Exchange`]. A filter crate built alone runs a list of one; the composed
//! gateway runs several in one Envoy filter, paying one set of callbacks, one body copy and
//! one parse for all of them.
//!
//! Order: request callbacks run in list order, response callbacks in reverse order (the
//! stage closest to the provider sees the answer first), exactly as separate Envoy filters
//! listed in that order would.

use crate::config::{ConfigError, Obj};
use crate::errors::LocalReply;
use crate::exchange::{Chunk, Exchange};
use crate::host::{HeaderPairs, Host};
use std::time::Duration;

/// What a stage wants after a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the next stage.
    Continue,
    /// The stage started a callout (`Exchange::await_callout`); hold the stream until it
    /// answers (`Stage::on_callout` then decides).
    Wait,
    /// Answer with this instead (a local reply; in a response callback the answer replaces
    /// the provider's in place).
    Reply(LocalReply),
}

/// A callout answer, read by the pipeline before the stage sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CalloutResponse {
    /// The token `dispatch_*` returned.
    pub token: u32,
    /// HTTP `:status` (`None`: no response — timeout, reset, no upstream).
    pub status: Option<u16>,
    /// gRPC status (gRPC calls: 0 = OK).
    pub grpc_status: Option<u32>,
    /// Response headers (HTTP calls).
    pub headers: HeaderPairs,
    /// Response body (HTTP) or message (gRPC).
    pub body: Option<Vec<u8>>,
}

impl CalloutResponse {
    /// True for an HTTP 2xx or a gRPC OK.
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s)) || self.grpc_status == Some(0)
    }
}

/// One filter's work on one request. Every method has a do-nothing default.
pub trait Stage {
    /// Request headers are in `x.request`; ask for the body with `x.want_body`.
    fn on_request_headers(&mut self, _x: &mut Exchange, _h: &mut dyn Host) -> Flow {
        Flow::Continue
    }

    /// The request is complete: the body (when a stage asked for it) is in `x.request`;
    /// request trailers count as the end of the body. Decide here.
    fn on_request(&mut self, _x: &mut Exchange, _h: &mut dyn Host) -> Flow {
        Flow::Continue
    }

    /// A callout this stage started answered (or failed: `status`/`grpc_status` say so).
    /// Must decide: continue, reply, or wait for another callout.
    fn on_callout(&mut self, _x: &mut Exchange, _h: &mut dyn Host, _r: CalloutResponse) -> Flow {
        Flow::Continue
    }

    /// Response headers are in `x.response`; ask for the body with `x.want_response`.
    fn on_response_headers(&mut self, _x: &mut Exchange, _h: &mut dyn Host) -> Flow {
        Flow::Continue
    }

    /// A response body chunk (SSE events parsed, JSON copied or buffered). `Wait` is allowed
    /// on the last chunk only (it holds the end of the response until the callout answers).
    fn on_response_body(&mut self, _x: &mut Exchange, _h: &mut dyn Host, _c: &mut Chunk) -> Flow {
        Flow::Continue
    }

    /// The stream is over (access-log time), whether or not it completed.
    fn on_done(&mut self, _x: &mut Exchange, _h: &mut dyn Host) {}
}

/// A configured filter, once per VM: makes a stage per request and does the per-VM work
/// (timers, queues, root callouts). Per-VM state lives inside, behind `Rc`/`RefCell`.
///
/// The one `RefCell` policy: borrows never outlive a callback, so a busy cell (`try_borrow*`
/// failing) can only be a re-entrancy bug, and it never means "no policy". A busy cache is
/// bypassed (the value is read from the host again); a busy cell a decision needs makes the
/// stage act on its failure mode (auth and rate limit deny); busy bookkeeping that changes no
/// answer (metric ids, label caps, cache store jobs, correction answers) is skipped, counted or
/// logged; a busy cache lookup of semantic-cache is a miss (its failure mode is allow).
pub trait Plugin {
    /// Name used in logs, metrics and error bodies (`auth`, `token-ratelimit`, ...).
    fn name(&self) -> &'static str;

    /// A stage for one request.
    fn stage(&self) -> Box<dyn Stage>;

    /// Largest request body this plugin buffers (413 above it).
    fn body_limit(&self) -> Option<usize> {
        None
    }

    /// Whether the request headers must wait for this plugin's decision on the body (true:
    /// a refused request never reaches the provider, which needs Envoy's
    /// `allow_on_headers_stop_iteration: true`). A plugin that only reads or rewrites the body
    /// returns false: its filter works without that setting (headers go on, the body is held).
    fn holds_headers(&self) -> bool {
        true
    }

    /// Whether this filter publishes the requested model (`sluice.model`) after the request
    /// phase. The upstream role returns false: its body names the model of one attempt.
    fn publishes_model(&self) -> bool {
        true
    }

    /// How often `on_tick` should run.
    fn tick_period(&self) -> Option<Duration> {
        None
    }

    /// After configuration, in the root context (register queues, start fetches).
    fn on_start(&self, _h: &mut dyn Host) {}

    /// Timer (root context).
    fn on_tick(&self, _h: &mut dyn Host) {}

    /// A callout made from the root context answered; true when it was this plugin's.
    fn on_root_callout(&self, _h: &mut dyn Host, _r: &CalloutResponse) -> bool {
        false
    }

    /// A shared queue has items (root context).
    fn on_queue_ready(&self, _h: &mut dyn Host, _queue: u32) {}
}

/// Builds a plugin from its config object (the one reader) and the VM's environment.
pub type Loader = fn(o: Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError>;

/// Builds the plugins of one Envoy filter from its whole configuration document.
pub type Assemble = fn(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError>;

/// The one option every filter takes next to its own fields: `"hold_headers": false` lets
/// the request headers go upstream while the body is still being read, for deployments that
/// cannot set Envoy's `allow_on_headers_stop_iteration` (Istio `WasmPlugin`). A refused
/// request is then reset upstream before its body was sent (the provider never gets a whole
/// request, but it sees the headers); see docs/security.md.
pub const HOLD_HEADERS: &str = "hold_headers";

/// A plugin whose filter must not hold request headers.
struct NoHold(Box<dyn Plugin>);

impl Plugin for NoHold {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn stage(&self) -> Box<dyn Stage> {
        self.0.stage()
    }
    fn body_limit(&self) -> Option<usize> {
        self.0.body_limit()
    }
    fn holds_headers(&self) -> bool {
        false
    }
    fn publishes_model(&self) -> bool {
        self.0.publishes_model()
    }
    fn tick_period(&self) -> Option<Duration> {
        self.0.tick_period()
    }
    fn on_start(&self, h: &mut dyn Host) {
        self.0.on_start(h);
    }
    fn on_tick(&self, h: &mut dyn Host) {
        self.0.on_tick(h);
    }
    fn on_root_callout(&self, h: &mut dyn Host, r: &CalloutResponse) -> bool {
        self.0.on_root_callout(h, r)
    }
    fn on_queue_ready(&self, h: &mut dyn Host, queue: u32) {
        self.0.on_queue_ready(h, queue);
    }
}

/// Take the filter-level `hold_headers` option out of a configuration document.
pub fn take_hold_headers(doc: &mut serde_json::Value) -> Result<bool, ConfigError> {
    let Some(map) = doc.as_object_mut() else { return Ok(true) };
    match map.remove(HOLD_HEADERS) {
        None | Some(serde_json::Value::Null) => Ok(true),
        Some(serde_json::Value::Bool(b)) => Ok(b),
        Some(v) => {
            Err(ConfigError::new(HOLD_HEADERS, format!("expected true or false, got {}", crate::config::json_kind(&v))))
        }
    }
}

/// Apply `hold_headers` to the plugins of one filter.
pub fn with_hold(plugins: Vec<Box<dyn Plugin>>, hold: bool) -> Vec<Box<dyn Plugin>> {
    if hold {
        return plugins;
    }
    plugins.into_iter().map(|p| Box::new(NoHold(p)) as Box<dyn Plugin>).collect()
}

/// A filter built alone: its whole configuration document is the config of one plugin
/// (plus the filter-level `hold_headers` option).
pub fn single(
    bytes: &[u8],
    env: &dyn Fn(&str) -> Option<String>,
    load: Loader,
) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    let mut doc = crate::config::parse_document(bytes)?;
    let hold = take_hold_headers(&mut doc)?;
    let plugin = load(Obj::new(&doc, "")?, env)?;
    Ok(with_hold(vec![plugin], hold))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct P;
    impl Plugin for P {
        fn name(&self) -> &'static str {
            "p"
        }
        fn stage(&self) -> Box<dyn Stage> {
            struct S;
            impl Stage for S {}
            Box::new(S)
        }
    }

    fn load(o: Obj<'_>, _env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError> {
        o.known(&["x"])?;
        Ok(Box::new(P))
    }

    #[test]
    fn hold_headers_is_a_filter_level_option() {
        let env = |_: &str| None;
        assert!(single(br#"{"x":1}"#, &env, load).unwrap()[0].holds_headers());
        assert!(!single(br#"{"x":1,"hold_headers":false}"#, &env, load).unwrap()[0].holds_headers());
        assert_eq!(single(br#"{"hold_headers":"no"}"#, &env, load).err().unwrap().field, "hold_headers");
        assert_eq!(single(br#"{"y":1}"#, &env, load).err().unwrap().field, "y");
    }
}
