//! What a request is cached under: its key text (normalized), its model and its scope (route
//! + model + tenant). Pure functions; the stage feeds them the parsed body and the identity.
//!
//! - The **exact key** is SHA-256 over scope and normalized key text: two requests share an
//!   exact entry only when both are equal.
//! - The **scope hash** tags every semantic entry; a lookup filters on it, so a paraphrase is
//!   only ever matched within the same route, model and tenant.

use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_core::api::{self, Api};
use sluice_core::exchange::Identity;

/// Which text of the request is the cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyText {
    /// The last user message (default).
    LastUser,
    /// Every message but the system prompt.
    Conversation,
    /// Every message, system prompt included.
    ConversationWithSystem,
}

impl KeyText {
    /// Config names, in the order of the variants.
    pub const NAMES: &'static [&'static str] = &["last_user_message", "conversation", "conversation_with_system"];

    /// From a config name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "last_user_message" => Some(Self::LastUser),
            "conversation" => Some(Self::Conversation),
            "conversation_with_system" => Some(Self::ConversationWithSystem),
            _ => None,
        }
    }
}

/// Who may share entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Each authenticated user has their own entries (default).
    User,
    /// Each team.
    Team,
    /// Each API key.
    ApiKey,
    /// Everyone on the route.
    Global,
}

impl Scope {
    /// Config names.
    pub const NAMES: &'static [&'static str] = &["user", "team", "api_key", "global"];

    /// From a config name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Self::User),
            "team" => Some(Self::Team),
            "api_key" => Some(Self::ApiKey),
            "global" => Some(Self::Global),
            _ => None,
        }
    }

    /// The tenant part of the scope, or `None` when the caller has no such identity (such a
    /// request is not cached: it must never share an entry with anyone).
    pub fn tenant(self, id: Option<&Identity>) -> Option<String> {
        let pick = |v: Option<&String>, tag: &str| v.filter(|s| !s.is_empty()).map(|s| format!("{tag}:{s}"));
        match self {
            Self::Global => Some("global".to_string()),
            Self::User => pick(id.and_then(|i| i.user.as_ref()), "user"),
            Self::Team => pick(id.and_then(|i| i.team.as_ref()), "team"),
            Self::ApiKey => pick(id.and_then(|i| i.key_id.as_ref()), "key"),
        }
    }
}

/// The key text of a request, before normalization (`None`: nothing to key on).
pub fn key_text(mode: KeyText, api: Api, body: &Value) -> Option<String> {
    let t = match mode {
        KeyText::LastUser => api::last_user_text(api, body)?,
        KeyText::Conversation => api::conversation_text(api, body, false),
        KeyText::ConversationWithSystem => api::conversation_text(api, body, true),
    };
    Some(t).filter(|t| !t.trim().is_empty())
}

/// Normalized key text: surrounding whitespace removed, every run of whitespace one space.
/// Case and punctuation are kept (they can change the answer; the semantic tier matches
/// near-equal texts anyway).
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Lowercase hex of SHA-256 over `parts`, each length-prefixed (no two part lists collide).
pub fn hash_hex(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// Normalized key text (what the semantic tier embeds).
    pub text: String,
    /// The model (part of the scope).
    pub model: String,
    /// Hex hash of route + model + tenant: the semantic tier's filter.
    pub scope: String,
    /// Hex hash of scope + text: the exact tier's key and the stored item's id.
    pub exact: String,
}

impl CacheKey {
    /// The key of a request on `route` for `model` by `tenant` with key text `text`.
    pub fn new(route: &str, model: &str, tenant: &str, text: &str) -> Self {
        let text = normalize(text);
        let scope = hash_hex(&["sluice-cache-scope-v1", route, model, tenant]);
        let exact = hash_hex(&["sluice-cache-key-v1", &scope, &text]);
        Self { text, model: model.to_string(), scope, exact }
    }
}

/// Why a request is not cached (`sluice.cache` = `skip:<why>`, `sluice_reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not chat completions.
    Api,
    /// The route turned the cache off.
    Route,
    /// Body not a JSON object.
    Body,
    /// The request has tools or functions.
    Tools,
    /// `n > 1`.
    Choices,
    /// Non-zero (or unset) temperature with `skip_nonzero_temperature`.
    Temperature,
    /// Log-probabilities asked for (a replay cannot have them).
    Logprobs,
    /// No identity for the configured scope.
    NoIdentity,
    /// No key text.
    NoText,
    /// No model named.
    NoModel,
    /// `cache-control: no-cache` / `no-store` from the client.
    Client,
}

impl Skip {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Route => "route",
            Self::Body => "body",
            Self::Tools => "tools",
            Self::Choices => "n",
            Self::Temperature => "temperature",
            Self::Logprobs => "logprobs",
            Self::NoIdentity => "no_identity",
            Self::NoText => "no_text",
            Self::NoModel => "no_model",
            Self::Client => "client",
        }
    }
}

