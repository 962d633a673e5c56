//! Pipeline tests on the fake host: every path a stage can take ends in continue, pause with
//! a callout out, or a reply; trailers end bodies; replies pass only earlier stages.

use super::*;
use crate::exchange::{BodyUse, ResponseUse};
use crate::host::{FakeHost, Phase};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::rc::Rc;

type Log = Rc<RefCell<Vec<String>>>;

/// A scripted stage that logs what it saw.
#[derive(Default)]
struct Probe {
    name: &'static str,
    log: Log,
    body: BodyUse,
    response: ResponseUse,
    wait_in_headers: bool,
    wait_in_request: bool,
    reject_if: Option<&'static str>,
    rename_model: Option<&'static str>,
    upper_events: bool,
}

impl Probe {
    fn new(name: &'static str, log: &Log) -> Self {
        Self { name, log: Rc::clone(log), ..Self::default() }
    }
    fn note(&self, s: impl Into<String>) {
        self.log.borrow_mut().push(format!("{}:{}", self.name, s.into()));
    }
}

impl Stage for Probe {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        self.note("headers");
        x.want_body(self.body);
        x.want_response(self.response);
        if self.wait_in_headers {
            let t = h.dispatch_http_call("c", &[(":path", "/x")], None, std::time::Duration::from_secs(1)).unwrap();
            x.await_callout(t);
            return Flow::Wait;
        }
        Flow::Continue
    }
    fn on_request(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let model = x.request.json().and_then(|v| v.get("model")).and_then(Value::as_str).map(str::to_string);
        self.note(format!("request model={model:?}"));
        if let (Some(bad), Some(m)) = (self.reject_if, &model) {
            if m == bad {
                return Flow::Reply(LocalReply::openai_error(403, "permission_error", "no", "no"));
            }
        }
        if let Some(new) = self.rename_model {
            if let Some(v) = x.request.json_mut() {
                v["model"] = Value::String(new.into());
            }
        }
        if self.wait_in_request {
            let t = h.dispatch_http_call("c", &[], None, std::time::Duration::from_secs(1)).unwrap();
            x.await_callout(t);
            return Flow::Wait;
        }
        Flow::Continue
    }
    fn on_callout(&mut self, _x: &mut Exchange, _h: &mut dyn Host, r: CalloutResponse) -> Flow {
        self.note(format!("callout {:?}", r.status));
        if r.status == Some(401) {
            return Flow::Reply(LocalReply::openai_error(401, "authentication_error", "no", "no"));
        }
        Flow::Continue
    }
    fn on_response_headers(&mut self, x: &mut Exchange, _h: &mut dyn Host) -> Flow {
        self.note(format!("response {} local={}", x.response.status, x.response.local));
        Flow::Continue
    }
    fn on_response_body(&mut self, _x: &mut Exchange, _h: &mut dyn Host, c: &mut Chunk) -> Flow {
        self.note(format!("chunk events={} end={}", c.events.len(), c.end));
        if self.upper_events {
            for ev in &mut c.events {
                if let Some(Value::String(t)) = ev.json_mut().and_then(|j| j.pointer_mut("/choices/0/delta/content")) {
                    *t = t.to_uppercase();
                }
            }
        }
        Flow::Continue
    }
    fn on_done(&mut self, _x: &mut Exchange, _h: &mut dyn Host) {
        self.note("done");
    }
}

fn pipeline(stages: Vec<Probe>) -> Pipeline {
    let slots = stages
        .into_iter()
        .map(|p| {
            let name = p.name;
            Slot { stage: Box::new(p) as Box<dyn Stage>, name, limit: Some(1000), hold: true, publish_model: true }
        })
        .collect();
    Pipeline::new(7, slots, Rc::new(RefCell::new(RouteCache::default())))
}

fn post() -> FakeHost {
    FakeHost::with_request_headers(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("content-length", "40"),
        ("accept-encoding", "gzip"),
    ])
}

fn entries(log: &Log) -> Vec<String> {
    log.borrow().clone()
}

#[test]
fn body_is_held_then_decided_once_and_rewritten_once() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.body = BodyUse::Modify;
    a.rename_model = Some("x");
    let mut b = Probe::new("b", &log);
    b.body = BodyUse::Json;
    b.rename_model = Some("y");
    let mut p = pipeline(vec![a, b]);
    let mut h = post();
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    assert_eq!(h.req_header("content-length").as_deref(), Some("40"), "held: set again once the body is known");
    h.phase = Phase::RequestBody;
    h.req_body = br#"{"model":"m","messages":[]}"#.to_vec();
    assert_eq!(p.on_request_body(&mut h, 10, false), Act::Pause);
    assert_eq!(
        {
            let n = h.req_body.len();
            p.on_request_body(&mut h, n, true)
        },
        Act::Continue
    );
    let sent: Value = serde_json::from_slice(&h.req_body).unwrap();
    assert_eq!(sent["model"], "y");
    assert_eq!(h.req_header("content-length"), Some(h.req_body.len().to_string()), "the new length");
    assert_eq!(entries(&log), ["a:headers", "b:headers", "a:request model=Some(\"m\")", "b:request model=Some(\"x\")"]);
    assert!(h.refused.is_empty(), "{:?}", h.refused);
}

