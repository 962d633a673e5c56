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

/// A filter built alone: its whole configuration document is the config of one plugin.
pub fn single(
    bytes: &[u8],
    env: &dyn Fn(&str) -> Option<String>,
    load: Loader,
) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    crate::config::read(bytes, |o| Ok(vec![load(o, env)?]))
}
