//! Behaviour moto alone cannot show, through the fault-injecting proxy in front of it: status checks
//! that stay `initializing` for a while or turn `impaired`, waits that time out, throttling, 503s,
//! dropped connections and latency, and shared polling counted at the proxy.

mod common;

use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::{Daemon, DaemonOpts, Moto};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

async fn rig(
    instances: i32,
    tags: &[(&str, &str)],
    workers: usize,
) -> (Moto, FaultProxy, Daemon, Vec<String>) {
    rig_with(instances, tags, workers, "").await
}

async fn rig_with(
    instances: i32,
    tags: &[(&str, &str)],
    workers: usize,
    extra: &str,
) -> (Moto, FaultProxy, Daemon, Vec<String>) {
    let moto = Moto::start().await;
    let ids = moto.launch(instances, tags).await;
    let proxy = FaultProxy::start(&moto.url, 42).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        workers,
        extra: extra.to_string(),
        ..Default::default()
    })
    .await;
    (moto, proxy, d, ids)
}

#[tokio::test]
async fn waits_through_initializing_until_two_of_two_pass() {
    let (moto, proxy, d, ids) = rig(1, &[], 2).await;
    moto.stop(&ids[0..=0]).await;
    proxy.set(|f| {
        f.instance_status = Some((
            "initializing".into(),
            Instant::now() + Duration::from_millis(1500),
        ))
    });
    let id = d
        .submit(
            &json!({"action": "start_instances", "targets": {"instance_ids": ids.clone()},
            "wait": {"interval": "200ms", "timeout": "1m"}}),
        )
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let r = &j["results"]["instances"][0];
    assert_eq!(r["checks"], "2/2 checks passed");
    assert!(
        proxy.injected("DescribeInstanceStatus") >= 2,
        "the job saw `initializing` and kept waiting ({} rewritten answers)",
        proxy.injected("DescribeInstanceStatus")
    );
    assert!(
        r["seconds_to_status_ok"].as_f64().unwrap() >= r["seconds_to_running"].as_f64().unwrap(),
        "{r}"
    );
}

#[tokio::test]
async fn impaired_check_fails_the_job_naming_it() {
    let (_moto, proxy, d, ids) = rig(1, &[], 2).await;
    proxy.set(|f| f.instance_status = Some(("impaired".into(), Instant::now() + MINUTE)));
    let id = d
        .submit(
            &json!({"action": "reboot_instances", "targets": {"instance_ids": ids.clone()},
            "wait": {"interval": "200ms"}}),
        )
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "StatusCheckImpaired");
    let msg = j["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&ids[0]) && msg.contains("InstanceStatus is impaired"),
        "{msg}"
    );
    assert_eq!(j["results"]["instances"][0]["instance_status"], "impaired");
    assert_eq!(j["attempts"], 1, "impaired is not retried");
}

/// A start that falls back to stopped (EC2 does this when it cannot start an instance, e.g. without
/// a KMS grant for an encrypted volume) fails at once with `InstanceStopped` and the StateReason,
/// instead of waiting out its whole timeout.
#[tokio::test]
async fn a_start_that_falls_back_to_stopped_fails_at_once() {
    let (moto, proxy, d, ids) = rig(1, &[], 2).await;
    moto.stop(&ids[0..=0]).await;
    proxy.set(|f| f.instance_status = Some(("initializing".into(), Instant::now() + MINUTE)));
    let id = d
        .submit(
            &json!({"action": "start_instances", "targets": {"instance_ids": ids.clone()},
            "wait": {"interval": "200ms", "timeout": "10m"}}),
        )
        .await;
    // Seen running (checks initializing), then reported stopped.
    d.wait_for(&id, MINUTE, |j| j["progress"]["phase"] == "waiting")
        .await;
    let deadline = std::time::Instant::now() + MINUTE;
    while proxy.injected("DescribeInstanceStatus") < 1 {
        assert!(std::time::Instant::now() < deadline, "no status round");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set(|f| f.instance_state = Some(("stopped".into(), Instant::now() + MINUTE)));
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "InstanceStopped", "{j}");
    let msg = j["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&ids[0])
            && msg.contains("went back to stopped")
            && msg.contains("StateReason"),
        "{msg}"
    );
}

