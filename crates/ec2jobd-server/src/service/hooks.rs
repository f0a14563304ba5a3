//! SNS hooks: the documents (saved by admins, checked like config, what their rules run within
//! the saver's scopes) and what becomes of each delivery, whichever transport brought it (the
//! webhook or an SQS intake): a refusal recorded and counted, a subscription confirmed through
//! the SNS API, a notification de-duplicated on its `MessageId`, matched against the hook's rules
//! and its job admitted and durably queued (key `sns:<hook>:<MessageId>`, so both transports queue
//! one job per message) before the outcome is recorded and answered. Must not: know how the
//! message arrived (HTTP headers, SQS receipts) or verify anything but what `crate::sns::verify`
//! verifies.

use ec2jobd_store::{cut_text, Delivery, Named, NewDelivery, DELIVERY_FIELD_MAX};
use serde::Serialize;
use utoipa::ToSchema;

use super::caller::Caller;
use super::error::{Kind, Result, ServiceError};
use super::jobs::Key;
use super::policy::{self, authorize, On, Op, Runs};
use crate::config::HookSection;
use crate::sns::rules::{parse_event, RuleJob};
use crate::sns::verify::SnsMessage;
use crate::state::AppState;

/// A hook as callers see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct HookInfo {
    /// Name: deliveries go to `POST /v1/sns/{name}`.
    pub name: String,
    /// `config` (read-only here) or `api`.
    pub source: String,
    /// The hook.
    pub hook: HookSection,
}

/// What became of a delivery (what the webhook answers SNS).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryAnswer {
    /// `accepted`, `duplicate`, `no_rule`, `failed`, `confirmed`, `unsubscribed`.
    pub outcome: String,
    /// The job queued (or the earlier one, for a duplicate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// A hook from config (which the API cannot change) or from the API.
pub async fn find(st: &AppState, name: &str) -> Result<Option<(&'static str, HookSection)>> {
    if let Some(h) = st.config.sns.hooks.get(name) {
        return Ok(Some(("config", h.clone())));
    }
    match st.store.get_named(Named::SnsHook, name).await? {
        None => Ok(None),
        Some(body) => serde_json::from_value(body)
            .map(|h| Some(("api", h)))
            .map_err(|e| ServiceError::new(Kind::Internal, "corrupt_hook", e.to_string())),
    }
}

/// What a hook's rules run, as far as they are written out (a rule's job, or its template's).
async fn runs(st: &AppState, h: &HookSection) -> Runs {
    let default = &st.config.default_account;
    let mut out = Runs::nothing();
    for (i, r) in h.rules.iter().enumerate() {
        let at = format!("rules[{i}].");
        let one = match (&r.job, &r.template) {
            (Some(job), _) => Runs::raw(job, default),
            (None, Some(t)) => match super::templates::load(st, t).await {
                Ok(tpl) => tpl.runs(st, t),
                Err(_) => Runs::nothing().by_template(t),
            },
            (None, None) => Runs::nothing(),
        };
        out = out.and(&at, one);
    }
    out
}

/// The hook as `caller` may see it: its rules' jobs' secrets and the values of template
/// parameters that fill secret fields redacted (see `super::redact`).
async fn shown(st: &AppState, caller: &Caller, mut h: HookSection) -> HookSection {
    if super::redact::may_see_secrets(caller) {
        return h;
    }
    for r in h.rules.iter_mut() {
        if let Some(job) = r.job.as_mut() {
            ec2jobd_spec::redact_secrets_json(job);
        }
        if let Some(t) = &r.template {
            let secret = super::templates::load(st, t)
                .await
                .map(|t| t.secret_parameters())
                .unwrap_or_default();
            for (k, v) in r.parameters.iter_mut() {
                if secret.contains(k) {
                    ec2jobd_spec::redact_value(v);
                }
            }
        }
    }
    h
}

/// Every hook, from config and from the API, as the caller may see them.
pub async fn list(st: &AppState, caller: &Caller) -> Result<Vec<HookInfo>> {
    authorize(caller, Op::ReadHooks, On::Nothing)?;
    let mut all: Vec<(String, &str, HookSection)> = st
        .config
        .sns
        .hooks
        .iter()
        .map(|(n, h)| (n.clone(), "config", h.clone()))
        .collect();
    for (name, body) in st.store.list_named(Named::SnsHook).await? {
        if let Ok(hook) = serde_json::from_value(body) {
            all.push((name, "api", hook));
        }
    }
    let mut out = Vec::with_capacity(all.len());
    for (name, source, hook) in all {
        out.push(HookInfo {
            name,
            source: source.into(),
            hook: shown(st, caller, hook).await,
        });
    }
    Ok(out)
}

/// One hook, as the caller may see it.
pub async fn get(st: &AppState, caller: &Caller, name: &str) -> Result<HookInfo> {
    authorize(caller, Op::ReadHooks, On::Nothing)?;
    let (source, hook) = find(st, name)
        .await?
        .ok_or_else(|| ServiceError::not_found(&format!("SNS hook `{name}`")))?;
    Ok(HookInfo {
        name: name.to_string(),
        source: source.into(),
        hook: shown(st, caller, hook).await,
    })
}

