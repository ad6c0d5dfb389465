//! Chaos in local mode: a runner host of `up`'s that gets a notice through the chaos API
//! (`POST /api/v1/hosts/{id}/interrupt`, or `--demo evacuate`) is killed when the notice runs
//! out, as its cloud would take it: its daemon and its VMs at once, no clean stop. Hosts that
//! `up` did not start are only told of the notice.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::runner::{host_index, Fleet};
use super::Progress;
use crate::server::AppState;

/// A runner host whose notice has run out.
#[derive(Debug, PartialEq, Eq)]
pub struct DueKill {
    /// Which of `up`'s runner hosts (see `runner::host_name`).
    pub index: usize,
    pub host_id: String,
    pub name: String,
    pub notice: Duration,
}

/// Hears of chaos notices (`AppState::chaos_kill`); those of the first `hosts` of `up`'s
/// runner hosts go on `due` once they have run out, told by their names at the scheduler.
pub async fn schedule(
    state: Arc<AppState>,
    mut notices: mpsc::UnboundedReceiver<(String, Duration)>,
    hosts: usize,
    due: mpsc::UnboundedSender<DueKill>,
    progress: Progress,
) {
    while let Some((host_id, notice)) = notices.recv().await {
        let id = host_id.clone();
        let name = match state.store(move |s| s.host(&id)).await {
            Ok(host) => host.map(|h| h.name),
            Err(e) => {
                tracing::error!(error = %e, host = %host_id, "chaos: cannot read the host");
                None
            }
        };
        // The route found it a moment ago: hosts are never removed.
        let Some(name) = name else { continue };
        let seconds = notice.as_secs();
        let Some(index) = host_index(&name).filter(|i| *i < hosts) else {
            progress.line(format!(
                "chaos: {name} gets a {seconds} s notice; `up` did not start it, so nothing \
                 kills it when the notice runs out"
            ));
            continue;
        };
        progress.line(format!(
            "chaos: runner host {name} gets a {seconds} s notice; it is killed when the notice \
             runs out"
        ));
        let due = due.clone();
        tokio::spawn(async move {
            tokio::time::sleep(notice).await;
            let _ = due.send(DueKill {
                index,
                host_id,
                name,
                notice,
            });
        });
    }
}

/// Kills a runner host whose notice ran out, says so, and adds it to `killed` (whether the
/// kill worked or not: whoever waits for it learns the outcome from the line).
pub async fn kill(
    fleet: &mut Fleet,
    due: DueKill,
    killed: &watch::Sender<Vec<String>>,
    progress: &Progress,
) {
    match fleet.kill(due.index).await {
        Ok(()) => progress.line(format!(
            "chaos: runner host {} killed at the end of its {} s notice",
            due.name,
            due.notice.as_secs()
        )),
        Err(e) => progress.line(format!(
            "chaos: cannot kill runner host {}: {e:#}",
            due.name
        )),
    }
    killed.send_modify(|k| k.push(due.host_id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewHost;

    #[tokio::test]
    async fn only_up_s_own_hosts_are_killed_when_their_notice_runs_out() {
        let state = AppState::for_tests();
        let mut ids = Vec::new();
        for name in ["spot-a", "hopper-up-1", "hopper-up-2"] {
            let host = NewHost {
                name: name.into(),
                vcpus: 2,
                memory_mb: 2048,
                labels: vec![],
                address: "a".into(),
                // The store keeps no request.
                csr: String::new(),
            };
            let id = crate::store::new_host_id();
            let enrolled = state.store.enroll_host(&id, &host, name.as_bytes());
            ids.push(enrolled.unwrap().id);
        }
        let (notify, notices) = mpsc::unbounded_channel();
        let (due_tx, mut due) = mpsc::unbounded_channel();
        // Two hosts: hopper-up and hopper-up-1.
        tokio::spawn(schedule(state, notices, 2, due_tx, Progress::start()));
        let notice = Duration::from_millis(300);
        for id in &ids {
            notify.send((id.clone(), notice)).unwrap();
        }
        notify.send(("h-unknown".into(), notice)).unwrap();
        let sent = tokio::time::Instant::now();
        let first = due.recv().await.unwrap();
        assert!(sent.elapsed() >= notice, "killed before the notice ran out");
        assert_eq!(
            first,
            DueKill {
                index: 1,
                host_id: ids[1].clone(),
                name: "hopper-up-1".into(),
                notice,
            }
        );
        let more = tokio::time::timeout(notice * 2, due.recv()).await;
        assert!(more.is_err(), "another kill: {more:?}");
    }
}
