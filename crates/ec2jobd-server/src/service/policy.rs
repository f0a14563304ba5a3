//! The one policy point: for every operation, which role it needs and what its scopes are
//! compared with ([`TABLE`]), decided by [`authorize`] for every door alike. Scopes are compared
//! with what the operation *will run*: a submission's jobs, a template or schedule as saved (the
//! saver's scopes) and as run (the runner's), a cancelled job's action and account, a new token's
//! role and scopes (never broader than its creator's). Must not: read the store or config (the
//! caller passes in what is decided on), or know which door asked.

use ec2jobd_spec::{Action, Job, JobSpec, Role};
use ec2jobd_store::Scopes;
use serde_json::Value;

use super::caller::Caller;
use super::error::{Result, ServiceError};

/// Every operation the service offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Jobs, their events, outputs and reports.
    ReadJobs,
    /// Queue a job from a spec.
    Submit,
    /// Cancel a job.
    Cancel,
    /// Queue a job again with a finished job's spec.
    Rerun,
    /// Saved templates.
    ReadTemplates,
    /// Create or replace a template.
    SaveTemplate,
    /// Delete a template.
    DeleteTemplate,
    /// Queue a job from a template.
    RunTemplate,
    /// Schedules and their overrides.
    ReadSchedules,
    /// Create or replace a schedule.
    SaveSchedule,
    /// Delete a schedule.
    DeleteSchedule,
    /// Pause or resume a schedule.
    PauseSchedule,
    /// Hold a window's instances in a state until a time.
    AddOverride,
    /// End an override early.
    EndOverride,
    /// SNS hooks.
    ReadHooks,
    /// Create or replace an SNS hook.
    SaveHook,
    /// Delete an SNS hook.
    DeleteHook,
    /// SNS deliveries.
    ReadDeliveries,
    /// API tokens (never their secrets).
    ListTokens,
    /// Make a token.
    CreateToken,
    /// Revoke a token.
    RevokeToken,
    /// The audit log.
    ReadAudit,
    /// The catalog of accounts, allowlists and actions.
    ReadCatalog,
    /// Secret fields (`user_data`) of stored documents (templates, schedules, hooks), which an
    /// admin edits; a job's secrets are shown to nobody.
    SeeSecrets,
}

/// What the caller's scopes are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoped {
    /// Nothing: the role decides.
    No,
    /// Every job the operation will run (action and account), and the template it runs.
    Runs,
    /// As `Runs`, and not for a token scoped to templates: it may only run its templates.
    Direct,
    /// The job's action and account; a token scoped to templates only its own jobs.
    Job,
    /// The token made: its role and scopes no broader than the caller's.
    Token,
}

/// One row of the policy.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// The operation.
    pub op: Op,
    /// The least role it needs.
    pub role: Role,
    /// What the scopes are compared with.
    pub scoped: Scoped,
}

const fn rule(op: Op, role: Role, scoped: Scoped) -> Rule {
    Rule { op, role, scoped }
}

/// The policy, one row per operation.
pub const TABLE: &[Rule] = &[
    rule(Op::ReadJobs, Role::Viewer, Scoped::No),
    rule(Op::Submit, Role::Operator, Scoped::Direct),
    rule(Op::Cancel, Role::Operator, Scoped::Job),
    rule(Op::Rerun, Role::Operator, Scoped::Direct),
    rule(Op::ReadTemplates, Role::Viewer, Scoped::No),
    rule(Op::SaveTemplate, Role::Admin, Scoped::Runs),
    rule(Op::DeleteTemplate, Role::Admin, Scoped::Runs),
    rule(Op::RunTemplate, Role::Operator, Scoped::Runs),
    rule(Op::ReadSchedules, Role::Viewer, Scoped::No),
    rule(Op::SaveSchedule, Role::Admin, Scoped::Runs),
    rule(Op::DeleteSchedule, Role::Admin, Scoped::Runs),
    rule(Op::PauseSchedule, Role::Admin, Scoped::Runs),
    rule(Op::AddOverride, Role::Operator, Scoped::Runs),
    rule(Op::EndOverride, Role::Operator, Scoped::Runs),
    rule(Op::ReadHooks, Role::Viewer, Scoped::No),
    rule(Op::SaveHook, Role::Admin, Scoped::Runs),
    rule(Op::DeleteHook, Role::Admin, Scoped::Runs),
    rule(Op::ReadDeliveries, Role::Viewer, Scoped::No),
    rule(Op::ListTokens, Role::Admin, Scoped::No),
    rule(Op::CreateToken, Role::Admin, Scoped::Token),
    rule(Op::RevokeToken, Role::Admin, Scoped::No),
    rule(Op::ReadAudit, Role::Admin, Scoped::No),
    rule(Op::ReadCatalog, Role::Viewer, Scoped::No),
    rule(Op::SeeSecrets, Role::Admin, Scoped::No),
];

