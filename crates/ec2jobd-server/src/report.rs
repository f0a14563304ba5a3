//! The text report of a job (`GET /v1/jobs/{id}/report`): what operators are used to reading in a
//! backup e-mail — the job line, target volumes, snapshot status, rotation result, summary — and for
//! instance jobs the instances with their states and checks. Pure formatting of a stored job: the
//! SNS notifications publish the same text.

use std::fmt::Write;

use ec2jobd_spec::{Job, JobResults};

fn or_dash(v: Option<&str>) -> &str {
    v.filter(|s| !s.is_empty()).unwrap_or("-")
}

/// Text from EC2 or a user (a Name tag, an error message) on one line: control characters (a
/// newline, a carriage return, an escape sequence) are written as escapes, so no value can forge a
/// line of the report or of the e-mail it becomes.
fn one_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Columns padded to the widest cell, two spaces apart; cells are made [`one_line`].
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| one_line(c)).collect())
        .collect();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        format!("  {}\n", s.join("  ").trim_end())
    };
    out.push_str(&line(head.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
}

/// Renders the report of a job: who and when, then each kind of result it has, then the summary
/// and error.
pub fn render(job: &Job) -> String {
    let mut out = String::new();
    header(&mut out, job);
    let r = &job.results;
    if !r.volumes.is_empty() {
        volumes(&mut out, job);
    }
    if !r.snapshots.is_empty() {
        snapshots(&mut out, r);
    }
    if !r.images.is_empty() {
        images(&mut out, r);
    }
    if !r.instances.is_empty() {
        instances(&mut out, r);
    }
    summary(&mut out, job);
    out
}

/// "-" for none, else the ids joined.
fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".to_string()
    } else {
        v.join(", ")
    }
}

/// The job's id, action, state, account, region, times and attempts.
fn header(out: &mut String, job: &Job) {
    let spec = &job.spec;
    let _ = writeln!(
        out,
        "ec2jobd job {} - {} - {}",
        job.id, job.action, job.state
    );
    let _ = writeln!(
        out,
        "Account {}, region {}{}. Created {} by {}, started {}, finished {}; attempt(s): {}.",
        or_dash(spec.account.as_deref()),
        or_dash(spec.region.as_deref()),
        if spec.dry_run { " (dry run)" } else { "" },
        job.created_at.to_rfc3339(),
        or_dash(job.created_by.as_deref()),
        job.started_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "-".into()),
        job.finished_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "-".into()),
        job.attempts
    );
}

