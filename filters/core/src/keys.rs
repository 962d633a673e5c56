//! The filter-state contract: the keys sluice filters use to hand per-request facts to each
//! other and to access logs.
//!
//! A filter writes with `set_property(vec![KEY], value)`; another filter reads it with
//! `get_property(vec![KEY])`; an access log prints it with `%FILTER_STATE(wasm.KEY:PLAIN)%`.
//! Keys are single path segments (dots inside one segment are fine). Clients cannot set
//! filter state, so a value here is as trustworthy as the filter that wrote it.
//! Values are UTF-8 strings; numbers are written in decimal.

/// Authenticated subject (JWT `sub` or the API key's subject). Written by auth.
pub const USER: &str = "sluice.user";
/// Team of the caller (configured claim, or the API key's team). Written by auth.
pub const TEAM: &str = "sluice.team";
/// How the caller authenticated: `jwt`, `jwt_authn` (Envoy's filter verified) or `api_key`. Written by auth.
pub const AUTH_METHOD: &str = "sluice.auth_method";
/// Prefix of configured claims copied by auth: `sluice.claim.<name>` (JSON-encoded when not a string).
pub const CLAIM_PREFIX: &str = "sluice.claim.";
/// Model the client asked for (after route defaults). Written by the first filter that parses the body.
pub const REQUESTED_MODEL: &str = "sluice.model";
/// Model sent upstream on the last attempt. Written by model-failover.
pub const UPSTREAM_MODEL: &str = "sluice.upstream_model";
/// Provider name of the endpoint that served the last attempt. Written by model-failover.
pub const PROVIDER: &str = "sluice.provider";
/// Model the provider reported in its response. Written by usage-metrics.
pub const RESPONSE_MODEL: &str = "sluice.response_model";
/// Input (prompt) tokens. Written by usage-metrics.
pub const INPUT_TOKENS: &str = "sluice.input_tokens";
/// Output (completion) tokens. Written by usage-metrics.
pub const OUTPUT_TOKENS: &str = "sluice.output_tokens";
/// Total tokens. Written by usage-metrics.
pub const TOTAL_TOKENS: &str = "sluice.total_tokens";
/// `true` when the token counts are an estimate (the provider reported none). Written by usage-metrics.
pub const USAGE_ESTIMATED: &str = "sluice.usage_estimated";
/// Milliseconds from request start to the first response body byte. Written by usage-metrics.
pub const TTFT_MS: &str = "sluice.ttft_ms";
/// Seconds a provider asked us to wait (`retry-after`, `retry-after-ms`, `x-ratelimit-reset-*`). Written by model-failover.
pub const RETRY_AFTER: &str = "sluice.retry_after";
/// Rate-limit verdict: the rule and window that refused, or `ok`. Written by token-ratelimit.
pub const RATELIMIT: &str = "sluice.ratelimit";
/// Prompt-guard verdict: `allow`, `mask:<rule>` or `reject:<rule>` (prefixed `shadow_` in shadow
/// mode; `;response_mask:<rule>` appended when an answer was masked). Written by prompt-guard.
pub const GUARD: &str = "sluice.guard";

/// One row of the contract, for documentation and checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDoc {
    /// The key.
    pub key: &'static str,
    /// Filter that writes it.
    pub written_by: &'static str,
    /// What the value means.
    pub meaning: &'static str,
}

