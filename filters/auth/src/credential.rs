//! Where a credential is read from (headers, query parameter, cookie) and how it is removed
//! before the request leaves the gateway. Reads the request as the pipeline read it once
//! (`Request::headers`, `Request::path`): no host calls.

use crate::config::Source;
use crate::jwt::Failure;
use sluice_core::exchange::{Exchange, Request};
use sluice_core::host::Host;

/// Read a credential from the first source that has one. Two copies of a header, a header
/// without the expected scheme, or an empty value are `malformed`.
pub fn extract(req: &Request, sources: &[Source]) -> Result<Option<(String, Source)>, Failure> {
    for s in sources {
        let found = match s {
            Source::Header { name, prefix } => header_value(req, name, prefix.as_deref())?,
            Source::Query(name) => single(query_values(&req.path, name))?,
            Source::Cookie(name) => single(cookie_values(req, name))?,
        };
        if let Some(v) = found {
            return Ok(Some((v, s.clone())));
        }
    }
    Ok(None)
}

fn header_value(req: &Request, name: &str, prefix: Option<&str>) -> Result<Option<String>, Failure> {
    let mut values = req.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
    let Some(v) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(Failure::Malformed);
    }
    let v = std::str::from_utf8(v).map_err(|_| Failure::Malformed)?.trim();
    let token = match prefix {
        None => v,
        Some(p) => {
            let head = v.get(..p.len()).ok_or(Failure::Malformed)?;
            if !head.eq_ignore_ascii_case(p) {
                return Err(Failure::Malformed);
            }
            v.get(p.len()..).unwrap_or("").trim()
        }
    };
    if token.is_empty() {
        return Err(Failure::Malformed);
    }
    Ok(Some(token.to_string()))
}

/// One non-empty value, none, or `malformed` (given twice, or empty).
fn single(found: Vec<String>) -> Result<Option<String>, Failure> {
    match found.as_slice() {
        [] => Ok(None),
        [v] if !v.is_empty() => Ok(Some(v.clone())),
        _ => Err(Failure::Malformed),
    }
}

fn query_values(path: &str, name: &str) -> Vec<String> {
    let Some((_, query)) = path.split_once('?') else { return Vec::new() };
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
        .collect()
}

fn cookies(req: &Request) -> impl Iterator<Item = String> + '_ {
    req.headers
        .iter()
        .filter(|(k, _)| k == "cookie")
        .flat_map(|(_, v)| String::from_utf8_lossy(v).split(';').map(|c| c.trim().to_string()).collect::<Vec<_>>())
}

fn cookie_values(req: &Request, name: &str) -> Vec<String> {
    cookies(req).filter_map(|c| c.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_string())).collect()
}

/// Whether a bearer value has the shape of a JWT (`x.y.z`) rather than an API key.
pub fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

/// Remove every credential these sources name from the request (the one consumed and any
/// other the client sent through a configured source), so none leaves the gateway. A source
/// that is absent costs nothing.
pub fn strip(x: &mut Exchange, h: &mut dyn Host, sources: &[&Source]) {
    for s in sources {
        match s {
            Source::Header { name, .. } => {
                if x.request.header(name).is_some() {
                    x.set_request_header(h, name, None);
                }
            }
            Source::Query(name) => {
                let path = x.request.path.clone();
                let Some((p, q)) = path.split_once('?') else { continue };
                let kept: Vec<&str> = q.split('&').filter(|kv| kv.split('=').next() != Some(name.as_str())).collect();
                if kept.len() == q.split('&').count() {
                    continue;
                }
                let new = if kept.is_empty() { p.to_string() } else { format!("{p}?{}", kept.join("&")) };
                x.set_request_header(h, ":path", Some(new.as_bytes()));
            }
            Source::Cookie(name) => {
                if cookie_values(&x.request, name).is_empty() {
                    continue;
                }
                let kept: Vec<String> = cookies(&x.request)
                    .filter(|c| !c.is_empty() && c.split('=').next() != Some(name.as_str()))
                    .collect();
                let v = kept.join("; ");
                x.set_request_header(h, "cookie", if v.is_empty() { None } else { Some(v.as_bytes()) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::host::FakeHost;

    fn request(path: &str, headers: &[(&str, &str)]) -> Exchange {
        let mut x = Exchange::new(1);
        x.request.path = path.to_string();
        x.request.headers = headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        x
    }

    #[test]
    fn sources_in_order_and_malformed_values() {
        let bearer = Source::bearer();
        let q = Source::Query("access_token".into());
        let c = Source::Cookie("jwt".into());
        let all = [bearer.clone(), q.clone(), c.clone()];
        let x = request("/v1?a=1&access_token=t1", &[("cookie", "theme=dark; jwt=t2")]);
        assert_eq!(extract(&x.request, &all).unwrap(), Some(("t1".into(), q.clone())));
        let x = request("/v1", &[("cookie", "theme=dark; jwt=t2")]);
        assert_eq!(extract(&x.request, &all).unwrap(), Some(("t2".into(), c.clone())));
        let x = request("/v1", &[("authorization", "bearer  t3 ")]);
        assert_eq!(extract(&x.request, &all).unwrap(), Some(("t3".into(), bearer.clone())));
        for bad in [
            request("/v1", &[("authorization", "Basic x")]),
            request("/v1", &[("authorization", "Bearer")]),
            request("/v1", &[("authorization", "Bearer a"), ("authorization", "Bearer a")]),
            request("/v1?access_token=a&access_token=b", &[]),
            request("/v1?access_token=", &[]),
            request("/v1", &[("cookie", "jwt=a"), ("cookie", "jwt=b")]),
        ] {
            assert_eq!(extract(&bad.request, &all), Err(Failure::Malformed), "{:?}", bad.request.headers);
        }
        assert_eq!(extract(&request("/v1", &[]).request, &all).unwrap(), None);
    }

    #[test]
    fn strip_removes_every_configured_credential_and_keeps_the_rest() {
        let mut h = FakeHost::default();
        let mut x = request(
            "/v1/chat?a=1&access_token=t&b=2",
            &[("authorization", "Bearer t"), ("x-api-key", "k"), ("cookie", "theme=dark; jwt=t"), ("x-other", "1")],
        );
        let sources = [
            Source::bearer(),
            Source::Header { name: "x-api-key".into(), prefix: None },
            Source::Query("access_token".into()),
            Source::Cookie("jwt".into()),
        ];
        strip(&mut x, &mut h, &sources.iter().collect::<Vec<_>>());
        assert_eq!(x.request.path, "/v1/chat?a=1&b=2");
        assert_eq!(x.request.header("authorization"), None);
        assert_eq!(x.request.header("x-api-key"), None);
        assert_eq!(x.request.header_str("cookie").as_deref(), Some("theme=dark"));
        assert_eq!(x.request.header("x-other"), Some(&b"1"[..]));
        assert_eq!(h.req_header(":path").as_deref(), Some("/v1/chat?a=1&b=2"));
        // Nothing to strip: no host call at all (a late write would be recorded as refused).
        let mut h = FakeHost { req_headers_sent: true, ..FakeHost::default() };
        let mut x = request("/v1/chat?a=1", &[("x-other", "1"), ("cookie", "theme=dark")]);
        strip(&mut x, &mut h, &sources.iter().collect::<Vec<_>>());
        assert!(h.refused.is_empty(), "{:?}", h.refused);
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt("sk-123"));
    }
}
