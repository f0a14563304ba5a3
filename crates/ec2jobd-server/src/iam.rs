//! The least-privilege IAM policy for the actions a deployment enables (`ec2jobd iam-policy`):
//! which EC2 operations each action calls, plus SNS (job notifications, confirming hook
//! subscriptions), SQS only for intakes, `iam:PassRole` only for instances launched with a profile,
//! and KMS only for encrypted copies. A test reads the operations the EC2 driver and the SNS code call from their
//! source and fails when the policy for every action lacks one.
//! Must not: call AWS.

use ec2jobd_spec::Action;
use serde_json::{json, Value};

/// The EC2 operations a job of `action` may call (its targeting describes, the call, its wait,
/// its results, rotation and restarts included). A workflow calls what its steps do.
pub fn ec2_operations(action: Action) -> &'static [&'static str] {
    const WAIT: [&str; 2] = ["DescribeInstances", "DescribeInstanceStatus"];
    match action {
        Action::DescribeInstances | Action::AuditTags => &WAIT[..1],
        Action::RunInstances => &[
            "RunInstances",
            "CreateTags",
            "DescribeInstances",
            "DescribeInstanceStatus",
        ],
        Action::StartInstances => &["StartInstances", WAIT[0], WAIT[1]],
        Action::StopInstances => &["StopInstances", WAIT[0], WAIT[1]],
        Action::RebootInstances => &["RebootInstances", WAIT[0], WAIT[1]],
        Action::TerminateInstances => &[
            "TerminateInstances",
            "DescribeInstanceAttribute",
            "ModifyInstanceAttribute",
            WAIT[0],
            WAIT[1],
        ],
        Action::CreateTags => &["CreateTags", "DescribeInstances"],
        Action::DeleteTags => &["DeleteTags", "DescribeInstances"],
        Action::ModifyInstanceAttribute => &[
            "ModifyInstanceAttribute",
            "DescribeInstanceAttribute",
            "StopInstances",
            "StartInstances",
            WAIT[0],
            WAIT[1],
        ],
        Action::CreateSnapshots => &[
            "CreateSnapshot",
            "CreateTags",
            "DescribeVolumes",
            "DescribeSnapshots",
            "DeleteSnapshot",
            "StopInstances",
            "StartInstances",
            WAIT[0],
            WAIT[1],
        ],
        Action::DescribeSnapshots => &["DescribeSnapshots"],
        Action::DeleteSnapshots => &["DescribeSnapshots", "DeleteSnapshot"],
        Action::CopySnapshot => &["CopySnapshot", "CreateTags", "DescribeSnapshots"],
        Action::CreateImage => &[
            "CreateImage",
            "CreateTags",
            "DescribeImages",
            "DeregisterImage",
            "DeleteSnapshot",
            WAIT[0],
            WAIT[1],
        ],
        Action::DeregisterImage => &["DescribeImages", "DeregisterImage", "DeleteSnapshot"],
        Action::CopyImage => &["CopyImage", "CreateTags", "DescribeImages"],
        Action::Workflow => &[],
    }
}

/// EC2 calls of `ec2jobd doctor` beyond the actions' own (run with the daemon's credentials).
pub const DOCTOR_EC2_OPERATIONS: &[&str] = &["DescribeRegions"];

/// What the policy must allow beyond the actions' EC2 calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras {
    /// `run_instances` jobs launch with an instance profile (`iam:PassRole` to EC2).
    pub instance_profiles: bool,
    /// SQS intakes poll queues (and `ec2jobd doctor` reads their attributes).
    pub sqs_intake: bool,
}

/// What an SQS intake calls.
pub const SQS_OPERATIONS: &[&str] = &["DeleteMessage", "GetQueueAttributes", "ReceiveMessage"];