#[tokio::test]
async fn wait_timeout_reports_the_last_status_of_each_instance() {
    let (_moto, proxy, d, ids) = rig(2, &[], 2).await;
    proxy.set(|f| f.system_status = Some(("initializing".into(), Instant::now() + MINUTE)));
    let id = d
        .submit(
            &json!({"action": "reboot_instances", "targets": {"instance_ids": ids.clone()},
            "wait": {"interval": "200ms", "timeout": "2s"}}),
        )
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "WaitTimeout");
    let msg = j["error"]["message"].as_str().unwrap();
    for iid in &ids {
        assert!(
            msg.contains(&format!("{iid} (running, 1/2 checks passed)")),
            "{msg}"
        );
    }
    for r in j["results"]["instances"].as_array().unwrap() {
        assert_eq!(r["system_status"], "initializing");
        assert_eq!(r["checks"], "1/2 checks passed");
    }
}

#[tokio::test]
async fn injected_throttling_5xx_drops_and_latency_still_reach_the_right_state() {
    // A tight StartInstances bucket: pacing must hold some of the six start calls.
    let (moto, proxy, d, ids) = rig_with(
        6,
        &[("Group", "chaos")],
        4,
        // Each job calls alone (no coalescing), so the faults and the bucket meet many calls.
        "\n[pacing]\nstart_instances = { burst = 1, per_second = 4 }\ncoalesce_window = \"0s\"\n",
    )
    .await;
    proxy.set(|f| {
        f.throttle = 0.20;
        f.unavailable = 0.10;
        f.drop = 0.05;
        f.latency = Duration::from_millis(20);
    });
    let fast = json!({"interval": "200ms", "timeout": "1m"});
    // One job per instance and action, so the faults spread over many calls and jobs.
    for (action, want) in [
        ("stop_instances", "stopped"),
        ("start_instances", "running"),
    ] {
        let mut jobs = Vec::new();
        for iid in &ids {
            jobs.push(
                d.submit(
                    &json!({"action": action, "targets": {"instance_ids": [iid]}, "wait": fast}),
                )
                .await,
            );
        }
        jobs.push(
            d.submit(
                &json!({"action": "create_tags", "targets": {"tags": "Group=chaos"},
                "params": {"tags": {"Step": action}}}),
            )
            .await,
        );
        for id in &jobs {
            let j = d.wait_final(id, MINUTE).await;
            assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
        }
        assert_eq!(moto.states(&ids).await, vec![want; 6], "after {action}");
    }
    eprintln!(
        "chaos: {} faults injected over {} StopInstances / {} StartInstances / {} DescribeInstanceStatus calls",
        proxy.injected_total(),
        proxy.calls("StopInstances"),
        proxy.calls("StartInstances"),
        proxy.calls("DescribeInstanceStatus")
    );
    assert!(
        proxy.injected_total() >= 5,
        "faults were injected ({})",
        proxy.injected_total()
    );
    let held = d
        .metric("ec2jobd_ec2_pacing_wait_seconds_total{operation=\"StartInstances\"}")
        .await;
    assert!(held > 0.0, "pacing held some StartInstances calls");
}