/// Every key, in the order the README lists them.
pub const ALL: &[KeyDoc] = &[
    KeyDoc { key: USER, written_by: "auth", meaning: "authenticated subject (JWT `sub` or API key subject)" },
    KeyDoc { key: TEAM, written_by: "auth", meaning: "caller's team" },
    KeyDoc { key: AUTH_METHOD, written_by: "auth", meaning: "`jwt`, `jwt_authn` or `api_key`" },
    KeyDoc {
        key: CLAIM_PREFIX,
        written_by: "auth",
        meaning: "prefix: `sluice.claim.<name>` for each configured claim",
    },
    KeyDoc {
        key: REQUESTED_MODEL,
        written_by: "first body filter",
        meaning: "model the client asked for (or the route default)",
    },
    KeyDoc { key: UPSTREAM_MODEL, written_by: "model-failover", meaning: "model sent upstream on the last attempt" },
    KeyDoc {
        key: PROVIDER,
        written_by: "model-failover",
        meaning: "provider of the endpoint that served the last attempt",
    },
    KeyDoc { key: RESPONSE_MODEL, written_by: "usage-metrics", meaning: "model named in the provider's response" },
    KeyDoc { key: INPUT_TOKENS, written_by: "usage-metrics", meaning: "input (prompt) tokens" },
    KeyDoc { key: OUTPUT_TOKENS, written_by: "usage-metrics", meaning: "output (completion) tokens" },
    KeyDoc { key: TOTAL_TOKENS, written_by: "usage-metrics", meaning: "total tokens" },
    KeyDoc { key: USAGE_ESTIMATED, written_by: "usage-metrics", meaning: "`true` when the counts are an estimate" },
    KeyDoc { key: TTFT_MS, written_by: "usage-metrics", meaning: "time to first response byte, ms" },
    KeyDoc {
        key: RETRY_AFTER,
        written_by: "model-failover",
        meaning: "seconds the provider asked to wait after a 429",
    },
    KeyDoc { key: RATELIMIT, written_by: "token-ratelimit", meaning: "`ok` or the rule/window that refused" },
    KeyDoc { key: GUARD, written_by: "prompt-guard", meaning: "`allow`, `mask:<rule>` or `reject:<rule>`" },
];

/// The filter-state key for a copied claim.
pub fn claim_key(name: &str) -> String {
    format!("{CLAIM_PREFIX}{name}")
}

/// The access-log command that prints a key: `%FILTER_STATE(wasm.KEY:PLAIN)%`.
pub fn access_log_command(key: &str) -> String {
    format!("%FILTER_STATE(wasm.{key}:PLAIN)%")
}

/// Namespace of sluice's Envoy metadata: route metadata
/// (`metadata.filter_metadata.sluice.<key>`) carries per-route settings, since Envoy rejects
/// per-route wasm config; endpoint and cluster metadata carry per-provider settings.
pub const METADATA_NAMESPACE: &str = "sluice";

/// Property path of a route-metadata value: `xds.route_metadata.filter_metadata.sluice.<key>`.
pub fn route_metadata_path(key: &str) -> [&str; 5] {
    ["xds", "route_metadata", "filter_metadata", METADATA_NAMESPACE, key]
}

/// Property path of the picked endpoint's metadata value (upstream filters only).
pub fn host_metadata_path(key: &str) -> [&str; 5] {
    ["xds", "upstream_host_metadata", "filter_metadata", METADATA_NAMESPACE, key]
}

/// Property path of the cluster's metadata value.
pub fn cluster_metadata_path(key: &str) -> [&str; 5] {
    ["xds", "cluster_metadata", "filter_metadata", METADATA_NAMESPACE, key]
}

/// Read a route-metadata string through a host.
pub fn route_metadata<H: crate::host::Host + ?Sized>(host: &H, key: &str) -> Option<String> {
    host.property(&route_metadata_path(key)).map(|b| String::from_utf8_lossy(&b).into_owned()).filter(|s| !s.is_empty())
}

/// Read a filter-state string written by another sluice filter.
pub fn filter_state<H: crate::host::Host + ?Sized>(host: &H, key: &str) -> Option<String> {
    host.property(&[key]).map(|b| String::from_utf8_lossy(&b).into_owned()).filter(|s| !s.is_empty())
}

/// Write a filter-state string for other filters and access logs.
pub fn set_filter_state<H: crate::host::Host + ?Sized>(host: &mut H, key: &str, value: &str) {
    host.set_property(&[key], value.as_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_single_segments() {
        let mut seen = std::collections::HashSet::new();
        for k in ALL {
            assert!(k.key.starts_with("sluice."), "{}", k.key);
            assert!(!k.key.contains('/') && !k.key.contains(' '), "{}", k.key);
            assert!(seen.insert(k.key), "duplicate {}", k.key);
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(claim_key("org"), "sluice.claim.org");
        assert_eq!(access_log_command(USER), "%FILTER_STATE(wasm.sluice.user:PLAIN)%");
    }
}
