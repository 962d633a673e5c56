//! Property tests for the SSE parser: random streams, random chunking.
//!
//! For thousands of generated streams (valid SSE lines, random bytes, CR/LF mixes, unicode):
//! no panic; chunked parsing gives exactly the one-shot events; both agree with a small
//! whole-input reference parser; and the events' `raw` bytes plus the pending bytes rebuild
//! the input. A deterministic xorshift PRNG keeps failures reproducible (the seed is printed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use sluice_core::sse::{SseEvent, SseParser};

mod common;
use common::Rng;

const TEXTS: &[&str] = &[
    "",
    " ",
    "x",
    "[DONE]",
    "{\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}",
    "{\"choices\":[],\"usage\":{\"prompt_tokens\":1}}",
    "héllo",
    "日本語のテキスト",
    "😀🎉",
    "a:b",
    ": leading colon",
    "  two spaces",
    "tab\there",
    "\u{feff}bom inside",
];

const FIELDS: &[&str] = &["data", "data", "data", "event", "id", "retry", ":", "", "Data", "foo", " data"];

const ENDINGS: &[&str] = &["\n", "\n", "\r\n", "\r\n", "\r"];

/// A random stream: mostly SSE-shaped lines, sometimes garbage.
fn random_stream(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    if rng.below(10) == 0 {
        out.extend_from_slice(b"\xEF\xBB\xBF");
    }
    let lines = rng.below(40);
    for _ in 0..lines {
        match rng.below(12) {
            0 => {
                // Random bytes, CR and LF included.
                for _ in 0..rng.below(12) {
                    let b = match rng.below(4) {
                        0 => b'\r',
                        1 => b'\n',
                        _ => rng.next() as u8,
                    };
                    out.push(b);
                }
            }
            1 => {} // blank line
            2 => {
                out.extend_from_slice(rng.pick(&["retry: ", "retry:", "id: "]).as_bytes());
                out.extend_from_slice(rng.next().to_string().as_bytes());
            }
            3 => out.extend_from_slice(b"id: a\0b"),
            _ => {
                let field = *rng.pick(FIELDS);
                out.extend_from_slice(field.as_bytes());
                if rng.below(5) != 0 {
                    out.push(b':');
                    if rng.below(3) != 0 {
                        out.push(b' ');
                    }
                }
                out.extend_from_slice(rng.pick(TEXTS).as_bytes());
            }
        }
        out.extend_from_slice(rng.pick(ENDINGS).as_bytes());
        if rng.below(3) == 0 {
            out.extend_from_slice(rng.pick(ENDINGS).as_bytes()); // end the event
        }
    }
    if rng.below(4) == 0 {
        // Trailing partial line.
        out.extend_from_slice(b"data: partial");
    }
    out
}

/// Split `input` into random chunk sizes (1 byte up to a random maximum).
fn random_chunks<'a>(rng: &mut Rng, input: &'a [u8]) -> Vec<&'a [u8]> {
    let max = *rng.pick(&[1usize, 2, 3, 8, 64, 1024]);
    let mut chunks = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let take = 1 + rng.below(max.min(rest.len()));
        let (a, b) = rest.split_at(take);
        chunks.push(a);
        rest = b;
        if rng.below(20) == 0 {
            chunks.push(&[]);
        }
    }
    chunks
}

fn run(mut parser: SseParser, chunks: &[&[u8]]) -> (Vec<SseEvent>, Vec<u8>, bool) {
    let mut events = Vec::new();
    for chunk in chunks {
        events.extend(parser.feed(chunk));
    }
    events.extend(parser.finish());
    let overflowed = parser.overflowed();
    (events, parser.take_pending(), overflowed)
}

