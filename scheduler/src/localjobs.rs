//! Job submission in local mode (no GitHub App): a job asked for by `POST /api/v1/jobs` or
//! `hopper-scheduler up --demo` enters the store exactly as a queued `workflow_job` would, with
//! the same label grammar, shape and image, and an id of its own range
//! (`jobs::LOCAL_JOB_ID_BASE`). Unlike a webhook, the submitter is there to read an error, so
//! labels that cannot run are refused and nothing is stored.

use serde::Deserialize;
use utoipa::openapi::schema::{Array, ArrayBuilder, ObjectBuilder, Type};
use utoipa::ToSchema;

use crate::jobs::{Job, JobState};
use crate::labels::{classify, LabelMatch};
use crate::server::AppState;
use crate::store::{JobUpdate, StoreError};

/// The repository a submission names when it names none (shown to the job as
/// `HOPPER_REPOSITORY`).
pub const DEFAULT_REPOSITORY: &str = "local/jobs";
/// GitHub gives a runner at most 100 labels; a local job keeps to the same.
const MAX_LABELS: usize = 100;
const MAX_LABEL_LEN: usize = 128;
/// The longest `run` script taken.
pub const MAX_SCRIPT_BYTES: usize = 64 << 10;

/// The body of `POST /api/v1/jobs`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// `runs-on` labels, e.g. `["hopper-1cpu-1gb"]`.
    #[schema(schema_with = labels_schema)]
    pub labels: Vec<String>,
    /// "owner/name", for the job's information only (it sees it as `HOPPER_REPOSITORY`).
    #[serde(default = "default_repository")]
    #[schema(default = default_repository)]
    pub repository: String,
    /// A shell script to run as root in the job's VM instead of a GitHub runner (at most 64
    /// KiB). Its output is the job log, its exit status the job's result.
    #[serde(default)]
    #[schema(max_length = 65536, example = "echo hello from a Hopper microVM")]
    pub run: Option<String>,
}

/// The schema of [`Submission::labels`], with the limits [`job_update`] checks.
fn labels_schema() -> Array {
    let label = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_LABEL_LEN))
        .pattern(Some(r"^\S+$"));
    ArrayBuilder::new()
        .items(label)
        .min_items(Some(1))
        .max_items(Some(MAX_LABELS))
        .description(Some(
            "`runs-on` labels; one must name Hopper (`hopper`, `hopper-<N>cpu-<M>gb`, \
             `hopper-<image>` with the default label prefix)",
        ))
        .examples([serde_json::json!(["hopper-1cpu-1gb"])])
        .build()
}

fn default_repository() -> String {
    DEFAULT_REPOSITORY.to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks a submission and turns it into the update a queued webhook would make (its id is
/// given by the store).
pub fn job_update(prefix: &str, sub: Submission) -> Result<JobUpdate, SubmitError> {
    let invalid = |msg: String| Err(SubmitError::Invalid(msg));
    if sub.labels.is_empty() || sub.labels.len() > MAX_LABELS {
        return invalid(format!("a job needs 1 to {MAX_LABELS} labels"));
    }
    // Labels reach the guest space-separated (HOPPER_JOB_LABELS).
    if let Some(bad) = sub.labels.iter().find(|l| {
        l.is_empty()
            || l.len() > MAX_LABEL_LEN
            || l.chars().any(|c| c.is_whitespace() || c.is_control())
    }) {
        return invalid(format!(
            "invalid label {bad:?}: 1 to {MAX_LABEL_LEN} characters, no spaces"
        ));
    }
    if crate::github::split_repository(&sub.repository).is_err() {
        return invalid(format!(
            "invalid repository {:?}: expected owner/name",
            sub.repository
        ));
    }
    let spec = match classify(prefix, &sub.labels) {
        LabelMatch::Hopper(spec) => spec,
        LabelMatch::NotHopper => {
            return invalid(format!(
                "no Hopper label in {:?}: a job needs `{prefix}` or `{prefix}-<N>cpu-<M>gb` \
                 (and at most one `{prefix}-<image>`)",
                sub.labels
            ))
        }
        LabelMatch::Invalid(reason) => return invalid(reason),
    };
    Ok(JobUpdate {
        id: 0,
        run_id: 0,
        run_attempt: 1,
        repository: sub.repository,
        installation_id: None,
        labels: sub.labels,
        target: JobState::Queued,
        conclusion: None,
        shape: Some(spec.shape),
        image: Some(spec.image),
        reason: None,
    })
}

/// Stores a submitted job, queued, and wakes placement. The caller checks local mode.
pub async fn submit(state: &AppState, mut sub: Submission) -> Result<Job, SubmitError> {
    let script = sub.run.take();
    if let Some(s) = &script {
        if s.is_empty() || s.len() > MAX_SCRIPT_BYTES || s.contains('\0') {
            return Err(SubmitError::Invalid(format!(
                "run must be a script of 1 to {MAX_SCRIPT_BYTES} bytes without NUL"
            )));
        }
    }
    let update = job_update(&state.label_prefix, sub)?;
    let job = state
        .store(move |s| s.create_local_job(&update, script.as_deref()))
        .await?;
    tracing::info!(job = job.id, repository = %job.repository, labels = ?job.labels, "local job submitted");
    state.placement_wake.notify_one();
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(labels: &[&str]) -> Submission {
        Submission {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            repository: DEFAULT_REPOSITORY.into(),
            run: None,
        }
    }

    fn error(s: Submission) -> String {
        match job_update("hopper", s) {
            Err(SubmitError::Invalid(msg)) => msg,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn same_grammar_as_webhooks_but_refused_instead_of_unschedulable() {
        let u = job_update("hopper", sub(&["hopper-1cpu-1gb", "extra"])).unwrap();
        assert_eq!(u.target, JobState::Queued);
        assert_eq!(u.shape.map(|s| (s.vcpus(), s.memory_gb())), Some((1, 1)));
        assert_eq!(u.image.as_deref(), Some(crate::labels::DEFAULT_IMAGE));
        assert_eq!(u.installation_id, None);

        assert!(error(sub(&["ubuntu-latest"])).contains("no Hopper label"));
        assert!(error(sub(&["hopper-3cpu"])).contains("unknown shape label"));
        assert!(error(sub(&[])).contains("1 to 100 labels"));
        assert!(error(sub(&["hopper", "two words"])).contains("no spaces"));
        let mut bad_repo = sub(&["hopper"]);
        bad_repo.repository = "../etc".into();
        assert!(error(bad_repo).contains("owner/name"));
    }

    #[test]
    fn repository_is_optional_and_unknown_fields_refused() {
        let s: Submission = serde_json::from_str(r#"{"labels":["hopper"]}"#).unwrap();
        assert_eq!(s.repository, DEFAULT_REPOSITORY);
        assert!(serde_json::from_str::<Submission>(r#"{"labels":["hopper"],"id":5}"#).is_err());
    }
}
