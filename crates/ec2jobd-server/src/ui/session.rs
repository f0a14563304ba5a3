//! Dashboard sessions: signing in with an API token answers a session cookie (HttpOnly,
//! SameSite=Strict, Secure when configured or forwarded over https); [`require`] turns the cookie
//! back into the same [`Caller`] the API uses, so roles and scopes are checked exactly as for
//! `/v1`. Every state-changing form carries the session's CSRF token, checked here before any
//! handler runs, and a sign-in must come from the dashboard's own page (login CSRF). The cookie's
//! secret and the token are stored only as SHA-256 hashes. This module
//! never touches `/v1`, whose authentication ([`crate::auth`]) knows nothing of cookies.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use ec2jobd_store::NewSession;
use rand::RngCore;
use subtle::ConstantTimeEq;

use super::page::{self, Csrf};
use crate::auth::hash_token;
use crate::error::ApiError;
use crate::service::{Caller, Door};
use crate::state::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "ec2jobd_session";

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn secure(state: &AppState, headers: &HeaderMap) -> bool {
    state.config.ui.secure_cookie
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

fn set_cookie(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let s = format!(
        "{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `GET /ui/signin`.
pub async fn signin_form() -> Response {
    page::signin(None, StatusCode::OK)
}

/// Whether a sign-in was sent by a page of this site: a browser says where a form was posted
/// from (`Sec-Fetch-Site`, else `Origin`), and a form posted from another site would sign the
/// victim's browser into the sender's session (login CSRF; `SameSite` does not stop a cookie being
/// *set*). A request saying neither (curl, an old browser) is let through: it carries no victim's
/// browser state.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    let Some(origin) = text("origin") else {
        return true;
    };
    let origin_host = origin
        .split_once("://")
        .map(|(_, h)| h.trim_end_matches('/'));
    let host = text("x-forwarded-host")
        .and_then(|h| h.split(',').next())
        .or_else(|| text("host"))
        .map(str::trim);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// `POST /ui/signin`: an API token in, a session cookie out (or the form again, 401). Nothing is
/// stored for a token that does not verify, or for a form posted from another site (403).
pub async fn signin(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
) -> Result<Response, ApiError> {
    if !same_origin(&headers) {
        return Ok(page::problem(
            StatusCode::FORBIDDEN,
            "This sign-in was sent from another site; sign in from the dashboard's own page.",
        ));
    }
    let token = form
        .ok()
        .and_then(|Form(f)| f.into_iter().find(|(k, _)| k == "token").map(|(_, v)| v))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty() && t.len() <= 256);
    let Some(token) = token else {
        return Ok(page::signin(
            Some("Paste an API token."),
            StatusCode::BAD_REQUEST,
        ));
    };
    let token_hash = hash_token(&token);
    let known = match state.store.token_by_hash(&token_hash).await? {
        Some((_, stored)) => bool::from(stored.as_bytes().ct_eq(token_hash.as_bytes())),
        None => false,
    };
    if !known {
        return Ok(page::signin(
            Some("Unknown or revoked token."),
            StatusCode::UNAUTHORIZED,
        ));
    }
    let secret = random_hex();
    let ttl = state.config.ui.session_ttl.0;
    let now = state.clock.now_ms();
    state
        .store
        .create_session(&NewSession {
            session_sha256: hash_token(&secret),
            token_sha256: token_hash,
            csrf: random_hex(),
            created_at_ms: now,
            expires_at_ms: now + ttl.as_millis() as i64,
        })
        .await?;
    let mut r = Redirect::to("/ui/").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&secret, ttl.as_secs(), secure(&state, &headers)),
    );
    Ok(r)
}

/// `POST /ui/signout` (behind [`require`]): ends the session and clears the cookie.
pub async fn signout(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(secret) = cookie_of(&headers) {
        state.store.end_session(&hash_token(&secret)).await?;
    }
    let mut r = Redirect::to("/ui/signin").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie("", 0, secure(&state, &headers)),
    );
    Ok(r)
}

/// Where an unsigned request goes: the sign-in page (htmx requests are told to go there).
fn to_signin(req: &Request) -> Response {
    if req.headers().contains_key("hx-request") {
        let mut r = StatusCode::UNAUTHORIZED.into_response();
        r.headers_mut()
            .insert("hx-redirect", HeaderValue::from_static("/ui/signin"));
        return r;
    }
    if req.method() == Method::GET {
        return Redirect::to("/ui/signin").into_response();
    }
    page::problem(StatusCode::UNAUTHORIZED, "Sign in first.")
}

/// Middleware for every dashboard route but sign-in and the assets: resolves the session cookie to
/// a [`Caller`] and its [`Csrf`], and refuses (403) a state-changing request whose form lacks the
/// session's CSRF token. The form body is read here and handed on unchanged.
pub async fn require(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(secret) = cookie_of(req.headers()) else {
        return to_signin(&req);
    };
    let session = match state
        .store
        .session(&hash_token(&secret), state.clock.now_ms())
        .await
    {
        Ok(Some(s)) => s,
        Ok(None) => return to_signin(&req),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let (mut parts, body) = req.into_parts();
    let body = if parts.method == Method::GET || parts.method == Method::HEAD {
        body
    } else {
        let limit = state.config.http.body_limit;
        let bytes = match axum::body::to_bytes(body, limit).await {
            Ok(b) => b,
            Err(_) => return page::problem(StatusCode::PAYLOAD_TOO_LARGE, "Form too large."),
        };
        let given = form_field(&bytes, "csrf").unwrap_or_default();
        if !bool::from(given.as_bytes().ct_eq(session.csrf.as_bytes())) {
            return page::problem(
                StatusCode::FORBIDDEN,
                "This form is stale or was not sent by the dashboard (CSRF token missing or wrong); reload the page.",
            );
        }
        axum::body::Body::from(bytes)
    };
    parts
        .extensions
        .insert(Caller::token(session.token, Door::Dashboard));
    parts.extensions.insert(Csrf(session.csrf));
    next.run(Request::from_parts(parts, body)).await
}

/// One field of a urlencoded form.
pub fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}
