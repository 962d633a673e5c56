//! Plugin configuration, read with the one core reader (`sluice_core::config::Obj`).

use crate::embeddings::Embeddings;
use crate::key::{KeyText, Scope};
use crate::store::{load_store, Chroma};
use sluice_core::config::{ConfigError, FailureMode, Obj};
use std::time::Duration;

/// Default collection of the semantic tier.
pub const DEFAULT_COLLECTION: &str = "sluice-cache";
/// Default time an entry is served.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default largest cosine distance that counts as the same question (similarity ≥ 0.9).
pub const DEFAULT_MAX_DISTANCE: f64 = 0.1;
/// Default slots of the exact tier.
pub const DEFAULT_MAX_ENTRIES: u64 = 4096;
/// Default largest answer record stored.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 64 * 1024;
/// Default cap on a request body read.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;
/// Default interval of the semantic tier's expired-entry cleanup.
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(300);

/// The semantic tier: where vectors come from and where they are kept.
#[derive(Debug, Clone)]
pub struct Semantic {
    /// The embeddings endpoint.
    pub embeddings: Embeddings,
    /// The vector store.
    pub store: Chroma,
    /// Its collection.
    pub collection: String,
    /// Largest cosine distance that is a hit.
    pub max_distance: f32,
    /// How often expired entries are deleted from the store (`None`: never).
    pub cleanup_interval: Option<Duration>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The exact tier is on.
    pub exact: bool,
    /// The semantic tier, when on.
    pub semantic: Option<Semantic>,
    /// How long an entry is served.
    pub ttl: Duration,
    /// Which text keys the cache.
    pub key_text: KeyText,
    /// Who shares entries.
    pub scope: Scope,
    /// Only cache `temperature: 0` requests.
    pub skip_nonzero_temperature: bool,
    /// Embeddings or store down or slow: forward uncached (`Allow`) or answer 503 (`Deny`).
    pub failure_mode: FailureMode,
    /// Slots of the exact tier.
    pub max_entries: u64,
    /// Largest answer record stored (bytes); larger answers are not cached.
    pub max_entry_bytes: usize,
    /// Largest request body read; a larger one gets 413.
    pub max_request_body_bytes: usize,
    /// Namespace of this cache's shared-data keys and queue (from the collection name).
    pub namespace: String,
}

fn positive(o: &Obj<'_>, key: &str, default: u64, max: u64) -> Result<u64, ConfigError> {
    match o.u64(key)? {
        None => Ok(default),
        Some(0) => Err(o.err(key, "must be greater than 0")),
        Some(n) if n > max => Err(o.err(key, format!("must be at most {max}"))),
        Some(n) => Ok(n),
    }
}

