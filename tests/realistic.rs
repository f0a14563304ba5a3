//! Issue 31: real EC2, not moto. Every test runs the daemon against moto behind the fault proxy's
//! realistic profile (`proxy::Realistic::issue_31`: an id EC2 just made is unknown to other calls
//! for 3 s, an instance is `pending` 4 s after a start or launch and `stopping` 4 s after a stop,
//! with `IncorrectInstanceState` for calls that need the settled state, status checks
//! `initializing` for 3 s after a start, describe pages of 5), one behaviour per test, each of
//! which failed on main before the issue.

mod common;

use std::time::Duration;

use common::proxy::{FaultProxy, Realistic};
use common::{Daemon, DaemonOpts, Moto};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

/// moto, the proxy with the realistic profile in front of it, and a daemon calling through it.
async fn realistic(seed: u64) -> (Moto, FaultProxy, Daemon) {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.url, seed).await;
    proxy.set(|f| {
        f.realistic = Some(Realistic::issue_31());
        f.checks_after_start = Some(Duration::from_secs(7));
    });
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        workers: 4,
        ..Default::default()
    })
    .await;
    (moto, proxy, d)
}

const FAST: &str = r#"{"interval": "500ms", "timeout": "2m"}"#;

fn fast() -> Value {
    serde_json::from_str(FAST).unwrap()
}