fn in_config(name: &str, verb: &str) -> ServiceError {
    ServiceError::new(
        Kind::Conflict,
        "hook_in_config",
        format!("hook `{name}` is defined in the config file; {verb} it there"),
    )
}

/// Creates or replaces an API-managed hook, checked like config (topics, account, notification,
/// every rule rendered against a sample message) and what its rules run against the saver's
/// scopes; true when created.
pub async fn save(st: &AppState, caller: &Caller, name: &str, hook: HookSection) -> Result<bool> {
    policy::role(caller, Op::SaveHook)?;
    if st.config.sns.hooks.contains_key(name) {
        return Err(in_config(name, "change"));
    }
    hook.check(name, &st.config).map_err(|(field, msg)| {
        let field = if field.is_empty() {
            "name".into()
        } else {
            field
        };
        ServiceError::unprocessable("invalid_hook", field, msg)
    })?;
    if let Some(n) = &hook.notify {
        super::jobs::check_topic(st, &n.topic_arn, "notify.topic_arn")?;
    }
    authorize(caller, Op::SaveHook, On::Runs(&runs(st, &hook).await))?;
    let body = serde_json::to_value(&hook).map_err(ServiceError::internal)?;
    Ok(st
        .store
        .put_named(Named::SnsHook, name, body, &caller.name)
        .await?)
}

/// Deletes an API-managed hook.
pub async fn delete(st: &AppState, caller: &Caller, name: &str) -> Result<()> {
    policy::role(caller, Op::DeleteHook)?;
    if st.config.sns.hooks.contains_key(name) {
        return Err(in_config(name, "remove"));
    }
    let missing = || ServiceError::not_found(&format!("SNS hook `{name}`"));
    let (_, hook) = find(st, name).await?.ok_or_else(missing)?;
    authorize(caller, Op::DeleteHook, On::Runs(&runs(st, &hook).await))?;
    if st
        .store
        .delete_named(Named::SnsHook, name, &caller.name)
        .await?
    {
        Ok(())
    } else {
        Err(missing())
    }
}

