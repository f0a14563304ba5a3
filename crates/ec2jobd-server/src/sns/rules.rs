//! Rules that turn SNS messages into jobs.
//!
//! A message's `Message` is read as a CloudWatch alarm (`AlarmName`, `NewStateValue`, `AlarmArn`,
//! `Trigger` with `Namespace`, `MetricName`, `Dimensions`) or an EventBridge "EC2 Instance
//! State-change Notification" (`detail.instance-id`, `detail.state`). A rule matches on alarm name
//! (glob with `*` and `?`), new state (default `ALARM`), namespace, metric and dimensions, or on the
//! EventBridge detail type and state; its `job` is a job spec whose strings may hold `{instance_id}`,
//! `{region}`, `{alarm_name}`, `{new_state}`, `{account_id}` and `{state}`, filled from the message.
//! Rules are checked when loaded by rendering them against a sample message: a template that cannot
//! render or does not make a valid job is refused then, not when an alarm fires.

use std::borrow::Cow;
use std::collections::BTreeMap;

use ec2jobd_spec::placeholders::{self, Budget, RenderError, Syntax};
use ec2jobd_spec::JobSpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// Placeholders a rule's job template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "instance_id",
    "region",
    "alarm_name",
    "new_state",
    "account_id",
    "state",
];

/// Most bytes a rule's rendered job may have (as a submitted body by default).
const MAX_RENDERED: usize = 64 * 1024;

/// One rule (config `[[sns.hooks.<name>.rules]]` or the hooks API).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name shown in deliveries.
    pub name: String,
    /// Alarm name glob (`*`, `?`); any alarm when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarm_name: Option<String>,
    /// Alarm state that fires the rule (default `ALARM`; `*` for any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_state: Option<String>,
    /// CloudWatch namespace, e.g. `AWS/EC2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Metric name, e.g. `StatusCheckFailed_System`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Dimensions that must be present with these values (`*` for any value).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, String>,
    /// EventBridge: match "EC2 Instance State-change Notification" events in this state (`*` any)
    /// instead of alarms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_state: Option<String>,
    /// The job to queue (a job spec; strings may hold placeholders). Give this or `template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub job: Option<Value>,
    /// A saved template to run instead of an inline job (`PUT /v1/templates/{name}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The template's parameter values (strings may hold placeholders).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = Object)]
    pub parameters: serde_json::Map<String, Value>,
}

/// What a matched rule asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleJob {
    /// An inline job spec.
    Spec(Box<JobSpec>),
    /// A saved template with parameter values.
    Template(String, BTreeMap<String, Value>),
}

/// What a message said, flattened for matching and rendering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    /// Alarm name (alarms).
    pub alarm_name: Option<String>,
    /// New alarm state (alarms).
    pub new_state: Option<String>,
    /// Namespace (alarms).
    pub namespace: Option<String>,
    /// Metric (alarms).
    pub metric: Option<String>,
    /// Dimensions (alarms).
    pub dimensions: BTreeMap<String, String>,
    /// Instance state (EventBridge state change).
    pub state: Option<String>,
    /// Instance id: the `InstanceId` dimension or the event's `instance-id`.
    pub instance_id: Option<String>,
    /// Region: from the alarm ARN or event, else from the topic ARN.
    pub region: Option<String>,
    /// Account id: from the alarm ARN or event, else from the topic ARN.
    pub account_id: Option<String>,
}

