//! Masking an SSE answer without buffering it, in every format core knows.
//!
//! The pipeline parses the events once; core's `api::visit_stream_event` says which text
//! pieces an event carries and which channel each continues (a chat choice's `content`,
//! `reasoning_content`, `refusal`, audio transcript or tool-call arguments; a Responses output
//! part; a Messages content block). Per channel the not-yet-sent text is kept; of the text
//! pending after each event everything except the last `hold` bytes (the longest possible
//! match) is masked and sent in that event, so a match split across events or network chunks
//! is always seen whole. A match that straddles the cut keeps the cut before it. Matches are
//! searched from the cut on, as if the text began there, but the text already sent is kept
//! as look-behind context (up to `hold` bytes, unmasked): `\b` and the built-ins' checks see
//! the real characters before the cut, so a cut never creates a word boundary.
//!
//! When a channel ends (chat `finish_reason`, Responses `*.done`, Messages
//! `content_block_stop`) its held text goes out in the same event when that event carries
//! a delta of the channel, else in a delta event inserted just before it
//! (`api::delta_event`); at `[DONE]` or the end of the stream everything still held goes out
//! the same way. Complete texts (Responses `*.done` and `response.completed`, Messages
//! `content_block_start`) are masked whole. Events the masker does not change pass byte for
//! byte; a data line that is not JSON is masked as plain text.

use crate::logprobs;
use crate::rules::{RuleSet, Span};
use serde_json::Value;
use sluice_core::api::{self, Api, Channel, Piece};
use sluice_core::exchange::{Chunk, Event};
use sluice_core::json;
use sluice_core::sse::SseEvent;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
struct Pending {
    /// Text received but not sent yet (unmasked).
    text: String,
    /// The last `hold` bytes already sent, unmasked (scan context).
    sent: String,
}

/// Per-stream masking state.
#[derive(Debug)]
pub struct StreamMasker {
    api: Api,
    hold: usize,
    apply: bool,
    channels: BTreeMap<Channel, Pending>,
    /// The last event that carried a delta: ids and model for inserted events.
    template: Value,
    /// Rules that masked something, sorted.
    pub applied: Vec<usize>,
    /// Rules that matched (also in shadow mode), sorted.
    pub matched: Vec<usize>,
}

fn add_sorted(v: &mut Vec<usize>, items: impl IntoIterator<Item = usize>) {
    for i in items {
        if let Err(pos) = v.binary_search(&i) {
            v.insert(pos, i);
        }
    }
}

