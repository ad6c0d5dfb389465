//! Wiring: the shared state, the HTTP server, and the background duties (`duties`) started
//! next to it. `Scheduler::start` is shared by `serve` and `up` (the local mode, which runs
//! more next to it in the same process).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::config::ServeArgs;
use crate::duties;
use crate::fleet_ca::FleetCa;
use crate::github::{GitHub, RunnerScope};
use crate::joblogs::JobLogs;
use crate::metrics::Metrics;
use crate::runners::Runners;
use crate::secret::Secret;
use crate::store::{self, Store};

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub logs: Arc<JobLogs>,
    pub metrics: Metrics,
    pub webhook_secret: Secret,
    pub enroll_secret: Option<Secret>,
    /// Without it the operator API is off (`api::auth::Operator`).
    pub operator_token: Option<Secret>,
    pub label_prefix: String,
    pub runners: Runners,
    pub host_lost_after: Duration,
    /// Signs the hosts' certificates for mutual TLS between them.
    pub fleet_ca: FleetCa,
    /// Wakes the placement loop: a new job or freed capacity.
    pub placement_wake: Notify,
    /// Wakes hosts waiting in long-poll: a job was assigned, or a migration ordered.
    pub assignments: Notify,
    /// Wakes the evacuation loop: a notice, a drain, a migration that ended.
    pub evacuation_wake: Notify,
    /// Local mode: where a chaos notice's host is sent to be killed when the notice runs out.
    pub chaos_kill: Option<ChaosKill>,
}

/// A chaos notice's host id and notice, for whoever kills hosts (`up`).
pub type ChaosKill = tokio::sync::mpsc::UnboundedSender<(String, Duration)>;

impl AppState {
    /// Runs a blocking store call off the async workers.
    pub async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> T + Send + 'static,
    ) -> T {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .expect("store calls do not panic")
    }

    #[cfg(test)]
    pub const TEST_OPERATOR_TOKEN: &str = "op";

    /// An in-memory store, webhook secret `s`, no enrollment, operator token
    /// [`Self::TEST_OPERATOR_TOKEN`], no GitHub App, no log directory.
    #[cfg(test)]
    pub fn for_tests() -> Arc<AppState> {
        Arc::new(AppState {
            store: Arc::new(crate::store::SqliteStore::in_memory().unwrap()),
            logs: Arc::new(JobLogs::new("/nonexistent".into())),
            metrics: Metrics::default(),
            webhook_secret: Secret::new("s"),
            enroll_secret: None,
            operator_token: Some(Secret::new(Self::TEST_OPERATOR_TOKEN)),
            label_prefix: "hopper".into(),
            runners: Runners::new(None, true),
            host_lost_after: Duration::from_secs(60),
            fleet_ca: FleetCa::generate(Duration::from_secs(24 * 3600)).unwrap(),
            placement_wake: Notify::new(),
            assignments: Notify::new(),
            evacuation_wake: Notify::new(),
            chaos_kill: None,
        })
    }

    /// Runs blocking work on the job logs (file I/O, redaction) off the async workers.
    pub async fn logs<T: Send + 'static>(
        &self,
        f: impl FnOnce(&JobLogs) -> T + Send + 'static,
    ) -> T {
        let logs = self.logs.clone();
        tokio::task::spawn_blocking(move || f(&logs))
            .await
            .expect("job log calls do not panic")
    }
}

pub struct Scheduler {
    state: Arc<AppState>,
    listener: TcpListener,
    timing: duties::Timing,
}

impl Scheduler {
    /// Opens the store, reads the secrets, builds the GitHub client and binds the listener.
    /// `chaos_kill`: see [`AppState::chaos_kill`].
    pub async fn start(
        args: &ServeArgs,
        chaos_kill: Option<ChaosKill>,
    ) -> anyhow::Result<Scheduler> {
        let store = store::open(args.options.database.as_deref(), &args.data_dir)
            .context("opening the store")?;
        let webhook_secret = read_secret(&args.webhook_secret_file, "--webhook-secret-file")?;
        let enroll_secret = args
            .enroll_secret_file
            .as_deref()
            .map(|p| read_secret(p, "--enroll-secret-file"))
            .transpose()?;
        let operator_token = args
            .operator_token_file
            .as_deref()
            .map(|p| read_secret(p, "--operator-token-file"))
            .transpose()?;
        let options = &args.options;
        let github = match (options.app_id, &options.app_private_key) {
            (Some(app_id), Some(key_file)) => {
                let pem = std::fs::read(key_file)
                    .with_context(|| format!("reading --app-private-key {}", key_file.display()))?;
                let scope = if options.org_runners {
                    RunnerScope::Organization
                } else {
                    RunnerScope::Repository
                };
                Some(Arc::new(GitHub::new(
                    &options.github_api_url,
                    app_id,
                    &pem,
                    scope,
                    options.runner_group_id,
                )?))
            }
            _ => None,
        };
        // In --data-dir even when --database puts the store elsewhere, like the logs.
        let fleet_ca = FleetCa::load_or_create(
            &args.data_dir,
            Duration::from_secs(options.host_cert_validity_hours * 3600),
        )
        .context("loading the fleet CA")?;
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let state = Arc::new(AppState {
            store,
            // In --data-dir even when --database puts the store elsewhere: logs are files.
            logs: Arc::new(JobLogs::new(args.data_dir.join("logs"))),
            metrics: Metrics::default(),
            webhook_secret,
            enroll_secret,
            operator_token,
            label_prefix: options.label_prefix.clone(),
            runners: Runners::new(github, args.local_jobs),
            host_lost_after: options.host_lost_after,
            fleet_ca,
            placement_wake: Notify::new(),
            assignments: Notify::new(),
            evacuation_wake: Notify::new(),
            chaos_kill,
        });
        Ok(Scheduler {
            state,
            listener,
            timing: duties::Timing {
                reconcile_interval: options.reconcile_interval,
                registration_timeout: options.registration_timeout,
            },
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The state the routes and loops share, for what runs beside them (`up`).
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state;
        if state.runners.local_mode() {
            tracing::warn!("no GitHub App configured (--app-id, --app-private-key): local mode; jobs submitted to POST /api/v1/jobs run, GitHub's are recorded but not placed");
        } else if state.runners.github().is_none() {
            tracing::warn!("no GitHub App configured (--app-id, --app-private-key) and no --local-jobs: jobs are recorded but none is placed");
        }
        if state.enroll_secret.is_none() {
            tracing::warn!("no --enroll-secret-file: runner hosts cannot enroll");
        }
        if state.operator_token.is_none() {
            tracing::warn!("no --operator-token-file: the operator API (jobs, their logs, hosts, metrics) is off and answers 401");
        }
        let mut tasks = tokio::task::JoinSet::new();
        duties::spawn_all(&mut tasks, &state, self.timing);
        let app = crate::api::router(state);
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        tasks.abort_all();
        served.context("HTTP server")
    }
}

/// The secret file given with `flag`.
fn read_secret(path: &Path, flag: &str) -> anyhow::Result<Secret> {
    Secret::from_file(path).with_context(|| format!("reading {flag} {}", path.display()))
}

/// `hopper-scheduler serve`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let scheduler = Scheduler::start(&args, None).await?;
    let addr = scheduler.local_addr()?;
    tracing::info!(%addr, "hopper-scheduler listening");
    // Machine-readable line for scripts and tests that listen on port 0.
    println!("hopper-scheduler listening on http://{addr}");
    scheduler.run(shutdown_signal()).await
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
