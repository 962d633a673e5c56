//! The rules of one request, as pure functions over the exchange: which counters (key
//! values), how much to reserve (the estimate), what the answer looks like (429, the
//! `x-ratelimit-*` headers).

use crate::budget::sha256_hex32;
use crate::config::{Config, Counts, KeyPart, Rule, Units, Window};
use sluice_core::api::{self, Api};
use sluice_core::errors::LocalReply;
use sluice_core::exchange::Exchange;
use sluice_core::host::Host;
use sluice_core::json;
use sluice_core::price::PriceTable;
use sluice_core::usage::{estimate_tokens_from_bytes, TokenUsage};

/// Longest key value kept (bytes, cut on a char boundary).
pub const MAX_VALUE_BYTES: usize = 256;
/// The value of a key part the request does not have: all such callers share one bucket.
pub const NONE: &str = "_none";

/// The reservation of one request, before it knows its real usage: input tokens
/// (`ceil(prompt bytes / 4)` of every text the model reads), output tokens (the client's
/// cap, else `default_output_tokens`, capped at `max_output_tokens`; 0 for requests that
/// generate nothing), and their cost at the requested model's price (`priced` false when the
/// price table does not know the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Estimate {
    /// The units reserved.
    pub units: Units,
    /// Whether the model has a price.
    pub priced: bool,
}

/// The estimate for this request (per format: `sluice_core::api` knows the caps).
pub fn estimate(cfg: &Config, x: &mut Exchange) -> Estimate {
    let has_body = x.request.body.as_ref().is_some_and(|b| !b.is_empty());
    let model = x.model().unwrap_or_default();
    let price = cfg.prices.price(&model);
    if !has_body {
        return Estimate { units: Units::default(), priced: price.is_some() };
    }
    let input = estimate_tokens_from_bytes(x.request.prompt_bytes());
    let api: Api = x.request.api;
    let cap = x.request.json().and_then(|v| api::max_output_tokens(api, v));
    let output = cap.unwrap_or(cfg.default_output_tokens).min(cfg.max_output_tokens);
    let cost = price.map_or(0, |p| p.cost_micros(&TokenUsage { input, output, ..TokenUsage::default() }));
    Estimate { units: Units { input, output, cost }, priced: price.is_some() }
}

/// The cost of a real usage: priced by the model the provider named when the table knows
/// it, else by the requested model.
pub fn cost_of(cfg: &Config, usage: &TokenUsage, response_model: Option<&str>, requested: Option<&str>) -> u64 {
    response_model
        .and_then(|m| cfg.prices.cost_micros(m, usage))
        .or_else(|| requested.and_then(|m| cfg.prices.cost_micros(m, usage)))
        .unwrap_or(0)
}

/// 403 for a `cost` budget and a model the price table does not know.
pub fn unpriced(model: &str) -> LocalReply {
    let model = json::cut(model, 128);
    LocalReply::openai_error(
        403,
        "permission_error",
        "model_not_priced",
        &format!("{}: model {model:?} has no price, so its cost cannot be budgeted", crate::NAME),
    )
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

fn header(x: &Exchange, name: &str) -> Option<String> {
    non_empty(x.request.header(name).map(json::lossy))
}

/// The API key a client sent (`authorization: Bearer …` or `x-api-key`), as bytes.
fn presented_key(x: &Exchange) -> Option<Vec<u8>> {
    if let Some(a) = x.request.header("authorization") {
        let rest = match a.get(..7) {
            Some(p) if p.eq_ignore_ascii_case(b"bearer ") => a.get(7..).unwrap_or_default(),
            _ => a,
        };
        let key = rest.trim_ascii();
        if !key.is_empty() {
            return Some(key.to_vec());
        }
    }
    x.request.header("x-api-key").map(<[u8]>::trim_ascii).filter(|k| !k.is_empty()).map(<[u8]>::to_vec)
}

/// The value of one key part. Identity comes from auth (`x.identity`); a client header
/// stands in for the user or team only when the request carries no identity at all.
pub fn part_value(cfg: &Config, part: &KeyPart, x: &mut Exchange, h: &dyn Host) -> Option<String> {
    match part {
        KeyPart::User => match x.identity(h) {
            Some(id) => non_empty(id.user.clone()),
            None => cfg.user_header.as_deref().and_then(|n| header(x, n)),
        },
        KeyPart::Team => match x.identity(h) {
            Some(id) => non_empty(id.team.clone()),
            None => cfg.team_header.as_deref().and_then(|n| header(x, n)),
        },
        KeyPart::ApiKey => match x.identity(h) {
            Some(id) => non_empty(id.key_id.clone()),
            // Without auth: the same id auth would publish (never the key itself).
            None => presented_key(x).map(|k| sha256_hex32(&k)),
        },
        KeyPart::Route => non_empty(Some(x.route.name.clone())),
        KeyPart::Model => non_empty(x.model()),
        KeyPart::Header(n) => header(x, n),
    }
}

/// The key values of `rule` for this request: `_none` for a missing part (never an
/// exemption), each cut at [`MAX_VALUE_BYTES`] on a char boundary.
pub fn key_values(cfg: &Config, rule: &Rule, x: &mut Exchange, h: &dyn Host) -> Vec<String> {
    rule.key
        .iter()
        .map(|part| {
            let mut v = part_value(cfg, part, x, h).unwrap_or_else(|| NONE.into());
            json::truncate(&mut v, MAX_VALUE_BYTES);
            v
        })
        .collect()
}

/// The window reported in `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tightest {
    /// Its limit.
    pub limit: u64,
    /// Units left.
    pub remaining: u64,
    /// Milliseconds until it resets.
    pub reset_ms: u64,
}

