//! The per-request group order for Envoy's `priority_group` cluster specifier.
//!
//! A route lists its groups twice: once for Envoy (`priority_groups` of the
//! `PriorityGroupClusterSpecifier`) and once for sluice, in the route's metadata
//! (`metadata.filter_metadata.sluice.failover_groups`, the same shape: a YAML alias of the
//! first list keeps them equal). Given the cooldown table, the downstream role computes:
//! - nothing cooling: no override (Envoy uses the configured order);
//! - some clusters cooling: the groups in their configured order, cooling clusters left out
//!   (a group keeps only its name when none of its clusters cools, gets its remaining
//!   clusters with their weights otherwise, and is left out when all of them cool or when
//!   it offers exactly the clusters of the group before it);
//! - every cluster cooling: the request is answered 429 with the shortest remaining wait.
//!
//! The override travels as a request header holding the base64 of a serialized
//! `google.protobuf.Value` (a list of `{name, clusters: [{cluster_name, weight}]}` structs),
//! which Envoy's `header_to_metadata` filter (`type: PROTOBUF_VALUE, encode: BASE64`) turns
//! into the dynamic metadata the specifier reads (`override_metadata_namespace`).

use crate::cooldown::Table;
use serde_json::{json, Value};
use std::time::Duration;

/// Route-metadata key of the groups.
pub const ROUTE_KEY: &str = "failover_groups";
/// Most groups and most clusters per group accepted from route metadata.
pub const MAX_GROUPS: usize = 32;

/// One group: a name and its clusters with their weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group name (as in the route's `priority_groups`).
    pub name: String,
    /// Clusters and weights.
    pub clusters: Vec<(String, u32)>,
}

/// Read the groups of a route's `failover_groups` metadata.
pub fn parse(v: &Value) -> Result<Vec<Group>, String> {
    let list = v.as_array().ok_or("failover_groups: expected a list of groups")?;
    if list.is_empty() || list.len() > MAX_GROUPS {
        return Err(format!("failover_groups: expected 1 to {MAX_GROUPS} groups, got {}", list.len()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, g) in list.iter().enumerate() {
        let name = g
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| format!("failover_groups[{i}].name: expected a non-empty string"))?;
        let clusters = g
            .get("clusters")
            .and_then(Value::as_array)
            .filter(|c| !c.is_empty() && c.len() <= MAX_GROUPS)
            .ok_or_else(|| format!("failover_groups[{i}].clusters: expected 1 to {MAX_GROUPS} clusters"))?;
        let mut cs = Vec::with_capacity(clusters.len());
        for (j, c) in clusters.iter().enumerate() {
            let cluster =
                c.get("cluster_name").and_then(Value::as_str).filter(|s| !s.trim().is_empty()).ok_or_else(|| {
                    format!("failover_groups[{i}].clusters[{j}].cluster_name: expected a non-empty string")
                })?;
            let weight = match c.get("weight") {
                None => 1,
                Some(w) => w
                    .as_f64()
                    .filter(|w| w.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(w))
                    .map(|w| w as u32)
                    .ok_or_else(|| format!("failover_groups[{i}].clusters[{j}].weight: expected a whole number"))?,
            };
            cs.push((cluster.to_string(), weight));
        }
        out.push(Group { name: name.to_string(), clusters: cs });
    }
    Ok(out)
}

/// What the downstream role does for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// No cluster of the route cools: Envoy's configured order.
    Configured,
    /// The order without the cooling clusters (the `Value` list), and the clusters left out.
    Override(Value, Vec<String>),
    /// Every cluster cools; the shortest remaining wait.
    AllCooling(Duration),
}