fn floor_boundary(s: &str, mut at: usize) -> usize {
    at = at.min(s.len());
    while at > 0 && !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn ceil_boundary(s: &str, mut at: usize) -> usize {
    while at < s.len() && !s.is_char_boundary(at) {
        at += 1;
    }
    at.min(s.len())
}

/// Whether an `End` piece closes `c` (`*`: every field of its index).
fn ends(end: &Channel, c: &Channel) -> bool {
    end.index == c.index && (end.field == "*" || end.field == c.field)
}

impl StreamMasker {
    /// A masker for answers of `api`, holding back `hold` bytes; `apply = false` only counts
    /// (shadow mode).
    pub fn new(api: Api, hold: usize, apply: bool) -> Self {
        Self {
            api,
            hold,
            apply,
            channels: BTreeMap::new(),
            template: Value::Null,
            applied: Vec::new(),
            matched: Vec::new(),
        }
    }

    /// Bytes of text currently held back.
    pub fn held_bytes(&self) -> usize {
        self.channels.values().map(|p| p.text.len()).sum()
    }

    /// Mask the events of one chunk in place (inserting flush events where needed).
    pub fn on_chunk(&mut self, rules: &RuleSet, chunk: &mut Chunk) {
        let events = std::mem::take(&mut chunk.events);
        let mut out = Vec::with_capacity(events.len() + 1);
        let mut changed = false;
        for mut ev in events {
            if ev.is_done() {
                changed |= self.flush(rules, None, &mut out);
                out.push(ev);
                continue;
            }
            if ev.json.is_none() {
                changed |= self.plain_event(rules, &mut ev);
                out.push(ev);
                continue;
            }
            changed |= self.json_event(rules, &mut ev, &mut out);
            out.push(ev);
        }
        if chunk.end {
            changed |= self.flush(rules, None, &mut out);
        }
        chunk.events = out;
        if changed {
            chunk.events_changed = true;
        }
    }

    /// A data line that is not JSON: masked whole.
    fn plain_event(&mut self, rules: &RuleSet, ev: &mut Event) -> bool {
        let Some((masked, applied)) = rules.mask(&ev.sse.data) else { return false };
        add_sorted(&mut self.matched, applied.iter().copied());
        if !self.apply {
            return false;
        }
        add_sorted(&mut self.applied, applied);
        let mut sse = SseEvent { data: masked, raw: Vec::new(), ..ev.sse.clone() };
        sse.raw = sse.to_bytes();
        *ev = Event::new(sse);
        true
    }

    fn json_event(&mut self, rules: &RuleSet, ev: &mut Event, out: &mut Vec<Event>) -> bool {
        let api = self.api;
        let name = ev.sse.event.clone();
        let Some(data) = ev.json.as_mut() else { return false };
        if !matches!(api, Api::Chat | Api::Completions | Api::Responses | Api::Messages) {
            // A format core does not know: every string of each event, masked whole.
            return self.whole_event(rules, ev);
        }
        // Pass 1: which channels end with this event.
        let mut closing: Vec<Channel> = Vec::new();
        api::visit_stream_event(api, name.as_deref(), data, &mut |p| {
            if let Piece::End(c) = p {
                closing.push(c);
            }
        });
        // Pass 2: deltas (held back unless their channel ends here) and whole texts.
        let mut changed = false;
        let mut had_delta = false;
        api::visit_stream_event(api, name.as_deref(), data, &mut |p| match p {
            Piece::Delta(c, t) => {
                had_delta = true;
                let last = closing.iter().any(|e| ends(e, &c));
                let pending = self.channels.entry(c).or_default();
                let emit = split(rules, pending, t, last, self.hold, self.apply, &mut self.matched, &mut self.applied);
                if emit != *t {
                    *t = emit;
                    changed = true;
                }
            }
            Piece::Whole(t) => {
                if let Some((masked, applied)) = rules.mask(t) {
                    add_sorted(&mut self.matched, applied.iter().copied());
                    if self.apply {
                        add_sorted(&mut self.applied, applied);
                        *t = masked;
                        changed = true;
                    }
                }
            }
            Piece::End(_) => {}
        });
        if self.apply {
            changed |= logprobs::strip(data);
        }
        if had_delta || self.template.is_null() {
            self.template = data.clone();
        }
        // Channels that end here without a delta in this event: their held text goes first.
        let mut inserted = false;
        for end in &closing {
            inserted |= self.flush(rules, Some(end), out);
        }
        if changed {
            let _ = ev.json_mut(); // re-serialized by the pipeline
        }
        (changed && self.apply) || inserted
    }

    fn whole_event(&mut self, rules: &RuleSet, ev: &mut Event) -> bool {
        let Some(data) = ev.json.as_mut() else { return false };
        let mut changed = false;
        api::visit_response_texts(data, &mut |t| {
            if let Some((masked, applied)) = rules.mask(t) {
                add_sorted(&mut self.matched, applied.iter().copied());
                if self.apply {
                    add_sorted(&mut self.applied, applied);
                    *t = masked;
                    changed = true;
                }
            }
        });
        if self.apply {
            changed |= logprobs::strip(data);
        }
        if changed {
            let _ = ev.json_mut();
        }
        changed
    }

    /// Send the held text of the channels `end` closes (all when `None`) as inserted delta
    /// events. Returns true when an event was inserted.
    fn flush(&mut self, rules: &RuleSet, end: Option<&Channel>, out: &mut Vec<Event>) -> bool {
        let keys: Vec<Channel> = self
            .channels
            .iter()
            .filter(|(c, p)| !p.text.is_empty() && end.is_none_or(|e| ends(e, c)))
            .map(|(c, _)| c.clone())
            .collect();
        let mut inserted = false;
        for c in keys {
            let Some(pending) = self.channels.get_mut(&c) else { continue };
            let text = split(rules, pending, "", true, self.hold, self.apply, &mut self.matched, &mut self.applied);
            let v = api::delta_event(self.api, &self.template, &c, text);
            if v.is_null() {
                continue;
            }
            out.push(Event::from_json(api::event_name(self.api, &v), v));
            inserted = true;
        }
        match end {
            Some(e) => self.channels.retain(|c, _| !ends(e, c)),
            None => self.channels.clear(),
        }
        inserted
    }
}

/// Whether a body that is not labelled `text/event-stream` is one anyway (a stream behind a
/// wrong or missing content type): its first line is an SSE field.
pub fn looks_like_sse(text: &str) -> bool {
    let first = text.trim_start_matches(['\u{feff}', '\r', '\n']);
    ["data:", "event:", "id:", "retry:", ":"].iter().any(|f| first.starts_with(f))
}

/// Mask a whole buffered body that is an SSE stream (`looks_like_sse`), as the stream
/// masker would have event by event. Returns the new body when something changed; matches
/// go into `matched`.
pub fn mask_whole(api: Api, rules: &RuleSet, body: &[u8], apply: bool, matched: &mut Vec<usize>) -> Option<Vec<u8>> {
    let mut parser = sluice_core::sse::SseParser::new();
    let mut raw = parser.feed(body);
    raw.extend(parser.finish());
    let mut chunk = Chunk { end: true, events: raw.into_iter().map(Event::new).collect(), ..Chunk::default() };
    let mut m = StreamMasker::new(api, rules.max_mask_len(), apply);
    m.on_chunk(rules, &mut chunk);
    add_sorted(matched, m.matched.iter().copied());
    if m.matched.is_empty() || !apply {
        return None; // nothing to mask: the bytes stay the provider's
    }
    if !chunk.events_changed && chunk.events.iter().all(|e| e.bytes() == e.sse.raw) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    for ev in &chunk.events {
        out.extend(ev.bytes());
    }
    out.extend(parser.take_pending());
    Some(out)
}

/// Add `incoming` to the channel's pending text and return what to send now: all of it
/// when `last`, else all but the last `hold` bytes (or up to the start of a match that
/// straddles that cut), masked.
#[allow(clippy::too_many_arguments)]
fn split(
    rules: &RuleSet,
    p: &mut Pending,
    incoming: &str,
    last: bool,
    hold: usize,
    apply: bool,
    matched: &mut Vec<usize>,
    applied: &mut Vec<usize>,
) -> String {
    p.text.push_str(incoming);
    let ctx = p.sent.len();
    let scan = format!("{}{}", p.sent, p.text);
    // Matches start in the pending text (as before the cut); the text already sent is only
    // look-behind context, so a cut never makes a word boundary that is not there.
    let found = rules.scan_from(&scan, ctx);
    let spans: Vec<Span> = if found.matched.is_empty() {
        Vec::new()
    } else {
        rules
            .mask_spans_from(&scan, &found.matched, ctx)
            .into_iter()
            .map(|s| Span { start: s.start.saturating_sub(ctx), end: s.end.saturating_sub(ctx), rule: s.rule })
            .collect()
    };
    add_sorted(matched, spans.iter().map(|s| s.rule));
    let mut cut = if last { p.text.len() } else { floor_boundary(&p.text, p.text.len().saturating_sub(hold)) };
    if !last {
        if let Some(s) = spans.iter().find(|s| s.start < cut && s.end > cut) {
            cut = s.start;
        }
    }
    let emit: Vec<Span> = spans.into_iter().filter(|s| s.end <= cut).collect();
    let rest = p.text.split_off(cut);
    let head = std::mem::replace(&mut p.text, rest);
    let out = if apply && !emit.is_empty() {
        add_sorted(applied, emit.iter().map(|s| s.rule));
        rules.apply_spans(&head, &emit)
    } else {
        head.clone()
    };
    p.sent.push_str(&head);
    if p.sent.len() > hold {
        let from = ceil_boundary(&p.sent, p.sent.len() - hold);
        p.sent = json::cut(p.sent.get(from..).unwrap_or_default(), hold).to_string();
    }
    out
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
