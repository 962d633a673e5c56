//! The token-ratelimit plugin (per VM) and stage (per request) over the core pipeline.
//!
//! Request: the route's rule set is picked at the headers (route metadata, else
//! `default_rule_set`); when one applies the body is asked for and the response tracked.
//! Once the request is complete (`on_request`: end of stream or trailers) every rule reserves
//! its estimate in every window — in local shared data, or in the RLS with one
//! `ShouldRateLimit` call per distinct hit count — and the request is refused (429) when a
//! reservation does not fit.
//!
//! Response: when it ends, each reservation is replaced by what the exchange used, as the
//! pipeline tracks it for every format (`x.usage`: the provider's usage, the one another
//! filter published in `sluice.usage`, else an estimate from the prompt and the streamed
//! text). A stream that ends early (client reset, upstream reset) is settled at access-log
//! time the same way — charged, not released — unless the provider failed before producing
//! any output, which releases it. In shared mode the difference goes to the RLS as positive
//! hits, or as negative hits (`is_negative_hits`) when the service supports them.

use crate::budget::{counter_key, CounterKey, Reserved, Store, StoreError};
use crate::config::{Config, Counts, Mode, RlsConfig, Rule, Units};
use crate::limiter::{self, Estimate, Tightest};
use crate::rls::{self, Code, Descriptor};
use sluice_core::config::FailureMode;
use sluice_core::errors::LocalReply;
use sluice_core::exchange::{BodyKind, BodyUse, Chunk, Exchange, ResponseUse};
use sluice_core::host::Host;
use sluice_core::keys;
use sluice_core::metrics::Metrics;
use sluice_core::stage::{CalloutResponse, Flow, Plugin, Stage};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// Shared queue that carries RLS corrections of finished streams to a root context.
pub const QUEUE: &str = "sluice-trl-corrections";
/// Buckets the cleanup timer looks at per tick.
pub const SWEEP_PER_TICK: usize = 1024;

/// Per-VM state shared by the plugin and its stages (used without holding a borrow across
/// a host call).
pub struct Vm {
    metrics: Metrics,
    queue: Cell<Option<u32>>,
    root_calls: RefCell<Vec<(u32, bool)>>,
    cursor: Cell<usize>,
}

impl Vm {
    fn count(&self, h: &mut dyn Host, base: &str, action: &str) {
        self.metrics.count(h, base, &[("sluice_action", action)], 1);
    }

    fn store_stats(&self, h: &mut dyn Host, s: crate::budget::Stats) {
        if s.retries > 0 {
            self.metrics.count(h, "sluice_ratelimit_cas_retries", &[], s.retries);
        }
        if s.writes > 0 {
            self.metrics.count(h, "sluice_ratelimit_counter_writes", &[], s.writes);
        }
        if s.live_delta != 0 {
            self.metrics.gauge(h, "sluice_ratelimit_counters", &[], s.live_delta);
        }
    }
}

/// The configured filter.
pub struct RateLimitPlugin {
    cfg: Rc<Config>,
    vm: Rc<Vm>,
}

impl RateLimitPlugin {
    /// A plugin for `cfg`.
    pub fn new(cfg: Config) -> Self {
        let vm = Vm {
            metrics: Metrics::new(32),
            queue: Cell::new(None),
            root_calls: RefCell::new(Vec::new()),
            cursor: Cell::new(0),
        };
        Self { cfg: Rc::new(cfg), vm: Rc::new(vm) }
    }

    fn rls(&self) -> Option<&RlsConfig> {
        match &self.cfg.mode {
            Mode::Rls(r) => Some(r),
            Mode::Local => None,
        }
    }
}

