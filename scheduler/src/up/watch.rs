//! What `up` shows on the terminal: runner hosts coming up or lost, and each job's steps
//! (queued, assigned, its VM starting/running/ending, its end), read from the store by the
//! jobs' last change (a step shorter than a look apart is folded into the next).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::Progress;
use crate::jobs::{Job, JobState, VmState};
use crate::server::AppState;
use crate::store::{Host, HostState, StoreError};

/// Often enough to show short steps, cheap for SQLite.
const PERIOD: Duration = Duration::from_millis(250);
/// Each look reads the changes of this long before the previous one as well: a change may be
/// committed after a look with a time stamped before it.
const OVERLAP_MS: i64 = 5_000;

/// What was last shown of a job, and when the job last changed.
struct Shown {
    state: JobState,
    vm: Option<VmState>,
    updated_at: i64,
}

/// What was last shown of a host: nothing until it talks to this run's scheduler (hosts of
/// earlier runs stay in the store), then its state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostShown {
    NotYet,
    Shown(HostState),
}

/// Shows what changes, look after look. `run` goes on forever; `until` stops at a condition,
/// so that whoever waits for something (the demo) acts after it was shown, never before.
pub struct Watcher {
    state: Arc<AppState>,
    progress: Progress,
    /// When `up` started: hosts heard from since are alive; jobs changed before are old news.
    since: i64,
    last_look: i64,
    hosts: HashMap<String, (String, HostShown)>,
    jobs: HashMap<u64, Shown>,
}

impl Watcher {
    pub fn new(state: Arc<AppState>, progress: Progress) -> Self {
        let since = progress.started_ms();
        Watcher {
            state,
            progress,
            since,
            last_look: since,
            hosts: HashMap::new(),
            jobs: HashMap::new(),
        }
    }

    pub async fn run(mut self) -> anyhow::Result<()> {
        self.until(|_, _| None::<()>).await;
        Ok(())
    }

