//! How long a rate-limited provider asked us to wait, from the headers providers use:
//! `retry-after-ms` (OpenAI, Azure), `retry-after` (seconds or an HTTP date, RFC 9110) and
//! `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` (OpenAI durations like `6m0s`,
//! `1.5s`, `20ms`). Pure functions; the filter records the result in filter state and a metric.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest wait accepted (a day); anything larger is treated as hostile and capped.
pub const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// Which header the wait came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitSource {
    /// `retry-after-ms`.
    RetryAfterMs,
    /// `retry-after` in seconds.
    RetryAfterSeconds,
    /// `retry-after` as an HTTP date.
    RetryAfterDate,
    /// `x-ratelimit-reset-*`.
    RatelimitReset,
}

/// The wait a provider asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderWait {
    /// How long.
    pub wait: Duration,
    /// From which header.
    pub source: WaitSource,
}

/// Format a wait as decimal seconds for filter state: `60`, `1.5`, `0.02`.
pub fn format_seconds(d: Duration) -> String {
    let ms = d.as_millis();
    let whole = ms / 1000;
    let frac = ms % 1000;
    if frac == 0 {
        return whole.to_string();
    }
    let s = format!("{whole}.{frac:03}");
    s.trim_end_matches('0').to_string()
}

/// The wait from a provider's response headers, `header(name)` giving a header value.
/// Preference: `retry-after-ms`, then `retry-after`, then the larger `x-ratelimit-reset-*`.
pub fn provider_wait(header: impl Fn(&str) -> Option<String>, now: SystemTime) -> Option<ProviderWait> {
    if let Some(ms) = header("retry-after-ms").and_then(|v| parse_decimal_millis(&v, 1)) {
        return Some(ProviderWait { wait: cap(ms), source: WaitSource::RetryAfterMs });
    }
    if let Some(v) = header("retry-after") {
        if let Some(ms) = parse_decimal_millis(&v, 1000) {
            return Some(ProviderWait { wait: cap(ms), source: WaitSource::RetryAfterSeconds });
        }
        if let Some(at) = parse_http_date(&v) {
            let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
            return Some(ProviderWait { wait: wait.min(MAX_WAIT), source: WaitSource::RetryAfterDate });
        }
    }
    let resets = ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset"];
    resets
        .iter()
        .filter_map(|h| header(h))
        .filter_map(|v| parse_reset(&v))
        .max()
        .map(|wait| ProviderWait { wait: wait.min(MAX_WAIT), source: WaitSource::RatelimitReset })
}

fn cap(ms: u64) -> Duration {
    Duration::from_millis(ms).min(MAX_WAIT)
}

/// A non-negative decimal number (`"60"`, `"1.5"`) times `unit_ms`, in milliseconds, rounded
/// up. Integer arithmetic only (float parsing would double the .wasm size budget's use).
fn parse_decimal_millis(v: &str, unit_ms: u64) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() || v.len() > 24 {
        return None;
    }
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, f),
        None => (v, ""),
    };
    if (int.is_empty() && frac.is_empty()) || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = if int.is_empty() { 0 } else { int.parse().unwrap_or(u64::MAX) };
    let mut ms = whole.saturating_mul(unit_ms);
    // Fraction: digits d1 d2 ... mean sum(d_i / 10^i) units; keep 9 digits (nanosecond-ish).
    let mut num: u64 = 0;
    let mut den: u64 = 1;
    for b in frac.bytes().take(9) {
        num = num * 10 + u64::from(b - b'0');
        den *= 10;
    }
    if num > 0 {
        let part = num.saturating_mul(unit_ms);
        ms = ms.saturating_add(part / den + u64::from(!part.is_multiple_of(den)));
    }
    Some(ms)
}

