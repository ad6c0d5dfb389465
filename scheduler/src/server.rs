//! Wiring: the shared state, the HTTP server and the background loops (placement, lost-host
//! watch, reconciliation with GitHub, runner clean-up). `Scheduler::start` is shared by
//! `serve` and `up` (the local mode, which runs more next to it in the same process).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::config::ServeArgs;
use crate::github::{GitHub, Removal, RunnerScope};
use crate::joblogs::JobLogs;
use crate::jobs::JobState;
use crate::metrics::Metrics;
use crate::placement;
use crate::runners::Runners;
use crate::secret::Secret;
use crate::store::{self, JobChange, Store};
use crate::webhook::payload::{JobAction, WorkflowJob};

/// After GitHub refuses a JIT config for a job, wait this long before trying that job again.
const JIT_RETRY_DELAY: Duration = Duration::from_secs(30);
/// GitHub lets users redeliver deliveries of the past 3 days; ids are kept a bit longer.
const DELIVERY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Placement also runs on this tick, so capacity freed by anything is used.
const PLACEMENT_TICK: Duration = Duration::from_secs(1);

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub logs: Arc<JobLogs>,
    pub metrics: Metrics,
    pub webhook_secret: Secret,
    pub enroll_secret: Option<Secret>,
    pub label_prefix: String,
    pub runners: Runners,
    pub host_lost_after: Duration,
    /// Wakes the placement loop: a new job or freed capacity.
    pub placement_wake: Notify,
    /// Wakes hosts waiting in long-poll: a job was assigned.
    pub assignments: Notify,
}

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

    /// An in-memory store, webhook secret `s`, no enrollment, no GitHub App, no log directory.
    #[cfg(test)]
    pub fn for_tests() -> Arc<AppState> {
        Arc::new(AppState {
            store: Arc::new(crate::store::SqliteStore::in_memory().unwrap()),
            logs: Arc::new(JobLogs::new("/nonexistent".into())),
            metrics: Metrics::default(),
            webhook_secret: Secret::new("s"),
            enroll_secret: None,
            label_prefix: "hopper".into(),
            runners: Runners::new(None, true),
            host_lost_after: Duration::from_secs(60),
            placement_wake: Notify::new(),
            assignments: Notify::new(),
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
    reconcile_interval: Duration,
}

impl Scheduler {
    /// Opens the store, reads the secrets, builds the GitHub client and binds the listener.
    pub async fn start(args: &ServeArgs) -> anyhow::Result<Scheduler> {
        let store = store::open(args.options.database.as_deref(), &args.data_dir)
            .context("opening the store")?;
        let webhook_secret = Secret::from_file(&args.webhook_secret_file).with_context(|| {
            format!(
                "reading --webhook-secret-file {}",
                args.webhook_secret_file.display()
            )
        })?;
        let enroll_secret = args
            .enroll_secret_file
            .as_deref()
            .map(|p| {
                Secret::from_file(p)
                    .with_context(|| format!("reading --enroll-secret-file {}", p.display()))
            })
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
            label_prefix: options.label_prefix.clone(),
            runners: Runners::new(github, args.local_jobs),
            host_lost_after: options.host_lost_after,
            placement_wake: Notify::new(),
            assignments: Notify::new(),
        });
        Ok(Scheduler {
            state,
            listener,
            reconcile_interval: options.reconcile_interval,
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
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(lost_host_loop(state.clone()));
        tasks.spawn(prune_loop(state.clone()));
        tasks.spawn(placement_loop(state.clone()));
        tasks.spawn(reconcile_loop(state.clone(), self.reconcile_interval));
        let app = crate::api::router(state);
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        tasks.abort_all();
        served.context("HTTP server")
    }
}

/// `hopper-scheduler serve`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let scheduler = Scheduler::start(&args).await?;
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

async fn placement_loop(state: Arc<AppState>) {
    let mut not_before: HashMap<u64, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = state.placement_wake.notified() => {}
            _ = tokio::time::sleep(PLACEMENT_TICK) => {}
        }
        let found = state
            .store(|s| Ok::<_, store::StoreError>((s.jobs(Some(JobState::Queued))?, s.hosts()?)))
            .await;
        let (mut queue, hosts) = match found {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "placement cannot read the store");
                continue;
            }
        };
        let now = Instant::now();
        not_before.retain(|_, t| *t > now);
        // Jobs no runner can be registered for (GitHub's, without an App) take no room.
        queue.retain(|j| !not_before.contains_key(&j.id) && state.runners.can_register(j));
        for (job_id, host_id) in placement::plan(&queue, &hosts) {
            let Some(job) = queue.iter().find(|j| j.id == job_id) else {
                continue;
            };
            let runner_name = format!("hopper-{}-{:04x}", job.id, rand::random::<u16>());
            let grant = match state.runners.register(job, &runner_name).await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(job = job.id, repository = %job.repository, error = %e, "cannot get a runner config; the job stays queued");
                    not_before.insert(job.id, Instant::now() + JIT_RETRY_DELAY);
                    continue;
                }
            };
            let (host, g) = (host_id.clone(), grant.clone());
            match state.store(move |s| s.assign(job_id, &host, &g)).await {
                Ok(true) => {
                    let waited = (crate::now_ms() - job.created_at).max(0) as f64 / 1000.0;
                    state.metrics.queued_to_assigned(waited);
                    tracing::info!(job = job.id, host = %host_id, runner = %grant.runner_name, runner_id = grant.runner_id, "job assigned");
                    state.assignments.notify_waiters();
                }
                Ok(false) => {
                    // The job moved on (completed, cancelled) or its host was lost while we
                    // asked for the runner; if the job is still queued, the next round places
                    // it again.
                    tracing::info!(
                        job = job.id,
                        host = %host_id,
                        "job left the queue or its host was lost during placement; removing its unused runner"
                    );
                    if let Err(e) = state.runners.remove(job, grant.runner_id).await {
                        tracing::warn!(job = job.id, error = %e, "cannot remove unused runner");
                    }
                }
                Err(e) => tracing::error!(job = job.id, error = %e, "cannot record assignment"),
            }
        }
    }
}

