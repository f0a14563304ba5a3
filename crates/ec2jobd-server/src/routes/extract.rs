//! What every route reads from a request the same way: JSON bodies (refusing arrays, naming the
//! offending field), the content type, the `Idempotency-Key` header, the `wait` query parameter.
//! Must not: decide anything about what the request asks (the service does).

use std::time::Duration;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::Query;
use axum::http::{header, HeaderMap, StatusCode};

use crate::error::ApiError;

/// Decodes a JSON body into `T`, naming the offending field on failure.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde would read a JSON array as a struct by position; only objects are requests here.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                "the body is empty; send a JSON object",
            )
            .field("body"))
        }
        Some(b'{') => {}
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not_an_object",
                "the body must be a JSON object",
            )
            .field("body"))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_error(&path, &inner)
    })?;
    de.end().map_err(|e| json_error(".", &e))?;
    Ok(value)
}

fn json_error(path: &str, e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let msg = e.to_string();
    if matches!(
        e.classify(),
        Category::Syntax | Category::Eof | Category::Io
    ) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {msg}"),
        )
        .field("body");
    }
    // serde names the unknown or missing field in its message, not in the path.
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|p| msg.split_once(p).and_then(|(_, rest)| rest.split_once('`')))
        .map(|(name, _)| name.to_string());
    let field = match (path, named) {
        (p, Some(n)) if p == n || p.ends_with(&format!(".{n}")) => p.to_string(),
        (".", Some(n)) => n,
        (p, Some(n)) => format!("{p}.{n}"),
        (".", None) => "body".to_string(),
        (p, None) => p.to_string(),
    };
    let code = if msg.starts_with("unknown field") {
        "unknown_field"
    } else if msg.starts_with("missing field") {
        "missing_field"
    } else if field == "action" && msg.starts_with("unknown variant") {
        "unknown_action"
    } else {
        "invalid_field"
    };
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, msg).field(field)
}

/// A body that could not be read (too large, cut off).
pub fn body_error(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than http.body_limit",
        )
        .field("body")
    } else {
        ApiError::new(r.status(), "bad_body", r.body_text()).field("body")
    }
}

/// Requires `Content-Type: application/json` (or none).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(()),
        Some(v) => {
            let ok = v
                .to_str()
                .ok()
                .and_then(|s| s.split(';').next())
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
            if ok {
                Ok(())
            } else {
                Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the body as `Content-Type: application/json`",
                )
                .field("Content-Type"))
            }
        }
    }
}

/// The `Idempotency-Key` header, if any: 1-255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key",
            "must be 1-255 visible ASCII characters",
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

/// Most a submission may be held with `?wait=`.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The `wait` query parameter (the only one `POST /v1/jobs` and template runs take); given twice
/// it is refused.
pub fn wait_param(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Option<Duration>, ApiError> {
    let Query(params) =
        query.map_err(|e| ApiError::bad_request("invalid_query", "query", e.body_text()))?;
    let mut wait = None;
    for (k, v) in params {
        if k != "wait" {
            return Err(ApiError::bad_request(
                "unknown_parameter",
                &k,
                format!("unknown query parameter `{k}` (wait)"),
            ));
        }
        if wait.is_some() {
            return Err(ApiError::bad_request(
                "invalid_wait",
                "wait",
                "`wait` is given more than once",
            ));
        }
        let d = ec2jobd_spec::parse_duration(&v)
            .map_err(|m| ApiError::bad_request("invalid_wait", "wait", m))?;
        if d > MAX_WAIT {
            return Err(ApiError::bad_request("invalid_wait", "wait", "at most 1h"));
        }
        wait = Some(d);
    }
    Ok(wait)
}
