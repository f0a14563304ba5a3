//! Saved job templates: a job spec with named, typed parameters (`${instance_id}`), saved by an
//! admin, run by operators with values. A string that is exactly `${p}` becomes the parameter's
//! value with its type (so numbers, booleans and lists work); inside a longer string the value is
//! inserted as text. A template is checked when saved (every placeholder declared, types known,
//! what it runs within the saver's scopes, and — when every parameter has a default — the
//! rendered spec a valid job) and again with the values on run (against the runner's scopes).
//! Must not: know HTTP or HTML.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use ec2jobd_spec::placeholders::{self, Budget, RenderError, Syntax};
use ec2jobd_spec::JobSpec;
use ec2jobd_store::Named;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::caller::Caller;
use super::error::{Kind, Result, ServiceError};
use super::jobs::{Admitted, Key};
use super::policy::{self, authorize, On, Op, Runs};
use crate::state::AppState;

/// A parameter's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// Text.
    String,
    /// A whole number.
    Integer,
    /// true or false.
    Boolean,
    /// A list of strings.
    StringList,
}

/// One named parameter.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateParam {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// Used when a run gives no value; without one the parameter is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub default: Option<Value>,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A saved template (body of `PUT /v1/templates/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Parameters by name.
    #[serde(default)]
    pub parameters: BTreeMap<String, TemplateParam>,
    /// The job spec, with `${name}` placeholders.
    #[schema(value_type = Object)]
    pub spec: Value,
}

/// A template with its name.
#[derive(Debug, Serialize, ToSchema)]
pub struct NamedTemplate {
    /// Name.
    pub name: String,
    /// The template.
    pub template: Template,
}

fn type_ok(kind: ParamType, v: &Value) -> bool {
    match kind {
        ParamType::String => v.is_string(),
        ParamType::Integer => v.is_i64() || v.is_u64(),
        ParamType::Boolean => v.is_boolean(),
        ParamType::StringList => v
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x.is_string())),
    }
}

/// The template's spec with these values, in one pass ([`placeholders`]): a string that is
/// exactly `${p}` becomes the value with its type, elsewhere the value goes in as text; values are
/// never scanned again. The result may be at most `limit` bytes (as a submitted body), else 422.
fn render(v: &Value, values: &BTreeMap<String, Value>, limit: usize) -> Result<Value> {
    let whole = |name: &str| values.get(name);
    let mut text = |name: &str| -> Result<Cow<'_, str>, RenderError> {
        match values.get(name) {
            Some(Value::String(t)) => Ok(Cow::Borrowed(t.as_str())),
            Some(other) => Ok(Cow::Owned(other.to_string())),
            None => Err(RenderError::Missing(name.to_string())),
        }
    };
    let out = placeholders::render_json(
        v,
        Syntax::Dollar,
        &mut Budget::new(limit),
        &whole,
        &mut text,
    )
    .map_err(|e| match e {
        RenderError::TooLarge(_) => {
            ServiceError::unprocessable("spec_too_large", "parameters", e.to_string())
        }
        e => ServiceError::unprocessable("invalid_template", "spec", e.to_string()),
    })?;
    let size = serde_json::to_vec(&out)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if size > limit {
        return Err(ServiceError::unprocessable(
            "spec_too_large",
            "parameters",
            format!("the rendered spec would be larger than {limit} bytes"),
        ));
    }
    Ok(out)
}

impl Template {
    /// What it runs as far as it is written out (`name`'s jobs: their actions and accounts).
    pub fn runs(&self, st: &AppState, name: &str) -> Runs {
        Runs::raw(&self.spec, &st.config.default_account).by_template(name)
    }

    /// Checks the template as saved (see the module docs).
    fn check(&self, st: &AppState) -> Result<()> {
        // The action is never a parameter: without a valid one the template can never run.
        let action = self
            .spec
            .get("action")
            .and_then(Value::as_str)
            .unwrap_or("");
        if ec2jobd_spec::Action::parse(action).is_none() {
            return Err(ServiceError::unprocessable(
                "invalid_action",
                "spec.action",
                format!("`{action}` is not a known action"),
            ));
        }
        for name in self.parameters.keys() {
            let ok = name.len() <= 64
                && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(ServiceError::unprocessable(
                    "invalid_parameter_name",
                    format!("parameters.{name}"),
                    "parameter names are 1-64 letters, digits or `_`, not starting with a digit",
                ));
            }
        }
        let mut used = Vec::new();
        placeholders::json_names(&self.spec, Syntax::Dollar, &mut used)
            .map_err(|e| ServiceError::unprocessable("invalid_template", "spec", e.to_string()))?;
        if let Some(p) = used.iter().find(|p| !self.parameters.contains_key(*p)) {
            return Err(ServiceError::unprocessable(
                "undeclared_parameter",
                "spec",
                format!("`${{{p}}}` is used but not declared in `parameters`"),
            ));
        }
        for (name, p) in &self.parameters {
            if p.default.as_ref().is_some_and(|d| !type_ok(p.kind, d)) {
                return Err(ServiceError::unprocessable(
                    "invalid_default",
                    format!("parameters.{name}.default"),
                    format!("does not have the parameter's type ({:?})", p.kind),
                ));
            }
        }
        if self.parameters.values().all(|p| p.default.is_some()) {
            self.spec_for(st, &BTreeMap::new())?;
        }
        Ok(())
    }

    /// The job spec for these values (defaults filled), resolved like a submission.
    pub fn spec_for(&self, st: &AppState, given: &BTreeMap<String, Value>) -> Result<JobSpec> {
        if let Some(k) = given.keys().find(|k| !self.parameters.contains_key(*k)) {
            return Err(ServiceError::unprocessable(
                "unknown_parameter",
                format!("parameters.{k}"),
                "this template has no such parameter",
            ));
        }
        let mut values = BTreeMap::new();
        for (name, p) in &self.parameters {
            let v = given.get(name).or(p.default.as_ref()).ok_or_else(|| {
                ServiceError::unprocessable(
                    "missing_parameter",
                    format!("parameters.{name}"),
                    "required",
                )
            })?;
            if !type_ok(p.kind, v) {
                return Err(ServiceError::unprocessable(
                    "invalid_parameter",
                    format!("parameters.{name}"),
                    format!("must be of type {:?}", p.kind),
                ));
            }
            values.insert(name.clone(), v.clone());
        }
        let rendered = render(&self.spec, &values, st.config.http.body_limit)?;
        let spec: JobSpec = serde_json::from_value(rendered)
            .map_err(|e| ServiceError::unprocessable("invalid_spec", "spec", e.to_string()))?;
        super::jobs::resolve(st, spec).map_err(|e| e.under("spec."))
    }

    /// The names of the parameters whose values end up in a secret field.
    pub fn secret_parameters(&self) -> BTreeSet<String> {
        secret_placeholders(&self.spec, Syntax::Dollar)
    }

    /// The template as `caller` may see it (see `super::redact`).
    fn shown(mut self, caller: &Caller) -> Template {
        if !super::redact::may_see_secrets(caller) {
            let secret = self.secret_parameters();
            ec2jobd_spec::redact_secrets_json(&mut self.spec);
            for (name, p) in self.parameters.iter_mut() {
                if secret.contains(name) {
                    if let Some(d) = p.default.as_mut() {
                        ec2jobd_spec::redact_value(d);
                    }
                }
            }
        }
        self
    }
}

