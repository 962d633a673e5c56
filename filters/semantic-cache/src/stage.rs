//! The semantic-cache stage: answers a chat completion from the cache, or lets it through and
//! stores the provider's answer once it is complete.
//!
//! Request (chat completions only): the key is the request's key text (last user message by
//! default), model and scope (route + model + tenant). The **exact tier** (shared data, one
//! host call) is looked up first; only on an exact miss the **semantic tier** embeds the key
//! text (callout to the embeddings cluster) and queries the vector store within the scope
//! (callout to the store cluster; the collection is opened once per VM). A hit is answered
//! with a local reply (JSON, or SSE for `stream: true`) and `x.served_locally`; nothing goes
//! upstream, later stages (token budget, usage) never see the request. Every callout path
//! resumes or replies: an error or timeout forwards uncached (`failure_mode: allow`, the
//! default) or answers 503 (`deny`).
//!
//! Response: never held. At its end, a complete 2xx answer (`finish_reason: stop`, text only)
//! is written to the exact tier at once (shared data, in this callback) and handed to the root
//! context through a shared queue for the semantic tier: the HTTP context's callouts die with
//! the stream, so the root context upserts the entry (vector computed during the lookup) and
//! the client is never delayed. Streams are stored from the text the pipeline assembled.

use crate::answer::Answer;
use crate::config::{Config, Semantic};
use crate::embeddings::parse_embedding;
use crate::exact;
use crate::key::{key_text, skip_reason, CacheKey, Skip};
use crate::store::{Filter, Item, Match, StoreError, VectorStore};
use serde_json::{json, Map, Value};
use sluice_core::api::{self, Api};
use sluice_core::config::FailureMode;
use sluice_core::errors::LocalReply;
use sluice_core::exchange::{BodyKind, BodyUse, Chunk, Exchange, ResponseUse};
use sluice_core::host::Host;
use sluice_core::keys;
use sluice_core::metrics::Metrics;
use sluice_core::stage::{CalloutResponse, Flow, Plugin, Stage};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// Counter: hits, `sluice_phase` = `exact` | `semantic`.
pub const HITS: &str = "sluice_cache_hits";
/// Counter: lookups that found nothing.
pub const MISSES: &str = "sluice_cache_misses";
/// Counter: requests not looked up, `sluice_reason` = why.
pub const SKIPS: &str = "sluice_cache_skips";
/// Counter: embeddings / store failures, `sluice_reason` = `embeddings` | `store` | `queue`.
pub const ERRORS: &str = "sluice_cache_errors";
/// Counter: tokens a hit did not spend, `gen_ai_token_type` = `input` | `output`.
pub const SAVED_TOKENS: &str = "sluice_cache_saved_tokens";
/// Histogram: lookup time in microseconds, `sluice_phase` = the tier that decided.
pub const LOOKUP_US: &str = "sluice_cache_lookup_us";
/// Counter: entries written, `sluice_phase` = `exact` | `semantic`.
pub const STORES: &str = "sluice_cache_stores";

/// Most distinct metric names (all labels are bounded).
const MAX_METRIC_NAMES: usize = 64;
/// Store jobs held while the collection is being opened.
const MAX_WAITING_JOBS: usize = 1024;
/// Jobs upserted in one store call.
const BATCH: usize = 64;

/// What the root context is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootCall {
    Open,
    Upsert(usize),
    Cleanup,
}

/// One entry to put in the semantic tier (built by a stage, upserted by the root).
#[derive(Debug, Clone, PartialEq)]
pub struct StoreJob {
    /// The exact key (the item id).
    pub id: String,
    /// The key text's vector.
    pub vector: Vec<f32>,
    /// The answer record.
    pub document: String,
    /// Scope hash.
    pub scope: String,
    /// Expiry, ms since the epoch.
    pub expires_ms: u64,
}

