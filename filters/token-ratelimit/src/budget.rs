//! Local-mode counters in proxy-wasm shared data, updated with compare-and-swap so every
//! worker thread of one Envoy sees one exact count, in bounded memory.
//!
//! Layout (all keys live per `vm_id`; the proxy-wasm ABI cannot delete a key, so the set of
//! keys is fixed up front and values are reused):
//! - `sluice-trl|b|<i>`, `i < buckets`: a **bucket** holding the counters whose key hashes
//!   (SHA-256) to it, one line each: `<counter id>\t<len@start:count;...>`. A counter's line
//!   holds all of its rule's windows; a window whose stored start is not the current one
//!   counts 0 and is overwritten in place. An emptied bucket holds `-` (never an empty
//!   value: Envoy reads an empty value as "no value").
//! - `sluice-trl|live`: how many counters exist (`max_counters` caps it).
//! - `sluice-trl|anchor`: a key that exists, whose CAS version makes "create if absent" safe
//!   (below).
//!
//! Every write is a CAS on a key that exists — except the very first write of a bucket or
//! of the live count, where Envoy ignores the CAS token of a missing key. Those use the
//! anchor's version as the token: on a key that is still missing the write creates it, on a
//! key someone created meanwhile the token cannot match (every write gets a fresh version),
//! so it fails with a mismatch and is retried on the value that is there. Nothing is ever
//! written without a CAS that can fail.
//!
//! The common path — the counter exists — is one read and one CAS. Creating a counter (a new
//! key, or one reclaimed earlier) also takes a slot of the live count (one read, one CAS). A
//! counter whose windows have all ended is **reclaimed** (its line dropped, the live count
//! decremented) by the next write to its bucket and by the cleanup timer, so memory is
//! bounded by `max_counters` lines however many distinct keys appear over time.

use crate::config::Window;
use sha2::{Digest, Sha256};
use sluice_core::host::{Host, SharedDataError};

/// Shared-data key of the number of live counters.
pub const LIVE_KEY: &str = "sluice-trl|live";
/// Shared-data key whose version makes creating a missing key safe.
pub const ANCHOR_KEY: &str = "sluice-trl|anchor";
const BUCKET_PREFIX: &str = "sluice-trl|b|";
/// The value of a bucket without counters.
const EMPTY_BUCKET: &[u8] = b"-";
/// Most counters one bucket holds (buckets = `max_counters / 4`, so a full bucket needs 16
/// keys where 4 are expected: about one in a million at the cap).
pub const BUCKET_CAPACITY: usize = 16;
/// Longest counter id kept readable; longer (or unusual) keys are stored as a hash.
const MAX_READABLE_ID: usize = 128;

/// Why a counter could not be updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// CAS kept failing for `cas_retries` attempts.
    Contended,
    /// The host refused a shared-data write.
    HostFailed,
    /// `max_counters` counters exist already (or this key's bucket is full).
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

/// How many buckets hold `max_counters` counters.
pub fn bucket_count(max_counters: usize) -> usize {
    max_counters.div_ceil(4).max(1)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        for nibble in [b >> 4, b & 0x0f] {
            out.push(char::from(DIGITS.get(usize::from(nibble)).copied().unwrap_or(b'0')));
        }
    }
    out
}

/// The first 32 hex digits of SHA-256 (128 bits): the id format auth publishes for API keys.
pub fn sha256_hex32(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    hex(d.get(..16).unwrap_or_default())
}

/// Which counter: its id inside a bucket, and the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterKey {
    /// `=<readable key>` or `#<sha-256, 32 hex digits>`.
    pub id: String,
    /// Bucket index.
    pub bucket: usize,
}