#[tokio::test]
async fn fifty_jobs_waiting_share_one_status_call_per_round() {
    let (_moto, proxy, d, ids) = rig(50, &[], 64).await;
    // Checks stay `initializing` for 3 s, so every job is still waiting while the others join.
    proxy.set(|f| {
        f.instance_status = Some((
            "initializing".into(),
            Instant::now() + Duration::from_secs(3),
        ))
    });
    let mut jobs = Vec::new();
    for iid in &ids {
        jobs.push(
            d.submit(
                &json!({"action": "create_tags", "targets": {"instance_ids": [iid]},
                "params": {"tags": {"Herd": "yes"}},
                "wait": {"until": "status_ok", "interval": "500ms", "timeout": "1m"}}),
            )
            .await,
        );
    }
    for id in &jobs {
        let j = d.wait_final(id, MINUTE).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["results"]["instances"][0]["checks"], "2/2 checks passed");
    }
    // 50 ids fit one call: every round is one DescribeInstanceStatus, whatever the number of jobs.
    // The herd waited ~3 s at 500 ms, i.e. about 6-8 rounds; one call per job per round would be 300+.
    let calls = proxy.calls("DescribeInstanceStatus");
    eprintln!("50 waiting jobs: {calls} DescribeInstanceStatus calls in all");
    assert!(
        (3..=16).contains(&calls),
        "{calls} DescribeInstanceStatus calls for 50 waiting jobs"
    );
    assert_eq!(
        proxy.max_in_flight("DescribeInstanceStatus"),
        1,
        "one watcher, one call at a time"
    );
}

/// kill -9 while RunInstances is in flight (held at the proxy), then again while the launched
/// instances wait for their checks: after each restart the job resumes, finds what it launched by its
/// tag, and moto ends up holding exactly the requested instances, launched by one call.
/// Waits covering most of the region's fleet are polled by listing the fleet (unfiltered
/// DescribeInstanceStatus, paged by the proxy as EC2 pages it) when that takes fewer calls than
/// asking by id: 280 waited instances of 300 are 3 calls by id, 2 pages of 150.
#[tokio::test]
async fn waits_covering_the_fleet_poll_it_page_by_page() {
    let (_moto, proxy, d, ids) = rig(300, &[], 4).await;
    proxy.set(|f| {
        f.fleet_page = Some(150);
        f.instance_status = Some((
            "initializing".into(),
            Instant::now() + Duration::from_secs(3),
        ));
    });
    let waited = &ids[..280];
    let rounds0 = d.metric("ec2jobd_status_rounds_total").await;
    let job = d
        .submit(
            &json!({"action": "start_instances", "targets": {"instance_ids": waited},
            "wait": {"until": "status_ok", "interval": "200ms", "timeout": "1m"}}),
        )
        .await;
    let j = d.wait_final(&job, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    let results = j["results"]["instances"].as_array().expect("instances");
    assert_eq!(results.len(), 280, "{j}");
    assert!(
        results.iter().all(|i| i["checks"] == "2/2 checks passed"),
        "{j}"
    );
    let rounds = d.metric("ec2jobd_status_rounds_total").await - rounds0;
    let calls = proxy.calls("DescribeInstanceStatus") as f64;
    eprintln!(
        "280 of 300 instances waited: {calls} DescribeInstanceStatus calls over {rounds} rounds"
    );
    assert!(
        rounds >= 3.0,
        "the checks were held for several rounds: {rounds}"
    );
    assert!(
        calls <= 2.0 * rounds + 2.0,
        "{calls} calls over {rounds} rounds: by id would be 3 a round"
    );
    assert!(
        proxy
            .last_body("DescribeInstanceStatus")
            .contains("NextToken="),
        "the listing was followed page by page: {}",
        proxy.last_body("DescribeInstanceStatus")
    );
}

#[tokio::test]
async fn run_instances_survives_kill_9_mid_call_and_mid_wait_without_duplicates() {
    let moto = Moto::start().await;
    let image = moto.image().await;
    let proxy = FaultProxy::start(&moto.url, 7).await;
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    // The call reaches moto 1.5 s after it leaves the daemon; the daemon dies before the answer.
    proxy.set(|f| {
        f.latency = Duration::from_millis(1500);
        f.only = Some(vec!["RunInstances".into()]);
    });
    // Checks stay `initializing` long enough to kill the daemon during the wait too.
    proxy.set(|f| {
        f.instance_status = Some((
            "initializing".into(),
            Instant::now() + Duration::from_secs(12),
        ))
    });
    let id = d
        .submit(&json!({"action": "run_instances",
            "params": {"image_id": image, "instance_type": "t3.micro", "min_count": 3},
            "wait": {"interval": "200ms", "timeout": "2m"}}))
        .await;
    d.wait_for(&id, MINUTE, |j| j["progress"]["phase"] == "calling")
        .await;
    d.kill9();
    d.spawn().await;
    // The lease (3 s) expires, the job is claimed again and finds the 3 instances by its tag.
    let j = d
        .wait_for(&id, MINUTE, |j| {
            j["attempts"] == 2 && j["progress"]["phase"] == "waiting"
        })
        .await;
    assert!(j["error"].is_null(), "{j}");
    d.kill9();
    d.spawn().await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    assert_eq!(j["attempts"], 3, "{j}");
    assert_eq!(j["results"]["instances"].as_array().unwrap().len(), 3);
    assert_eq!(proxy.calls("RunInstances"), 1, "RunInstances was made once");
    assert_eq!(
        moto.tagged("ec2jobd:job-id", &id).await.len(),
        3,
        "no duplicates in moto"
    );
}

/// kill -9 while the type change of a stopped-for-resize instance is in flight: the resumed attempt
/// finds the instance stopped (no longer "running"), still starts it again from the checkpointed
/// restart list, and the instance ends running with the new type after one stop and one start.
#[tokio::test]
async fn resize_survives_kill_9_between_stop_and_start() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Group", "resize")]).await;
    let proxy = FaultProxy::start(&moto.url, 11).await;
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    proxy.set(|f| {
        f.latency = Duration::from_millis(1500);
        f.only = Some(vec!["ModifyInstanceAttribute".into()]);
    });
    let id = d
        .submit(&json!({"action": "modify_instance_attribute", "targets": {"instance_ids": ids},
            "params": {"instance_type": "t3.large"}, "wait": {"interval": "200ms", "timeout": "1m"}}))
        .await;
    d.wait_for(&id, MINUTE, |j| {
        j["progress"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("changing the type"))
    })
    .await;
    d.kill9();
    assert_eq!(moto.state(&ids[0]).await, "stopped", "killed mid-resize");
    d.spawn().await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    assert_eq!(j["attempts"], 2, "{j}");
    assert_eq!(j["results"]["instances"][0]["checks"], "2/2 checks passed");
    assert_eq!(moto.state(&ids[0]).await, "running", "left as it was found");
    let t = moto
        .ec2()
        .await
        .describe_instances()
        .instance_ids(&ids[0])
        .send()
        .await
        .unwrap()
        .reservations()[0]
        .instances()[0]
        .instance_type()
        .map(|t| t.as_str().to_string());
    assert_eq!(t.as_deref(), Some("t3.large"));
    assert_eq!(proxy.calls("StopInstances"), 1);
    assert_eq!(proxy.calls("StartInstances"), 1);
}