impl StoreJob {
    /// Queue item form. The vector travels as hex of its little-endian `f32`s: exact, and
    /// far cheaper in wasm than printing and parsing a thousand JSON floats.
    pub fn encode(&self) -> Vec<u8> {
        let mut hex = String::with_capacity(self.vector.len() * 8);
        for f in &self.vector {
            for b in f.to_le_bytes() {
                for nibble in [b >> 4, b & 0xf] {
                    hex.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                }
            }
        }
        json!({"id": self.id, "vector": hex, "document": self.document, "scope": self.scope, "exp": self.expires_ms})
            .to_string()
            .into_bytes()
    }

    /// Parse [`StoreJob::encode`].
    pub fn decode(b: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(b).ok()?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let hex = v.get("vector")?.as_str()?.as_bytes();
        if hex.is_empty() || hex.len() % 8 != 0 {
            return None;
        }
        let nibble = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
        let mut vector = Vec::with_capacity(hex.len() / 8);
        for word in hex.chunks_exact(8) {
            let mut bytes = [0u8; 4];
            for (i, pair) in word.chunks_exact(2).enumerate() {
                let (hi, lo) = (nibble(*pair.first()?)?, nibble(*pair.get(1)?)?);
                *bytes.get_mut(i)? = (hi << 4) | lo;
            }
            vector.push(f32::from_le_bytes(bytes));
        }
        Some(Self {
            id: s("id")?,
            vector,
            document: s("document")?,
            scope: s("scope")?,
            expires_ms: v.get("exp")?.as_u64()?,
        })
    }

    fn item(self) -> Item {
        let mut metadata = Map::new();
        metadata.insert("scope".into(), Value::String(self.scope));
        metadata.insert("exp".into(), Value::from(i64::try_from(self.expires_ms).unwrap_or(i64::MAX)));
        Item { id: self.id, vector: self.vector, document: self.document, metadata }
    }
}

/// Per-VM state (one per worker).
#[derive(Debug, Default)]
struct VmState {
    /// The semantic tier's collection id, once known.
    collection: Option<String>,
    /// The queue this VM's root consumes (registered in `on_start`).
    queue: Option<u32>,
    /// The queue stages enqueue to (resolved once).
    queue_out: Option<u32>,
    root_calls: Vec<(u32, RootCall)>,
    waiting: Vec<StoreJob>,
}

/// The configured filter (one per VM).
pub struct CachePlugin {
    cfg: Rc<Config>,
    vm: Rc<RefCell<VmState>>,
    metrics: Rc<Metrics>,
}

