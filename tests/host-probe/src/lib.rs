//! A TEST FIXTURE, not a product: a wasm filter that exercises every `Host` method of
//! `sluice_core` in the callback where filters use it and logs what the host answered
//! (`sluice-host-probe <phase> <json>`). `tests/e2e/test_host_probe.py` runs it in real
//! Envoy; the native test below runs the same probes on `FakeHost`; both must equal
//! `expected.json`, so the fake host cannot drift from Envoy unnoticed.

use serde_json::{json, Map, Value};
use sluice_core::config::ConfigError;
use sluice_core::exchange::{Chunk, Exchange};
use sluice_core::host::{Host, SharedDataError};
use sluice_core::metrics::MetricKind;
use sluice_core::stage::{Flow, Plugin, Stage};

/// Name in logs.
pub const NAME: &str = "host-probe";

fn shared(h: &dyn Host, key: &str) -> Value {
    let (v, cas) = h.shared_data(key);
    json!({"value": v.map(|b| String::from_utf8_lossy(&b).into_owned()), "has_cas": cas.is_some()})
}

fn set_result(r: Result<(), SharedDataError>) -> Value {
    Value::String(match r {
        Ok(()) => "ok".into(),
        Err(SharedDataError::CasMismatch) => "cas_mismatch".into(),
        Err(SharedDataError::Failed) => "failed".into(),
    })
}

/// Probes of the request-headers callback. `tag` makes shared-data keys unique per run.
pub fn request_probes(h: &mut dyn Host, tag: &str) -> Value {
    let mut out = Map::new();
    let headers = h.request_headers();
    let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    out.insert(
        "pseudo_headers_in_map".into(),
        json!([":method", ":path", ":authority"].iter().all(|p| names.contains(p))),
    );
    out.insert("missing_header".into(), json!(h.request_header("x-probe-missing").is_none()));
    h.set_request_header("x-probe-set", Some(b"1"));
    out.insert(
        "set_then_read".into(),
        json!(h.request_header("x-probe-set").map(|v| String::from_utf8_lossy(&v).into_owned())),
    );
    h.set_request_header("x-probe-set", None);
    out.insert("removed".into(), json!(h.request_header("x-probe-set").is_none()));
    let k = format!("probe|{tag}");
    out.insert("shared_missing".into(), shared(h, &k));
    out.insert("shared_set_missing_key_with_cas".into(), set_result(h.set_shared_data(&k, b"", Some(12345))));
    out.insert("shared_empty".into(), shared(h, &k));
    let (_, cas) = h.shared_data(&k);
    out.insert("shared_set_with_cas".into(), set_result(h.set_shared_data(&k, b"x", cas)));
    out.insert("shared_value".into(), shared(h, &k));
    out.insert("shared_set_stale_cas".into(), set_result(h.set_shared_data(&k, b"y", cas)));
    out.insert("property_missing".into(), json!(h.property(&["xds", "no_such_property"]).is_none()));
    out.insert(
        "route_name".into(),
        json!(h.property(&["xds", "route_name"]).map(|v| String::from_utf8_lossy(&v).into_owned())),
    );
    let meta = h
        .property(&["xds", "route_metadata"])
        .and_then(|b| sluice_core::encoding::metadata_namespace(&b, "sluice"))
        .map(Value::Object);
    out.insert("route_metadata".into(), meta.unwrap_or(Value::Null));
    h.set_property(&["sluice.probe"], b"written");
    out.insert(
        "filter_state_read_back".into(),
        json!(h.property(&["sluice.probe"]).map(|v| String::from_utf8_lossy(&v).into_owned())),
    );
    out.insert("filter_state_missing".into(), json!(h.property(&["sluice.probe_missing"]).is_none()));
    let id = h.define_metric(MetricKind::Counter, "sluice_probe_counter");
    out.insert("metric_defined".into(), json!(id.is_some()));
    out.insert("env_missing".into(), json!(h.env_var("SLUICE_PROBE_NO_SUCH_VAR").is_none()));
    out.insert(
        "now_after_2020".into(),
        json!(h.now().duration_since(std::time::UNIX_EPOCH).is_ok_and(|d| d.as_secs() > 1_577_836_800)),
    );
    out.insert("body_before_any".into(), json!(h.request_body(0, 100).is_none()));
    Value::Object(out)
}