/// The counter of rule `rule` of set `rule_set` for these key values. Values are
/// length-prefixed so no value can forge another's key; keys that are long or hold
/// characters outside printable ASCII are stored as their SHA-256.
pub fn counter_key(rule_set: &str, rule: &str, values: &[String], buckets: usize) -> CounterKey {
    let mut raw = format!("{}:{rule_set}|{rule}|", rule_set.len());
    for v in values {
        raw.push_str(&v.len().to_string());
        raw.push(':');
        raw.push_str(v);
        raw.push('|');
    }
    let digest = Sha256::digest(raw.as_bytes());
    let mut first = [0u8; 8];
    for (dst, src) in first.iter_mut().zip(digest.iter()) {
        *dst = *src;
    }
    let n = u64::try_from(buckets.max(1)).unwrap_or(u64::MAX);
    let bucket = usize::try_from(u64::from_be_bytes(first).checked_rem(n).unwrap_or(0)).unwrap_or(0);
    let readable = raw.len() <= MAX_READABLE_ID && raw.bytes().all(|b| (0x20..0x7f).contains(&b));
    let id = if readable { format!("={raw}") } else { format!("#{}", hex(digest.get(..16).unwrap_or_default())) };
    CounterKey { id, bucket }
}

/// The shared-data key of bucket `i`.
pub fn bucket_name(i: usize) -> String {
    format!("{BUCKET_PREFIX}{i}")
}

/// One stored window: length, start, count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Window length (ms).
    pub len_ms: u64,
    /// Window start (ms since the epoch).
    pub start: u64,
    /// Units counted.
    pub count: u64,
}

fn decode_slots(s: &str) -> Vec<Slot> {
    s.split(';')
        .filter_map(|part| {
            let (len, rest) = part.split_once('@')?;
            let (start, count) = rest.split_once(':')?;
            Some(Slot { len_ms: len.parse().ok()?, start: start.parse().ok()?, count: count.parse().ok()? })
        })
        .filter(|s| s.len_ms > 0)
        .collect()
}

fn encode_slots(slots: &[Slot]) -> String {
    slots.iter().map(|s| format!("{}@{}:{}", s.len_ms, s.start, s.count)).collect::<Vec<_>>().join(";")
}

/// A bucket's counters, in stored order. Lines that do not parse are dropped.
pub fn decode_bucket(bytes: Option<&[u8]>) -> Vec<(String, Vec<Slot>)> {
    let Some(bytes) = bytes else { return Vec::new() };
    let text = String::from_utf8_lossy(bytes);
    text.split('\n')
        .filter_map(|line| {
            let (id, slots) = line.split_once('\t')?;
            (id.starts_with('=') || id.starts_with('#')).then(|| (id.to_string(), decode_slots(slots)))
        })
        .collect()
}

fn encode_bucket(entries: &[(String, Vec<Slot>)]) -> Vec<u8> {
    if entries.is_empty() {
        return EMPTY_BUCKET.to_vec();
    }
    let mut out = String::new();
    for (id, slots) in entries {
        out.push_str(id);
        out.push('\t');
        out.push_str(&encode_slots(slots));
        out.push('\n');
    }
    out.into_bytes()
}

/// All windows of a counter have ended (it counts nothing any more).
pub fn expired(slots: &[Slot], now_ms: u64) -> bool {
    slots.iter().all(|s| s.start.saturating_add(s.len_ms) <= now_ms)
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

/// What the store did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// CAS writes that lost a race and were retried.
    pub retries: u64,
    /// Successful writes.
    pub writes: u64,
    /// Change of the live-counter count.
    pub live_delta: i64,
}