fn now_ms(h: &dyn Host) -> u64 {
    h.now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `0.070` for 0.07: three decimals without float formatting (which costs ~20 KiB of wasm).
pub fn thousandths(d: f32) -> String {
    let m = (d.clamp(0.0, 2.0) * 1000.0).round() as u32;
    format!("{}.{:03}", m / 1000, m % 1000)
}

fn micros_since(h: &dyn Host, from: SystemTime) -> u64 {
    h.now().duration_since(from).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl CachePlugin {
    /// A plugin for `cfg`.
    pub fn new(cfg: Config) -> Self {
        Self { cfg: Rc::new(cfg), vm: Rc::default(), metrics: Rc::new(Metrics::new(MAX_METRIC_NAMES)) }
    }

    fn queue_name(&self) -> String {
        format!("sluice.semantic_cache.{}", self.cfg.namespace)
    }

    fn semantic(&self) -> Option<&Semantic> {
        self.cfg.semantic.as_ref()
    }

    /// Upsert jobs (or hold them until the collection is open).
    fn flush(&self, h: &mut dyn Host, mut jobs: Vec<StoreJob>) {
        let Some(sem) = self.semantic() else { return };
        let Ok(mut vm) = self.vm.try_borrow_mut() else {
            log::error!("{} #root: per-VM state busy; {} store jobs dropped", crate::NAME, jobs.len());
            return;
        };
        if vm.collection.is_none() {
            vm.collection = shared_collection(h, &self.cfg.namespace);
        }
        let Some(id) = vm.collection.clone() else {
            let room = MAX_WAITING_JOBS.saturating_sub(vm.waiting.len());
            if jobs.len() > room {
                let dropped = jobs.len() - room;
                jobs.truncate(room);
                log::warn!("{} #root: {dropped} store jobs dropped (collection not open yet)", crate::NAME);
                self.metrics.count(h, ERRORS, &[("sluice_reason", "queue")], dropped as u64);
            }
            vm.waiting.extend(jobs);
            if !vm.root_calls.iter().any(|(_, c)| *c == RootCall::Open) {
                let call = sem.store.open_collection(&sem.collection, true);
                match sem.store.upstream().dispatch(h, &call) {
                    Some(t) => vm.root_calls.push((t, RootCall::Open)),
                    None => log::warn!(
                        "{} #root: opening collection not dispatched (cluster {:?})",
                        crate::NAME,
                        sem.store.upstream.cluster
                    ),
                }
            }
            return;
        };
        jobs.extend(std::mem::take(&mut vm.waiting));
        while !jobs.is_empty() {
            let rest = jobs.split_off(jobs.len().min(BATCH));
            let n = jobs.len();
            let items: Vec<Item> = std::mem::replace(&mut jobs, rest).into_iter().map(StoreJob::item).collect();
            let call = sem.store.upsert(&id, &items);
            match sem.store.upstream().dispatch(h, &call) {
                Some(t) => vm.root_calls.push((t, RootCall::Upsert(n))),
                None => {
                    log::warn!("{} #root: store upsert not dispatched", crate::NAME);
                    self.metrics.count(h, ERRORS, &[("sluice_reason", "store")], n as u64);
                }
            }
        }
    }
}

fn collection_key(ns: &str) -> String {
    format!("sluice.semantic_cache.{ns}.collection")
}

fn shared_collection(h: &dyn Host, ns: &str) -> Option<String> {
    h.shared_data(&collection_key(ns)).0.map(|v| sluice_core::json::lossy(&v)).filter(|s| !s.is_empty())
}

fn remember_collection(h: &mut dyn Host, vm: &RefCell<VmState>, ns: &str, id: Option<&str>) {
    if let Ok(mut vm) = vm.try_borrow_mut() {
        vm.collection = id.map(str::to_string);
    }
    // An empty value reads as absent: that is how a stale id is forgotten by every worker.
    let _ = h.set_shared_data(&collection_key(ns), id.unwrap_or_default().as_bytes(), None);
}

impl Plugin for CachePlugin {
    fn name(&self) -> &'static str {
        crate::NAME
    }

    fn stage(&self) -> Box<dyn Stage> {
        Box::new(CacheStage {
            cfg: Rc::clone(&self.cfg),
            vm: Rc::clone(&self.vm),
            metrics: Rc::clone(&self.metrics),
            active: false,
            lookup: true,
            store: false,
            store_semantic: true,
            step: Step::Idle,
            key: None,
            vector: None,
            stream: false,
            include_usage: false,
            started: None,
            outcome: None,
            finish_reason: None,
        })
    }

    fn body_limit(&self) -> Option<usize> {
        Some(self.cfg.max_request_body_bytes)
    }

    fn holds_headers(&self) -> bool {
        true // a hit answers instead of forwarding: nothing may go upstream before the decision
    }

    fn tick_period(&self) -> Option<Duration> {
        self.semantic().and_then(|s| s.cleanup_interval).map(|d| d.min(Duration::from_secs(60)))
    }

    fn on_start(&self, h: &mut dyn Host) {
        if self.semantic().is_none() {
            return;
        }
        let q = h.register_queue(&self.queue_name());
        if q.is_none() {
            log::error!(
                "{} #root: registering queue {:?} failed; the semantic tier will not store",
                crate::NAME,
                self.queue_name()
            );
        }
        if let Ok(mut vm) = self.vm.try_borrow_mut() {
            vm.queue = q;
        }
    }

    fn on_tick(&self, h: &mut dyn Host) {
        let Some(sem) = self.semantic() else { return };
        let Some(interval) = sem.cleanup_interval else { return };
        let now = now_ms(h);
        let id = match self.vm.try_borrow() {
            Ok(vm) => vm.collection.clone(),
            Err(_) => return,
        }
        .or_else(|| shared_collection(h, &self.cfg.namespace));
        let Some(id) = id else { return };
        // One cleanup per interval across workers: whoever wins the CAS sends it.
        let key = format!("sluice.semantic_cache.{}.cleanup", self.cfg.namespace);
        let (last, cas) = h.shared_data(&key);
        let last: u64 = last.and_then(|v| sluice_core::json::lossy(&v).parse().ok()).unwrap_or(0);
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(last) < interval_ms || h.set_shared_data(&key, now.to_string().as_bytes(), cas).is_err() {
            return;
        }
        let call = sem.store.delete_below(&id, "exp", i64::try_from(now).unwrap_or(i64::MAX));
        if let Some(t) = sem.store.upstream().dispatch(h, &call) {
            if let Ok(mut vm) = self.vm.try_borrow_mut() {
                vm.root_calls.push((t, RootCall::Cleanup));
            }
        }
    }

    fn on_queue_ready(&self, h: &mut dyn Host, queue: u32) {
        let mine = self.vm.try_borrow().ok().and_then(|vm| vm.queue) == Some(queue);
        if !mine {
            return;
        }
        let mut jobs = Vec::new();
        while let Some(item) = h.dequeue(queue) {
            match StoreJob::decode(&item) {
                Some(j) => jobs.push(j),
                None => log::warn!("{} #root: undecodable store job dropped", crate::NAME),
            }
            if jobs.len() >= MAX_WAITING_JOBS {
                break;
            }
        }
        if !jobs.is_empty() {
            self.flush(h, jobs);
        }
    }

    fn on_root_callout(&self, h: &mut dyn Host, r: &CalloutResponse) -> bool {
        let Some(sem) = self.semantic() else { return false };
        let call = {
            let Ok(mut vm) = self.vm.try_borrow_mut() else { return false };
            let Some(pos) = vm.root_calls.iter().position(|(t, _)| *t == r.token) else { return false };
            vm.root_calls.swap_remove(pos).1
        };
        let body = r.body.as_deref();
        match call {
            RootCall::Open => match sem.store.parse_collection(r.status, body) {
                Ok(id) => {
                    remember_collection(h, &self.vm, &self.cfg.namespace, Some(&id));
                    self.flush(h, Vec::new());
                }
                Err(e) => {
                    let n = self.vm.try_borrow_mut().map(|mut vm| std::mem::take(&mut vm.waiting).len()).unwrap_or(0);
                    log::warn!(
                        "{} #root: opening collection {:?}: {e}; {n} entries not stored",
                        crate::NAME,
                        sem.collection
                    );
                    self.metrics.count(h, ERRORS, &[("sluice_reason", "store")], n as u64);
                }
            },
            RootCall::Upsert(n) => match sem.store.parse_write(r.status, body) {
                Ok(()) => self.metrics.count(h, STORES, &[("sluice_phase", "semantic")], n as u64),
                Err(e) => {
                    log::warn!("{} #root: storing {n} entries: {e}", crate::NAME);
                    if e == StoreError::NoCollection {
                        remember_collection(h, &self.vm, &self.cfg.namespace, None);
                    }
                    self.metrics.count(h, ERRORS, &[("sluice_reason", "store")], n as u64);
                }
            },
            RootCall::Cleanup => {
                if let Err(e) = sem.store.parse_write(r.status, body) {
                    log::warn!("{} #root: deleting expired entries: {e}", crate::NAME);
                }
            }
        }
        true
    }
}

/// Where a lookup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Idle,
    Embedding,
    Opening,
    Querying,
}