impl Config {
    /// Read and check the configuration object.
    pub fn load(o: Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        o.known(&[
            "exact",
            "semantic",
            "embeddings",
            "store",
            "ttl",
            "max_distance",
            "key_text",
            "scope",
            "skip_nonzero_temperature",
            "failure_mode",
            "max_entries",
            "max_entry_bytes",
            "max_request_body_bytes",
            "cleanup_interval",
        ])?;
        let exact = o.flag("exact", true)?;
        let semantic_on = o.flag("semantic", true)?;
        if !exact && !semantic_on {
            return Err(o.err("semantic", "exact and semantic are both off: nothing would be cached"));
        }
        let ttl = match o.duration("ttl")? {
            Some(t) if t < Duration::from_secs(1) => return Err(o.err("ttl", "must be at least 1s")),
            Some(t) => t,
            None => DEFAULT_TTL,
        };
        let max_distance = match o.number("max_distance")? {
            Some(d) if !(0.0..=2.0).contains(&d) => {
                return Err(o.err("max_distance", "must be between 0 and 2 (cosine distance)"))
            }
            Some(d) => d,
            None => DEFAULT_MAX_DISTANCE,
        };
        let cleanup_interval = match o.duration("cleanup_interval")? {
            Some(d) if d.is_zero() => None,
            Some(d) if d < Duration::from_secs(1) => {
                return Err(o.err("cleanup_interval", "must be 0 (off) or at least 1s"))
            }
            Some(d) => Some(d),
            None => Some(DEFAULT_CLEANUP_INTERVAL),
        };
        let semantic = if semantic_on {
            let embeddings = o.object("embeddings", |e| Embeddings::load(e, env))?.ok_or_else(|| {
                o.err("embeddings", "missing field (needed by the semantic tier; set semantic: false for exact only)")
            })?;
            let (store, collection) =
                o.object("store", |s| load_store(s, env, Some(DEFAULT_COLLECTION)))?.ok_or_else(|| {
                    o.err("store", "missing field (needed by the semantic tier; set semantic: false for exact only)")
                })?;
            Some(Semantic {
                embeddings,
                store,
                collection: collection.unwrap_or_else(|| DEFAULT_COLLECTION.to_string()),
                max_distance: max_distance as f32,
                cleanup_interval,
            })
        } else {
            for k in ["embeddings", "store", "max_distance"] {
                if o.has(k) {
                    return Err(o.err(k, "only used by the semantic tier, which is off (semantic: false)"));
                }
            }
            None
        };
        let key_text =
            o.choice("key_text", KeyText::NAMES)?.and_then(|s| KeyText::from_name(&s)).unwrap_or(KeyText::LastUser);
        let scope = o.choice("scope", Scope::NAMES)?.and_then(|s| Scope::from_name(&s)).unwrap_or(Scope::User);
        let namespace = semantic.as_ref().map_or_else(|| "exact".to_string(), |s| s.collection.clone());
        const GIB: u64 = 1024 * 1024 * 1024;
        Ok(Self {
            exact,
            semantic,
            ttl,
            key_text,
            scope,
            skip_nonzero_temperature: o.flag("skip_nonzero_temperature", false)?,
            failure_mode: o.failure_mode("failure_mode")?.unwrap_or(FailureMode::Allow),
            max_entries: positive(&o, "max_entries", DEFAULT_MAX_ENTRIES, 1_000_000)?,
            max_entry_bytes: usize::try_from(positive(
                &o,
                "max_entry_bytes",
                DEFAULT_MAX_ENTRY_BYTES as u64,
                16 * 1024 * 1024,
            )?)
            .unwrap_or(DEFAULT_MAX_ENTRY_BYTES),
            max_request_body_bytes: usize::try_from(positive(
                &o,
                "max_request_body_bytes",
                DEFAULT_MAX_REQUEST_BODY_BYTES as u64,
                GIB,
            )?)
            .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES),
            namespace,
        })
    }

    /// Parse a whole document (tests, config-check).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        sluice_core::config::read(bytes, |o| Self::load(o, &|_| None))
    }

    /// TTL in milliseconds.
    pub fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEM: &str = r#""embeddings":{"cluster":"emb","model":"text-embedding-3-small"},"store":{"cluster":"chroma"}"#;

    #[test]
    fn defaults() {
        let c = Config::parse(format!("{{{SEM}}}").as_bytes()).unwrap();
        assert!(c.exact);
        let s = c.semantic.as_ref().unwrap();
        assert_eq!(s.collection, DEFAULT_COLLECTION);
        assert!((s.max_distance - 0.1).abs() < 1e-6);
        assert_eq!(s.cleanup_interval, Some(DEFAULT_CLEANUP_INTERVAL));
        assert_eq!(
            (c.ttl, c.key_text, c.scope, c.failure_mode),
            (DEFAULT_TTL, KeyText::LastUser, Scope::User, FailureMode::Allow)
        );
        assert!(!c.skip_nonzero_temperature);
        assert_eq!(c.namespace, DEFAULT_COLLECTION);
        let exact_only = Config::parse(br#"{"semantic":false}"#).unwrap();
        assert!(exact_only.semantic.is_none() && exact_only.exact);
    }

    #[test]
    fn all_fields() {
        let doc = format!(
            r#"{{{SEM},"exact":false,"ttl":"10m","max_distance":0.25,"key_text":"conversation_with_system","scope":"team",
                "skip_nonzero_temperature":true,"failure_mode":"deny","max_entries":10,"max_entry_bytes":1000,
                "max_request_body_bytes":2000,"cleanup_interval":"0"}}"#
        );
        let c = Config::parse(doc.as_bytes()).unwrap();
        assert!(!c.exact);
        assert_eq!(c.ttl_ms(), 600_000);
        assert_eq!(
            (c.key_text, c.scope, c.failure_mode),
            (KeyText::ConversationWithSystem, Scope::Team, FailureMode::Deny)
        );
        assert_eq!((c.max_entries, c.max_entry_bytes, c.max_request_body_bytes), (10, 1000, 2000));
        assert_eq!(c.semantic.unwrap().cleanup_interval, None);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(String, &str)> = vec![
            ("{}".into(), "embeddings"),
            (r#"{"embeddings":{"cluster":"e","model":"m"}}"#.into(), "store"),
            (r#"{"exact":false,"semantic":false}"#.into(), "semantic"),
            (r#"{"semantic":false,"max_distance":0.2}"#.into(), "max_distance"),
            (format!(r#"{{{SEM},"ttl":"500ms"}}"#), "ttl"),
            (format!(r#"{{{SEM},"max_distance":3}}"#), "max_distance"),
            (format!(r#"{{{SEM},"key_text":"first"}}"#), "key_text"),
            (format!(r#"{{{SEM},"scope":"tenant"}}"#), "scope"),
            (format!(r#"{{{SEM},"failure_mode":"open"}}"#), "failure_mode"),
            (format!(r#"{{{SEM},"max_entries":0}}"#), "max_entries"),
            (format!(r#"{{{SEM},"cleanup_interval":"10ms"}}"#), "cleanup_interval"),
            (format!(r#"{{{SEM},"colour":1}}"#), "colour"),
            (r#"{"embeddings":{"cluster":"e"},"store":{"cluster":"c"}}"#.into(), "embeddings.model"),
            (
                r#"{"embeddings":{"cluster":"e","model":"m"},"store":{"cluster":"c","collection":"x"}}"#.into(),
                "store.collection",
            ),
        ];
        for (doc, field) in cases {
            let e = Config::parse(doc.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{doc}: {e}");
        }
    }
}
