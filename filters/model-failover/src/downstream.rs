//! The downstream role: in the connection manager, before the router.
//!
//! Request: a client's copies of Envoy's and sluice's internal request headers
//! (`x-envoy-attempt-count`, `x-sluice-original-status`, `x-sluice-failover-groups`) are
//! removed, so the upstream role never mistakes a client value for Envoy's and a client can
//! never choose the group order; the mark `sluice.failover_downstream` tells the upstream
//! role the attempt count can be trusted. On a route with `failover_groups` metadata the
//! cooldown table is read (one shared-data read) and, when some of the route's clusters
//! cool, the group order without them is written to `x-sluice-failover-groups` for Envoy's
//! `header_to_metadata` filter (then `route_refresh`, then the router's `priority_group`
//! specifier); when every cluster cools, the client gets 429 with the shortest remaining wait.
//!
//! Response: the internal `x-sluice-retry` marker (the upstream role's context-window verdict,
//! left on the last answer when no retry was left) is removed; when the upstream role showed
//! the router a 503 for a provider 429 (`rate_limit_status_to: 503`), the client gets the
//! original 429 back, with the provider's `retry-after` (never removed). Filter state written
//! upstream is visible downstream (verified with Envoy 1.40), and filter state written here
//! is visible to the upstream role.

use crate::config::{GROUPS_HEADER, INTERNAL_REQUEST_HEADERS, ORIGINAL_STATUS_HEADER, RETRY_MARKER_HEADER};
use crate::cooldown;
use crate::groups::{self, Group, Plan, ROUTE_KEY};
use crate::stage::metric;
use crate::NAME;
use sluice_core::errors::LocalReply;
use sluice_core::exchange::Exchange;
use sluice_core::host::Host;
use sluice_core::json::lossy;
use sluice_core::keys;
use sluice_core::metrics::Metrics;
use sluice_core::route::Route;
use sluice_core::stage::{Flow, Stage};
use std::cell::RefCell;
use std::rc::Rc;

/// Most routes whose groups are kept parsed per VM (a short list: few routes carry groups).
const MAX_ROUTES: usize = 64;

/// A route's groups as parsed from its metadata (`None`: invalid, logged once).
type Parsed = Option<Rc<Vec<Group>>>;

/// Per-VM state of the downstream role.
pub struct DownstreamShared {
    /// Metrics.
    pub metrics: Metrics,
    /// Parsed groups with the route settings they were parsed from (the pipeline re-reads a
    /// route's metadata every 10 s; a new `Rc` means parse again).
    routes: RefCell<Vec<(Rc<Route>, Parsed)>>,
}

impl Default for DownstreamShared {
    fn default() -> Self {
        Self::new()
    }
}

impl DownstreamShared {
    /// Fresh state.
    pub fn new() -> Self {
        Self { metrics: Metrics::new(crate::stage::MAX_METRIC_NAMES), routes: RefCell::new(Vec::new()) }
    }

    /// The groups of `route` (parsed once per route settings).
    fn groups(&self, route: &Rc<Route>) -> Parsed {
        if let Ok(cache) = self.routes.try_borrow() {
            if let Some((_, parsed)) = cache.iter().find(|(r, _)| Rc::ptr_eq(r, route)) {
                return parsed.clone();
            }
        }
        let parsed = match groups::parse(route.get(ROUTE_KEY)?) {
            Ok(g) => Some(Rc::new(g)),
            Err(e) => {
                log::warn!("{NAME}: route {:?}: ignoring {e}; the configured group order applies", route.name);
                None
            }
        };
        if !route.name.is_empty() {
            if let Ok(mut cache) = self.routes.try_borrow_mut() {
                // The pipeline hands out a new `Rc` when it re-reads a route: drop the old one.
                cache.retain(|(r, _)| r.name != route.name);
                if cache.len() >= MAX_ROUTES {
                    cache.clear();
                }
                cache.push((Rc::clone(route), parsed.clone()));
            }
        }
        parsed
    }
}

/// The reply when every cluster of the route cools.
pub fn all_cooling(wait: std::time::Duration) -> LocalReply {
    let secs = wait.as_millis().div_ceil(1000).max(1);
    LocalReply::openai_error(
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        &format!("{NAME}: every provider of this route asked to wait (Retry-After); try again in {secs} s"),
    )
    .with_header("retry-after", &secs.to_string())
}