#[test]
fn request_trailers_end_the_body_exactly_like_end_of_stream() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.body = BodyUse::Json;
    a.reject_if = Some("bad");
    let mut p = pipeline(vec![a]);
    let mut h = post();
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    h.phase = Phase::RequestBody;
    h.req_body = br#"{"model":"bad"}"#.to_vec();
    assert_eq!(
        {
            let n = h.req_body.len();
            p.on_request_body(&mut h, n, false)
        },
        Act::Pause
    );
    assert_eq!(p.on_request_trailers(&mut h), Act::Pause);
    assert_eq!(h.replies.len(), 1, "refused at the trailers, never forwarded");
    assert_eq!(h.replies[0].status, 403);

    // Trailers right after the headers (no DATA at all): decided with an empty body.
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.body = BodyUse::Json;
    let mut p = pipeline(vec![a]);
    let mut h = post();
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    assert_eq!(p.on_request_trailers(&mut h), Act::Continue);
    assert_eq!(entries(&log), ["a:headers", "a:request model=None"]);
}

#[test]
fn no_stage_wants_the_body_so_nothing_is_held() {
    let log = Log::default();
    let mut p = pipeline(vec![Probe::new("a", &log)]);
    let mut h = post();
    assert_eq!(p.on_request_headers(&mut h, false), Act::Continue);
    assert_eq!(h.req_header("content-length").as_deref(), Some("40"));
    assert_eq!(p.on_request_body(&mut h, 5, false), Act::Continue);
    assert_eq!(p.on_request_trailers(&mut h), Act::Continue);
}

#[test]
fn duplicate_keys_are_refused_before_any_stage_reads_them() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.body = BodyUse::Json;
    let mut p = pipeline(vec![a]);
    let mut h = post();
    p.on_request_headers(&mut h, false);
    h.req_body = br#"{"model":"ok","model":"other"}"#.to_vec();
    assert_eq!(
        {
            let n = h.req_body.len();
            p.on_request_body(&mut h, n, true)
        },
        Act::Pause
    );
    assert_eq!(h.replies[0].status, 400);
    let body: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
    assert_eq!(body["error"]["code"], "duplicate_json_key");
    assert_eq!(entries(&log), ["a:headers"]);
}

#[test]
fn body_limit_from_content_length_and_from_the_buffer() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.body = BodyUse::Json;
    let mut p = pipeline(vec![a]);
    let mut h = post();
    h.set_request_header("content-length", Some(b"5000"));
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    assert_eq!(h.replies[0].status, 413);

    let mut a = Probe::new("a", &log);
    a.body = BodyUse::Json;
    let mut p = pipeline(vec![a]);
    let mut h = post();
    p.on_request_headers(&mut h, false);
    assert_eq!(p.on_request_body(&mut h, 1001, false), Act::Pause);
    assert_eq!(h.replies[0].status, 413);
    assert_eq!(p.on_request_body(&mut h, 2000, true), Act::Pause, "after a reply everything is held");
}

#[test]
fn callout_in_headers_with_the_body_arriving_meanwhile() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.wait_in_headers = true;
    let mut b = Probe::new("b", &log);
    b.body = BodyUse::Json;
    let mut p = pipeline(vec![a, b]);
    let mut h = post();
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    h.req_body = br#"{"model":"m"}"#.to_vec();
    assert_eq!(
        {
            let n = h.req_body.len();
            p.on_request_body(&mut h, n, true)
        },
        Act::Pause,
        "still waiting"
    );
    h.call_resp_headers = vec![(":status".into(), b"200".to_vec())];
    p.on_callout(&mut h, 1, None, 0);
    assert_eq!(h.resumed_requests, 1);
    assert_eq!(
        entries(&log),
        ["a:headers", "a:callout Some(200)", "b:headers", "a:request model=Some(\"m\")", "b:request model=Some(\"m\")"]
    );
}