/// Keep the tightest window: fewest remaining, then soonest reset.
pub fn note_window(slot: &mut Option<Tightest>, limit: u64, remaining: u64, reset_ms: u64) {
    let t = Tightest { limit, remaining, reset_ms };
    match slot {
        Some(cur) if (cur.remaining, cur.reset_ms) <= (remaining, reset_ms) => {}
        _ => *slot = Some(t),
    }
}

/// Whole seconds, rounded up, at least 1.
pub fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// Money in micro-units as a decimal amount (`4.999123`), for the `*-cost` headers.
pub fn money(micro: u64) -> String {
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// The `x-ratelimit-*` headers for an admitted request (`-cost` amounts in the currency).
pub fn admitted_headers(
    tokens: Option<Tightest>,
    requests: Option<Tightest>,
    cost: Option<Tightest>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (unit, t) in [("tokens", tokens), ("requests", requests), ("cost", cost)] {
        if let Some(t) = t {
            let (limit, remaining) = if unit == "cost" {
                (money(t.limit), money(t.remaining))
            } else {
                (t.limit.to_string(), t.remaining.to_string())
            };
            out.push((format!("x-ratelimit-limit-{unit}"), limit));
            out.push((format!("x-ratelimit-remaining-{unit}"), remaining));
            out.push((format!("x-ratelimit-reset-{unit}"), format!("{}s", secs_ceil(t.reset_ms))));
        }
    }
    out
}

/// The 429 for `rule`'s window `w`; `need` is (used, this request's amount) when known.
pub fn refusal(
    rule: &Rule,
    w: &Window,
    remaining: u64,
    reset_ms: u64,
    need: Option<(u64, u64)>,
    prices: &PriceTable,
) -> LocalReply {
    let retry = secs_ceil(reset_ms);
    if rule.counts == Counts::Cost {
        let detail = match need {
            Some((used, amount)) => {
                format!("; {} spent, this request may cost up to {}", prices.format(used), prices.format(amount))
            }
            None => String::new(),
        };
        let message = format!(
            "Budget exceeded: rule \"{}\" allows {} per {} window{detail}. Retry in {retry}s.",
            rule.name,
            prices.format(w.limit),
            w.name
        );
        return LocalReply::openai_error(429, "insufficient_quota", "budget_exceeded", &message)
            .with_header("x-envoy-ratelimited", "true")
            .with_header("retry-after", &retry.to_string())
            .with_header("x-ratelimit-limit-cost", &money(w.limit))
            .with_header("x-ratelimit-remaining-cost", &money(remaining))
            .with_header("x-ratelimit-reset-cost", &format!("{retry}s"))
            .with_header("x-sluice-ratelimit-window", &format!("{}/{}", rule.name, w.name));
    }
    let detail = match need {
        Some((used, amount)) => format!("; {used} used, this request needs {amount}"),
        None => String::new(),
    };
    let message = format!(
        "Rate limit exceeded: rule \"{}\" allows {} {} per {} window{detail}. Retry in {retry}s.",
        rule.name,
        w.limit,
        rule.counts.name(),
        w.name
    );
    let unit = rule.counts.unit();
    LocalReply::openai_error(429, unit, "rate_limit_exceeded", &message)
        .with_header("x-envoy-ratelimited", "true")
        .with_header("retry-after", &retry.to_string())
        .with_header(&format!("x-ratelimit-limit-{unit}"), &w.limit.to_string())
        .with_header(&format!("x-ratelimit-remaining-{unit}"), &remaining.to_string())
        .with_header(&format!("x-ratelimit-reset-{unit}"), &format!("{retry}s"))
        .with_header("x-sluice-ratelimit-window", &format!("{}/{}", rule.name, w.name))
}

/// The 503 when counting failed and the failure mode is `deny`.
pub fn unavailable(why: &str) -> LocalReply {
    LocalReply::openai_error(
        503,
        "server_error",
        "ratelimit_unavailable",
        &format!("{}: the rate limiter is unavailable ({why}); request refused", crate::NAME),
    )
}
