//! The composed sluice gateway: the filters as stages of one Envoy filter.
//!
//! Configuration: `{"stages": [{"<stage>": {<that filter's own config>}}, ...]}`, stages in
//! the order they run (responses in reverse). Each stage's config is exactly the JSON its
//! separate filter takes, read by that filter's own loader; errors name the path
//! (`stages[2].prompt_guard.policies.p.rules[0].regex: ...`). The same `.wasm` also runs the
//! model-failover upstream role (`{"stages": [{"model_failover": {"role": "upstream"}}]}`)
//! and, with one stage per plugin, the separate-filter suite in one VM (distinct `root_id`s,
//! one `vm_id`). See README.md for the trade-offs.

use sluice_core::config::{parse_document, ConfigError, Obj};
use sluice_core::stage::{take_hold_headers, with_hold, Loader, Plugin};

/// Name used in logs.
pub const NAME: &str = "gateway";

/// The stages this build knows, by config name.
pub const STAGES: &[(&str, Loader)] = &[
    ("auth", sluice_auth::load),
    ("prompt_enrichment", sluice_prompt_enrichment::load),
    ("prompt_guard", sluice_prompt_guard::load),
    ("semantic_cache", sluice_semantic_cache::load),
    ("rag", sluice_rag::load),
    ("token_ratelimit", sluice_token_ratelimit::load),
    ("usage_metrics", sluice_usage_metrics::load),
    ("model_failover", sluice_model_failover::load),
];

fn stage_names() -> String {
    STAGES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// Build the plugins of one composed filter from its configuration document.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    let mut doc = parse_document(bytes)?;
    let hold = take_hold_headers(&mut doc)?;
    let root = Obj::new(&doc, "")?;
    let plugins = {
        root.known(&["stages"])?;
        let stages = root
            .list("stages", |v, path| {
                let o = Obj::new(v, path)?;
                if o.len() != 1 {
                    return Err(o.err(".", format!("expected one stage name as the only key ({})", stage_names())));
                }
                let (name, cfg) = o.entries().next().ok_or_else(|| o.err(".", "empty stage"))?;
                let Some((_, load)) = STAGES.iter().find(|(n, _)| n == name) else {
                    return Err(o.err(name, format!("unknown stage `{name}`, expected one of {}", stage_names())));
                };
                let sub = o.field_path(name);
                load(Obj::new(cfg, &sub)?, env)
            })?
            .unwrap_or_default();
        if stages.is_empty() {
            return Err(root.err("stages", "list at least one stage"));
        }
        stages
    };
    Ok(with_hold(plugins, hold))
}

#[cfg(test)]
mod tests;

sluice_core::filter_main!(NAME, assemble);
