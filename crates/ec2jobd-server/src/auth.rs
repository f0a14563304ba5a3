//! Bearer tokens. A token is shown once at creation; only its SHA-256 is stored, and the stored
//! hash is compared in constant time. Every `/v1` route runs behind [`authenticate`], which turns
//! the token into the [`Caller`] the service decides with. Must not: decide what a caller may do
//! (`service::policy`).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::service::{Caller, Door};
use crate::state::AppState;

/// The User-Agent of the `ec2jobd` command-line client: its requests come through the CLI door.
pub const CLI_USER_AGENT: &str = concat!("ec2jobd-cli/", env!("CARGO_PKG_VERSION"));

/// A new random token (`ejd_` + 64 hex digits) and its SHA-256 (hex).
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = format!("ejd_{}", hex::encode(bytes));
    let hash = hash_token(&token);
    (token, hash)
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Middleware: resolves `Authorization: Bearer …` to a [`Caller`] or answers 401.
pub async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let unauthorized =
        |d: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", d).field("Authorization");
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>` header"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    let hash = hash_token(token);
    let info = match state.tokens.get(&hash) {
        Some(info) => info,
        None => match state.store.token_by_hash(&hash).await? {
            Some((info, stored)) if bool::from(stored.as_bytes().ct_eq(hash.as_bytes())) => {
                state.tokens.put(hash, info.clone());
                info
            }
            _ => return Err(unauthorized("unknown or revoked token")),
        },
    };
    let door = match req.headers().get(header::USER_AGENT) {
        Some(ua) if ua.as_bytes() == CLI_USER_AGENT.as_bytes() => Door::Cli,
        _ => Door::Rest,
    };
    req.extensions_mut().insert(Caller::token(info, door));
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let (a, ha) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("ejd_") && a.len() == 68);
        assert_eq!(hash_token(&a), ha);
        assert_ne!(ha, a, "the hash is not the token");
    }
}
