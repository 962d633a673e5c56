//! Run-time settings: command-line flags and JSON updates from the control
//! API share one table of snake_case keys (`--rate-429` is `rate_429`).

use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;
use serde_json::Value;

use crate::provider::Failure;

pub const USAGE: &str = "\
usage: sluice-mock-provider [--host 127.0.0.1] [--port N] [--name NAME] [--model M]
         [--models a,b,c] [--log FILE] [--response-text TEXT] [--stream-chunks N]
         [--completion-tokens N] [--prompt-tokens N]
         [--rate-429 PCT] [--retry-after VALUE] [--retry-after-ms N] [--ratelimit-reset VALUE]
         [--rate-503 PCT] [--rate-reset PCT] [--rate-malformed PCT] [--rate-truncate PCT]
         [--first-byte-delay-ms N] [--chunk-delay-ms N]
         [--split-writes] [--no-usage] [--malformed-usage]
         [--completion-words N] [--embedding-dim N] [--context-window N]
         [--rate-stall PCT] [--stall-timeout-ms N] [--cached-tokens N] [--reasoning-tokens N]
         [--response-trailers] [--require-api-key]
Flags take `--flag VALUE` or `--flag=VALUE`; boolean flags also accept `=true|false`.
Prints `LISTENING <addr>:<port>` on stdout once bound. See README.md.";

/// Everything that can change at run time (`GET/POST /__mock/config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settings {
    pub name: String,
    pub model: String,
    /// `None`: `[model]`.
    pub models: Option<Vec<String>>,
    pub log: Option<String>,
    /// `None`: `"Hello from <name>."`.
    pub response_text: Option<String>,
    pub stream_chunks: usize,
    pub completion_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
    pub rate_429: u32,
    pub retry_after: String,
    pub retry_after_ms: Option<u64>,
    pub ratelimit_reset: Option<String>,
    pub rate_503: u32,
    pub rate_reset: u32,
    pub rate_malformed: u32,
    pub rate_truncate: u32,
    pub first_byte_delay_ms: u64,
    pub chunk_delay_ms: u64,
    pub split_writes: bool,
    pub no_usage: bool,
    pub malformed_usage: bool,
    /// `Some(n)`: the text is `w1 w2 … wN`.
    pub completion_words: Option<u64>,
    pub embedding_dim: usize,
    /// `None`: unlimited.
    pub context_window: Option<u64>,
    pub rate_stall: u32,
    pub stall_timeout_ms: u64,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub response_trailers: bool,
    /// `/messages` and count_tokens answer 401 without an `x-api-key` header.
    pub require_api_key: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: "mock".into(),
            model: "mock-model".into(),
            models: None,
            log: None,
            response_text: None,
            stream_chunks: 4,
            completion_tokens: None,
            prompt_tokens: None,
            rate_429: 0,
            retry_after: "1".into(),
            retry_after_ms: None,
            ratelimit_reset: None,
            rate_503: 0,
            rate_reset: 0,
            rate_malformed: 0,
            rate_truncate: 0,
            first_byte_delay_ms: 0,
            chunk_delay_ms: 0,
            split_writes: false,
            no_usage: false,
            malformed_usage: false,
            completion_words: None,
            embedding_dim: 256,
            context_window: None,
            rate_stall: 0,
            stall_timeout_ms: 120_000,
            cached_tokens: None,
            reasoning_tokens: None,
            response_trailers: false,
            require_api_key: false,
        }
    }
}

/// Every settable key (the `--flag-name` with `-` replaced by `_`).
pub const KEYS: [&str; 30] = [
    "name",
    "model",
    "models",
    "log",
    "response_text",
    "stream_chunks",
    "completion_tokens",
    "prompt_tokens",
    "rate_429",
    "retry_after",
    "retry_after_ms",
    "ratelimit_reset",
    "rate_503",
    "rate_reset",
    "rate_malformed",
    "rate_truncate",
    "first_byte_delay_ms",
    "chunk_delay_ms",
    "split_writes",
    "no_usage",
    "malformed_usage",
    "completion_words",
    "embedding_dim",
    "context_window",
    "rate_stall",
    "stall_timeout_ms",
    "cached_tokens",
    "reasoning_tokens",
    "response_trailers",
    "require_api_key",
];