/// One request through the downstream role.
pub struct DownstreamStage {
    shared: Rc<DownstreamShared>,
}

impl DownstreamStage {
    /// A stage sharing the VM's state.
    pub fn new(shared: Rc<DownstreamShared>) -> Self {
        Self { shared }
    }

    /// Write the group order for this request from the cooldown table.
    fn order(&self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let route = Rc::clone(&x.route);
        let Some(groups) = self.shared.groups(&route) else { return Flow::Continue };
        let table = cooldown::read(h);
        let now = cooldown::unix_ms(h.now());
        match groups::plan(&groups, &table, now) {
            Plan::Configured => Flow::Continue,
            Plan::Override(order, cooling) => {
                log::debug!("{NAME} #{}: clusters cooling {cooling:?}; group order {order}", x.id);
                x.set_request_header(h, GROUPS_HEADER, Some(groups::header_value(&order).as_bytes()));
                self.shared.metrics.count(h, metric::COOLDOWN_OVERRIDE, &[], 1);
                Flow::Continue
            }
            Plan::AllCooling(wait) => {
                log::info!("{NAME} #{}: every cluster of route {:?} cools; answering 429", x.id, route.name);
                self.shared.metrics.count(h, metric::ALL_COOLING, &[], 1);
                Flow::Reply(all_cooling(wait))
            }
        }
    }
}

