//! End-to-end tests of the instance actions against a real moto server: calls, waits through the
//! shared status watcher, results, dry runs, AWS errors, and coalesced polling. Final states are
//! checked in moto directly, not only in ec2jobd's results.

mod common;

use std::time::Duration;

use common::{Daemon, DaemonOpts, Moto};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

async fn moto_tags(moto: &Moto, id: &str) -> Vec<(String, String)> {
    let out = moto
        .ec2()
        .await
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .expect("describe in moto");
    let mut tags: Vec<(String, String)> = out.reservations()[0].instances()[0]
        .tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or("").to_string(),
                t.value().unwrap_or("").to_string(),
            )
        })
        .collect();
    tags.sort();
    tags
}

fn by_id(j: &Value) -> std::collections::HashMap<String, Value> {
    j["results"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["instance_id"].as_str().unwrap().to_string(), i.clone()))
        .collect()
}

#[tokio::test]
async fn lifecycle_stop_start_reboot_tag_terminate() {
    let moto = Moto::start().await;
    let ids = moto.launch(2, &[("Group", "life"), ("Name", "app")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;
    let fast = json!({"interval": "200ms", "timeout": "1m"});

    // Stop by tag: waits for `stopped` by default.
    let id = d
        .submit(
            &json!({"action": "stop_instances", "targets": {"tags": "Group=life"}, "wait": fast}),
        )
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["spec"]["wait"]["until"], "stopped");
    for (iid, r) in by_id(&j) {
        assert_eq!(r["previous_state"], "running", "{r}");
        assert_eq!(r["state"], "stopped", "{r}");
        assert_eq!(r["outcome"], "called");
        assert_eq!(moto.state(&iid).await, "stopped");
    }

    // Start by id (scheduler style): waits until 2/2 status checks pass.
    let id = d
        .submit(&json!({"action": "start_instances",
            "targets": {"instance_ids": format!("{};{}", ids[0], ids[1])}, "wait": fast}))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["spec"]["wait"]["until"], "status_ok");
    assert!(
        j["results"]["summary"]
            .as_str()
            .unwrap()
            .contains("2/2 checks passed"),
        "{j}"
    );
    for (iid, r) in by_id(&j) {
        assert_eq!(r["previous_state"], "stopped");
        assert_eq!(r["state"], "running");
        assert_eq!(r["checks"], "2/2 checks passed");
        assert_eq!(
            (r["system_status"].as_str(), r["instance_status"].as_str()),
            (Some("ok"), Some("ok"))
        );
        assert!(r["seconds_to_status_ok"].as_f64().is_some(), "{r}");
        assert!(
            r["private_ip"].is_string() && r["public_dns_name"].is_string(),
            "{r}"
        );
        assert_eq!(r["name"], "app");
        assert_eq!(moto.state(&iid).await, "running");
    }
    assert_eq!(
        d.metric("ec2jobd_ec2_calls_total{operation=\"StartInstances\",outcome=\"ok\"}")
            .await,
        1.0
    );

    // Starting running instances makes no call: it observes and waits.
    let id = d
        .submit(&json!({"action": "start_instances", "targets": {"tags": {"Group": "life"}}, "wait": fast}))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    for (_, r) in by_id(&j) {
        assert_eq!(r["outcome"], "already running");
    }
    assert_eq!(
        d.metric("ec2jobd_ec2_calls_total{operation=\"StartInstances\",outcome=\"ok\"}")
            .await,
        1.0,
        "no second StartInstances"
    );

    // Reboot, waiting for status checks again.
    let id = d
        .submit(&json!({"action": "reboot_instances", "targets": {"instance_ids": [ids[0]]}, "wait": fast}))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["results"]["instances"][0]["checks"], "2/2 checks passed");
    assert_eq!(
        d.metric("ec2jobd_ec2_calls_total{operation=\"RebootInstances\",outcome=\"ok\"}")
            .await,
        1.0
    );

    // Tags: add, then remove by key.
    let id = d
        .submit(
            &json!({"action": "create_tags", "targets": {"tags": "Group=life"},
            "params": {"tags": {"Owner": "ops", "Env": "prod"}}}),
        )
        .await;
    assert_eq!(d.wait_final(&id, MINUTE).await["state"], "succeeded");
    let tags = moto_tags(&moto, &ids[1]).await;
    assert!(
        tags.contains(&("Owner".into(), "ops".into()))
            && tags.contains(&("Env".into(), "prod".into())),
        "{tags:?}"
    );
    let id = d
        .submit(
            &json!({"action": "delete_tags", "targets": {"instance_ids": ids.clone()},
            "params": {"keys": ["Owner"]}}),
        )
        .await;
    assert_eq!(d.wait_final(&id, MINUTE).await["state"], "succeeded");
    let tags = moto_tags(&moto, &ids[1]).await;
    assert!(
        !tags.iter().any(|(k, _)| k == "Owner") && tags.iter().any(|(k, _)| k == "Env"),
        "{tags:?}"
    );

    // Terminate, waiting for `terminated`.
    let id = d
        .submit(&json!({"action": "terminate_instances", "targets": {"instance_ids": ids.clone()}, "wait": fast}))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    for iid in &ids {
        assert_eq!(moto.state(iid).await, "terminated");
    }
    // The events show the wait's progress.
    let (_, _) = (0, 0);
    let r = d
        .req(
            reqwest::Method::GET,
            &format!("/v1/jobs/{id}/events"),
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    let text = tokio::time::timeout(MINUTE, r.text())
        .await
        .unwrap()
        .unwrap();
    assert!(text.contains("reached terminated"), "{text}");
}

