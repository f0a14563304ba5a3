//! `ec2jobd doctor`: what a new deployment gets wrong, checked before the first job. One line per
//! check (`ok`, `warn` or `FAIL`), each failure followed by its fix; the exit code is 1 when any
//! check failed. Checks: the config parses; the database exists, is migrated and writable; per
//! account, whose credentials these are (STS), that the region exists for the account, and that
//! every EC2 operation of the enabled actions is permitted (EC2 `DryRun`); the SNS topics of hooks
//! and notifications, and the SQS intakes' queues, are reachable.
//! Must not: change anything (no migration, no write, no EC2 change), print a secret.

use std::collections::BTreeSet;
use std::sync::Arc;

use ec2jobd_ec2::doctor::Permission;
use ec2jobd_ec2::Ec2Pool;
use ec2jobd_spec::Action;

use crate::config::Config;

/// The report being written: lines go to stdout as they are found.
#[derive(Default)]
struct Report {
    failed: usize,
    warned: usize,
}

impl Report {
    fn ok(&mut self, check: &str, detail: impl AsRef<str>) {
        println!("ok    {check}: {}", detail.as_ref());
    }

    fn warn(&mut self, check: &str, detail: impl AsRef<str>, fix: impl AsRef<str>) {
        self.warned += 1;
        println!("warn  {check}: {}", detail.as_ref());
        println!("      fix: {}", fix.as_ref());
    }

    fn fail(&mut self, check: &str, detail: impl AsRef<str>, fix: impl AsRef<str>) {
        self.failed += 1;
        println!("FAIL  {check}: {}", detail.as_ref());
        println!("      fix: {}", fix.as_ref());
    }
}

/// Runs every check against `cfg` (already parsed: `config_name` says from where) for `actions`;
/// returns whether all passed.
pub async fn run(cfg: &Config, config_name: &str, actions: &[Action]) -> bool {
    let mut r = Report::default();
    r.ok(
        "config",
        format!(
            "{config_name} parses ({} account(s), {} SNS hook(s), {} SQS intake(s), {} schedule(s))",
            cfg.accounts.len(),
            cfg.sns.hooks.len(),
            cfg.sqs.len(),
            cfg.schedules.len()
        ),
    );
    database(&mut r, cfg).await;
    let pool = Ec2Pool::new(
        crate::app::account_configs(cfg),
        cfg.pacing_config(),
        Arc::new(crate::metrics::Metrics::new()),
    );
    let ops: Vec<&str> = actions
        .iter()
        .flat_map(|a| crate::iam::ec2_operations(*a).iter().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for (name, account) in &cfg.accounts {
        self::account(&mut r, &pool, name, &account.region, &ops).await;
    }
    topics(&mut r, &pool, cfg).await;
    queues(&mut r, &pool, cfg).await;
    println!("{} problem(s), {} warning(s)", r.failed, r.warned);
    r.failed == 0
}

async fn database(r: &mut Report, cfg: &Config) {
    let name = ec2jobd_store::postgres::redact(&cfg.database);
    let migrate =
        "run `ec2jobd migrate --config <this config>` (the daemon also migrates at start)";
    match ec2jobd_store::check(&cfg.database).await {
        Err(e) => r.fail(
            "database",
            format!("{name}: {e}"),
            format!("check `database`, the file's directory and permissions; {migrate}"),
        ),
        Ok(c) => {
            if c.applied < c.known {
                r.fail(
                    "database",
                    format!("{name}: {} of {} migrations applied", c.applied, c.known),
                    migrate,
                );
            } else if c.applied > c.known {
                r.fail(
                    "database",
                    format!(
                        "{name}: {} migrations applied, this build knows {}: a newer ec2jobd migrated it",
                        c.applied, c.known
                    ),
                    "run the newer ec2jobd (migrations are not undone)",
                );
            } else {
                r.ok(
                    "database",
                    format!("{name}: all {} migrations applied", c.known),
                );
            }
            match c.writable {
                Ok(()) => r.ok("database", format!("{name}: writable")),
                Err(e) => r.fail(
                    "database",
                    format!("{name}: not writable: {e}"),
                    "give the daemon's user write access (the file and its directory, or INSERT/UPDATE/DELETE on a primary)",
                ),
            }
        }
    }
}

async fn account(r: &mut Report, pool: &Ec2Pool, name: &str, region: &str, ops: &[&str]) {
    let check = format!("account {name}");
    let creds_fix =
        "set the account's credentials (profile, *_env variables, role_arn) or the host's role";
    match pool.sts(name, region).await {
        Err(e) => return r.fail(&check, format!("no client: {e}"), creds_fix),
        Ok(sts) => match sts.get_caller_identity().send().await {
            Ok(me) => r.ok(
                &check,
                format!(
                    "credentials are {} (account {})",
                    me.arn().unwrap_or("?"),
                    me.account().unwrap_or("?")
                ),
            ),
            Err(e) => {
                return r.fail(
                    &check,
                    format!(
                        "credentials do not resolve or are refused: {}",
                        crate::sns::aws_error(&e)
                    ),
                    creds_fix,
                )
            }
        },
    }
    let ec2 = match pool.get(name, region).await {
        Ok(ec2) => ec2,
        Err(e) => return r.fail(&check, format!("no EC2 client: {e}"), creds_fix),
    };
    match ec2.region_status(region).await {
        Ok(Some(s)) if s == "not-opted-in" => r.fail(
            &check,
            format!("region {region} is not enabled for this account"),
            format!(
                "enable {region} (Account settings → AWS Regions) or set accounts.{name}.region"
            ),
        ),
        Ok(Some(s)) => r.ok(&check, format!("region {region} ({s})")),
        Ok(None) => r.fail(
            &check,
            format!("region {region} does not exist"),
            format!("set accounts.{name}.region to a region EC2 lists"),
        ),
        Err(e) => r.warn(
            &check,
            format!(
                "region {region} not checked: DescribeRegions: {}: {}",
                e.code, e.message
            ),
            "allow ec2:DescribeRegions to let doctor check the region (`ec2jobd iam-policy`)",
        ),
    }
    let (mut allowed, mut unknown) = (0, Vec::new());
    for op in ops {
        match ec2.dry_run(op, region).await {
            Permission::Allowed => allowed += 1,
            Permission::Denied(why) => r.fail(
                &check,
                format!("ec2:{op} is not permitted ({why})"),
                format!("add ec2:{op} to this account's IAM policy (`ec2jobd iam-policy` prints the whole policy)"),
            ),
            Permission::Unknown(why) => unknown.push(format!("{op} ({why})")),
        }
    }
    r.ok(
        &check,
        format!(
            "{allowed} of {} EC2 operations permitted (DryRun)",
            ops.len()
        ),
    );
    if !unknown.is_empty() {
        r.warn(
            &check,
            format!("not proven by DryRun: {}", unknown.join(", ")),
            "nothing to do unless a job fails with UnauthorizedOperation",
        );
    }
}

async fn topics(r: &mut Report, pool: &Ec2Pool, cfg: &Config) {
    let mut wanted: Vec<(String, String, String)> = Vec::new();
    for (name, h) in &cfg.sns.hooks {
        let account = h.account_or(&cfg.default_account);
        for t in &h.topics {
            wanted.push((format!("SNS hook {name}"), account.clone(), t.clone()));
        }
    }
    if let Some(n) = cfg.notify.default_notify() {
        wanted.push((
            "notify".into(),
            cfg.default_account.clone(),
            n.topic_arn.clone(),
        ));
    }
    for (check, account, topic) in wanted {
        let Some(region) = crate::sns::topic_region(&topic) else {
            r.fail(
                &check,
                format!("`{topic}` is not a topic ARN"),
                "write arn:aws:sns:<region>:<account-id>:<topic>",
            );
            continue;
        };
        let got = match pool.sns(&account, region).await {
            Ok(sns) => sns
                .get_topic_attributes()
                .topic_arn(&topic)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| crate::sns::aws_error(&e)),
            Err(e) => Err(e.to_string()),
        };
        match got {
            Ok(()) => r.ok(&check, format!("topic {topic} reachable")),
            Err(e) => r.fail(
                &check,
                format!("topic {topic}: {e}"),
                "check the ARN, and allow sns:GetTopicAttributes and sns:Publish on it to the account",
            ),
        }
    }
}

