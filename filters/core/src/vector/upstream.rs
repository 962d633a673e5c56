//! An HTTP service the filter calls through an Envoy cluster (`dispatch_http_call`): the
//! embeddings endpoint and the vector store. Read from config once; the credential comes from
//! an environment variable the VM was given (`vm_config.environment_variables.host_env_keys`),
//! never from the config text.

use crate::config::{validate_env_var_name, validate_header_name, ConfigError, Obj};
use crate::host::Host;
use std::fmt;
use std::time::Duration;

/// A credential header and its value; `Debug` never prints the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// Header name (lowercase).
    pub header: String,
    value: String,
}

impl Credential {
    /// A credential sent as `header: value`.
    pub fn new(header: &str, value: &str) -> Self {
        Self { header: header.to_string(), value: value.to_string() }
    }

    /// The header value.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}: <redacted>)", self.header)
    }
}

/// One HTTP request to make (built by the pure request builders, sent by [`Upstream::dispatch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// `:method`.
    pub method: &'static str,
    /// `:path`.
    pub path: String,
    /// JSON body.
    pub body: Option<Vec<u8>>,
}

impl HttpCall {
    /// A `POST` with a JSON body.
    pub fn post(path: String, body: &serde_json::Value) -> Self {
        Self { method: "POST", path, body: serde_json::to_vec(body).ok() }
    }

    /// A `GET`.
    pub fn get(path: String) -> Self {
        Self { method: "GET", path, body: None }
    }
}

/// Where and how to call a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Envoy cluster.
    pub cluster: String,
    /// `:authority` sent (the provider's host name for TLS/virtual hosting).
    pub authority: String,
    /// Per-call timeout.
    pub timeout: Duration,
    /// Credential header, when configured and present in the environment.
    pub credential: Option<Credential>,
}

/// What an upstream's config block defaults to.
pub struct UpstreamDefaults {
    /// Default `:authority`.
    pub authority: &'static str,
    /// Default timeout.
    pub timeout: Duration,
    /// Default credential header.
    pub credential_header: &'static str,
    /// Default credential prefix (`Bearer `).
    pub credential_prefix: &'static str,
}

/// The fields [`Upstream::load`] reads (callers add their own to `known`).
pub const UPSTREAM_FIELDS: &[&str] =
    &["cluster", "authority", "timeout", "credential_env", "credential_header", "credential_prefix"];

impl Upstream {
    /// Read `cluster`, `authority`, `timeout`, `credential_env`, `credential_header`,
    /// `credential_prefix` from `o`; the credential is read from `env` now.
    pub fn load(o: &Obj<'_>, env: &dyn Fn(&str) -> Option<String>, d: &UpstreamDefaults) -> Result<Self, ConfigError> {
        let cluster = o.non_empty("cluster")?.ok_or_else(|| o.err("cluster", "missing field"))?;
        let timeout = match o.duration("timeout")? {
            Some(t) if t.is_zero() => return Err(o.err("timeout", "must be greater than 0")),
            Some(t) if t > Duration::from_secs(60) => return Err(o.err("timeout", "must be at most 60s")),
            Some(t) => t,
            None => d.timeout,
        };
        let header = o.non_empty("credential_header")?.unwrap_or_else(|| d.credential_header.to_string());
        validate_header_name(&header).map_err(|why| o.err("credential_header", why))?;
        let prefix = o.string("credential_prefix")?.unwrap_or_else(|| d.credential_prefix.to_string());
        let credential = match o.non_empty("credential_env")? {
            None => None,
            Some(name) => {
                validate_env_var_name(&name).map_err(|why| o.err("credential_env", why))?;
                match env(&name).filter(|v| !v.trim().is_empty()) {
                    Some(v) => Some(Credential::new(&header, &format!("{prefix}{}", v.trim()))),
                    None => {
                        log::warn!(
                            "{}: credential from env {name:?} unavailable (not in host_env_keys or empty); \
                             calling cluster {cluster:?} without one",
                            o.path()
                        );
                        None
                    }
                }
            }
        };
        let authority = o.non_empty("authority")?.unwrap_or_else(|| d.authority.to_string());
        Ok(Self { cluster, authority, timeout, credential })
    }

    /// The request headers of `call`.
    pub fn headers(&self, call: &HttpCall) -> Vec<(String, String)> {
        let mut out = vec![
            (":method".to_string(), call.method.to_string()),
            (":path".to_string(), call.path.clone()),
            (":authority".to_string(), self.authority.clone()),
            ("accept".to_string(), "application/json".to_string()),
        ];
        if call.body.is_some() {
            out.push(("content-type".to_string(), "application/json".to_string()));
        }
        if let Some(c) = &self.credential {
            out.push((c.header.clone(), c.value().to_string()));
        }
        out
    }

    /// Send `call`; the token, or `None` when Envoy refused (unknown cluster...).
    pub fn dispatch(&self, h: &mut dyn Host, call: &HttpCall) -> Option<u32> {
        let headers = self.headers(call);
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        h.dispatch_http_call(&self.cluster, &pairs, call.body.as_deref(), self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::read;

    const D: UpstreamDefaults = UpstreamDefaults {
        authority: "api.openai.com",
        timeout: Duration::from_secs(1),
        credential_header: "authorization",
        credential_prefix: "Bearer ",
    };

    fn load(doc: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Upstream, ConfigError> {
        read(doc.as_bytes(), |o| {
            o.known(UPSTREAM_FIELDS)?;
            Upstream::load(&o, env, &D)
        })
    }

    #[test]
    fn credential_from_env_is_never_printed() {
        let env = |n: &str| (n == "KEY").then(|| "sk-secret".to_string());
        let u = load(r#"{"cluster":"emb","credential_env":"KEY","timeout":"250ms"}"#, &env).unwrap();
        assert_eq!(u.timeout, Duration::from_millis(250));
        assert_eq!(u.credential.as_ref().unwrap().value(), "Bearer sk-secret");
        assert!(!format!("{u:?}").contains("sk-secret"));
        let call = HttpCall::post("/v1/embeddings".into(), &serde_json::json!({"input": "x"}));
        let hs = u.headers(&call);
        assert!(hs.contains(&("authorization".into(), "Bearer sk-secret".into())));
        assert!(hs.contains(&(":authority".into(), "api.openai.com".into())));
        assert!(hs.contains(&("content-type".into(), "application/json".into())));
        let missing = load(r#"{"cluster":"emb","credential_env":"NOPE"}"#, &env).unwrap();
        assert!(missing.credential.is_none());
        let raw = load(
            r#"{"cluster":"c","credential_env":"KEY","credential_header":"x-chroma-token","credential_prefix":""}"#,
            &env,
        )
        .unwrap();
        assert_eq!(raw.credential.unwrap(), Credential::new("x-chroma-token", "sk-secret"));
    }

    #[test]
    fn errors_name_the_field() {
        let env = |_: &str| None;
        for (doc, field) in [
            (r#"{}"#, "cluster"),
            (r#"{"cluster":""}"#, "cluster"),
            (r#"{"cluster":"c","timeout":"0"}"#, "timeout"),
            (r#"{"cluster":"c","timeout":"2m"}"#, "timeout"),
            (r#"{"cluster":"c","credential_env":"A-B"}"#, "credential_env"),
            (r#"{"cluster":"c","credential_header":"Bad Header"}"#, "credential_header"),
        ] {
            assert_eq!(load(doc, &env).unwrap_err().field, field, "{doc}");
        }
    }
}
