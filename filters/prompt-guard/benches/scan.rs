//! Native micro-benchmark of the guard's request scan: the joined pre-filter (one `RegexSet`
//! pass over all texts of a body, then per-text checks only for the rules it found) against
//! the per-text scan it replaced (one `RegexSet` pass per text). Stable Rust, no framework.
//!
//! ```sh
//! cargo bench -p sluice-prompt-guard --bench scan            # ~15 s
//! cargo bench -p sluice-prompt-guard --bench scan -- --quick # smoke run
//! ```
//!
//! Rules: the example's `pii` request rules plus the seed phrase and an IP regex (11 rules:
//! 2 phrases, 7 built-ins, 1 regex, the private-key block). Native x86_64 numbers; inside Envoy
//! the same code runs as wasm under V8, typically 1.5-3x slower.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use serde_json::{json, Value};
use sluice_core::api;
use sluice_prompt_guard::config::Config;
use sluice_prompt_guard::inspect::guard_request;
use std::hint::black_box;
use std::time::{Duration, Instant};

const RULES: &str = r#"{"policies":{"p":{"request_rules":[
  {"name":"cc-talk","phrase":"credit card","case_insensitive":true,"action":"reject"},
  {"name":"leak","phrases":["internal only","do not share"],"action":"reject"},
  {"builtin":"openai_api_key","action":"reject"},
  {"builtin":"aws_access_key","action":"reject"},
  {"builtin":"private_key","action":"reject"},
  {"builtin":"credit_card","action":"mask"},
  {"builtin":"us_ssn","action":"mask"},
  {"builtin":"email","action":"mask"},
  {"builtin":"phone","action":"mask"},
  {"builtin":"iban","action":"mask"},
  {"name":"ip","regex":"(?-u:\\b)(?:[0-9]{1,3}\\.){3}[0-9]{1,3}(?-u:\\b)","action":"mask"}]}}}"#;

const WORDS: &[&str] = &[
    "please",
    "summarise",
    "the",
    "quarterly",
    "report",
    "for",
    "operations",
    "team",
    "and",
    "list",
    "main",
    "risks",
    "open",
    "questions",
    "next",
    "steps",
    "in",
    "plain",
    "language",
];

fn words(size: usize) -> String {
    let mut s = String::with_capacity(size + 16);
    for w in WORDS.iter().cycle() {
        if s.len() >= size {
            break;
        }
        s.push_str(w);
        s.push(' ');
    }
    s.truncate(size);
    s
}

fn chat(size: usize) -> Value {
    json!({"model": "gpt-4o", "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": words(size.saturating_sub(150))}]})
}

/// A coding-agent request: a short conversation and `n` tools with JSON schemas (hundreds
/// of small texts: descriptions and property names).
fn agent(n: usize) -> Value {
    let tools: Vec<Value> = (0..n)
        .map(|i| {
            json!({"type": "function", "function": {"name": format!("tool_{i}"),
            "description": format!("Tool number {i}: {}", words(80)),
            "parameters": {"type": "object", "properties": {
                "path": {"type": "string", "description": "file path to read"},
                "query": {"type": "string", "description": "what to look for"},
                "limit": {"type": "integer", "description": "how many results"},
                "recursive": {"type": "boolean", "description": "descend into folders"}},
                "required": ["path"]}}})
        })
        .collect();
    let mut messages = vec![json!({"role": "system", "content": words(400)})];
    for i in 0..12 {
        messages.push(json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": words(200)}));
    }
    json!({"model": "gpt-4o", "messages": messages, "tools": tools})
}

/// CPU time of this thread in ns (`/proc/thread-self/schedstat`: time on the CPU), so a
/// loaded, shared machine disturbs the numbers less than wall-clock time; wall clock when
/// unavailable.
fn cpu_ns(start: Instant) -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<f64>().ok()))
        .unwrap_or_else(|| start.elapsed().as_secs_f64() * 1e9)
}

fn bench(name: &str, quick: bool, mut f: impl FnMut()) {
    let sample = if quick { Duration::from_millis(20) } else { Duration::from_millis(300) };
    let mut iters: u64 = 1;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        if t.elapsed() >= sample / 4 {
            break;
        }
        iters *= 2;
    }
    let mut per: Vec<f64> = (0..if quick { 3 } else { 15 })
        .map(|_| {
            let epoch = Instant::now();
            let t0 = cpu_ns(epoch);
            for _ in 0..iters {
                f();
            }
            (cpu_ns(epoch) - t0) / 1e3 / iters as f64
        })
        .collect();
    per.sort_by(f64::total_cmp);
    // The best sample is the least disturbed one on a shared machine; the median shows noise.
    println!("| {name} | {:.1} µs | {:.1} µs |", per[0], per[per.len() / 2]);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let c = Config::from_json(RULES.as_bytes()).unwrap();
    let rules = c.policy("p").unwrap().request.clone();
    println!("| benchmark | best | median |");
    println!("|---|---|---|");
    let mut bodies = vec![("chat 4 KB", chat(4096)), ("chat 32 KB", chat(32768)), ("agent, 40 tools", agent(40))];
    let mut hit = chat(4096);
    hit["messages"][1]["content"] = Value::String(format!("{} mail bob@example.com", words(3900)));
    bodies.push(("chat 4 KB with one e-mail", hit));
    for (label, body) in &bodies {
        let mut texts = 0usize;
        api::visit_request_texts(&mut body.clone(), None, &mut |_| texts += 1);
        let mut list: Vec<String> = Vec::new();
        api::visit_request_texts(&mut body.clone(), None, &mut |t| list.push(t.clone()));
        bench(&format!("scan only, per text: {label}"), quick, || {
            for t in &list {
                black_box(rules.scan(t));
            }
        });
        bench(&format!("scan only, joined once: {label}"), quick, || {
            let mut joined = String::new();
            for t in &list {
                joined.push_str(t);
                joined.push('\n');
            }
            black_box(rules.candidates(&joined));
        });
        let mut b = body.clone();
        bench(&format!("visit only (core walk, no scan): {label}"), quick, || {
            let mut n = 0usize;
            api::visit_request_texts(&mut b, None, &mut |t| n += t.len());
            black_box(n);
        });
        let mut b = body.clone();
        bench(&format!("per-text set scan: {label} ({texts} texts)"), quick, || {
            api::visit_request_texts(&mut b, None, &mut |t| {
                black_box(rules.scan(t));
            });
        });
        let mut b = body.clone();
        bench(&format!("joined pre-filter: {label} ({texts} texts)"), quick, || {
            // A body that matched is masked on the first run; later runs scan the masked body.
            black_box(guard_request(&mut b, &rules, None, false));
        });
    }
}
