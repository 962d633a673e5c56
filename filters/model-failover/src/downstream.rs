//! The downstream role: in the connection manager, before the router.
//!
//! Request: a client's copies of Envoy's and sluice's internal request headers
//! (`x-envoy-attempt-count`, `x-sluice-original-status`) are removed, so the upstream role
//! never mistakes a client value for Envoy's, and the mark `sluice.failover_downstream`
//! tells the upstream role the attempt count can be trusted.
//!
//! Response: when the last attempt was a provider 429 the upstream role showed the router a
//! 503 (so outlier detection and the retry policy act on it); here the client gets the
//! original 429 back, with the provider's `retry-after` (never removed), and the internal
//! header is dropped. Filter state written upstream is visible downstream (verified with
//! Envoy 1.40), and filter state written here is visible to the upstream role.

use crate::config::{INTERNAL_REQUEST_HEADERS, ORIGINAL_STATUS_HEADER};
use crate::stage::metric;
use crate::NAME;
use sluice_core::exchange::Exchange;
use sluice_core::host::Host;
use sluice_core::json::lossy;
use sluice_core::keys;
use sluice_core::metrics::Metrics;
use sluice_core::stage::{Flow, Stage};
use std::rc::Rc;

/// One request through the downstream role.
pub struct DownstreamStage {
    metrics: Rc<Metrics>,
}

impl DownstreamStage {
    /// A stage sharing the VM's metrics.
    pub fn new(metrics: Rc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl Stage for DownstreamStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        for name in INTERNAL_REQUEST_HEADERS {
            if x.request.header(name).is_some() {
                log::debug!("{NAME} #{}: removed the client's {name}", x.id);
                x.set_request_header(h, name, None);
                self.metrics.count(h, metric::CLIENT_HEADER_REMOVED, &[], 1);
            }
        }
        keys::set_filter_state(h, keys::FAILOVER_DOWNSTREAM, "1");
        Flow::Continue
    }

    fn on_response_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let Some(orig) = x.response.header(ORIGINAL_STATUS_HEADER).map(lossy) else {
            return Flow::Continue;
        };
        match orig.trim().parse::<u32>() {
            Ok(code) if (100..=599).contains(&code) && !x.response.local => {
                h.set_response_header(":status", Some(code.to_string().as_bytes()));
                x.response.status = code;
                self.metrics.count(h, metric::STATUS_RESTORED, &[], 1);
            }
            _ => log::warn!("{NAME}: ignoring unreadable {ORIGINAL_STATUS_HEADER}"),
        }
        h.set_response_header(ORIGINAL_STATUS_HEADER, None);
        x.response.headers.retain(|(k, _)| k != ORIGINAL_STATUS_HEADER);
        Flow::Continue
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use crate::config::ORIGINAL_STATUS_HEADER;
    use crate::stage::metric;
    use sluice_core::host::{CountingHost, FakeHost, Phase};
    use sluice_core::keys;
    use sluice_core::pipeline::{Act, Pipeline, Slot};
    use sluice_core::route::RouteCache;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn plugin() -> Box<dyn sluice_core::stage::Plugin> {
        crate::assemble(br#"{"role":"downstream"}"#, &|_| None).unwrap().pop().unwrap()
    }

    fn run(p: &dyn sluice_core::stage::Plugin, req: &[(&str, &str)], resp: &[(&str, &str)]) -> FakeHost {
        let mut pl = Pipeline::new(1, vec![Slot::of(p)], Rc::new(RefCell::new(RouteCache::default())));
        let mut h = FakeHost::with_request_headers(req);
        assert_eq!(pl.on_request_headers(&mut h, false), Act::Continue, "never holds the request");
        assert_eq!(pl.on_request_body(&mut h, 10, true), Act::Continue);
        h.req_headers_sent = true;
        h.phase = Phase::ResponseHeaders;
        h.resp_headers = resp.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        assert_eq!(pl.on_response_headers(&mut h, false), Act::Continue);
        h
    }

    #[test]
    fn client_copies_of_internal_headers_are_removed_and_the_mark_set() {
        let p = plugin();
        let h = run(
            p.as_ref(),
            &[(":method", "POST"), ("x-envoy-attempt-count", "2"), (ORIGINAL_STATUS_HEADER, "200"), ("x-ok", "1")],
            &[(":status", "200")],
        );
        assert_eq!(h.req_header("x-envoy-attempt-count"), None);
        assert_eq!(h.req_header(ORIGINAL_STATUS_HEADER), None);
        assert_eq!(h.req_header("x-ok").as_deref(), Some("1"));
        assert_eq!(h.state(keys::FAILOVER_DOWNSTREAM).as_deref(), Some("1"));
        assert_eq!(h.metric(metric::CLIENT_HEADER_REMOVED), Some(2));
        assert!(h.refused.is_empty(), "{:?}", h.refused);
    }

    #[test]
    fn restores_429_and_strips_the_internal_header() {
        let p = plugin();
        let h = run(p.as_ref(), &[], &[(":status", "503"), ("retry-after", "60"), (ORIGINAL_STATUS_HEADER, "429")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("429"));
        assert_eq!(h.resp_header("retry-after").as_deref(), Some("60"));
        assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER), None);
        assert_eq!(h.metric(metric::STATUS_RESTORED), Some(1));
    }

    #[test]
    fn success_and_garbage() {
        let p = plugin();
        let h = run(p.as_ref(), &[], &[(":status", "200")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("200"));
        assert_eq!(h.metric(metric::STATUS_RESTORED), None);
        let p = plugin();
        let h = run(p.as_ref(), &[], &[(":status", "503"), (ORIGINAL_STATUS_HEADER, "4290")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("503"));
        assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER), None);
    }

    /// Value-returning host calls per request: the request headers (one map read) and the
    /// route name + metadata (the pipeline's, cached per route), the response headers (one
    /// map read). The role itself reads nothing.
    #[test]
    fn host_call_budget() {
        let p = plugin();
        let mut pl = Pipeline::new(1, vec![Slot::of(p.as_ref())], Rc::new(RefCell::new(RouteCache::default())));
        let mut h =
            CountingHost::new(FakeHost::with_request_headers(&[(":method", "POST"), ("x-envoy-attempt-count", "3")]));
        pl.on_request_headers(&mut h, false);
        pl.on_request_body(&mut h, 10, true);
        h.inner.phase = Phase::ResponseHeaders;
        h.inner.resp_headers = vec![(":status".into(), b"200".to_vec())];
        pl.on_response_headers(&mut h, false);
        assert!(h.total() <= 4, "{} ({:?})", h.total(), h.property_reads.borrow());
    }
}