/// Keys that are booleans (flags without a value on the command line).
const BOOL_KEYS: [&str; 5] = ["split_writes", "no_usage", "malformed_usage", "response_trailers", "require_api_key"];

/// A setting value, from the command line or from JSON.
#[derive(Clone, Copy)]
enum Raw<'a> {
    Cli(&'a str),
    Json(&'a Value),
}

impl Raw<'_> {
    fn string(self) -> Result<String, String> {
        match self {
            Raw::Cli(s) => Ok(s.to_string()),
            Raw::Json(Value::String(s)) => Ok(s.clone()),
            Raw::Json(_) => Err("expected a string".into()),
        }
    }

    fn opt_string(self) -> Result<Option<String>, String> {
        match self {
            Raw::Json(Value::Null) => Ok(None),
            other => other.string().map(Some),
        }
    }

    fn uint(self) -> Result<u64, String> {
        match self {
            Raw::Cli(s) => s.trim().parse().map_err(|_| format!("expected a non-negative integer, got `{s}`")),
            Raw::Json(v) => v.as_u64().ok_or_else(|| format!("expected a non-negative integer, got {v}")),
        }
    }

    fn opt_uint(self) -> Result<Option<u64>, String> {
        match self {
            Raw::Json(Value::Null) => Ok(None),
            other => other.uint().map(Some),
        }
    }

    fn usize(self) -> Result<usize, String> {
        usize::try_from(self.uint()?).map_err(|_| "value too large".to_string())
    }

    fn pct(self) -> Result<u32, String> {
        match self.uint()? {
            n @ 0..=100 => u32::try_from(n).map_err(|_| "value too large".to_string()),
            n => Err(format!("expected a percentage 0..=100, got {n}")),
        }
    }

    fn flag(self) -> Result<bool, String> {
        match self {
            Raw::Cli(s) => match s.trim().to_ascii_lowercase().as_str() {
                "" | "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(format!("expected true or false, got `{s}`")),
            },
            Raw::Json(Value::Bool(b)) => Ok(*b),
            Raw::Json(v) => Err(format!("expected true or false, got {v}")),
        }
    }

    fn list(self) -> Result<Option<Vec<String>>, String> {
        let from_csv =
            |s: &str| Some(s.split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::to_string).collect());
        match self {
            Raw::Cli(s) => Ok(from_csv(s)),
            Raw::Json(Value::Null) => Ok(None),
            Raw::Json(Value::String(s)) => Ok(from_csv(s)),
            Raw::Json(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| "expected an array of strings".to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Raw::Json(_) => Err("expected an array of strings or a comma-separated string".into()),
        }
    }
}

impl Settings {
    /// The assistant text: `response_text` or `"Hello from <name>."`.
    pub fn text(&self) -> String {
        self.response_text.clone().unwrap_or_else(|| format!("Hello from {}.", self.name))
    }

    /// The list served by `/v1/models`: `models` or `[model]`.
    pub fn model_list(&self) -> Vec<String> {
        self.models.clone().unwrap_or_else(|| vec![self.model.clone()])
    }

    /// The assistant text without a per-request override:
    /// `w1 w2 … wN` with `completion_words`, else [`Settings::text`].
    pub fn default_text(&self) -> String {
        self.completion_words.map_or_else(|| self.text(), crate::provider::words_text)
    }

    /// Failure rates in [`Failure::CHECK_ORDER`].
    pub fn rates(&self) -> [u32; 6] {
        Failure::CHECK_ORDER.map(|f| match f {
            Failure::Reset => self.rate_reset,
            Failure::Unavailable => self.rate_503,
            Failure::RateLimited => self.rate_429,
            Failure::Malformed => self.rate_malformed,
            Failure::Truncate => self.rate_truncate,
            Failure::Stall => self.rate_stall,
            Failure::StallMidStream | Failure::ContextLength => 0,
        })
    }

