//! `hopper-scheduler up`: the whole path on one machine. It serves the scheduler in this
//! process with local defaults (data in `./.hopper`, secrets and the operator token generated
//! there), starts runner hosts as child processes (directly, or inside a nested test host
//! when this machine's KVM cannot run guests), kills those that the chaos API gives a notice
//! when it runs out, prints what happens to hosts and jobs as short lines, and with `--demo`
//! runs a demo. Ctrl-C or SIGTERM stop the runner hosts, then the scheduler.

mod chaos;
mod demo;
mod runner;
mod secrets;
mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use tokio::sync::mpsc;

use crate::config::{RunnerMode, ServeArgs, UpArgs};
use crate::server::{shutdown_signal, AppState, Scheduler};

pub use secrets::create_data_dir;

/// The scheduler's own log in the data directory (the terminal shows progress lines).
pub const SCHEDULER_LOG: &str = "scheduler.log";

/// Prints progress lines with the time since `up` started.
#[derive(Clone, Copy)]
pub(crate) struct Progress {
    started: Instant,
}

impl Progress {
    fn start() -> Self {
        Progress {
            started: Instant::now(),
        }
    }

    pub(crate) fn line(&self, text: impl std::fmt::Display) {
        print(&format!(
            "[{:6.1}s] {text}\n",
            self.started.elapsed().as_secs_f64()
        ));
    }

    /// Milliseconds since the epoch when `up` started: hosts heard from since are alive.
    pub(crate) fn started_ms(&self) -> i64 {
        crate::now_ms() - self.started.elapsed().as_millis() as i64
    }
}

/// Writes to stdout. A closed stdout (`up | head`) is no reason to stop the scheduler, which
/// `println!` would do by panicking.
pub(crate) fn print(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let progress = Progress::start();
    let hosts = args.runner_hosts().map_err(anyhow::Error::msg)?;
    let dir = &args.data_dir;
    let webhook_secret_file =
        secrets::given_or_generated(args.webhook_secret_file.as_deref(), dir, "webhook-secret")?;
    let enroll_secret_file =
        secrets::given_or_generated(args.enroll_secret_file.as_deref(), dir, "enroll-secret")?;
    let operator_token_file =
        secrets::given_or_generated(args.operator_token_file.as_deref(), dir, "operator-token")?;
    let runner_kind = match args.runner {
        RunnerMode::None => None,
        mode => {
            check_reachable_through_loopback(args.listen)?;
            Some(runner::choose(mode, &args)?)
        }
    };
    let serve = ServeArgs {
        listen: args.listen,
        data_dir: dir.clone(),
        webhook_secret_file: webhook_secret_file.clone(),
        enroll_secret_file: Some(enroll_secret_file.clone()),
        operator_token_file: Some(operator_token_file.clone()),
        local_jobs: true,
        options: args.options.clone(),
    };
    let (chaos_kill, notices) = mpsc::unbounded_channel();
    let scheduler = Scheduler::start(&serve, Some(chaos_kill)).await?;
    let addr = scheduler.local_addr()?;
    let state = scheduler.state();
    // The same machine-readable line as `serve`, for scripts and tests that use port 0.
    print(&format!("hopper-scheduler listening on http://{addr}\n"));
    describe_mode(
        &state,
        addr,
        dir,
        &webhook_secret_file,
        &operator_token_file,
        &progress,
    );

    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(scheduler.run(async {
        let _ = stopped.await;
    }));
    let watcher = watch::Watcher::new(state.clone(), progress);
    mark_own_hosts_stopped(&state, &progress).await;
    let mut fleet = match runner_kind {
        Some(kind) => Some(runner::Fleet::start(
            kind,
            &args,
            hosts,
            addr.port(),
            &enroll_secret_file,
            progress,
        )?),
        None => None,
    };
    let (due, mut due_kills) = mpsc::unbounded_channel();
    let own_hosts = if fleet.is_some() { hosts } else { 0 };
    tokio::spawn(chaos::schedule(
        state.clone(),
        notices,
        own_hosts,
        due,
        progress,
    ));
    let (killed, killed_seen) = tokio::sync::watch::channel(Vec::new());

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // Shows progress until stopped; with --demo it ends with the demo.
    let watching = async {
        match args.demo {
            Some(kind) => {
                let shared = demo::Shared {
                    state: state.clone(),
                    watcher,
                    progress,
                    killed: killed_seen,
                };
                demo::run(kind, shared, args.demo_timeout).await
            }
            None => watcher.run().await,
        }
    };
    tokio::pin!(watching);
    let mut server_done = false;
    let outcome = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            Some(due) = due_kills.recv() => {
                if let Some(fleet) = fleet.as_mut() {
                    chaos::kill(fleet, due, &killed, &progress).await;
                }
            }
            failure = fleet_failure(fleet.as_mut()) => break Err(anyhow::anyhow!(failure)),
            result = &mut watching => break result,
            served = &mut server => {
                server_done = true;
                break match served {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the scheduler stopped")),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(anyhow::Error::new(e).context("scheduler task")),
                };
            }
        }
    };

    if let Some(fleet) = fleet {
        fleet.stop(progress).await;
    }
    mark_own_hosts_stopped(&state, &progress).await;
    if !server_done {
        let _ = stop_server.send(());
        server.await.context("scheduler task")??;
    }
    progress.line("stopped");
    outcome
}