/// Counter operations over a host's shared data.
pub struct Store<'a> {
    host: &'a mut dyn Host,
    retries: u32,
    max_counters: usize,
    anchor: Option<u32>,
    /// What was done so far.
    pub stats: Stats,
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl<'a> Store<'a> {
    /// A store on `host`.
    pub fn new(host: &'a mut dyn Host, retries: u32, max_counters: usize) -> Self {
        Self { host, retries: retries.max(1), max_counters, anchor: None, stats: Stats::default() }
    }

    /// Buckets of this store.
    pub fn buckets(&self) -> usize {
        bucket_count(self.max_counters)
    }

    /// A CAS token that cannot match any key other than the anchor (see the module docs).
    fn anchor_token(&mut self) -> Result<u32, StoreError> {
        if let Some(t) = self.anchor {
            return Ok(t);
        }
        for _ in 0..2 {
            if let (_, Some(cas)) = self.host.shared_data(ANCHOR_KEY) {
                self.anchor = Some(cas);
                return Ok(cas);
            }
            // Absent: every writer writes the same value and nobody CASes on the anchor, so a
            // plain write is harmless here.
            self.host.set_shared_data(ANCHOR_KEY, b"1", None).map_err(|_| StoreError::HostFailed)?;
        }
        Err(StoreError::HostFailed)
    }

    /// Write `value` under `key` read with version `cas` (`None`: the key was missing).
    fn write(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        let token = match cas {
            Some(c) => Some(c),
            None => Some(self.anchor_token()?),
        };
        match self.host.set_shared_data(key, value, token) {
            Ok(()) => {
                self.stats.writes = self.stats.writes.saturating_add(1);
                Ok(true)
            }
            Err(SharedDataError::CasMismatch) => {
                self.stats.retries = self.stats.retries.saturating_add(1);
                Ok(false)
            }
            Err(SharedDataError::Failed) => Err(StoreError::HostFailed),
        }
    }

    /// The live-counter count.
    pub fn live(&self) -> u64 {
        let (v, _) = self.host.shared_data(LIVE_KEY);
        v.and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok()).unwrap_or(0)
    }

    /// Add `delta` to the live count; with `cap`, refuse to pass `max_counters`.
    fn add_live(&mut self, delta: i64, cap: bool) -> Result<(), StoreError> {
        if delta == 0 {
            return Ok(());
        }
        for _ in 0..self.retries {
            let (v, cas) = self.host.shared_data(LIVE_KEY);
            let n: u64 = v.and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok()).unwrap_or(0);
            let next = if delta >= 0 {
                n.saturating_add(delta.unsigned_abs())
            } else {
                n.saturating_sub(delta.unsigned_abs())
            };
            if cap && next > u64::try_from(self.max_counters).unwrap_or(u64::MAX) {
                return Err(StoreError::Full);
            }
            if self.write(LIVE_KEY, next.to_string().as_bytes(), cas)? {
                self.stats.live_delta = self.stats.live_delta.saturating_add(delta);
                return Ok(());
            }
        }
        Err(StoreError::Contended)
    }

    /// Reserve `amount` in every window of `key`, or none when one would exceed its limit
    /// (unless `force`, used by shadow mode to count what it does not enforce).
    pub fn reserve(
        &mut self,
        key: &CounterKey,
        windows: &[Window],
        amount: u64,
        now_ms: u64,
        force: bool,
    ) -> Result<Reserved, StoreError> {
        let name = bucket_name(key.bucket);
        // A slot of the live count taken for a counter this call creates.
        let mut taken = false;
        let result = self.reserve_in(&name, key, windows, amount, now_ms, force, &mut taken);
        if taken && !matches!(result, Ok(Reserved::Fits { .. }) | Ok(Reserved::Over { starts: Some(_), .. })) {
            if let Err(e) = self.add_live(-1, false) {
                log::warn!("{}: live counter count not restored: {e}", crate::NAME);
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn reserve_in(
        &mut self,
        name: &str,
        key: &CounterKey,
        windows: &[Window],
        amount: u64,
        now_ms: u64,
        force: bool,
        taken: &mut bool,
    ) -> Result<Reserved, StoreError> {
        for _ in 0..self.retries {
            let (value, cas) = self.host.shared_data(name);
            let mut entries = decode_bucket(value.as_deref());
            let before = entries.len();
            entries.retain(|(id, slots)| *id == key.id || !expired(slots, now_ms));
            let dropped = before.saturating_sub(entries.len());
            let pos = entries.iter().position(|(id, _)| *id == key.id);
            if pos.is_none() {
                if entries.len() >= BUCKET_CAPACITY {
                    return Err(StoreError::Full);
                }
                if dropped == 0 && !*taken {
                    self.add_live(1, true)?;
                    *taken = true;
                }
            }
            let slots = pos.and_then(|p| entries.get(p)).map(|(_, s)| s.clone()).unwrap_or_default();
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
            match pos.and_then(|p| entries.get_mut(p)) {
                Some(e) => e.1 = new_slots,
                None => entries.push((key.id.clone(), new_slots)),
            }
            if self.write(name, &encode_bucket(&entries), cas)? {
                // Net change of the live count: +1 for a created counter, -1 per reclaimed one,
                // minus the slot taken up front.
                let net = to_i64(usize::from(pos.is_none()))
                    .saturating_sub(to_i64(dropped))
                    .saturating_sub(i64::from(*taken));
                *taken = false;
                if let Err(e) = self.add_live(net, false) {
                    // The reservation is written; only the count of counters drifts.
                    log::warn!("{}: live counter count not updated: {e}", crate::NAME);
                }
                return Ok(match over {
                    Some(i) => {
                        Reserved::Over { window: i, used: counts.get(i).copied().unwrap_or(0), starts: Some(starts) }
                    }
                    None => Reserved::Fits { starts, used },
                });
            }
        }
        Err(StoreError::Contended)
    }

    /// Add `delta` (may be negative) to the windows that still have the starts the
    /// reservation was made in; windows that have rolled over since are left alone, and so
    /// is a counter that no longer exists. Counts never go below 0.
    pub fn adjust(
        &mut self,
        key: &CounterKey,
        windows: &[Window],
        starts: &[u64],
        delta: i64,
    ) -> Result<(), StoreError> {
        if delta == 0 {
            return Ok(());
        }
        let name = bucket_name(key.bucket);
        for _ in 0..self.retries {
            let (value, cas) = self.host.shared_data(&name);
            let mut entries = decode_bucket(value.as_deref());
            let Some((_, slots)) = entries.iter_mut().find(|(id, _)| *id == key.id) else { return Ok(()) };
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
            if self.write(&name, &encode_bucket(&entries), cas)? {
                return Ok(());
            }
        }
        Err(StoreError::Contended)
    }

    /// The current count of each window of `key` (0 when absent).
    pub fn peek(&self, key: &CounterKey, windows: &[Window], now_ms: u64) -> Vec<u64> {
        let (value, _) = self.host.shared_data(&bucket_name(key.bucket));
        let entries = decode_bucket(value.as_deref());
        let slots = entries.into_iter().find(|(id, _)| *id == key.id).map(|(_, s)| s).unwrap_or_default();
        current(&slots, windows, now_ms)
    }

    /// Reclaim the expired counters of up to `count` buckets from `from` (wrapping). Returns
    /// the next bucket to look at and how many counters were reclaimed. A bucket that
    /// changed meanwhile is left for a later sweep.
    pub fn sweep(&mut self, from: usize, count: usize, now_ms: u64) -> (usize, usize) {
        let buckets = self.buckets();
        let mut i = from.checked_rem(buckets).unwrap_or(0);
        let mut reclaimed: usize = 0;
        for _ in 0..count.min(buckets) {
            let name = bucket_name(i);
            let (value, cas) = self.host.shared_data(&name);
            if value.is_some() {
                let mut entries = decode_bucket(value.as_deref());
                let before = entries.len();
                entries.retain(|(_, slots)| !expired(slots, now_ms));
                let dropped = before.saturating_sub(entries.len());
                if dropped > 0 && matches!(self.write(&name, &encode_bucket(&entries), cas), Ok(true)) {
                    reclaimed = reclaimed.saturating_add(dropped);
                    if let Err(e) = self.add_live(-to_i64(dropped), false) {
                        log::warn!("{}: live counter count not updated: {e}", crate::NAME);
                    }
                }
            }
            i = i.saturating_add(1).checked_rem(buckets).unwrap_or(0);
        }
        (i, reclaimed)
    }
}

#[cfg(test)]
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

    fn key(s: &str) -> CounterKey {
        counter_key("s", "r", &[s.to_string()], bucket_count(100))
    }

    /// A key of a store with `max_counters` 2 (one bucket).
    fn key2(s: &str) -> CounterKey {
        counter_key("s", "r", &[s.to_string()], bucket_count(2))
    }

    #[test]
    fn keys_cannot_be_forged_and_odd_ones_are_hashed() {
        let a = counter_key("s", "r", &["a|1:b".into()], 10);
        let b = counter_key("s", "r", &["a".into(), "b".into()], 10);
        assert_ne!(a.id, b.id);
        assert_ne!(counter_key("s|r", "x", &[], 10).id, counter_key("s", "r|x", &[], 10).id);
        assert!(a.id.starts_with('='), "{a:?}");
        let long = counter_key("s", "r", &["x".repeat(500)], 10);
        assert!(long.id.starts_with('#') && long.id.len() == 33, "{long:?}");
        for odd in ["tab\there", "line\nbreak", "é", "\u{0}"] {
            let k = counter_key("s", "r", &[odd.to_string()], 10);
            assert!(k.id.starts_with('#'), "{odd:?} -> {k:?}");
        }
        assert!(a.bucket < 10 && long.bucket < 10);
        assert_eq!(sha256_hex32(b"sk-test").len(), 32);
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }

    #[test]
    fn reserve_refuses_what_does_not_fit_and_resets_with_the_window() {
        let mut h = FakeHost::default();
        let w = windows();
        let mut s = Store::new(&mut h, 10, 100);
        let k = key("k");
        assert!(matches!(s.reserve(&k, &w, 100, 1_000, false).unwrap(), Reserved::Fits { .. }));
        assert_eq!(s.reserve(&k, &w, 60, 2_000, false).unwrap(), Reserved::Over { window: 0, used: 100, starts: None });
        assert!(matches!(s.reserve(&k, &w, 50, 3_000, false).unwrap(), Reserved::Fits { .. }));
        let r = s.reserve(&k, &w, 150, 61_000, false).unwrap();
        assert_eq!(r, Reserved::Fits { starts: vec![60_000, 0], used: vec![150, 300] });
        assert_eq!(
            s.reserve(&k, &w, 1, 121_000, false).unwrap(),
            Reserved::Over { window: 1, used: 300, starts: None }
        );
        assert_eq!(s.live(), 1);
        assert_eq!(s.stats.retries, 0);
    }

    #[test]
    fn the_common_path_is_one_read_and_one_cas() {
        let mut h = FakeHost::default();
        let w = windows();
        let k = key("alice");
        Store::new(&mut h, 10, 100).reserve(&k, &w, 1, 1_000, false).unwrap();
        let writes = h.shared_writes;
        let mut c = sluice_core::host::CountingHost::new(h);
        let mut s = Store::new(&mut c, 10, 100);
        s.reserve(&k, &w, 1, 2_000, false).unwrap();
        let stats = s.stats;
        assert_eq!(stats, Stats { retries: 0, writes: 1, live_delta: 0 });
        assert_eq!(c.total(), 1, "one shared-data read");
        assert_eq!(c.inner.shared_writes, writes + 1, "one CAS write");
    }

    #[test]
    fn creating_is_never_a_blind_write() {
        // A bucket another worker created between our read and our write: the anchor's token
        // cannot match it, so our write fails and is retried on what is there.
        let mut h = FakeHost::default();
        let w = windows();
        let k = key("alice");
        let mut s = Store::new(&mut h, 10, 100);
        let _ = s.anchor_token().unwrap();
        h.set_shared_data(&bucket_name(k.bucket), b"=other\t60000@0:5\n", None).unwrap();
        let cas_of_anchor = h.shared_data(ANCHOR_KEY).1;
        let mut s = Store::new(&mut h, 10, 100);
        s.anchor = cas_of_anchor;
        assert!(!s.write(&bucket_name(k.bucket), b"x", None).unwrap(), "mismatch, not an overwrite");
        assert!(matches!(s.reserve(&k, &w, 1, 1_000, false).unwrap(), Reserved::Fits { .. }));
        let entries = decode_bucket(h.shared_data(&bucket_name(k.bucket)).0.as_deref());
        assert_eq!(entries.len(), 2, "{entries:?}");
    }

    #[test]
    fn adjust_replaces_reservation_and_skips_rolled_windows() {
        let mut h = FakeHost::default();
        let w = windows();
        let k = key("k");
        let mut s = Store::new(&mut h, 10, 100);
        let Reserved::Fits { starts, .. } = s.reserve(&k, &w, 100, 1_000, false).unwrap() else { panic!() };
        s.adjust(&k, &w, &starts, -40).unwrap();
        assert_eq!(s.peek(&k, &w, 2_000), vec![60, 60]);
        s.adjust(&k, &w, &starts, -1_000).unwrap();
        assert_eq!(s.peek(&k, &w, 2_000), vec![0, 0]);
        s.adjust(&k, &w, &starts, 30).unwrap();
        s.adjust(&k, &w, &[0, 0], 5).unwrap();
        assert_eq!(s.peek(&k, &w, 61_000), vec![0, 35]);
        s.adjust(&key("nobody"), &w, &starts, 5).unwrap();
    }

    #[test]
    fn shadow_force_counts_over_limit() {
        let mut h = FakeHost::default();
        let w = windows();
        let k = key("k");
        let mut s = Store::new(&mut h, 10, 100);
        let r = s.reserve(&k, &w, 200, 1_000, true).unwrap();
        assert!(matches!(r, Reserved::Over { window: 0, used: 0, starts: Some(_) }));
        assert_eq!(s.peek(&k, &w, 1_000), vec![200, 200]);
        assert_eq!(s.live(), 1);
    }

    #[test]
    fn the_cap_holds_and_expired_counters_are_reclaimed() {
        let mut h = FakeHost::default();
        let w = windows();
        let mut s = Store::new(&mut h, 10, 2);
        s.reserve(&key2("a"), &w, 1, 1_000, false).unwrap();
        s.reserve(&key2("b"), &w, 1, 1_000, false).unwrap();
        assert_eq!(s.reserve(&key2("c"), &w, 1, 1_000, false), Err(StoreError::Full));
        assert_eq!(s.live(), 2, "a refused creation gives its slot back");
        // An over-limit first request creates nothing either.
        assert_eq!(s.sweep(0, 10, 10_000), (0, 0));
        assert_eq!(s.live(), 2);
        // After every window ended, a new key reuses the space in the same write.
        assert!(matches!(s.reserve(&key2("c"), &w, 1, 3_600_000, false).unwrap(), Reserved::Fits { .. }));
        assert_eq!(s.live(), 1);
        // The sweep reclaims what is left.
        assert_eq!(s.sweep(0, 10, 7_200_000).1, 1);
        assert_eq!(s.live(), 0);
        assert_eq!(s.stats.live_delta, 0);
        let (v, cas) = h.shared_data(&bucket_name(0));
        assert_eq!((v.as_deref(), cas.is_some()), (Some(&b"-"[..]), true), "emptied: a non-empty marker");
    }

    #[test]
    fn a_refused_first_request_creates_no_counter() {
        let mut h = FakeHost::default();
        let w = windows();
        let mut s = Store::new(&mut h, 10, 5);
        assert!(matches!(
            s.reserve(&key("big"), &w, 1_000, 1_000, false).unwrap(),
            Reserved::Over { starts: None, .. }
        ));
        assert_eq!(s.live(), 0);
        assert_eq!(s.stats.live_delta, 0);
    }

    #[test]
    fn memory_is_bounded_however_many_keys_pass() {
        let mut h = FakeHost::default();
        let w = vec![Window { name: "2s".into(), len_ms: 2_000, unit: None, limit: 10 }];
        let mut s = Store::new(&mut h, 10, 8);
        let mut now = 0;
        for round in 0..50 {
            for u in 0..8 {
                let k = counter_key("s", "r", &[format!("user-{round}-{u}")], bucket_count(8));
                assert!(matches!(s.reserve(&k, &w, 1, now, false).unwrap(), Reserved::Fits { .. }), "round {round}");
            }
            assert!(s.live() <= 8);
            now += 2_000;
            s.sweep(0, 100, now);
        }
        let keys: Vec<&String> = h.shared.keys().collect();
        assert!(keys.len() <= 2 + bucket_count(8), "{keys:?}");
    }

    #[test]
    fn garbage_values_read_as_zero() {
        let mut h = FakeHost::default();
        let k = key("k");
        h.set_shared_data(&bucket_name(k.bucket), b"\xff\xfe;;1@x:y;@@\n=k\tgarbage\n\t\t", None).unwrap();
        let w = windows();
        let mut s = Store::new(&mut h, 10, 100);
        assert_eq!(s.peek(&k, &w, 0), vec![0, 0]);
        assert!(matches!(s.reserve(&k, &w, 5, 0, false).unwrap(), Reserved::Fits { .. }));
        assert_eq!(s.peek(&k, &w, 0), vec![5, 5]);
    }
}