    /// Sets one key; the error says what was wrong with the value.
    fn set(&mut self, key: &str, value: Raw<'_>) -> Result<(), String> {
        match key {
            "name" => self.name = value.string()?,
            "model" => self.model = value.string()?,
            "models" => self.models = value.list()?,
            "log" => self.log = value.opt_string()?.filter(|s| !s.is_empty()),
            "response_text" => self.response_text = value.opt_string()?,
            "stream_chunks" => self.stream_chunks = value.usize()?,
            "completion_tokens" => self.completion_tokens = value.opt_uint()?,
            "prompt_tokens" => self.prompt_tokens = value.opt_uint()?,
            "rate_429" => self.rate_429 = value.pct()?,
            "retry_after" => self.retry_after = value.string()?,
            "retry_after_ms" => self.retry_after_ms = value.opt_uint()?,
            "ratelimit_reset" => self.ratelimit_reset = value.opt_string()?,
            "rate_503" => self.rate_503 = value.pct()?,
            "rate_reset" => self.rate_reset = value.pct()?,
            "rate_malformed" => self.rate_malformed = value.pct()?,
            "rate_truncate" => self.rate_truncate = value.pct()?,
            "first_byte_delay_ms" => self.first_byte_delay_ms = value.uint()?,
            "chunk_delay_ms" => self.chunk_delay_ms = value.uint()?,
            "split_writes" => self.split_writes = value.flag()?,
            "no_usage" => self.no_usage = value.flag()?,
            "malformed_usage" => self.malformed_usage = value.flag()?,
            "completion_words" => self.completion_words = value.opt_uint()?,
            "embedding_dim" => {
                self.embedding_dim = match value.usize()? {
                    d @ 1..=crate::embeddings::MAX_DIM => d,
                    d => return Err(format!("expected 1..={}, got {d}", crate::embeddings::MAX_DIM)),
                }
            }
            "context_window" => self.context_window = value.opt_uint()?,
            "rate_stall" => self.rate_stall = value.pct()?,
            "stall_timeout_ms" => self.stall_timeout_ms = value.uint()?,
            "cached_tokens" => self.cached_tokens = value.opt_uint()?,
            "reasoning_tokens" => self.reasoning_tokens = value.opt_uint()?,
            "response_trailers" => self.response_trailers = value.flag()?,
            "require_api_key" => self.require_api_key = value.flag()?,
            _ => return Err(format!("unknown setting `{key}`")),
        }
        Ok(())
    }

    /// Applies a partial JSON object (`POST /__mock/config`). All-or-nothing:
    /// on error nothing changes. Keys may be snake_case or kebab-case.
    /// Returns the keys that were set (normalised to snake_case).
    pub fn apply_json(&mut self, update: &Value) -> Result<Vec<String>, String> {
        let Some(object) = update.as_object() else {
            return Err("config update must be a JSON object".into());
        };
        let mut next = self.clone();
        let mut keys = Vec::new();
        for (raw_key, value) in object {
            let key = raw_key.replace('-', "_");
            if key == "host" || key == "port" {
                return Err(format!("`{raw_key}` cannot be changed at run time"));
            }
            if !KEYS.contains(&key.as_str()) {
                return Err(format!("unknown setting `{raw_key}`"));
            }
            next.set(&key, Raw::Json(value)).map_err(|e| format!("invalid value for `{raw_key}`: {e}"))?;
            keys.push(key);
        }
        *self = next;
        Ok(keys)
    }
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    pub host: IpAddr,
    pub port: u16,
    pub settings: Settings,
}

/// Why the command line was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgsError {
    /// `--help`: print usage, exit 0.
    Help,
    /// Print the message and usage, exit 2.
    Invalid(String),
}

fn parse_host(value: &str) -> Result<IpAddr, String> {
    let ip = if value.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        value
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| format!("invalid value for `--host`: `{value}` is not an IP address"))?
    };
    if ip.is_loopback() {
        Ok(ip)
    } else {
        Err(format!("refusing `--host {value}`: only loopback addresses are allowed"))
    }
}

/// Parses the arguments after the program name.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Cli, ArgsError> {
    let mut cli = Cli { host: IpAddr::V4(Ipv4Addr::LOCALHOST), port: 0, settings: Settings::default() };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Err(ArgsError::Help);
        }
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(ArgsError::Invalid(format!("unexpected argument `{arg}`")));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        let key = name.replace('-', "_");
        if key != "host" && key != "port" && !KEYS.contains(&key.as_str()) {
            return Err(ArgsError::Invalid(format!("unknown flag `--{name}`")));
        }
        let value = match inline {
            Some(v) => v,
            None if BOOL_KEYS.contains(&key.as_str()) => "true".to_string(),
            None => args.next().ok_or_else(|| ArgsError::Invalid(format!("flag `--{name}` needs a value")))?,
        };
        let result = match key.as_str() {
            "host" => parse_host(&value).map(|ip| cli.host = ip),
            "port" => {
                value.parse::<u16>().map(|p| cli.port = p).map_err(|_| format!("invalid value for `--port`: `{value}`"))
            }
            _ => cli.settings.set(&key, Raw::Cli(&value)).map_err(|e| format!("invalid value for `--{name}`: {e}")),
        };
        result.map_err(ArgsError::Invalid)?;
    }
    Ok(cli)
}