fn arn_part(arn: &str, i: usize) -> Option<String> {
    arn.split(':')
        .nth(i)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

/// Reads a message body as an alarm or an EC2 state-change event; `None` for anything else.
pub fn parse_event(message: &str, topic_arn: &str) -> Option<Event> {
    let v: Value = serde_json::from_str(message).ok()?;
    let s = |v: &Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
    let mut e = Event::default();
    if let Some(name) = s(&v, "AlarmName") {
        e.alarm_name = Some(name);
        e.new_state = s(&v, "NewStateValue");
        if let Some(t) = v.get("Trigger") {
            e.namespace = s(t, "Namespace");
            e.metric = s(t, "MetricName");
            for d in t
                .get("Dimensions")
                .and_then(|d| d.as_array())
                .into_iter()
                .flatten()
            {
                // CloudWatch sends `name`/`value`; accept the capitalised form too.
                let k = s(d, "name").or_else(|| s(d, "Name"));
                let val = s(d, "value").or_else(|| s(d, "Value"));
                if let (Some(k), Some(val)) = (k, val) {
                    e.dimensions.insert(k, val);
                }
            }
        }
        e.instance_id = e.dimensions.get("InstanceId").cloned();
        if let Some(arn) = s(&v, "AlarmArn") {
            e.region = arn_part(&arn, 3);
            e.account_id = arn_part(&arn, 4);
        }
    } else if s(&v, "detail-type").as_deref() == Some("EC2 Instance State-change Notification") {
        let d = v.get("detail")?;
        e.instance_id = s(d, "instance-id");
        e.state = s(d, "state");
        e.region = s(&v, "region");
        e.account_id = s(&v, "account");
    } else {
        return None;
    }
    e.region = e.region.or_else(|| arn_part(topic_arn, 3));
    e.account_id = e.account_id.or_else(|| arn_part(topic_arn, 4));
    Some(e)
}

/// `*` matches any run of characters, `?` one; everything else itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl Rule {
    /// Whether the rule fires for this event.
    pub fn matches(&self, e: &Event) -> bool {
        if let Some(want) = &self.instance_state {
            return e.alarm_name.is_none() && e.state.as_deref().is_some_and(|st| glob(want, st));
        }
        let Some(name) = &e.alarm_name else {
            return false;
        };
        let opt = |want: &Option<String>, have: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| have.as_deref().is_some_and(|h| glob(w, h)))
        };
        self.alarm_name.as_deref().is_none_or(|g| glob(g, name))
            && glob(
                self.new_state.as_deref().unwrap_or("ALARM"),
                e.new_state.as_deref().unwrap_or(""),
            )
            && opt(&self.namespace, &e.namespace)
            && opt(&self.metric, &e.metric)
            && self
                .dimensions
                .iter()
                .all(|(k, w)| e.dimensions.get(k).is_some_and(|v| glob(w, v)))
    }

    /// The job spec for this event: every placeholder in every string filled. Fails naming a
    /// placeholder the event has no value for, or an unknown one.
    pub fn render(&self, e: &Event) -> Result<RuleJob, String> {
        let values: BTreeMap<&str, Option<&str>> = [
            ("instance_id", e.instance_id.as_deref()),
            ("region", e.region.as_deref()),
            ("alarm_name", e.alarm_name.as_deref()),
            ("new_state", e.new_state.as_deref()),
            ("account_id", e.account_id.as_deref()),
            ("state", e.state.as_deref()),
        ]
        .into_iter()
        .collect();
        match (&self.job, &self.template) {
            (Some(job), None) => {
                let v = fill(job, &values)?;
                serde_json::from_value::<JobSpec>(v)
                    .map(|s| RuleJob::Spec(Box::new(s)))
                    .map_err(|err| format!("not a job spec: {err}"))
            }
            (None, Some(t)) => {
                let params = fill(&Value::Object(self.parameters.clone()), &values)?;
                let params = params
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default();
                Ok(RuleJob::Template(t.clone(), params))
            }
            _ => Err("give either `job` or `template`".into()),
        }
    }

    /// Checks the rule by rendering it for a sample message with every value present.
    pub fn check(&self) -> Result<(), String> {
        let sample = Event {
            alarm_name: Some("sample".into()),
            new_state: Some("ALARM".into()),
            state: Some("stopped".into()),
            instance_id: Some("i-0123456789abcdef0".into()),
            region: Some("us-east-1".into()),
            account_id: Some("123456789012".into()),
            ..Default::default()
        };
        match self.render(&sample)? {
            RuleJob::Spec(spec) => spec
                .normalize()
                .map(|_| ())
                .map_err(|e| format!("job.{}: {}", e.field, e.message)),
            // The template itself is checked when it is saved and again with these values on use.
            RuleJob::Template(..) => Ok(()),
        }
    }
}

