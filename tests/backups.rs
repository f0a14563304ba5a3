//! End-to-end tests of backup jobs against a real moto server: snapshots by instance id, instance
//! tag, volume id and volume tag; generation rotation that touches only what ec2jobd made; reports;
//! and, through the fault proxy, slow and failed snapshots and a kill -9 right after CreateSnapshot.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::{Daemon, DaemonOpts, Moto};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

impl Moto {
    /// The volumes attached to an instance, by device.
    async fn volumes_of(&self, instance: &str) -> BTreeMap<String, String> {
        let out = self
            .ec2()
            .await
            .describe_volumes()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("attachment.instance-id")
                    .values(instance)
                    .build(),
            )
            .send()
            .await
            .expect("describe volumes");
        out.volumes()
            .iter()
            .flat_map(|v| {
                v.attachments().iter().map(|a| {
                    (
                        a.device().unwrap_or_default().to_string(),
                        v.volume_id().unwrap_or_default().to_string(),
                    )
                })
            })
            .collect()
    }

    /// A new volume with tags, attached to `instance` at `device` when given.
    async fn volume(&self, tags: &[(&str, &str)], attach: Option<(&str, &str)>) -> String {
        use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
        let ec2 = self.ec2().await;
        let mut spec = TagSpecification::builder().resource_type(ResourceType::Volume);
        for (k, v) in tags {
            spec = spec.tags(Tag::builder().key(*k).value(*v).build());
        }
        let v = ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(8)
            .tag_specifications(spec.build())
            .send()
            .await
            .expect("create volume")
            .volume_id()
            .unwrap()
            .to_string();
        if let Some((i, dev)) = attach {
            ec2.attach_volume()
                .volume_id(&v)
                .instance_id(i)
                .device(dev)
                .send()
                .await
                .expect("attach volume");
        }
        v
    }
}