/// The plan for `groups` at `now_ms`.
pub fn plan(groups: &[Group], table: &Table, now_ms: u64) -> Plan {
    if table.is_empty() {
        return Plan::Configured;
    }
    let mut order = Vec::with_capacity(groups.len());
    let mut cooling = Vec::new();
    let mut shortest: Option<Duration> = None;
    let mut previous: Option<Vec<(&String, u32)>> = None;
    for g in groups {
        let mut usable = Vec::with_capacity(g.clusters.len());
        for (c, w) in &g.clusters {
            match table.remaining(c, now_ms) {
                Some(left) => {
                    shortest = Some(shortest.map_or(left, |s| s.min(left)));
                    if !cooling.contains(c) {
                        cooling.push(c.clone());
                    }
                }
                None => usable.push((c, *w)),
            }
        }
        let same = |p: &Vec<(&String, u32)>| p.len() == usable.len() && p.iter().all(|c| usable.contains(c));
        if usable.is_empty() || previous.as_ref().is_some_and(same) {
            // Nothing left, or the same clusters the previous group offers (a group listed again
            // in another order, to reach its other cluster on the retry): one attempt there is
            // enough, the next one goes on down the chain.
            continue;
        }
        if usable.len() == g.clusters.len() {
            order.push(json!({"name": g.name}));
        } else {
            let clusters: Vec<Value> = usable.iter().map(|(c, w)| json!({"cluster_name": c, "weight": w})).collect();
            order.push(json!({"name": g.name, "clusters": clusters}));
        }
        previous = Some(usable);
    }
    match shortest {
        None => Plan::Configured,
        Some(wait) if order.is_empty() => Plan::AllCooling(wait),
        Some(_) => Plan::Override(Value::Array(order), cooling),
    }
}

