//! Wiring: builds the store, the EC2 driver, the runner and the router from a [`Config`], and runs
//! the daemon until SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware;
use axum::Router;
use ec2jobd_ec2::{AccountConfig, Ec2Pool};
use ec2jobd_spec::{Clock, SystemClock};
use ec2jobd_store::postgres::DbClock;
use ec2jobd_store::{postgres, PgOptions, PgStore, SqliteOptions, SqliteStore, Store, Synchronous};
use tokio_util::sync::CancellationToken;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth;
use crate::config::{Config, LogFormat, SyncMode};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::routes::{audit, catalog, jobs, ops, schedules, sns, templates, tokens};
use crate::sns::notify::Notifier;
use crate::sns::verify::{CertStore, HttpFetcher};
use crate::state::AppState;
use ec2jobd_exec::executor::Ec2Executor;
use ec2jobd_exec::parking::Parking;
use ec2jobd_exec::runner::{Runner, RunnerConfig};
use ec2jobd_exec::share::ClusterRounds;

/// Opens the configured store (applying migrations): SQLite, or PostgreSQL shared with other
/// replicas.
pub async fn open_store(cfg: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Arc<dyn Store>> {
    if postgres::is_postgres_url(&cfg.database) {
        let opts = PgOptions {
            url: cfg.database.clone(),
            max_connections: cfg.postgres.max_connections,
            poll_only: cfg.postgres.poll_only,
            watch_interval: cfg.postgres.watch_interval.0,
        };
        let store = PgStore::open(opts, clock)
            .await
            .with_context(|| format!("opening database `{}`", postgres::redact(&cfg.database)))?;
        return Ok(Arc::new(store));
    }
    let opts = SqliteOptions {
        url: cfg.database.clone(),
        synchronous: match cfg.sqlite.synchronous {
            SyncMode::Normal => Synchronous::Normal,
            SyncMode::Full => Synchronous::Full,
        },
        busy_timeout: cfg.sqlite.busy_timeout.0,
        max_connections: cfg.sqlite.max_connections,
        max_batch: cfg.sqlite.max_batch,
    };
    let store = SqliteStore::open(opts, clock)
        .await
        .with_context(|| format!("opening database `{}`", postgres::redact(&cfg.database)))?;
    Ok(Arc::new(store))
}

/// The clock the daemon decides on: with PostgreSQL the database server's (every replica agrees on
/// leases, leader terms and schedule firings whatever its own clock says), with SQLite this
/// machine's (the one node's, which is SQLite's).
pub async fn daemon_clock(cfg: &Config) -> anyhow::Result<Arc<dyn Clock>> {
    if !postgres::is_postgres_url(&cfg.database) {
        return Ok(Arc::new(SystemClock));
    }
    let pool = postgres::connect(&cfg.database, 1)
        .await
        .with_context(|| format!("opening database `{}`", postgres::redact(&cfg.database)))?;
    let clock = DbClock::follow(pool)
        .await
        .with_context(|| format!("reading the clock of `{}`", postgres::redact(&cfg.database)))?;
    let off = clock_offset_ms(clock.as_ref());
    if off.abs() >= 1_000 {
        tracing::warn!(
            offset_ms = off,
            "this machine's clock is off the database's; leases and schedules follow the database's"
        );
    }
    Ok(clock as Arc<dyn Clock>)
}

/// How far this machine's clock is ahead of `clock` (the one decisions are made on), in ms: the
/// start-up warning and `ec2jobd_clock_offset_seconds` both say it this way round.
pub fn clock_offset_ms(clock: &dyn Clock) -> i64 {
    SystemClock.now_ms() - clock.now_ms()
}

/// Logs to stderr as text or JSON; `RUST_LOG` overrides `log.level`.
pub fn init_tracing(cfg: &Config) -> anyhow::Result<Option<crate::telemetry::Telemetry>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log.level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A log that cannot be written (its disk full, a file size limit) must not take requests
        // down with it: by default a failed write is reported with `eprintln!`, which panics when
        // stderr itself fails, inside whatever handler or worker logged.
        .log_internal_errors(false);
    let fmt = match cfg.log.format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    // Each layer has its own filter: the exporter may want the SDK's debug spans the log does not.
    let telemetry = crate::telemetry::Telemetry::start(&cfg.tracing)?;
    let otel = telemetry
        .as_ref()
        .map(|t| t.layer().with_filter(EnvFilter::new(&cfg.tracing.level)));
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(telemetry)
}