fn now_ms(h: &dyn Host) -> u64 {
    h.now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Plugin for RateLimitPlugin {
    fn name(&self) -> &'static str {
        crate::NAME
    }

    fn stage(&self) -> Box<dyn Stage> {
        Box::new(RateLimitStage::new(Rc::clone(&self.cfg), Rc::clone(&self.vm)))
    }

    fn body_limit(&self) -> Option<usize> {
        Some(self.cfg.max_body_bytes)
    }

    fn tick_period(&self) -> Option<Duration> {
        match self.cfg.mode {
            Mode::Local => Some(self.cfg.cleanup_interval),
            Mode::Rls(_) => None,
        }
    }

    fn on_start(&self, h: &mut dyn Host) {
        if self.rls().is_some() {
            let q = h.register_queue(QUEUE);
            if q.is_none() {
                log::warn!(
                    "{}: cannot register queue {QUEUE}: corrections of reset streams go from the stream",
                    crate::NAME
                );
            }
            self.vm.queue.set(q);
        }
    }

    fn on_tick(&self, h: &mut dyn Host) {
        if self.cfg.mode != Mode::Local {
            return;
        }
        let now = now_ms(h);
        let mut store = Store::new(h, self.cfg.cas_retries, self.cfg.max_counters);
        let (next, reclaimed) = store.sweep(self.vm.cursor.get(), SWEEP_PER_TICK, now);
        let stats = store.stats;
        self.vm.cursor.set(next);
        self.vm.store_stats(h, stats);
        if reclaimed > 0 {
            log::debug!("{}: reclaimed {reclaimed} expired counters", crate::NAME);
        }
    }

    fn on_queue_ready(&self, h: &mut dyn Host, queue: u32) {
        let (Some(rls), true) = (self.rls(), self.vm.queue.get() == Some(queue)) else { return };
        while let Some(item) = h.dequeue(queue) {
            // One byte says whether the call returns hits, the rest is the request.
            let (negative, bytes) = match item.split_first() {
                Some((flag, rest)) => (*flag == b'-', rest),
                None => continue,
            };
            match h.dispatch_grpc_call(&rls.cluster, rls::SERVICE, rls::METHOD, bytes, rls.timeout) {
                Some(token) => match self.vm.root_calls.try_borrow_mut() {
                    Ok(mut calls) => calls.push((token, negative)),
                    Err(_) => log::error!("{}: busy root-call list; answer of call {token} not tracked", crate::NAME),
                },
                None => log::warn!("{}: RLS correction not sent: dispatch to {} failed", crate::NAME, rls.cluster),
            }
        }
    }

    fn on_root_callout(&self, h: &mut dyn Host, r: &CalloutResponse) -> bool {
        let ours = match self.vm.root_calls.try_borrow_mut() {
            Ok(mut calls) => calls.iter().position(|(t, _)| *t == r.token).map(|i| calls.swap_remove(i).1),
            Err(_) => None,
        };
        if let Some(negative) = ours {
            note_correction_answer(&self.vm, h, r, negative);
        }
        ours.is_some()
    }
}

/// Log what a correction's answer says (it changes nothing for the request).
fn note_correction_answer(vm: &Vm, h: &mut dyn Host, r: &CalloutResponse, negative: bool) {
    if !r.ok() {
        log::warn!("{}: RLS correction failed (gRPC status {:?})", crate::NAME, r.grpc_status);
        vm.count(h, "sluice_ratelimit_corrections", "failed");
        return;
    }
    let over = r.body.as_deref().and_then(rls::decode_response).is_some_and(|resp| resp.overall == Code::OverLimit);
    if over && negative {
        // A refund is never over the limit where negative hits exist: this service counted it.
        log::warn!(
            "{}: the RLS answered a refund (is_negative_hits) with OVER_LIMIT: it does not support negative hits \
             and counts refunds as hits; set rls.negative_hits: false",
            crate::NAME
        );
        vm.count(h, "sluice_ratelimit_corrections", "refund_counted");
        return;
    }
    vm.count(h, "sluice_ratelimit_corrections", if negative { "refund" } else { "add" });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No rules apply.
    Off,
    /// Waiting for the complete request.
    Body,
    /// Waiting for the RLS answer.
    Rls,
    /// Admitted with reservations outstanding.
    Reserved,
    /// Admitted without reservations (failure mode allow, or no rules).
    Unmetered,
    /// This stage replied.
    Replied,
    /// Reservations settled.
    Settled,
}