/// Probes of the response-headers callback.
pub fn response_header_probes(h: &mut dyn Host) -> Value {
    let headers = h.response_headers();
    let status = headers.iter().find(|(k, _)| k == ":status").map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    h.set_response_header("x-probe-response", Some(b"1"));
    h.set_request_header("x-probe-late", Some(b"1"));
    json!({"status": status, "late_request_header_visible": h.request_header("x-probe-late").is_some()})
}

/// Probes of a response-body callback.
pub fn response_body_probes(h: &mut dyn Host) -> Value {
    json!({"response_headers_in_body_phase": h.response_headers().len()})
}

struct Probe;
struct ProbeStage {
    tag: String,
    logged_body: bool,
}

impl Plugin for Probe {
    fn name(&self) -> &'static str {
        NAME
    }
    fn stage(&self) -> Box<dyn Stage> {
        Box::new(ProbeStage { tag: String::new(), logged_body: false })
    }
}

impl Stage for ProbeStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        self.tag = x.request.header_str("x-probe-tag").unwrap_or_default();
        log::warn!("sluice-host-probe request {}", request_probes(h, &self.tag));
        Flow::Continue
    }
    fn on_response_headers(&mut self, _x: &mut Exchange, h: &mut dyn Host) -> Flow {
        log::warn!("sluice-host-probe response_headers {}", response_header_probes(h));
        Flow::Continue
    }
    fn on_response_body(&mut self, _x: &mut Exchange, h: &mut dyn Host, _c: &mut Chunk) -> Flow {
        if !self.logged_body {
            self.logged_body = true;
            log::warn!("sluice-host-probe response_body {}", response_body_probes(h));
        }
        Flow::Continue
    }
}

/// The probe filter (its config is ignored).
pub fn load(
    _o: sluice_core::config::Obj<'_>,
    _env: &dyn Fn(&str) -> Option<String>,
) -> Result<Box<dyn Plugin>, ConfigError> {
    Ok(Box::new(Probe))
}

/// The probe alone.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    sluice_core::stage::single(bytes, env, load)
}

sluice_core::filter_main!(NAME, assemble);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::host::{FakeHost, Phase};

    /// The fake host set up like the e2e probe's Envoy: route `probe` with sluice metadata.
    fn fake() -> FakeHost {
        let mut h = FakeHost::with_request_headers(&[
            (":method", "GET"),
            (":path", "/probe"),
            (":authority", "x"),
            (":scheme", "http"),
        ]);
        h.set_prop(&["xds", "route_name"], "probe");
        h.properties.insert(
            "xds/route_metadata".into(),
            sluice_core::encoding::test_encode_metadata(
                "sluice",
                &json!({"provider": "openai", "n": 3, "list": ["a", "b"]}),
            ),
        );
        h.time = Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000));
        h
    }

    #[test]
    fn the_fake_host_answers_like_envoy() {
        let expected: Value = serde_json::from_str(include_str!("../expected.json")).unwrap();
        let mut h = fake();
        let got = request_probes(&mut h, "native");
        assert_eq!(got, expected["request"], "request probes");
        h.phase = Phase::ResponseHeaders;
        h.req_headers_sent = true;
        h.resp_headers = vec![(":status".into(), b"200".to_vec())];
        assert_eq!(response_header_probes(&mut h), expected["response_headers"], "response header probes");
        h.phase = Phase::ResponseBody;
        assert_eq!(response_body_probes(&mut h), expected["response_body"], "response body probes");
    }
}
