//! Deadlines on GitHub: a GitHub that stops answering holds up only what waits for that answer.
//! The real binary against the stand-in of hopper-test-support, a host played by the test.

mod common;

use std::time::Duration;

use common::app::{setup, Setup};
use common::host::HostClient;
use common::{workflow_job, Scheduler};
use serde_json::Value;

const JIT: &str = "/repos/{owner}/{repo}/actions/runners/generate-jitconfig";
const SILENT_REPO: &str = "octo-org/silent";
const WAIT: Duration = Duration::from_secs(30);

/// Delivers job `id` (2 vCPUs, 4 GiB) as queued, from `repository` or the example's own.
async fn queue(s: &Scheduler, id: u64, repository: Option<&str>) {
    let mut job = workflow_job("queued", id, &["hopper-2cpu-4gb"]);
    if let Some(r) = repository {
        job["repository"]["full_name"] = r.into();
    }
    let body = serde_json::to_vec(&job).unwrap();
    let resp = s.deliver("workflow_job", &format!("q-{id}"), &body).await;
    assert_eq!(resp.status(), 200);
}

async fn wait_assigned(s: &Scheduler, id: u64, timeout: Duration) -> Value {
    s.wait_for(&format!("job {id} assigned"), timeout, || async {
        s.job(id).await.filter(|j| j["state"] == "assigned")
    })
    .await
}

/// The log without its colour codes (`serve` writes them even to a file).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// The number of the first log line with `message` about job `id`.
fn line_of(log: &str, message: &str, id: u64) -> Option<usize> {
    let field = format!("job={id} ");
    log.lines()
        .position(|l| l.contains(message) && l.contains(&field))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_github_that_never_answers_delays_only_its_own_jobs_placement() {
    let Setup { s, gh, _dir } = setup(&["--registration-timeout", "5s"]).await;
    gh.state.hang_jit.lock().unwrap().push(SILENT_REPO.into());
    let silent_calls = || {
        gh.requests_to(JIT)
            .iter()
            .filter(|r| r.path.contains(SILENT_REPO))
            .count()
    };
    // Room for two of the jobs.
    let host = HostClient::enroll(&s, "two-jobs", 4, 8192).await;

    // 801 is first in the queue, and GitHub never answers its registration; 802 is placed
    // all the same, without waiting for 801's deadline.
    queue(&s, 801, Some(SILENT_REPO)).await;
    queue(&s, 802, None).await;
    wait_assigned(&s, 802, WAIT).await;
    assert_eq!(s.job(801).await.unwrap()["state"], "queued");
    assert_eq!(silent_calls(), 1, "801's registration is under way");

    // The room planned for 801 stays held while its registration is in flight: 803 gets it
    // only once 801's deadline has passed and 801 is back in the queue.
    queue(&s, 803, None).await;
    wait_assigned(&s, 803, WAIT).await;
    let log = plain(&s.log_text());
    let deadline = line_of(&log, "within the registration deadline", 801)
        .unwrap_or_else(|| panic!("801's deadline is logged:\n{log}"));
    let assigned = |id| {
        line_of(&log, "job assigned", id)
            .unwrap_or_else(|| panic!("{id}'s assignment is logged:\n{log}"))
    };
    assert!(
        assigned(802) < deadline,
        "802 waited for 801's registration:\n{log}"
    );
    assert!(
        deadline < assigned(803),
        "803 took the room held for 801's registration:\n{log}"
    );
    assert_eq!(s.job(801).await.unwrap()["state"], "queued");
    assert_eq!(silent_calls(), 1, "801 is not registered twice meanwhile");

    // Once GitHub answers again and room is free, 801 is placed after the retry delay.
    gh.state.hang_jit.lock().unwrap().clear();
    assert_eq!(host.report(802, "starting").await.status(), 200);
    assert_eq!(host.report(802, "finished").await.status(), 200);
    wait_assigned(&s, 801, Duration::from_secs(60)).await;
    assert_eq!(silent_calls(), 2);
    gh.assert_no_violations();
}