/// One rule's reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Charge {
    rule: usize,
    /// Key values (RLS descriptors).
    values: Vec<String>,
    /// Local: the counter.
    key: Option<CounterKey>,
    /// Window starts the reservation went into.
    starts: Vec<u64>,
    /// Units reserved.
    amount: u64,
}

/// One `ShouldRateLimit` call: descriptors that share one hit count.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    hits: u64,
    negative: bool,
    descriptors: Vec<Descriptor>,
    /// (rule, window) of each descriptor.
    slots: Vec<(usize, usize)>,
}

impl Call {
    fn encode(&self, domain: &str) -> Vec<u8> {
        rls::encode_request(domain, self.hits, &self.descriptors)
    }

    fn refund(&self) -> Self {
        let descriptors = self.descriptors.iter().map(|d| Descriptor { negative: true, ..d.clone() }).collect();
        Self { negative: true, descriptors, ..self.clone() }
    }
}

/// Group descriptors by (hits, negative), in order of first appearance.
fn group(items: Vec<(Descriptor, (usize, usize))>) -> Vec<Call> {
    let mut calls: Vec<Call> = Vec::new();
    for (d, slot) in items {
        match calls.iter_mut().find(|c| c.hits == d.hits && c.negative == d.negative) {
            Some(c) => {
                c.descriptors.push(d);
                c.slots.push(slot);
            }
            None => calls.push(Call { hits: d.hits, negative: d.negative, descriptors: vec![d], slots: vec![slot] }),
        }
    }
    calls
}

/// What the exchange is charged when it ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Nothing: the provider failed before producing output, or another stage answered.
    Release,
    /// The reservation stands: the answer could not be read.
    Keep,
    /// These units (`reconciled`: reported; `estimated`: from the text seen).
    Usage { units: Units, action: &'static str },
}

/// Waiting for an RLS answer: admission, or a correction holding the end of the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    Admission,
    Correction,
}

/// One request.
pub struct RateLimitStage {
    cfg: Rc<Config>,
    vm: Rc<Vm>,
    set: String,
    phase: Phase,
    est: Estimate,
    charges: Vec<Charge>,
    tokens: Option<Tightest>,
    requests: Option<Tightest>,
    cost: Option<Tightest>,
    /// RLS calls still to make (admission or corrections), in order.
    calls: Vec<Call>,
    /// Admission calls the RLS counted.
    counted: Vec<Call>,
    awaiting: Option<Awaiting>,
    /// The call the RLS is answering.
    current: Option<Call>,
    shadow_hit: Option<(usize, usize)>,
}

impl RateLimitStage {
    fn new(cfg: Rc<Config>, vm: Rc<Vm>) -> Self {
        Self {
            cfg,
            vm,
            set: String::new(),
            phase: Phase::Off,
            est: Estimate::default(),
            charges: Vec::new(),
            tokens: None,
            requests: None,
            cost: None,
            calls: Vec::new(),
            counted: Vec::new(),
            awaiting: None,
            current: None,
            shadow_hit: None,
        }
    }

    /// The config, held outside `self` while `self` changes.
    fn config(&self) -> Rc<Config> {
        Rc::clone(&self.cfg)
    }

    fn rls(&self) -> Option<RlsConfig> {
        match &self.cfg.mode {
            Mode::Rls(r) => Some(r.clone()),
            Mode::Local => None,
        }
    }

    fn note(&mut self, rule: &Rule, limit: u64, remaining: u64, reset_ms: u64) {
        let slot = match rule.counts.unit() {
            "requests" => &mut self.requests,
            "cost" => &mut self.cost,
            _ => &mut self.tokens,
        };
        limiter::note_window(slot, limit, remaining, reset_ms);
    }