/// One request.
pub struct CacheStage {
    cfg: Rc<Config>,
    vm: Rc<RefCell<VmState>>,
    metrics: Rc<Metrics>,
    /// A chat completion this stage handles.
    active: bool,
    /// Look up (false: `cache-control: no-cache`).
    lookup: bool,
    /// Store the answer at the end.
    store: bool,
    /// Also put it in the semantic tier (false after a store/embeddings failure).
    store_semantic: bool,
    step: Step,
    key: Option<CacheKey>,
    vector: Option<Vec<f32>>,
    stream: bool,
    include_usage: bool,
    started: Option<SystemTime>,
    /// The `sluice.cache` value once decided.
    outcome: Option<String>,
    /// A stream's `finish_reason`.
    finish_reason: Option<String>,
}

impl CacheStage {
    fn decide(&mut self, h: &mut dyn Host, outcome: String) {
        keys::set_filter_state(h, keys::CACHE, &outcome);
        self.outcome = Some(outcome);
    }

    fn skip(&mut self, h: &mut dyn Host, why: Skip) -> Flow {
        self.active = false;
        self.store = false;
        self.metrics.count(h, SKIPS, &[("sluice_reason", why.as_str())], 1);
        self.decide(h, format!("skip:{}", why.as_str()));
        Flow::Continue
    }

