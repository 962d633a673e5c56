//! Incremental Server-Sent Events parser, following the WHATWG parsing rules.
//!
//! Network chunks are not events: [`SseParser::feed`] takes chunks of any size and returns the
//! events they complete, carrying partial lines (and a `\r` whose `\n` may come next) across
//! calls. Each byte is scanned once, so feeding is linear in the stream length.
//!
//! Every event keeps the exact bytes it came from in [`SseEvent::raw`], so a pass-through
//! filter loses nothing:
//! - bytes that dispatch no event (comments such as `: ping`, blank lines, blocks with no
//!   `data:` line) are kept and prepended to the `raw` of the next event;
//! - what is left at the end of the stream (an unterminated event, trailing comments) is
//!   [`SseParser::pending_bytes`] long and returned by [`SseParser::take_pending`].
//!
//! Concatenating the `raw` of every event, then `take_pending()`, gives back the input exactly,
//! unless an event was dropped for exceeding the size cap (see [`SseParser::overflowed`]).
//!
//! Departures from the browser `EventSource`: `event` and `id` are what this event's block
//! said (no `"message"` default, no last-event-ID carried to later events), and `retry` is
//! reported on the event instead of being applied.

/// Default cap on the bytes of one event (including comment blocks before it): 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if the block had one.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field, if the block had one (values containing NUL are ignored, per spec).
    pub id: Option<String>,
    /// The `retry:` field, if it was all ASCII digits.
    pub retry: Option<u64>,
    /// The exact stream bytes of this event: any data-less blocks before it, its lines, and
    /// the blank line that ended it, terminators included.
    pub raw: Vec<u8>,
}

impl SseEvent {
    /// `true` for OpenAI's end-of-stream sentinel `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.data.trim() == "[DONE]"
    }

    /// Canonical framing: `event:`, `id:`, `retry:` lines, one `data:` line per line of
    /// `data`, then a blank line, all ending in `\n`. Line breaks inside `event` or `id`
    /// would break framing, so they are removed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len().saturating_add(16));
        if let Some(event) = &self.event {
            push_field(&mut out, "event", event);
        }
        if let Some(id) = &self.id {
            push_field(&mut out, "id", id);
        }
        if let Some(retry) = self.retry {
            push_field(&mut out, "retry", &retry.to_string());
        }
        for line in normalize_newlines(&self.data).split('\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
        out
    }

    /// A data-only event; `\r\n` and `\r` in `data` become `\n`, `raw` is the canonical framing.
    pub fn data_event(data: &str) -> SseEvent {
        let mut event = SseEvent { data: normalize_newlines(data).into_owned(), ..SseEvent::default() };
        event.raw = event.to_bytes();
        event
    }
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend(value.bytes().filter(|b| *b != b'\r' && *b != b'\n'));
    out.push(b'\n');
}

