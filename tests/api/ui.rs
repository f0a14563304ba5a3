//! The dashboard (`/ui/`): sessions, roles, CSRF and headers over plain HTTP, then the pages in a
//! real headless Chromium (common::browser): sign in, watch a start job go from queued to
//! succeeded with "2/2 checks passed" without reloading, cancel a waiting job from its page, run a
//! template from its form, and a viewer who finds no Cancel button and whose forged POST is
//! refused. Search, the chart, templates' forms and tokens are checked over plain HTTP. No page logs a console
//! error; each step saves a screenshot under target/ui-screenshots/.

use std::time::{Duration, Instant};

use crate::common::browser::Browser;
use crate::common::proxy::FaultProxy;
use crate::common::{create_token, Daemon, DaemonOpts, Moto};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// Signs in; returns the cookie pair to send back.
async fn sign_in(d: &Daemon, token: &str) -> String {
    let r = crate::common::no_redirects()
        .post(format!("{}/ui/signin", d.url))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "signed in and sent home");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=43200"] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP, not configured: {cookie}"
    );
    cookie.split(';').next().unwrap().to_string()
}

async fn page(cookie: &str, url: &str) -> (u16, String) {
    let r = crate::common::no_redirects()
        .get(url)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    html[at..at + 64].to_string()
}