/// Every string of `v` filled from the message in one pass ([`placeholders`]); the rendered job may
/// be at most [`MAX_RENDERED`] bytes.
fn fill(v: &Value, values: &BTreeMap<&str, Option<&str>>) -> Result<Value, String> {
    let syntax = Syntax::Braces;
    let mut text = |name: &str| -> Result<Cow<'_, str>, RenderError> {
        match values.get(name) {
            Some(Some(val)) => Ok(Cow::Owned(val.to_string())),
            Some(None) => Err(RenderError::Missing(format!("{{{name}}}"))),
            None => Err(RenderError::unknown(name, PLACEHOLDERS, syntax)),
        }
    };
    placeholders::render_json(
        v,
        syntax,
        &mut Budget::new(MAX_RENDERED),
        &|_| None,
        &mut text,
    )
    .map_err(|e| match e {
        RenderError::Missing(name) => format!("the message has no value for `{name}`"),
        e => e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOPIC: &str = "arn:aws:sns:eu-west-1:123456789012:alarms";

    fn alarm() -> String {
        json!({
            "AlarmName": "StatusCheckFailed-web-1",
            "AlarmArn": "arn:aws:cloudwatch:us-west-2:210987654321:alarm:StatusCheckFailed-web-1",
            "NewStateValue": "ALARM", "OldStateValue": "OK", "Region": "US West (Oregon)",
            "Trigger": {"Namespace": "AWS/EC2", "MetricName": "StatusCheckFailed_System",
                        "Dimensions": [{"name": "InstanceId", "value": "i-0123456789abcdef0"}]}
        })
        .to_string()
    }

    fn reboot_rule() -> Rule {
        serde_json::from_value(json!({
            "name": "reboot", "alarm_name": "StatusCheckFailed-*", "namespace": "AWS/EC2",
            "dimensions": {"InstanceId": "*"},
            "job": {"action": "reboot_instances", "region": "{region}",
                    "targets": {"instance_ids": ["{instance_id}"]}}
        }))
        .unwrap()
    }

    #[test]
    fn alarm_fields_region_and_instance_come_from_the_message() {
        let e = parse_event(&alarm(), TOPIC).unwrap();
        assert_eq!(e.instance_id.as_deref(), Some("i-0123456789abcdef0"));
        assert_eq!(e.region.as_deref(), Some("us-west-2"), "from the alarm ARN");
        assert_eq!(e.account_id.as_deref(), Some("210987654321"));
        let r = reboot_rule();
        assert!(r.matches(&e));
        let RuleJob::Spec(spec) = r.render(&e).unwrap() else {
            panic!("an inline job")
        };
        assert_eq!(spec.region.as_deref(), Some("us-west-2"));
        assert_eq!(
            spec.targets.instance_ids.unwrap().0,
            vec!["i-0123456789abcdef0"]
        );
        r.check().unwrap();
    }

    #[test]
    fn state_name_and_dimensions_must_match() {
        let r = reboot_rule();
        let ok = parse_event(&alarm(), TOPIC).unwrap();
        let mut e = ok.clone();
        e.new_state = Some("OK".into());
        assert!(!r.matches(&e), "default state is ALARM");
        let mut e = ok.clone();
        e.alarm_name = Some("CPU-high".into());
        assert!(!r.matches(&e));
        let mut e = ok.clone();
        e.dimensions.clear();
        assert!(!r.matches(&e));
        assert!(r
            .render(&Event {
                instance_id: None,
                ..ok
            })
            .is_err());
    }

    #[test]
    fn eventbridge_state_changes_and_bad_templates() {
        let msg =
            json!({"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2",
            "region": "ap-northeast-1", "account": "123456789012",
            "detail": {"instance-id": "i-0123456789abcdef0", "state": "stopped"}})
            .to_string();
        let e = parse_event(&msg, TOPIC).unwrap();
        let r: Rule =
            serde_json::from_value(json!({"name": "restart", "instance_state": "stopped",
            "job": {"action": "start_instances", "targets": {"instance_ids": "{instance_id}"}}}))
            .unwrap();
        assert!(r.matches(&e));
        assert!(!reboot_rule().matches(&e));
        assert!(parse_event("not json", TOPIC).is_none());
        assert!(parse_event("{\"hello\": 1}", TOPIC).is_none());
        let bad: Rule = serde_json::from_value(json!({"name": "x",
            "job": {"action": "reboot_instances", "targets": {"instance_ids": ["{hostname}"]}}}))
        .unwrap();
        assert!(bad.check().unwrap_err().contains("unknown placeholder"));
        let bad: Rule = serde_json::from_value(json!({"name": "x",
            "job": {"action": "reboot_instances", "targets": {"instance_ids": ["{region}"]}}}))
        .unwrap();
        assert!(
            bad.check().unwrap_err().contains("instance_ids"),
            "renders, but not a valid job"
        );
        assert!(glob("a*c?e", "abbbcde") && !glob("a*c", "abd") && glob("*", ""));
    }
}