fn states(j: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = j["results"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["state"].as_str().unwrap_or("").to_string(),
                i["checks"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn run(d: &Daemon, spec: Value) -> Value {
    let id = d.submit(&spec).await;
    d.wait_final(&id, 3 * MINUTE).await
}

/// `action` on `ids` without waiting, which must succeed.
async fn act_without_wait(d: &Daemon, action: &str, ids: &[String]) {
    let j = run(
        d,
        json!({"action": action, "targets": {"instance_ids": ids}, "wait": {"until": "none"}}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{action}: {j}");
}

/// A launch waits for EC2 to know the instances it made (NotFound for 3 s), then through
/// `pending` and `initializing` checks, to 2/2.
#[tokio::test]
async fn a_launch_waits_until_ec2_knows_its_instances_then_for_2_of_2() {
    let (moto, proxy, d) = realistic(31).await;
    let image = moto.image().await;
    let j = run(
        &d,
        json!({"action": "run_instances", "params": {"image_id": image,
            "instance_type": "t3.micro", "min_count": 3, "max_count": 3}, "wait": fast()}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        states(&j),
        vec![("running".to_string(), "2/2 checks passed".to_string()); 3]
    );
    assert!(proxy.injected_total() > 0, "the profile acted");
    assert_eq!(proxy.calls("RunInstances"), 1, "launched once");
}

/// Tags for instances another job launched a moment ago: the ids are the caller's, unknown to EC2
/// for a few seconds; the job waits its grace for them instead of failing NotFound.
#[tokio::test]
async fn fresh_ids_from_another_job_are_tagged_once_ec2_knows_them() {
    let (moto, _proxy, d) = realistic(32).await;
    let image = moto.image().await;
    let j = run(
        &d,
        json!({"action": "run_instances", "params": {"image_id": image,
            "instance_type": "t3.micro", "min_count": 2, "max_count": 2},
            "wait": {"until": "none"}}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let ids: Vec<String> = j["results"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap().to_string())
        .collect();
    let j = run(
        &d,
        json!({"action": "create_tags", "targets": {"instance_ids": ids},
            "params": {"tags": {"Team": "web"}}}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let tagged = moto.tagged("Team", "web").await;
    for id in &ids {
        assert!(tagged.contains(id), "{id} not tagged: {tagged:?}");
    }
}

/// Start right after a stop (no wait): the instances are still `stopping` and EC2 refuses the
/// start; the job waits for `stopped`, then starts them and waits for 2/2.
#[tokio::test]
async fn a_start_right_after_a_stop_waits_for_stopped_then_starts() {
    let (moto, _proxy, d) = realistic(33).await;
    let ids = moto.launch(2, &[("Grp", "a")]).await;
    act_without_wait(&d, "stop_instances", &ids).await;
    let j = run(
        &d,
        json!({"action": "start_instances", "targets": {"instance_ids": ids}, "wait": fast()}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        states(&j),
        vec![("running".to_string(), "2/2 checks passed".to_string()); 2]
    );
    for id in &ids {
        assert_eq!(moto.state(id).await, "running");
    }
}

/// Stop and reboot of instances still `pending` after a start wait for `running` first.
#[tokio::test]
async fn stop_and_reboot_of_pending_instances_wait_for_running() {
    let (moto, _proxy, d) = realistic(34).await;
    let ids = moto.launch(2, &[]).await;
    moto.stop(&ids).await;
    act_without_wait(&d, "start_instances", &ids[..1]).await;
    let j = run(
        &d,
        json!({"action": "reboot_instances", "targets": {"instance_ids": &ids[..1]}}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "reboot: {j}");
    act_without_wait(&d, "start_instances", &ids[1..]).await;
    let j = run(
        &d,
        json!({"action": "stop_instances", "targets": {"instance_ids": &ids[1..]}, "wait": fast()}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "stop: {j}");
    assert_eq!(moto.state(&ids[1]).await, "stopped");
}

/// A resize of instances still `stopping` waits for `stopped`, then changes the type.
#[tokio::test]
async fn a_resize_while_stopping_waits_for_stopped() {
    let (moto, _proxy, d) = realistic(35).await;
    let ids = moto.launch(1, &[]).await;
    act_without_wait(&d, "stop_instances", &ids).await;
    let j = run(
        &d,
        json!({"action": "modify_instance_attribute", "targets": {"instance_ids": ids},
            "params": {"instance_type": "t3.large"}, "wait": fast()}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        j["results"]["instances"][0]["instance_type"], "t3.large",
        "{j}"
    );
}

/// Describes page: 12 instances in 12 reservations, pages of 5, all found.
#[tokio::test]
async fn describes_follow_every_page() {
    let (moto, proxy, d) = realistic(36).await;
    for _ in 0..12 {
        moto.launch(1, &[("Fleet", "paged")]).await;
    }
    let j = run(
        &d,
        json!({"action": "describe_instances", "targets": {"tags": "Fleet=paged"}}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["results"]["instances"].as_array().unwrap().len(), 12);
    assert!(
        proxy.calls("DescribeInstances") >= 3,
        "three pages at least"
    );
}

/// The launch of a job that names fallbacks: no capacity for the first instance type (ever), so
/// the next is launched, once, and the job says which.
#[tokio::test]
async fn a_launch_without_capacity_falls_back_to_the_next_instance_type() {
    let (moto, proxy, d) = realistic(37).await;
    let far = std::time::Instant::now() + 10 * MINUTE;
    proxy.set(|f| f.no_capacity = Some(("t3.micro".into(), far)));
    let image = moto.image().await;
    let j = run(
        &d,
        json!({"action": "run_instances", "params": {"image_id": image,
            "instance_type": "t3.micro", "fallback_instance_types": ["t3.small"]},
            "wait": fast()}),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        j["results"]["instances"][0]["instance_type"], "t3.small",
        "{j}"
    );
    assert_eq!(j["attempts"], 1, "{j}");
    assert!(proxy.injected("RunInstances") > 0, "t3.micro was refused");
    assert_eq!(proxy.created("RunInstances").len(), 1, "launched once");
}

/// A start while EC2 has no capacity (for 3 s) is tried again until there is, without using up
/// the job's attempts (it allows one), and says so while it waits.
#[tokio::test]
async fn a_start_without_capacity_is_tried_again_until_ec2_has_room() {
    let (moto, proxy, d) = realistic(38).await;
    let ids = moto.launch(1, &[]).await;
    moto.stop(&ids).await;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    proxy.set(|f| f.no_capacity = Some(("any".into(), until)));
    let id = d
        .submit(
            &json!({"action": "start_instances", "targets": {"instance_ids": ids},
            "wait": fast(), "max_attempts": 1}),
        )
        .await;
    let seen = d
        .wait_for(&id, MINUTE, |j| {
            j["progress"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("EC2 has no capacity for it now"))
        })
        .await;
    assert_eq!(
        seen["error"]["code"], "InsufficientInstanceCapacity",
        "{seen}"
    );
    let j = d.wait_final(&id, 3 * MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(j["attempts"].as_u64().unwrap() > 1, "{j}");
    assert_eq!(
        j["attempts"], j["max_attempts"],
        "each refusal gave its attempt back: {j}"
    );
    assert_eq!(moto.state(&ids[0]).await, "running");
    assert!(proxy.injected("StartInstances") > 0);
}

/// No capacity for the job's whole time limit: it fails then, saying so; a quota refusal fails at
/// once (one call), naming the quota to raise.
#[tokio::test]
async fn capacity_is_bounded_by_the_time_limit_and_quotas_fail_at_once() {
    let (moto, proxy, d) = realistic(39).await;
    let image = moto.image().await;
    let far = std::time::Instant::now() + 10 * MINUTE;
    proxy.set(|f| f.no_capacity = Some(("t3.micro".into(), far)));
    let j = run(
        &d,
        json!({"action": "run_instances", "params": {"image_id": image,
            "instance_type": "t3.micro"}, "timeout": "3s", "wait": fast()}),
    )
    .await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "InsufficientInstanceCapacity", "{j}");
    let message = j["error"]["message"].as_str().unwrap();
    assert!(message.contains("time limit of 3s"), "{message}");
    assert!(proxy.created("RunInstances").is_empty());

    proxy.set(|f| {
        f.no_capacity = None;
        f.quota = Some("VcpuLimitExceeded".into());
    });
    let before = proxy.calls("RunInstances");
    let j = run(
        &d,
        json!({"action": "run_instances", "params": {"image_id": image,
            "instance_type": "t3.micro"}, "wait": fast()}),
    )
    .await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "VcpuLimitExceeded", "{j}");
    assert_eq!(j["attempts"], 1, "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("L-1216C47A"),
        "names the quota: {j}"
    );
    assert_eq!(
        proxy.calls("RunInstances") - before,
        1,
        "one call, no retry"
    );
}

/// Snapshots and an AMI a job just made are unknown to EC2 for a while: tagging them with their
/// rotation group and the waits for `completed` and `available` wait for EC2 to know them (saying
/// so) instead of failing NotFound, and the rotation (keep 1) then finds and rotates them.
#[tokio::test]
async fn snapshots_and_images_a_job_made_are_waited_for_until_ec2_knows_them() {
    let (moto, proxy, d) = realistic(40).await;
    let ids = moto.launch(1, &[("Backup", "nightly")]).await;
    let snapshots = |params: Value| {
        json!({"action": "create_snapshots", "targets": {"instance_ids": ids},
            "params": params, "wait": fast()})
    };
    // Pending for a moment, so the job also waits for its snapshot by id.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    proxy.set(|f| f.snapshot_state = Some(("pending".into(), "50%".into(), until)));
    let id = d.submit(&snapshots(json!({}))).await;
    let j = d.wait_final(&id, 3 * MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        j["results"]["volumes"][0]["snapshot"]["state"], "completed",
        "{j}"
    );
    let events = d.text(&format!("/v1/jobs/{id}/events")).await;
    assert!(events.contains("waiting for EC2 to know"), "{events}");
    // Twice with keep 1: each tags its fresh snapshot with the rotation group, the second rotates
    // the first away.
    let mut summaries = Vec::new();
    for _ in 0..2 {
        let j = run(&d, snapshots(json!({"keep": 1}))).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        summaries.push(j["results"]["summary"].as_str().unwrap_or("").to_string());
    }
    assert!(summaries[1].contains("deleted 1"), "{summaries:?}");
    assert!(
        proxy.injected("CreateTags") > 0,
        "tagged once EC2 knew them"
    );
    assert_eq!(proxy.created("CreateSnapshot").len(), 3, "one per job");
    let id = d
        .submit(
            &json!({"action": "create_image", "targets": {"instance_ids": ids},
            "params": {"no_reboot": true, "name": "fresh-{job_id}"}, "wait": fast()}),
        )
        .await;
    let j = d.wait_final(&id, 3 * MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["results"]["images"][0]["state"], "available", "{j}");
    let events = d.text(&format!("/v1/jobs/{id}/events")).await;
    assert!(events.contains("waiting for EC2 to know"), "{events}");
}