async fn lost_host_loop(state: Arc<AppState>) {
    let period = (state.host_lost_after / 4).max(Duration::from_millis(250));
    let lost_after_ms = state.host_lost_after.as_millis() as i64;
    loop {
        tokio::time::sleep(period).await;
        let cutoff = crate::now_ms() - lost_after_ms;
        match state.store(move |s| s.mark_lost(cutoff)).await {
            Ok(lost) => {
                for host in &lost {
                    tracing::warn!(host = %host.host_id, name = %host.name, jobs = ?host.jobs, "host stopped heartbeating: marked lost with its jobs");
                }
                state.metrics.hosts_lost(lost.len() as u64);
            }
            Err(e) => tracing::error!(error = %e, "cannot check for lost hosts"),
        }
    }
}

async fn prune_loop(state: Arc<AppState>) {
    loop {
        let cutoff = crate::now_ms() - DELIVERY_RETENTION.as_millis() as i64;
        match state.store(move |s| s.prune_deliveries(cutoff)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deliveries = n, "forgot delivery ids older than 7 days"),
            Err(e) => tracing::error!(error = %e, "cannot prune delivery ids"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

async fn reconcile_loop(state: Arc<AppState>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        if let Some(github) = state.runners.github() {
            reconcile_with_github(&state, github).await;
        }
        remove_finished_runners(&state).await;
    }
}

/// Catches what webhooks missed: queued jobs GitHub knows and we do not, and jobs we think are
/// pending that GitHub finished.
async fn reconcile_with_github(state: &Arc<AppState>, github: &GitHub) {
    match github.queued_jobs().await {
        Ok(remote) => {
            for (installation_id, repository, rj) in remote {
                let wj = WorkflowJob {
                    action: JobAction::Queued,
                    id: rj.id,
                    run_id: rj.run_id,
                    run_attempt: rj.run_attempt.unwrap_or(1),
                    labels: rj.labels,
                    conclusion: None,
                    repository,
                    installation_id: Some(installation_id),
                };
                let Some(update) = crate::webhook::job_update(&state.label_prefix, wj) else {
                    continue;
                };
                match state.store(move |s| s.apply_update(&update)).await {
                    Ok(JobChange::Created(st)) => {
                        tracing::info!(
                            job = rj.id,
                            state = st.as_str(),
                            "reconciliation found a job the webhooks missed"
                        );
                        state.placement_wake.notify_one();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(job = rj.id, error = %e, "cannot store reconciled job")
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "reconciliation cannot list GitHub's queued jobs"),
    }

    let pending = state
        .store(|s| {
            let mut jobs = Vec::new();
            for st in [JobState::Queued, JobState::Assigned, JobState::Running] {
                jobs.extend(s.jobs(Some(st))?);
            }
            Ok::<_, store::StoreError>(jobs)
        })
        .await;
    let pending = pending.unwrap_or_else(|e| {
        tracing::error!(error = %e, "reconciliation cannot read the store");
        Vec::new()
    });
    // GitHub does not know local jobs (a local-mode data directory served with an App later).
    for job in pending.into_iter().filter(|j| !j.is_local()) {
        let remote = match github.job(&job).await {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(job = job.id, error = %e, "reconciliation cannot read job");
                continue;
            }
        };
        let target = match remote.status.as_str() {
            "completed" => JobState::Completed,
            "in_progress" => JobState::Running,
            _ => continue,
        };
        let update = crate::store::JobUpdate {
            id: job.id,
            run_id: job.run_id,
            run_attempt: job.run_attempt,
            repository: job.repository.clone(),
            installation_id: job.installation_id,
            labels: job.labels.clone(),
            target,
            conclusion: remote.conclusion.clone(),
            shape: job.shape,
            image: job.image.clone(),
            reason: None,
        };
        if let Ok(JobChange::Moved { from, to }) =
            state.store(move |s| s.apply_update(&update)).await
        {
            tracing::info!(
                job = job.id,
                from = from.as_str(),
                to = to.as_str(),
                "reconciliation caught up with GitHub"
            );
        }
    }
}

/// Removes the runner registrations of finished jobs that are still registered.
async fn remove_finished_runners(state: &Arc<AppState>) {
    let finished = state
        .store(|s| s.runners_to_remove())
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "runner cleanup cannot read the store");
            Vec::new()
        });
    for job in finished
        .into_iter()
        .filter(|j| state.runners.can_register(j))
    {
        let Some(runner_id) = job.runner_id else {
            continue;
        };
        match state.runners.remove(&job, runner_id).await {
            Ok(Removal::Gone) => {
                let id = job.id;
                if let Err(e) = state.store(move |s| s.runner_removed(id)).await {
                    tracing::error!(job = id, error = %e, "cannot record runner removal");
                }
            }
            Ok(Removal::Busy) => {
                tracing::debug!(job = job.id, runner_id, "runner still busy; removing later")
            }
            Err(e) => tracing::warn!(job = job.id, runner_id, error = %e, "cannot remove runner"),
        }
    }
}
