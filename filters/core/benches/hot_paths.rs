//! Native micro-benchmarks of sluice-core's per-request hot paths, on stable Rust with no
//! benchmark framework: `std::time::Instant` loops and `std::hint::black_box`.
//!
//! ```sh
//! cargo bench -p sluice-core --bench hot_paths            # all, ~20 s
//! cargo bench -p sluice-core --bench hot_paths -- sse      # names containing "sse"
//! cargo bench -p sluice-core --bench hot_paths -- --quick  # shorter samples (smoke run)
//! ```
//!
//! Prints a Markdown table: per benchmark the median time per iteration over several samples
//! (and the spread min..max), plus the input bytes processed per second. These are native
//! x86_64 numbers; inside Envoy the same code runs as wasm under V8, typically 1.5-3x slower,
//! plus the cost of the proxy-wasm host calls that copy bodies in and out. Use them to compare
//! changes to one function, not as the per-request cost (scripts/bench.sh measures that).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use sluice_core::api::{self, Api};
use sluice_core::json;
use sluice_core::sse::SseParser;
use sluice_core::usage::{usage_from_json, StreamUsage};
use std::hint::black_box;
use std::time::{Duration, Instant};

const PROMPT_WORDS: &[&str] = &[
    "please",
    "summarise",
    "the",
    "quarterly",
    "report",
    "for",
    "the",
    "operations",
    "team",
    "and",
    "list",
    "the",
    "main",
    "risks",
    "open",
    "questions",
    "and",
    "next",
    "steps",
    "in",
    "plain",
    "language",
];

fn words(size: usize) -> String {
    let mut s = String::with_capacity(size + 16);
    for w in PROMPT_WORDS.iter().cycle() {
        if s.len() >= size {
            break;
        }
        s.push_str(w);
        s.push(' ');
    }
    s.truncate(size);
    s
}

/// A chat request body of about `size` bytes (the same shape scripts/bench.sh sends).
fn chat_body(size: usize) -> Vec<u8> {
    let user = words(size.saturating_sub(150));
    serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": user}
        ],
        "temperature": 0.2
    }))
    .unwrap()
}

/// A 64-content-chunk SSE stream like the mock provider's (role, 64 pieces, finish, usage, DONE).
fn sse_stream() -> Vec<Vec<u8>> {
    let text = words(1024);
    let piece = text.len() / 64;
    let mut events = Vec::new();
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        serde_json::json!({"id": "chatcmpl-mock-1", "object": "chat.completion.chunk", "created": 1730000000,
            "model": "gpt-4o", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null})
    };
    events.push(chunk(serde_json::json!({"role": "assistant", "content": ""}), serde_json::Value::Null));
    for i in 0..64 {
        let p = text.get(i * piece..(i + 1) * piece).unwrap();
        events.push(chunk(serde_json::json!({ "content": p }), serde_json::Value::Null));
    }
    events.push(chunk(serde_json::json!({}), serde_json::json!("stop")));
    events.push(serde_json::json!({"id": "chatcmpl-mock-1", "object": "chat.completion.chunk", "created": 1730000000,
        "model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 180, "total_tokens": 1180}}));
    let mut out: Vec<Vec<u8>> =
        events.iter().map(|e| format!("data: {}\n\n", serde_json::to_string(e).unwrap()).into_bytes()).collect();
    out.push(b"data: [DONE]\n\n".to_vec());
    out
}

fn chat_response() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": "chatcmpl-mock-1", "object": "chat.completion", "created": 1730000000, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": words(1024)}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 180, "total_tokens": 1180}
    }))
    .unwrap()
}

struct Settings {
    sample: Duration,
    samples: usize,
    filter: Option<String>,
}

struct Bench<'a> {
    settings: &'a Settings,
}

