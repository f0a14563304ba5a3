//! API tokens: made (the secret shown once, only its SHA-256 kept, never broader than its
//! maker's role and scopes), listed (never secrets) and revoked (its cached entry and dashboard
//! sessions stop working at once). Must not: know how a door authenticates (that is
//! `crate::auth`).

use ec2jobd_spec::Role;
use ec2jobd_store::{Scopes, TokenInfo};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::caller::Caller;
use super::error::{Result, ServiceError};
use super::policy::{self, authorize, On, Op};
use crate::state::AppState;

/// A token to make (body of `POST /v1/tokens`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Unique name (1-64 of letters, digits, `.`, `_`, `-`).
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub name: String,
    /// Role of the token.
    pub role: Role,
    /// What it may use beyond its role: accounts, actions, templates (each absent or empty: any).
    #[serde(default)]
    pub scopes: Scopes,
}

/// A created token: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Creation time.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// What it may use beyond its role (absent: anything its role allows).
    #[serde(skip_serializing_if = "Scopes::is_empty")]
    pub scopes: Scopes,
    /// The secret to send as `Authorization: Bearer <token>`.
    pub token: String,
}

/// Checks scopes (also used by the CLI): every action one, every account configured
/// (`is_account`), every template a valid name. Returns what is wrong.
pub fn check_scopes(scopes: &Scopes, is_account: impl Fn(&str) -> bool) -> Result<(), String> {
    if let Some(a) = scopes
        .actions
        .iter()
        .find(|a| ec2jobd_spec::Action::parse(a).is_none())
    {
        return Err(format!("scopes.actions: `{a}` is not an action"));
    }
    if let Some(a) = scopes.accounts.iter().find(|a| !is_account(a)) {
        return Err(format!(
            "scopes.accounts: `{a}` is not a configured account"
        ));
    }
    if let Some(t) = scopes.templates.iter().find(|t| !valid_token_name(t)) {
        return Err(format!("scopes.templates: `{t}` is not a template name"));
    }
    Ok(())
}

/// Checks a token name (also used by the CLI).
pub fn valid_token_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Makes a token: checks the name and scopes, and that it is no broader than its maker; stores
/// only the secret's hash and returns the secret this once.
pub async fn create(st: &AppState, caller: &Caller, req: NewToken) -> Result<CreatedToken> {
    policy::role(caller, Op::CreateToken)?;
    if !valid_token_name(&req.name) {
        return Err(ServiceError::unprocessable(
            "invalid_name",
            "name",
            "1-64 letters, digits, `.`, `_` or `-`",
        ));
    }
    check_scopes(&req.scopes, |a| st.config.accounts.contains_key(a))
        .map_err(|m| ServiceError::unprocessable("invalid_scopes", "scopes", m))?;
    authorize(caller, Op::CreateToken, On::Token(req.role, &req.scopes))?;
    let (token, hash) = crate::auth::new_token();
    let info = st
        .store
        .create_token(&req.name, req.role, &hash, &req.scopes, &caller.name)
        .await?;
    tracing::info!(name = %info.name, role = %info.role, by = %caller.name, "token created");
    Ok(CreatedToken {
        name: info.name,
        role: info.role,
        created_at: info.created_at,
        scopes: info.scopes,
        token,
    })
}

/// Every token (names, roles, scopes; never secrets).
pub async fn list(st: &AppState, caller: &Caller) -> Result<Vec<TokenInfo>> {
    authorize(caller, Op::ListTokens, On::Nothing)?;
    Ok(st.store.list_tokens().await?)
}

/// Revokes token `name`; its cached entry and its dashboard sessions stop working at once.
pub async fn revoke(st: &AppState, caller: &Caller, name: &str) -> Result<()> {
    authorize(caller, Op::RevokeToken, On::Nothing)?;
    let revoked = st.store.revoke_token(name, &caller.name).await?;
    st.tokens.evict(name);
    if revoked {
        tracing::info!(%name, by = %caller.name, "token revoked");
        Ok(())
    } else {
        Err(ServiceError::not_found(&format!("token `{name}`")))
    }
}
