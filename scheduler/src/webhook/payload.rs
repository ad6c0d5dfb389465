//! The parts of GitHub's webhook payloads the scheduler reads.

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    Queued,
    InProgress,
    Completed,
    Waiting,
    /// An action GitHub may add later; recorded, no effect.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowJob {
    pub action: JobAction,
    pub id: u64,
    pub run_id: u64,
    pub run_attempt: u32,
    pub labels: Vec<String>,
    pub conclusion: Option<String>,
    pub repository: String,
    pub installation_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Ping,
    WorkflowJob(WorkflowJob),
    /// Any other event: valid JSON, no effect.
    Other,
}

#[derive(Deserialize)]
struct RawWorkflowJobEvent {
    action: String,
    workflow_job: RawJob,
    repository: RawRepository,
    installation: Option<RawInstallation>,
}

#[derive(Deserialize)]
struct RawJob {
    id: u64,
    run_id: u64,
    #[serde(default = "first_attempt")]
    run_attempt: u32,
    labels: Vec<String>,
    conclusion: Option<String>,
}

fn first_attempt() -> u32 {
    1
}

#[derive(Deserialize)]
struct RawRepository {
    full_name: String,
}

#[derive(Deserialize)]
struct RawInstallation {
    id: u64,
}

/// Parses a delivery's body for its `X-GitHub-Event`. Every event must be a JSON object;
/// `workflow_job` must carry the fields the scheduler needs.
pub fn parse(event: &str, body: &[u8]) -> Result<Event, ParseError> {
    match event {
        "workflow_job" => {
            let raw: RawWorkflowJobEvent = serde_json::from_slice(body)?;
            let action = match raw.action.as_str() {
                "queued" => JobAction::Queued,
                "in_progress" => JobAction::InProgress,
                "completed" => JobAction::Completed,
                "waiting" => JobAction::Waiting,
                _ => JobAction::Other,
            };
            Ok(Event::WorkflowJob(WorkflowJob {
                action,
                id: raw.workflow_job.id,
                run_id: raw.workflow_job.run_id,
                run_attempt: raw.workflow_job.run_attempt,
                labels: raw.workflow_job.labels,
                conclusion: raw.workflow_job.conclusion,
                repository: raw.repository.full_name,
                installation_id: raw.installation.map(|i| i.id),
            }))
        }
        other => {
            let _: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)?;
            Ok(if other == "ping" {
                Event::Ping
            } else {
                Event::Other
            })
        }
    }
}