    fn decided(&self, h: &mut dyn Host, state: &str, action: &str) {
        keys::set_filter_state(h, keys::RATELIMIT, state);
        self.vm.count(h, "sluice_ratelimit_requests", action);
    }

    /// Counting failed: the failure mode decides.
    fn fail(&mut self, x: &Exchange, h: &mut dyn Host, why: &str) -> Flow {
        log::warn!("{} #{}: cannot count ({why}); failure mode {:?}", crate::NAME, x.id, self.cfg.failure_mode);
        self.decided(h, &format!("error:{why}"), "error");
        self.charges.clear();
        self.refund_counted(h);
        match self.cfg.failure_mode {
            FailureMode::Allow => {
                self.phase = Phase::Unmetered;
                Flow::Continue
            }
            FailureMode::Deny => {
                self.phase = Phase::Replied;
                Flow::Reply(limiter::unavailable(why))
            }
        }
    }

    fn refuse(
        &mut self,
        h: &mut dyn Host,
        rule: &Rule,
        wi: usize,
        remaining: u64,
        reset_ms: u64,
        need: Option<(u64, u64)>,
    ) -> Flow {
        let Some(w) = rule.windows.get(wi) else { return Flow::Reply(LocalReply::internal(crate::NAME)) };
        self.decided(h, &format!("refused:{}/{}", rule.name, w.name), "deny");
        self.phase = Phase::Replied;
        Flow::Reply(limiter::refusal(rule, w, remaining, reset_ms, need, &self.cfg.prices))
    }

    fn admit(&mut self, h: &mut dyn Host) -> Flow {
        let cfg = self.config();
        let rules = cfg.rule_set(&self.set).unwrap_or_default();
        match self.shadow_hit {
            Some((ri, wi)) => {
                let rule = rules.get(ri);
                let name = rule.map(|r| r.name.as_str()).unwrap_or_default();
                let window = rule.and_then(|r| r.windows.get(wi)).map(|w| w.name.as_str()).unwrap_or_default();
                log::info!("{}: shadow: would refuse rule {name:?} window {window}", crate::NAME);
                self.decided(h, &format!("shadow:{name}/{window}"), "shadow");
            }
            None => self.decided(h, "ok", "allow"),
        }
        self.phase = if self.charges.is_empty() { Phase::Unmetered } else { Phase::Reserved };
        Flow::Continue
    }

    // ----- admission -------------------------------------------------------------------------

    fn decide(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        self.est = limiter::estimate(&self.cfg, x);
        let cfg = self.config();
        let rules = cfg.rule_set(&self.set).unwrap_or_default();
        if !self.est.priced && cfg.unpriced == FailureMode::Deny && rules.iter().any(|r| r.counts == Counts::Cost) {
            let model = x.model().unwrap_or_default();
            self.decided(h, "refused:unpriced", "deny");
            self.phase = Phase::Replied;
            return Flow::Reply(limiter::unpriced(&model));
        }
        let now = now_ms(h);
        self.charges = rules
            .iter()
            .enumerate()
            .map(|(ri, rule)| Charge {
                rule: ri,
                values: limiter::key_values(&cfg, rule, x, h),
                key: None,
                starts: rule.windows.iter().map(|w| w.start(now)).collect(),
                amount: rule.counts.amount(&self.est.units),
            })
            .collect();
        match self.rls() {
            None => self.reserve_local(x, h, rules, now),
            Some(rls) => {
                let mut items = Vec::new();
                for c in &self.charges {
                    let Some(rule) = rules.get(c.rule) else { continue };
                    for (wi, w) in rule.windows.iter().enumerate() {
                        items.push((self.descriptor(rule, &c.values, w, c.amount, false), (c.rule, wi)));
                    }
                }
                self.calls = group(items);
                self.calls.reverse(); // popped from the end
                self.phase = Phase::Rls;
                self.send_next(x, h, &rls, Awaiting::Admission)
            }
        }
    }

