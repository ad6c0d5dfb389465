//! Azure lets a host approve a scheduled event so that it starts before its `NotBefore`: the
//! host does so once none of its jobs is left on it (all moved away), which hands the machine
//! back early and loses nothing.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::watch;

use super::{azure, Cloud, Metadata};

/// The Azure event a reclaim notice came with, until the host is empty.
pub struct EventApproval {
    pending: watch::Receiver<Option<String>>,
    approved: HashSet<String>,
    /// The metadata service (the `--metadata-url` given, or Azure's).
    base: String,
}

impl EventApproval {
    /// `pending` carries the event id of the last Azure reclaim notice.
    pub fn new(pending: watch::Receiver<Option<String>>, metadata_url: Option<&str>) -> Self {
        EventApproval {
            pending,
            approved: HashSet::new(),
            base: metadata_url
                .unwrap_or(Cloud::Azure.default_url())
                .to_string(),
        }
    }

    /// The event to approve now that the host holds `jobs` jobs, once per event.
    pub fn due(&mut self, jobs: usize) -> Option<String> {
        let event = self.pending.borrow().clone()?;
        (jobs == 0 && self.approved.insert(event.clone())).then_some(event)
    }

    /// Approves `event` in the background; a failure only means it starts at its time.
    pub fn approve(&self, event: String) {
        let base = self.base.clone();
        tokio::spawn(async move {
            let approved = match Metadata::new(&base, Duration::from_secs(5)) {
                Ok(md) => azure::acknowledge(&md, &event).await,
                Err(e) => Err(e),
            };
            match approved {
                Ok(()) => tracing::info!(event, "no job is left here: Azure's event may start now"),
                Err(e) => tracing::warn!(event, "cannot approve Azure's event early: {e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_approved_once_when_no_job_is_left() {
        let (tx, rx) = watch::channel(None);
        let mut approval = EventApproval::new(rx, Some("http://127.0.0.1:1"));
        assert_eq!(approval.due(0), None, "no event");
        tx.send(Some("ev-1".into())).unwrap();
        assert_eq!(approval.due(2), None, "jobs still here");
        assert_eq!(approval.due(0), Some("ev-1".into()));
        assert_eq!(approval.due(0), None, "once");
        tx.send(Some("ev-2".into())).unwrap();
        assert_eq!(approval.due(0), Some("ev-2".into()));
    }
}