/// Resolves when a runner host ends unasked (never without runner hosts), saying how.
async fn fleet_failure(fleet: Option<&mut runner::Fleet>) -> String {
    match fleet {
        Some(f) => f.failure().await,
        None => std::future::pending().await,
    }
}

/// The runner hosts reach the scheduler at 127.0.0.1 (from inside a test host, QEMU's
/// 10.0.2.2 leads there), so the scheduler must listen there.
fn check_reachable_through_loopback(listen: SocketAddr) -> anyhow::Result<()> {
    let ip = listen.ip();
    if ip.is_ipv4() && (ip.is_loopback() || ip.is_unspecified()) {
        return Ok(());
    }
    bail!(
        "--listen {listen}: the runner hosts reach the scheduler at 127.0.0.1, so listen on \
         127.0.0.1 or 0.0.0.0 (or start no runner host: --runner none)"
    )
}

fn describe_mode(
    state: &AppState,
    addr: SocketAddr,
    dir: &Path,
    webhook_secret_file: &Path,
    operator_token_file: &Path,
    progress: &Progress,
) {
    progress.line(format!(
        "scheduler on http://{addr}; data and logs in {} ({SCHEDULER_LOG}; the runner hosts' \
         below)",
        dir.display(),
    ));
    // Where the token is, never the token: this goes to the terminal and to whatever records it.
    let auth = format!(
        "-H \"Authorization: Bearer $(cat {})\"",
        operator_token_file.display()
    );
    progress.line(format!(
        "operator API token in {}: curl {auth} http://{addr}/api/v1/jobs",
        operator_token_file.display()
    ));
    if state.runners.local_mode() {
        progress.line(format!(
            "local mode (no GitHub App): submit jobs with curl {auth} -d '{{\"labels\":[\"{}-1cpu-1gb\"]}}' http://{addr}/api/v1/jobs",
            state.label_prefix
        ));
    } else {
        progress.line(format!(
            "GitHub App mode: point the App's webhook at http://{addr}/webhook (reachable from \
             GitHub: --listen 0.0.0.0:PORT behind HTTPS) with the secret in {}",
            webhook_secret_file.display()
        ));
    }
}

/// Marks the runner hosts `up` starts (named by `runner::host_name`) lost with their jobs: at
/// the start, those of earlier runs, and at the end this run's, as `up` stops them. Otherwise
/// they would look alive for `--host-lost-after`, and jobs could be placed on them; a test
/// host's runners enroll anew each run. A direct runner host keeps its credentials and is back
/// at its next heartbeat. Hosts under other names keep their state.
async fn mark_own_hosts_stopped(state: &Arc<AppState>, progress: &Progress) {
    let result = state
        .store(move |s| {
            let mut stopped = Vec::new();
            for host in s
                .hosts()?
                .into_iter()
                .filter(|h| runner::host_index(&h.name).is_some())
            {
                stopped.extend(s.mark_stopped(&host.id)?);
            }
            Ok::<_, crate::store::StoreError>(stopped)
        })
        .await;
    match result {
        Ok(stopped) => {
            state.metrics.hosts_lost(stopped.len() as u64);
            for host in stopped.iter().filter(|h| !h.jobs.is_empty()) {
                progress.line(format!(
                    "jobs {:?} were lost with runner host {} ({})",
                    host.jobs, host.name, host.host_id
                ));
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot mark stopped runner hosts lost"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_hosts_need_a_loopback_or_wildcard_listener() {
        for ok in ["127.0.0.1:8080", "0.0.0.0:0"] {
            assert!(check_reachable_through_loopback(ok.parse().unwrap()).is_ok());
        }
        for bad in ["192.0.2.1:8080", "[::1]:8080"] {
            assert!(check_reachable_through_loopback(bad.parse().unwrap()).is_err());
        }
    }
}