async fn post(cookie: &str, url: &str, form: &[(&str, &str)]) -> u16 {
    crate::common::no_redirects()
        .post(url)
        .header("cookie", cookie)
        .form(form)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn dashboard_sessions_roles_and_csrf() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let viewer = create_token(&d.config, "viewer", "eve");
    let operator = create_token(&d.config, "operator", "otto");
    // Not signed in: the pages send to sign-in; a wrong token gets the form again, no cookie.
    let r = crate::common::no_redirects()
        .get(format!("{}/ui/jobs", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/signin");
    let r = crate::common::no_redirects()
        .post(format!("{}/ui/signin", d.url))
        .form(&[("token", "ejd_wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    let id = d.submit(&json!({"action": "describe_instances", "targets": {"instance_ids": ["i-0123456789abcdef0"]}})).await;
    let job_url = format!("{}/ui/jobs/{id}", d.url);
    let cancel_url = format!("{job_url}/cancel");

    // A viewer sees the job but no Cancel, and a POST is refused with or without the CSRF token.
    let v = sign_in(&d, &viewer).await;
    let (status, html) = page(&v, &job_url).await;
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains(&id) && !html.contains("id=\"cancel\""),
        "{html}"
    );
    assert_eq!(post(&v, &cancel_url, &[]).await, 403, "no CSRF token");
    assert_eq!(
        post(&v, &cancel_url, &[("csrf", &csrf_of(&html))]).await,
        403,
        "a viewer"
    );
    // The API never takes the cookie.
    let r = reqwest::Client::new()
        .get(format!("{}/v1/jobs", d.url))
        .header("cookie", &v)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // An operator's forged POST (another session's or no token) is refused; its own form cancels.
    let o = sign_in(&d, &operator).await;
    let (_, html) = page(&o, &job_url).await;
    assert!(html.contains("id=\"cancel\""), "{html}");
    assert_eq!(
        post(&o, &cancel_url, &[("csrf", &"0".repeat(64))]).await,
        403
    );
    assert_eq!(d.job(&id).await["state"], "queued", "nothing changed");
    assert_eq!(
        post(&o, &cancel_url, &[("csrf", &csrf_of(&html))]).await,
        303
    );
    let j = d.job(&id).await;
    assert_eq!(
        (j["state"].as_str(), j["created_by"].as_str()),
        (Some("cancelled"), Some("admin"))
    );

    // Search finds a job by its id or its target.
    let (_, html) = page(&o, &format!("{}/ui/jobs?q=i-0123456789abcdef0", d.url)).await;
    assert!(html.contains(&format!("data-job=\"{id}\"")), "{html}");
    let (_, html) = page(&o, &format!("{}/ui/jobs?q=i-0fffffffffffffff0", d.url)).await;
    assert!(!html.contains("data-job="), "{html}");
    let (status, html) = page(&o, &format!("{}/ui/", d.url)).await;
    assert_eq!(status, 200);
    assert!(html.contains("id=\"hourly\""), "the chart: {html}");
    let (status, html) = page(&o, &format!("{}/ui/sns", d.url)).await;
    assert_eq!(status, 200, "{html}");

    // A template's form: a viewer sees none and is refused; an operator's bad value gets the form
    // back (422, the value kept, nothing stored); a good one queues the job by the operator.
    let t = json!({"description": "Look at some instances",
        "parameters": {"instances": {"type": "string_list"}, "attempts": {"type": "integer", "default": 2}},
        "spec": {"action": "describe_instances", "targets": {"instance_ids": "${instances}"}, "max_attempts": "${attempts}"}});
    let r = d
        .req(reqwest::Method::PUT, "/v1/templates/look", &d.admin)
        .json(&t)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let run_url = format!("{}/ui/templates/look/run", d.url);
    let (_, html) = page(&v, &format!("{}/ui/templates/look", d.url)).await;
    assert!(!html.contains("id=\"run-form\""), "{html}");
    let v_csrf = csrf_of(&html);
    assert_eq!(
        post(
            &v,
            &run_url,
            &[("csrf", &v_csrf), ("p.instances", "i-0123456789abcdef0")]
        )
        .await,
        403
    );
    let (status, html) = page(&o, &format!("{}/ui/templates", d.url)).await;
    assert_eq!(status, 200);
    assert!(html.contains("data-template=\"look\""), "{html}");
    let (_, html) = page(&o, &format!("{}/ui/templates/look", d.url)).await;
    assert!(html.contains("name=\"p.instances\""), "{html}");
    let o_csrf = csrf_of(&html);
    let before = d.get_json("/v1/jobs?limit=100").await.1["jobs"]
        .as_array()
        .unwrap()
        .len();
    let r = crate::common::no_redirects()
        .post(&run_url)
        .header("cookie", &o)
        .form(&[
            ("csrf", o_csrf.as_str()),
            ("p.instances", "i-0123456789abcdef0"),
            ("p.attempts", "two"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("`attempts` must be a whole number") && html.contains("i-0123456789abcdef0"),
        "{html}"
    );
    assert_eq!(
        d.get_json("/v1/jobs?limit=100").await.1["jobs"]
            .as_array()
            .unwrap()
            .len(),
        before
    );
    let r = crate::common::no_redirects()
        .post(&run_url)
        .header("cookie", &o)
        .form(&[
            ("csrf", o_csrf.as_str()),
            ("p.instances", "i-0123456789abcdef0\ni-0123456789abcdef1"),
            ("p.attempts", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let new = r.headers()["location"]
        .to_str()
        .unwrap()
        .trim_start_matches("/ui/jobs/")
        .to_string();
    let j = d.job(&new).await;
    assert_eq!(
        j["spec"]["targets"]["instance_ids"],
        json!(["i-0123456789abcdef0", "i-0123456789abcdef1"])
    );
    assert_eq!(
        (j["max_attempts"].as_i64(), j["created_by"].as_str()),
        (Some(2), Some("otto"))
    );

    // Tokens (admins only): a new token's secret is shown once and works; revoking ends it.
    assert_eq!(page(&o, &format!("{}/ui/tokens", d.url)).await.0, 403);
    let a = sign_in(&d, &d.admin).await;
    let tokens_url = format!("{}/ui/tokens", d.url);
    let (status, html) = page(&a, &tokens_url).await;
    assert_eq!(status, 200, "{html}");
    let a_csrf = csrf_of(&html);
    let r = crate::common::no_redirects()
        .post(&tokens_url)
        .header("cookie", &a)
        .form(&[
            ("csrf", a_csrf.as_str()),
            ("name", "cron-1"),
            ("role", "operator"),
            ("actions", "start_instances, stop_instances"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let html = r.text().await.unwrap();
    let at = html.find("id=\"token-secret\">").expect("the secret") + 18;
    let secret = &html[at..at + html[at..].find('<').unwrap()];
    let r = d.post_job(secret, &json!({"action": "stop_instances", "targets": {"instance_ids": ["i-0123456789abcdef0"]}})).await;
    assert_eq!(r.status(), 202, "the new token works");
    let r = d.post_job(secret, &json!({"action": "reboot_instances", "targets": {"instance_ids": ["i-0123456789abcdef0"]}})).await;
    assert_eq!(r.status(), 403, "outside its scope");
    let (_, html) = page(&a, &tokens_url).await;
    assert!(
        html.contains("data-token=\"cron-1\"") && !html.contains(secret),
        "shown once: {html}"
    );
    let r = crate::common::no_redirects()
        .post(&tokens_url)
        .header("cookie", &a)
        .form(&[
            ("csrf", a_csrf.as_str()),
            ("name", "bad name"),
            ("role", "operator"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        post(
            &a,
            &format!("{tokens_url}/cron-1/revoke"),
            &[("csrf", &a_csrf)]
        )
        .await,
        303
    );
    let r = d.post_job(secret, &json!({"action": "stop_instances", "targets": {"instance_ids": ["i-0123456789abcdef0"]}})).await;
    assert_eq!(r.status(), 401, "revoked");

    // Signing out ends the session; revoking the token ends its other sessions.
    let (_, html) = page(&o, &format!("{}/ui/", d.url)).await;
    assert_eq!(
        post(
            &o,
            &format!("{}/ui/signout", d.url),
            &[("csrf", &csrf_of(&html))]
        )
        .await,
        303
    );
    assert_eq!(page(&o, &job_url).await.0, 303, "signed out");
    let st = crate::common::run_cli(&[
        "token",
        "revoke",
        "eve",
        "--config",
        d.config.to_str().unwrap(),
    ])
    .0;
    assert!(st.success());
    assert_eq!(page(&v, &job_url).await.0, 303, "revoked");
}

#[tokio::test]
async fn dashboard_in_a_real_browser() {
    let moto = Moto::start().await;
    let ids = moto.launch(2, &[("Env", "ui")]).await;
    moto.stop(&ids).await;
    let proxy = FaultProxy::start(&moto.url, 11).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        ..Default::default()
    })
    .await;
    let operator = create_token(&d.config, "operator", "otto");
    let viewer = create_token(&d.config, "viewer", "eve");
    let b = Browser::start().await;

    // Sign in.
    b.goto(&format!("{}/ui/", d.url)).await;
    let field = b.wait_for("#token", MINUTE).await;
    b.assert_no_console_errors("sign-in").await;
    b.type_into(&field, &operator).await;
    b.click(&b.wait_for("#signin", MINUTE).await).await;
    b.wait_for("#counts", MINUTE).await;
    b.screenshot("overview").await;
    b.assert_no_console_errors("overview").await;

    // A start job submitted through the API, watched on its page until 2/2 checks passed.
    let id = d
        .submit(
            &json!({"action": "start_instances", "targets": {"instance_ids": [ids[0]]},
            "wait": {"until": "status_ok", "interval": "500ms", "timeout": "2m"}}),
        )
        .await;
    b.goto(&format!("{}/ui/jobs/{id}", d.url)).await;
    b.wait_for("#live", MINUTE).await;
    b.eval("window.__same_page = 1").await;
    b.wait_text("#state", MINUTE, |t| t.contains("succeeded"))
        .await;
    b.wait_text("#instances", MINUTE, |t| t.contains("2/2 checks passed"))
        .await;
    assert_eq!(
        b.eval("return window.__same_page").await,
        1,
        "updated without a reload"
    );
    b.wait_text("#report", MINUTE, |t| t.contains("- succeeded"))
        .await;
    assert!(b.find("#cancel").await.is_none(), "no Cancel once final");
    b.screenshot("job").await;
    b.assert_no_console_errors("job").await;

    // A job waiting for status checks, cancelled from its page.
    proxy.set(|f| f.instance_status = Some(("initializing".into(), Instant::now() + 3 * MINUTE)));
    let waiting = d
        .submit(
            &json!({"action": "start_instances", "targets": {"instance_ids": [ids[1]]},
            "wait": {"until": "status_ok", "interval": "500ms", "timeout": "5m"}}),
        )
        .await;
    d.wait_for(&waiting, MINUTE, |j| j["progress"]["phase"] == "waiting")
        .await;
    b.goto(&format!("{}/ui/jobs/{waiting}", d.url)).await;
    b.click(&b.wait_for("#cancel", MINUTE).await).await;
    b.wait_text("#state", MINUTE, |t| t.contains("cancelled"))
        .await;
    b.screenshot("cancelled").await;
    b.assert_no_console_errors("cancelled job").await;
    assert_eq!(d.job(&waiting).await["state"], "cancelled");

    // A template run from its form: the job it queues opens and succeeds.
    let t = json!({"description": "Describe instances",
        "parameters": {"instances": {"type": "string_list", "description": "instance ids"}},
        "spec": {"action": "describe_instances", "targets": {"instance_ids": "${instances}"}}});
    let r = d
        .req(reqwest::Method::PUT, "/v1/templates/describe", &d.admin)
        .json(&t)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    b.goto(&format!("{}/ui/templates", d.url)).await;
    b.click(&b.wait_for("tr[data-template=describe] a", MINUTE).await)
        .await;
    let field = b.wait_for("textarea[name='p.instances']", MINUTE).await;
    b.assert_no_console_errors("template").await;
    b.type_into(&field, &ids[0]).await;
    b.screenshot("template").await;
    b.click(&b.wait_for("#run", MINUTE).await).await;
    b.wait_text("#state", MINUTE, |t| t.contains("succeeded"))
        .await;
    b.wait_text("#instances", MINUTE, |t| t.contains(&ids[0]))
        .await;
    b.screenshot("template-run").await;
    b.assert_no_console_errors("template run").await;

    // The other pages open without errors.
    for (path, css, name) in [
        ("/ui/jobs", "#job-rows", "jobs"),
        ("/ui/sns", "main h1", "sns"),
    ] {
        b.goto(&format!("{}{path}", d.url)).await;
        b.wait_for(css, MINUTE).await;
        b.screenshot(name).await;
        b.assert_no_console_errors(name).await;
    }

    // A viewer: no Cancel button, and a forged POST (with the session's own CSRF token) is 403.
    b.click(&b.wait_for("header form button", MINUTE).await)
        .await;
    let field = b.wait_for("#token", MINUTE).await;
    b.type_into(&field, &viewer).await;
    b.click(&b.wait_for("#signin", MINUTE).await).await;
    b.wait_for("#counts", MINUTE).await;
    b.screenshot("overview-later").await;
    let queued = d
        .submit(
            &json!({"action": "start_instances", "targets": {"instance_ids": [ids[1]]},
            "wait": {"until": "status_ok", "interval": "500ms", "timeout": "5m"}}),
        )
        .await;
    b.goto(&format!("{}/ui/jobs/{queued}", d.url)).await;
    b.wait_for("#live", MINUTE).await;
    assert!(b.find("#cancel").await.is_none(), "a viewer sees no Cancel");
    let status = b
        .eval(&format!(
            "const csrf = document.querySelector('input[name=csrf]').value;
             return fetch('/ui/jobs/{queued}/cancel', {{method: 'POST',
               headers: {{'content-type': 'application/x-www-form-urlencoded'}},
               body: 'csrf=' + csrf}}).then(r => r.status);"
        ))
        .await;
    assert_eq!(status, 403, "a viewer's forged cancel");
    b.screenshot("viewer").await;
    // The 403 the forged fetch got is the one console error expected here.
    let errors: Vec<_> = b
        .console()
        .await
        .into_iter()
        .filter(|(l, _)| l == "SEVERE")
        .collect();
    assert!(errors.iter().all(|(_, m)| m.contains("403")), "{errors:?}");
    assert_ne!(d.job(&queued).await["state"], "cancelled");
    proxy.set(|f| f.instance_status = None);
}
