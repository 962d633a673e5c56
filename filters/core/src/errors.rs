//! Local replies in the OpenAI error shape, so SDKs show the gateway's message:
//! `{"error":{"message":…,"type":…,"param":null,"code":…}}`.

use serde_json::json;

/// A reply the gateway sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u32,
    /// Extra response headers (`content-type` is always JSON).
    pub headers: Vec<(String, String)>,
    /// JSON body.
    pub body: Vec<u8>,
}

impl LocalReply {
    /// An OpenAI-style error reply. `kind` is the error `type` (e.g. `invalid_request_error`),
    /// `code` a stable machine-readable code (e.g. `model_not_allowed`).
    pub fn openai_error(status: u32, kind: &str, code: &str, message: &str) -> Self {
        let body = json!({
            "error": { "message": message, "type": kind, "param": null, "code": code }
        });
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }

    /// Add a header.
    #[must_use]
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// 400 for a body that is not the JSON the filter needs.
    pub fn invalid_json(filter: &str, why: &str) -> Self {
        Self::openai_error(
            400,
            "invalid_request_error",
            "invalid_json",
            &format!("{filter}: request body is not valid JSON: {why}"),
        )
    }

    /// 413 for a body over the filter's configured cap.
    pub fn body_too_large(filter: &str, limit: usize) -> Self {
        Self::openai_error(
            413,
            "invalid_request_error",
            "request_too_large",
            &format!("{filter}: request body exceeds the gateway limit of {limit} bytes"),
        )
    }

    /// 500 for a state the filter cannot continue from (a bug: never a silent pass).
    pub fn internal(filter: &str) -> Self {
        Self::openai_error(500, "server_error", "gateway_internal_error", &format!("{filter}: internal error"))
    }

    /// 500 when the filter's configuration failed to load and it fails closed.
    pub fn misconfigured(filter: &str) -> Self {
        Self::openai_error(
            500,
            "server_error",
            "gateway_misconfigured",
            &format!("{filter}: gateway filter is misconfigured"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let r = LocalReply::openai_error(403, "permission_error", "model_not_allowed", "model \"x\" is not allowed")
            .with_header("x-a", "b");
        assert_eq!(r.status, 403);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["message"], "model \"x\" is not allowed");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["error"]["code"], "model_not_allowed");
        assert!(v["error"]["param"].is_null());
        assert!(r.headers.contains(&("x-a".into(), "b".into())));
        assert!(r.headers.contains(&("content-type".into(), "application/json".into())));
    }

    #[test]
    fn helpers() {
        assert_eq!(LocalReply::body_too_large("f", 10).status, 413);
        assert_eq!(LocalReply::invalid_json("f", "eof").status, 400);
        assert_eq!(LocalReply::misconfigured("f").status, 500);
    }
}