/// An account that assumes a role (with an external id) and reaches AWS through a proxy: both are
/// really used (the proxy sees the AssumeRole call with the external id, then the EC2 calls, all as
/// a forward proxy). Its allowlists refuse other regions, images and types at submission, and
/// `GET /v1/catalog` shows them.
#[tokio::test]
async fn assumed_role_through_a_proxy_and_allowlists_refuse_at_submission() {
    let moto = Moto::start().await;
    let image = moto.image().await;
    let ids = moto.launch(1, &[("Group", "xacct")]).await;
    let proxy = FaultProxy::start(&moto.url, 3).await;
    let extra = format!(
        r#"
[accounts.xacct]
region = "us-east-1"
endpoint_url = "{moto}"
https_proxy = "{proxy}"
role_arn = "arn:aws:iam::123456789012:role/ec2jobd-test"
external_id = "ext-42"
role_session_name = "ec2jobd-e2e"
retry_base = "20ms"
allowed_regions = ["us-east-1"]
allowed_instance_types = ["t3.*"]
allowed_images = ["{image}"]
"#,
        moto = moto.url,
        proxy = proxy.url,
    );
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        extra,
        ..Default::default()
    })
    .await;
    let id = d
        .submit(&json!({"action": "describe_instances", "account": "xacct",
            "targets": {"tags": "Group=xacct"}}))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    assert_eq!(j["results"]["instances"][0]["instance_id"], ids[0].as_str());
    assert_eq!(proxy.calls("AssumeRole"), 1, "the role was assumed once");
    let body = proxy.last_body("AssumeRole");
    assert!(
        body.contains("ExternalId=ext-42") && body.contains("RoleSessionName=ec2jobd-e2e"),
        "{body}"
    );
    assert!(body.contains("ec2jobd-test"), "{body}");
    assert!(proxy.calls("DescribeInstances") >= 1);
    assert!(
        proxy.forward_proxied() >= 2,
        "every call went through the proxy as a forward proxy"
    );
    assert!(!j.to_string().contains("SecretAccessKey"));

    // The catalog lists the guardrails; nothing about credentials or roles.
    let (s, c) = d.get_json("/v1/catalog").await;
    assert_eq!(s, 200);
    let x = c["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "xacct")
        .unwrap();
    assert_eq!(x["instance_types"], json!(["t3.*"]));
    assert_eq!(x["regions"], json!(["us-east-1"]));
    assert_eq!(x["images"], json!([image]));
    assert!(!c.to_string().contains("role"), "{c}");
    assert!(c["actions"]
        .as_array()
        .unwrap()
        .contains(&json!("modify_instance_attribute")));

    // Anything outside the lists is refused at submission with 422 naming field and value.
    let run = |image: &str, t: &str| {
        json!({"action": "run_instances", "account": "xacct", "dry_run": true,
            "params": {"image_id": image, "instance_type": t}})
    };
    for (bad, field, value) in [
        (run(&image, "m5.large"), "params.instance_type", "m5.large"),
        (
            run("ami-00000000", "t3.micro"),
            "params.image_id",
            "ami-00000000",
        ),
        (
            json!({"action": "describe_instances", "account": "xacct", "region": "eu-west-1",
                "targets": {"tags": "a=b"}}),
            "region",
            "eu-west-1",
        ),
        (
            json!({"action": "modify_instance_attribute", "account": "xacct",
                "targets": {"instance_ids": ids.clone()}, "params": {"instance_type": "c5.large"}}),
            "params.instance_type",
            "c5.large",
        ),
    ] {
        let before = d.get_json("/v1/jobs").await.1["jobs"]
            .as_array()
            .unwrap()
            .len();
        let r = d.post_job(&d.admin, &bad).await;
        assert_eq!(r.status(), 422, "{bad}");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["code"], "not_allowed", "{p}");
        assert_eq!(p["field"], field, "{p}");
        assert!(p["detail"].as_str().unwrap().contains(value), "{p}");
        let after = d.get_json("/v1/jobs").await.1["jobs"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(before, after, "nothing stored");
    }
    // Inside the lists it is accepted (a dry run, so nothing launches).
    let j = d
        .wait_final(&d.submit(&run(&image, "t3.micro")).await, MINUTE)
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
}