    fn latency(&self, h: &mut dyn Host, phase: &str) {
        if let Some(t) = self.started {
            let us = micros_since(h, t);
            self.metrics.record(h, LOOKUP_US, &[("sluice_phase", phase)], us);
        }
    }

    fn miss(&mut self, x: &Exchange, h: &mut dyn Host) -> Flow {
        log::debug!("{} #{}: miss", crate::NAME, x.id);
        self.latency(h, if self.step == Step::Idle { "exact" } else { "semantic" });
        self.step = Step::Idle;
        self.metrics.count(h, MISSES, &[], 1);
        self.decide(h, "miss".into());
        Flow::Continue
    }

    /// The embeddings endpoint or the store failed: forward uncached or answer 503.
    fn fail(&mut self, x: &mut Exchange, h: &mut dyn Host, what: &str, why: &str) -> Flow {
        log::warn!(
            "{} #{}: {what} failed ({why}); {}",
            crate::NAME,
            x.id,
            match self.cfg.failure_mode {
                FailureMode::Allow => "forwarding without the semantic tier",
                FailureMode::Deny => "refusing (failure_mode deny)",
            }
        );
        self.step = Step::Idle;
        self.store_semantic = false;
        self.metrics.count(h, ERRORS, &[("sluice_reason", what)], 1);
        self.decide(h, format!("error:{what}"));
        match self.cfg.failure_mode {
            FailureMode::Allow => Flow::Continue,
            FailureMode::Deny => {
                self.store = false;
                Flow::Reply(
                    LocalReply::openai_error(
                        503,
                        "server_error",
                        "cache_unavailable",
                        &format!("{}: the cache's {what} is unavailable; try again later", crate::NAME),
                    )
                    .with_header("x-sluice-cache", "error"),
                )
            }
        }
    }

    fn hit(&mut self, x: &mut Exchange, h: &mut dyn Host, answer: &Answer, distance: Option<f32>) -> Flow {
        let Some(key) = self.key.clone() else { return Flow::Continue };
        let phase = if distance.is_some() { "semantic" } else { "exact" };
        self.latency(h, phase);
        self.step = Step::Idle;
        self.store = false;
        let created = now_ms(h) / 1000;
        let id = format!("chatcmpl-cache-{}", sluice_core::json::cut(&key.exact, 24));
        let (body, ctype) = if self.stream {
            (answer.chat_sse(&id, created, &key.model, self.include_usage), "text/event-stream")
        } else {
            (answer.chat_json(&id, created, &key.model), "application/json")
        };
        let (header, state) = match distance {
            Some(d) => {
                let d = thousandths(d);
                (format!("hit-semantic; distance={d}"), format!("hit_semantic:{d}"))
            }
            None => ("hit-exact".to_string(), "hit_exact".to_string()),
        };
        log::debug!("{} #{}: {header}", crate::NAME, x.id);
        self.metrics.count(h, HITS, &[("sluice_phase", phase)], 1);
        self.metrics.count(h, SAVED_TOKENS, &[("gen_ai_token_type", "input")], answer.input_tokens);
        self.metrics.count(h, SAVED_TOKENS, &[("gen_ai_token_type", "output")], answer.output_tokens);
        self.decide(h, state);
        x.served_locally = true;
        let mut reply = LocalReply { status: 200, headers: vec![("content-type".into(), ctype.into())], body };
        reply.headers.push(("x-sluice-cache".into(), header));
        if self.stream {
            reply.headers.push(("cache-control".into(), "no-cache".into()));
        }
        Flow::Reply(reply)
    }