/// A backup's volumes, their snapshots and its rotation.
fn volumes(out: &mut String, job: &Job) {
    let (r, spec) = (&job.results, &job.spec);
    out.push_str("\nTarget volumes\n");
    let rows: Vec<Vec<String>> = r
        .volumes
        .iter()
        .map(|v| {
            vec![
                v.volume_id.clone(),
                or_dash(v.instance_id.as_deref()).into(),
                or_dash(v.instance_name.as_deref()).into(),
                or_dash(v.device.as_deref()).into(),
                v.size_gib.map(|s| format!("{s} GiB")).unwrap_or("-".into()),
            ]
        })
        .collect();
    table(
        out,
        &["VOLUME", "INSTANCE", "NAME", "DEVICE", "SIZE"],
        &rows,
    );
    out.push_str("\nSnapshot status\n");
    let rows: Vec<Vec<String>> = r
        .volumes
        .iter()
        .map(|v| match &v.snapshot {
            Some(s) => vec![
                v.volume_id.clone(),
                s.snapshot_id.clone(),
                s.state.clone(),
                or_dash(s.progress.as_deref()).into(),
                s.volume_size_gib
                    .map(|g| format!("{g} GiB"))
                    .unwrap_or("-".into()),
                or_dash(s.start_time.as_deref()).into(),
            ],
            None => vec![
                v.volume_id.clone(),
                "-".into(),
                "not created".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        })
        .collect();
    table(
        out,
        &["VOLUME", "SNAPSHOT", "STATE", "PROGRESS", "SIZE", "STARTED"],
        &rows,
    );
    if r.volumes.iter().any(|v| v.rotation.is_some()) {
        let keep = spec
            .action_spec()
            .ok()
            .and_then(|a| a.keep())
            .map(|k| format!(" (keep {k})"))
            .unwrap_or_default();
        let _ = writeln!(out, "\nRotation{keep}");
        let rows: Vec<Vec<String>> = r
            .volumes
            .iter()
            .filter_map(|v| {
                let rot = v.rotation.as_ref()?;
                Some(vec![
                    v.volume_id.clone(),
                    list(&rot.kept),
                    list(&rot.deleted),
                    list(&rot.in_use),
                ])
            })
            .collect();
        table(out, &["VOLUME", "KEPT", "DELETED", "IN USE"], &rows);
    }
}

/// Snapshots a job describes or copies.
fn snapshots(out: &mut String, r: &JobResults) {
    out.push_str("\nSnapshots\n");
    let rows: Vec<Vec<String>> = r
        .snapshots
        .iter()
        .map(|s| {
            vec![
                s.snapshot_id.clone(),
                or_dash(s.volume_id.as_deref()).into(),
                s.state.clone(),
                or_dash(s.start_time.as_deref()).into(),
                or_dash(s.outcome.as_deref()).into(),
            ]
        })
        .collect();
    table(
        out,
        &["SNAPSHOT", "VOLUME", "STATE", "STARTED", "OUTCOME"],
        &rows,
    );
}

/// AMIs and their rotation.
fn images(out: &mut String, r: &JobResults) {
    out.push_str("\nAMIs\n");
    let rows: Vec<Vec<String>> = r
        .images
        .iter()
        .map(|i| {
            vec![
                i.image_id.clone(),
                or_dash(i.name.as_deref()).into(),
                or_dash(i.instance_id.as_deref()).into(),
                i.state.clone(),
                or_dash(i.region.as_deref()).into(),
                if i.snapshot_ids.is_empty() {
                    "-".into()
                } else {
                    i.snapshot_ids.join(", ")
                },
                or_dash(i.outcome.as_deref()).into(),
            ]
        })
        .collect();
    table(
        out,
        &[
            "AMI",
            "NAME",
            "INSTANCE",
            "STATE",
            "REGION",
            "SNAPSHOTS",
            "OUTCOME",
        ],
        &rows,
    );
    let rot: Vec<Vec<String>> = r
        .images
        .iter()
        .filter_map(|i| {
            let rot = i.rotation.as_ref()?;
            Some(vec![
                or_dash(i.instance_id.as_deref()).into(),
                list(&rot.kept),
                list(&rot.deleted),
                list(&rot.deleted_snapshots),
            ])
        })
        .collect();
    if !rot.is_empty() {
        out.push_str("\nAMI rotation\n");
        table(
            out,
            &["INSTANCE", "KEPT", "DEREGISTERED", "SNAPSHOTS DELETED"],
            &rot,
        );
    }
}

/// Instances with their state change, checks and outcome.
fn instances(out: &mut String, r: &JobResults) {
    out.push_str("\nInstances\n");
    let rows: Vec<Vec<String>> = r
        .instances
        .iter()
        .map(|i| {
            vec![
                i.instance_id.clone(),
                or_dash(i.name.as_deref()).into(),
                format!("{} -> {}", or_dash(i.previous_state.as_deref()), i.state),
                or_dash(i.checks.as_deref()).into(),
                or_dash(i.outcome.as_deref()).into(),
            ]
        })
        .collect();
    table(
        out,
        &["INSTANCE", "NAME", "STATE", "CHECKS", "OUTCOME"],
        &rows,
    );
}

/// The summary and the error, each on one line.
fn summary(out: &mut String, job: &Job) {
    let r = &job.results;
    out.push_str("\nSummary\n");
    let _ = writeln!(
        out,
        "  {}",
        one_line(r.summary.as_deref().unwrap_or("(no summary yet)"))
    );
    if let Some(e) = &job.error {
        let _ = writeln!(
            out,
            "  Error {}: {}",
            one_line(&e.code),
            one_line(&e.message)
        );
        if let Some(rid) = &e.request_id {
            let _ = writeln!(out, "  AWS request id {rid}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cannot_forge_lines() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "id": "01KBX0000000000000000000AA", "state": "failed", "action": "stop_instances",
            "spec": {"action": "stop_instances", "targets": {"instance_ids": ["i-0123456789abcdef0"]}},
            "created_at": "2026-12-02T00:00:00Z", "started_at": null, "finished_at": null,
            "attempts": 1, "max_attempts": 3, "cancel_requested": false, "progress": {},
            "error": {"code": "X", "message": "bad\nSummary\n  all fine"},
            "results": {"instances": [{"instance_id": "i-0123456789abcdef0", "state": "stopped",
                "name": "web\n  i-0fake  forged -> running\r\x1b[2J"}]}
        }))
        .expect("a job");
        let text = render(&job);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines
                .iter()
                .all(|l| !l.contains("forged") || l.contains("web\\n")),
            "{text}"
        );
        assert_eq!(
            lines.iter().filter(|l| l.trim() == "Summary").count(),
            1,
            "{text}"
        );
        assert!(!text.contains('\r') && !text.contains('\x1b'), "{text}");
    }
}
