//! The OpenAPI document, generated from the handlers' annotations. `openapi/ec2jobd.json` is this
//! document committed; a test fails when the two drift (`UPDATE_OPENAPI=1` rewrites the file).

use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::{Modify, OpenApi};

use crate::routes::{audit, catalog, jobs, ops, schedules, sns, templates, tokens};
use crate::service as svc;

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "OpenAPI document", content_type = "application/json")))]
pub async fn openapi() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_pretty_json().unwrap_or_default(),
    )
        .into_response()
}

/// The ec2jobd v1 API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ec2jobd",
        description = "Runs EC2 operations as durable, auditable jobs. Every /v1 route needs `Authorization: Bearer <token>`; errors are `application/problem+json`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    servers((url = "/", description = "The daemon serving this document (Swagger UI calls it here)")),
    paths(
        jobs::submit, jobs::list, jobs::get_job, jobs::cancel, jobs::events, jobs::outputs,
        jobs::outputs_env,
        jobs::report,
        catalog::catalog, sns::deliver, sns::deliveries, sns::list_hooks, sns::get_hook,
        sns::put_hook, sns::delete_hook,
        templates::list, templates::get_one, templates::put, templates::delete, templates::run,
        schedules::list, schedules::get_one, schedules::put, schedules::delete, schedules::pause,
        schedules::resume, schedules::add_override, schedules::list_overrides,
        schedules::delete_override,
        tokens::create, tokens::list, tokens::revoke, audit::list,
        ops::healthz, ops::readyz, ops::metrics, openapi,
    ),
    components(schemas(
        ec2jobd_spec::JobSpec, ec2jobd_spec::Job, ec2jobd_spec::JobEvent, ec2jobd_spec::JobState,
        ec2jobd_spec::Action, ec2jobd_spec::Role, crate::error::Problem, jobs::JobPage,
        svc::tokens::NewToken, svc::tokens::CreatedToken, ec2jobd_store::TokenInfo, ops::Health,
        svc::catalog::Catalog, svc::catalog::AccountCatalog, svc::hooks::DeliveryAnswer,
        sns::DeliveryPage, svc::hooks::HookInfo, crate::config::HookSection,
        svc::templates::Template, svc::templates::TemplateParam, svc::templates::ParamType,
        svc::templates::NamedTemplate, templates::RunBody,
        ec2jobd_store::Delivery, ec2jobd_spec::StepResult, audit::AuditPage,
        ec2jobd_store::AuditEntry, ec2jobd_store::Scopes, crate::schedules::Schedule,
        crate::schedules::Fires, crate::schedules::Overlap, crate::schedules::Source,
        crate::schedules::Upcoming, svc::schedules::ScheduleInfo, svc::schedules::LastJob,
        svc::schedules::OverrideInfo, crate::schedules::windows::Override,
        crate::schedules::windows::Held,
        ec2jobd_spec::schedule::Window, ec2jobd_spec::schedule::CatchUp,
    )),
    modifiers(&Bearer, &Problems),
    tags(
        (name = "jobs", description = "Submit, watch, query and cancel jobs"),
        (name = "tokens", description = "API tokens and the audit log (admin)"),
        (name = "sns", description = "SNS deliveries: verified webhook triggers and their record"),
        (name = "templates", description = "Saved job templates with named parameters"),
        (name = "schedules", description = "Jobs fired on a cron expression or an office-hours window, time-zone and holiday aware"),
        (name = "ops", description = "Health, readiness, metrics, API description"),
    )
)]
pub struct ApiDoc;

/// The bearer scheme every /v1 route (but the SNS hook) requires; the operations that require
/// nothing (health, metrics, this document, the SNS hook, which SNS signs instead) say so with
/// `security: []`, so linters and generated clients know they are public on purpose.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        if let Some(c) = api.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
        for item in api.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                op.security.get_or_insert_with(Vec::new);
            }
        }
    }
}