#[tokio::test]
async fn dry_runs_change_nothing_and_aws_errors_keep_their_code() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Group", "dry")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;
    let id = d
        .submit(
            &json!({"action": "stop_instances", "targets": {"tags": "Group=dry"}, "dry_run": true}),
        )
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(
        j["results"]["summary"]
            .as_str()
            .unwrap()
            .contains("would succeed"),
        "{j}"
    );
    assert_eq!(
        moto.state(&ids[0]).await,
        "running",
        "a dry run changes nothing"
    );

    // An unknown id: AWS's code and request id, failed at once.
    let id = d
        .submit(&json!({"action": "stop_instances", "targets": {"instance_ids": ["i-0123456789abcdef0"]}}))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "failed");
    assert_eq!(j["error"]["code"], "InvalidInstanceID.NotFound");
    assert!(j["error"]["request_id"].is_string());
    assert_eq!(j["attempts"], 1);

    // Termination protection: refused without params.force (nothing terminated), turned off and
    // recorded with it.
    let ec2 = moto.ec2().await;
    ec2.modify_instance_attribute()
        .instance_id(&ids[0])
        .disable_api_termination(
            aws_sdk_ec2::types::AttributeBooleanValue::builder()
                .value(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let id = d
        .submit(&json!({"action": "terminate_instances", "targets": {"instance_ids": ids.clone()}}))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "TerminationProtected", "{j}");
    assert!(j["error"]["message"].as_str().unwrap().contains(&ids[0]));
    assert_eq!(j["attempts"], 1, "a refusal is permanent: {j}");
    assert_eq!(moto.state(&ids[0]).await, "running");
    let id = d
        .submit(
            &json!({"action": "terminate_instances", "targets": {"instance_ids": ids.clone()},
            "params": {"force": true}, "wait": {"interval": "200ms"}}),
        )
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        j["results"]["instances"][0]["outcome"],
        "called (termination protection turned off)"
    );
    assert_eq!(moto.state(&ids[0]).await, "terminated");

    // Waiting for a state the instance cannot reach fails with the cause.
    let id = d
        .submit(
            &json!({"action": "create_tags", "targets": {"instance_ids": ids.clone()},
            "params": {"tags": {"a": "b"}}, "wait": {"until": "running", "interval": "200ms"}}),
        )
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "InstanceTerminated", "{j}");

    // Bad parameters are rejected at submission.
    let r = d
        .post_job(
            &d.admin,
            &json!({"action": "create_tags", "targets": {"instance_ids": ids.clone()}}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["field"], "params.tags");
    let r = d
        .post_job(
            &d.admin,
            &json!({"action": "stop_instances", "targets": {"instance_ids": ids.clone()},
            "params": {"force": "yes"}}),
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "params.force");
}