async fn queues(r: &mut Report, pool: &Ec2Pool, cfg: &Config) {
    use aws_sdk_sqs::types::QueueAttributeName;
    for (name, q) in &cfg.sqs {
        let check = format!("SQS intake {name}");
        if !cfg.sns.hooks.contains_key(&q.hook) {
            r.warn(
                &check,
                format!("hook `{}` is not in the config", q.hook),
                "make sure it exists over the API (PUT /v1/sns/hooks/<name>), or messages stay in the queue",
            );
        }
        let (account, region) = q.account_region(cfg);
        let got = match pool.sqs(&account, &region).await {
            Ok(sqs) => sqs
                .get_queue_attributes()
                .queue_url(&q.queue_url)
                .attribute_names(QueueAttributeName::RedrivePolicy)
                .send()
                .await
                .map_err(|e| crate::sns::aws_error(&e)),
            Err(e) => Err(e.to_string()),
        };
        match got {
            Ok(out) => {
                r.ok(&check, format!("queue {} reachable", q.queue_url));
                let redrive = out
                    .attributes()
                    .is_some_and(|a| a.contains_key(&QueueAttributeName::RedrivePolicy));
                if !redrive {
                    r.warn(
                        &check,
                        "the queue has no redrive policy: a message that keeps failing comes back forever",
                        "give the queue a dead-letter queue (RedrivePolicy with maxReceiveCount)",
                    );
                }
            }
            Err(e) => r.fail(
                &check,
                format!("queue {}: {e}", q.queue_url),
                "check queue_url and region, and allow sqs:ReceiveMessage, sqs:DeleteMessage and sqs:GetQueueAttributes (`ec2jobd iam-policy --sqs-intake`)",
            ),
        }
    }
}
