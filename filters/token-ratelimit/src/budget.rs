//! Local-mode counters in proxy-wasm shared data, updated with compare-and-swap so every
//! worker thread of one Envoy sees one exact count.
//!
//! One shared-data entry per (rule set, rule, key value) holds all of the rule's windows:
//! `len_ms@start_ms:count;...`. A window whose stored start is not the current one counts
//! as 0 and is reset in place on the next write, so a key's memory never grows with time.
//! (The proxy-wasm ABI has no delete; keys stay, so the number of entries is capped by
//! `max_counters`, and the cleanup tick empties stale values.)
//!
//! Creating an entry is the one step plain CAS cannot make safe (a write to a missing key
//! ignores the CAS token), so creation is serialised through the index entry, which is
//! updated with CAS: only the worker that added the key to the index writes its first value;
//! others that find the key indexed but absent retry until it appears.

use crate::config::Window;
use sluice_core::host::{Host, SharedDataError};

/// Shared-data key of the index of live counter keys (newline separated).
pub const INDEX_KEY: &str = "sluice-trl|index";
const PREFIX: &str = "sluice-trl|c|";

/// Why a counter could not be updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// CAS kept failing for `cas_retries` attempts.
    Contended,
    /// The host refused a shared-data write.
    HostFailed,
    /// `max_counters` distinct keys exist already.
    Full,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Contended => "counter_contended",
            Self::HostFailed => "shared_data_failed",
            Self::Full => "too_many_counters",
        })
    }
}

/// The shared-data key for a rule's counter. Key values are length-prefixed so no value can
/// forge another's key; long keys are hashed.
pub fn counter_key(rule_set: &str, rule: &str, values: &[String]) -> String {
    let mut k = format!("{PREFIX}{rule_set}|{rule}|");
    let mut vals = String::new();
    for v in values {
        vals.push_str(&format!("{}:{v}|", v.len()));
    }
    if vals.len() > 200 {
        vals = format!("h{:016x}", fnv1a(vals.as_bytes()));
    }
    k.push_str(&vals);
    k
}

/// FNV-1a 64: stable, dependency-free hashing for long keys and API keys.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// One stored window: length, start, count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    len_ms: u64,
    start: u64,
    count: u64,
}

fn decode(bytes: &[u8]) -> Vec<Slot> {
    let s = String::from_utf8_lossy(bytes);
    s.split(';')
        .filter_map(|part| {
            let (len, rest) = part.split_once('@')?;
            let (start, count) = rest.split_once(':')?;
            Some(Slot { len_ms: len.parse().ok()?, start: start.parse().ok()?, count: count.parse().ok()? })
        })
        .collect()
}

fn encode(slots: &[Slot]) -> Vec<u8> {
    slots.iter().map(|s| format!("{}@{}:{}", s.len_ms, s.start, s.count)).collect::<Vec<_>>().join(";").into_bytes()
}

/// The current count of each window (0 for a window whose stored start is stale).
fn current(slots: &[Slot], windows: &[Window], now_ms: u64) -> Vec<u64> {
    windows
        .iter()
        .map(|w| {
            let start = w.start(now_ms);
            slots.iter().find(|s| s.len_ms == w.len_ms && s.start == start).map_or(0, |s| s.count)
        })
        .collect()
}

/// Result of a reservation on one counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Added. `starts[i]` is window i's start; `used[i]` its count after the addition.
    Fits { starts: Vec<u64>, used: Vec<u64> },
    /// Window `window` would exceed its limit; `used` is its count without this request.
    /// With `force` the amount was added anyway (shadow mode) and `starts` say where.
    Over { window: usize, used: u64, starts: Option<Vec<u64>> },
}

/// Counter operations over a host's shared data.
pub struct Store<'a, H: Host> {
    host: &'a mut H,
    retries: u32,
    max_counters: usize,
}

impl<'a, H: Host> Store<'a, H> {
    /// A store on `host`.
    pub fn new(host: &'a mut H, retries: u32, max_counters: usize) -> Self {
        Self { host, retries, max_counters }
    }

    /// Make sure `key` exists (see the module docs for why this goes through the index).
    fn ensure_exists(&mut self, key: &str) -> Result<(), StoreError> {
        let mut indexed_but_absent = false;
        for _ in 0..self.retries {
            if self.host.shared_data(key).0.is_some() {
                return Ok(());
            }
            let (idx, cas) = self.host.shared_data(INDEX_KEY);
            let mut list = idx.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            if list.lines().any(|l| l == key) {
                indexed_but_absent = true;
                continue;
            }
            if list.lines().count() >= self.max_counters {
                return Err(StoreError::Full);
            }
            list.push_str(key);
            list.push('\n');
            match self.host.set_shared_data(INDEX_KEY, list.as_bytes(), cas) {
                Ok(()) => {
                    return self.host.set_shared_data(key, b"", None).map_err(|_| StoreError::HostFailed);
                }
                Err(SharedDataError::CasMismatch) => continue,
                Err(SharedDataError::Failed) => return Err(StoreError::HostFailed),
            }
        }
        if indexed_but_absent {
            // The creator never wrote it (trapped in between): create it ourselves.
            return self.host.set_shared_data(key, b"", None).map_err(|_| StoreError::HostFailed);
        }
        Err(StoreError::Contended)
    }