/// An OpenAI-style reset duration (`6m0s`, `1.5s`, `20ms`, `1h2m`) or plain seconds.
pub fn parse_reset(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Some(ms) = parse_decimal_millis(v, 1000) {
        return Some(cap(ms));
    }
    if v.is_empty() || v.len() > 32 {
        return None;
    }
    let mut total_ms: u64 = 0;
    let mut rest = v;
    while !rest.is_empty() {
        let num_len = rest.bytes().take_while(|b| b.is_ascii_digit() || *b == b'.').count();
        if num_len == 0 {
            return None;
        }
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let per: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return None,
        };
        total_ms = total_ms.saturating_add(parse_decimal_millis(num, per)?);
        rest = tail;
    }
    Some(cap(total_ms))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form RFC 9110 lets senders use.
pub fn parse_http_date(v: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    let [_wday, day, mon, year, time, gmt] = parts.as_slice() else {
        return None;
    };
    if *gmt != "GMT" {
        return None;
    }
    let day: u32 = day.parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| m == mon)?;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<&str> = time.split(':').collect();
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    let (h, m, s): (u64, u64, u64) = (h.parse().ok()?, m.parse().ok()?, s.parse().ok()?);
    if !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 || !(1970..=9999).contains(&year) {
        return None;
    }
    let month = u32::try_from(month).ok()? + 1;
    let days = days_from_civil(year, month, day);
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + s;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn wait(headers: &[(&str, &str)], now: SystemTime) -> Option<ProviderWait> {
        let h: HashMap<String, String> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        provider_wait(|n| h.get(n).cloned(), now)
    }

    #[test]
    fn http_date() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 784_111_777);
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(UNIX_EPOCH));
        for bad in [
            "",
            "Sun, 06 Nov 1994 08:49:37",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "x y z w v u",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn sources_in_order() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_700);
        let w = wait(&[("retry-after", "60")], now).unwrap();
        assert_eq!((w.wait, w.source), (Duration::from_secs(60), WaitSource::RetryAfterSeconds));
        let w = wait(&[("retry-after", "60"), ("retry-after-ms", "1500")], now).unwrap();
        assert_eq!((w.wait, w.source), (Duration::from_millis(1500), WaitSource::RetryAfterMs));
        let w = wait(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")], now).unwrap();
        assert_eq!((w.wait, w.source), (Duration::from_secs(77), WaitSource::RetryAfterDate));
        // A date in the past means "now".
        let later = now + Duration::from_secs(1000);
        assert_eq!(wait(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")], later).unwrap().wait, Duration::ZERO);
        let w = wait(&[("x-ratelimit-reset-requests", "6m0s"), ("x-ratelimit-reset-tokens", "20ms")], now).unwrap();
        assert_eq!((w.wait, w.source), (Duration::from_secs(360), WaitSource::RatelimitReset));
        assert_eq!(wait(&[], now), None);
        assert_eq!(wait(&[("retry-after", "soon")], now), None);
    }

    #[test]
    fn hostile_values_are_capped_or_ignored() {
        let now = UNIX_EPOCH;
        assert_eq!(wait(&[("retry-after", "99999999999999999999")], now).unwrap().wait, MAX_WAIT);
        assert_eq!(wait(&[("retry-after", "-5")], now), None);
        assert_eq!(wait(&[("retry-after", "1e9")], now), None);
        assert_eq!(wait(&[("retry-after-ms", "NaN")], now), None);
        assert_eq!(wait(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")], now).unwrap().wait, MAX_WAIT);
        assert_eq!(parse_reset("1h2m3.5s"), Some(Duration::from_millis(3_723_500)));
        assert_eq!(parse_reset("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_reset("5x"), None);
        assert_eq!(parse_reset("s"), None);
        assert_eq!(parse_reset(&"9".repeat(40)), None);
    }

    #[test]
    fn seconds_format() {
        assert_eq!(format_seconds(Duration::from_secs(60)), "60");
        assert_eq!(format_seconds(Duration::from_millis(1500)), "1.5");
        assert_eq!(format_seconds(Duration::from_millis(20)), "0.02");
        assert_eq!(format_seconds(Duration::ZERO), "0");
    }
}
