//! What `up` shows on the terminal: runner hosts coming up, getting a notice, evacuated or
//! lost, and each job's steps (queued, assigned, its VM starting/running/ending, each move to
//! another host, its end), read from the store by the jobs' last change (a step shorter than a
//! look apart is folded into the next).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hopper_api::{Migration, MigrationResult};

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
    migrations: HashMap<u64, MigrationShown>,
    updated_at: i64,
}

/// What was last shown of a migration: its result, and whether the guest's pause with it
/// (the source reports it, before or after the target's commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MigrationShown {
    result: MigrationResult,
    paused: bool,
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
            let (line, shown) = host_change(before, host, self.since, self.last_look);
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
        let name = |id: &str| self.hosts.get(id).map_or("?", |h| h.0.as_str()).to_string();
        for job in &changed {
            let host = job.host_id.as_deref().map_or("?".into(), name);
            let before = self.jobs.remove(&job.id);
            let steps = job_changes(
                before.as_ref().map(|s| (s.state, s.vm)),
                job,
                &host,
                self.since,
            );
            let mut moves = Vec::new();
            let mut migrations = before.map(|s| s.migrations).unwrap_or_default();
            for m in &job.migrations {
                let (lines, shown) = migration_changes(migrations.get(&m.id).copied(), m, &name);
                moves.extend(lines);
                migrations.insert(m.id, shown);
            }
            // A job's end comes after its moves; its other steps come before them.
            let lines = if ended(job) {
                moves.into_iter().chain(steps).collect::<Vec<_>>()
            } else {
                steps.into_iter().chain(moves).collect()
            };
            for line in lines {
                self.progress.line(line);
            }
            let shown = Shown {
                state: job.state,
                vm: job.vm_state,
                migrations,
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

/// A local job is over when completed (its VM finished), failed or lost.
pub(super) fn ended(job: &Job) -> bool {
    matches!(
        job.state,
        JobState::Completed | JobState::Failed | JobState::Lost
    )
}

fn host_change(
    before: HostShown,
    host: &Host,
    since_ms: i64,
    now_ms: i64,
) -> (Option<String>, HostShown) {
    let what = match (before, host.state) {
        (HostShown::NotYet, HostState::Active) if host.last_heartbeat >= since_ms => format!(
            "({}) is up: {} vCPUs, {} MiB for jobs",
            host.id, host.vcpus, host.memory_mb
        ),
        (HostShown::Shown(was), now) if was != now => match now {
            HostState::Active if was == HostState::Lost => "is back".into(),
            HostState::Active => "takes jobs again".into(),
            HostState::AtRisk => "is at risk: no new jobs go there".into(),
            HostState::Reclaiming => match host.deadline {
                Some(deadline) => format!(
                    "got a termination notice: it goes in {} s; its jobs move to other hosts",
                    ((deadline - now_ms).max(0) as u64).div_ceil(1000)
                ),
                None => "is draining: its jobs move to other hosts".into(),
            },
            HostState::Evacuated => "is evacuated: none of its jobs is left on it".into(),
            HostState::Lost => "is lost".into(),
        },
        _ => return (None, before),
    };
    let line = format!("runner host {} {what}", host.name);
    (Some(line), HostShown::Shown(host.state))
}

/// One line per step of a migration since `before` (nothing shown yet: its start, then where
/// it is): its start, its success (with the guest's pause once known, on a line of its own if
/// it comes later), or its failure. Hosts are named by `name`.
fn migration_changes(
    before: Option<MigrationShown>,
    m: &Migration,
    name: &dyn Fn(&str) -> String,
) -> (Vec<String>, MigrationShown) {
    let job = m.job_id;
    let (from, to) = (name(&m.from), name(&m.to));
    let shown = MigrationShown {
        result: m.result,
        paused: m.paused_ms.is_some(),
    };
    let mut out = Vec::new();
    if before.is_none() {
        out.push(format!(
            "job {job}: moving from {from} to {to} ({}, migration {})",
            m.mode.as_str(),
            m.id
        ));
    }
    let was = before.map(|b| b.result);
    match m.result {
        MigrationResult::Succeeded if was != Some(MigrationResult::Succeeded) => {
            out.push(match handover(m) {
                Some(h) => format!("job {job}: moved to {to}: {h}"),
                None => format!("job {job}: moved to {to}"),
            });
        }
        MigrationResult::Succeeded if before.is_some_and(|b| !b.paused) => {
            out.extend(handover(m).map(|h| format!("job {job}: its move to {to}: {h}")));
        }
        MigrationResult::Failed if was != Some(MigrationResult::Failed) => {
            out.push(format!(
                "job {job}: its move to {to} failed: {}",
                m.message.as_deref().unwrap_or("no reason given")
            ));
        }
        _ => {}
    }
    (out, shown)
}

/// What a migration's handover cost, once its source has said: the guest's pause, and the
/// whole move's time and bytes.
pub(super) fn handover(m: &Migration) -> Option<String> {
    let paused = m.paused_ms?;
    let all = match (m.total_ms, m.bytes) {
        (Some(total), Some(bytes)) => format!(
            " ({:.1} s and {:.1} MiB in all)",
            total as f64 / 1000.0,
            bytes as f64 / f64::from(1 << 20)
        ),
        _ => String::new(),
    };
    Some(format!("guest paused {paused} ms{all}"))
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

    #[test]
    fn each_change_of_a_host_is_shown_once() {
        let mut host = Host {
            id: "h-1".into(),
            name: "hopper-up".into(),
            vcpus: 2,
            memory_mb: 4096,
            labels: vec![],
            address: "127.0.0.1".into(),
            state: HostState::Active,
            deadline: None,
            enrolled_at: 0,
            last_heartbeat: 10,
            used_vcpus: 0,
            used_memory_mb: 0,
        };
        let now = 1_000_000;
        let mut shown = HostShown::NotYet;
        let mut step = |host: &Host| {
            let (line, after) = host_change(shown, host, 5, now);
            shown = after;
            line
        };
        assert_eq!(
            step(&host).as_deref(),
            Some("runner host hopper-up (h-1) is up: 2 vCPUs, 4096 MiB for jobs")
        );
        assert_eq!(step(&host), None);
        host.state = HostState::Reclaiming;
        host.deadline = Some(now + 119_400);
        assert_eq!(
            step(&host).as_deref(),
            Some(
                "runner host hopper-up got a termination notice: it goes in 120 s; its jobs \
                 move to other hosts"
            )
        );
        assert_eq!(step(&host), None);
        host.state = HostState::Evacuated;
        assert_eq!(
            step(&host).as_deref(),
            Some("runner host hopper-up is evacuated: none of its jobs is left on it")
        );
        host.state = HostState::Lost;
        assert_eq!(
            step(&host).as_deref(),
            Some("runner host hopper-up is lost")
        );
        host.state = HostState::Active;
        assert_eq!(
            step(&host).as_deref(),
            Some("runner host hopper-up is back")
        );
        host.state = HostState::Reclaiming;
        host.deadline = None;
        assert_eq!(
            step(&host).as_deref(),
            Some("runner host hopper-up is draining: its jobs move to other hosts")
        );

        // A host of an earlier run, silent since `up` started, is not shown.
        host.state = HostState::Active;
        host.last_heartbeat = 4;
        assert_eq!(host_change(HostShown::NotYet, &host, 5, now).0, None);
    }

    #[test]
    fn each_step_of_a_migration_is_shown_once() {
        let mut m = Migration {
            id: 7,
            job_id: 9,
            from: "h-a".into(),
            to: "h-b".into(),
            mode: hopper_api::MigrationMode::Precopy,
            result: MigrationResult::Preparing,
            paused_ms: None,
            total_ms: None,
            bytes: None,
            message: None,
            started_at: 0,
            ended_at: None,
        };
        let name = |id: &str| id.trim_start_matches("h-").to_string();
        let mut shown = None;
        let mut step = |m: &Migration| {
            let (lines, after) = migration_changes(shown, m, &name);
            shown = Some(after);
            lines
        };
        assert_eq!(
            step(&m),
            ["job 9: moving from a to b (precopy, migration 7)"]
        );
        m.result = MigrationResult::Sending;
        assert!(step(&m).is_empty());
        // The target's commit before the source's figures.
        m.result = MigrationResult::Succeeded;
        assert_eq!(step(&m), ["job 9: moved to b"]);
        (m.paused_ms, m.total_ms, m.bytes) = (Some(42), Some(3140), Some(12 << 20));
        assert_eq!(
            step(&m),
            ["job 9: its move to b: guest paused 42 ms (3.1 s and 12.0 MiB in all)"]
        );
        assert!(step(&m).is_empty());

        // Started and ended between two looks, the figures first.
        assert_eq!(
            migration_changes(None, &m, &name).0,
            [
                "job 9: moving from a to b (precopy, migration 7)",
                "job 9: moved to b: guest paused 42 ms (3.1 s and 12.0 MiB in all)"
            ]
        );
        m.result = MigrationResult::Failed;
        m.message = Some("the target did not answer".into());
        let listening = MigrationShown {
            result: MigrationResult::Listening,
            paused: false,
        };
        let (lines, failed) = migration_changes(Some(listening), &m, &name);
        assert_eq!(
            lines,
            ["job 9: its move to b failed: the target did not answer"]
        );
        assert!(migration_changes(Some(failed), &m, &name).0.is_empty());
    }
}