fn normalize_newlines(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\r') {
        std::borrow::Cow::Owned(s.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Fields of the event being built.
#[derive(Debug, Default)]
struct Fields {
    /// Every `data:` value followed by `\n`; empty means no data line yet.
    data: String,
    event: Option<String>,
    id: Option<String>,
    retry: Option<u64>,
}

impl Fields {
    /// Apply one non-blank line (terminator and BOM already removed).
    fn apply(&mut self, line: &[u8]) {
        if line.first() == Some(&b':') {
            return; // comment
        }
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(colon) => {
                let (name, rest) = line.split_at(colon);
                let value = rest.get(1..).unwrap_or_default();
                (name, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                self.data.push_str(&String::from_utf8_lossy(value));
                self.data.push('\n');
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            b"id" if !value.contains(&0) => {
                self.id = Some(String::from_utf8_lossy(value).into_owned());
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Ok(ms) = String::from_utf8_lossy(value).parse() {
                    self.retry = Some(ms);
                }
            }
            _ => {}
        }
    }
}

/// What the previous line's `\r` terminator means for a `\n` at the start of the next chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CarriedCr {
    /// No `\r` pending.
    No,
    /// The `\r` is in `raw`; a following `\n` joins it there.
    Kept,
    /// The `\r` belonged to a dropped (oversized) event; a following `\n` is dropped too.
    Dropped,
}

/// Incremental SSE parser for one stream.
#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    /// Bytes since the last dispatched event: complete lines, then the current partial line.
    raw: Vec<u8>,
    /// Start of the current (incomplete) line in `raw`.
    line_start: usize,
    carried_cr: CarriedCr,
    /// A blank line ending in a `\r` that was the last byte so far completed an event; it is
    /// dispatched once the next byte shows whether a `\n` belongs to it (or at `finish`).
    held: bool,
    /// No line processed yet: a BOM at the start is dropped.
    at_start: bool,
    /// Discarding an oversized event up to its blank line.
    skipping: bool,
    /// While skipping: the current line has bytes (so its end is not a blank line).
    skip_line_nonempty: bool,
    overflowed: bool,
    /// The last completed line was blank (decides how an overflow on its `\n` is handled).
    last_line_blank: bool,
    fields: Fields,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser with the default per-event cap ([`DEFAULT_MAX_EVENT_BYTES`]).
    pub fn new() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A parser whose events (raw bytes, including comment blocks before them) may not
    /// exceed `max` bytes; larger ones are dropped.
    pub fn with_max_event_bytes(max: usize) -> Self {
        Self {
            max_event_bytes: max,
            raw: Vec::new(),
            line_start: 0,
            carried_cr: CarriedCr::No,
            held: false,
            at_start: true,
            skipping: false,
            skip_line_nonempty: false,
            overflowed: false,
            last_line_blank: false,
            fields: Fields::default(),
        }
    }

    /// Feed the next chunk; returns the events it completed, in order.
    ///
    /// One case waits for more input: when the blank line ending an event ends in a `\r`
    /// that is the last byte received so far, the event is returned by the next `feed` (or
    /// `finish`), once it is known whether a `\n` belongs to that line ending. This keeps
    /// `raw` identical however the stream is chunked; it only delays CR-only streams.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let Some((&first, after_first)) = chunk.split_first() else {
            return out;
        };
        let mut rest = chunk;
        let carried = std::mem::replace(&mut self.carried_cr, CarriedCr::No);
        if first == b'\n' && carried != CarriedCr::No {
            rest = after_first;
            if carried == CarriedCr::Kept {
                self.raw.push(b'\n');
                self.line_start = self.raw.len();
                if self.raw.len() > self.max_event_bytes {
                    self.overflow(true, self.last_line_blank);
                }
            }
        }
        if self.held {
            self.held = false;
            self.end_block(&mut out);
        }

        while !rest.is_empty() {
            let Some(pos) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') else {
                self.push_partial(rest);
                break;
            };
            let (line, tail) = rest.split_at(pos);
            let (terminator, after, cr_at_end) = match tail {
                [b'\r', b'\n', after @ ..] => (tail.get(..2).unwrap_or_default(), after, false),
                [b'\r'] => (tail, &[][..], true),
                [_, after @ ..] => (tail.get(..1).unwrap_or_default(), after, false),
                [] => (tail, tail, false),
            };
            rest = after;
            self.complete_line(line, terminator, cr_at_end, &mut out);
        }
        out
    }

    /// End of stream. Returns the event held back by a final `\r` blank line, if any.
    /// An event without its terminating blank line is not dispatched (per spec); its bytes
    /// stay pending for [`take_pending`](Self::take_pending).
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if self.held {
            self.held = false;
            self.end_block(&mut out);
        }
        self.carried_cr = CarriedCr::No;
        self.fields = Fields::default();
        self.skipping = false;
        self.skip_line_nonempty = false;
        out
    }

    /// Bytes received that no returned event has claimed yet.
    pub fn pending_bytes(&self) -> usize {
        self.raw.len()
    }

    /// Take the pending bytes (meant for the end of the stream, after `finish`), so a
    /// pass-through filter can forward them.
    pub fn take_pending(&mut self) -> Vec<u8> {
        self.line_start = 0;
        std::mem::take(&mut self.raw)
    }

    /// `true` once an event exceeded the cap. Such an event is dropped whole (its bytes are
    /// in no `raw`); parsing resumes after its blank line.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Bytes of a line whose end has not arrived yet.
    fn push_partial(&mut self, bytes: &[u8]) {
        if self.skipping {
            self.skip_line_nonempty = true;
        } else if self.raw.len().saturating_add(bytes.len()) > self.max_event_bytes {
            self.overflow(false, false);
        } else {
            self.raw.extend_from_slice(bytes);
        }
    }

    /// The end of a line: `line` is its last bytes (earlier ones are in `raw`).
    fn complete_line(&mut self, line: &[u8], terminator: &[u8], cr_at_end: bool, out: &mut Vec<SseEvent>) {
        if self.skipping {
            let blank = !self.skip_line_nonempty && line.is_empty();
            self.skip_line_nonempty = false;
            if blank {
                self.skipping = false;
            }
            self.at_start = false;
            if cr_at_end {
                self.carried_cr = CarriedCr::Dropped;
            }
            return;
        }
        let start = self.line_start;
        let total = self.raw.len().saturating_add(line.len()).saturating_add(terminator.len());
        if total > self.max_event_bytes {
            let blank = self.raw.len() == start && line.is_empty();
            self.overflow(true, blank);
            self.at_start = false;
            if cr_at_end {
                self.carried_cr = CarriedCr::Dropped;
            }
            return;
        }
        self.raw.extend_from_slice(line);
        let end = self.raw.len();
        self.raw.extend_from_slice(terminator);
        self.line_start = self.raw.len();
        if cr_at_end {
            self.carried_cr = CarriedCr::Kept;
        }

        let mut content = self.raw.get(start..end).unwrap_or_default();
        if self.at_start {
            self.at_start = false;
            content = content.strip_prefix(BOM).unwrap_or(content);
        }
        self.last_line_blank = content.is_empty();
        if !content.is_empty() {
            self.fields.apply(content);
        } else if cr_at_end && !self.fields.data.is_empty() {
            self.held = true;
        } else {
            self.end_block(out);
        }
    }

    /// A blank line: dispatch the block if it had data, else just reset its fields (its
    /// bytes stay in `raw` and go with the next event).
    fn end_block(&mut self, out: &mut Vec<SseEvent>) {
        let fields = std::mem::take(&mut self.fields);
        if fields.data.is_empty() {
            return;
        }
        let mut data = fields.data;
        data.pop(); // the `\n` after the last data line
        self.line_start = 0;
        out.push(SseEvent {
            event: fields.event,
            data,
            id: fields.id,
            retry: fields.retry,
            raw: std::mem::take(&mut self.raw),
        });
    }

    /// Drop everything since the last dispatch. `line_done`: the offending line is complete;
    /// `blank`: it was the blank line ending the event, so no skipping is needed.
    fn overflow(&mut self, line_done: bool, blank: bool) {
        log::debug!("sse: event over {} bytes dropped", self.max_event_bytes);
        self.overflowed = true;
        self.raw = Vec::new();
        self.line_start = 0;
        self.held = false;
        self.fields = Fields::default();
        self.skipping = !(line_done && blank);
        self.skip_line_nonempty = !line_done;
        if self.carried_cr == CarriedCr::Kept {
            self.carried_cr = CarriedCr::Dropped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",",
        "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",",
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Héllo 世界 👋\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",",
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",",
        "\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",",
        "\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\n\n",
        "data: [DONE]\n\n",
    );

    /// Feed `chunks`, finish, and return (events, pending bytes).
    fn run(parser: &mut SseParser, chunks: &[&[u8]]) -> (Vec<SseEvent>, Vec<u8>) {
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(parser.feed(chunk));
        }
        events.extend(parser.finish());
        (events, parser.take_pending())
    }

    fn one_shot(input: &[u8]) -> (Vec<SseEvent>, Vec<u8>) {
        run(&mut SseParser::new(), &[input])
    }

    fn reassembled(events: &[SseEvent], pending: &[u8]) -> Vec<u8> {
        let mut all: Vec<u8> = events.iter().flat_map(|e| e.raw.iter().copied()).collect();
        all.extend_from_slice(pending);
        all
    }

    fn datas(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn openai_stream_one_shot() {
        let (events, pending) = one_shot(OPENAI_STREAM.as_bytes());
        assert_eq!(events.len(), 6);
        assert!(events[1].data.contains("Héllo 世界 👋"));
        assert!(events[5].is_done());
        assert!(!events[4].is_done());
        assert!(events.iter().all(|e| e.event.is_none() && e.id.is_none() && e.retry.is_none()));
        assert!(pending.is_empty());
        assert_eq!(reassembled(&events, &pending), OPENAI_STREAM.as_bytes());
        assert_eq!(events[5].raw, b"data: [DONE]\n\n");
    }

    #[test]
    fn split_at_every_byte_position() {
        let input = OPENAI_STREAM.as_bytes();
        let want = one_shot(input);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            let got = run(&mut SseParser::new(), &[a, b]);
            assert_eq!(got, want, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&mut SseParser::new(), &bytes), want);
    }

    #[test]
    fn split_at_every_byte_position_with_crlf_and_cr() {
        for ending in ["\r\n", "\r"] {
            let input = OPENAI_STREAM.replace('\n', ending);
            let input = input.as_bytes();
            let want = one_shot(input);
            assert_eq!(datas(&want.0), datas(&one_shot(OPENAI_STREAM.as_bytes()).0));
            for cut in 0..=input.len() {
                let (a, b) = input.split_at(cut);
                assert_eq!(run(&mut SseParser::new(), &[a, b]), want, "{ending:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn several_events_per_chunk_in_order() {
        let mut p = SseParser::new();
        let events = p.feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4");
        assert_eq!(datas(&events), ["1", "2", "3"]);
        assert_eq!(p.pending_bytes(), 7);
        let events = p.feed(b"\n\n");
        assert_eq!(datas(&events), ["4"]);
        assert_eq!(p.pending_bytes(), 0);
    }

    #[test]
    fn line_endings() {
        let cases: &[(&str, &[&str])] = &[
            ("data: a\n\ndata: b\n\n", &["a", "b"]),
            ("data: a\r\n\r\ndata: b\r\n\r\n", &["a", "b"]),
            ("data: a\r\rdata: b\r\r", &["a", "b"]),
            ("data: a\r\n\ndata: b\r\r\n", &["a", "b"]),
            ("data: a\n\rdata: b\r\n\n", &["a", "b"]),
            ("data: a\ndata: b\r\ndata: c\r\r", &["a\nb\nc"]),
            ("data: a\n\n\n\n\ndata: b\n\n", &["a", "b"]),
        ];
        for (input, want) in cases {
            let (events, pending) = one_shot(input.as_bytes());
            assert_eq!(datas(&events), *want, "{input:?}");
            assert_eq!(reassembled(&events, &pending), input.as_bytes(), "{input:?}");
        }
    }

    #[test]
    fn cr_at_chunk_end_then_lf_is_one_line_ending() {
        let mut p = SseParser::new();
        assert!(p.feed(b"data: a\r").is_empty());
        // Without the carried `\r`, this `\n` would be a blank line dispatching "a" alone.
        assert!(p.feed(b"\ndata: b\r").is_empty());
        assert!(p.feed(b"\n\r").is_empty(), "held until the next byte");
        let events = p.feed(b"\n");
        assert_eq!(datas(&events), ["a\nb"]);
        assert_eq!(events[0].raw, b"data: a\r\ndata: b\r\n\r\n");
        assert_eq!(p.pending_bytes(), 0);
    }

    #[test]
    fn held_event_dispatches_on_next_non_lf_byte_or_finish() {
        let mut p = SseParser::new();
        assert!(p.feed(b"data: a\r\r").is_empty());
        assert_eq!(p.pending_bytes(), 9);
        let events = p.feed(b"data: b\r\r");
        assert_eq!(datas(&events), ["a"]);
        assert_eq!(events[0].raw, b"data: a\r\r");
        let events = p.finish();
        assert_eq!(datas(&events), ["b"]);
        assert_eq!(p.pending_bytes(), 0);
        assert!(p.finish().is_empty());
        assert!(p.feed(b"").is_empty());
    }

    #[test]
    fn multi_line_data() {
        let (events, _) = one_shot(b"data: line one\ndata:\ndata: line three\n\n");
        assert_eq!(datas(&events), ["line one\n\nline three"]);
        assert_eq!(events[0].to_bytes(), b"data: line one\ndata: \ndata: line three\n\n");
    }

    #[test]
    fn comments_and_keep_alives_go_with_the_next_event() {
        let input = b": ping\n\n: keep-alive\n\ndata: x\n\n: ping\n\n";
        let mut p = SseParser::new();
        let events = p.feed(input);
        assert_eq!(datas(&events), ["x"]);
        assert_eq!(events[0].raw, b": ping\n\n: keep-alive\n\ndata: x\n\n");
        assert!(p.finish().is_empty());
        assert_eq!(p.pending_bytes(), 8);
        assert_eq!(p.take_pending(), b": ping\n\n");
        assert_eq!(p.pending_bytes(), 0);

        // A comment inside an event is ignored.
        let (events, _) = one_shot(b"data: a\n: note\ndata: b\n\n");
        assert_eq!(datas(&events), ["a\nb"]);
    }

    #[test]
    fn fields_table() {
        type Want = (Option<&'static str>, &'static str, Option<&'static str>, Option<u64>);
        let cases: &[(&str, Option<Want>)] = &[
            ("data:x\n\n", Some((None, "x", None, None))),
            ("data:  x\n\n", Some((None, " x", None, None))),
            ("data: x \n\n", Some((None, "x ", None, None))),
            ("data\n\n", Some((None, "", None, None))),
            ("data:\n\n", Some((None, "", None, None))),
            ("data: a:b: c\n\n", Some((None, "a:b: c", None, None))),
            ("event: update\ndata: x\n\n", Some((Some("update"), "x", None, None))),
            ("event: a\nevent: b\ndata: x\n\n", Some((Some("b"), "x", None, None))),
            ("event\ndata: x\n\n", Some((Some(""), "x", None, None))),
            ("id: 7\ndata: x\n\n", Some((None, "x", Some("7"), None))),
            ("id\ndata: x\n\n", Some((None, "x", Some(""), None))),
            ("id: a\0b\ndata: x\n\n", Some((None, "x", None, None))),
            ("retry: 3000\ndata: x\n\n", Some((None, "x", None, Some(3000)))),
            ("retry: 3s\ndata: x\n\n", Some((None, "x", None, None))),
            ("retry:\ndata: x\n\n", Some((None, "x", None, None))),
            ("retry: 99999999999999999999999\ndata: x\n\n", Some((None, "x", None, None))),
            ("foo: bar\ndata: x\n\n", Some((None, "x", None, None))),
            ("Data: x\n\n", None),
            (" data: x\n\n", None),
            ("event: e\n\n", None),
            ("id: 1\nretry: 5\n\n", None),
            (":data: x\n\n", None),
            ("data: x", None),
            ("data: x\n", None),
        ];
        for (input, want) in cases {
            let (events, pending) = one_shot(input.as_bytes());
            let got: Vec<_> = events.iter().map(|e| (e.event.clone(), e.data.clone(), e.id.clone(), e.retry)).collect();
            let want: Vec<_> = want
                .iter()
                .map(|(ev, data, id, retry)| (ev.map(String::from), data.to_string(), id.map(String::from), *retry))
                .collect();
            assert_eq!(got, want, "{input:?}");
            assert_eq!(reassembled(&events, &pending), input.as_bytes(), "{input:?}");
        }
    }

    #[test]
    fn data_less_block_resets_event_and_id() {
        let (events, _) = one_shot(b"event: a\nid: 1\n\ndata: x\n\n");
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].event.as_deref(), events[0].id.as_deref()), (None, None));
    }

    #[test]
    fn bom_on_first_line_only() {
        let (events, pending) = one_shot(b"\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\ndata: c\n\n");
        assert_eq!(datas(&events), ["a", "c"]);
        assert_eq!(events[0].raw, b"\xEF\xBB\xBFdata: a\n\n");
        assert!(pending.is_empty());

        let mut p = SseParser::new();
        assert!(p.feed(b"\xEF").is_empty());
        assert!(p.feed(b"\xBB").is_empty());
        let events = p.feed(b"\xBFdata: a\n\n");
        assert_eq!(datas(&events), ["a"]);

        // A BOM-only first line is a blank line.
        let (events, _) = one_shot(b"\xEF\xBB\xBF\ndata: a\n\n");
        assert_eq!(datas(&events), ["a"]);
    }

    #[test]
    fn invalid_utf8_is_lossy_in_fields_exact_in_raw() {
        let input = b"event: \xff\ndata: a\xc3\n\n";
        let (events, _) = one_shot(input);
        assert_eq!(events[0].event.as_deref(), Some("\u{FFFD}"));
        assert_eq!(events[0].data, "a\u{FFFD}");
        assert_eq!(events[0].raw, input);
    }

    #[test]
    fn unicode_split_across_chunks() {
        let input = "event: 事件\ndata: {\"content\":\"日本語 😀 ñ\"}\ndata: 🎉\n\n".as_bytes();
        let want = one_shot(input);
        assert_eq!(want.0[0].data, "{\"content\":\"日本語 😀 ñ\"}\n🎉");
        assert_eq!(want.0[0].event.as_deref(), Some("事件"));
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&mut SseParser::new(), &bytes), want);
        for size in 2..7 {
            let chunks: Vec<&[u8]> = input.chunks(size).collect();
            assert_eq!(run(&mut SseParser::new(), &chunks), want, "size {size}");
        }
    }

    #[test]
    fn empty_input() {
        let mut p = SseParser::new();
        assert!(p.feed(b"").is_empty());
        assert!(p.finish().is_empty());
        assert_eq!(p.pending_bytes(), 0);
        assert!(!p.overflowed());
        assert!(SseParser::default().feed(b"\n\n\r\n").is_empty());
    }

    #[test]
    fn oversized_event_is_dropped_and_parser_recovers() {
        let big = format!("data: {}\n\n", "x".repeat(200));
        let input = format!("data: a\n\n{big}data: b\n\n");
        let want = ["a", "b"];
        for size in [1, 3, 64, input.len()] {
            let mut p = SseParser::with_max_event_bytes(64);
            let chunks: Vec<&[u8]> = input.as_bytes().chunks(size).collect();
            let (events, pending) = run(&mut p, &chunks);
            assert_eq!(datas(&events), want, "size {size}");
            assert!(p.overflowed());
            assert!(pending.is_empty());
            assert_eq!(events[1].raw, b"data: b\n\n", "the dropped event left nothing behind");
        }
        // Many short lines adding up over the cap, with CR endings split across chunks.
        let lines = "data: 0123456789\r".repeat(10);
        let input = format!("{lines}\rdata: ok\r\r");
        for size in [1, 2, 17, input.len()] {
            let mut p = SseParser::with_max_event_bytes(64);
            let chunks: Vec<&[u8]> = input.as_bytes().chunks(size).collect();
            let (events, _) = run(&mut p, &chunks);
            assert_eq!(datas(&events), ["ok"], "size {size}");
            assert!(p.overflowed());
        }
        let mut p = SseParser::with_max_event_bytes(64);
        assert_eq!(datas(&p.feed(b"data: fits\n\n")), ["fits"]);
        assert!(!p.overflowed());
    }

    #[test]
    fn data_less_bytes_are_bounded_by_the_cap() {
        let mut p = SseParser::with_max_event_bytes(64);
        for _ in 0..1000 {
            assert!(p.feed(b": ping\n\n").is_empty());
            assert!(p.pending_bytes() <= 64);
        }
        assert!(p.overflowed());
        assert_eq!(datas(&p.feed(b"data: x\n\n")), ["x"]);
    }

    #[test]
    fn cap_boundary_is_the_same_however_chunked() {
        let input = b"data: abcdefgh\r\n\r\ndata: abcdefghi\r\n\r\ndata: z\r\n\r\n";
        for max in 10..=24 {
            let want = run(&mut SseParser::with_max_event_bytes(max), &[input]);
            for cut in 0..=input.len() {
                let (a, b) = input.split_at(cut);
                let mut p = SseParser::with_max_event_bytes(max);
                assert_eq!(run(&mut p, &[a, b]), want, "max {max} cut {cut}");
            }
        }
    }

    #[test]
    fn five_megabytes_in_many_chunk_sizes_is_linear() {
        let event = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n", "y".repeat(200));
        let count = 5 * 1024 * 1024 / event.len();
        let input = event.repeat(count);
        for size in [1, 7, 1000, 65536] {
            let mut p = SseParser::new();
            let mut seen = 0;
            let mut raw_len = 0;
            for chunk in input.as_bytes().chunks(size) {
                for e in p.feed(chunk) {
                    seen += 1;
                    raw_len += e.raw.len();
                }
            }
            assert_eq!(seen, count, "size {size}");
            assert_eq!(raw_len, input.len());
        }
        // One 4 MB line in 1-byte chunks: rescanning the buffer per feed would never finish.
        let line = format!("data: {}\n\n", "z".repeat(4 * 1024 * 1024));
        let mut p = SseParser::with_max_event_bytes(8 * 1024 * 1024);
        let mut events = Vec::new();
        for chunk in line.as_bytes().chunks(1) {
            events.extend(p.feed(chunk));
        }
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data.len(), 4 * 1024 * 1024);
    }

    #[test]
    fn to_bytes_and_data_event() {
        let e = SseEvent {
            event: Some("update".into()),
            data: "a\nb".into(),
            id: Some("7".into()),
            retry: Some(100),
            raw: Vec::new(),
        };
        assert_eq!(e.to_bytes(), b"event: update\nid: 7\nretry: 100\ndata: a\ndata: b\n\n");
        let (back, _) = one_shot(&e.to_bytes());
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].event.clone(), back[0].data.clone(), back[0].id.clone(), back[0].retry),
            (e.event, e.data, e.id, e.retry)
        );

        let d = SseEvent::data_event("x\r\ny\rz");
        assert_eq!(d.data, "x\ny\nz");
        assert_eq!(d.raw, b"data: x\ndata: y\ndata: z\n\n");
        assert_eq!(SseEvent::data_event("").to_bytes(), b"data: \n\n");
        assert_eq!(SseEvent::data_event(" lead").to_bytes(), b"data:  lead\n\n");
        assert_eq!(one_shot(&SseEvent::data_event(" lead").raw).0[0].data, " lead");

        let odd = SseEvent { event: Some("a\nb".into()), data: "d".into(), ..SseEvent::default() };
        assert_eq!(odd.to_bytes(), b"event: ab\ndata: d\n\n");
    }

    #[test]
    fn is_done_table() {
        for (data, want) in [("[DONE]", true), (" [DONE] ", true), ("[done]", false), ("{}", false), ("", false)] {
            assert_eq!(SseEvent::data_event(data).is_done(), want, "{data:?}");
        }
    }
}