/// The request-shape rules: `Some(why)` when a request must not be answered from the cache.
pub fn skip_reason(body: &Value, skip_nonzero_temperature: bool) -> Option<Skip> {
    if api::has_tools(body) {
        return Some(Skip::Tools);
    }
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Some(Skip::Choices);
    }
    if api::wants_logprobs(body) {
        return Some(Skip::Logprobs);
    }
    if skip_nonzero_temperature {
        // Unset means the provider's default (1.0 for OpenAI): not deterministic either.
        let t = body.get("temperature").and_then(Value::as_f64);
        if t.is_none_or(|t| t != 0.0) {
            return Some(Skip::Temperature);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalization_collapses_whitespace_only() {
        assert_eq!(normalize("  What is\n\tthe  capital? "), "What is the capital?");
        assert_eq!(normalize("A b"), "A b");
        assert_ne!(normalize("a"), normalize("A"), "case is kept");
        assert_eq!(normalize(" \n "), "");
    }

    #[test]
    fn key_texts() {
        let body = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}]});
        assert_eq!(key_text(KeyText::LastUser, Api::Chat, &body).as_deref(), Some("second"));
        let conv = key_text(KeyText::Conversation, Api::Chat, &body).unwrap();
        assert!(conv.contains("first") && conv.contains("second") && !conv.contains("Be brief"), "{conv}");
        let with = key_text(KeyText::ConversationWithSystem, Api::Chat, &body).unwrap();
        assert!(with.contains("Be brief"), "{with}");
        assert_eq!(
            key_text(KeyText::LastUser, Api::Chat, &json!({"messages": [{"role": "user", "content": "  "}]})),
            None
        );
        assert_eq!(key_text(KeyText::LastUser, Api::Chat, &json!({"messages": []})), None);
        assert_eq!(KeyText::from_name("conversation"), Some(KeyText::Conversation));
        assert_eq!(KeyText::NAMES.len(), 3);
    }

    #[test]
    fn scopes_never_share_across_tenants() {
        let alice = Identity {
            method: "jwt".into(),
            user: Some("alice".into()),
            team: Some("dev".into()),
            ..Identity::default()
        };
        let bob = Identity {
            method: "jwt".into(),
            user: Some("bob".into()),
            team: Some("dev".into()),
            ..Identity::default()
        };
        assert_eq!(Scope::User.tenant(Some(&alice)).as_deref(), Some("user:alice"));
        assert_eq!(Scope::Team.tenant(Some(&bob)).as_deref(), Some("team:dev"));
        assert_eq!(Scope::User.tenant(None), None, "no identity under a user scope: not cached");
        assert_eq!(Scope::ApiKey.tenant(Some(&alice)), None, "a JWT caller has no key id");
        assert_eq!(Scope::Global.tenant(None).as_deref(), Some("global"));
        let empty = Identity { method: "jwt".into(), user: Some(String::new()), ..Identity::default() };
        assert_eq!(Scope::User.tenant(Some(&empty)), None);

        let a = CacheKey::new("chat", "gpt-4o", "user:alice", "What is  the capital of France?");
        let b = CacheKey::new("chat", "gpt-4o", "user:bob", "What is the capital of France?");
        assert_ne!(a.scope, b.scope);
        assert_ne!(a.exact, b.exact);
        assert_eq!(a.text, b.text);
        let again = CacheKey::new("chat", "gpt-4o", "user:alice", "What is the capital of France?\n");
        assert_eq!(a, again, "normalized text, same key");
        assert_ne!(
            a.scope,
            CacheKey::new("chat", "gpt-4o-mini", "user:alice", "x").scope,
            "model is part of the scope"
        );
        assert_ne!(a.scope, CacheKey::new("other", "gpt-4o", "user:alice", "x").scope, "route is part of the scope");
        assert_eq!(a.exact.len(), 64);
        // Length prefixes: moving a boundary changes the hash.
        assert_ne!(hash_hex(&["ab", "c"]), hash_hex(&["a", "bc"]));
    }

    #[test]
    fn request_shapes_that_are_skipped() {
        let base = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(skip_reason(&base, false), None);
        let mut tools = base.clone();
        tools["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
        assert_eq!(skip_reason(&tools, false), Some(Skip::Tools));
        let mut n = base.clone();
        n["n"] = json!(2);
        assert_eq!(skip_reason(&n, false), Some(Skip::Choices));
        n["n"] = json!(1);
        assert_eq!(skip_reason(&n, false), None);
        let mut lp = base.clone();
        lp["logprobs"] = json!(true);
        assert_eq!(skip_reason(&lp, false), Some(Skip::Logprobs));
        assert_eq!(skip_reason(&base, true), Some(Skip::Temperature), "unset is the provider default, not 0");
        let mut t = base.clone();
        t["temperature"] = json!(0);
        assert_eq!(skip_reason(&t, true), None);
        t["temperature"] = json!(0.7);
        assert_eq!(skip_reason(&t, true), Some(Skip::Temperature));
        assert_eq!(skip_reason(&t, false), None);
    }
}