async fn not_found() -> ApiError {
    ApiError::not_found("such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// The whole HTTP API with its layers.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .merge(jobs::router())
        .merge(tokens::router())
        .merge(audit::router())
        .merge(catalog::router())
        .merge(sns::router())
        .merge(templates::router())
        .merge(schedules::router())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let limit = state.config.http.request_timeout.0;
    Router::new()
        .merge(v1)
        .merge(crate::ui::router(&state))
        .merge(sns::hook_router())
        .merge(ops::router())
        .route("/openapi.json", axum::routing::get(crate::openapi::openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.http.body_limit))
        .layer(CompressionLayer::new())
        .layer(middleware::from_fn_with_state(limit, crate::deadline::enforce))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let span = tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id);
                if let Some(tp) = crate::telemetry::traceparent_header(req.headers()) {
                    crate::telemetry::continue_trace(&span, &tp);
                }
                span
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

pub(crate) fn account_configs(cfg: &Config) -> std::collections::HashMap<String, AccountConfig> {
    cfg.accounts
        .iter()
        .map(|(name, a)| {
            (
                name.clone(),
                AccountConfig {
                    region: a.region.clone(),
                    endpoint_url: a.endpoint_url.clone(),
                    profile: a.profile.clone(),
                    access_key_id_env: a.access_key_id_env.clone(),
                    secret_access_key_env: a.secret_access_key_env.clone(),
                    session_token_env: a.session_token_env.clone(),
                    role_arn: a.role_arn.clone(),
                    external_id: a.external_id.clone(),
                    role_session_name: a.role_session_name.clone(),
                    https_proxy: a.https_proxy.clone(),
                    no_proxy: a.no_proxy.clone(),
                    call_timeout: a.call_timeout.0,
                    max_call_attempts: a.max_call_attempts,
                    retry_base: a.retry_base.0,
                    retry_max: a.retry_max.0,
                },
            )
        })
        .collect()
}

/// The parts every route shares, around `store`: the runner (with its parking lot) and the rest of
/// [`AppState`]. Nothing starts here (`serve` starts the workers; tests drive the parts).
pub(crate) fn assemble(
    cfg: &Config,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    pool: Arc<Ec2Pool>,
    shutdown: CancellationToken,
) -> AppState {
    let q = &cfg.queue;
    let lot = Parking::new(
        store.clone(),
        pool.clone(),
        clock.clone(),
        metrics.clone(),
        q.lease.0,
        q.max_waiting,
    );
    let runner = Arc::new(
        Runner::new(
            store.clone(),
            Arc::new(Ec2Executor::new(pool.clone(), lot.clone()).with_settings(
                ec2jobd_exec::executor::Settings {
                    consistency_timeout: cfg.ec2.consistency_timeout.0,
                    not_found_grace: cfg.ec2.not_found_grace.0,
                },
            )),
            RunnerConfig {
                workers: q.workers,
                lease: q.lease.0,
                heartbeat: q.heartbeat.0,
                poll_interval: q.poll_interval.0,
                reap_interval: q.reap_interval.0,
                backoff_base: q.backoff_base.0,
                backoff_max: q.backoff_max.0,
                grace: cfg.shutdown_grace.0,
            },
            metrics.clone(),
            clock.clone(),
            rand::random(),
        )
        .with_parking(lot),
    );
    AppState {
        config: Arc::new(cfg.clone()),
        store: store.clone(),
        clock: clock.clone(),
        metrics,
        runner: runner.clone(),
        tokens: Default::default(),
        admission: Default::default(),
        streams: Default::default(),
        counts: Default::default(),
        schedules_changed: Default::default(),
        pool,
        sns_certs: Arc::new(CertStore::new(
            cfg.sns.cert_dir.as_ref().map(std::path::PathBuf::from),
            Arc::new(HttpFetcher::new(
                cfg.sns.cert_fetch_timeout.0,
                cfg.sns.cert_max_bytes,
            )),
            cfg.sns.cert_cache,
        )),
        shutdown,
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let addr = cfg.listen_addr()?;
    // Secrets named in config are read from the environment of the daemon only (CLI commands that
    // load the same config do not need them).
    for (name, h) in &cfg.sns.hooks {
        if let Some(var) = &h.basic_auth_env {
            if !std::env::var(var).is_ok_and(|v| v.contains(':')) {
                anyhow::bail!("config key `sns.hooks.{name}.basic_auth_env`: environment variable `{var}` must hold `user:password`");
            }
        }
    }
    let clock = daemon_clock(&cfg).await?;
    let store = open_store(&cfg, clock.clone()).await?;
    let metrics = Arc::new(Metrics::new());
    let pool = Arc::new(Ec2Pool::new(
        account_configs(&cfg),
        cfg.pacing_config(),
        metrics.clone(),
    ));
    let shutdown = CancellationToken::new();
    let leading = crate::leader::start(
        store.clone(),
        cfg.postgres.leader_ttl.0,
        metrics.clone(),
        shutdown.clone(),
    )
    .await;
    if let Some(cluster) = store.cluster() {
        // Replicas: the leader polls EC2 for every replica's waits (before any watcher exists).
        let polls = leading.clone();
        let rounds = ClusterRounds::new(
            cluster,
            pool.clone(),
            Arc::new(move || polls.now()),
            clock.clone(),
        );
        pool.share_rounds(rounds.clone());
        tokio::spawn(rounds.adopt(shutdown.clone()));
    }
    let state = assemble(
        &cfg,
        store.clone(),
        clock.clone(),
        metrics,
        pool,
        shutdown.clone(),
    );
    let runner = state.runner.clone();
    // Schedules from config are checked completely (their jobs too) before anything is served.
    for (name, schedule) in &cfg.schedules {
        if let Err(e) = crate::service::schedules::check(&state, schedule).await {
            anyhow::bail!(
                "config key `schedules.{name}.{}`: {}",
                e.field.unwrap_or_default(),
                e.detail
            );
        }
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("config key `listen`: cannot bind {addr}"))?;
    let local = listener.local_addr()?;
    // The one line on stdout: scripts and tests read the bound address from it (useful with port 0).
    println!("ec2jobd listening on http://{local}");
    tracing::info!(%local, workers = cfg.queue.workers, database = %postgres::redact(&cfg.database), "ec2jobd started");
    let notifier = Arc::new(Notifier::new(
        state.pool.clone(),
        state.store.clone(),
        clock.clone(),
        cfg.notify.default_notify(),
        cfg.notify.attempts,
        cfg.notify.backoff_base.0,
        cfg.notify.backoff_max.0,
    ));
    tokio::spawn(notifier.clone().run(leading.clone(), shutdown.clone()));
    tokio::spawn(crate::schedules::ticker::Ticker::new(state.clone()).run(
        clock.clone(),
        leading.clone(),
        shutdown.clone(),
    ));
    crate::sns::sqs::start(&state, &shutdown);
    tokio::spawn(crate::retention::run(
        state.store.clone(),
        clock.clone(),
        cfg.retention.clone(),
        state.metrics.clone(),
        leading.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::db_backup::run(
        cfg.database.clone(),
        cfg.backup.clone(),
        clock.clone(),
        state.metrics.clone(),
        leading,
        shutdown.clone(),
    ));
    runner.on_finished(Arc::new(move |_job| notifier.job_finished()));
    runner.on_job_span(Arc::new(|span, job| {
        if let Some(tp) = &job.spec.traceparent {
            crate::telemetry::continue_trace(span, tp);
        }
    }));
    survive_file_size_limit();
    let nofile = crate::listener::raise_fd_limit();
    if nofile.is_some_and(|n| (n as usize) < cfg.http.max_connections + 256) {
        tracing::warn!(
            open_files = nofile,
            max_connections = cfg.http.max_connections,
            "the open-files limit leaves little room beside http.max_connections; raise it (LimitNOFILE, ulimit -n) or lower the cap"
        );
    }
    let workers = runner.start(shutdown.clone());
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: no new claims, running jobs get the grace period");
            shutdown.cancel();
        }
    });
    let limits = crate::listener::Limits {
        max_connections: cfg.http.max_connections,
        per_client: match cfg
            .http
            .max_connections_per_client
            .of(cfg.http.max_connections as u64)
        {
            0 => cfg.http.max_connections,
            n => n as usize,
        },
        header_read_timeout: cfg.http.header_read_timeout.0,
        idle_timeout: cfg.http.idle_timeout.0,
        drain: cfg.shutdown_grace.0,
    };
    crate::listener::serve(listener, router(state), limits, shutdown.clone())
        .await
        .context("HTTP server")?;
    workers.await.ok();
    // Another replica takes maintenance over at once instead of when the lease runs out.
    if let Err(e) = store.resign(crate::leader::MAINTENANCE).await {
        tracing::warn!(error = %e, "could not give the maintenance lease up");
    }
    tracing::info!("ec2jobd stopped");
    Ok(())
}

/// A file size limit (`ulimit -f`, RLIMIT_FSIZE) makes a write past it raise SIGXFSZ, whose default
/// action kills the process. A full or limited disk must surface as a failed write (submissions
/// answer 503 and the daemon recovers when space returns), not as a dead daemon: a handler is
/// installed, so the write fails with EFBIG like any other storage error.
fn survive_file_size_limit() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // tokio keeps the handler installed for the life of the process, even once this is dropped.
        if let Err(e) = signal(SignalKind::from_raw(libc::SIGXFSZ)) {
            tracing::warn!(error = %e, "cannot handle SIGXFSZ; a file size limit would stop the daemon");
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
