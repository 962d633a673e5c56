//! Per-route settings: the route's `sluice` metadata namespace, read once per route.
//!
//! Envoy rejects per-route wasm config, so per-route settings live in route metadata
//! (`metadata.filter_metadata.sluice`). Reading a key costs a host call (≈ 3.4 µs in V8), so
//! the whole namespace is read in one call (`xds.route_metadata`, decoded from protobuf) and
//! kept per VM by route name; entries are re-read after [`ROUTE_TTL`] so an RDS update is
//! picked up, and a route without a name is read on every request.

use crate::encoding::metadata_namespace;
use crate::host::Host;
use crate::keys::METADATA_NAMESPACE;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// How long a route's settings are cached.
pub const ROUTE_TTL: Duration = Duration::from_secs(10);

/// Most routes cached per VM.
const MAX_ROUTES: usize = 1024;

/// One route's `sluice` settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    /// Route name (empty when the route has none).
    pub name: String,
    /// The `sluice` metadata namespace.
    pub meta: Map<String, Value>,
}

impl Route {
    /// A route with these settings (tests, the upstream role).
    pub fn with(name: &str, meta: Value) -> Self {
        Self { name: name.to_string(), meta: meta.as_object().cloned().unwrap_or_default() }
    }

    /// A string setting (a number or boolean is given as text too); empty counts as absent.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.meta.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.as_str()),
            _ => None,
        }
    }

    /// A setting as text (strings as is, other values as JSON).
    pub fn text(&self, key: &str) -> Option<String> {
        match self.meta.get(key)? {
            Value::String(s) if s.is_empty() => None,
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    /// A boolean setting (`true` or `"true"`).
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.meta.get(key), Some(Value::Bool(true))) || self.str(key) == Some("true")
    }

    /// A raw setting.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }
}

/// Per-VM cache of route settings by route name.
#[derive(Debug, Default)]
pub struct RouteCache {
    routes: HashMap<String, (Rc<Route>, SystemTime)>,
}

impl RouteCache {
    /// The settings of the route this request matched (2 host calls on a miss, 1 on a hit).
    pub fn lookup(&mut self, h: &dyn Host) -> Rc<Route> {
        let name =
            h.property(&["xds", "route_name"]).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let now = h.now();
        if !name.is_empty() {
            if let Some((r, at)) = self.routes.get(&name) {
                if now.duration_since(*at).is_ok_and(|d| d < ROUTE_TTL) {
                    return Rc::clone(r);
                }
            }
        }
        let meta = h
            .property(&["xds", "route_metadata"])
            .and_then(|b| metadata_namespace(&b, METADATA_NAMESPACE))
            .unwrap_or_default();
        let route = Rc::new(Route { name: name.clone(), meta });
        if !name.is_empty() {
            if self.routes.len() >= MAX_ROUTES {
                self.routes.clear();
            }
            self.routes.insert(name, (Rc::clone(&route), now));
        }
        route
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{CallKind, CountingHost, FakeHost};
    use serde_json::json;

    /// Encode `{"sluice": meta}` as Envoy's serialized Metadata (for fake hosts).
    pub fn metadata_bytes(meta: &Value) -> Vec<u8> {
        crate::encoding::test_encode_metadata(METADATA_NAMESPACE, meta)
    }

    #[test]
    fn reads_once_per_route_and_expires() {
        let mut fake = FakeHost::default();
        fake.set_prop(&["xds", "route_name"], "chat");
        fake.properties
            .insert("xds/route_metadata".into(), metadata_bytes(&json!({"provider": "openai", "n": 3, "on": true})));
        let h = CountingHost::new(fake);
        let mut c = RouteCache::default();
        let r = c.lookup(&h);
        assert_eq!(r.str("provider"), Some("openai"));
        assert_eq!(r.text("n").as_deref(), Some("3"));
        assert!(r.flag("on"));
        assert_eq!(h.count(CallKind::Property), 2);
        let _ = c.lookup(&h);
        assert_eq!(h.count(CallKind::Property), 3, "a hit reads only the route name");
        let mut h = h;
        h.inner.time = Some(SystemTime::UNIX_EPOCH + ROUTE_TTL + Duration::from_secs(1));
        let _ = c.lookup(&h);
        assert_eq!(h.count(CallKind::Property), 5, "expired: read again");
    }

    #[test]
    fn unnamed_routes_are_not_cached() {
        let h = CountingHost::new(FakeHost::default());
        let mut c = RouteCache::default();
        assert!(c.lookup(&h).meta.is_empty());
        let _ = c.lookup(&h);
        assert_eq!(h.count(CallKind::Property), 4);
    }
}
