//! The `ec2jobd` command line: `serve`, `migrate`, `openapi`, `store copy`, `backup`, `restore`, and
//! `token create|list|revoke` on this host's config and database; `submit` and `jobs …` as an HTTP client of a running daemon
//! (see [`crate::client`] for their exit codes).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ec2jobd_spec::{Role, SystemClock};
use ec2jobd_store::{postgres, Store};
use utoipa::OpenApi;

use crate::app;
use crate::auth::new_token;
use crate::config::{Config, Overrides};
use crate::openapi::ApiDoc;
use crate::service::tokens::valid_token_name;

#[derive(Parser)]
#[command(
    name = "ec2jobd",
    version,
    about = "Runs EC2 operations as durable, auditable jobs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct ConfigArg {
    /// Config file layered over the built-in defaults (see config/default.toml).
    #[arg(long, env = "EC2JOBD_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (applies migrations first).
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Overrides `listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Overrides `database`.
        #[arg(long)]
        database: Option<String>,
        /// Overrides `queue.workers`.
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Delete finished jobs and SNS deliveries past `[retention]` now (the daemon also does this
    /// every `retention.interval`); with `--dry-run`, only say how many would go.
    Prune {
        #[command(flatten)]
        config: ConfigArg,
        /// Count, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Print the least-privilege IAM policy (JSON) for the actions jobs may use: their EC2 calls,
    /// SNS (notifications, hook subscriptions), KMS for encrypted copies.
    IamPolicy {
        /// Only these actions (comma-separated wire names; default: every action).
        #[arg(long, value_delimiter = ',')]
        actions: Vec<String>,
        /// `run_instances` jobs launch instances with an instance profile (adds `iam:PassRole`
        /// to EC2).
        #[arg(long)]
        instance_profiles: bool,
        /// The daemon polls SQS intakes (`[sqs.<name>]`; adds `sqs:ReceiveMessage`,
        /// `sqs:DeleteMessage` and `sqs:GetQueueAttributes`).
        #[arg(long)]
        sqs_intake: bool,
    },
    /// Check a deployment before its first job: config, database, each account's credentials
    /// (whose, via STS), region and permissions (EC2 DryRun for every operation of the actions),
    /// SNS topics and SQS queues. One line per check with its fix; exit 1 if any failed.
    Doctor {
        #[command(flatten)]
        config: ConfigArg,
        /// Only the permissions these actions need (comma-separated wire names; default: every
        /// action).
        #[arg(long, value_delimiter = ',')]
        actions: Vec<String>,
    },
    /// Write a consistent copy of the SQLite database to `--to` while the daemon serves (it goes on
    /// taking submissions), then check the copy (integrity, schema). PostgreSQL: use pg_dump.
    Backup {
        #[command(flatten)]
        config: ConfigArg,
        /// The backup file to write (it must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Replace the SQLite database with a backup: checks it (integrity, a schema this version
    /// knows), applies migrations, keeps the replaced database as `<database>.replaced-<time>`.
    /// Refuses while the daemon (or any command) has the database open. PostgreSQL: use pg_restore.
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        /// The backup file (from `ec2jobd backup` or `[backup]`).
        #[arg(long)]
        from: PathBuf,
    },
    /// Move a store's contents.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Submit a job to a running daemon (EC2JOBD_URL, EC2JOBD_TOKEN); `--wait` to follow it.
    Submit(Box<crate::client::Submit>),
    /// Submit a job from a saved template: `ec2jobd run NAME key=value…`.
    Run(Box<crate::client::RunTemplate>),
    /// List, show, cancel, watch a running daemon's jobs, or print their outputs.
    Jobs {
        #[command(subcommand)]
        cmd: crate::client::JobsCmd,
    },
    /// List, show, pause or resume a running daemon's schedules.
    Schedules {
        #[command(subcommand)]
        cmd: crate::client::SchedulesCmd,
    },
    /// Exit 0 when the daemon at `--url` is ready (`GET /readyz`: its database takes a write), 4
    /// otherwise: a container health check that needs no curl.
    Health {
        #[command(flatten)]
        conn: crate::client::Conn,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it (only its SHA-256 is stored; it cannot be shown again).
    Create {
        /// viewer, operator or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Unique name.
        #[arg(long)]
        name: String,
        /// Replace (revoke) an existing token of that name instead of failing, so the command can be
        /// repeated, e.g. in a new shell.
        #[arg(long)]
        replace: bool,
        /// Limit what it may use beyond its role, repeatable: `action=start_instances,stop_instances`,
        /// `account=prod`, `template=nightly-backup` (each kind: any when not given).
        #[arg(long = "scope", value_name = "KIND=A,B")]
        scopes: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List tokens.
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke a token by name.
    Revoke {
        /// Token name.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Copy a single node's SQLite history (jobs, events, tokens, templates, SNS hooks and
    /// deliveries) into a PostgreSQL database, migrating it first. The source is only read.
    Copy {
        /// The SQLite database: sqlite://PATH.
        #[arg(long)]
        from: String,
        /// The PostgreSQL database: postgres://USER[:PASSWORD]@HOST[:PORT]/DB.
        #[arg(long)]
        to: String,
        /// Copy into a target that already has rows (rows whose key exists are kept as they are).
        #[arg(long)]
        allow_non_empty: bool,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

fn load(config: &ConfigArg, flags: &Overrides) -> anyhow::Result<Config> {
    Config::load(config.config.as_deref(), std::env::vars(), flags)
}

/// The store for token commands. Without `--config` they use only an existing database: a token
/// put into a new `./ec2jobd.db` (the wrong directory, or a forgotten `--config`) could never
/// authenticate against the daemon. With `--config`, a new database is created and said so.
async fn store_for(config: &ConfigArg) -> anyhow::Result<Arc<dyn Store>> {
    let cfg = load(config, &Overrides::default())?;
    if let Some(path) = ec2jobd_store::database_file(&cfg.database) {
        if !path.exists() {
            let path = path.display();
            match &config.config {
                None => bail!(
                    "no database at `{path}` (the built-in `database`; no --config was given): pass \
                     the daemon's --config (e.g. --config config/local.toml)"
                ),
                Some(c) => {
                    let store = app::open_store(&cfg, Arc::new(SystemClock)).await?;
                    // Said once it is true, naming where the value came from.
                    let from = match std::env::var_os("EC2JOBD_DATABASE") {
                        Some(_) => "the environment variable EC2JOBD_DATABASE".to_string(),
                        None => format!("config key `database` of {}", c.display()),
                    };
                    eprintln!(
                        "note: created a new database at `{path}` ({from}); only a daemon using \
                         this database accepts the token"
                    );
                    return Ok(store);
                }
            }
        }
    }
    app::open_store(&cfg, Arc::new(SystemClock)).await
}

/// Who the audit log says changed tokens through `ec2jobd token …` on the host (not over the API).
const CLI_ACTOR: &str = "cli";

/// `--scope KIND=A,B` flags as scopes (kinds: account, action, template).
fn parse_scopes(flags: &[String]) -> anyhow::Result<ec2jobd_store::Scopes> {
    let mut scopes = ec2jobd_store::Scopes::default();
    for f in flags {
        let (kind, list) = f
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--scope `{f}`: write KIND=A,B"))?;
        let into = match kind.trim() {
            "account" | "accounts" => &mut scopes.accounts,
            "action" | "actions" => &mut scopes.actions,
            "template" | "templates" => &mut scopes.templates,
            other => bail!("--scope `{f}`: `{other}` is not account, action or template"),
        };
        into.extend(
            list.split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from),
        );
    }
    Ok(scopes)
}

/// Backups and restores here are of the embedded database; a PostgreSQL one has its own tools.
fn postgres_has_its_own(cfg: &Config, tool: &str) -> anyhow::Result<()> {
    if postgres::is_postgres_url(&cfg.database) {
        bail!(
            "`database` is PostgreSQL ({}): use its own tools, e.g. `{tool}` (README \"Backups and restore\")",
            postgres::redact(&cfg.database)
        );
    }
    Ok(())
}

/// `--actions a,b` as actions (none given: every action).
fn parse_actions(names: &[String]) -> anyhow::Result<Vec<ec2jobd_spec::Action>> {
    if names.is_empty() {
        return Ok(ec2jobd_spec::Action::ALL.to_vec());
    }
    names
        .iter()
        .map(|a| {
            ec2jobd_spec::Action::parse(a.trim())
                .ok_or_else(|| anyhow::anyhow!("--actions: `{a}` is not an action"))
        })
        .collect()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        // `main` runs the client commands itself (they have their own exit codes).
        Cmd::Submit(_)
        | Cmd::Run(_)
        | Cmd::Jobs { .. }
        | Cmd::Schedules { .. }
        | Cmd::Health { .. } => {
            bail!("not a daemon-side command")
        }
        Cmd::Serve {
            config,
            listen,
            database,
            workers,
        } => {
            let cfg = load(
                &config,
                &Overrides {
                    listen,
                    database,
                    workers,
                },
            )?;
            let telemetry = app::init_tracing(&cfg)?;
            let served = app::serve(cfg).await;
            if let Some(t) = telemetry {
                t.shutdown().await;
            }
            served
        }
        Cmd::Migrate { config } => {
            let cfg = load(&config, &Overrides::default())?;
            if postgres::is_postgres_url(&cfg.database) {
                let url = postgres::redact(&cfg.database);
                let pool = postgres::connect(&cfg.database, 1)
                    .await
                    .with_context(|| format!("connecting to {url}"))?;
                let n = postgres::migrate(&pool)
                    .await
                    .with_context(|| format!("migrating {url}"))?;
                eprintln!("{n} migration(s) applied to {url}");
                return Ok(());
            }
            app::open_store(&cfg, Arc::new(SystemClock)).await?;
            eprintln!("migrations applied to {}", postgres::redact(&cfg.database));
            Ok(())
        }
        Cmd::Store {
            cmd:
                StoreCmd::Copy {
                    from,
                    to,
                    allow_non_empty,
                },
        } => {
            if !from.starts_with("sqlite:") || !postgres::is_postgres_url(&to) {
                bail!("store copy goes from sqlite://PATH to postgres://…");
            }
            let url = postgres::redact(&to);
            let pool = postgres::connect(&to, 2)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            let copied = postgres::copy_from_sqlite(&from, &pool, allow_non_empty)
                .await
                .with_context(|| format!("copying {from} into {url}"))?;
            let list: Vec<String> = copied.iter().map(|(t, n)| format!("{n} {t}")).collect();
            eprintln!("copied {} from {from} into {url}", list.join(", "));
            Ok(())
        }
        Cmd::Backup { config, to } => {
            let cfg = load(&config, &Overrides::default())?;
            postgres_has_its_own(&cfg, "pg_dump --format=custom --file=PATH")?;
            let made = ec2jobd_store::backup(&cfg.database, &to)
                .await
                .with_context(|| format!("backing up {}", postgres::redact(&cfg.database)))?;
            let checked = ec2jobd_store::check_backup(&made.path)
                .await
                .with_context(|| format!("checking the backup {}", made.path.display()))?;
            eprintln!(
                "backed up {} job(s) to {} ({} bytes; integrity ok, schema {} migration(s))",
                checked.jobs,
                made.path.display(),
                made.bytes,
                checked.applied
            );
            Ok(())
        }
        Cmd::Restore { config, from } => {
            let cfg = load(&config, &Overrides::default())?;
            postgres_has_its_own(&cfg, "pg_restore --clean --if-exists --dbname=URL PATH")?;
            let done = ec2jobd_store::restore(&cfg.database, &from, chrono::Utc::now())
                .await
                .with_context(|| format!("restoring {}", from.display()))?;
            let aside = done.replaced.map_or_else(
                || "there was no database before".to_string(),
                |p| format!("the replaced database is kept as {}", p.display()),
            );
            eprintln!(
                "restored {} job(s) from {} into {} ({} migration(s) applied); {aside}",
                done.checked.jobs,
                from.display(),
                postgres::redact(&cfg.database),
                done.migrated
            );
            Ok(())
        }
        Cmd::Prune { config, dry_run } => {
            let cfg = load(&config, &Overrides::default())?;
            let store = app::open_store(&cfg, Arc::new(SystemClock)).await?;
            let p = crate::retention::prune_once(
                &*store,
                &SystemClock,
                &cfg.retention,
                dry_run,
                &|_, _| {},
            )
            .await?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            let age = |d: &crate::config::Dur| {
                if d.0.is_zero() {
                    "kept forever".to_string()
                } else {
                    format!("older than {}", humantime::format_duration(d.0))
                }
            };
            println!(
                "{verb} {} finished job(s) ({}) and {} SNS deliveries ({})",
                p.jobs,
                age(&cfg.retention.jobs),
                p.sns_deliveries,
                age(&cfg.retention.sns_deliveries)
            );
            Ok(())
        }
        Cmd::Doctor { config, actions } => {
            let actions = parse_actions(&actions)?;
            let name = config.config.as_ref().map_or_else(
                || "the built-in config".to_string(),
                |p| p.display().to_string(),
            );
            let cfg = match load(&config, &Overrides::default()) {
                Ok(cfg) => cfg,
                Err(e) => {
                    println!("FAIL  config: {name}: {e:#}");
                    println!("      fix: correct the key named (config/default.toml documents every key)");
                    bail!("1 problem found");
                }
            };
            if crate::doctor::run(&cfg, &name, &actions).await {
                Ok(())
            } else {
                bail!("the deployment has problems (above)")
            }
        }
        Cmd::Openapi => {
            println!("{}", ApiDoc::openapi().to_pretty_json()?);
            Ok(())
        }
        Cmd::IamPolicy {
            actions,
            instance_profiles,
            sqs_intake,
        } => {
            let actions = parse_actions(&actions)?;
            let extras = crate::iam::Extras {
                instance_profiles,
                sqs_intake,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::iam::policy(&actions, extras))?
            );
            Ok(())
        }
        Cmd::Token { cmd } => match cmd {
            TokenCmd::Create {
                role,
                name,
                replace,
                scopes,
                config,
            } => {
                if !valid_token_name(&name) {
                    bail!("--name: 1-64 letters, digits, `.`, `_` or `-`");
                }
                let scopes = parse_scopes(&scopes)?;
                let cfg = load(&config, &Overrides::default())?;
                crate::service::tokens::check_scopes(&scopes, |a| cfg.accounts.contains_key(a))
                    .map_err(|m| anyhow::anyhow!("--scope: {m}"))?;
                let store = store_for(&config).await?;
                if replace && store.revoke_token(&name, CLI_ACTOR).await? {
                    eprintln!("revoked the earlier token `{name}`");
                }
                let (token, hash) = new_token();
                store
                    .create_token(&name, role, &hash, &scopes, CLI_ACTOR)
                    .await
                    .context("creating token")?;
                eprintln!("created {role} token `{name}`; it is shown once:");
                println!("{token}");
                Ok(())
            }
            TokenCmd::List { config } => {
                let store = store_for(&config).await?;
                for t in store.list_tokens().await? {
                    let s = &t.scopes;
                    let scopes: Vec<String> = [
                        ("account", &s.accounts),
                        ("action", &s.actions),
                        ("template", &s.templates),
                    ]
                    .into_iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| format!("{k}={}", v.join(",")))
                    .collect();
                    println!(
                        "{}\t{}\t{}\t{}",
                        t.name,
                        t.role,
                        t.created_at.to_rfc3339(),
                        scopes.join(" ")
                    );
                }
                Ok(())
            }
            TokenCmd::Revoke { name, config } => {
                let store = store_for(&config).await?;
                if !store.revoke_token(&name, CLI_ACTOR).await? {
                    bail!("no token named `{name}`");
                }
                eprintln!("revoked token `{name}`");
                Ok(())
            }
        },
    }
}

/// Entry point of the `ec2jobd` binary. Daemon-side commands exit 0 on success and 1 on any error
/// (printed with its causes, e.g. the config key at fault); client commands use the codes of
/// [`crate::client::exit`]; a command line that does not parse exits 3.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Help and version are not errors; bad input is "rejected" like a 4xx.
            return if e.use_stderr() {
                ExitCode::from(crate::client::exit::REJECTED)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        // A printing command whose reader went away (`ec2jobd iam-policy | head`) ends quietly
        // as Unix tools do, not with a panic about a broken pipe. Sockets are unaffected (Rust
        // sends with MSG_NOSIGNAL); the daemon keeps SIGPIPE ignored.
        // SAFETY: sets a signal's disposition to the default before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = match cli.cmd {
        Cmd::Submit(s) => rt.block_on(crate::client::submit(*s)),
        Cmd::Run(r) => rt.block_on(crate::client::run_template(*r)),
        Cmd::Jobs { cmd } => rt.block_on(crate::client::jobs(cmd)),
        Cmd::Schedules { cmd } => rt.block_on(crate::client::schedules(cmd)),
        Cmd::Health { conn } => rt.block_on(crate::client::health(conn)),
        cmd => {
            return match rt.block_on(run(Cli { cmd })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    match client {
        Ok(code) => ExitCode::from(code),
        Err(crate::client::Fail(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn submit_help_names_every_short_action() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("submit")
            .expect("submit")
            .render_long_help()
            .to_string();
        for (short, _) in crate::client::SHORT_ACTIONS {
            assert!(
                help.contains(&format!("`{short}`")),
                "`{short}` is missing from submit --help:\n{help}"
            );
        }
    }
}
