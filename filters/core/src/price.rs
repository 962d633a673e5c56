//! Money: the one price table (per model or `prefix*` pattern, per million input, cached input
//! and output tokens, in one currency) and the cost of a usage in micro-units of that currency.
//! usage-metrics reports cost with it; token-ratelimit budgets it.

use crate::config::{ConfigError, Obj};
use crate::usage::TokenUsage;

/// A price per million tokens for models matching `pattern` (`gpt-4o` or `gpt-4o*`).
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    /// Model name or `prefix*`.
    pub pattern: String,
    /// Per million input tokens (not read from a cache).
    pub input: f64,
    /// Per million cached input tokens (defaults to `input`).
    pub cached_input: f64,
    /// Per million output tokens.
    pub output: f64,
}

impl Price {
    /// Whether this price applies to `model`.
    pub fn matches(&self, model: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => self.pattern == model,
        }
    }

    /// Cost of `usage` in micro-units: uncached input, cached input and output at their
    /// prices per million (price per million tokens × tokens = micro-units).
    pub fn cost_micros(&self, u: &TokenUsage) -> u64 {
        let cached = u.cached_input.min(u.input);
        let uncached = u.input.saturating_sub(cached) as f64;
        let total = uncached * self.input + cached as f64 * self.cached_input + u.output as f64 * self.output;
        micros(total)
    }
}

fn micros(v: f64) -> u64 {
    let v = v.round();
    if v.is_finite() && (0.0..1.8e19).contains(&v) {
        v as u64
    } else {
        0
    }
}

/// The price table of a filter: first match wins.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PriceTable {
    /// Prices, in config order.
    pub prices: Vec<Price>,
    /// ISO currency code (a metric label and the unit of money budgets).
    pub currency: String,
}

fn price(o: Obj<'_>) -> Result<Price, ConfigError> {
    o.known(&["model", "input", "cached_input", "output"])?;
    let num = |k: &str, required: bool| -> Result<Option<f64>, ConfigError> {
        match o.number(k)? {
            Some(v) if v < 0.0 => Err(o.err(k, "must not be negative")),
            None if required => Err(o.err(k, "missing field")),
            other => Ok(other),
        }
    };
    let input = num("input", true)?.unwrap_or(0.0);
    let model = o.required("model")?;
    if model.is_empty() {
        return Err(o.err("model", "must not be empty"));
    }
    Ok(Price {
        pattern: model,
        input,
        cached_input: num("cached_input", false)?.unwrap_or(input),
        output: num("output", true)?.unwrap_or(0.0),
    })
}

impl PriceTable {
    /// The `prices` and `currency` fields of a filter's config object.
    pub fn load(o: &Obj<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            prices: o.objects("prices", price)?.unwrap_or_default(),
            currency: o.non_empty("currency")?.unwrap_or_else(|| "USD".into()),
        })
    }

    /// True without any price.
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }

    /// The price for `model`.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices.iter().find(|p| p.matches(model))
    }

    /// Cost of `usage` on `model`, if the table prices it.
    pub fn cost_micros(&self, model: &str, usage: &TokenUsage) -> Option<u64> {
        self.price(model).map(|p| p.cost_micros(usage))
    }

    /// A money amount as text: `1.234567 USD`.
    pub fn format(&self, micro: u64) -> String {
        format!("{}.{:06} {}", micro / 1_000_000, micro % 1_000_000, self.currency)
    }
}

/// Convert a configured amount of money (`5.0`) to micro-units.
pub fn to_micros(amount: f64) -> u64 {
    micros(amount * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_document;

    #[test]
    fn table_prices_and_formats() {
        let doc = parse_document(
            br#"{"currency":"EUR","prices":[{"model":"gpt-4o-mini","input":0.15,"output":0.6},
                {"model":"gpt-4o*","input":2.5,"cached_input":1.25,"output":10}]}"#,
        )
        .unwrap();
        let t = PriceTable::load(&Obj::new(&doc, "").unwrap()).unwrap();
        let u = TokenUsage { input: 1000, output: 100, cached_input: 400, ..TokenUsage::default() };
        assert_eq!(t.cost_micros("gpt-4o", &u), Some(600 * 25 / 10 + 400 * 125 / 100 + 1000));
        assert_eq!(t.cost_micros("gpt-4o-mini", &u), Some(150 + 60));
        assert_eq!(t.cost_micros("llama", &u), None);
        assert_eq!(t.format(3_000_123), "3.000123 EUR");
        assert_eq!(to_micros(5.0), 5_000_000);
        for (doc, field) in [
            (r#"{"prices":[{"model":"m","input":1}]}"#, "prices[0].output"),
            (r#"{"prices":[{"model":"m","input":-1,"output":1}]}"#, "prices[0].input"),
            (r#"{"prices":[{"model":"","input":1,"output":1}]}"#, "prices[0].model"),
        ] {
            let d = parse_document(doc.as_bytes()).unwrap();
            assert_eq!(PriceTable::load(&Obj::new(&d, "").unwrap()).unwrap_err().field, field, "{doc}");
        }
    }
}