#[test]
fn a_body_completed_during_a_headers_callout_gets_its_new_length() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.wait_in_headers = true;
    let mut b = Probe::new("b", &log);
    b.body = BodyUse::Modify;
    b.rename_model = Some("a-much-longer-model-name");
    let mut p = pipeline(vec![a, b]);
    let mut h = post();
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    h.req_body = br#"{"model":"m"}"#.to_vec();
    let n = h.req_body.len();
    assert_eq!(p.on_request_body(&mut h, n, true), Act::Pause);
    h.call_resp_headers = vec![(":status".into(), b"200".to_vec())];
    p.on_callout(&mut h, 1, None, 0);
    assert_eq!(h.resumed_requests, 1);
    assert_eq!(h.req_header("content-length"), Some(h.req_body.len().to_string()));
}

#[test]
fn callout_in_headers_then_body_later() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.wait_in_headers = true;
    a.body = BodyUse::Json;
    let mut p = pipeline(vec![a]);
    let mut h = post();
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    h.call_resp_headers = vec![(":status".into(), b"200".to_vec())];
    p.on_callout(&mut h, 1, None, 0);
    assert_eq!(h.resumed_requests, 0, "the body is still to come: not resumed");
    h.req_body = br#"{"model":"m"}"#.to_vec();
    assert_eq!(
        {
            let n = h.req_body.len();
            p.on_request_body(&mut h, n, true)
        },
        Act::Continue
    );
}

#[test]
fn callout_answer_can_refuse_and_a_stray_token_is_ignored() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.body = BodyUse::Json;
    a.wait_in_request = true;
    let mut p = pipeline(vec![a]);
    let mut h = post();
    p.on_request_headers(&mut h, false);
    h.req_body = br#"{"model":"m"}"#.to_vec();
    assert_eq!(
        {
            let n = h.req_body.len();
            p.on_request_body(&mut h, n, true)
        },
        Act::Pause
    );
    p.on_callout(&mut h, 99, None, 0);
    assert!(h.replies.is_empty() && h.resumed_requests == 0);
    h.call_resp_headers = vec![(":status".into(), b"401".to_vec())];
    p.on_callout(&mut h, 1, None, 0);
    assert_eq!(h.replies[0].status, 401);
    assert_eq!(h.resumed_requests, 0, "a reply is never followed by a resume");
}

#[test]
fn waiting_without_a_callout_is_refused_not_hung() {
    struct Broken;
    impl Stage for Broken {
        fn on_request_headers(&mut self, _x: &mut Exchange, _h: &mut dyn Host) -> Flow {
            Flow::Wait
        }
    }
    let mut p = Pipeline::new(
        1,
        vec![Slot { stage: Box::new(Broken), name: "broken", limit: None, hold: true, publish_model: true }],
        Rc::new(RefCell::new(RouteCache::default())),
    );
    let mut h = post();
    assert_eq!(p.on_request_headers(&mut h, true), Act::Pause);
    assert_eq!(h.replies[0].status, 500);
}

#[test]
fn a_reply_passes_only_the_stages_before_the_one_that_sent_it() {
    let log = Log::default();
    let a = Probe::new("a", &log);
    let mut b = Probe::new("b", &log);
    b.body = BodyUse::Json;
    b.reject_if = Some("bad");
    let c = Probe::new("c", &log);
    let mut p = pipeline(vec![a, b, c]);
    let mut h = post();
    p.on_request_headers(&mut h, false);
    h.req_body = br#"{"model":"bad"}"#.to_vec();
    {
        let n = h.req_body.len();
        p.on_request_body(&mut h, n, true)
    };
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"403".to_vec())];
    p.on_response_headers(&mut h, false);
    p.on_log(&mut h);
    let l = entries(&log);
    assert!(l.contains(&"a:response 403 local=true".to_string()), "{l:?}");
    assert!(!l.iter().any(|e| e.starts_with("b:response") || e.starts_with("c:response")), "{l:?}");
    assert!(l.contains(&"c:done".to_string()));
}

fn sse(contents: &[&str]) -> Vec<u8> {
    let mut s = String::new();
    for c in contents {
        s.push_str(&format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": c}}]})));
    }
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

#[test]
fn sse_events_are_parsed_once_and_rewritten_only_when_changed() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.response = ResponseUse::Modify;
    a.upper_events = true;
    let mut p = pipeline(vec![a]);
    let mut h = post();
    p.on_request_headers(&mut h, true);
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
    p.on_response_headers(&mut h, false);
    h.phase = Phase::ResponseBody;
    let body = sse(&["hi", "there"]);
    let (first, rest) = body.split_at(20);
    h.resp_body = first.to_vec();
    p.on_response_body(&mut h, first.len(), false);
    assert!(h.resp_body.is_empty(), "a partial event waits for its end");
    h.resp_body = rest.to_vec();
    p.on_response_body(&mut h, rest.len(), true);
    let text = String::from_utf8(h.resp_body.clone()).unwrap();
    assert!(text.contains("\"HI\"") && text.contains("\"THERE\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(h.refused.is_empty(), "{:?}", h.refused);
}

#[test]
fn tracking_only_never_touches_the_bytes_and_publishes_usage() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.response = ResponseUse::Track;
    let mut p = pipeline(vec![a]);
    let mut h = post();
    p.on_request_headers(&mut h, true);
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"application/json".to_vec())];
    p.on_response_headers(&mut h, false);
    h.phase = Phase::ResponseBody;
    let body = br#"{"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#.to_vec();
    h.resp_body = body.clone();
    assert_eq!(p.on_response_body(&mut h, body.len(), true), Act::Continue);
    assert_eq!(h.resp_body, body);
    assert_eq!(h.state(keys::USAGE).as_deref(), Some("3,4,7,0,0,0,0,0,0"));
}