/// A dry run that EC2 answers with `UnauthorizedOperation` (the caller lacks the permission) fails
/// at once with that code and the request id; `DryRunOperation` is success ("would succeed").
#[tokio::test]
async fn dry_run_unauthorized_is_a_permanent_failure() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[]).await;
    let proxy = FaultProxy::start(&moto.url, 5).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    let spec =
        json!({"action": "stop_instances", "targets": {"instance_ids": ids}, "dry_run": true});
    let j = d.wait_final(&d.submit(&spec).await, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(j["results"]["summary"]
        .as_str()
        .unwrap()
        .contains("would succeed"));
    proxy.set(|f| f.error = Some(("StopInstances".into(), 403, "UnauthorizedOperation".into())));
    let j = d.wait_final(&d.submit(&spec).await, MINUTE).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "UnauthorizedOperation");
    assert_eq!(j["error"]["request_id"], "fault-error");
    assert_eq!(j["attempts"], 1, "not retried: {j}");
    assert_eq!(
        proxy.injected("StopInstances"),
        1,
        "the SDK did not retry it either"
    );
    assert_eq!(moto.state(&ids[0]).await, "running");
}

/// `hibernate` with `fallback_to_stop`: EC2 refuses to hibernate (here, any call asking it to);
/// the list is tried whole, then each instance alone, and each refused one is stopped plainly. The
/// same without the fallback fails with EC2's code.
#[tokio::test]
async fn hibernation_refused_falls_back_to_a_plain_stop_when_asked() {
    let (moto, proxy, d, ids) = rig(2, &[], 2).await;
    proxy.set(|f| {
        f.error = Some((
            "StopInstances".into(),
            400,
            "UnsupportedHibernationConfiguration".into(),
        ));
        f.error_if = Some("Hibernate=true".into());
    });
    let stop = |fallback: bool| {
        json!({"action": "stop_instances", "targets": {"instance_ids": ids},
               "params": {"hibernate": true, "fallback_to_stop": fallback},
               "wait": {"interval": "200ms", "timeout": "1m"}})
    };
    let j = d.wait_final(&d.submit(&stop(false)).await, MINUTE).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "UnsupportedHibernationConfiguration");
    assert!(moto.states(&ids).await.iter().all(|s| s == "running"));
    let before = proxy.calls("StopInstances");
    let j = d.wait_final(&d.submit(&stop(true)).await, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(moto.states(&ids).await.iter().all(|s| s == "stopped"));
    assert_eq!(
        proxy.calls("StopInstances") - before,
        5,
        "one for both, one per instance hibernating, one per instance stopping"
    );
}

