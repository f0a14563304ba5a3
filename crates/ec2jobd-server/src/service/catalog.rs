//! The catalog and the guardrails behind it: per account, optional allowlists of images,
//! instance types and regions (what scheduler connectors call AWS_IMAGES / AWS_SIZES /
//! AWS_REGIONS). A job naming anything outside them is refused before anything is queued (422
//! naming the value and the field); the catalog shows callers what they may ask for. Must not:
//! show credentials, roles or endpoints.

use ec2jobd_spec::{Action, JobSpec};
use serde::Serialize;
use utoipa::ToSchema;

use super::caller::Caller;
use super::error::{Result, ServiceError};
use super::policy::{authorize, On, Op};
use crate::config::{AccountSection, Config};
use crate::state::AppState;

/// What jobs may use in one account. An empty list means "anything".
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountCatalog {
    /// Account name, as jobs give it in `account`.
    pub name: String,
    /// Region of jobs that name none.
    pub region: String,
    /// AMIs `run_instances` may launch (`ami-0fed*` matches a prefix).
    pub images: Vec<String>,
    /// Instance types jobs may launch or resize to (`t3.*` matches a prefix).
    pub instance_types: Vec<String>,
    /// Regions jobs may use.
    pub regions: Vec<String>,
}

/// Body of `GET /v1/catalog`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Catalog {
    /// Account of jobs that name none.
    pub default_account: String,
    /// Every configured account with its allowlists (no credentials, roles or endpoints).
    pub accounts: Vec<AccountCatalog>,
    /// Actions jobs may ask for.
    pub actions: Vec<Action>,
}

/// What jobs may ask for.
pub fn catalog(st: &AppState, caller: &Caller) -> Result<Catalog> {
    authorize(caller, Op::ReadCatalog, On::Nothing)?;
    Ok(build(&st.config))
}

fn build(cfg: &Config) -> Catalog {
    Catalog {
        default_account: cfg.default_account.clone(),
        accounts: cfg
            .accounts
            .iter()
            .map(|(name, a)| AccountCatalog {
                name: name.clone(),
                region: a.region.clone(),
                images: a.allowed_images.clone(),
                instance_types: a.allowed_instance_types.clone(),
                regions: a.allowed_regions.clone(),
            })
            .collect(),
        actions: Action::ALL.to_vec(),
    }
}

/// Whether `value` is in an allowlist (empty: anything; an entry ending in `*` matches a prefix).
pub fn allowed(list: &[String], value: &str) -> bool {
    list.is_empty()
        || list.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => p == value,
        })
}

/// Refuses a normalised spec (account and region filled in) that names a region, image or instance
/// type outside the account's allowlists.
pub fn check(name: &str, acct: &AccountSection, spec: &JobSpec) -> Result<()> {
    let mut checks: Vec<(&str, &str, &[String], &str)> = Vec::new();
    if let Some(r) = spec.region.as_deref() {
        checks.push(("region", r, &acct.allowed_regions, "allowed_regions"));
    }
    let act = spec.action_spec()?;
    if let Some(img) = act.image_id() {
        checks.push((
            "params.image_id",
            img,
            &acct.allowed_images,
            "allowed_images",
        ));
    }
    if let Some(t) = act.instance_type() {
        checks.push((
            "params.instance_type",
            t,
            &acct.allowed_instance_types,
            "allowed_instance_types",
        ));
    }
    for (field, value, list, key) in checks {
        if !allowed(list, value) {
            return Err(ServiceError::unprocessable(
                "not_allowed",
                field,
                format!(
                    "`{value}` is not allowed for account `{name}` (accounts.{name}.{key}: {}); see GET /v1/catalog",
                    list.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn empty_allows_all_and_star_matches_a_prefix() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(allowed(&[], "anything"));
        assert!(allowed(&l(&["t3.*", "m7i.large"]), "t3.nano"));
        assert!(allowed(&l(&["t3.*", "m7i.large"]), "m7i.large"));
        assert!(!allowed(&l(&["t3.*", "m7i.large"]), "m7i.xlarge"));
        assert!(!allowed(&l(&["t3.*"]), "t3a.nano"));
    }
}