#[tokio::test]
async fn concurrent_waits_share_one_status_call_per_round_and_time_out_clearly() {
    let moto = Moto::start().await;
    let ids = moto.launch(30, &[("Group", "herd")]).await;
    moto.stop(&ids).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        workers: 32,
        ..Default::default()
    })
    .await;
    // 30 jobs, one per instance, each waiting for `running` on a stopped instance: they all wait at
    // once until their timeout.
    let mut jobs = Vec::new();
    for iid in &ids {
        jobs.push(
            d.submit(
                &json!({"action": "create_tags", "targets": {"instance_ids": [iid]},
                "params": {"tags": {"Herd": "yes"}},
                "wait": {"until": "running", "interval": "500ms", "timeout": "4s"}}),
            )
            .await,
        );
    }
    for id in &jobs {
        let j = d.wait_final(id, MINUTE).await;
        assert_eq!(j["state"], "failed", "{j}");
        assert_eq!(j["error"]["code"], "WaitTimeout");
        let msg = j["error"]["message"].as_str().unwrap();
        assert!(msg.contains("(stopped)"), "the last status is named: {msg}");
        assert_eq!(j["results"]["instances"][0]["state"], "stopped");
    }
    // Each job waited ~4s at 500ms: polled one by one that is ~8 calls per job, 240 in all. Shared,
    // it is one call per round (30 ids < 100) for however long the herd waited.
    let calls = d
        .metric("ec2jobd_ec2_calls_total{operation=\"DescribeInstanceStatus\",outcome=\"ok\"}")
        .await;
    assert!(calls >= 4.0, "the watcher polled ({calls})");
    assert!(
        calls <= 20.0,
        "status calls were not shared: {calls} calls for 30 waiting jobs"
    );
}

