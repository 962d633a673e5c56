//! The route_refresh role: a connection-manager filter placed after Envoy's
//! `header_to_metadata`, before the router.
//!
//! Envoy resolves the route, and with it the `priority_group` specifier's cluster for the
//! first attempt, before the HTTP filters run; `header_to_metadata` writes the group order
//! into dynamic metadata but does not clear the route cache. Without a clear, only the retries
//! would follow the order (the specifier re-reads the metadata on `refresh_cluster_on_retry`).
//! This stage calls Envoy's `clear_route_cache` foreign function for routes that carry
//! `failover_groups`, so the route is matched again and the first attempt uses the order too.
//! It reads nothing itself (the pipeline's route lookup is cached per route name).

use crate::groups::ROUTE_KEY;
use crate::stage::metric;
use crate::NAME;
use sluice_core::exchange::Exchange;
use sluice_core::host::Host;
use sluice_core::metrics::Metrics;
use sluice_core::stage::{Flow, Stage};
use std::rc::Rc;

/// Envoy's foreign function that clears the stream's cached route.
pub const CLEAR_ROUTE_CACHE: &str = "clear_route_cache";

/// One request through the route_refresh role.
pub struct RouteRefreshStage {
    metrics: Rc<Metrics>,
}

impl RouteRefreshStage {
    /// A stage sharing the VM's metrics.
    pub fn new(metrics: Rc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl Stage for RouteRefreshStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if x.route.get(ROUTE_KEY).is_none() {
            return Flow::Continue;
        }
        if h.call_foreign_function(CLEAR_ROUTE_CACHE, &[]).is_some() {
            self.metrics.count(h, metric::ROUTE_REFRESHED, &[], 1);
        } else {
            // Only the first attempt misses the order then; the retries still follow it.
            log::warn!("{NAME} #{}: clear_route_cache failed; the first attempt uses the configured order", x.id);
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use sluice_core::encoding::test_encode_metadata;
    use sluice_core::host::{CallKind, CountingHost, FakeHost};
    use sluice_core::pipeline::{Act, Pipeline, Slot};
    use sluice_core::route::RouteCache;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn host(route_meta: serde_json::Value) -> CountingHost<FakeHost> {
        let mut h = FakeHost::with_request_headers(&[(":method", "POST"), (":path", "/v1/chat/completions")]);
        h.set_prop(&["xds", "route_name"], "chat");
        h.properties.insert("xds/route_metadata".into(), test_encode_metadata("sluice", &route_meta));
        CountingHost::new(h)
    }

    /// Value-returning host calls per request: the request headers (1 map read), the route
    /// name (+ its metadata on a route's first request in 10 s), and the clear itself (1) on
    /// routes with `failover_groups`; nothing else.
    #[test]
    fn clears_the_route_cache_only_on_routes_with_groups_within_budget() {
        let p = crate::assemble(br#"{"role":"route_refresh"}"#, &|_| None).unwrap().pop().unwrap();
        let groups = serde_json::json!({"failover_groups": [{"name": "a", "clusters": [{"cluster_name": "a"}]}]});
        for (meta, cleared) in [(groups, true), (serde_json::json!({"provider": "x"}), false)] {
            let routes = Rc::new(RefCell::new(RouteCache::default())); // per VM, like the glue's
            let mut pl = Pipeline::new(1, vec![Slot::of(p.as_ref())], Rc::clone(&routes));
            let mut h = host(meta.clone());
            assert_eq!(pl.on_request_headers(&mut h, false), Act::Continue, "never holds the request");
            assert_eq!(h.inner.foreign_calls.iter().any(|(n, _)| n == "clear_route_cache"), cleared, "{meta}");
            assert!(h.total() <= 3 + u32::from(cleared), "{} ({:?})", h.total(), h.property_reads.borrow());
            // The route is cached now: its name only, plus the clear.
            h.reset();
            let mut pl = Pipeline::new(2, vec![Slot::of(p.as_ref())], Rc::clone(&routes));
            pl.on_request_headers(&mut h, false);
            assert_eq!(h.count(CallKind::Foreign), u32::from(cleared));
            assert!(h.total() <= 2 + u32::from(cleared), "{} ({:?})", h.total(), h.property_reads.borrow());
        }
    }
}
