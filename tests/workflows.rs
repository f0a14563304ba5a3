//! Workflows against moto: a resize as stop → modify → start (2/2 checks); run → tag through
//! `from_step`; cancel mid-way; and a kill -9 in the middle after which the workflow resumes at the
//! step it was in without repeating the earlier ones (counted at the fault proxy).

mod common;

use std::time::Duration;

use common::proxy::FaultProxy;
use common::{Daemon, DaemonOpts, Moto};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

fn states(j: &Value) -> Vec<String> {
    j["results"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s["name"].as_str().unwrap(),
                s["state"].as_str().unwrap()
            )
        })
        .collect()
}

async fn instance_type(moto: &Moto, id: &str) -> String {
    moto.ec2()
        .await
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap()
        .reservations()[0]
        .instances()[0]
        .instance_type()
        .unwrap()
        .as_str()
        .to_string()
}

#[tokio::test]
async fn resize_and_launch_then_tag_workflows() {
    let moto = Moto::start().await;
    let image = moto.image().await;
    let ids = moto.launch(1, &[("App", "db")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;
    let fast = json!({"interval": "200ms", "timeout": "1m"});
    let j = d
        .wait_final(
            &d.submit(&json!({"action": "workflow", "steps": [
                {"name": "stop", "action": "stop_instances", "targets": {"tags": "App=db"}, "wait": fast},
                {"name": "resize", "action": "modify_instance_attribute", "targets": {"from_step": "stop"},
                 "params": {"instance_type": "t3.large"}},
                {"name": "start", "action": "start_instances", "targets": {"from_step": "stop"}, "wait": fast},
            ]}))
            .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        states(&j),
        ["stop:succeeded", "resize:succeeded", "start:succeeded"]
    );
    assert_eq!(
        j["results"]["steps"][2]["results"]["instances"][0]["checks"],
        "2/2 checks passed"
    );
    assert_eq!(moto.state(&ids[0]).await, "running");
    assert_eq!(instance_type(&moto, &ids[0]).await, "t3.large");
    // The step names prefix the progress events.
    let (_, out) = d
        .get_json(&format!("/v1/jobs/{}/outputs", j["id"].as_str().unwrap()))
        .await;
    assert_eq!(out["INSTANCE_ID_1"], ids[0].as_str());

    let j = d
        .wait_final(
            &d.submit(&json!({"action": "workflow", "steps": [
                {"name": "launch", "action": "run_instances", "wait": fast,
                 "params": {"image_id": image, "instance_type": "t3.micro", "min_count": 2}},
                {"name": "tag", "action": "create_tags", "targets": {"from_step": "launch"},
                 "params": {"tags": {"Role": "worker"}}},
            ]}))
            .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let launched: Vec<String> = j["results"]["steps"][0]["results"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(launched.len(), 2);
    let mut tagged = moto.tagged("Role", "worker").await;
    tagged.sort();
    let mut want = launched.clone();
    want.sort();
    assert_eq!(tagged, want);

    // Bad workflows are refused at submission, naming the step.
    for (bad, field) in [
        (json!({"action": "workflow", "steps": []}), "steps"),
        (
            json!({"action": "workflow", "steps": [{"action": "create_tags", "targets": {"from_step": "later"}, "params": {"tags": {"a": "b"}}}]}),
            "steps[0].targets.from_step",
        ),
        (
            json!({"action": "workflow", "steps": [{"action": "start_instances", "targets": {"instance_ids": ["i-x"]}}]}),
            "steps[0].targets.instance_ids[0]",
        ),
        (
            json!({"action": "start_instances", "targets": {"from_step": "x"}}),
            "targets.from_step",
        ),
    ] {
        let r = d.post_job(&d.admin, &bad).await;
        assert_eq!(r.status(), 422, "{bad}");
        assert_eq!(r.json::<Value>().await.unwrap()["field"], field, "{bad}");
    }
}

#[tokio::test]
async fn cancel_mid_workflow_and_resume_after_kill_9() {
    let moto = Moto::start().await;
    let image = moto.image().await;
    let ids = moto.launch(1, &[("Wf", "cancel")]).await;
    moto.stop(&ids[0..=0]).await;
    let proxy = FaultProxy::start(&moto.url, 3).await;
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    // Step 2 waits for `running` on a stopped instance: cancel it there; step 3 never runs.
    let id = d
        .submit(&json!({"action": "workflow", "steps": [
            {"name": "mark", "action": "create_tags", "targets": {"tags": "Wf=cancel"}, "params": {"tags": {"A": "1"}}},
            {"name": "hang", "action": "create_tags", "targets": {"tags": "Wf=cancel"}, "params": {"tags": {"B": "1"}},
             "wait": {"until": "running", "interval": "200ms", "timeout": "5m"}},
            {"name": "never", "action": "create_tags", "targets": {"tags": "Wf=cancel"}, "params": {"tags": {"C": "1"}}},
        ]}))
        .await;
    d.wait_for(&id, MINUTE, |j| {
        j["progress"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("[hang] waiting"))
    })
    .await;
    // The step's wait holds no worker: the whole job is parked in it.
    assert_eq!(d.metric("ec2jobd_jobs_parked").await, 1.0, "{}", d.log());
    let r = d
        .req(
            reqwest::Method::POST,
            &format!("/v1/jobs/{id}/cancel"),
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(states(&j), ["mark:succeeded", "hang:cancelled"]);
    assert!(moto.tagged("C", "1").await.is_empty(), "step 3 never ran");

    // kill -9 while step 2's CreateTags is in flight: after restart the launch is not repeated.
    proxy.set(|f| {
        f.latency = Duration::from_millis(1500);
        f.only = Some(vec!["CreateTags".into()]);
    });
    let id = d
        .submit(&json!({"action": "workflow", "steps": [
            {"name": "launch", "action": "run_instances", "wait": {"until": "running", "interval": "200ms"},
             "params": {"image_id": image, "instance_type": "t3.micro"}},
            {"name": "tag", "action": "create_tags", "targets": {"from_step": "launch"},
             "params": {"tags": {"Stage": "tagged"}}},
            {"name": "stop", "action": "stop_instances", "targets": {"from_step": "launch"},
             "wait": {"interval": "200ms"}},
        ]}))
        .await;
    // The step leaves its call to the parking lot (shared with other jobs' same call).
    d.wait_for(&id, MINUTE, |j| {
        j["progress"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("[tag] CreateTags on 1 instance(s) without"))
    })
    .await;
    d.kill9();
    d.spawn().await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    assert_eq!(j["attempts"], 2, "{j}");
    assert_eq!(
        states(&j),
        ["launch:succeeded", "tag:succeeded", "stop:succeeded"]
    );
    assert_eq!(
        proxy.calls("RunInstances"),
        1,
        "the launch step was not repeated"
    );
    let mine = moto.tagged("ec2jobd:job-id", &id).await;
    assert_eq!(mine.len(), 1, "exactly one instance for this workflow");
    assert_eq!(moto.state(&mine[0]).await, "stopped");
    assert_eq!(
        moto.tagged("Stage", "tagged").await,
        mine,
        "the tag step reached the launched instance"
    );
}