/// The header value for an override: base64 (standard, padded) of the protobuf `Value`.
pub fn header_value(order: &Value) -> String {
    base64(&protobuf_value(order))
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn length_delimited(field: u64, payload: &[u8], out: &mut Vec<u8>) {
    varint((field << 3) | 2, out);
    varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Serialize a JSON value as a `google.protobuf.Value` (fields: 1 null, 2 number (double),
/// 3 string, 4 bool, 5 struct (map entries: 1 key, 2 value), 6 list (1 values)).
pub fn protobuf_value(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match v {
        Value::Null => {
            varint(1 << 3, &mut out);
            varint(0, &mut out);
        }
        Value::Number(n) => {
            varint((2 << 3) | 1, &mut out);
            out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes());
        }
        Value::String(s) => length_delimited(3, s.as_bytes(), &mut out),
        Value::Bool(b) => {
            varint(4 << 3, &mut out);
            varint(u64::from(*b), &mut out);
        }
        Value::Object(m) => {
            let mut fields = Vec::new();
            for (k, val) in m {
                let mut entry = Vec::new();
                length_delimited(1, k.as_bytes(), &mut entry);
                length_delimited(2, &protobuf_value(val), &mut entry);
                length_delimited(1, &entry, &mut fields);
            }
            length_delimited(5, &fields, &mut out);
        }
        Value::Array(a) => {
            let mut values = Vec::new();
            for val in a {
                length_delimited(1, &protobuf_value(val), &mut values);
            }
            length_delimited(6, &values, &mut out);
        }
    }
    out
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].iter().enumerate() {
            if i <= chunk.len() {
                let idx = ((n >> shift) & 0x3f) as usize;
                out.push(char::from(ALPHABET.get(idx).copied().unwrap_or(b'A')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups() -> Vec<Group> {
        parse(&json!([
            {"name": "g1", "clusters": [{"cluster_name": "a", "weight": 1}, {"cluster_name": "b", "weight": 3}]},
            {"name": "g2", "clusters": [{"cluster_name": "c", "weight": 1.0}]},
            {"name": "g3", "clusters": [{"cluster_name": "d"}]}
        ]))
        .unwrap()
    }

    /// Values Envoy 1.40's header_to_metadata accepted and the specifier used (research runs).
    #[test]
    fn header_values_match_what_envoy_decoded() {
        assert_eq!(header_value(&json!([{"name": "fallback"}])), "MhgKFioUChIKBG5hbWUSChoIZmFsbGJhY2s=");
        assert_eq!(
            header_value(&json!([{"name": "fallback"}, {"name": "primary"}])),
            "Mi8KFioUChIKBG5hbWUSChoIZmFsbGJhY2sKFSoTChEKBG5hbWUSCRoHcHJpbWFyeQ=="
        );
        assert_eq!(
            // (keys in the order the research probe wrote them; any order decodes the same)
            header_value(&json!([{"clusters": [{"cluster_name": "b", "weight": 1}], "name": "x"}, {"name": "primary"}])),
            "MmYKTSpLCjwKCGNsdXN0ZXJzEjAyLgosKioKEwoMY2x1c3Rlcl9uYW1lEgMaAWIKEwoGd2VpZ2h0EgkRAAAAAAAA8D8KCwoEbmFtZRIDGgF4ChUqEwoRCgRuYW1lEgkaB3ByaW1hcnk="
        );
    }

    #[test]
    fn base64_and_scalars() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(protobuf_value(&Value::Null), [8, 0]);
        assert_eq!(protobuf_value(&json!(true)), [0x20, 1]);
    }

    #[test]
    fn plans() {
        let g = groups();
        let mut t = Table::default();
        assert_eq!(plan(&g, &t, 0), Plan::Configured);
        t.record("zzz", 10_000, 0);
        assert_eq!(plan(&g, &t, 0), Plan::Configured, "clusters of other routes do not matter");
        t.record("b", 5_000, 0);
        assert_eq!(
            plan(&g, &t, 1_000),
            Plan::Override(
                json!([{"name": "g1", "clusters": [{"cluster_name": "a", "weight": 1}]}, {"name": "g2"}, {"name": "g3"}]),
                vec!["b".into()]
            )
        );
        assert_eq!(plan(&g, &t, 5_000), Plan::Configured, "expired");
        t.record("a", 9_000, 1_000);
        t.record("c", 2_000, 1_000);
        assert_eq!(
            plan(&g, &t, 1_000),
            Plan::Override(json!([{"name": "g3"}]), vec!["a".into(), "b".into(), "c".into()])
        );
        t.record("d", 3_000, 1_000);
        assert_eq!(plan(&g, &t, 1_000), Plan::AllCooling(Duration::from_millis(1_000)));
    }

    /// A two-provider group listed twice, the second time reversed, reaches the other provider
    /// on the retry (Envoy reuses the request's random value for every attempt); with one of
    /// them cooling both listings offer the same cluster, so it is tried once.
    #[test]
    fn a_group_listed_again_is_not_tried_twice() {
        let g = parse(&json!([
            {"name": "g1", "clusters": [{"cluster_name": "a", "weight": 1}, {"cluster_name": "b", "weight": 1}]},
            {"name": "g1-other", "clusters": [{"cluster_name": "b", "weight": 1}, {"cluster_name": "a", "weight": 1}]},
            {"name": "g2", "clusters": [{"cluster_name": "c", "weight": 1}]}
        ]))
        .unwrap();
        let mut t = Table::default();
        t.record("a", 5_000, 0);
        assert_eq!(
            plan(&g, &t, 0),
            Plan::Override(
                json!([{"name": "g1", "clusters": [{"cluster_name": "b", "weight": 1}]}, {"name": "g2"}]),
                vec!["a".into()]
            )
        );
    }

    #[test]
    fn bad_groups_name_the_field() {
        for (v, want) in [
            (json!({}), "expected a list"),
            (json!([]), "1 to 32 groups"),
            (json!([{"clusters": [{"cluster_name": "a"}]}]), "failover_groups[0].name"),
            (json!([{"name": "g"}]), "failover_groups[0].clusters"),
            (json!([{"name": "g", "clusters": [{"weight": 1}]}]), "clusters[0].cluster_name"),
            (json!([{"name": "g", "clusters": [{"cluster_name": "a", "weight": -1}]}]), "clusters[0].weight"),
            (json!([{"name": "g", "clusters": [{"cluster_name": "a", "weight": 1.5}]}]), "clusters[0].weight"),
        ] {
            let e = parse(&v).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
    }
}
