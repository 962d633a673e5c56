//! Remote JWKS bookkeeping per VM: the keys last fetched, when to fetch again, and how a
//! fetch result changes them. Pure: the filter glue does the callouts.

use crate::config::{Config, RemoteJwks};
use crate::jwt::{sha256, TokenCache};
use crate::keys::{KeySet, KeySource};
use sluice_core::host::Host;
use sluice_core::metrics::MetricIds;

/// State of one provider's remote JWKS.
#[derive(Debug, Default, Clone)]
pub struct RemoteState {
    /// Keys from the last good fetch (kept when later fetches fail).
    pub keys: KeySet,
    /// A fetch has succeeded at least once.
    pub loaded: bool,
    /// Bumped whenever the key set changes (invalidates cached verifications).
    pub generation: u64,
    /// Millisecond time of the last fetch attempt.
    pub last_attempt_ms: Option<u64>,
    /// Millisecond time a fetch started, while one is outstanding.
    pub in_flight_since_ms: Option<u64>,
    /// Hash of the last JWKS body applied.
    body_hash: Option<[u8; 32]>,
}

impl RemoteState {
    fn in_flight(&self, now_ms: u64, cfg: &RemoteJwks) -> bool {
        // A callout whose context went away never answers: treat it as lost after its timeout.
        let grace = u64::try_from(cfg.timeout.as_millis()).unwrap_or(u64::MAX).saturating_add(1000);
        self.in_flight_since_ms.is_some_and(|t| now_ms < t.saturating_add(grace))
    }

    /// A timer refresh is due.
    pub fn refresh_due(&self, now_ms: u64, cfg: &RemoteJwks) -> bool {
        if self.in_flight(now_ms, cfg) {
            return false;
        }
        let Some(last) = self.last_attempt_ms else { return true };
        let wait = if self.loaded { cfg.refresh_interval } else { cfg.min_refresh_interval };
        now_ms >= last.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
    }

    /// An on-demand refresh (unknown `kid`, keys never loaded) is allowed: rate-limited by
    /// `min_refresh_interval`.
    pub fn on_demand_allowed(&self, now_ms: u64, cfg: &RemoteJwks) -> bool {
        if self.in_flight(now_ms, cfg) {
            return false;
        }
        match self.last_attempt_ms {
            None => true,
            Some(last) => {
                now_ms >= last.saturating_add(u64::try_from(cfg.min_refresh_interval.as_millis()).unwrap_or(u64::MAX))
            }
        }
    }

    /// Record that a fetch started.
    pub fn started(&mut self, now_ms: u64) {
        self.last_attempt_ms = Some(now_ms);
        self.in_flight_since_ms = Some(now_ms);
    }

    /// Apply a fetch result. A failed or unusable response keeps the cached keys.
    /// `Ok(true)`: the key set changed.
    pub fn finished(&mut self, status: Option<u16>, body: Option<&[u8]>) -> Result<bool, String> {
        self.in_flight_since_ms = None;
        if status != Some(200) {
            return Err(format!("JWKS fetch answered {status:?}"));
        }
        self.apply(body.ok_or("JWKS fetch returned no body")?)
    }

    /// Use a JWKS document (fetched here, or published by another worker).
    pub fn apply(&mut self, body: &[u8]) -> Result<bool, String> {
        let hash = sha256(body);
        if self.loaded && self.body_hash == Some(hash) {
            return Ok(false);
        }
        let keys = KeySet::from_jwks(body, KeySource::Remote)?;
        if keys.is_empty() {
            return Err("JWKS has no usable keys".into());
        }
        self.keys = keys;
        self.loaded = true;
        self.body_hash = Some(hash);
        self.generation = self.generation.wrapping_add(1);
        Ok(true)
    }

    /// Adopt the JWKS another worker VM published in shared data, if it differs.
    pub fn sync_shared<H: Host + ?Sized>(&mut self, h: &H, provider: &str) -> bool {
        match h.shared_data(&shared_key(provider)).0 {
            Some(body) if !body.is_empty() => self.apply(&body).unwrap_or(false),
            _ => false,
        }
    }
}

/// Shared-data key under which a worker publishes the last good JWKS of a provider, so
/// every worker VM (and the main thread's) uses the same keys after any one fetch.
pub fn shared_key(provider: &str) -> String {
    format!("sluice.auth.jwks.{provider}")
}

/// Publish a fetched JWKS for the other worker VMs.
pub fn publish<H: Host + ?Sized>(h: &mut H, provider: &str, body: &[u8]) {
    if let Err(e) = h.set_shared_data(&shared_key(provider), body, None) {
        log::warn!("auth: publishing JWKS for {provider}: {e:?}");
    }
}

/// Everything one VM (one worker thread) keeps across requests.
#[derive(Debug)]
pub struct VmState {
    /// Remote JWKS state by provider index (unused for static providers).
    pub remote: Vec<RemoteState>,
    /// Verified tokens.
    pub cache: TokenCache,
    /// Metric ids.
    pub metrics: MetricIds,
}

impl VmState {
    /// Fresh state for a configuration.
    pub fn new(cfg: &Config) -> Self {
        Self {
            remote: vec![RemoteState::default(); cfg.providers.len()],
            cache: TokenCache::new(cfg.cache_max_entries),
            metrics: MetricIds::new(64),
        }
    }

    /// Key generation of a provider (0 for static keys).
    pub fn generation(&self, provider: usize) -> u64 {
        self.remote.get(provider).map_or(0, |r| r.generation)
    }
}

/// The callout headers for a JWKS fetch.
pub fn fetch_headers(r: &RemoteJwks) -> Vec<(&str, &str)> {
    vec![
        (":method", "GET"),
        (":path", r.path.as_str()),
        (":authority", r.authority.as_str()),
        ("accept", "application/json"),
    ]
}