    fn slot(&self, key: &CacheKey) -> String {
        exact::slot_key(&self.cfg.namespace, &key.exact, self.cfg.max_entries)
    }

    /// Ask the store for the nearest entry of this scope (opening the collection first when
    /// this VM does not know its id yet).
    fn query(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let cfg = Rc::clone(&self.cfg);
        let Some(sem) = cfg.semantic.as_ref() else { return self.miss(x, h) };
        let (Some(key), Some(vector)) = (self.key.as_ref(), self.vector.as_ref()) else { return self.miss(x, h) };
        let known = self.vm.try_borrow().ok().and_then(|vm| vm.collection.clone());
        let id = match known.or_else(|| shared_collection(h, &cfg.namespace)) {
            Some(id) => id,
            None => {
                let call = sem.store.open_collection(&sem.collection, true);
                return match sem.store.upstream().dispatch(h, &call) {
                    Some(t) => {
                        self.step = Step::Opening;
                        x.await_callout(t);
                        Flow::Wait
                    }
                    None => self.fail(x, h, "store", "callout not dispatched (unknown cluster?)"),
                };
            }
        };
        if let Ok(mut vm) = self.vm.try_borrow_mut() {
            vm.collection.get_or_insert_with(|| id.clone());
        }
        let filter = Filter {
            equals: vec![("scope".into(), Value::String(key.scope.clone()))],
            greater_than: vec![("exp".into(), i64::try_from(now_ms(h)).unwrap_or(i64::MAX))],
        };
        let call = sem.store.query(&id, vector, 1, &filter);
        match sem.store.upstream().dispatch(h, &call) {
            Some(t) => {
                self.step = Step::Querying;
                x.await_callout(t);
                Flow::Wait
            }
            None => self.fail(x, h, "store", "callout not dispatched (unknown cluster?)"),
        }
    }

    /// The nearest match, if it is close enough and decodes.
    fn best(&self, matches: &[Match], max_distance: f32, now: u64) -> Option<(Answer, f32, u64)> {
        let m = matches.first()?;
        if m.distance > max_distance {
            return None;
        }
        let exp = m.metadata.get("exp").and_then(Value::as_u64).unwrap_or(0);
        if exp <= now {
            return None;
        }
        Answer::decode(m.document.as_deref()?).map(|a| (a, m.distance.max(0.0), exp))
    }

    /// Write the answer: exact tier now, semantic tier through the root context.
    fn store_answer(&mut self, x: &Exchange, h: &mut dyn Host, answer: &Answer) {
        let Some(key) = self.key.clone() else { return };
        let record = answer.encode();
        if record.len() > self.cfg.max_entry_bytes {
            log::debug!("{} #{}: answer of {} bytes over max_entry_bytes; not cached", crate::NAME, x.id, record.len());
            self.metrics.count(h, SKIPS, &[("sluice_reason", "too_large")], 1);
            return;
        }
        let expires = now_ms(h).saturating_add(self.cfg.ttl_ms());
        if self.cfg.exact {
            match h.set_shared_data(&self.slot(&key), &exact::encode(&key.exact, expires, answer), None) {
                Ok(()) => self.metrics.count(h, STORES, &[("sluice_phase", "exact")], 1),
                Err(e) => log::warn!("{} #{}: exact tier write failed: {e:?}", crate::NAME, x.id),
            }
        }
        if self.cfg.semantic.is_none() || !self.store_semantic {
            return;
        }
        let Some(vector) = self.vector.take() else { return };
        let job =
            StoreJob { id: key.exact.clone(), vector, document: record, scope: key.scope.clone(), expires_ms: expires };
        let queue = {
            let Ok(mut vm) = self.vm.try_borrow_mut() else { return };
            if vm.queue_out.is_none() {
                vm.queue_out =
                    h.resolve_queue("", &format!("sluice.semantic_cache.{}", self.cfg.namespace)).or(vm.queue);
            }
            vm.queue_out
        };
        let queued = queue.is_some_and(|q| h.enqueue(q, &job.encode()));
        if !queued {
            log::warn!("{} #{}: store queue unavailable; entry kept in the exact tier only", crate::NAME, x.id);
            self.metrics.count(h, ERRORS, &[("sluice_reason", "queue")], 1);
        }
    }
}