/// Straightforward whole-input parser per the WHATWG rules, for comparison.
fn reference(input: &[u8]) -> (Vec<SseEvent>, Vec<u8>) {
    let mut events = Vec::new();
    let (mut data, mut event, mut id, mut retry) = (String::new(), None, None, None);
    let mut segment_start = 0;
    let mut pos = 0;
    let mut first = true;
    while let Some(offset) = input[pos..].iter().position(|b| *b == b'\r' || *b == b'\n') {
        let line_end = pos + offset;
        let mut next = line_end + 1;
        if input[line_end] == b'\r' && input.get(next) == Some(&b'\n') {
            next += 1;
        }
        let mut line = &input[pos..line_end];
        if first {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
            first = false;
        }
        pos = next;
        if line.is_empty() {
            if !data.is_empty() {
                data.pop();
                events.push(SseEvent {
                    event: event.take(),
                    data: std::mem::take(&mut data),
                    id: id.take(),
                    retry: retry.take(),
                    raw: input[segment_start..pos].to_vec(),
                });
                segment_start = pos;
            }
            (data, event, id, retry) = (String::new(), None, None, None);
            continue;
        }
        if line[0] == b':' {
            continue;
        }
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value_str = String::from_utf8_lossy(value).into_owned();
        match name {
            b"data" => {
                data.push_str(&value_str);
                data.push('\n');
            }
            b"event" => event = Some(value_str),
            b"id" if !value.contains(&0) => id = Some(value_str),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Ok(n) = value_str.parse() {
                    retry = Some(n);
                }
            }
            _ => {}
        }
    }
    (events, input[segment_start..].to_vec())
}

fn concat(events: &[SseEvent], pending: &[u8]) -> Vec<u8> {
    let mut all: Vec<u8> = events.iter().flat_map(|e| e.raw.iter().copied()).collect();
    all.extend_from_slice(pending);
    all
}

#[test]
fn random_streams_chunked_equal_one_shot_and_reference() {
    let mut total_events = 0;
    for seed in 0..2500u64 {
        let mut rng = Rng::new(seed);
        let input = random_stream(&mut rng);
        let (events, pending, overflowed) = run(SseParser::new(), &[&input]);
        assert!(!overflowed, "seed {seed}");
        assert_eq!(concat(&events, &pending), input, "seed {seed}: raw reassembles the input");
        assert_eq!((events.clone(), pending.clone()), reference(&input), "seed {seed}: reference");
        for _ in 0..3 {
            let chunks = random_chunks(&mut rng, &input);
            let chunked = run(SseParser::new(), &chunks);
            assert_eq!(chunked, (events.clone(), pending.clone(), false), "seed {seed}: chunked");
        }
        total_events += events.len();
    }
    assert!(total_events > 5000, "generator produces events: {total_events}");
}

#[test]
fn random_streams_with_small_caps_chunk_independent() {
    let mut overflows = 0;
    for seed in 0..1500u64 {
        let mut rng = Rng::new(seed ^ 0xCAFE);
        let input = random_stream(&mut rng);
        let cap = 8 + rng.below(120);
        let want = run(SseParser::with_max_event_bytes(cap), &[&input]);
        if want.2 {
            overflows += 1;
        } else {
            assert_eq!(concat(&want.0, &want.1), input, "seed {seed}");
        }
        for event in &want.0 {
            assert!(event.raw.len() <= cap, "seed {seed}: event within cap");
        }
        let chunks = random_chunks(&mut rng, &input);
        assert_eq!(run(SseParser::with_max_event_bytes(cap), &chunks), want, "seed {seed} cap {cap}");
    }
    assert!(overflows > 100, "caps are exercised: {overflows}");
}

#[test]
fn pure_random_bytes_never_panic() {
    for seed in 0..500u64 {
        let mut rng = Rng::new(seed ^ 0xBEEF);
        let len = rng.below(2000);
        let input: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let want = run(SseParser::new(), &[&input]);
        assert_eq!(concat(&want.0, &want.1), input, "seed {seed}");
        let chunks = random_chunks(&mut rng, &input);
        assert_eq!(run(SseParser::new(), &chunks), want, "seed {seed}");
        for event in &want.0 {
            // Re-framing an event and parsing it back keeps its fields.
            let (back, _, _) = run(SseParser::new(), &[&event.to_bytes()]);
            assert_eq!(back.len(), 1, "seed {seed}");
            let fields = |e: &SseEvent| (e.event.clone(), e.data.clone(), e.id.clone(), e.retry);
            assert_eq!(fields(&back[0]), fields(event), "seed {seed}");
        }
    }
}
