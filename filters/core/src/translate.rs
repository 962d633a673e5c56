//! Cross-API translation: an OpenAI chat-completions request sent to a provider that speaks
//! another API, and that provider's answer back, so the client sees OpenAI format throughout
//! (used per attempt by model-failover's upstream role when a failover chain crosses APIs).
//!
//! Table-driven: [`TRANSLATORS`] holds one [`Translator`] per provider dialect, each a set of
//! plain functions (request body, JSON answer, error body, stream state). Anthropic Messages
//! is the first row; Gemini or Bedrock Converse would be one more row and one more module.
//! Pure Rust over `serde_json::Value`, next to [`crate::api`] (the one place that knows the
//! wire formats).

use serde_json::Value;

pub mod anthropic;

/// The API a provider endpoint speaks (endpoint metadata / profile field `api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dialect {
    /// OpenAI-compatible (or whatever the client sent): no translation.
    #[default]
    OpenAi,
    /// Anthropic Messages (`POST /v1/messages`).
    Anthropic,
}

impl Dialect {
    /// The accepted config and metadata values.
    pub const NAMES: &'static [&'static str] = &["openai", "anthropic"];

    /// Parse a config or metadata value.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "openai" => Some(Self::OpenAi),
            "anthropic" => Some(Self::Anthropic),
            _ => None,
        }
    }

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
        }
    }
}

/// What the request translation needs besides the body.
#[derive(Debug, Clone, Default)]
pub struct RequestOptions {
    /// `max_tokens` to send when the client set no output cap (the provider requires one).
    pub default_max_tokens: u64,
}

/// A request the provider's API cannot express (answered 400 to the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untranslatable(pub String);

/// What the answer translation needs: the parts of the client's request that shape it.
#[derive(Debug, Clone, Default)]
pub struct ResponseContext {
    /// `created` of the chat completion (Unix seconds).
    pub created: u64,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The model the attempt sent, when the answer names none.
    pub model: String,
}

impl ResponseContext {
    /// The context of one attempt: `body` is the client's (OpenAI chat) request.
    pub fn of(body: &Value, created: u64) -> Self {
        Self {
            created,
            include_usage: crate::api::asked_include_usage(body),
            model: crate::api::model(body).unwrap_or_default().to_string(),
        }
    }
}

/// One translated SSE event.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamOut {
    /// `data: <json>`.
    Data(Value),
    /// `data: [DONE]`.
    Done,
}

/// Per-stream translation state.
pub trait StreamTranslate {
    /// Translate one provider event (parsed JSON `data`; `name` the SSE `event:` field).
    fn event(&mut self, name: Option<&str>, data: &Value) -> Vec<StreamOut>;
    /// The provider's stream ended; emit what a client still needs (e.g. `[DONE]` when the
    /// provider's stream was cut).
    fn finish(&mut self) -> Vec<StreamOut>;
}

/// One row of the table: how to speak one provider API to an OpenAI chat client.
pub struct Translator {
    /// The provider's API.
    pub dialect: Dialect,
    /// The request path to use when the endpoint configures none.
    pub path: &'static str,
    /// Headers every request needs (set unless the endpoint's profile sets them).
    pub headers: &'static [(&'static str, &'static str)],
    /// The header the provider's key goes in, and its prefix (profile defaults).
    pub credential: (&'static str, &'static str),
    /// Chat request → provider request.
    pub request: fn(&Value, &RequestOptions) -> Result<Value, Untranslatable>,
    /// Provider answer (2xx JSON) → `chat.completion`.
    pub response: fn(&Value, &ResponseContext) -> Value,
    /// Provider error body → OpenAI error body (`None`: not this API's error shape).
    pub error: fn(&Value) -> Option<Value>,
    /// A fresh stream translator.
    pub stream: fn(ResponseContext) -> Box<dyn StreamTranslate>,
}

impl Translator {
    /// The [`crate::api::Api`] of the translated request (what the provider answers in).
    pub fn dialect_api(&self) -> crate::api::Api {
        match self.dialect {
            Dialect::Anthropic => crate::api::Api::Messages,
            Dialect::OpenAi => crate::api::Api::Chat,
        }
    }
}

/// Every provider dialect sluice can translate OpenAI chat to.
pub const TRANSLATORS: &[Translator] = &[anthropic::TRANSLATOR];

/// The translator for a chat request sent to a provider speaking `to` (`None`: same API, or
/// no translation known).
pub fn translator(from: crate::api::Api, to: Dialect) -> Option<&'static Translator> {
    if from != crate::api::Api::Chat {
        return None;
    }
    TRANSLATORS.iter().find(|t| t.dialect == to)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::api::Api;

    #[test]
    fn the_table_has_a_row_per_dialect_but_openai() {
        assert_eq!(Dialect::parse("anthropic"), Some(Dialect::Anthropic));
        assert_eq!(Dialect::parse("gemini"), None);
        assert_eq!(translator(Api::Chat, Dialect::Anthropic).map(|t| t.path), Some("/v1/messages"));
        assert!(translator(Api::Chat, Dialect::OpenAi).is_none());
        assert!(translator(Api::Messages, Dialect::Anthropic).is_none());
        for d in Dialect::NAMES {
            assert_eq!(Dialect::parse(d).map(Dialect::name), Some(*d));
        }
    }
}
