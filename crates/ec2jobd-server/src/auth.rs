//! Bearer tokens and roles. A token is shown once at creation; only its SHA-256 is stored, and the
//! stored hash is compared in constant time. Every `/v1` route runs behind [`authenticate`]; handlers
//! then ask the [`Caller`] for the role they need.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use ec2jobd_spec::{Action, JobSpec, Role};
use ec2jobd_store::TokenInfo;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::AppState;

/// The authenticated token behind a request.
#[derive(Debug, Clone)]
pub struct Caller(pub TokenInfo);

impl Caller {
    /// Passes when the caller's role includes `need`; else `403`.
    pub fn require(&self, need: Role) -> Result<(), ApiError> {
        if self.0.role >= need {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "token `{}` has role {}; this needs {need}",
                    self.0.name, self.0.role
                ),
            ))
        }
    }

    /// Passes when the token's scopes allow a job of `spec` (its account and action, and each
    /// workflow step's); else `403` `out_of_scope`, naming the field and what the token may use.
    pub fn may_submit(&self, spec: &JobSpec) -> Result<(), ApiError> {
        let s = &self.0.scopes;
        let mut specs = vec![(String::new(), spec, spec.account.as_deref())];
        for (i, step) in spec.steps.iter().flatten().enumerate() {
            let account = step.spec.account.as_deref().or(spec.account.as_deref());
            specs.push((format!("steps[{i}]."), &step.spec, account));
        }
        for (at, spec, account) in specs {
            if spec.action != Action::Workflow {
                self.within("action", &at, &s.actions, spec.action.as_str())?;
            }
            self.within("account", &at, &s.accounts, account.unwrap_or("default"))?;
        }
        Ok(())
    }

    /// Passes when the token's scopes allow running template `name`; else `403` `out_of_scope`.
    pub fn may_run_template(&self, name: &str) -> Result<(), ApiError> {
        self.within("template", "", &self.0.scopes.templates, name)
    }

    fn within(
        &self,
        what: &str,
        at: &str,
        allowed: &[String],
        value: &str,
    ) -> Result<(), ApiError> {
        if allowed.is_empty() || allowed.iter().any(|a| a == value) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "out_of_scope",
            format!(
                "token `{}` may use {what} {}; not `{value}`",
                self.0.name,
                allowed.join(", ")
            ),
        )
        .field(format!("{at}{what}")))
    }
}

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

/// Recently verified tokens by hash, so a busy client does not cost a database read per request.
/// Entries live for [`TokenCache::TTL`]; revoking through the API evicts at once, revoking with the
/// CLI (another process) takes effect within the TTL.
#[derive(Default)]
pub struct TokenCache(
    std::sync::Mutex<std::collections::HashMap<String, (TokenInfo, std::time::Instant)>>,
);

impl TokenCache {
    /// How long a verified token is trusted without asking the store again.
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(5);
    const MAX: usize = 10_000;

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (TokenInfo, std::time::Instant)>>
    {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, hash: &str) -> Option<TokenInfo> {
        let map = self.lock();
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < Self::TTL)
            .map(|(t, _)| t.clone())
    }

    fn put(&self, hash: String, info: TokenInfo) {
        let mut map = self.lock();
        if map.len() >= Self::MAX {
            map.retain(|_, (_, at)| at.elapsed() < Self::TTL);
        }
        if map.len() < Self::MAX {
            map.insert(hash, (info, std::time::Instant::now()));
        }
    }

    /// Forgets every entry of the named token.
    pub fn evict(&self, name: &str) {
        self.lock().retain(|_, (t, _)| t.name != name);
    }
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
    req.extensions_mut().insert(Caller(info));
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

    #[test]
    fn roles_include_lower_roles() {
        let c = |role| {
            Caller(TokenInfo {
                name: "t".into(),
                role,
                created_at: chrono::Utc::now(),
                scopes: Default::default(),
            })
        };
        assert!(c(Role::Admin).require(Role::Operator).is_ok());
        assert!(c(Role::Operator).require(Role::Operator).is_ok());
        assert_eq!(
            c(Role::Viewer).require(Role::Operator).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
    }
}