    /// Reserve `amount` in every window of `key`, or none when one would exceed its limit
    /// (unless `force`, used by shadow mode to count what it does not enforce).
    pub fn reserve(
        &mut self,
        key: &str,
        windows: &[Window],
        amount: u64,
        now_ms: u64,
        force: bool,
    ) -> Result<Reserved, StoreError> {
        self.ensure_exists(key)?;
        for _ in 0..self.retries {
            let (value, cas) = self.host.shared_data(key);
            let slots = decode(&value.unwrap_or_default());
            let counts = current(&slots, windows, now_ms);
            // Of the windows that would overflow, report the one that resets last: the
            // request cannot pass before then.
            let over = windows
                .iter()
                .zip(&counts)
                .enumerate()
                .filter(|(_, (w, c))| c.saturating_add(amount) > w.limit)
                .max_by_key(|(_, (w, _))| w.ms_to_reset(now_ms))
                .map(|(i, _)| i);
            if let (Some(i), false) = (over, force) {
                return Ok(Reserved::Over { window: i, used: counts.get(i).copied().unwrap_or(0), starts: None });
            }
            let starts: Vec<u64> = windows.iter().map(|w| w.start(now_ms)).collect();
            let used: Vec<u64> = counts.iter().map(|c| c.saturating_add(amount)).collect();
            let new_slots: Vec<Slot> = windows
                .iter()
                .zip(starts.iter().zip(&used))
                .map(|(w, (s, u))| Slot { len_ms: w.len_ms, start: *s, count: *u })
                .collect();
            match self.host.set_shared_data(key, &encode(&new_slots), cas) {
                Ok(()) => {
                    return Ok(match over {
                        Some(i) => Reserved::Over {
                            window: i,
                            used: counts.get(i).copied().unwrap_or(0),
                            starts: Some(starts),
                        },
                        None => Reserved::Fits { starts, used },
                    })
                }
                Err(SharedDataError::CasMismatch) => continue,
                Err(SharedDataError::Failed) => return Err(StoreError::HostFailed),
            }
        }
        Err(StoreError::Contended)
    }

    /// Add `delta` (may be negative) to the windows that still have the starts the
    /// reservation was made in; windows that have rolled over since are left alone.
    /// Counts never go below 0.
    pub fn adjust(&mut self, key: &str, windows: &[Window], starts: &[u64], delta: i64) -> Result<(), StoreError> {
        if delta == 0 {
            return Ok(());
        }
        for _ in 0..self.retries {
            let (value, cas) = self.host.shared_data(key);
            let Some(value) = value else { return Ok(()) };
            let mut slots = decode(&value);
            let mut changed = false;
            for (w, start) in windows.iter().zip(starts) {
                if let Some(slot) = slots.iter_mut().find(|s| s.len_ms == w.len_ms && s.start == *start) {
                    let next = if delta >= 0 {
                        slot.count.saturating_add(delta.unsigned_abs())
                    } else {
                        slot.count.saturating_sub(delta.unsigned_abs())
                    };
                    changed |= next != slot.count;
                    slot.count = next;
                }
            }
            if !changed {
                return Ok(());
            }
            match self.host.set_shared_data(key, &encode(&slots), cas) {
                Ok(()) => return Ok(()),
                Err(SharedDataError::CasMismatch) => continue,
                Err(SharedDataError::Failed) => return Err(StoreError::HostFailed),
            }
        }
        Err(StoreError::Contended)
    }

    /// The current count of each window of `key` (0 when absent).
    pub fn peek(&self, key: &str, windows: &[Window], now_ms: u64) -> Vec<u64> {
        let slots = decode(&self.host.shared_data(key).0.unwrap_or_default());
        current(&slots, windows, now_ms)
    }

