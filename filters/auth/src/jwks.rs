//! Remote JWKS bookkeeping per VM: the keys last fetched, when to fetch again, and how a
//! fetch result changes them. Pure: the plugin (root timer) and the stage (unknown `kid`)
//! make the callouts.

use crate::config::RemoteJwks;
use crate::jwt::sha256;
use crate::keys::KeySet;
use sluice_core::host::Host;

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
    /// Version (CAS) of the shared-data copy last looked at: an unchanged copy is not parsed
    /// or hashed again (the timer looks every tick; requests look when a key is missing).
    shared_cas: Option<u32>,
}

/// What applying a JWKS document did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// The key set changed.
    pub changed: bool,
    /// Keys now held.
    pub keys: usize,
    /// JWKs that could not be parsed (skipped), with why.
    pub skipped: Vec<String>,
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

    /// Record that a fetch could not even be dispatched (counts as an attempt).
    pub fn not_dispatched(&mut self, now_ms: u64) {
        self.last_attempt_ms = Some(now_ms);
        self.in_flight_since_ms = None;
    }

    /// Apply a fetch result. A failed or unusable response keeps the cached keys.
    pub fn finished(&mut self, status: Option<u16>, body: Option<&[u8]>) -> Result<Applied, String> {
        self.in_flight_since_ms = None;
        if status != Some(200) {
            return Err(format!("JWKS fetch answered {status:?}"));
        }
        self.apply(body.ok_or("JWKS fetch returned no body")?)
    }

    /// Use a JWKS document (fetched here, or published by another worker).
    pub fn apply(&mut self, body: &[u8]) -> Result<Applied, String> {
        let hash = sha256(body);
        if self.loaded && self.body_hash == Some(hash) {
            return Ok(Applied { changed: false, keys: self.keys.keys.len(), skipped: Vec::new() });
        }
        let (keys, skipped) = KeySet::from_jwks(body)?;
        if keys.is_empty() {
            return Err("JWKS has no usable keys".into());
        }
        let n = keys.keys.len();
        self.keys = keys;
        self.loaded = true;
        self.body_hash = Some(hash);
        self.generation = self.generation.wrapping_add(1);
        Ok(Applied { changed: true, keys: n, skipped })
    }

    /// Adopt the JWKS another worker VM published in shared data, if it differs (one
    /// shared-data read).
    pub fn sync_shared(&mut self, h: &dyn Host, provider: &str) -> bool {
        let (value, cas) = h.shared_data(&shared_key(provider));
        if cas.is_some() && cas == self.shared_cas {
            return false;
        }
        self.shared_cas = cas;
        match value {
            Some(body) if !body.is_empty() => self.apply(&body).is_ok_and(|a| a.changed),
            _ => false,
        }
    }
}

/// Shared-data key under which a worker publishes the last good JWKS of a provider, so
/// every worker VM (and the main thread's) uses the same keys after any one fetch.
pub fn shared_key(provider: &str) -> String {
    format!("sluice.auth.jwks.{provider}")
}

/// Publish a fetched JWKS for the other worker VMs; `false` if the host refused.
pub fn publish(h: &mut dyn Host, provider: &str, body: &[u8]) -> bool {
    h.set_shared_data(&shared_key(provider), body, None).is_ok()
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

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::host::FakeHost;

    const JWKS: &[u8] = br#"{"keys":[{"kty":"OKP","crv":"Ed25519","use":"sig","kid":"a","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

    #[test]
    fn shared_copy_is_adopted_once_per_version() {
        let mut h = FakeHost::default();
        let mut r = RemoteState::default();
        assert!(!r.sync_shared(&h, "idp"), "nothing published");
        assert!(publish(&mut h, "idp", JWKS));
        assert!(r.sync_shared(&h, "idp"));
        assert!(r.loaded && r.keys.has_kid("a"));
        let generation = r.generation;
        assert!(!r.sync_shared(&h, "idp"), "same version: not parsed again");
        assert!(publish(&mut h, "idp", JWKS));
        assert!(!r.sync_shared(&h, "idp"), "new version, same keys: unchanged");
        assert_eq!(r.generation, generation);
    }
}
