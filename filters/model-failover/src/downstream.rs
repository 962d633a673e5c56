//! The downstream role: in the connection manager, after the router gave up or succeeded.
//!
//! When the last attempt was a provider 429 the upstream role showed the router a 503
//! (so outlier detection and the retry policy act on it); here the client gets the original
//! 429 back, with the provider's `retry-after` (never removed), and the internal header is
//! dropped. Filter state needs no copying: what the upstream role writes with
//! `set_property` is visible downstream (`%FILTER_STATE(wasm.sluice.provider:PLAIN)%`),
//! verified against Envoy 1.40.

use crate::config::ORIGINAL_STATUS_HEADER;
use crate::upstream::{count, metric};
use sluice_core::host::{header_str, Host};
use sluice_core::metrics::MetricIds;

/// Response headers seen by the downstream role.
pub fn on_response_headers<H: Host>(h: &mut H, ids: &mut MetricIds) {
    let Some(orig) = header_str(h.response_header(ORIGINAL_STATUS_HEADER)) else {
        return;
    };
    match orig.trim().parse::<u32>() {
        Ok(code) if (100..=599).contains(&code) => {
            h.set_response_header(":status", Some(code.to_string().as_bytes()));
            count(h, ids, metric::STATUS_RESTORED, 1);
        }
        _ => log::warn!("{}: ignoring unreadable {ORIGINAL_STATUS_HEADER}", crate::FILTER),
    }
    h.set_response_header(ORIGINAL_STATUS_HEADER, None);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use sluice_core::host::FakeHost;

    fn resp(headers: &[(&str, &str)]) -> FakeHost {
        let mut h = FakeHost {
            resp_headers: headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
            ..FakeHost::default()
        };
        let mut ids = MetricIds::new(8);
        on_response_headers(&mut h, &mut ids);
        h
    }

    #[test]
    fn restores_429_and_strips_the_internal_header() {
        let h = resp(&[(":status", "503"), ("retry-after", "60"), (ORIGINAL_STATUS_HEADER, "429")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("429"));
        assert_eq!(h.resp_header("retry-after").as_deref(), Some("60"));
        assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER), None);
        assert_eq!(h.metric(metric::STATUS_RESTORED), Some(1));
    }

    #[test]
    fn success_and_garbage() {
        let h = resp(&[(":status", "200")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("200"));
        assert_eq!(h.metric(metric::STATUS_RESTORED), None);
        let h = resp(&[(":status", "503"), (ORIGINAL_STATUS_HEADER, "4290")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("503"));
        assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER), None);
    }
}