    /// Empty every indexed counter whose windows have all ended. Returns how many were emptied.
    pub fn cleanup(&mut self, now_ms: u64) -> usize {
        let list =
            self.host.shared_data(INDEX_KEY).0.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let mut emptied = 0;
        for key in list.lines() {
            let (value, cas) = self.host.shared_data(key);
            let Some(value) = value else { continue };
            if value.is_empty() {
                continue;
            }
            let slots = decode(&value);
            let stale = slots.iter().all(|s| s.start.saturating_add(s.len_ms) <= now_ms);
            if stale && self.host.set_shared_data(key, b"", cas).is_ok() {
                emptied += 1;
            }
        }
        emptied
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::config::Unit;
    use sluice_core::host::FakeHost;

    fn windows() -> Vec<Window> {
        vec![
            Window { name: "minute".into(), len_ms: 60_000, unit: Some(Unit::Minute), limit: 150 },
            Window { name: "hour".into(), len_ms: 3_600_000, unit: Some(Unit::Hour), limit: 300 },
        ]
    }

    #[test]
    fn keys_cannot_be_forged() {
        let a = counter_key("s", "r", &["a|1:b".into()]);
        let b = counter_key("s", "r", &["a".into(), "b".into()]);
        assert_ne!(a, b);
        let long = counter_key("s", "r", &["x".repeat(500)]);
        assert!(long.len() < 100, "{long}");
    }

    #[test]
    fn reserve_refuses_what_does_not_fit_and_resets_with_the_window() {
        let mut h = FakeHost::default();
        let w = windows();
        let mut s = Store::new(&mut h, 10, 100);
        let k = "k";
        assert!(matches!(s.reserve(k, &w, 100, 1_000, false).unwrap(), Reserved::Fits { .. }));
        assert_eq!(s.reserve(k, &w, 60, 2_000, false).unwrap(), Reserved::Over { window: 0, used: 100, starts: None });
        assert!(matches!(s.reserve(k, &w, 50, 3_000, false).unwrap(), Reserved::Fits { .. }));
        // next minute: the minute window is empty again, the hour holds 150
        let r = s.reserve(k, &w, 150, 61_000, false).unwrap();
        assert_eq!(r, Reserved::Fits { starts: vec![60_000, 0], used: vec![150, 300] });
        assert_eq!(s.reserve(k, &w, 1, 121_000, false).unwrap(), Reserved::Over { window: 1, used: 300, starts: None });
    }

    #[test]
    fn adjust_replaces_reservation_and_skips_rolled_windows() {
        let mut h = FakeHost::default();
        let w = windows();
        let mut s = Store::new(&mut h, 10, 100);
        let Reserved::Fits { starts, .. } = s.reserve("k", &w, 100, 1_000, false).unwrap() else { panic!() };
        s.adjust("k", &w, &starts, -40).unwrap();
        assert_eq!(s.peek("k", &w, 2_000), vec![60, 60]);
        s.adjust("k", &w, &starts, -1_000).unwrap();
        assert_eq!(s.peek("k", &w, 2_000), vec![0, 0]);
        s.adjust("k", &w, &starts, 30).unwrap();
        // the minute rolled: only the hour takes a later correction
        s.adjust("k", &w, &[0, 0], 5).unwrap();
        assert_eq!(s.peek("k", &w, 61_000), vec![0, 35]);
    }

    #[test]
    fn shadow_force_counts_over_limit() {
        let mut h = FakeHost::default();
        let w = windows();
        let mut s = Store::new(&mut h, 10, 100);
        let r = s.reserve("k", &w, 200, 1_000, true).unwrap();
        assert!(matches!(r, Reserved::Over { window: 0, used: 0, starts: Some(_) }));
        assert_eq!(s.peek("k", &w, 1_000), vec![200, 200]);
    }

    #[test]
    fn index_caps_counters_and_cleanup_empties_stale() {
        let mut h = FakeHost::default();
        let w = windows();
        let mut s = Store::new(&mut h, 10, 2);
        s.reserve("a", &w, 1, 1_000, false).unwrap();
        s.reserve("b", &w, 1, 1_000, false).unwrap();
        assert_eq!(s.reserve("c", &w, 1, 1_000, false), Err(StoreError::Full));
        assert_eq!(s.cleanup(10_000), 0);
        assert_eq!(s.cleanup(3_600_000), 2);
        assert_eq!(h.shared_data("a").0.unwrap(), b"");
        // an emptied counter starts again from 0
        let mut s = Store::new(&mut h, 10, 2);
        assert_eq!(s.peek("a", &w, 3_600_000), vec![0, 0]);
        assert!(matches!(s.reserve("a", &w, 5, 3_600_000, false).unwrap(), Reserved::Fits { .. }));
    }

    #[test]
    fn garbage_values_read_as_zero() {
        let mut h = FakeHost::default();
        h.set_shared_data("k", b"\xff\xfe;;1@x:y;@@", None).unwrap();
        let w = windows();
        let mut s = Store::new(&mut h, 10, 100);
        assert_eq!(s.peek("k", &w, 0), vec![0, 0]);
        assert!(matches!(s.reserve("k", &w, 5, 0, false).unwrap(), Reserved::Fits { .. }));
    }
}