/// The placeholders (in `syntax`) written inside a spec's secret fields.
pub fn secret_placeholders(spec: &Value, syntax: Syntax) -> BTreeSet<String> {
    let mut spec = spec.clone();
    let mut names = Vec::new();
    for v in ec2jobd_spec::secret_values_mut(&mut spec) {
        // A value that does not parse has no placeholders to hide.
        let _ = placeholders::json_names(v, syntax, &mut names);
    }
    names.into_iter().collect()
}

/// The stored template `name` as stored (secrets included: for the service only).
pub(super) async fn load(st: &AppState, name: &str) -> Result<Template> {
    let body = st
        .store
        .get_named(Named::Template, name)
        .await?
        .ok_or_else(|| ServiceError::not_found(&format!("template `{name}`")))?;
    serde_json::from_value(body)
        .map_err(|e| ServiceError::new(Kind::Internal, "corrupt_template", e.to_string()))
}

/// Every saved template, as the caller may see them.
pub async fn list(st: &AppState, caller: &Caller) -> Result<Vec<NamedTemplate>> {
    authorize(caller, Op::ReadTemplates, On::Nothing)?;
    Ok(st
        .store
        .list_named(Named::Template)
        .await?
        .into_iter()
        .filter_map(|(name, b)| {
            let t: Template = serde_json::from_value(b).ok()?;
            Some(NamedTemplate {
                name,
                template: t.shown(caller),
            })
        })
        .collect())
}

/// One template, as the caller may see it.
pub async fn get(st: &AppState, caller: &Caller, name: &str) -> Result<NamedTemplate> {
    authorize(caller, Op::ReadTemplates, On::Nothing)?;
    Ok(NamedTemplate {
        name: name.to_string(),
        template: load(st, name).await?.shown(caller),
    })
}

/// Creates or replaces template `name`; true when created. Checked as the module docs say.
pub async fn save(st: &AppState, caller: &Caller, name: &str, template: Template) -> Result<bool> {
    policy::role(caller, Op::SaveTemplate)?;
    super::check_name(name)?;
    template.check(st)?;
    authorize(caller, Op::SaveTemplate, On::Runs(&template.runs(st, name)))?;
    let body = serde_json::to_value(&template).map_err(ServiceError::internal)?;
    Ok(st
        .store
        .put_named(Named::Template, name, body, &caller.name)
        .await?)
}

/// Deletes template `name`.
pub async fn delete(st: &AppState, caller: &Caller, name: &str) -> Result<()> {
    policy::role(caller, Op::DeleteTemplate)?;
    let t = load(st, name).await?;
    authorize(caller, Op::DeleteTemplate, On::Runs(&t.runs(st, name)))?;
    if st
        .store
        .delete_named(Named::Template, name, &caller.name)
        .await?
    {
        Ok(())
    } else {
        Err(ServiceError::not_found(&format!("template `{name}`")))
    }
}

/// A job from template `name` with these values, checked against the runner's scopes and
/// admitted as a submission is.
pub async fn run(
    st: &AppState,
    caller: &Caller,
    name: &str,
    values: &BTreeMap<String, Value>,
    key: Key,
) -> Result<Admitted> {
    policy::role(caller, Op::RunTemplate)?;
    authorize(
        caller,
        Op::RunTemplate,
        On::Runs(&Runs::nothing().by_template(name)),
    )?;
    let spec = load(st, name).await?.spec_for(st, values)?;
    super::jobs::from_template(st, caller, name, spec, key).await
}

/// The job spec template `name` makes with these values, not yet authorized or admitted (a
/// schedule or an SNS rule checks what it will run when it is saved).
pub(super) async fn spec_of(
    st: &AppState,
    name: &str,
    values: &BTreeMap<String, Value>,
) -> Result<JobSpec> {
    load(st, name).await?.spec_for(st, values)
}
