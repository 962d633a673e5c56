//! The filter-state contract: the keys sluice filters use to hand per-request facts to each
//! other and to access logs.
//!
//! A filter writes with `set_property(vec![KEY], value)`; another filter reads it with
//! `get_property(vec![KEY])`; an access log prints it with `%FILTER_STATE(wasm.KEY:PLAIN)%`.
//! Keys are single path segments (dots inside one segment are fine). Clients cannot set
//! filter state, so a value here is as trustworthy as the filter that wrote it.
//! Values are UTF-8 strings; numbers are written in decimal.

/// The caller in one compact value (JSON `{"m":method,"u":user,"t":team,"k":key_id}`) so a
/// separate filter reads identity in one host call. Written by auth.
pub const IDENTITY: &str = "sluice.identity";
/// Stable id of the caller's API key: the first 32 hex digits of its SHA-256 (never the
/// key). Written by auth.
pub const KEY_ID: &str = "sluice.key_id";
/// The provider's usage as one normalized record (`TokenUsage::encode`), written by the
/// first filter that saw it, so every filter agrees on one number.
pub const USAGE: &str = "sluice.usage";
/// Input tokens served from the provider's prompt cache. Written by usage-metrics.
pub const CACHED_INPUT_TOKENS: &str = "sluice.cached_input_tokens";
/// Reasoning tokens. Written by usage-metrics.
pub const REASONING_TOKENS: &str = "sluice.reasoning_tokens";
/// Milliseconds per output token after the first (streams). Written by usage-metrics.
pub const TPOT_MS: &str = "sluice.tpot_ms";
/// `gen_ai.operation.name`. Written by usage-metrics.
pub const OPERATION: &str = "sluice.operation";
/// Cost of the request in micro-units of the price table's currency. Written by usage-metrics.
pub const COST: &str = "sluice.cost";
/// Semantic-cache outcome: `hit_exact`, `hit_semantic:<distance>`, `miss`, `skip:<why>`,
/// `error:<why>`. Written by semantic-cache.
pub const CACHE: &str = "sluice.cache";
/// RAG outcome: `added:<n>`, `none`, `error:<why>`. Written by rag.
pub const RAG: &str = "sluice.rag";
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
/// `1` once model-failover's downstream role removed the client's copies of Envoy/sluice
/// internal request headers (`x-envoy-attempt-count`, ...); the upstream role trusts the
/// attempt number only when it is set. Written by model-failover (downstream role).
pub const FAILOVER_DOWNSTREAM: &str = "sluice.failover_downstream";
/// Rate-limit verdict: the rule and window that refused, or `ok`. Written by token-ratelimit.
pub const RATELIMIT: &str = "sluice.ratelimit";
/// Prompt-guard verdict: `allow`, `mask:<rule>` or `reject:<rule>` (prefixed `shadow_` in shadow
/// mode; `;response_mask:<rule>` appended when an answer was masked). Written by prompt-guard.
pub const GUARD: &str = "sluice.guard";

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
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(claim_key("org"), "sluice.claim.org");
        assert_eq!(access_log_command(USER), "%FILTER_STATE(wasm.sluice.user:PLAIN)%");
    }
}