/// Recorded deliveries, newest first, with id below `before`.
pub async fn deliveries(
    st: &AppState,
    caller: &Caller,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<Delivery>> {
    authorize(caller, Op::ReadDeliveries, On::Nothing)?;
    Ok(st.store.list_deliveries(before, limit).await?)
}

async fn record(st: &AppState, d: NewDelivery) -> Result<()> {
    st.store.record_delivery(d).await?;
    Ok(())
}

/// The record of a delivery of `m` to `hook`, its outcome still to say.
pub fn delivery(hook: &str, m: &SnsMessage) -> NewDelivery {
    NewDelivery {
        hook: hook.to_string(),
        message_id: Some(m.message_id.clone()),
        topic_arn: Some(m.topic_arn.clone()),
        kind: Some(m.kind.clone()),
        ..Default::default()
    }
}

fn answer(outcome: &str, job_id: Option<String>) -> DeliveryAnswer {
    DeliveryAnswer {
        outcome: outcome.into(),
        job_id,
    }
}

/// Records a refusal (cut and folded by the store, counted in metrics, logged with its text
/// escaped so a sender's newlines cannot forge log lines) and returns it as a Forbidden; a
/// failure to record it is the store's error.
pub async fn refuse(
    st: &AppState,
    d: NewDelivery,
    code: &'static str,
    reason: String,
) -> ServiceError {
    let reason = cut_text(&reason, DELIVERY_FIELD_MAX);
    tracing::warn!(hook = ?d.hook, code, reason = ?reason, "SNS delivery refused");
    st.metrics.sns_refused(code);
    let d = NewDelivery {
        outcome: "rejected".into(),
        reason: Some(reason.clone()),
        code: Some(code.into()),
        ..d
    };
    match record(st, d).await {
        Ok(()) => ServiceError::forbidden("sns_rejected", reason),
        Err(e) => e,
    }
}

/// `body` verified as an SNS message from one of the hook's topics (signature, certificate,
/// `max_age`), or refused: recorded, and a Forbidden.
pub async fn verified(
    st: &AppState,
    hook: &str,
    h: &HookSection,
    body: &[u8],
    max_age: Option<std::time::Duration>,
) -> Result<SnsMessage> {
    match st
        .sns_certs
        .verify(body, &h.topics, max_age, st.now())
        .await
    {
        Ok(m) => Ok(m),
        Err(r) => {
            let raw: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let s = |k: &str| raw.get(k).and_then(|v| v.as_str()).map(String::from);
            let d = NewDelivery {
                hook: hook.to_string(),
                message_id: s("MessageId"),
                topic_arn: s("TopicArn"),
                kind: s("Type"),
                ..Default::default()
            };
            Err(refuse(st, d, r.code(), r.to_string()).await)
        }
    }
}

/// A verified message handled by its type for `caller` (`sns:<hook>` or `sqs:<intake>`): a
/// subscription confirmed through the API, an unsubscription recorded, a notification handled as
/// the module docs say. Every outcome is recorded before it is returned; an error means the
/// message should come again (store or queue unavailable, queue full, confirmation failed).
pub async fn handle(
    st: &AppState,
    caller: &Caller,
    hook: &str,
    h: &HookSection,
    m: &SnsMessage,
) -> Result<DeliveryAnswer> {
    match m.kind.as_str() {
        "SubscriptionConfirmation" => confirm(st, hook, h, m).await,
        "UnsubscribeConfirmation" => {
            let d = NewDelivery {
                outcome: "unsubscribed".into(),
                ..delivery(hook, m)
            };
            record(st, d).await?;
            Ok(answer("unsubscribed", None))
        }
        _ => notification(st, caller, hook, h, m).await,
    }
}

async fn confirm(
    st: &AppState,
    hook: &str,
    h: &HookSection,
    m: &SnsMessage,
) -> Result<DeliveryAnswer> {
    let failed = |msg: String| ServiceError::new(Kind::Unavailable, "sns_confirm_failed", msg);
    let account = h.account_or(&st.config.default_account);
    let region = crate::sns::topic_region(&m.topic_arn).unwrap_or("us-east-1");
    let sns = st
        .pool
        .sns(&account, region)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let r = sns
        .confirm_subscription()
        .topic_arn(&m.topic_arn)
        .token(m.token.clone().unwrap_or_default())
        .send()
        .await;
    match r {
        Ok(out) => {
            let d = NewDelivery {
                outcome: "confirmed".into(),
                reason: out.subscription_arn().map(|a| format!("subscription {a}")),
                ..delivery(hook, m)
            };
            record(st, d).await?;
            Ok(answer("confirmed", None))
        }
        Err(e) => {
            let msg = crate::sns::aws_error(&e);
            let d = NewDelivery {
                outcome: "failed".into(),
                reason: Some(format!("ConfirmSubscription: {msg}")),
                ..delivery(hook, m)
            };
            record(st, d).await?;
            // Unavailable: SNS sends the confirmation again.
            Err(failed(format!("ConfirmSubscription failed: {msg}")))
        }
    }
}

async fn notification(
    st: &AppState,
    caller: &Caller,
    hook: &str,
    h: &HookSection,
    m: &SnsMessage,
) -> Result<DeliveryAnswer> {
    if let Some(first) = st.store.delivered(hook, &m.message_id).await? {
        let d = NewDelivery {
            outcome: "duplicate".into(),
            job_id: first.job_id.clone(),
            rule: first.rule.clone(),
            ..delivery(hook, m)
        };
        record(st, d).await?;
        return Ok(answer("duplicate", first.job_id));
    }
    let event = parse_event(&m.message, &m.topic_arn);
    let Some((rule, event)) =
        event.and_then(|e| h.rules.iter().find(|r| r.matches(&e)).map(|r| (r, e)))
    else {
        let d = NewDelivery {
            outcome: "no_rule".into(),
            reason: Some("no rule matches this message".into()),
            ..delivery(hook, m)
        };
        record(st, d).await?;
        return Ok(answer("no_rule", None));
    };
    let spec = match rule.render(&event) {
        Err(e) => Err(e),
        Ok(RuleJob::Spec(spec)) => Ok(*spec),
        Ok(RuleJob::Template(name, params)) => super::templates::spec_of(st, &name, &params)
            .await
            .map_err(|e| e.to_string()),
    }
    .map(|mut spec| {
        if spec.notify.is_none() {
            spec.notify = h.notify.clone();
        }
        // An alarm's job goes ahead of queued bulk work unless its rule or template says otherwise.
        spec.priority.get_or_insert(st.config.sns.priority);
        spec
    });
    let key = Key::Door(format!("sns:{hook}:{}", m.message_id));
    let admitted = match spec {
        Ok(spec) => match super::jobs::submit(st, caller, spec, key).await {
            Ok(a) => Ok(a),
            // The queue is full or the store away: SNS (or the queue) delivers again later.
            Err(e) if matches!(e.kind, Kind::TooMany | Kind::Unavailable) => return Err(e),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e),
    };
    let admitted = match admitted {
        Ok(a) => a,
        Err(why) => {
            // Matched, but no job can be made from this message: retrying would not help.
            let d = NewDelivery {
                outcome: "failed".into(),
                rule: Some(rule.name.clone()),
                reason: Some(why),
                ..delivery(hook, m)
            };
            record(st, d).await?;
            return Ok(answer("failed", None));
        }
    };
    let (created, job) = admitted.queue(st).await?;
    let outcome = if created { "accepted" } else { "duplicate" };
    let d = NewDelivery {
        outcome: outcome.into(),
        rule: Some(rule.name.clone()),
        job_id: Some(job.id.clone()),
        ..delivery(hook, m)
    };
    record(st, d).await?;
    Ok(answer(outcome, Some(job.id)))
}
