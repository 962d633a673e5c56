//! The answers auth gives instead of forwarding, all in the OpenAI error shape
//! (`{"error":{"message","type","param":null,"code"}}`). No key material, token content or
//! internal detail is ever echoed; a model name the client sent is echoed, cut to 128 bytes.

use crate::jwt::Failure;
use sluice_core::errors::LocalReply;
use sluice_core::json::cut;

/// 401 `Jwt is missing` (`API key is missing` when only API keys are configured).
pub fn missing(api_keys_only: bool) -> LocalReply {
    let msg = if api_keys_only { "API key is missing" } else { "Jwt is missing" };
    let code = if api_keys_only { "api_key_missing" } else { "jwt_missing" };
    LocalReply::openai_error(401, "authentication_error", code, msg).with_header("www-authenticate", "Bearer")
}

/// 401 (503 while the keys were never loaded) for a refused token.
pub fn failure(f: Failure) -> LocalReply {
    let msg = format!("Jwt verification fails: {}", f.class());
    if f == Failure::KeysUnavailable {
        return LocalReply::openai_error(503, "server_error", f.code(), &msg).with_header("retry-after", "1");
    }
    LocalReply::openai_error(401, "authentication_error", f.code(), &msg)
        .with_header("www-authenticate", "Bearer error=\"invalid_token\"")
}

/// 503 when this worker's signature-check budget is spent (`max_verifies_per_second`):
/// refused without crypto; already verified (cached) tokens are not affected.
pub fn verify_budget() -> LocalReply {
    LocalReply::openai_error(
        503,
        "server_error",
        "jwt_verify_budget",
        "Jwt verification is over this gateway's budget; retry shortly",
    )
    .with_header("retry-after", "1")
}

/// 401 for an unknown API key.
pub fn bad_api_key() -> LocalReply {
    LocalReply::openai_error(401, "authentication_error", "invalid_api_key", "API key is invalid")
        .with_header("www-authenticate", "Bearer")
}

/// 403 `RBAC: access denied`.
pub fn rbac() -> LocalReply {
    LocalReply::openai_error(403, "permission_error", "rbac_denied", "RBAC: access denied")
}

/// 403 for a route without a policy while `require_policy` is on.
pub fn no_policy() -> LocalReply {
    LocalReply::openai_error(
        403,
        "permission_error",
        "no_policy",
        "RBAC: access denied: this route names no auth_policy and there is no default_policy",
    )
}

/// 403 for a model the caller may not use.
pub fn model_not_allowed(model: &str, provider: &str) -> LocalReply {
    LocalReply::openai_error(
        403,
        "permission_error",
        "model_not_allowed",
        &format!("model {:?} is not allowed for this caller on provider {:?}", cut(model, 128), cut(provider, 64)),
    )
}

/// 404 as OpenAI answers `GET /v1/models/{id}` for a model the caller cannot see.
pub fn model_not_found(model: &str) -> LocalReply {
    LocalReply::openai_error(
        404,
        "invalid_request_error",
        "model_not_found",
        &format!("The model '{}' does not exist or you do not have access to it.", cut(model, 128)),
    )
}

/// 502 for a models list the gateway cannot read to filter (compressed although identity was
/// asked for, or a stream): refused rather than leaked unfiltered or corrupted.
pub fn models_unreadable(why: &str) -> LocalReply {
    LocalReply::openai_error(
        502,
        "server_error",
        "models_list_unreadable",
        &format!("auth: the provider's model list cannot be filtered for this caller ({why})"),
    )
}

/// 400 for a body whose `model` cannot be checked.
pub fn invalid_body(why: &str) -> LocalReply {
    LocalReply::invalid_json(crate::NAME, why)
}

/// 400 when nothing names a model and the route has no `default_model`.
pub fn model_required() -> LocalReply {
    LocalReply::openai_error(
        400,
        "invalid_request_error",
        "model_required",
        "auth: request names no model and the route has no default_model",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn body(r: &LocalReply) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn model_not_found_is_openai_shaped_exactly() {
        let r = model_not_found("gpt-4o");
        assert_eq!(r.status, 404);
        assert_eq!(
            body(&r),
            json!({"error": {"message": "The model 'gpt-4o' does not exist or you do not have access to it.",
                             "type": "invalid_request_error", "param": null, "code": "model_not_found"}})
        );
        let long = "é".repeat(200);
        assert!(body(&model_not_found(&long))["error"]["message"].as_str().unwrap().len() < 200);
    }

    #[test]
    fn statuses_and_codes() {
        assert_eq!((failure(Failure::KeysUnavailable).status, failure(Failure::Signature).status), (503, 401));
        assert_eq!(body(&verify_budget())["error"]["code"], "jwt_verify_budget");
        assert!(verify_budget().headers.contains(&("retry-after".into(), "1".into())));
        assert_eq!(body(&no_policy())["error"]["code"], "no_policy");
        assert_eq!(models_unreadable("gzip").status, 502);
        assert_eq!(body(&missing(true))["error"]["message"], "API key is missing");
    }
}
