//! OpenTelemetry export: a job submitted with a W3C `traceparent` continues that trace — its request
//! span, its attempt's span and the EC2 calls under it arrive at an OTLP/HTTP receiver under the
//! caller's trace id. The receiver only records what it is sent (OTLP/JSON, as `tracing.protocol =
//! "http/json"` sends it); no collector is packaged for this machine.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::common::{Daemon, DaemonOpts, Moto};

/// (trace id, span id, parent span id, name) of every span received.
fn spans(bodies: &[Value]) -> Vec<(String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    bodies
        .iter()
        .flat_map(|b| b["resourceSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|r| r["scopeSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| s["spans"].as_array().cloned().unwrap_or_default())
        .map(|sp| {
            (
                s(&sp["traceId"]).to_lowercase(),
                s(&sp["spanId"]).to_lowercase(),
                s(&sp["parentSpanId"]).to_lowercase(),
                s(&sp["name"]),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_submission_traceparent_continues_into_the_jobs_ec2_calls() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Name", "traced")]).await;
    let (url, got) = super::common::json_sink().await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        extra: format!(
            "[tracing]\notlp_endpoint = \"{url}\"\nprotocol = \"http/json\"\nservice_name = \"ec2jobd-test\"\n"
        ),
        env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
        ..Default::default()
    })
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let r = d
        .req(reqwest::Method::POST, "/v1/jobs", &d.admin)
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .json(&json!({"action": "stop_instances", "targets": {"instance_ids": [ids[0]]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    assert_eq!(
        job["spec"]["traceparent"],
        format!("00-{trace}-{parent}-01"),
        "kept with the job"
    );
    let j = d
        .wait_final(job["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = spans(&got.lock().unwrap());
        let ours: Vec<_> = all.iter().filter(|s| s.0 == trace).collect();
        let job_span = ours.iter().find(|s| s.3 == "job");
        let http_span = ours.iter().find(|s| s.3 == "http");
        let stop_call = ours.iter().find(|s| s.3.contains("StopInstances"));
        if let (Some(job_span), Some(http_span), Some(stop_call)) = (job_span, http_span, stop_call)
        {
            assert_eq!(
                job_span.2, parent,
                "the attempt's parent is the caller's span"
            );
            assert_eq!(http_span.2, parent, "so is the request's");
            // The EC2 call sits under the job's span (directly or through the driver's own).
            let mut up = stop_call.2.clone();
            let mut hops = 0;
            while up != job_span.1 && hops < 10 {
                up = ours
                    .iter()
                    .find(|s| s.1 == up)
                    .map(|s| s.2.clone())
                    .unwrap_or_default();
                hops += 1;
            }
            assert_eq!(
                up, job_span.1,
                "StopInstances is in the job's span tree: {ours:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {trace}: {ours:?}\nall names: {:?}\nlog:\n{}",
            all.iter().map(|s| &s.3).collect::<Vec<_>>(),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A retried submission carries a new traceparent; it is still the same request.
    let spec = json!({"action": "describe_instances", "targets": {"instance_ids": [ids[0]]}});
    let mut answers = Vec::new();
    for span in ["00f067aa0ba902b7", "00f067aa0ba902b8"] {
        let r = d
            .req(reqwest::Method::POST, "/v1/jobs", &d.admin)
            .header("traceparent", format!("00-{trace}-{span}-01"))
            .header("Idempotency-Key", "traced-retry")
            .json(&spec)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        answers.push((status, body["id"].clone()));
    }
    assert_eq!(answers[0].0, 202);
    assert_eq!(
        answers[1],
        (200, answers[0].1.clone()),
        "a replay, not a conflict"
    );
    // A job without one starts its own trace.
    let other = d
        .submit(&json!({"action": "describe_instances", "targets": {"instance_ids": [ids[0]]}}))
        .await;
    let o = d.job(&other).await;
    assert!(o["spec"].get("traceparent").is_none(), "{o}");
}