impl Stage for DownstreamStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        for name in INTERNAL_REQUEST_HEADERS {
            if x.request.header(name).is_some() {
                log::debug!("{NAME} #{}: removed the client's {name}", x.id);
                x.set_request_header(h, name, None);
                self.shared.metrics.count(h, metric::CLIENT_HEADER_REMOVED, &[], 1);
            }
        }
        keys::set_filter_state(h, keys::FAILOVER_DOWNSTREAM, "1");
        self.order(x, h)
    }

    fn on_response_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if x.response.header(RETRY_MARKER_HEADER).is_some() {
            h.set_response_header(RETRY_MARKER_HEADER, None);
            x.response.headers.retain(|(k, _)| k != RETRY_MARKER_HEADER);
        }
        let Some(orig) = x.response.header(ORIGINAL_STATUS_HEADER).map(lossy) else {
            return Flow::Continue;
        };
        match orig.trim().parse::<u32>() {
            Ok(code) if (100..=599).contains(&code) && !x.response.local => {
                h.set_response_header(":status", Some(code.to_string().as_bytes()));
                x.response.status = code;
                self.shared.metrics.count(h, metric::STATUS_RESTORED, &[], 1);
            }
            _ => log::warn!("{NAME}: ignoring unreadable {ORIGINAL_STATUS_HEADER}"),
        }
        h.set_response_header(ORIGINAL_STATUS_HEADER, None);
        x.response.headers.retain(|(k, _)| k != ORIGINAL_STATUS_HEADER);
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{GROUPS_HEADER, ORIGINAL_STATUS_HEADER};
    use crate::stage::metric;
    use crate::{cooldown, groups};
    use sluice_core::encoding::test_encode_metadata;
    use sluice_core::host::{CallKind, CountingHost, FakeHost, Phase};
    use sluice_core::keys;
    use sluice_core::pipeline::{Act, Pipeline, Slot};
    use sluice_core::route::RouteCache;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::{Duration, UNIX_EPOCH};

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
    fn the_retry_marker_never_reaches_the_client() {
        let p = plugin();
        let h = run(p.as_ref(), &[], &[(":status", "400"), ("x-sluice-retry", "context-length")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("400"));
        assert_eq!(h.resp_header("x-sluice-retry"), None);
    }

    const GROUPS: &str = r#"[{"name":"g1","clusters":[{"cluster_name":"a","weight":1}]},
                             {"name":"g2","clusters":[{"cluster_name":"b","weight":1}]},
                             {"name":"g3","clusters":[{"cluster_name":"c","weight":1}]}]"#;

    /// A request on a route with `failover_groups`, the cooldown table given (unix ms).
    fn grouped(p: &dyn sluice_core::stage::Plugin, table: &[(&str, u64)], client: Option<&str>) -> (Act, FakeHost) {
        let mut pl = Pipeline::new(1, vec![Slot::of(p)], Rc::new(RefCell::new(RouteCache::default())));
        let mut req = vec![(":method", "POST"), (":path", "/v1/chat/completions")];
        if let Some(c) = client {
            req.push((GROUPS_HEADER, c));
        }
        let mut h = FakeHost::with_request_headers(&req);
        h.set_prop(&["xds", "route_name"], "chat");
        let meta = serde_json::json!({ "failover_groups": serde_json::from_str::<serde_json::Value>(GROUPS).unwrap() });
        h.properties.insert("xds/route_metadata".into(), test_encode_metadata("sluice", &meta));
        h.time = Some(UNIX_EPOCH + Duration::from_secs(1000));
        let mut t = cooldown::Table::default();
        for (c, until) in table {
            t.record(c, *until, 0);
        }
        h.shared.insert(cooldown::KEY.into(), (t.encode(), 1));
        let act = pl.on_request_headers(&mut h, false);
        (act, h)
    }

    #[test]
    fn cooling_clusters_are_left_out_of_the_group_order() {
        let now = 1_000_000;
        // Nothing cools: no header (and a client's copy is removed).
        let p = plugin();
        let (act, h) = grouped(p.as_ref(), &[("a", now - 1)], Some("MhgKFioUChIKBG5hbWUSChoIZmFsbGJhY2s="));
        assert_eq!(act, Act::Continue);
        assert_eq!(h.req_header(GROUPS_HEADER), None, "the client's copy is never forwarded");
        assert_eq!(h.metric(metric::CLIENT_HEADER_REMOVED), Some(1));
        // a cools: g2, g3.
        let p = plugin(); // metric ids are per VM: a fresh plugin per fake host
        let (_, h) = grouped(p.as_ref(), &[("a", now + 2_000), ("zzz", now + 9_000)], Some("forged"));
        let want = groups::header_value(&serde_json::json!([{"name": "g2"}, {"name": "g3"}]));
        assert_eq!(h.req_header(GROUPS_HEADER), Some(want));
        assert_eq!(h.metric(metric::COOLDOWN_OVERRIDE), Some(1));
        // Every cluster cools: 429 with the shortest wait, rounded up.
        let p = plugin();
        let (act, h) = grouped(p.as_ref(), &[("a", now + 2_500), ("b", now + 5_000), ("c", now + 9_000)], None);
        assert_eq!(act, Act::Pause);
        assert_eq!(h.replies.len(), 1);
        assert_eq!(h.replies[0].status, 429);
        assert!(h.replies[0].headers.contains(&("retry-after".into(), "3".into())), "{:?}", h.replies[0].headers);
        assert_eq!(h.metric(metric::ALL_COOLING), Some(1));
        assert!(h.refused.is_empty(), "{:?}", h.refused);
    }

    #[test]
    fn invalid_groups_fall_back_to_the_configured_order() {
        let p = plugin();
        let mut pl = Pipeline::new(1, vec![Slot::of(p.as_ref())], Rc::new(RefCell::new(RouteCache::default())));
        let mut h = FakeHost::with_request_headers(&[(":method", "POST")]);
        h.set_prop(&["xds", "route_name"], "chat");
        let meta = serde_json::json!({"failover_groups": [{"name": "g"}]});
        h.properties.insert("xds/route_metadata".into(), test_encode_metadata("sluice", &meta));
        assert_eq!(pl.on_request_headers(&mut h, false), Act::Continue);
        assert_eq!(h.req_header(GROUPS_HEADER), None);
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
        assert_eq!(h.count(CallKind::SharedData), 0, "no failover_groups: the table is not read");
    }

    /// On a route with `failover_groups`: the same, plus one shared-data read (the cooldown
    /// table); the route's parsed groups are cached per route.
    #[test]
    fn host_call_budget_with_groups() {
        let p = plugin();
        let (_, fake) = grouped(p.as_ref(), &[("a", 1_002_000)], None);
        let mut h = CountingHost::new(fake);
        h.inner.req_headers.retain(|(k, _)| k != GROUPS_HEADER);
        let mut pl = Pipeline::new(2, vec![Slot::of(p.as_ref())], Rc::new(RefCell::new(RouteCache::default())));
        pl.on_request_headers(&mut h, false);
        assert_eq!(h.count(CallKind::SharedData), 1);
        assert!(h.total() <= 4, "{} ({:?})", h.total(), h.property_reads.borrow());
    }
}