fn rows(j: &Value) -> BTreeMap<String, Value> {
    j["results"]["volumes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| (v["volume_id"].as_str().unwrap().to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn snapshots_by_instance_and_volume_rotate_only_what_ec2jobd_made() {
    let moto = Moto::start().await;
    let ids = moto
        .launch(2, &[("Backup", "daily"), ("Name", "db"), ("Team", "core")])
        .await;
    let data = moto
        .volume(&[("Role", "data")], Some((&ids[0], "/dev/sdf")))
        .await;
    let loose = moto.volume(&[("Backup", "vol")], None).await;
    let root0 = moto.volumes_of(&ids[0]).await["/dev/sda1"].clone();
    // Someone else's snapshot of the same volume, with a similar-looking tag: never touched.
    let foreign = moto
        .ec2()
        .await
        .create_snapshot()
        .volume_id(&root0)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Snapshot)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("Backup")
                        .value("daily")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap()
        .snapshot_id()
        .unwrap()
        .to_string();
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;

    // By instance tag, three times with keep 2.
    let spec = json!({"action": "create_snapshots", "targets": {"tags": "Backup=daily"},
        "params": {"keep": 2, "copy_tags": true, "tags": {"Origin": "nightly"},
                   "description": "{name} {volume_id} {device} {date}"},
        "wait": {"interval": "200ms"}});
    let mut generations: Vec<BTreeMap<String, Value>> = Vec::new();
    for run in 1..=3 {
        let j = d.wait_final(&d.submit(&spec).await, MINUTE).await;
        assert_eq!(j["state"], "succeeded", "run {run}: {j}");
        let r = rows(&j);
        assert_eq!(r.len(), 3, "two roots and the data volume: {j}");
        let v = &r[&data];
        assert_eq!(v["instance_id"], ids[0].as_str());
        assert_eq!(v["instance_name"], "db");
        assert_eq!(v["device"], "/dev/sdf");
        let snap = &v["snapshot"];
        assert_eq!(snap["state"], "completed");
        assert_eq!(snap["tags"]["Team"], "core", "instance tags copied");
        assert_eq!(snap["tags"]["Role"], "data", "volume tags copied");
        assert_eq!(snap["tags"]["Origin"], "nightly");
        assert_eq!(snap["tags"]["ec2jobd:rotation"], format!("default/{data}"));
        assert!(
            snap["description"]
                .as_str()
                .unwrap()
                .starts_with(&format!("db {data} /dev/sdf 20")),
            "{snap}"
        );
        let kept = v["rotation"]["kept"].as_array().unwrap().len();
        assert_eq!(kept, run.min(2), "run {run}: {v}");
        generations.push(r);
    }
    // The third run deleted the first generation of every volume, and only that.
    for (vol, first) in &generations[0] {
        let first_snap = first["snapshot"]["snapshot_id"].as_str().unwrap();
        let third = &generations[2][vol];
        assert_eq!(third["rotation"]["deleted"], json!([first_snap]), "{third}");
        let mine = moto
            .snapshots_tagged("ec2jobd:rotation", &format!("default/{vol}"))
            .await;
        assert_eq!(mine.len(), 2, "exactly two ec2jobd snapshots of {vol}");
        assert!(!mine.contains_key(first_snap));
    }
    assert!(
        moto.snapshots_tagged("Backup", "daily")
            .await
            .contains_key(&foreign),
        "the foreign snapshot is untouched"
    );

    // The report and the flat outputs.
    let last = d.wait_final(&d.submit(&spec).await, MINUTE).await;
    let id = last["id"].as_str().unwrap();
    let r = d
        .req(
            reqwest::Method::GET,
            &format!("/v1/jobs/{id}/report"),
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    for want in [
        data.as_str(),
        "/dev/sdf",
        "completed",
        "Rotation",
        "deleted",
    ] {
        assert!(text.contains(want), "report lacks {want}:\n{text}");
    }
    let (_, out) = d.get_json(&format!("/v1/jobs/{id}/outputs")).await;
    assert_eq!(out["SNAPSHOT_COUNT"], "3", "{out}");
    assert!(out["SNAPSHOT_ID_1"].as_str().unwrap().starts_with("snap-"));

    // By volume id and by volume tag (an unattached volume), and by instance id for one device.
    let j = d
        .wait_final(
            &d.submit(&json!({"action": "create_snapshots", "targets": {"volume_ids": [loose]}}))
                .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(rows(&j)[&loose]["snapshot"]["state"], "completed");
    let j = d
        .wait_final(
            &d.submit(
                &json!({"action": "create_snapshots", "targets": {"volume_tags": {"Role": "data"}}}),
            )
            .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        rows(&j)[&data]["device"],
        "/dev/sdf",
        "attachment found: {j}"
    );
    let j = d
        .wait_final(
            &d.submit(
                &json!({"action": "create_snapshots", "targets": {"instance_ids": [ids[0]]},
                "params": {"devices": ["/dev/sda1"], "group": "weekly", "keep": 1}}),
            )
            .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let r = rows(&j);
    assert_eq!(r.keys().collect::<Vec<_>>(), vec![&root0]);
    assert_eq!(r[&root0]["rotation"]["group"], format!("weekly/{root0}"));
    assert_eq!(
        moto.snapshots_tagged("ec2jobd:rotation", &format!("default/{root0}"))
            .await
            .len(),
        2,
        "another group's rotation leaves the default group alone"
    );

    // describe_snapshots and delete_snapshots by tag; an AMI's snapshot is kept as in use.
    let j = d
        .wait_final(
            &d.submit(&json!({"action": "describe_snapshots",
                "targets": {"snapshot_tags": {"ec2jobd:job-id": id}}}))
                .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["results"]["snapshots"].as_array().unwrap().len(), 3);
    let j = d
        .wait_final(
            &d.submit(&json!({"action": "delete_snapshots",
                "targets": {"snapshot_tags": {"ec2jobd:job-id": id}}}))
                .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(moto.snapshots_tagged("ec2jobd:job-id", id).await.is_empty());
    let ec2 = moto.ec2().await;
    let ami = ec2
        .create_image()
        .instance_id(&ids[1])
        .name("ami-in-use")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_string();
    let ami_snap = ec2
        .describe_images()
        .image_ids(&ami)
        .send()
        .await
        .unwrap()
        .images()[0]
        .block_device_mappings()[0]
        .ebs()
        .unwrap()
        .snapshot_id()
        .unwrap()
        .to_string();
    let j = d
        .wait_final(
            &d.submit(&json!({"action": "delete_snapshots",
                "targets": {"snapshot_ids": [ami_snap]}}))
                .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(
        j["results"]["snapshots"][0]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("kept: in use"),
        "{j}"
    );

    // Dry runs create nothing; bad input is refused at submission.
    let before = moto.snapshots_tagged("Origin", "nightly").await.len();
    let mut dry = spec.clone();
    dry["dry_run"] = json!(true);
    let j = d.wait_final(&d.submit(&dry).await, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(j["results"]["summary"]
        .as_str()
        .unwrap()
        .contains("would succeed"));
    assert_eq!(
        moto.snapshots_tagged("Origin", "nightly").await.len(),
        before
    );
    for (bad, field) in [
        (
            json!({"action": "create_snapshots", "targets": {"tags": "a=b", "volume_ids": [loose]}}),
            "targets",
        ),
        (
            json!({"action": "create_snapshots", "targets": {"volume_ids": ["vol-xyz"]}}),
            "targets.volume_ids[0]",
        ),
        (
            json!({"action": "create_snapshots", "targets": {"tags": "a=b"}, "params": {"description": "{hostname}"}}),
            "params.description",
        ),
        (
            json!({"action": "create_snapshots", "targets": {"tags": "a=b"}, "wait": {"until": "status_ok"}}),
            "wait.until",
        ),
        (
            json!({"action": "start_instances", "targets": {"volume_ids": [loose]}}),
            "targets",
        ),
    ] {
        let r = d.post_job(&d.admin, &bad).await;
        assert_eq!(r.status(), 422, "{bad}");
        assert_eq!(r.json::<Value>().await.unwrap()["field"], field, "{bad}");
    }
}

/// Through the proxy: a snapshot that stays `pending` (with progress) and then completes; one that
/// ends in `error` (the job fails and rotation does not run); and kill -9 while CreateSnapshot is
/// in flight (after restart, no second snapshot for that volume).
#[tokio::test]
async fn slow_failed_and_interrupted_snapshots() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Backup", "slow")]).await;
    let root = moto.volumes_of(&ids[0]).await["/dev/sda1"].clone();
    let proxy = FaultProxy::start(&moto.url, 9).await;
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    let spec = json!({"action": "create_snapshots", "targets": {"instance_ids": ids},
        "params": {"keep": 1}, "wait": {"interval": "200ms", "timeout": "1m"}});

    // Pending at 40% for a while, then completed; progress is in the events.
    proxy.set(|f| {
        f.snapshot_state = Some((
            "pending".into(),
            "40%".into(),
            Instant::now() + Duration::from_secs(2),
        ))
    });
    let id = d.submit(&spec).await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let events = d.text(&format!("/v1/jobs/{id}/events")).await;
    assert!(
        events.contains("0 of 1 snapshot(s) completed (40% overall)"),
        "{events}"
    );
    assert!(
        events.contains("1 of 1 snapshot(s) completed (100% overall)"),
        "{events}"
    );
    let first = rows(&j)[&root]["snapshot"]["snapshot_id"].clone();

    // Ends in `error`: the job fails naming it, and rotation does not run (the first generation
    // stays although keep is 1).
    proxy.set(|f| {
        f.snapshot_state = Some((
            "error".into(),
            "0%".into(),
            Instant::now() + Duration::from_secs(3600),
        ))
    });
    let j = d.wait_final(&d.submit(&spec).await, MINUTE).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "SnapshotFailed");
    assert!(j["error"]["message"].as_str().unwrap().contains(&root));
    assert!(moto
        .snapshots_tagged("ec2jobd:rotation", &format!("default/{root}"))
        .await
        .contains_key(first.as_str().unwrap()));
    proxy.set(|f| f.snapshot_state = None);

    // kill -9 while CreateSnapshot is in flight: the call lands in moto, its answer is held; after
    // restart the job finds that snapshot by its tag and makes no second one.
    proxy.set(|f| {
        f.answer_delay = Duration::from_secs(3600);
        f.only = Some(vec!["CreateSnapshot".into()]);
    });
    let calls = proxy.calls("CreateSnapshot");
    let id = d.submit(&spec).await;
    let deadline = Instant::now() + MINUTE;
    while !proxy
        .created("CreateSnapshot")
        .iter()
        .any(|(j, _)| *j == id)
    {
        assert!(Instant::now() < deadline, "no CreateSnapshot took effect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.set(|f| f.answer_delay = Duration::ZERO);
    d.kill9();
    d.spawn().await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    assert_eq!(j["attempts"], 2, "{j}");
    assert_eq!(
        proxy.calls("CreateSnapshot") - calls,
        1,
        "one CreateSnapshot"
    );
    let tagged = moto.snapshots_tagged("ec2jobd:job-id", &id).await;
    assert_eq!(tagged.len(), 1, "{tagged:?}\n{j}\n{}", d.log());
    assert!(
        rows(&j)[&root]["snapshot"]["outcome"]
            .as_str()
            .unwrap()
            .contains("earlier attempt"),
        "{j}\n{}",
        d.text(&format!("/v1/jobs/{id}/events")).await
    );

    // kill -9 while the snapshot is pending, and while the daemon is down the snapshot is deleted
    // (as the rotation of a newer generation by another job on the group would): after restart the
    // job reports it as made and deleted, and does not make it again (found in the checkpoint).
    proxy.set(|f| {
        f.only = None;
        f.snapshot_state = Some((
            "pending".into(),
            "10%".into(),
            Instant::now() + Duration::from_secs(3600),
        ))
    });
    let calls = proxy.calls("CreateSnapshot");
    let id = d.submit(&spec).await;
    d.wait_for(&id, MINUTE, |j| j["progress"]["phase"] == "waiting")
        .await;
    d.kill9();
    let gone: Vec<String> = moto
        .snapshots_tagged("ec2jobd:job-id", &id)
        .await
        .into_keys()
        .collect();
    assert_eq!(gone.len(), 1, "{gone:?}");
    moto.ec2()
        .await
        .delete_snapshot()
        .snapshot_id(&gone[0])
        .send()
        .await
        .expect("delete in moto");
    proxy.set(|f| f.snapshot_state = None);
    d.spawn().await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    assert_eq!(proxy.calls("CreateSnapshot") - calls, 1, "not made again");
    let snap = &rows(&j)[&root]["snapshot"];
    assert_eq!(snap["snapshot_id"], gone[0].as_str(), "{j}");
    assert_eq!(snap["state"], "deleted", "{j}");
    assert!(
        snap["outcome"].as_str().unwrap().contains("rotation"),
        "{j}"
    );
}

/// A CreateSnapshot whose answer is lost (the call took effect, the connection dropped) is not sent
/// again blindly by the SDK: the job's next attempt finds the snapshot by the job's tag. One call,
/// one snapshot, job succeeded.
#[tokio::test]
async fn a_lost_create_snapshot_answer_makes_no_second_snapshot() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Backup", "lost")]).await;
    let proxy = FaultProxy::start(&moto.url, 5).await;
    proxy.set(|f| {
        f.drop = 1.0;
        f.drop_after_forward = true;
        f.only = Some(vec!["CreateSnapshot".into()]);
    });
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    let id = d
        .submit(
            &json!({"action": "create_snapshots", "targets": {"instance_ids": ids},
            "wait": {"interval": "200ms", "timeout": "1m"}}),
        )
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    assert_eq!(proxy.calls("CreateSnapshot"), 1, "sent once: {j}");
    assert_eq!(
        proxy.injected("CreateSnapshot"),
        1,
        "and its answer was lost"
    );
    assert_eq!(j["attempts"], 2, "the job's next attempt found it: {j}");
    let made = moto.snapshots_tagged("ec2jobd:job-id", &id).await;
    assert_eq!(made.len(), 1, "{made:?}");
}

/// kill -9 while a new AMI is pending, and while the daemon is down the AMI is deregistered (as
/// the rotation of a newer generation by another job on the group would): after restart the job
/// reports it as made and deregistered and makes no second one (it is in the job's checkpoint).
/// Before, the AMI carried its rotation tag from creation and the resumed job made it again.
#[tokio::test]
async fn an_ami_rotated_away_before_its_job_recorded_it_is_not_made_again() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Backup", "ami-crash")]).await;
    let proxy = FaultProxy::start(&moto.url, 6).await;
    proxy.set(|f| {
        f.image_state = Some(("pending".into(), Instant::now() + Duration::from_secs(3600)))
    });
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    let id = d
        .submit(
            &json!({"action": "create_image", "targets": {"instance_ids": ids},
            "params": {"keep": 1, "no_reboot": true, "name": "crash-{job_id}"},
            "wait": {"interval": "200ms", "timeout": "1m"}}),
        )
        .await;
    d.wait_for(&id, MINUTE, |j| j["progress"]["phase"] == "waiting")
        .await;
    d.kill9();
    let ec2 = moto.ec2().await;
    let mine: Vec<String> = moto
        .images_tagged("ec2jobd:job-id", &id)
        .await
        .into_iter()
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    ec2.deregister_image()
        .image_id(&mine[0])
        .send()
        .await
        .expect("deregister in moto");
    proxy.set(|f| f.image_state = None);
    d.spawn().await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    assert_eq!(proxy.calls("CreateImage"), 1, "not made again: {j}");
    let img = &j["results"]["images"][0];
    assert_eq!(img["image_id"], mine[0].as_str(), "{j}");
    assert_eq!(img["state"], "deregistered", "{j}");
    assert!(img["outcome"].as_str().unwrap().contains("rotation"), "{j}");
}

/// Another job's rotation deregisters this job's new AMI and deletes its snapshots between this
/// job seeing it available and tagging its snapshots (the proxy holds that CreateTags while the
/// test does what the newer generation's rotation would): the job succeeds and reports the AMI as
/// made and since deregistered. Before, it failed with InvalidSnapshot.NotFound (the fault
/// campaign caught it with concurrent AMI jobs of one instance keeping 2).
#[tokio::test]
async fn an_ami_rotated_away_while_its_job_finishes_is_reported_not_failed() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Backup", "ami-race")]).await;
    let proxy = FaultProxy::start(&moto.url, 7).await;
    proxy.set(|f| {
        f.image_state = Some(("pending".into(), Instant::now() + Duration::from_secs(3600)))
    });
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    let id = d
        .submit(
            &json!({"action": "create_image", "targets": {"instance_ids": ids},
            "params": {"keep": 2, "no_reboot": true, "name": "race-{job_id}"},
            "wait": {"interval": "200ms", "timeout": "1m"}}),
        )
        .await;
    d.wait_for(&id, MINUTE, |j| j["progress"]["phase"] == "waiting")
        .await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let tagged = proxy.calls("CreateTags");
    proxy.set(|f| {
        f.hold = Some(("CreateTags".into(), gate.clone()));
        f.image_state = None;
    });
    let deadline = Instant::now() + MINUTE;
    while proxy.calls("CreateTags") == tagged {
        assert!(
            Instant::now() < deadline,
            "no CreateTags of the snapshots: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ec2 = moto.ec2().await;
    let mine: Vec<String> = moto
        .images_tagged("ec2jobd:job-id", &id)
        .await
        .into_iter()
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    let snaps: Vec<String> = ec2
        .describe_images()
        .image_ids(&mine[0])
        .send()
        .await
        .expect("describe in moto")
        .images()[0]
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(String::from))
        .collect();
    assert!(!snaps.is_empty(), "the AMI has snapshots");
    ec2.deregister_image()
        .image_id(&mine[0])
        .send()
        .await
        .expect("deregister in moto");
    for s in &snaps {
        ec2.delete_snapshot()
            .snapshot_id(s)
            .send()
            .await
            .expect("delete in moto");
    }
    gate.close();
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    let img = &j["results"]["images"][0];
    assert_eq!(img["image_id"], mine[0].as_str(), "{j}");
    assert_eq!(img["state"], "deregistered", "{j}");
    assert!(img["outcome"].as_str().unwrap().contains("rotation"), "{j}");
    assert_eq!(proxy.calls("CreateImage"), 1, "not made again: {j}");
}

/// `stop_first`: a running instance is stopped before its snapshots and started again after them
/// (and waited for 2/2 checks); a stopped one is snapshotted and stays stopped. The proxy's call
/// order shows the snapshots were taken between the stop and the start.
#[tokio::test]
async fn stop_first_leaves_each_instance_as_it_was_found() {
    let moto = Moto::start().await;
    let ids = moto.launch(2, &[("Backup", "cold")]).await;
    moto.stop(&ids[1..=1]).await;
    let proxy = FaultProxy::start(&moto.url, 4).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    let j = d
        .wait_final(
            &d.submit(
                &json!({"action": "create_snapshots", "targets": {"tags": "Backup=cold"},
                "params": {"stop_first": true}, "wait": {"interval": "200ms"}}),
            )
            .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    assert_eq!(moto.states(&ids).await, vec!["running", "stopped"]);
    let order = proxy.order();
    let pos = |op: &str| order.iter().position(|o| o == op);
    let last_snap = order.iter().rposition(|o| o == "CreateSnapshot").unwrap();
    assert!(
        pos("StopInstances").unwrap() < pos("CreateSnapshot").unwrap(),
        "{order:?}"
    );
    assert!(last_snap < pos("StartInstances").unwrap(), "{order:?}");
    assert_eq!(proxy.calls("StopInstances"), 1);
    assert_eq!(proxy.calls("StartInstances"), 1);
    assert!(
        proxy.last_body("StopInstances").contains(&ids[0])
            && !proxy.last_body("StopInstances").contains(&ids[1])
    );
    let insts = j["results"]["instances"].as_array().unwrap();
    assert_eq!(insts.len(), 2);
    for i in insts {
        let outcome = i["outcome"].as_str().unwrap();
        if i["instance_id"] == ids[0].as_str() {
            assert!(outcome.contains("started again"), "{i}");
        } else {
            assert_eq!(outcome, "left stopped", "{i}");
        }
    }
    assert_eq!(rows(&j).len(), 2);
}

async fn ec2_in(moto: &Moto, region: &str) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::new(&moto.conf_in(region).await)
}

/// AMIs with rotation (the third run deregisters the first AMI and deletes its snapshots),
/// deregistration, and cross-region copies of snapshots and AMIs tagged with their source.
#[tokio::test]
async fn ami_rotation_and_cross_region_copies() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Backup", "ami"), ("Name", "web")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;
    let spec = json!({"action": "create_image", "targets": {"tags": "Backup=ami"},
        "params": {"keep": 2, "no_reboot": true, "name": "{name}-{timestamp}-{job_id}",
                   "tags": {"Origin": "nightly"}},
        "wait": {"interval": "200ms"}});
    let mut amis = Vec::new();
    for run in 1..=3 {
        let j = d.wait_final(&d.submit(&spec).await, MINUTE).await;
        assert_eq!(j["state"], "succeeded", "run {run}: {j}");
        let img = &j["results"]["images"][0];
        assert_eq!(img["state"], "available", "{img}");
        assert_eq!(img["instance_id"], ids[0].as_str());
        assert!(img["name"].as_str().unwrap().starts_with("web-20"), "{img}");
        assert_eq!(
            img["rotation"]["kept"].as_array().unwrap().len(),
            run.min(2),
            "{img}"
        );
        amis.push(img.clone());
    }
    let first = amis[0]["image_id"].as_str().unwrap();
    assert_eq!(amis[2]["rotation"]["deleted"], json!([first]));
    let last_id = amis[2]["image_id"].as_str().unwrap();
    let (_, out) = d
        .get_json(&format!(
            "/v1/jobs/{}/outputs",
            d.get_json("/v1/jobs?action=create_image&limit=1").await.1["jobs"][0]["id"]
                .as_str()
                .unwrap()
        ))
        .await;
    assert_eq!(out["IMAGE_ID_1"], last_id, "{out}");
    let report = d
        .text(&format!(
            "/v1/jobs/{}/report",
            out["JOB_ID"].as_str().unwrap()
        ))
        .await;
    assert!(
        report.contains("AMI rotation") && report.contains(first),
        "{report}"
    );
    let ec2 = moto.ec2().await;
    let mine = moto
        .images_tagged("ec2jobd:rotation", &format!("default/{}", ids[0]))
        .await;
    assert_eq!(mine.len(), 2, "two AMI generations remain");
    let gone = amis[2]["rotation"]["deleted_snapshots"].as_array().unwrap();
    assert!(!gone.is_empty(), "{}", amis[2]);
    for s in gone {
        assert!(
            ec2.describe_snapshots()
                .snapshot_ids(s.as_str().unwrap())
                .send()
                .await
                .is_err(),
            "snapshot {s} of the deregistered AMI is deleted"
        );
    }

    // Copy the newest AMI to another region: tagged with the job and its source there, its name
    // and description templates filled in.
    let newest = amis[2]["image_id"].as_str().unwrap();
    let copy_job = d
        .submit(
            &json!({"action": "copy_image", "targets": {"image_ids": [newest]},
            "params": {"destination_region": "eu-west-1", "name": "dr-{job_id}",
                       "description": "DR copy of {name}"},
            "wait": {"interval": "200ms"}}),
        )
        .await;
    let j = d.wait_final(&copy_job, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let copy = j["results"]["images"][0]["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(j["results"]["images"][0]["region"], "eu-west-1");
    let eu = ec2_in(&moto, "eu-west-1").await;
    let img = eu.describe_images().image_ids(&copy).send().await.unwrap();
    let tags: BTreeMap<String, String> = img.images()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect();
    assert_eq!(tags["ec2jobd:source"], format!("us-east-1/{newest}"));
    assert_eq!(
        img.images()[0].name(),
        Some(format!("dr-{copy_job}").as_str())
    );
    let source_name = amis[2]["name"].as_str().unwrap();
    assert_eq!(
        img.images()[0].description(),
        Some(format!("DR copy of {source_name}").as_str())
    );

    // Snapshot copies to another region, encrypted.
    let snap_job = d
        .wait_final(
            &d.submit(&json!({"action": "create_snapshots", "targets": {"instance_ids": ids}}))
                .await,
            MINUTE,
        )
        .await;
    let sid = snap_job["id"].as_str().unwrap();
    let j = d
        .wait_final(
            &d.submit(&json!({"action": "copy_snapshot",
                "targets": {"snapshot_tags": {"ec2jobd:job-id": sid}},
                "params": {"destination_region": "eu-west-1", "encrypted": true,
                           "tags": {"Copy": "dr"}},
                "wait": {"interval": "200ms"}}))
                .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let copies = j["results"]["snapshots"].as_array().unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0]["state"], "completed");
    let c = eu
        .describe_snapshots()
        .snapshot_ids(copies[0]["snapshot_id"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let snap = &c.snapshots()[0];
    assert!(snap
        .tags()
        .iter()
        .any(|t| t.key() == Some("Copy") && t.value() == Some("dr")));

    // Deregister with its snapshots.
    let keep = amis[1]["image_id"].as_str().unwrap();
    let j = d
        .wait_final(
            &d.submit(
                &json!({"action": "deregister_image", "targets": {"image_ids": [keep]},
                "params": {"delete_snapshots": true}}),
            )
            .await,
            MINUTE,
        )
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(ec2
        .describe_images()
        .image_ids(keep)
        .send()
        .await
        .map(|o| o.images().is_empty())
        .unwrap_or(true));
    assert!(j["results"]["images"][0]["outcome"]
        .as_str()
        .unwrap()
        .contains("deleted snap-"));
}

/// Snapshot waits of many jobs hold no worker and share the account's polling rounds: twelve jobs
/// of a daemon with two workers all wait for their snapshots to complete at once (parked), at one
/// DescribeSnapshots per round, not one per job.
#[tokio::test]
async fn snapshot_waits_of_many_jobs_share_each_round() {
    let moto = Moto::start().await;
    let ids = moto.launch(12, &[("Backup", "herd")]).await;
    let proxy = FaultProxy::start(&moto.url, 3).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        workers: 2,
        ..Default::default()
    })
    .await;
    proxy.set(|f| {
        f.snapshot_state = Some(("pending".into(), "40%".into(), Instant::now() + MINUTE))
    });
    let mut jobs = Vec::new();
    for iid in &ids {
        jobs.push(
            d.submit(
                &json!({"action": "create_snapshots", "targets": {"instance_ids": [iid]},
                "wait": {"interval": "200ms", "timeout": "2m"}}),
            )
            .await,
        );
    }
    for id in &jobs {
        d.wait_for(id, MINUTE, |j| {
            j["progress"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("0 of 1 snapshot(s) completed"))
        })
        .await;
    }
    assert_eq!(d.metric("ec2jobd_jobs_parked").await, 12.0, "{}", d.log());
    let rounds = "ec2jobd_status_rounds_total";
    let (r0, c0) = (d.metric(rounds).await, proxy.calls("DescribeSnapshots"));
    let deadline = Instant::now() + MINUTE;
    while d.metric(rounds).await < r0 + 5.0 {
        assert!(Instant::now() < deadline, "no rounds");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (r1, c1) = (d.metric(rounds).await, proxy.calls("DescribeSnapshots"));
    let (made, calls) = (r1 - r0, (c1 - c0) as f64);
    eprintln!("12 jobs waiting for snapshots: {calls} DescribeSnapshots over {made} rounds");
    assert!(
        calls <= made + 1.0,
        "{calls} DescribeSnapshots calls over {made} rounds for 12 waiting jobs"
    );
    proxy.set(|f| f.snapshot_state = None);
    for id in &jobs {
        let j = d.wait_final(id, MINUTE).await;
        assert_eq!(j["state"], "succeeded", "{j}\n{}", d.log());
    }
}
