//! `POST /webhook` intake: signature check, parsing, and the atomic write of a delivery.

pub mod payload;
pub mod signature;

use crate::labels::{classify, LabelMatch};
use crate::store::{DeliveryOutcome, JobUpdate, Store, StoreError};
use payload::{Event, JobAction, ParseError};

/// GitHub caps payloads at 25 MB; anything bigger is not from GitHub.
pub const MAX_BODY_BYTES: usize = 25 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("invalid X-GitHub-Delivery header")]
    BadDeliveryId,
    #[error(transparent)]
    Malformed(#[from] ParseError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Parses a verified delivery and stores it with its job update in one transaction. On any
/// error nothing is written.
pub fn intake(
    store: &dyn Store,
    label_prefix: &str,
    delivery_id: &str,
    event: &str,
    body: &[u8],
) -> Result<DeliveryOutcome, IntakeError> {
    if delivery_id.is_empty()
        || delivery_id.len() > 128
        || !delivery_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(IntakeError::BadDeliveryId);
    }
    let update = match payload::parse(event, body)? {
        Event::WorkflowJob(wj) => job_update(label_prefix, wj),
        Event::Ping | Event::Other => None,
    };
    Ok(store.record_delivery(delivery_id, event, update.as_ref())?)
}

pub(crate) fn job_update(prefix: &str, wj: payload::WorkflowJob) -> Option<JobUpdate> {
    if crate::jobs::is_local_job_id(wj.id) {
        // GitHub never sends such ids; taking one would merge it into a local job.
        tracing::warn!(
            job = wj.id,
            "workflow_job id in the range of local jobs; ignored"
        );
        return None;
    }
    let target = match wj.action {
        JobAction::Queued => crate::jobs::JobState::Queued,
        JobAction::InProgress => crate::jobs::JobState::Running,
        JobAction::Completed => crate::jobs::JobState::Completed,
        // `waiting` (deployment protection) is followed by `queued` once approved.
        JobAction::Waiting | JobAction::Other => return None,
    };
    let mut update = JobUpdate {
        id: wj.id,
        run_id: wj.run_id,
        run_attempt: wj.run_attempt,
        repository: wj.repository,
        installation_id: wj.installation_id,
        labels: wj.labels,
        target,
        conclusion: wj.conclusion,
        shape: None,
        image: None,
        reason: None,
    };
    match classify(prefix, &update.labels) {
        LabelMatch::NotHopper => {
            tracing::debug!(
                job = update.id,
                "workflow_job not for Hopper's labels; ignored"
            );
            return None;
        }
        LabelMatch::Hopper(spec) => {
            update.shape = Some(spec.shape);
            update.image = Some(spec.image);
        }
        LabelMatch::Invalid(reason) => {
            tracing::warn!(
                job = update.id,
                repository = %update.repository,
                labels = ?update.labels,
                %reason,
                "workflow_job names Hopper but cannot be scheduled"
            );
            if target == crate::jobs::JobState::Queued {
                update.target = crate::jobs::JobState::Unschedulable;
            }
            update.reason = Some(reason);
        }
    }
    Some(update)
}
