//! Runner registrations: the config a placed job's VM starts its runner with, and its removal
//! once the job is over. Which kind a job gets follows from where the job came from:
//! - a GitHub job gets a just-in-time runner from the GitHub App (none without an App: the job
//!   then waits, recorded, as a GitHub job cannot run without GitHub's registration);
//! - a local job (local mode, `POST /api/v1/jobs`) has no repository at GitHub to register a
//!   runner at, so it gets an opaque random config, handled as a secret like a JIT config, and
//!   removing its runner is a no-op.

use std::sync::Arc;

use crate::github::{GitHub, GitHubError, Removal};
use crate::jobs::Job;
use crate::secret::Secret;
use crate::store::RunnerGrant;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    GitHub(#[from] GitHubError),
    #[error("job {0} is GitHub's and no GitHub App is configured")]
    NoApp(u64),
}

pub struct Runners {
    github: Option<Arc<GitHub>>,
    /// Whether jobs may be submitted locally when there is no App (`up`, `serve --local-jobs`).
    local_jobs: bool,
}

impl Runners {
    pub fn new(github: Option<Arc<GitHub>>, local_jobs: bool) -> Self {
        Runners { github, local_jobs }
    }

    pub fn github(&self) -> Option<&Arc<GitHub>> {
        self.github.as_ref()
    }

    /// Local mode: no GitHub App, and local jobs asked for. Jobs are submitted through
    /// `POST /api/v1/jobs` and run with local runner configs; GitHub's webhooks are still
    /// recorded, but not placed.
    pub fn local_mode(&self) -> bool {
        self.github.is_none() && self.local_jobs
    }

    /// Whether a runner can be registered for the job, i.e. whether it can be placed.
    pub fn can_register(&self, job: &Job) -> bool {
        job.is_local() || self.github.is_some()
    }

    pub async fn register(&self, job: &Job, runner_name: &str) -> Result<RunnerGrant, RunnerError> {
        if job.is_local() {
            return Ok(local_grant(job, runner_name));
        }
        let github = self.github.as_ref().ok_or(RunnerError::NoApp(job.id))?;
        Ok(github.generate_jitconfig(job, runner_name).await?)
    }

    pub async fn remove(&self, job: &Job, runner_id: u64) -> Result<Removal, RunnerError> {
        if job.is_local() {
            return Ok(Removal::Gone);
        }
        let github = self.github.as_ref().ok_or(RunnerError::NoApp(job.id))?;
        Ok(github.remove_runner(job, runner_id).await?)
    }
}

/// A local job's runner: numbered like its job (one runner per job, and local job ids are
/// unique), with 32 random bytes as its config. The test image's job entry point only hashes
/// the config; an image that starts GitHub's runner with it fails the job, as it should.
fn local_grant(job: &Job, runner_name: &str) -> RunnerGrant {
    RunnerGrant {
        runner_id: job.id,
        runner_name: runner_name.to_string(),
        jit_config: Secret::new(format!("hlc_{}", hex::encode(rand::random::<[u8; 32]>()))),
    }
}