/// The policy document for `actions`.
pub fn policy(actions: &[Action], extras: Extras) -> Value {
    let mut ec2: Vec<String> = actions
        .iter()
        .flat_map(|a| ec2_operations(*a).iter())
        .chain(DOCTOR_EC2_OPERATIONS)
        .map(|op| format!("ec2:{op}"))
        .collect();
    ec2.sort();
    ec2.dedup();
    let mut statements = vec![json!({
        "Sid": "Ec2jobdEc2",
        "Effect": "Allow",
        "Action": ec2,
        "Resource": "*",
    })];
    statements.push(json!({
        "Sid": "Ec2jobdSns",
        "Effect": "Allow",
        "Action": ["sns:ConfirmSubscription", "sns:GetTopicAttributes", "sns:Publish"],
        "Resource": "*",
    }));
    if extras.sqs_intake {
        statements.push(json!({
            "Sid": "Ec2jobdSqsIntake",
            "Effect": "Allow",
            "Action": SQS_OPERATIONS.iter().map(|op| format!("sqs:{op}")).collect::<Vec<_>>(),
            "Resource": "*",
        }));
    }
    if extras.instance_profiles && actions.contains(&Action::RunInstances) {
        statements.push(json!({
            "Sid": "Ec2jobdPassRoleToEc2",
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": "*",
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        }));
    }
    if actions
        .iter()
        .any(|a| matches!(a, Action::CopySnapshot | Action::CopyImage))
    {
        // Encrypted copies: EC2 uses the keys on the caller's behalf, through EC2 only.
        statements.push(json!({
            "Sid": "Ec2jobdKmsForEncryptedCopies",
            "Effect": "Allow",
            "Action": ["kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom", "kms:ReEncryptTo"],
            "Resource": "*",
            "Condition": {"StringLike": {"kms:ViaService": "ec2.*.amazonaws.com"}},
        }));
    }
    json!({"Version": "2012-10-17", "Statement": statements})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDK operations called in the Rust sources under `dir` (snake_case, as the SDK names its
    /// builders): every `.op()` on the line after one that ends with the client's name
    /// (`receiver`: `client` in the driver, `sns` in the daemon).
    fn called(dir: &str, receiver: &str) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("source dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                out.extend(called(path.to_str().expect("utf-8"), receiver));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source");
            let lines: Vec<&str> = text.lines().map(str::trim).collect();
            // `client.op()` on one line.
            for line in &lines {
                for (i, _) in line.match_indices(&format!("{receiver}.")) {
                    // A variable or `self.client`, not a field of something else (`cfg.sqs`).
                    let before = &line[..i];
                    let bounded = before.is_empty()
                        || before.ends_with([' ', '('])
                        || before.ends_with("self.");
                    let rest = &line[i + receiver.len() + 1..];
                    if let (true, Some(end)) = (bounded, rest.find("()")) {
                        let op = &rest[..end];
                        if !op.is_empty() && op.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        {
                            out.push(op.to_string());
                        }
                    }
                }
            }
            // `client` ending one line, `.op()` starting the next.
            for w in lines.windows(2) {
                let named = w[0]
                    .strip_suffix(receiver)
                    .is_some_and(|before| before.is_empty() || before.ends_with(['.', ' ', '(']));
                if let (true, Some(rest)) = (named, w[1].strip_prefix('.')) {
                    if let Some(op) = rest.strip_suffix("()") {
                        if op.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                            out.push(op.to_string());
                        }
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn camel(snake: &str) -> String {
        snake
            .split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn the_policy_for_every_action_allows_every_call_the_code_makes() {
        let root = env!("CARGO_MANIFEST_DIR");
        let ec2 = called(&format!("{root}/../ec2jobd-ec2/src"), "client");
        let sns = called(&format!("{root}/src"), "sns");
        let sqs = called(&format!("{root}/src"), "sqs");
        assert!(sqs.contains(&"receive_message".to_string()), "{sqs:?}");
        assert!(
            ec2.len() >= 20 && ec2.contains(&"describe_instance_status".to_string()),
            "the scan finds the driver's calls: {ec2:?}"
        );
        assert!(sns.contains(&"publish".to_string()), "{sns:?}");
        let all = policy(
            Action::ALL,
            Extras {
                sqs_intake: true,
                ..Extras::default()
            },
        );
        let allowed: Vec<String> = all["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| match &s["Action"] {
                Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str())
                    .map(String::from)
                    .collect(),
                Value::String(a) => vec![a.clone()],
                _ => vec![],
            })
            .collect();
        for op in &ec2 {
            let want = format!("ec2:{}", camel(op));
            assert!(
                allowed.contains(&want),
                "the driver calls {op}: {want} is not in the policy"
            );
        }
        for op in &sns {
            let want = format!("sns:{}", camel(op));
            assert!(
                allowed.contains(&want),
                "the daemon calls {op}: {want} is not in the policy"
            );
        }
        for op in &sqs {
            let want = format!("sqs:{}", camel(op));
            assert!(
                allowed.contains(&want),
                "the daemon calls {op}: {want} is not in the policy"
            );
        }
        // And nothing in the EC2 statement that no code calls.
        for a in all["Statement"][0]["Action"].as_array().unwrap() {
            let op = a.as_str().unwrap().trim_start_matches("ec2:");
            assert!(
                ec2.iter().any(|c| camel(c) == op),
                "{op} is allowed but never called"
            );
        }
    }

    #[test]
    fn the_policy_is_cut_to_the_actions_and_extras_asked_for() {
        let start = policy(&[Action::StartInstances], Extras::default());
        assert_eq!(
            start["Statement"][0]["Action"],
            json!([
                "ec2:DescribeInstanceStatus",
                "ec2:DescribeInstances",
                "ec2:DescribeRegions",
                "ec2:StartInstances"
            ])
        );
        let text = start.to_string();
        assert!(
            !text.contains("iam:PassRole") && !text.contains("kms:"),
            "{text}"
        );
        let run = policy(
            &[Action::RunInstances],
            Extras {
                instance_profiles: true,
                ..Extras::default()
            },
        )
        .to_string();
        assert!(
            run.contains("iam:PassRole") && run.contains("ec2.amazonaws.com"),
            "{run}"
        );
        let no_profile = policy(&[Action::RunInstances], Extras::default()).to_string();
        assert!(!no_profile.contains("iam:PassRole"));
        let copy = policy(&[Action::CopyImage], Extras::default()).to_string();
        assert!(
            copy.contains("kms:CreateGrant") && copy.contains("kms:ViaService"),
            "{copy}"
        );
    }
}