    /// Looks until `done` finds what it waits for among the hosts heard from since `up`
    /// started and the jobs that changed in the last look, after they were shown.
    pub async fn until<T>(&mut self, done: impl Fn(&[Host], &[Job]) -> Option<T>) -> T {
        loop {
            match self.look().await {
                Ok((hosts, jobs)) => {
                    let alive: Vec<Host> = hosts
                        .into_iter()
                        .filter(|h| h.state == HostState::Active && h.last_heartbeat >= self.since)
                        .collect();
                    if let Some(found) = done(&alive, &jobs) {
                        return found;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the store to show progress"),
            }
            tokio::time::sleep(PERIOD).await;
        }
    }

    /// Reads the hosts and the jobs changed since the last look, and shows what is new.
    async fn look(&mut self) -> Result<(Vec<Host>, Vec<Job>), StoreError> {
        let from = self.last_look - OVERLAP_MS;
        self.last_look = crate::now_ms();
        let (hosts, changed) = self
            .state
            .store(move |s| Ok::<_, StoreError>((s.hosts()?, s.jobs_updated_since(from)?)))
            .await?;
        for host in &hosts {
            let before = self.hosts.get(&host.id).map_or(HostShown::NotYet, |h| h.1);
            let (line, shown) = host_change(before, host, self.since);
            if let Some(line) = line {
                self.progress.line(line);
            }
            self.hosts
                .insert(host.id.clone(), (host.name.clone(), shown));
        }
        let changed: Vec<Job> = changed
            .into_iter()
            .filter(|j| j.updated_at >= self.since)
            .collect();
        for job in &changed {
            let host = job.host_id.as_ref().and_then(|id| self.hosts.get(id));
            let host = host.map_or("?", |h| h.0.as_str());
            let before = self.jobs.get(&job.id).map(|s| (s.state, s.vm));
            for line in job_changes(before, job, host, self.since) {
                self.progress.line(line);
            }
            let shown = Shown {
                state: job.state,
                vm: job.vm_state,
                updated_at: job.updated_at,
            };
            self.jobs.insert(job.id, shown);
        }
        // A completed job changes no more: forgotten once out of the window read again, so it
        // is never shown twice. Others may still move (GitHub completes failed and lost jobs).
        self.jobs
            .retain(|_, s| s.state != JobState::Completed || s.updated_at >= from);
        Ok((hosts, changed))
    }
}

fn host_change(before: HostShown, host: &Host, since_ms: i64) -> (Option<String>, HostShown) {
    let line = match (before, host.state) {
        (HostShown::NotYet, HostState::Active) if host.last_heartbeat >= since_ms => {
            format!(
                "runner host {} ({}) is up: {} vCPUs, {} MiB for jobs",
                host.name, host.id, host.vcpus, host.memory_mb
            )
        }
        (HostShown::Shown(HostState::Lost), HostState::Active) => {
            format!("runner host {} is back", host.name)
        }
        (HostShown::Shown(HostState::Active), HostState::Lost) => {
            format!("runner host {} is lost", host.name)
        }
        _ => return (None, before),
    };
    (Some(line), HostShown::Shown(host.state))
}

/// One line per step the job took since `before` (its state and VM state as last shown;
/// nothing shown yet: its current state, after its `queued` if it was created since `since_ms`
/// and assigned since).
fn job_changes(
    before: Option<(JobState, Option<VmState>)>,
    job: &Job,
    host_name: &str,
    since_ms: i64,
) -> Vec<String> {
    let id = job.id;
    let line = |state: JobState| {
        let detail = match state {
            JobState::Queued => format!("{} ({})", job.labels.join(", "), job.repository),
            JobState::Assigned => format!("to runner host {host_name}"),
            JobState::Completed => job.conclusion.clone().unwrap_or_default(),
            _ => job.reason.clone().unwrap_or_default(),
        };
        let state = state.as_str();
        if detail.is_empty() {
            format!("job {id}: {state}")
        } else {
            format!("job {id}: {state} {detail}")
        }
    };
    let mut out = Vec::new();
    // A new job placed between two looks was queued first.
    let placed_unseen = before.is_none() && job.created_at >= since_ms;
    if placed_unseen && job.state != JobState::Queued && job.assigned_at.is_some() {
        out.push(line(JobState::Queued));
    }
    let state = (before.map(|b| b.0) != Some(job.state)).then(|| line(job.state));
    let vm = job
        .vm_state
        .filter(|vm| before.and_then(|b| b.1) != Some(*vm))
        .map(|vm| format!("job {id}: VM {}", vm.as_str()));
    // The assignment comes before the VM; later states follow from the VM's reports.
    if job.state == JobState::Assigned {
        out.extend(state.into_iter().chain(vm));
    } else {
        out.extend(vm.into_iter().chain(state));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job can be quiet longer than the window each look reads (a VM booting): it must not
    /// be shown as new when it moves again.
    #[tokio::test]
    async fn a_quiet_job_is_remembered_until_it_completes() {
        let state = AppState::for_tests();
        let mut watcher = Watcher::new(state.clone(), Progress::start());
        let submission = crate::localjobs::Submission {
            labels: vec!["hopper-1cpu-1gb".into()],
            repository: "local/demo".into(),
            run: None,
        };
        let update = crate::localjobs::job_update("hopper", submission).unwrap();
        let job = state.store.create_local_job(&update, None).unwrap();
        watcher.look().await.unwrap();
        // The next look as if a minute had passed without a change.
        watcher.last_look += 60_000;
        watcher.look().await.unwrap();
        assert!(watcher.jobs.contains_key(&job.id));

        let done = crate::store::JobUpdate {
            id: job.id,
            target: JobState::Completed,
            ..update
        };
        state.store.apply_update(&done).unwrap();
        watcher.look().await.unwrap();
        watcher.last_look += 60_000;
        watcher.look().await.unwrap();
        assert!(watcher.jobs.is_empty());
    }

    #[test]
    fn each_step_of_a_job_is_shown_once_in_order() {
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": 9_000_000_000_000_001u64, "run_id": 1, "run_attempt": 1,
            "repository": "local/demo", "installation_id": null, "labels": ["hopper-1cpu-1gb"],
            "state": "queued", "conclusion": null, "shape": null, "image": null, "reason": null,
            "host_id": null, "runner_id": null, "runner_name": null, "vm_state": null,
            "created_at": 0, "assigned_at": null, "updated_at": 0
        }))
        .unwrap();
        assert_eq!(
            job_changes(None, &job, "h", 0),
            ["job 9000000000000001: queued hopper-1cpu-1gb (local/demo)"]
        );
        let before = (JobState::Running, Some(VmState::Running));
        job.state = JobState::Completed;
        job.vm_state = Some(VmState::Finished);
        job.conclusion = Some("success".into());
        assert_eq!(
            job_changes(Some(before), &job, "h", 0),
            [
                "job 9000000000000001: VM finished",
                "job 9000000000000001: completed success"
            ]
        );
        assert!(job_changes(Some((job.state, job.vm_state)), &job, "h", 0).is_empty());

        // Placed and started between two looks: queued, assigned, then its VM.
        job.state = JobState::Assigned;
        job.vm_state = Some(VmState::Starting);
        job.assigned_at = Some(1);
        assert_eq!(
            job_changes(None, &job, "h", 0),
            [
                "job 9000000000000001: queued hopper-1cpu-1gb (local/demo)",
                "job 9000000000000001: assigned to runner host h",
                "job 9000000000000001: VM starting"
            ]
        );
    }
}
