//! The cooldown table: which clusters asked not to be used until when, shared by every worker
//! of the VM (Envoy shared data, keyed by `vm_id`: both roles must use the same `vm_id`).
//!
//! The upstream role records `cluster -> now + wait` when a provider answers 429 with a wait
//! (`retry-after-ms`, `retry-after`, `x-ratelimit-reset-*`, capped by `max_cooldown`); the
//! downstream role reads the table once per request and leaves cooling clusters out of the
//! request's group order. The value is one JSON object `{"<cluster>": <until, unix ms>}`;
//! expired entries are dropped on every write, and the table never holds more than
//! [`MAX_ENTRIES`] clusters (the soonest to expire go first).

use sluice_core::host::{Host, SharedDataError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Shared-data key of the table.
pub const KEY: &str = "sluice.failover.cooldown";
/// Most clusters kept.
pub const MAX_ENTRIES: usize = 256;
/// CAS rounds before a record is given up (another worker kept writing).
const CAS_ROUNDS: usize = 8;

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The table: cluster name -> cooling until (unix ms). A plain list: it holds a handful of
/// clusters, and a map type would add more code to the .wasm than the lookups cost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table(Vec<(String, u64)>);

impl Table {
    /// Parse the shared value; anything unreadable is an empty table.
    pub fn parse(bytes: Option<&[u8]>) -> Self {
        let Some(b) = bytes else { return Self::default() };
        let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(b) else {
            return Self::default();
        };
        Self(m.into_iter().filter_map(|(k, v)| v.as_u64().map(|u| (k, u))).take(MAX_ENTRIES).collect())
    }

    /// The shared value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::Value::String(k.clone()).to_string());
            out.push(':');
            out.push_str(&v.to_string());
        }
        out.push('}');
        out.into_bytes()
    }

    /// How long `cluster` still cools at `now_ms` (`None`: usable).
    pub fn remaining(&self, cluster: &str, now_ms: u64) -> Option<Duration> {
        self.0
            .iter()
            .find(|(c, _)| c == cluster)
            .filter(|(_, until)| *until > now_ms)
            .map(|(_, until)| Duration::from_millis(until - now_ms))
    }

    /// Cool `cluster` until `until_ms` (a longer cooldown already recorded is kept); drop
    /// expired entries and keep at most [`MAX_ENTRIES`].
    pub fn record(&mut self, cluster: &str, until_ms: u64, now_ms: u64) {
        self.0.retain(|(_, until)| *until > now_ms);
        match self.0.iter_mut().find(|(c, _)| c == cluster) {
            Some((_, until)) => *until = (*until).max(until_ms),
            None => self.0.push((cluster.to_string(), until_ms)),
        }
        while self.0.len() > MAX_ENTRIES {
            let Some(first) = self.0.iter().enumerate().min_by_key(|(_, (_, u))| *u).map(|(i, _)| i) else { break };
            self.0.swap_remove(first);
        }
    }

    /// Number of clusters in the table.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no cluster is in the table.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The table as it is now (one shared-data read).
pub fn read(h: &dyn Host) -> Table {
    Table::parse(h.shared_data(KEY).0.as_deref())
}

/// Record a cooldown for `cluster` until `until_ms` (read, change, compare-and-swap write;
/// retried when another worker wrote in between). False when it could not be written.
pub fn record(h: &mut dyn Host, cluster: &str, until_ms: u64, now_ms: u64) -> bool {
    for _ in 0..CAS_ROUNDS {
        let (value, cas) = h.shared_data(KEY);
        let mut t = Table::parse(value.as_deref());
        t.record(cluster, until_ms, now_ms);
        match h.set_shared_data(KEY, &t.encode(), cas) {
            Ok(()) => return true,
            Err(SharedDataError::CasMismatch) => continue,
            Err(SharedDataError::Failed) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::host::FakeHost;

    #[test]
    fn record_keeps_the_longer_wait_and_drops_expired_entries() {
        let mut t = Table::default();
        t.record("a", 5_000, 1_000);
        t.record("a", 3_000, 1_000);
        t.record("b", 2_000, 1_000);
        assert_eq!(t.remaining("a", 1_000), Some(Duration::from_millis(4_000)));
        assert_eq!(t.remaining("b", 2_000), None, "expired at its own time");
        t.record("c", 9_000, 2_500);
        assert_eq!(t.len(), 2, "b was dropped");
        assert_eq!(Table::parse(Some(&t.encode())), t);
        assert_eq!(Table::parse(Some(b"garbage")), Table::default());
        assert_eq!(Table::parse(Some(br#"{"a":"x","b":7}"#)).len(), 1);
        assert!(Table::parse(None).is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = Table::default();
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            t.record(&format!("c{i}"), 10_000 + i, 0);
        }
        assert_eq!(t.len(), MAX_ENTRIES);
        assert_eq!(t.remaining("c0", 0), None, "the soonest to expire went first");
        assert!(t.remaining(&format!("c{}", MAX_ENTRIES + 9), 0).is_some());
    }

    #[test]
    fn record_through_shared_data_with_cas() {
        let mut h = FakeHost::default();
        assert!(record(&mut h, "a", 5_000, 0));
        assert!(record(&mut h, "b", 7_000, 0));
        let t = read(&h);
        assert_eq!(t.remaining("a", 0), Some(Duration::from_secs(5)));
        assert_eq!(t.remaining("b", 0), Some(Duration::from_secs(7)));
        assert_eq!(h.shared_writes, 2);
    }
}