/// The row of `op`.
pub fn rule_of(op: Op) -> &'static Rule {
    TABLE.iter().find(|r| r.op == op).unwrap_or(&TABLE[0])
}

/// One job an operation would run: where its fields are (`steps[1].`), its action and account
/// (`None`: not known until it runs, a placeholder: only an unscoped caller may save it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runs {
    /// Each job: field prefix, action, account.
    pub jobs: Vec<(String, Option<Action>, Option<String>)>,
    /// The template it runs.
    pub template: Option<String>,
}

impl Runs {
    /// Nothing runs.
    pub fn nothing() -> Runs {
        Runs {
            jobs: Vec::new(),
            template: None,
        }
    }

    /// A spec's job (and each workflow step's, in its account or the workflow's); an account
    /// left out is `default_account`'s.
    pub fn spec(spec: &JobSpec, default_account: &str) -> Runs {
        let top = spec.account.as_deref().unwrap_or(default_account);
        let mut jobs = Vec::new();
        if spec.action != Action::Workflow {
            jobs.push((String::new(), Some(spec.action), Some(top.to_string())));
        }
        for (i, step) in spec.steps.iter().flatten().enumerate() {
            let account = step.spec.account.as_deref().unwrap_or(top);
            jobs.push((
                format!("steps[{i}]."),
                Some(step.spec.action),
                Some(account.to_string()),
            ));
        }
        Runs {
            jobs,
            template: None,
        }
    }

    /// A spec as saved, before its placeholders are filled (a template's, an SNS rule's): the
    /// action and account where they are written out, unknown where a placeholder stands.
    pub fn raw(spec: &Value, default_account: &str) -> Runs {
        let literal = |v: Option<&Value>| -> Option<Option<String>> {
            match v {
                None => Some(None),
                // `${p}` (templates) and `{p}` (SNS rules): names never hold a brace.
                Some(Value::String(s)) if !s.contains('{') => Some(Some(s.clone())),
                Some(_) => None,
            }
        };
        let action = |v: &Value| {
            literal(v.get("action"))
                .flatten()
                .and_then(|a| Action::parse(&a))
        };
        let top =
            literal(spec.get("account")).map(|a| a.unwrap_or_else(|| default_account.to_string()));
        let mut jobs = Vec::new();
        let steps = spec.get("steps").and_then(Value::as_array);
        match action(spec) {
            Some(Action::Workflow) => {}
            None if steps.is_some() => {}
            a => jobs.push((String::new(), a, top.clone())),
        }
        for (i, step) in steps.into_iter().flatten().enumerate() {
            let account = match literal(step.get("account")) {
                Some(Some(a)) => Some(a),
                Some(None) => top.clone(),
                None => None,
            };
            jobs.push((format!("steps[{i}]."), action(step), account));
        }
        Runs {
            jobs,
            template: None,
        }
    }

    /// The same, run by template `name`.
    pub fn by_template(mut self, name: &str) -> Runs {
        self.template = Some(name.to_string());
        self
    }