#[cfg(test)]
mod tests {

    use serde_json::json;

    use super::*;

    fn args(list: &[&str]) -> Result<Cli, ArgsError> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    fn invalid(list: &[&str]) -> String {
        match args(list) {
            Err(ArgsError::Invalid(msg)) => msg,
            other => panic!("{list:?}: expected an error, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let cli = args(&[]).unwrap();
        assert_eq!(cli.host, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(cli.port, 0);
        let s = cli.settings;
        assert_eq!(s.text(), "Hello from mock.");
        assert_eq!(s.model_list(), vec!["mock-model"]);
        assert_eq!(s.retry_after, "1");
        assert_eq!(s.stream_chunks, 4);
        assert_eq!(s.rates(), [0; 6]);
        assert_eq!(s.embedding_dim, 256);
        assert_eq!(s.stall_timeout_ms, 120_000);
        assert_eq!(
            (s.completion_words, s.context_window, s.cached_tokens, s.reasoning_tokens),
            (None, None, None, None)
        );
        assert!(!s.response_trailers);
        assert_eq!(s.default_text(), "Hello from mock.");
    }

    #[test]
    fn every_flag() {
        let cli = args(&[
            "--host",
            "::1",
            "--port=8080",
            "--name",
            "a",
            "--model",
            "m",
            "--models",
            "x, y,,z",
            "--log",
            "/tmp/l.jsonl",
            "--response-text",
            "hi there",
            "--stream-chunks",
            "2",
            "--completion-tokens",
            "7",
            "--prompt-tokens=9",
            "--rate-429",
            "50",
            "--retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "--retry-after-ms",
            "1500",
            "--ratelimit-reset",
            "6m0s",
            "--rate-503",
            "1",
            "--rate-reset",
            "2",
            "--rate-malformed",
            "3",
            "--rate-truncate",
            "4",
            "--first-byte-delay-ms",
            "10",
            "--chunk-delay-ms",
            "5",
            "--split-writes",
            "--no-usage",
            "--malformed-usage=true",
            "--completion-words",
            "3",
            "--embedding-dim=64",
            "--context-window",
            "4096",
            "--rate-stall",
            "5",
            "--stall-timeout-ms",
            "250",
            "--cached-tokens",
            "11",
            "--reasoning-tokens",
            "12",
            "--response-trailers",
        ])
        .unwrap();
        assert_eq!(cli.host.to_string(), "::1");
        assert_eq!(cli.port, 8080);
        let s = cli.settings;
        assert_eq!(s.name, "a");
        assert_eq!(s.model_list(), vec!["x", "y", "z"]);
        assert_eq!(s.log.as_deref(), Some("/tmp/l.jsonl"));
        assert_eq!(s.text(), "hi there");
        assert_eq!(s.stream_chunks, 2);
        assert_eq!((s.completion_tokens, s.prompt_tokens), (Some(7), Some(9)));
        assert_eq!(s.retry_after, "Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(s.retry_after_ms, Some(1500));
        assert_eq!(s.ratelimit_reset.as_deref(), Some("6m0s"));
        // CHECK_ORDER: reset, 503, 429, malformed, truncate, stall
        assert_eq!(s.rates(), [2, 1, 50, 3, 4, 5]);
        assert_eq!(s.default_text(), "w1 w2 w3");
        assert_eq!(s.embedding_dim, 64);
        assert_eq!(s.context_window, Some(4096));
        assert_eq!(s.stall_timeout_ms, 250);
        assert_eq!((s.cached_tokens, s.reasoning_tokens), (Some(11), Some(12)));
        assert!(s.response_trailers);
        assert_eq!((s.first_byte_delay_ms, s.chunk_delay_ms), (10, 5));
        assert!(s.split_writes && s.no_usage && s.malformed_usage);
    }

    #[test]
    fn bad_command_lines() {
        assert!(invalid(&["--bogus"]).contains("`--bogus`"));
        assert!(invalid(&["--bogus-flag=1"]).contains("`--bogus-flag`"));
        assert!(invalid(&["stray"]).contains("`stray`"));
        assert!(invalid(&["--port"]).contains("needs a value"));
        assert!(invalid(&["--port", "99999"]).contains("--port"));
        assert!(invalid(&["--rate-429", "101"]).contains("--rate-429"));
        assert!(invalid(&["--rate-503", "x"]).contains("--rate-503"));
        assert!(invalid(&["--split-writes=maybe"]).contains("--split-writes"));
        assert!(invalid(&["--embedding-dim", "0"]).contains("--embedding-dim"));
        assert!(invalid(&["--rate-stall", "101"]).contains("--rate-stall"));
        assert!(invalid(&["--context-window", "-1"]).contains("--context-window"));
        assert!(invalid(&["--host", "0.0.0.0"]).contains("loopback"));
        assert!(invalid(&["--host", "10.1.2.3"]).contains("loopback"));
        assert!(invalid(&["--host", "example.com"]).contains("--host"));
        assert_eq!(args(&["--help"]), Err(ArgsError::Help));
        assert_eq!(args(&["--host", "localhost"]).unwrap().host.to_string(), "127.0.0.1");
        assert!(args(&["--host", "127.0.0.2"]).is_ok());
    }

    #[test]
    fn json_updates() {
        let mut s = Settings::default();
        let keys = s
            .apply_json(&json!({
                "rate_429": 100, "retry-after": "30", "response_text": "changed",
                "split_writes": true, "completion_tokens": 12, "models": ["a", "b"]
            }))
            .unwrap();
        assert_eq!(
            keys,
            vec!["rate_429", "retry_after", "response_text", "split_writes", "completion_tokens", "models"]
        );
        assert_eq!(s.rate_429, 100);
        assert_eq!(s.retry_after, "30");
        assert_eq!(s.text(), "changed");
        assert!(s.split_writes);
        assert_eq!(s.completion_tokens, Some(12));
        assert_eq!(s.model_list(), vec!["a", "b"]);
        s.apply_json(&json!({"response_text": null, "completion_tokens": null, "models": "c,d"})).unwrap();
        assert_eq!(s.text(), "Hello from mock.");
        assert_eq!(s.completion_tokens, None);
        assert_eq!(s.model_list(), vec!["c", "d"]);
        s.apply_json(
            &json!({"context-window": 8, "cached_tokens": 2, "response_trailers": true, "completion_words": 2}),
        )
        .unwrap();
        assert_eq!((s.context_window, s.cached_tokens, s.response_trailers), (Some(8), Some(2), true));
        assert_eq!(s.default_text(), "w1 w2");
        s.apply_json(&json!({"context_window": null, "cached_tokens": null, "completion_words": null})).unwrap();
        assert_eq!((s.context_window, s.cached_tokens, s.completion_words), (None, None, None));
        assert!(s.apply_json(&json!({"embedding_dim": 0})).is_err());
    }

    #[test]
    fn json_update_errors_change_nothing() {
        let mut s = Settings::default();
        let before = s.clone();
        let err = s.apply_json(&json!({"rate_429": 50, "bogus": 1})).unwrap_err();
        assert!(err.contains("`bogus`"), "{err}");
        assert_eq!(s, before);
        let err = s.apply_json(&json!({"rate_503": 150})).unwrap_err();
        assert!(err.contains("`rate_503`"), "{err}");
        assert!(s.apply_json(&json!({"split_writes": "yes"})).is_err());
        assert!(s.apply_json(&json!({"name": null})).is_err());
        assert!(s.apply_json(&json!({"port": 1})).unwrap_err().contains("run time"));
        assert!(s.apply_json(&json!([1])).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn keys_table_matches_settings() {
        let dumped = serde_json::to_value(Settings::default()).unwrap();
        let fields: Vec<&str> = dumped.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(fields, KEYS);
    }

    #[test]
    fn config_json_round_trips() {
        let s = Settings { rate_429: 20, response_text: Some("x".into()), ..Settings::default() };
        let dumped = serde_json::to_value(&s).unwrap();
        assert_eq!(dumped["rate_429"], 20);
        let mut other = Settings::default();
        other.apply_json(&dumped).unwrap();
        assert_eq!(other, s);
    }
}