#[test]
fn buffered_json_waits_for_the_end_or_the_trailers() {
    let log = Log::default();
    let mut a = Probe::new("a", &log);
    a.response = ResponseUse::Buffer;
    let mut p = pipeline(vec![a]);
    let mut h = post();
    p.on_request_headers(&mut h, true);
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"200".to_vec())];
    p.on_response_headers(&mut h, false);
    assert_eq!(h.resp_header("content-length"), None);
    h.phase = Phase::ResponseBody;
    h.resp_body = b"{\"a\":".to_vec();
    assert_eq!(p.on_response_body(&mut h, 5, false), Act::Pause);
    h.resp_body = b"{\"a\":1}".to_vec();
    assert_eq!(p.on_response_body(&mut h, 7, false), Act::Pause);
    assert_eq!(p.on_response_trailers(&mut h), Act::Continue);
    assert_eq!(entries(&log).last().map(String::as_str), Some("a:chunk events=0 end=true"));
    assert_eq!(p.x.response.json().unwrap()["a"], 1);
}

/// Holds a 400's headers, reads the whole body, then marks the headers (what model-failover's
/// upstream role does for a context-length error before the router decides on a retry).
struct MarkRetriable;

impl Stage for MarkRetriable {
    fn on_response_headers(&mut self, x: &mut Exchange, _h: &mut dyn Host) -> Flow {
        if x.response.status == 400 {
            x.hold_response_headers();
        }
        Flow::Continue
    }
    fn on_response_body(&mut self, x: &mut Exchange, h: &mut dyn Host, c: &mut Chunk) -> Flow {
        if c.end && x.response_headers_held() && String::from_utf8_lossy(&c.bytes).contains("too long") {
            h.set_response_header("x-retry", Some(b"yes"));
        }
        Flow::Continue
    }
}

#[test]
fn held_response_headers_can_be_changed_once_the_body_is_read() {
    let routes = Rc::new(RefCell::new(crate::route::RouteCache::default()));
    let slot = || Slot { stage: Box::new(MarkRetriable), name: "m", limit: None, hold: true, publish_model: true };
    let mut p = Pipeline::new(1, vec![slot()], Rc::clone(&routes));
    let mut h = post();
    p.on_request_headers(&mut h, true);
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"400".to_vec()), ("content-type".into(), b"application/json".to_vec())];
    assert_eq!(p.on_response_headers(&mut h, false), Act::Pause, "headers held");
    h.phase = Phase::ResponseBody;
    h.resp_headers_held = true;
    h.resp_body = br#"{"error":"#.to_vec();
    assert_eq!(p.on_response_body(&mut h, 9, false), Act::Pause);
    h.resp_body = br#"{"error":"prompt is too long"}"#.to_vec();
    let n = h.resp_body.len();
    assert_eq!(p.on_response_body(&mut h, n, true), Act::Continue, "headers and body go on together");
    assert_eq!(h.resp_header("x-retry").as_deref(), Some("yes"));
    assert_eq!(h.resp_body, br#"{"error":"prompt is too long"}"#, "body unchanged");
    assert!(h.refused.is_empty(), "{:?}", h.refused);

    // A 200 is not held; a held 400 that ends with its headers, or streams, is not held either.
    for (status, ct, eos) in
        [("200", "application/json", false), ("400", "application/json", true), ("400", "text/event-stream", false)]
    {
        let mut p = Pipeline::new(2, vec![slot()], Rc::clone(&routes));
        let mut h = post();
        p.on_request_headers(&mut h, true);
        h.phase = Phase::ResponseHeaders;
        h.resp_headers =
            vec![(":status".into(), status.as_bytes().to_vec()), ("content-type".into(), ct.as_bytes().to_vec())];
        assert_eq!(p.on_response_headers(&mut h, eos), Act::Continue, "{status} {ct} {eos}");
    }
}