    fn descriptor(
        &self,
        rule: &Rule,
        values: &[String],
        w: &crate::config::Window,
        hits: u64,
        negative: bool,
    ) -> Descriptor {
        let mut entries =
            vec![("rule".to_string(), format!("{}.{}", self.set, rule.name)), ("window".to_string(), w.name.clone())];
        for (part, v) in rule.key.iter().zip(values) {
            entries.push((part.name(), v.clone()));
        }
        Descriptor { entries, limit: u32::try_from(w.limit).unwrap_or(u32::MAX), unit: w.unit_number(), hits, negative }
    }

    fn reserve_local(&mut self, x: &mut Exchange, h: &mut dyn Host, rules: &[Rule], now: u64) -> Flow {
        let shadow = self.cfg.shadow;
        let mut failure: Option<StoreError> = None;
        let mut refused: Option<(usize, usize, u64, u64)> = None;
        let mut notes: Vec<(usize, u64, u64, u64)> = Vec::new();
        let mut store = Store::new(h, self.cfg.cas_retries, self.cfg.max_counters);
        let buckets = store.buckets();
        let mut done = 0;
        for c in &mut self.charges {
            let Some(rule) = rules.get(c.rule) else { continue };
            let key = counter_key(&self.set, &rule.name, &c.values, buckets);
            match store.reserve(&key, &rule.windows, c.amount, now, shadow) {
                Ok(Reserved::Fits { starts, used }) => {
                    for (w, u) in rule.windows.iter().zip(&used) {
                        notes.push((c.rule, w.limit, w.limit.saturating_sub(*u), w.ms_to_reset(now)));
                    }
                    c.starts = starts;
                    c.key = Some(key);
                }
                Ok(Reserved::Over { window, starts: Some(starts), .. }) => {
                    self.shadow_hit.get_or_insert((c.rule, window));
                    c.starts = starts;
                    c.key = Some(key);
                }
                Ok(Reserved::Over { window, used, starts: None }) => {
                    refused = Some((c.rule, window, used, c.amount));
                    break;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            done += 1;
        }
        if refused.is_some() || failure.is_some() {
            // Roll back what the earlier rules reserved.
            for c in self.charges.iter().take(done) {
                let (Some(rule), Some(key)) = (rules.get(c.rule), c.key.as_ref()) else { continue };
                let delta = -i64::try_from(c.amount).unwrap_or(i64::MAX);
                if let Err(e) = store.adjust(key, &rule.windows, &c.starts, delta) {
                    log::warn!("{} #{}: rollback of {} failed: {e}", crate::NAME, x.id, key.id);
                }
            }
            self.charges.clear();
        }
        let stats = store.stats;
        self.vm.store_stats(h, stats);
        for (ri, limit, remaining, reset) in notes {
            if let Some(rule) = rules.get(ri) {
                self.note(rule, limit, remaining, reset);
            }
        }
        if let Some(e) = failure {
            return self.fail(x, h, &e.to_string());
        }
        if let Some((ri, wi, used, amount)) = refused {
            let Some(rule) = rules.get(ri) else { return self.fail(x, h, "rule") };
            let Some(w) = rule.windows.get(wi) else { return self.fail(x, h, "window") };
            let (remaining, reset) = (w.limit.saturating_sub(used), w.ms_to_reset(now));
            return self.refuse(h, rule, wi, remaining, reset, Some((used, amount)));
        }
        self.admit(h)
    }

    /// Send the next pending call from this stream and wait for it.
    fn send_next(&mut self, x: &mut Exchange, h: &mut dyn Host, rls: &RlsConfig, what: Awaiting) -> Flow {
        let Some(call) = self.calls.pop() else {
            return match what {
                Awaiting::Admission => self.admit(h),
                Awaiting::Correction => Flow::Continue,
            };
        };
        let bytes = call.encode(&rls.domain);
        match h.dispatch_grpc_call(&rls.cluster, rls::SERVICE, rls::METHOD, &bytes, rls.timeout) {
            Some(token) => {
                x.await_callout(token);
                self.awaiting = Some(what);
                self.current = Some(call);
                Flow::Wait
            }
            None => {
                log::warn!("{} #{}: dispatch_grpc_call to {} failed", crate::NAME, x.id, rls.cluster);
                match what {
                    Awaiting::Admission => self.fail(x, h, "rls_unavailable_14"),
                    Awaiting::Correction => {
                        // Not lost: the root context sends it (and the rest).
                        self.calls.push(call);
                        self.enqueue_calls(h, rls);
                        Flow::Continue
                    }
                }
            }
        }
    }

    fn on_admission(&mut self, x: &mut Exchange, h: &mut dyn Host, r: &CalloutResponse, call: Call) -> Flow {
        let resp = match (r.grpc_status, r.body.as_deref().and_then(rls::decode_response)) {
            (Some(0), Some(resp)) if resp.overall != Code::Unknown => resp,
            // Whether it counted is unknown: nothing is refunded (a refund of hits that were
            // never added would take someone else's).
            (Some(0), _) => return self.fail(x, h, "rls_bad_response"),
            (s, _) => return self.fail(x, h, &format!("rls_unavailable_{}", s.unwrap_or(14))),
        };
        let cfg = self.config();
        let rules = cfg.rule_set(&self.set).unwrap_or_default();
        let now = now_ms(h);
        let mut over: Option<(usize, usize, u64, u64)> = None;
        for (st, (ri, wi)) in resp.statuses.iter().zip(&call.slots) {
            let Some(rule) = rules.get(*ri) else { continue };
            let Some(w) = rule.windows.get(*wi) else { continue };
            let reset_ms = if st.reset_secs > 0 { st.reset_secs.saturating_mul(1000) } else { w.ms_to_reset(now) };
            if st.code == Code::OverLimit && over.is_none() {
                over = Some((*ri, *wi, st.remaining, reset_ms));
            }
            self.note(rule, w.limit, st.remaining, reset_ms);
        }
        // The RLS adds before it compares: these hits are counted either way.
        self.counted.push(call);
        if resp.overall == Code::OverLimit {
            let (ri, wi, rem, reset) = over.unwrap_or((0, 0, 0, 1000));
            if self.cfg.shadow {
                self.shadow_hit.get_or_insert((ri, wi));
            } else {
                self.charges.clear();
                self.refund_counted(h);
                let Some(rule) = rules.get(ri) else { return self.fail(x, h, "rule") };
                return self.refuse(h, rule, wi, rem, reset, None);
            }
        }
        match self.rls() {
            Some(rls) => self.send_next(x, h, &rls, Awaiting::Admission),
            None => self.admit(h),
        }
    }

    /// Return the hits of admission calls the RLS counted for a request that will not be
    /// settled (refused, or unmetered after a failure).
    fn refund_counted(&mut self, h: &mut dyn Host) {
        let counted = std::mem::take(&mut self.counted);
        let Some(rls) = self.rls() else { return };
        if !rls.negative_hits {
            return;
        }
        for call in counted.iter().filter(|c| c.hits > 0) {
            self.enqueue(h, &rls, &call.refund());
        }
    }

    // ----- settlement ------------------------------------------------------------------------

    fn outcome(&self, x: &mut Exchange, h: &mut dyn Host, complete: bool) -> Outcome {
        if !x.response.ok() || x.response.local || x.served_locally {
            return Outcome::Release;
        }
        if !complete && !x.produced_output() {
            return Outcome::Release;
        }
        let r = &x.response;
        let readable = !r.encoded
            && match r.kind {
                BodyKind::Sse => r.stream.is_some(),
                // A JSON answer cut short was generated in full: its text is not a measure.
                _ => complete && r.copy.is_some() && r.bytes <= self.cfg.max_response_bytes,
            };
        if !readable {
            return Outcome::Keep;
        }
        match x.usage(h) {
            Some(u) if !u.estimated || x.request.api.generates() => {
                // Output is estimated from the generated text only where there is some.
                let response_model = match &x.response.stream {
                    Some(s) => s.response_model().map(str::to_string),
                    None => x.response.json().and_then(sluice_core::api::response_model).map(str::to_string),
                };
                let requested = x.model();
                let cost = limiter::cost_of(&self.cfg, &u, response_model.as_deref(), requested.as_deref());
                let units = Units { input: u.input, output: u.output, cost };
                Outcome::Usage { units, action: if u.estimated { "estimated" } else { "reconciled" } }
            }
            _ => Outcome::Keep,
        }
    }

    /// Replace the reservations with what the exchange used (once). Returns the RLS
    /// corrections to send, if any.
    fn settle(&mut self, x: &mut Exchange, h: &mut dyn Host, complete: bool) -> Vec<Call> {
        if self.phase != Phase::Reserved {
            if self.phase == Phase::Unmetered {
                self.phase = Phase::Settled;
            }
            return Vec::new();
        }
        self.phase = Phase::Settled;
        let outcome = self.outcome(x, h, complete);
        let action = match outcome {
            Outcome::Release => "released",
            Outcome::Keep => "reservation",
            Outcome::Usage { action, .. } => action,
        };
        self.vm.count(h, "sluice_ratelimit_settled", action);
        let cfg = self.config();
        let rules = cfg.rule_set(&self.set).unwrap_or_default();
        let charges = std::mem::take(&mut self.charges);
        let delta_of = |rule: &Rule, c: &Charge| -> i64 {
            let amount = i64::try_from(c.amount).unwrap_or(i64::MAX);
            match outcome {
                Outcome::Release => -amount,
                Outcome::Keep => 0,
                Outcome::Usage { units, .. } => {
                    i64::try_from(rule.counts.amount(&units)).unwrap_or(i64::MAX).saturating_sub(amount)
                }
            }
        };
        match self.rls() {
            None => {
                let mut store = Store::new(h, self.cfg.cas_retries, self.cfg.max_counters);
                for c in &charges {
                    let (Some(rule), Some(key)) = (rules.get(c.rule), c.key.as_ref()) else { continue };
                    let delta = delta_of(rule, c);
                    if let Err(e) = store.adjust(key, &rule.windows, &c.starts, delta) {
                        log::warn!("{} #{}: correction of {} by {delta} failed: {e}", crate::NAME, x.id, key.id);
                    }
                }
                let stats = store.stats;
                self.vm.store_stats(h, stats);
                Vec::new()
            }
            Some(rls) => {
                let now = now_ms(h);
                let mut items = Vec::new();
                for c in &charges {
                    let Some(rule) = rules.get(c.rule) else { continue };
                    let delta = delta_of(rule, c);
                    if delta == 0 || (delta < 0 && !rls.negative_hits) {
                        continue; // without negative hits an unused reservation stays counted
                    }
                    for (wi, (w, start)) in rule.windows.iter().zip(&c.starts).enumerate() {
                        // The RLS counts in its current window: a correction for a window that
                        // has ended since the reservation would land in the next one.
                        if w.start(now) != *start {
                            continue;
                        }
                        items
                            .push((self.descriptor(rule, &c.values, w, delta.unsigned_abs(), delta < 0), (c.rule, wi)));
                    }
                }
                group(items)
            }
        }
    }

    fn enqueue(&self, h: &mut dyn Host, rls: &RlsConfig, call: &Call) {
        let bytes = call.encode(&rls.domain);
        let sent = match self.vm.queue.get() {
            Some(q) => {
                let mut item = Vec::with_capacity(bytes.len().saturating_add(1));
                item.push(if call.negative { b'-' } else { b'+' });
                item.extend_from_slice(&bytes);
                h.enqueue(q, &item)
            }
            None => false,
        };
        if !sent {
            // Best effort from this stream (Envoy may cancel it when the stream ends).
            if h.dispatch_grpc_call(&rls.cluster, rls::SERVICE, rls::METHOD, &bytes, rls.timeout).is_none() {
                log::warn!("{}: RLS correction lost: no queue and dispatch failed", crate::NAME);
            }
        }
    }

    fn enqueue_calls(&mut self, h: &mut dyn Host, rls: &RlsConfig) {
        for call in std::mem::take(&mut self.calls) {
            self.enqueue(h, rls, &call);
        }
    }
}

impl Stage for RateLimitStage {
    fn on_request_headers(&mut self, x: &mut Exchange, _h: &mut dyn Host) -> Flow {
        let set =
            x.route.str(&self.cfg.route_metadata_key).map(str::to_string).or_else(|| self.cfg.default_rule_set.clone());
        let Some(set) = set else { return Flow::Continue };
        if set == "none" {
            return Flow::Continue;
        }
        if self.cfg.rule_set(&set).is_none() {
            log::warn!("{} #{}: route names unknown rule set {set:?}", crate::NAME, x.id);
            self.phase = Phase::Replied;
            return Flow::Reply(LocalReply::misconfigured(crate::NAME));
        }
        self.set = set;
        self.phase = Phase::Body;
        x.want_body(BodyUse::Json);
        x.want_response(ResponseUse::Track);
        Flow::Continue
    }

    fn on_request(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if self.phase != Phase::Body {
            return Flow::Continue;
        }
        self.decide(x, h)
    }

    fn on_callout(&mut self, x: &mut Exchange, h: &mut dyn Host, r: CalloutResponse) -> Flow {
        let Some(call) = self.current.take() else { return Flow::Continue };
        match self.awaiting.take() {
            Some(Awaiting::Admission) if self.phase == Phase::Rls => self.on_admission(x, h, &r, call),
            Some(Awaiting::Correction) => {
                note_correction_answer(&self.vm, h, &r, call.negative);
                match self.rls() {
                    Some(rls) => self.send_next(x, h, &rls, Awaiting::Correction),
                    None => Flow::Continue,
                }
            }
            _ => Flow::Continue,
        }
    }

    fn on_response_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if matches!(self.phase, Phase::Reserved | Phase::Unmetered) && !x.response.local {
            for (k, v) in limiter::admitted_headers(self.tokens, self.requests, self.cost) {
                h.set_response_header(&k, Some(v.as_bytes()));
            }
        }
        Flow::Continue
    }

    fn on_response_body(&mut self, x: &mut Exchange, h: &mut dyn Host, c: &mut Chunk) -> Flow {
        if !c.end || self.phase != Phase::Reserved {
            return Flow::Continue;
        }
        let calls = self.settle(x, h, true);
        let Some(rls) = self.rls() else { return Flow::Continue };
        self.calls = calls;
        self.calls.reverse();
        // Hold the end of the response until the RLS has the correction, so the client's
        // next request sees it.
        self.send_next(x, h, &rls, Awaiting::Correction)
    }

    fn on_done(&mut self, x: &mut Exchange, h: &mut dyn Host) {
        if self.phase == Phase::Rls {
            // Reset while the RLS was deciding: what it counted is returned.
            self.refund_counted(h);
        }
        if self.phase != Phase::Reserved {
            return;
        }
        // The response never ended: a reset stream, settled with what was seen.
        let calls = self.settle(x, h, x.response.complete);
        if let Some(rls) = self.rls() {
            self.calls = calls;
            self.enqueue_calls(h, &rls);
        }
    }
}