/// `rate`: 40 tagged instances stopped ten at a time — never more than ten in one call, each wave's
/// wait done before the next call; then starts whose first wave fails permanently: no new wave, and
/// the job lists the failed and the untouched instances.
#[tokio::test]
async fn waves_respect_max_concurrency_and_stop_after_max_errors() {
    let (moto, proxy, d, ids) = rig(40, &[("Bulk", "yes")], 2).await;
    let j = d
        .wait_final(
            &d.submit(
                &json!({"action": "stop_instances", "targets": {"tags": "Bulk=yes"},
                "rate": {"max_concurrency": 10, "max_errors": 0},
                "wait": {"interval": "200ms", "timeout": "1m"}}),
            )
            .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(proxy.calls("StopInstances"), 4);
    assert_eq!(
        proxy.max_ids("StopInstances"),
        10,
        "never more than 10 at once"
    );
    let order = proxy.order();
    let stops: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, o)| *o == "StopInstances")
        .map(|(i, _)| i)
        .collect();
    for w in stops.windows(2) {
        assert!(
            order[w[0]..w[1]]
                .iter()
                .any(|o| o == "DescribeInstanceStatus"),
            "each wave waited before the next: {order:?}"
        );
    }
    assert!(moto.states(&ids).await.iter().all(|s| s == "stopped"));

    proxy.set(|f| f.error = Some(("StartInstances".into(), 403, "UnauthorizedOperation".into())));
    let j = d
        .wait_final(
            &d.submit(
                &json!({"action": "start_instances", "targets": {"tags": "Bulk=yes"},
                "rate": {"max_concurrency": "25%", "max_errors": "10%"},
                "wait": {"interval": "200ms", "timeout": "1m"}}),
            )
            .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "MaxErrorsExceeded");
    assert_eq!(
        proxy.calls("StartInstances"),
        1,
        "no new wave after the errors"
    );
    let outcomes: Vec<String> = j["results"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| o.starts_with("failed: UnauthorizedOperation"))
            .count(),
        10
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| o.starts_with("not touched"))
            .count(),
        30
    );
    assert!(j["error"]["message"]
        .as_str()
        .unwrap()
        .contains("30 not touched"));
    assert!(moto.states(&ids).await.iter().all(|s| s == "stopped"));

    let r = d
        .post_job(
            &d.admin,
            &json!({"action": "describe_instances", "targets": {"tags": "Bulk=yes"}, "rate": {"max_concurrency": 5}}),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "rate");
}