impl Bench<'_> {
    /// Time `f` (whose input is `bytes` long) and print one table row.
    fn run<R>(&self, name: &str, bytes: usize, mut f: impl FnMut() -> R) {
        if let Some(filter) = &self.settings.filter {
            if !name.contains(filter.as_str()) {
                return;
            }
        }
        // Calibrate: iterations per sample so that one sample lasts about `sample`.
        let mut iters: u64 = 1;
        loop {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            let e = t.elapsed();
            if e >= self.settings.sample / 4 || iters >= 1 << 30 {
                let per = e.as_secs_f64() / iters as f64;
                iters = ((self.settings.sample.as_secs_f64() / per.max(1e-9)) as u64).max(1);
                break;
            }
            iters *= 4;
        }
        let mut per_iter: Vec<f64> = (0..self.settings.samples)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    black_box(f());
                }
                t.elapsed().as_secs_f64() * 1e9 / iters as f64
            })
            .collect();
        per_iter.sort_by(|a, b| a.total_cmp(b));
        let median = per_iter[per_iter.len() / 2];
        let (min, max) = (per_iter[0], per_iter[per_iter.len() - 1]);
        let mbps = if bytes > 0 { format!("{:.0}", bytes as f64 / median * 1e9 / 1e6) } else { "-".into() };
        println!("| {name} | {bytes} | {} | {} .. {} | {mbps} |", fmt_ns(median), fmt_ns(min), fmt_ns(max));
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn main() {
    let mut quick = false;
    let mut filter = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            "--bench" => {} // added by `cargo bench`
            a if a.starts_with('-') => {}
            a => filter = Some(a.to_string()),
        }
    }
    let settings = if quick {
        Settings { sample: Duration::from_millis(20), samples: 3, filter }
    } else {
        Settings { sample: Duration::from_millis(200), samples: 7, filter }
    };
    let b = Bench { settings: &settings };

    println!("| benchmark | input bytes | median per iteration | spread (min .. max) | input MB/s |");
    println!("|---|---|---|---|---|");

    for (label, size) in [("4k", 4096), ("32k", 32768)] {
        let body = chat_body(size);
        b.run(&format!("json: strict parse of a chat request {label}"), body.len(), || {
            json::parse_object(black_box(&body))
        });
        let parsed = json::parse_object(&body).unwrap();
        b.run(&format!("json: serialize chat request {label}"), body.len(), || serde_json::to_vec(black_box(&parsed)));
        b.run(&format!("api: prompt bytes of a chat request {label}"), body.len(), || {
            api::prompt_bytes(black_box(&parsed))
        });
        // The body rewrite a composed gateway does once: parse, change, serialize
        // (enrichment's prepend, failover's model swap, usage-metrics' include_usage).
        b.run(&format!("rewrite chat request {label} (parse + prepend + set model + serialize)"), body.len(), || {
            let mut req = json::parse_object(black_box(&body)).unwrap();
            api::add_system_text(Api::Chat, &mut req, "You answer for bench-user.");
            api::set_model(&mut req, "gpt-4o-mini");
            api::ensure_include_usage(Api::Chat, &mut req);
            serde_json::to_vec(&req)
        });
    }

    let stream = sse_stream();
    let stream_bytes: usize = stream.iter().map(Vec::len).sum();
    let whole: Vec<u8> = stream.concat();
    b.run("sse: parse 67-event stream, one event per chunk", stream_bytes, || {
        let mut p = SseParser::new();
        let mut n = 0;
        for chunk in &stream {
            n += p.feed(black_box(chunk)).len();
        }
        n
    });
    b.run("sse: parse 67-event stream, 1 KiB network chunks", stream_bytes, || {
        let mut p = SseParser::new();
        let mut n = 0;
        for chunk in whole.chunks(1024) {
            n += p.feed(black_box(chunk)).len();
        }
        n
    });
    b.run("sse + usage: parse stream and observe usage (usage-metrics per stream)", stream_bytes, || {
        let mut p = SseParser::new();
        let mut u = StreamUsage::new(Api::Chat);
        for chunk in &stream {
            for e in p.feed(black_box(chunk)) {
                let data = json::parse_lenient(e.data.as_bytes());
                u.observe(data.as_ref(), e.is_done());
            }
        }
        u.usage()
    });
    let response = chat_response();
    b.run("usage: usage_from_json of a 1 KB-answer response", response.len(), || usage_from_json(black_box(&response)));
}
