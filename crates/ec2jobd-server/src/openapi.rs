//! The OpenAPI document, generated from the handlers' annotations. `openapi/ec2jobd.json` is this
//! document committed; a test fails when the two drift (`UPDATE_OPENAPI=1` rewrites the file).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{catalog, jobs, ops, sns, templates, tokens};

/// The ec2jobd v1 API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ec2jobd",
        description = "Runs EC2 operations as durable, auditable jobs. Every /v1 route needs `Authorization: Bearer <token>`; errors are `application/problem+json`.",
        license(name = "Apache-2.0")
    ),
    paths(
        jobs::submit, jobs::list, jobs::get_job, jobs::cancel, jobs::events, jobs::outputs,
        jobs::report,
        catalog::catalog, sns::deliver, sns::deliveries, sns::list_hooks, sns::get_hook,
        sns::put_hook, sns::delete_hook,
        templates::list, templates::get_one, templates::put, templates::delete, templates::run,
        tokens::create, tokens::list, tokens::revoke,
        ops::healthz, ops::readyz, ops::metrics, ops::openapi,
    ),
    components(schemas(
        ec2jobd_spec::JobSpec, ec2jobd_spec::Job, ec2jobd_spec::JobEvent, ec2jobd_spec::JobState,
        ec2jobd_spec::Action, ec2jobd_spec::Role, crate::error::Problem, jobs::JobPage,
        tokens::NewToken, tokens::CreatedToken, ec2jobd_store::TokenInfo, ops::Health,
        catalog::Catalog, catalog::AccountCatalog, sns::DeliveryAnswer, sns::DeliveryPage,
        sns::HookInfo, crate::config::HookSection, templates::Template, templates::TemplateParam,
        templates::ParamType, templates::NamedTemplate, templates::RunBody,
        ec2jobd_store::Delivery,
    )),
    modifiers(&Bearer),
    tags(
        (name = "jobs", description = "Submit, watch, query and cancel jobs"),
        (name = "tokens", description = "API tokens (admin)"),
        (name = "sns", description = "SNS deliveries: verified webhook triggers and their record"),
        (name = "templates", description = "Saved job templates with named parameters"),
        (name = "ops", description = "Health, readiness, metrics, API description"),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        if let Some(c) = api.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