    /// These and `other`'s jobs (a schedule's two windows, a hook's rules), fields under `at`.
    pub fn and(mut self, at: &str, other: Runs) -> Runs {
        self.jobs.extend(
            other
                .jobs
                .into_iter()
                .map(|(f, a, acc)| (format!("{at}{f}"), a, acc)),
        );
        if self.template.is_none() {
            self.template = other.template;
        }
        self
    }
}

/// What an operation is about, for its scopes.
#[derive(Debug, Clone, Copy)]
pub enum On<'a> {
    /// Nothing scoped.
    Nothing,
    /// What it will run.
    Runs(&'a Runs),
    /// An existing job.
    Job(&'a Job),
    /// A token to be made.
    Token(Role, &'a Scopes),
}

fn out_of_scope(caller: &Caller, what: &str, allowed: &[String], value: &str) -> ServiceError {
    ServiceError::forbidden(
        "out_of_scope",
        format!(
            "token `{}` may use {what} {}; not `{value}`",
            caller.name,
            allowed.join(", ")
        ),
    )
}

fn within(
    caller: &Caller,
    at: &str,
    what: &str,
    allowed: &[String],
    value: Option<&str>,
) -> Result<()> {
    if allowed.is_empty() {
        return Ok(());
    }
    match value {
        Some(v) if allowed.iter().any(|a| a == v) => Ok(()),
        Some(v) => Err(out_of_scope(caller, what, allowed, v).field(format!("{at}{what}"))),
        None => Err(ServiceError::forbidden(
            "out_of_scope",
            format!(
                "token `{}` may use {what} {} only; a placeholder cannot be checked against that",
                caller.name,
                allowed.join(", ")
            ),
        )
        .field(format!("{at}{what}"))),
    }
}

/// Whether `caller`'s role allows `op` at all (a door may ask before it reads the request, so a
/// viewer's malformed body is still a 403); [`authorize`] decides the rest.
pub fn role(caller: &Caller, op: Op) -> Result<&'static Rule> {
    let rule = rule_of(op);
    if caller.role < rule.role {
        return Err(ServiceError::forbidden(
            "forbidden",
            format!(
                "token `{}` has role {}; this needs {}",
                caller.name, caller.role, rule.role
            ),
        ));
    }
    Ok(rule)
}

/// Whether `caller` may do `op` on `on`: its role, then its scopes as [`TABLE`] says; else a
/// 403-kind refusal naming the field (`action`, `steps[0].account`, `template`, `role`, …).
pub fn authorize(caller: &Caller, op: Op, on: On<'_>) -> Result<()> {
    let rule = role(caller, op)?;
    let s = &caller.scopes;
    match (rule.scoped, on) {
        (Scoped::No, On::Nothing) => Ok(()),
        (Scoped::Direct, On::Runs(_)) if !s.templates.is_empty() => Err(ServiceError::forbidden(
            "out_of_scope",
            format!(
                "token `{}` may only run templates {}",
                caller.name,
                s.templates.join(", ")
            ),
        )
        .field("template")),
        (Scoped::Runs | Scoped::Direct, On::Runs(runs)) => runs_within(caller, runs),
        (Scoped::Job, On::Job(job)) => {
            if !s.templates.is_empty() && job.created_by.as_deref() != Some(caller.name.as_str()) {
                return Err(ServiceError::forbidden(
                    "out_of_scope",
                    format!(
                        "token `{}` may only run templates {}, and act on its own jobs",
                        caller.name,
                        s.templates.join(", ")
                    ),
                ));
            }
            runs_within(caller, &Runs::spec(&job.spec, ""))
        }
        (Scoped::Token, On::Token(role, scopes)) => no_broader(caller, role, scopes),
        // A rule compared with something else than it is about: refuse rather than guess.
        (_, on) => Err(ServiceError::internal(format!(
            "policy for {op:?} asked about {on:?}"
        ))),
    }
}

/// Every job of `runs` within the caller's action and account scopes, its template within the
/// template scope.
fn runs_within(caller: &Caller, runs: &Runs) -> Result<()> {
    let s = &caller.scopes;
    for (at, action, account) in &runs.jobs {
        within(caller, at, "action", &s.actions, action.map(|a| a.as_str()))?;
        within(caller, at, "account", &s.accounts, account.as_deref())?;
    }
    if let Some(t) = &runs.template {
        within(caller, "", "template", &s.templates, Some(t))?;
    }
    Ok(())
}

/// A token of `role` and `scopes` is no broader than the caller: no higher role, and in each kind
/// the caller is scoped in, scoped within the caller's.
fn no_broader(caller: &Caller, role: Role, scopes: &Scopes) -> Result<()> {
    if role > caller.role {
        return Err(ServiceError::forbidden(
            "broader_than_creator",
            format!(
                "token `{}` has role {}; it cannot make a {role} token",
                caller.name, caller.role
            ),
        )
        .field("role"));
    }
    let s = &caller.scopes;
    for (what, mine, theirs) in [
        ("accounts", &s.accounts, &scopes.accounts),
        ("actions", &s.actions, &scopes.actions),
        ("templates", &s.templates, &scopes.templates),
    ] {
        if !mine.is_empty() && (theirs.is_empty() || theirs.iter().any(|t| !mine.contains(t))) {
            return Err(ServiceError::forbidden(
                "broader_than_creator",
                format!(
                    "token `{}` may use {what} {} only; a token it makes must be scoped within them",
                    caller.name,
                    mine.join(", ")
                ),
            )
            .field(format!("scopes.{what}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Door;

    fn caller(role: Role, scopes: Scopes) -> Caller {
        Caller {
            name: "t".into(),
            role,
            scopes,
            door: Door::Rest,
        }
    }

    fn scopes(accounts: &[&str], actions: &[&str], templates: &[&str]) -> Scopes {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Scopes {
            accounts: v(accounts),
            actions: v(actions),
            templates: v(templates),
        }
    }

    fn field(r: Result<()>) -> Option<String> {
        r.err().map(|e| e.field.unwrap_or(e.code))
    }

    #[test]
    fn every_operation_has_one_row() {
        let mut seen = std::collections::HashSet::new();
        for r in TABLE {
            assert!(seen.insert(r.op), "{:?} twice", r.op);
        }
        assert_eq!(seen.len(), TABLE.len());
        assert_eq!(rule_of(Op::SeeSecrets).role, Role::Admin);
    }

    #[test]
    fn roles_include_lower_roles() {
        let op = caller(Role::Operator, Scopes::default());
        assert!(role(&caller(Role::Admin, Scopes::default()), Op::Submit).is_ok());
        assert!(role(&op, Op::Submit).is_ok());
        assert_eq!(
            field(authorize(
                &caller(Role::Viewer, Scopes::default()),
                Op::ReadAudit,
                On::Nothing
            )),
            Some("forbidden".into())
        );
    }

    #[test]
    fn scopes_are_compared_with_what_will_run() {
        let spec: JobSpec =
            serde_json::from_value(serde_json::json!({"account": "prod", "steps": [
            {"action": "describe_instances", "targets": {"instance_ids": "i-01234567"}},
            {"action": "reboot_instances", "targets": {"instance_ids": "i-01234567"}}]}))
            .unwrap();
        let runs = Runs::spec(&spec, "default");
        let c = caller(
            Role::Operator,
            scopes(&["prod"], &["describe_instances"], &[]),
        );
        assert_eq!(
            field(authorize(&c, Op::Submit, On::Runs(&runs))),
            Some("steps[1].action".into())
        );
        let c = caller(
            Role::Operator,
            scopes(&["prod"], &["describe_instances", "reboot_instances"], &[]),
        );
        assert!(authorize(&c, Op::Submit, On::Runs(&runs)).is_ok());
        // A template-scoped token runs its templates only, never a spec of its own.
        let t = caller(Role::Operator, scopes(&[], &[], &["nightly"]));
        assert_eq!(
            field(authorize(&t, Op::Submit, On::Runs(&runs))),
            Some("template".into())
        );
        assert!(authorize(
            &t,
            Op::RunTemplate,
            On::Runs(&runs.clone().by_template("nightly"))
        )
        .is_ok());
        assert_eq!(
            field(authorize(
                &t,
                Op::RunTemplate,
                On::Runs(&runs.by_template("other"))
            )),
            Some("template".into())
        );
    }

    #[test]
    fn a_placeholder_account_is_only_for_callers_scoped_to_no_account() {
        let raw = serde_json::json!({"action": "stop_instances", "account": "${acct}"});
        let runs = Runs::raw(&raw, "default");
        assert_eq!(
            runs.jobs,
            [(String::new(), Some(Action::StopInstances), None)]
        );
        let scoped = caller(Role::Admin, scopes(&["default"], &[], &[]));
        assert_eq!(
            field(authorize(&scoped, Op::SaveTemplate, On::Runs(&runs))),
            Some("account".into())
        );
        assert!(authorize(
            &caller(Role::Admin, Scopes::default()),
            Op::SaveTemplate,
            On::Runs(&runs)
        )
        .is_ok());
        let rule = serde_json::json!({"action": "reboot_instances", "account": "{account_id}"});
        assert_eq!(
            Runs::raw(&rule, "default").jobs[0].2,
            None,
            "SNS rule placeholders too"
        );
        let plain = serde_json::json!({"action": "reboot_instances"});
        assert_eq!(
            Runs::raw(&plain, "default").jobs[0].2.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn a_token_is_never_broader_than_its_maker() {
        let maker = caller(Role::Admin, scopes(&["prod"], &[], &[]));
        let none = Scopes::default();
        assert_eq!(
            field(authorize(
                &maker,
                Op::CreateToken,
                On::Token(Role::Viewer, &none)
            )),
            Some("scopes.accounts".into())
        );
        let narrower = scopes(&["prod"], &["describe_instances"], &[]);
        assert!(authorize(&maker, Op::CreateToken, On::Token(Role::Admin, &narrower)).is_ok());
        let other = scopes(&["prod", "dev"], &[], &[]);
        assert_eq!(
            field(authorize(
                &maker,
                Op::CreateToken,
                On::Token(Role::Viewer, &other)
            )),
            Some("scopes.accounts".into())
        );
        let op = caller(Role::Operator, Scopes::default());
        // (An operator cannot make tokens at all; the role check comes first.)
        assert_eq!(
            field(authorize(
                &op,
                Op::CreateToken,
                On::Token(Role::Viewer, &none)
            )),
            Some("forbidden".into())
        );
        let admin = caller(Role::Admin, Scopes::default());
        assert!(authorize(&admin, Op::CreateToken, On::Token(Role::Admin, &other)).is_ok());
    }

    #[test]
    fn a_template_scoped_token_cancels_only_its_own_jobs() {
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": "01J0000000000000000000000A", "state": "queued", "action": "reboot_instances",
            "spec": {"action": "reboot_instances", "account": "default",
                     "targets": {"instance_ids": ["i-01234567"]}},
            "created_at": "2026-12-07T00:00:00Z", "attempts": 0, "max_attempts": 3,
            "created_by": "someone", "cancel_requested": false,
            "results": {}, "progress": {"phase": "queued", "message": ""}
        }))
        .unwrap();
        let t = caller(Role::Operator, scopes(&[], &[], &["nightly"]));
        assert!(authorize(&t, Op::Cancel, On::Job(&job)).is_err());
        job.created_by = Some("t".into());
        assert!(authorize(&t, Op::Cancel, On::Job(&job)).is_ok());
        let d = caller(Role::Operator, scopes(&[], &["describe_instances"], &[]));
        assert_eq!(
            field(authorize(&d, Op::Cancel, On::Job(&job))),
            Some("action".into())
        );
    }
}