#[tokio::test]
async fn run_instances_launches_tags_and_waits_for_checks() {
    let moto = Moto::start().await;
    let image = moto.image().await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;
    let spec = json!({"action": "run_instances",
        "params": {"image_id": image, "instance_type": "t3.micro", "min_count": 2,
                   "tags": {"Name": "web"}, "user_data": "#!/bin/sh\necho hi\n"},
        "wait": {"interval": "200ms"}});
    let id = d.submit(&spec).await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let inst = j["results"]["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 2);
    for r in inst {
        assert_eq!(r["checks"], "2/2 checks passed");
        assert_eq!(r["name"], "web");
        assert_eq!(r["tags"]["ec2jobd:job-id"], id.as_str());
        assert_eq!(r["instance_type"], "t3.micro");
    }
    assert_eq!(moto.tagged("ec2jobd:job-id", &id).await.len(), 2);

    // Flat outputs for schedulers, as JSON and as env lines.
    let (s, out) = d.get_json(&format!("/v1/jobs/{id}/outputs")).await;
    assert_eq!(s, 200);
    assert_eq!(out["JOB_STATE"], "succeeded");
    assert_eq!(out["INSTANCE_COUNT"], "2");
    assert_eq!(out["INSTANCE_ID_1"], inst[0]["instance_id"]);
    assert_eq!(out["PRIVATE_IP_2"], inst[1]["private_ip"]);
    assert_eq!(out["CHECKS_1"], "2/2 checks passed");
    let env = d.text(&format!("/v1/jobs/{id}/outputs?format=env")).await;
    assert!(
        env.lines()
            .any(|l| l == format!("INSTANCE_ID_1={}", inst[0]["instance_id"].as_str().unwrap())),
        "{env}"
    );
    assert!(env.contains("CHECKS_1='2/2 checks passed'"), "{env}");
    assert!(
        env.lines().any(|l| l.starts_with("PUBLIC_DNS_NAME_2=ec2-")),
        "{env}"
    );
    let (s, _) = d
        .get_json(&format!("/v1/jobs/{id}/outputs?format=xml"))
        .await;
    assert_eq!(s, 400);

    // A dry run launches nothing.
    let mut dry = spec.clone();
    dry["dry_run"] = json!(true);
    let id = d.submit(&dry).await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(j["results"]["summary"]
        .as_str()
        .unwrap()
        .contains("would succeed"));
    assert!(moto.tagged("ec2jobd:job-id", &id).await.is_empty());

    // Bad input is refused at submission.
    for (bad, field) in [
        (
            json!({"action": "run_instances", "params": {"instance_type": "t3.micro"}}),
            "params.image_id",
        ),
        (
            json!({"action": "run_instances", "params": {"image_id": "img-1", "instance_type": "t3.micro"}}),
            "params.image_id",
        ),
        (
            json!({"action": "run_instances", "params": {"image_id": image, "instance_type": "t3.micro", "min_count": 0}}),
            "params.min_count",
        ),
        (
            json!({"action": "run_instances", "params": {"image_id": image, "instance_type": "t3.micro", "min_count": 3, "max_count": 2}}),
            "params.max_count",
        ),
        (
            json!({"action": "run_instances", "targets": {"tags": "a=b"}, "params": {"image_id": image, "instance_type": "t3.micro"}}),
            "targets",
        ),
    ] {
        let r = d.post_job(&d.admin, &bad).await;
        assert_eq!(r.status(), 422, "{bad}");
        assert_eq!(r.json::<Value>().await.unwrap()["field"], field, "{bad}");
    }
}

/// A moto instance attribute as text (`instanceType`, `disableApiTermination`, `disableApiStop`).
async fn moto_attr(moto: &Moto, id: &str, attr: &str) -> String {
    use aws_sdk_ec2::types::InstanceAttributeName as A;
    let out = moto
        .ec2()
        .await
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(A::from(attr))
        .send()
        .await
        .expect("describe attribute in moto");
    match attr {
        "instanceType" => out
            .instance_type()
            .and_then(|v| v.value())
            .unwrap_or_default()
            .to_string(),
        "disableApiTermination" => format!(
            "{:?}",
            out.disable_api_termination().and_then(|v| v.value())
        ),
        _ => format!("{:?}", out.disable_api_stop().and_then(|v| v.value())),
    }
}

#[tokio::test]
async fn modify_resizes_leaving_state_as_found_audit_lists_missing_tags_wrong_state_refused() {
    let moto = Moto::start().await;
    let ids = moto
        .launch(2, &[("Group", "resize"), ("Owner", "ops")])
        .await;
    let (running, stopped) = (ids[0].clone(), ids[1].clone());
    moto.stop(std::slice::from_ref(&stopped)).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;
    let calls = |op: &'static str| {
        let d = &d;
        async move {
            d.metric(&format!(
                "ec2jobd_ec2_calls_total{{operation=\"{op}\",outcome=\"ok\"}}"
            ))
            .await
        }
    };

    // A dry run changes nothing and says what it would do.
    let spec = json!({"action": "modify_instance_attribute", "targets": {"tags": "Group=resize"},
        "params": {"instance_type": "t3.small", "termination_protection": true},
        "wait": {"interval": "200ms", "timeout": "1m"}});
    let mut dry = spec.clone();
    dry["dry_run"] = json!(true);
    let j = d.wait_final(&d.submit(&dry).await, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let summary = j["results"]["summary"].as_str().unwrap();
    assert!(
        summary.contains("would succeed") && summary.contains("2 to resize"),
        "{summary}"
    );
    assert_eq!(moto_attr(&moto, &running, "instanceType").await, "t3.micro");
    assert_eq!(moto.state(&running).await, "running");

    // Resize by tag: the running one is stopped, changed, started and waited for 2/2 checks; the
    // stopped one is changed and stays stopped. Protection is set on both.
    let id = d.submit(&spec).await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    // The final wait (2/2 checks after the restart) held no worker: the job parked for it, and
    // its per-instance account of the change came back from the checkpoint.
    let events = d.text(&format!("/v1/jobs/{id}/events")).await;
    assert!(events.contains("event: parked"), "{events}");
    let r = by_id(&j);
    assert_eq!(r[&running]["previous_instance_type"], "t3.micro");
    assert_eq!(r[&running]["instance_type"], "t3.small");
    assert_eq!(r[&running]["checks"], "2/2 checks passed", "{j}");
    assert!(
        r[&running]["outcome"]
            .as_str()
            .unwrap()
            .contains("stopped and started again"),
        "{j}"
    );
    assert_eq!(r[&stopped]["state"], "stopped");
    assert!(!r[&stopped]["outcome"]
        .as_str()
        .unwrap()
        .contains("started again"));
    assert_eq!(moto.states(&ids).await, vec!["running", "stopped"]);
    for iid in &ids {
        assert_eq!(moto_attr(&moto, iid, "instanceType").await, "t3.small");
        assert_eq!(
            moto_attr(&moto, iid, "disableApiTermination").await,
            "Some(true)"
        );
    }
    assert_eq!(calls("StopInstances").await, 1.0);
    assert_eq!(calls("StartInstances").await, 1.0);

    // Again: nothing to resize, so no stop and no start.
    let j = d.wait_final(&d.submit(&spec).await, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(by_id(&j)[&running]["outcome"]
        .as_str()
        .unwrap()
        .starts_with("already t3.small"));
    assert_eq!(calls("StopInstances").await, 1.0);
    assert_eq!(calls("StartInstances").await, 1.0);

    // Stop protection by id, without a type change: no restart.
    let j = d
        .wait_final(
            &d.submit(&json!({"action": "modify_instance_attribute",
                "targets": {"instance_ids": [running]}, "params": {"stop_protection": true}}))
                .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        moto_attr(&moto, &running, "disableApiStop").await,
        "Some(true)"
    );
    assert_eq!(calls("StopInstances").await, 1.0);

    // Rebooting a stopped instance is refused before any call, naming it.
    let j = d
        .wait_final(
            &d.submit(&json!({"action": "reboot_instances", "targets": {"tags": "Group=resize"}}))
                .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "IncorrectInstanceState");
    assert!(j["error"]["message"].as_str().unwrap().contains(&stopped));
    assert_eq!(calls("RebootInstances").await, 0.0);

    // audit_tags: fails naming the instances and keys missing; `warn` lists them and succeeds.
    moto.ec2()
        .await
        .delete_tags()
        .resources(&stopped)
        .tags(aws_sdk_ec2::types::Tag::builder().key("Owner").build())
        .send()
        .await
        .unwrap();
    let audit = json!({"action": "audit_tags", "targets": {"tags": "Group=resize"},
        "params": {"required_keys": ["Owner", "CostCenter"]}});
    let j = d.wait_final(&d.submit(&audit).await, MINUTE).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "MissingTags");
    let r = by_id(&j);
    assert_eq!(r[&running]["missing_tags"], json!(["CostCenter"]));
    assert_eq!(r[&stopped]["missing_tags"], json!(["Owner", "CostCenter"]));
    let mut warn = audit.clone();
    warn["params"]["on_missing"] = json!("warn");
    warn["params"]["required_keys"] = json!(["Owner"]);
    let id = d.submit(&warn).await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(
        j["results"]["summary"]
            .as_str()
            .unwrap()
            .contains("1 missing required tags"),
        "{j}"
    );
    let (_, out) = d.get_json(&format!("/v1/jobs/{id}/outputs")).await;
    let n = (1..=2)
        .find(|n| out[format!("INSTANCE_ID_{n}")] == stopped.as_str())
        .unwrap();
    assert_eq!(out[format!("MISSING_TAGS_{n}")], "Owner", "{out}");

    // Bad parameters are refused at submission.
    for (bad, field) in [
        (
            json!({"action": "modify_instance_attribute", "targets": {"tags": "Group=resize"}}),
            "params",
        ),
        (
            json!({"action": "audit_tags", "targets": {"tags": "Group=resize"}, "params": {"required_keys": ["a"], "on_missing": "shout"}}),
            "params.on_missing",
        ),
        (
            json!({"action": "audit_tags", "targets": {"tags": "Group=resize"}}),
            "params.required_keys",
        ),
    ] {
        let r = d.post_job(&d.admin, &bad).await;
        assert_eq!(r.status(), 422, "{bad}");
        assert_eq!(r.json::<Value>().await.unwrap()["field"], field, "{bad}");
    }
}

/// Every action against moto, by id and by tag: a dry run (which changes nothing in moto), an
/// unknown id (AWS's `InvalidInstanceID.NotFound`) and a tag matching nothing (`NoTargets`); then
/// real runs of the combinations the other tests leave out, and wrong states refused.
#[tokio::test]
async fn every_action_by_id_and_by_tag_with_dry_runs_and_errors() {
    let moto = Moto::start().await;
    let ids = moto.launch(2, &[("Group", "matrix")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        workers: 8,
        ..Default::default()
    })
    .await;
    let actions = [
        ("describe_instances", json!({})),
        ("start_instances", json!({})),
        ("stop_instances", json!({})),
        ("reboot_instances", json!({})),
        ("terminate_instances", json!({})),
        ("create_tags", json!({"tags": {"k": "v"}})),
        ("delete_tags", json!({"keys": ["Group"]})),
        (
            "modify_instance_attribute",
            json!({"instance_type": "t3.small"}),
        ),
        ("audit_tags", json!({"required_keys": ["Nope"]})),
    ];
    let by_id_t = json!({"instance_ids": [ids[0]]});
    let by_tag = json!({"tags": "Group=matrix"});
    let mut jobs = Vec::new();
    for (action, params) in &actions {
        for targets in [&by_id_t, &by_tag] {
            let spec = json!({"action": action, "targets": targets, "params": params,
                "dry_run": true, "wait": {"interval": "200ms"}});
            jobs.push(("dry run", spec.clone(), d.submit(&spec).await));
        }
        let spec = json!({"action": action, "params": params,
            "targets": {"instance_ids": ["i-0123456789abcdef0"]}});
        jobs.push(("unknown id", spec.clone(), d.submit(&spec).await));
        let spec = json!({"action": action, "params": params, "targets": {"tags": "Group=none"}});
        jobs.push(("no match", spec.clone(), d.submit(&spec).await));
    }
    for (kind, spec, id) in &jobs {
        let j = d.wait_final(id, MINUTE).await;
        match *kind {
            "dry run" => {
                assert_eq!(j["state"], "succeeded", "{spec}\n{j}");
                let s = j["results"]["summary"].as_str().unwrap_or("");
                assert!(s.contains("would succeed"), "{spec}\n{s}");
            }
            "unknown id" => {
                assert_eq!(j["state"], "failed", "{spec}\n{j}");
                assert_eq!(j["error"]["code"], "InvalidInstanceID.NotFound", "{spec}");
            }
            _ => {
                assert_eq!(j["state"], "failed", "{spec}\n{j}");
                assert_eq!(j["error"]["code"], "NoTargets", "{spec}");
            }
        }
    }
    // The dry runs changed nothing.
    assert_eq!(moto.states(&ids).await, vec!["running", "running"]);
    for iid in &ids {
        assert_eq!(
            moto_tags(&moto, iid).await,
            vec![("Group".to_string(), "matrix".to_string())]
        );
        assert_eq!(moto_attr(&moto, iid, "instanceType").await, "t3.micro");
    }

    // Real runs of the combinations not covered elsewhere.
    let run = |spec: Value| {
        let d = &d;
        async move {
            let j = d.wait_final(&d.submit(&spec).await, MINUTE).await;
            assert_eq!(j["state"], "succeeded", "{spec}\n{j}");
            j
        }
    };
    let fast = json!({"interval": "200ms", "timeout": "1m"});
    let j = run(json!({"action": "describe_instances", "targets": by_tag})).await;
    assert_eq!(j["results"]["instances"].as_array().unwrap().len(), 2);
    run(json!({"action": "stop_instances", "targets": by_id_t, "wait": fast})).await;
    assert_eq!(moto.states(&ids).await, vec!["stopped", "running"]);
    // Starting by tag starts the stopped one and observes the running one.
    let j = run(json!({"action": "start_instances", "targets": by_tag, "wait": fast})).await;
    assert_eq!(by_id(&j)[&ids[0]]["outcome"], "called");
    assert_eq!(by_id(&j)[&ids[1]]["outcome"], "already running");
    let j = run(json!({"action": "reboot_instances", "targets": by_tag, "wait": fast})).await;
    assert!(by_id(&j)
        .values()
        .all(|r| r["checks"] == "2/2 checks passed"));
    run(json!({"action": "create_tags", "targets": by_id_t, "params": {"tags": {"Owner": "x"}}}))
        .await;
    run(
        json!({"action": "audit_tags", "targets": by_id_t, "params": {"required_keys": ["Owner"]}}),
    )
    .await;
    run(json!({"action": "delete_tags", "targets": {"tags": "Owner=x"}, "params": {"keys": ["Owner"]}}))
        .await;
    assert!(!moto_tags(&moto, &ids[0])
        .await
        .iter()
        .any(|(k, _)| k == "Owner"));
    run(json!({"action": "terminate_instances", "targets": by_tag, "wait": fast})).await;
    assert_eq!(moto.states(&ids).await, vec!["terminated", "terminated"]);

    // Wrong states are refused before any call, naming the instance (moto itself would "start" a
    // terminated instance).
    for action in [
        "start_instances",
        "stop_instances",
        "reboot_instances",
        "modify_instance_attribute",
    ] {
        let params = if action == "modify_instance_attribute" {
            json!({"instance_type": "t3.small"})
        } else {
            json!({})
        };
        let j = d
            .wait_final(
                &d.submit(&json!({"action": action, "targets": by_id_t, "params": params}))
                    .await,
                MINUTE,
            )
            .await;
        assert_eq!(j["state"], "failed", "{j}");
        assert_eq!(j["error"]["code"], "IncorrectInstanceState", "{j}");
        assert!(j["error"]["message"].as_str().unwrap().contains(&ids[0]));
    }
    assert_eq!(moto.state(&ids[0]).await, "terminated");
    assert_eq!(
        d.metric("ec2jobd_ec2_calls_total{operation=\"StartInstances\",outcome=\"ok\"}")
            .await,
        1.0,
        "only the real start reached EC2"
    );
}

/// `POST /v1/jobs?wait=…` holds the answer until the job ends (201 with the final job) or the time
/// is up (202 with Location, as without `wait`).
#[tokio::test]
async fn submit_can_wait_for_the_end() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Group", "wait")]).await;
    moto.stop(&ids[0..=0]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;
    let post = |q: &str, spec: Value| {
        let d = &d;
        let q = q.to_string();
        async move {
            d.req(reqwest::Method::POST, &format!("/v1/jobs{q}"), &d.admin)
                .json(&spec)
                .send()
                .await
                .unwrap()
        }
    };
    let r = post(
        "?wait=30s",
        json!({"action": "describe_instances", "targets": {"tags": "Group=wait"}}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["results"]["instances"][0]["instance_id"], ids[0].as_str());
    // Waits for `running` on a stopped instance (never comes): answered at the wait's end.
    let r = post(
        "?wait=1s",
        json!({"action": "create_tags", "targets": {"instance_ids": ids},
            "params": {"tags": {"a": "b"}}, "wait": {"until": "running", "interval": "200ms", "timeout": "30s"}}),
    )
    .await;
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("location").is_some());
    let j: Value = r.json().await.unwrap();
    assert!(
        matches!(j["state"].as_str(), Some("queued" | "running")),
        "{j}"
    );
    for (q, field) in [
        ("?wait=soon", "wait"),
        ("?wait=2h", "wait"),
        ("?hold=1s", "hold"),
    ] {
        let r = post(
            q,
            json!({"action": "describe_instances", "targets": {"tags": "a=b"}}),
        )
        .await;
        assert_eq!(r.status(), 400, "{q}");
        assert_eq!(r.json::<Value>().await.unwrap()["field"], field);
    }
    let cancel = d
        .req(
            reqwest::Method::POST,
            &format!("/v1/jobs/{}/cancel", j["id"].as_str().unwrap()),
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success());
}
