//! The check itself (native only). `sluice-config-check <filter> <file.json|->`: validate a filter's JSON configuration
//! offline with the filter's own loader, the same code its `on_configure` runs in Envoy.
//!
//! Exit 0 and print `<filter>: config OK`, or print `<filter>: invalid config: <field>: <why>`
//! (the message Envoy would log) and exit 1. Usage errors exit 2.
//!
//! `--env NAME=VALUE` (repeatable) supplies a VM environment variable the loader reads at
//! configure time (auth's `hmac_secret_env`); unset names fall back to this process's
//! environment, as `vm_config.environment_variables.host_env_keys` would.

use sluice_core::config::ConfigError;
use sluice_core::stage::Assemble;
use std::collections::BTreeMap;
use std::io::Read;
use std::process::ExitCode;

/// Filter names (the `filters/<name>` directory) and the function each `.wasm` runs in
/// `on_configure` (every filter reads its config through the one core reader).
const LOADERS: &[(&str, Assemble)] = &[
    ("auth", sluice_auth::assemble),
    ("token-ratelimit", sluice_token_ratelimit::assemble),
    ("prompt-guard", sluice_prompt_guard::assemble),
    ("prompt-enrichment", sluice_prompt_enrichment::assemble),
    ("model-failover", sluice_model_failover::assemble),
    ("usage-metrics", sluice_usage_metrics::assemble),
    ("semantic-cache", sluice_semantic_cache::assemble),
    ("rag", sluice_rag::assemble),
    ("gateway", sluice_gateway::assemble),
];

const FILTERS: &[&str] = &[
    "auth",
    "token-ratelimit",
    "prompt-guard",
    "prompt-enrichment",
    "model-failover",
    "usage-metrics",
    "semantic-cache",
    "rag",
    "gateway",
];

const USAGE: &str = "usage: sluice-config-check [--env NAME=VALUE]... <filter> <file.json|->\n\
filters: auth, token-ratelimit, prompt-guard, prompt-enrichment, model-failover, usage-metrics,\n\
semantic-cache, rag, gateway (the composed filter: {\"stages\": [...]})\n\
(also accepted: the crate or .wasm name, e.g. sluice-auth, sluice_auth, sluice_auth.wasm)";

/// The filter's own loader over `bytes`; `env` resolves configure-time environment variables.
fn check(filter: &str, bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    match LOADERS.iter().find(|(n, _)| *n == filter) {
        Some((_, assemble)) => assemble(bytes, env).map(drop),
        None => Err(ConfigError::new(".", format!("unknown filter {filter}"))),
    }
}

/// `auth`, `sluice-auth`, `sluice_auth`, `sluice_auth.wasm`, a path to it → `auth`.
fn canonical(name: &str) -> Option<&'static str> {
    let base = name.rsplit('/').next().unwrap_or(name);
    let base = base.strip_suffix(".wasm").unwrap_or(base);
    let base = base.strip_prefix("sluice-").or_else(|| base.strip_prefix("sluice_")).unwrap_or(base);
    let base = base.replace('_', "-");
    FILTERS.iter().copied().find(|f| *f == base)
}

fn read_input(path: &str) -> Result<Vec<u8>, String> {
    if path == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map_err(|e| format!("reading stdin: {e}"))?;
        Ok(buf)
    } else {
        std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))
    }
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let mut env_overrides = BTreeMap::new();
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            "--env" => {
                let kv = it.next().ok_or("--env needs NAME=VALUE")?;
                let (k, v) = kv.split_once('=').ok_or("--env needs NAME=VALUE")?;
                env_overrides.insert(k.to_string(), v.to_string());
            }
            _ => positional.push(a.as_str()),
        }
    }
    let [name, path] = positional.as_slice() else {
        return Err(USAGE.to_string());
    };
    let filter = canonical(name).ok_or_else(|| format!("unknown filter {name:?}\n{USAGE}"))?;
    let bytes = read_input(path)?;
    let env = |k: &str| env_overrides.get(k).cloned().or_else(|| std::env::var(k).ok());
    match check(filter, &bytes, &env) {
        Ok(()) => {
            println!("{filter}: config OK");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{filter}: invalid config: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Parse arguments, run the check, map the outcome to the exit code.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn names_map_to_filters() {
        assert_eq!(canonical("auth"), Some("auth"));
        assert_eq!(canonical("sluice-token-ratelimit"), Some("token-ratelimit"));
        assert_eq!(canonical("sluice_prompt_guard"), Some("prompt-guard"));
        assert_eq!(canonical("target/wasm32-wasip1/release/sluice_usage_metrics.wasm"), Some("usage-metrics"));
        assert_eq!(canonical("nope"), None);
    }

    /// Each loader's smallest accepted document, so a test can add one wrong thing to it.
    fn minimal(filter: &str) -> serde_json::Value {
        match filter {
            "auth" => serde_json::json!({"api_keys": {"keys": [{"sha256": "0".repeat(64), "subject": "u"}]}}),
            "prompt-guard" => {
                serde_json::json!({"policies": {"p": {"request_rules": [{"name": "r", "regex": "x", "action": "reject"}]}}})
            }
            "prompt-enrichment" => serde_json::json!({"profiles": {"p": {"caps": {"max_tokens": 100}}}}),
            "gateway" => serde_json::json!({"stages": [{"usage_metrics": {}}]}),
            _ => serde_json::json!({}),
        }
    }

    #[test]
    fn unknown_top_level_field_is_rejected_by_every_loader() {
        for f in FILTERS {
            let base = minimal(f);
            let ok = check(f, base.to_string().as_bytes(), &no_env);
            let mut doc = base.clone();
            doc["surely_not_a_field"] = serde_json::json!(1);
            let err = check(f, doc.to_string().as_bytes(), &no_env);
            // The minimal document may not satisfy a loader as its config evolves; the
            // unknown-field check only means something when it does.
            if ok.is_ok() {
                let Err(err) = err else { panic!("{f}: an unknown top-level field was accepted") };
                assert!(err.to_string().contains("surely_not_a_field"), "{f}: {err}");
            } else {
                assert!(err.is_err(), "{f}");
            }
        }
    }

    #[test]
    fn malformed_json_is_rejected() {
        for f in FILTERS {
            assert!(check(f, b"{", &no_env).is_err(), "{f}");
        }
    }
}