/// Polls `/metrics` until `ec2jobd_jobs_parked` reads `n`.
async fn parked(d: &Daemon, n: f64) {
    let deadline = Instant::now() + MINUTE;
    loop {
        let now = d.metric("ec2jobd_jobs_parked").await;
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} jobs parked, expected {n}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One start job per (stopped) instance, with the checks held at `initializing` until the test
/// lets them pass; returns once every job is parked.
async fn park_start_jobs(
    moto: &Moto,
    proxy: &FaultProxy,
    d: &Daemon,
    ids: &[String],
) -> Vec<String> {
    moto.stop(ids).await;
    proxy.set(|f| f.instance_status = Some(("initializing".into(), Instant::now() + MINUTE * 5)));
    let mut jobs = Vec::new();
    for iid in ids {
        jobs.push(
            d.submit(
                &json!({"action": "start_instances", "targets": {"instance_ids": [iid]},
                "wait": {"interval": "200ms", "timeout": "2m"}}),
            )
            .await,
        );
    }
    parked(d, ids.len() as f64).await;
    // Parked at once; `waiting` once the lot made their (shared) start call and recorded it.
    for id in &jobs {
        d.wait_for(id, MINUTE, |j| j["progress"]["phase"] == "waiting")
            .await;
    }
    jobs
}

/// Waits hold no worker: with one worker, eight start jobs whose checks stay `initializing` are all
/// parked at once, a describe job submitted after them runs meanwhile, a parked job is cancelled
/// with what its wait saw, and the rest resume and succeed once the checks pass.
#[tokio::test]
async fn waiting_jobs_hold_no_worker() {
    let (moto, proxy, d, ids) = rig(8, &[], 1).await;
    let jobs = park_start_jobs(&moto, &proxy, &d, &ids).await;
    let describe = d
        .submit(&json!({"action": "describe_instances", "targets": {"instance_ids": ids.clone()}}))
        .await;
    let j = d.wait_final(&describe, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    for id in &jobs {
        let j = d.job(id).await;
        assert_eq!(j["state"], "running", "still waiting: {j}");
        assert_eq!(j["progress"]["phase"], "waiting", "{j}");
    }
    // Cancel one once its wait has judged a round (a round that began after every wait did): it
    // ends with what the wait saw.
    let rounds = d.metric("ec2jobd_status_rounds_total").await;
    let deadline = Instant::now() + MINUTE;
    while d.metric("ec2jobd_status_rounds_total").await < rounds + 2.0 {
        assert!(Instant::now() < deadline, "no status rounds");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = d
        .req(
            reqwest::Method::POST,
            &format!("/v1/jobs/{}/cancel", jobs[0]),
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let j = d.wait_final(&jobs[0], MINUTE).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    let r = &j["results"]["instances"][0];
    assert_eq!(r["checks"], "1/2 checks passed", "{j}");
    assert_eq!(r["previous_state"], "stopped", "{j}");
    parked(&d, 7.0).await;
    // The checks pass: every other job resumes and succeeds.
    proxy.set(|f| f.instance_status = None);
    for id in &jobs[1..] {
        let j = d.wait_final(id, MINUTE).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["attempts"], 1, "resuming is not another attempt: {j}");
        let r = &j["results"]["instances"][0];
        assert_eq!(r["checks"], "2/2 checks passed", "{j}");
        assert_eq!(r["outcome"], "called", "{j}");
        assert!(r["seconds_to_status_ok"].as_f64().is_some(), "{j}");
        assert!(
            j["results"]["summary"]
                .as_str()
                .is_some_and(|s| s.contains("all reached status_ok (2/2 checks passed)")),
            "{j}"
        );
    }
    // A finished job's event stream ends after its last event.
    let events = d.text(&format!("/v1/jobs/{}/events", jobs[1])).await;
    for k in ["parked", "wait_ended", "resumed", "succeeded"] {
        assert!(
            events.contains(&format!("event: {k}")),
            "{k} missing from {events}"
        );
    }
    assert_eq!(proxy.ids("StartInstances"), 8, "no instance started twice");
    parked(&d, 0.0).await;
}

/// Parked jobs survive their process: after kill -9 their leases expire and they are parked again
/// (one more attempt, as for any job whose process died); after a graceful stop they are given
/// back and parked again at once (no attempt counted). No start call is repeated.
#[tokio::test]
async fn parked_waits_survive_kill_9_and_restart() {
    let (moto, proxy, mut d, ids) = rig(3, &[], 1).await;
    let jobs = park_start_jobs(&moto, &proxy, &d, &ids).await;
    d.kill9();
    d.spawn().await;
    // The lot's leases (3 s) expire; each job is claimed again and parks from its checkpoint.
    parked(&d, 3.0).await;
    for id in &jobs {
        let j = d.job(id).await;
        assert_eq!(
            (j["state"].as_str(), j["attempts"].as_u64()),
            (Some("running"), Some(2)),
            "{j}"
        );
    }
    assert!(d.terminate(MINUTE).success());
    d.spawn().await;
    parked(&d, 3.0).await;
    proxy.set(|f| f.instance_status = None);
    for id in &jobs {
        let j = d.wait_final(id, MINUTE).await;
        assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
        assert_eq!(j["attempts"], 2, "a graceful restart costs no attempt: {j}");
        let r = &j["results"]["instances"][0];
        assert_eq!(r["checks"], "2/2 checks passed", "{j}");
        assert_eq!(r["outcome"], "called", "{j}");
    }
    assert_eq!(proxy.ids("StartInstances"), 3, "no instance started twice");
}

/// Coalesced calls: twenty one-instance start jobs and one naming an instance that does not exist,
/// submitted at once, share a few DescribeInstances and StartInstances calls; the batch EC2 refuses
/// for the missing id is sent again without it, so only that job fails, with EC2's code.
#[tokio::test]
async fn a_batch_fails_only_the_job_whose_instance_is_missing() {
    let (moto, proxy, d, ids) = rig(20, &[], 8).await;
    moto.stop(&ids).await;
    let spec = |iid: &str| {
        json!({"action": "start_instances", "targets": {"instance_ids": [iid]},
            "wait": {"until": "running", "interval": "200ms", "timeout": "1m"}})
    };
    let missing = "i-0123456789abcdef0";
    let mut specs: Vec<Value> = ids.iter().map(|i| spec(i)).collect();
    specs.insert(7, spec(missing));
    let jobs = futures::future::join_all(specs.iter().map(|s| d.submit(s))).await;
    for (id, s) in jobs.iter().zip(&specs) {
        let j = d.wait_final(id, MINUTE).await;
        if s["targets"]["instance_ids"][0] == missing {
            assert_eq!(j["state"], "failed", "{j}");
            assert_eq!(j["error"]["code"], "InvalidInstanceID.NotFound", "{j}");
            assert!(
                j["error"]["message"].as_str().unwrap().contains(missing),
                "{j}"
            );
        } else {
            assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
            assert_eq!(j["results"]["instances"][0]["state"], "running", "{j}");
            assert_eq!(j["results"]["instances"][0]["outcome"], "called", "{j}");
        }
    }
    assert_eq!(moto.states(&ids).await, vec!["running"; 20]);
    let (starts, describes) = (
        proxy.calls("StartInstances"),
        proxy.calls("DescribeInstances"),
    );
    eprintln!(
        "21 jobs: {starts} StartInstances (most ids {}), {describes} DescribeInstances (most ids {})",
        proxy.max_ids("StartInstances"),
        proxy.max_ids("DescribeInstances")
    );
    assert!(starts < 20, "{starts} StartInstances calls for 20 jobs");
    assert!(
        proxy.max_ids("StartInstances") > 1,
        "calls carried several jobs' ids"
    );
    assert!(
        proxy.max_ids("DescribeInstances") > 1,
        "describes carried several jobs' ids"
    );
}