impl Stage for CacheStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if x.request.method != "POST" || !x.request.api.is_model_call() {
            return Flow::Continue;
        }
        if x.request.api != Api::Chat {
            if x.request.api.generates() {
                return self.skip(h, Skip::Api);
            }
            return Flow::Continue;
        }
        if matches!(x.route.get("semantic_cache"), Some(Value::Bool(false)))
            || x.route.str("semantic_cache") == Some("false")
        {
            return self.skip(h, Skip::Route);
        }
        let cc = x.request.header_str("cache-control").unwrap_or_default().to_ascii_lowercase();
        let no_store = cc.contains("no-store");
        let no_cache = cc.contains("no-cache");
        if no_store && no_cache {
            return self.skip(h, Skip::Client);
        }
        self.lookup = !no_cache;
        self.store = !no_store;
        self.active = true;
        x.want_body(BodyUse::Json);
        x.want_response(ResponseUse::Track);
        Flow::Continue
    }

    fn on_request(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if !self.active || x.served_locally {
            return Flow::Continue;
        }
        self.started = Some(h.now());
        let api = x.request.api;
        let (text, shape, stream, include_usage) = match x.request.json() {
            Some(v) => (
                key_text(self.cfg.key_text, api, v),
                skip_reason(v, self.cfg.skip_nonzero_temperature),
                api::is_stream(v),
                api::asked_include_usage(v),
            ),
            None => return self.skip(h, Skip::Body),
        };
        if let Some(why) = shape {
            return self.skip(h, why);
        }
        let Some(model) = x.model() else { return self.skip(h, Skip::NoModel) };
        let identity = x.identity(h).cloned();
        let Some(tenant) = self.cfg.scope.tenant(identity.as_ref()) else { return self.skip(h, Skip::NoIdentity) };
        let Some(text) = text else { return self.skip(h, Skip::NoText) };
        let key = CacheKey::new(&x.route.name, &model, &tenant, &text);
        self.stream = stream;
        self.include_usage = include_usage;
        if !self.lookup {
            // cache-control: no-cache: answer from the provider, refresh the entry.
            self.metrics.count(h, SKIPS, &[("sluice_reason", "client")], 1);
            self.decide(h, "skip:client".into());
            if self.cfg.semantic.is_some() {
                // Without a lookup there is no vector: the entry goes to the exact tier only.
                self.store_semantic = false;
            }
            self.key = Some(key);
            return Flow::Continue;
        }
        if self.cfg.exact {
            let slot = exact::slot_key(&self.cfg.namespace, &key.exact, self.cfg.max_entries);
            if let Some(found) = h.shared_data(&slot).0.and_then(|v| exact::decode(&v, &key.exact, now_ms(h))) {
                self.key = Some(key);
                return self.hit(x, h, &found, None);
            }
        }
        let cfg = Rc::clone(&self.cfg);
        let Some(sem) = cfg.semantic.as_ref() else {
            self.key = Some(key);
            return self.miss(x, h);
        };
        let call = sem.embeddings.request(&key.text);
        self.key = Some(key);
        match sem.embeddings.upstream.dispatch(h, &call) {
            Some(t) => {
                self.step = Step::Embedding;
                x.await_callout(t);
                Flow::Wait
            }
            None => self.fail(x, h, "embeddings", "callout not dispatched (unknown cluster?)"),
        }
    }

    fn on_callout(&mut self, x: &mut Exchange, h: &mut dyn Host, r: CalloutResponse) -> Flow {
        let cfg = Rc::clone(&self.cfg);
        let Some(sem) = cfg.semantic.as_ref() else { return Flow::Continue };
        match self.step {
            Step::Idle => Flow::Continue,
            Step::Embedding => match parse_embedding(r.status, r.body.as_deref()) {
                Ok(v) => {
                    self.vector = Some(v);
                    self.query(x, h)
                }
                Err(e) => self.fail(x, h, "embeddings", &e.to_string()),
            },
            Step::Opening => match sem.store.parse_collection(r.status, r.body.as_deref()) {
                Ok(id) => {
                    remember_collection(h, &self.vm, &cfg.namespace, Some(&id));
                    self.query(x, h)
                }
                Err(e) => self.fail(x, h, "store", &e.to_string()),
            },
            Step::Querying => match sem.store.parse_query(r.status, r.body.as_deref()) {
                Ok(matches) => match self.best(&matches, sem.max_distance, now_ms(h)) {
                    Some((answer, distance, expires)) => {
                        if cfg.exact {
                            // The next identical prompt is answered from the exact tier.
                            if let Some(key) = &self.key {
                                let _ = h.set_shared_data(
                                    &self.slot(key),
                                    &exact::encode(&key.exact, expires, &answer),
                                    None,
                                );
                            }
                        }
                        self.hit(x, h, &answer, Some(distance))
                    }
                    None => self.miss(x, h),
                },
                Err(e) => {
                    if e == StoreError::NoCollection {
                        remember_collection(h, &self.vm, &cfg.namespace, None);
                    }
                    self.fail(x, h, "store", &e.to_string())
                }
            },
        }
    }

    fn on_response_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if !self.active || x.response.local {
            self.store = false;
            return Flow::Continue;
        }
        match self.outcome.as_deref() {
            Some("miss") => h.set_response_header("x-sluice-cache", Some(b"miss")),
            Some(o) if o.starts_with("error:") => h.set_response_header("x-sluice-cache", Some(b"error")),
            _ => {}
        }
        let kind_ok = if self.stream { x.response.kind == BodyKind::Sse } else { x.response.kind == BodyKind::Json };
        if !x.response.ok() || x.response.encoded || !kind_ok {
            self.store = false;
        }
        Flow::Continue
    }

    fn on_response_body(&mut self, x: &mut Exchange, h: &mut dyn Host, c: &mut Chunk) -> Flow {
        if !self.store || self.key.is_none() {
            return Flow::Continue;
        }
        if self.stream {
            for ev in &c.events {
                let reason =
                    ev.json.as_ref().and_then(|j| j.pointer("/choices/0/finish_reason")).and_then(Value::as_str);
                if let Some(r) = reason {
                    self.finish_reason = Some(r.to_string());
                }
            }
        }
        if !c.end {
            return Flow::Continue;
        }
        self.store = false;
        if !x.response.complete {
            return Flow::Continue;
        }
        let answer = if self.stream {
            let usage = x.usage(h);
            let s = x.response.stream.as_ref();
            match (s.and_then(|s| s.text()), s.is_some_and(|s| s.saw_done()), &self.finish_reason) {
                (Some(text), true, Some(finish)) => Some(Answer {
                    model: s.and_then(|s| s.response_model()).unwrap_or_default().to_string(),
                    text: text.to_string(),
                    finish_reason: finish.clone(),
                    input_tokens: usage.map_or(0, |u| u.input),
                    output_tokens: usage.map_or(0, |u| u.output),
                }),
                _ => None,
            }
        } else {
            x.response.json().and_then(Answer::from_chat_json)
        };
        match answer {
            Some(a) if a.storable() => self.store_answer(x, h, &a),
            _ => log::debug!("{} #{}: answer not storable (not a complete text answer)", crate::NAME, x.id),
        }
        Flow::Continue
    }
}

#[cfg(test)]
#[path = "stage_tests.rs"]
mod tests;