/// Every error is an `application/problem+json` document; this says so on each operation, and adds
/// the answers the shared layers give on any route, so the document lists every status a client
/// can get (checked by schemathesis in the bad-input campaign): 401 from authentication, 403 from
/// role checks on writes, 400/413/415 from body and parameter parsing, 503 when the store is
/// unavailable or a request outlives `http.request_timeout`.
struct Problems;

const PROBLEM: &str = "application/problem+json";

fn problem(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                PROBLEM,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

impl Problems {
    fn operation(path: &str, method: &str, op: &mut Operation) {
        let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
        let body = op.request_body.is_some();
        let params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
        let responses = &mut op.responses.responses;
        for r in responses.values_mut() {
            if let RefOr::T(r) = r {
                let is_problem = r.content.get("application/json").is_some_and(|c| {
                    matches!(&c.schema, Some(RefOr::Ref(x)) if x.ref_location.ends_with("/Problem"))
                });
                if is_problem {
                    if let Some(c) = r.content.shift_remove("application/json") {
                        r.content.insert(PROBLEM.into(), c);
                    }
                }
            }
        }
        let mut add = |code: &str, why: &str| {
            responses
                .entry(code.to_string())
                .or_insert_with(|| problem(why));
        };
        if secured {
            add("401", "Missing, unknown, expired or revoked bearer token");
            if method != "get" {
                add("403", "The token's role does not allow this");
            }
        }
        if body {
            add("400", "The body is not valid JSON");
            add("413", "The body is larger than http.body_limit");
            add("415", "The body is not application/json");
            add(
                "422",
                "The body is JSON but not a valid document of this kind",
            );
        }
        if params || body {
            add("400", "A parameter or header is malformed");
        }
        if path.starts_with("/v1/") {
            add(
                "503",
                "The store is unavailable or the request outlived http.request_timeout; retry later",
            );
        }
    }
}

impl Modify for Problems {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        for (path, item) in api.paths.paths.iter_mut() {
            for (method, op) in [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
            ] {
                if let Some(op) = op.as_mut() {
                    Problems::operation(path, method, op);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// utoipa collects the schemas a handler names, but not always what those reference in turn
    /// (recursive types): every `$ref` must resolve, or clients and schemathesis skip those parts.
    #[test]
    fn every_reference_resolves() {
        let doc: serde_json::Value =
            serde_json::from_str(&ApiDoc::openapi().to_json().unwrap()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let mut stack = vec![&doc];
        let mut missing = Vec::new();
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                        let name = r.trim_start_matches("#/components/schemas/");
                        if schemas.get(name).is_none() {
                            missing.push(r.to_string());
                        }
                    }
                    stack.extend(m.values());
                }
                serde_json::Value::Array(a) => stack.extend(a),
                _ => {}
            }
        }
        assert!(missing.is_empty(), "unresolved: {missing:?}");
    }

    /// Errors are problem documents on every operation, and authentication failures are listed.
    #[test]
    fn problems_are_declared_as_such() {
        let doc: serde_json::Value =
            serde_json::from_str(&ApiDoc::openapi().to_json().unwrap()).unwrap();
        let get = &doc["paths"]["/v1/jobs/{id}"]["get"]["responses"];
        assert!(
            get["404"]["content"]["application/problem+json"].is_object(),
            "{get}"
        );
        assert!(get["404"]["content"]["application/json"].is_null());
        assert!(get["401"]["content"]["application/problem+json"].is_object());
        assert!(get["503"].is_object());
        let put = &doc["paths"]["/v1/templates/{name}"]["put"]["responses"];
        for code in ["400", "401", "403", "413", "415", "422"] {
            assert!(put[code].is_object(), "{code} missing: {put}");
        }
        assert!(doc["paths"]["/healthz"]["get"]["responses"]["401"].is_null());
        assert_eq!(
            doc["paths"]["/healthz"]["get"]["security"],
            serde_json::json!([])
        );
    }

    #[test]
    fn committed_openapi_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/ec2jobd.json");
        let now = ApiDoc::openapi().to_pretty_json().unwrap() + "\n";
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &now).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == now,
            "openapi/ec2jobd.json is out of date: run `UPDATE_OPENAPI=1 cargo test -p ec2jobd-server openapi`"
        );
    }
}
