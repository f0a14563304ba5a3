//! OpenTelemetry export (`[tracing]`): with an `otlp_endpoint`, the request spans, the job
//! attempts' spans and the AWS SDK's spans under them (every EC2 call) go to an OTLP/HTTP collector,
//! batched on their own thread; a job continues the W3C trace its submission carried
//! (`traceparent`, kept in the job's spec), so a scheduler's trace runs on into the EC2 calls. The
//! exporter sends through this crate's HTTP client ([`crate::https`]) on the daemon's runtime: no
//! second HTTP stack.
//! Must not: block a request or a worker on the collector, or fail the daemon when the collector is
//! away (spans are dropped, not queued without bound).

use std::time::Duration;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TracingSection;

/// The exporter's HTTP client: our reqwest client, each request run on the daemon's runtime (the
/// batch thread that calls it has none).
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let http = self.http.clone();
        let request = reqwest::Request::try_from(request)?;
        let answer = self.runtime.spawn(async move {
            let r = http.execute(request).await?;
            let mut out = http::Response::builder().status(r.status());
            for (k, v) in r.headers() {
                out = out.header(k, v);
            }
            let body = r.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(out.body(body)?)
        });
        answer.await?
    }
}

/// The tracer provider while export is on; shut it down to flush the last spans.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// The exporter for `cfg`, or `None` when no endpoint is set. Needs a Tokio runtime.
    pub fn start(cfg: &TracingSection) -> anyhow::Result<Option<Telemetry>> {
        let Some(endpoint) = cfg.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let http = crate::https::builder()
            .timeout(cfg.export_timeout.0)
            .build()
            .map_err(|e| anyhow::anyhow!("config key `tracing.otlp_endpoint`: HTTP client: {e}"))?;
        let client = Client {
            http,
            runtime: tokio::runtime::Handle::current(),
        };
        let protocol = match cfg.protocol.as_str() {
            "http/json" => Protocol::HttpJson,
            _ => Protocol::HttpBinary,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(protocol)
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .with_timeout(cfg.export_timeout.0)
            .build()
            .map_err(|e| anyhow::anyhow!("config key `tracing.otlp_endpoint`: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Some(Telemetry { provider }))
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans for this provider.
    pub fn layer<S>(
        &self,
    ) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("ec2jobd"))
    }

    /// Exports what is batched and stops (at shutdown, while the runtime still runs).
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown());
        if tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .is_err()
        {
            tracing::warn!("OpenTelemetry export did not finish within 5s at shutdown");
        }
    }
}

/// A request's valid `traceparent` header (an invalid one is ignored, as the W3C recommendation says).
pub fn traceparent_header(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(ec2jobd_spec::traceparent)
}

/// Makes `span` continue the W3C trace `traceparent` (already validated); a no-op when export is
/// off (the span then has no OpenTelemetry data).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    let [_, trace, parent, flags] = parts[..] else {
        return;
    };
    let (Ok(trace), Ok(parent), Ok(flags)) = (
        TraceId::from_hex(trace),
        SpanId::from_hex(parent),
        u8::from_str_radix(flags, 16),
    ) else {
        return;
    };
    let remote = SpanContext::new(
        trace,
        parent,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(Context::new().with_remote_span_context(remote));
}
