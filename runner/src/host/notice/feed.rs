//! What the watchers share: a notice repeated on every poll is sent once, a failure repeated on
//! every poll is logged once, and failures slow the polling down.

use std::time::Duration;

use tokio::sync::mpsc;

use super::{Notice, NoticeError, Timing};

/// One endpoint's notices as far as they were passed on.
pub(super) struct Feed {
    what: &'static str,
    /// The details of the notices in force at the last good poll.
    sent: Vec<String>,
    complaint: Option<String>,
}

impl Feed {
    pub fn new(what: &'static str) -> Self {
        Feed {
            what,
            sent: Vec::new(),
            complaint: None,
        }
    }

    /// Takes one poll's outcome: sends the notices not in force before (one that ended and
    /// came back is sent again). A failed poll changes nothing in force. Returns whether the
    /// poll succeeded.
    pub async fn update(
        &mut self,
        polled: Result<Vec<Notice>, NoticeError>,
        tx: &mpsc::Sender<Notice>,
    ) -> bool {
        match polled {
            Ok(notices) => {
                if self.complaint.take().is_some() {
                    tracing::info!("{}: the metadata service answers properly again", self.what);
                }
                let in_force = notices.iter().map(|n| n.detail.clone()).collect();
                for notice in notices {
                    if !self.sent.contains(&notice.detail) {
                        // A closed channel ends the watcher at its next round.
                        let _ = tx.send(notice).await;
                    }
                }
                self.sent = in_force;
                true
            }
            Err(e) => {
                let text = e.to_string();
                if self.complaint.as_deref() != Some(text.as_str()) {
                    tracing::warn!("{}: {text} (taken as no notice; retrying)", self.what);
                    self.complaint = Some(text);
                }
                false
            }
        }
    }
}

/// The pause before the next poll: the polling interval, doubled after each failure up to a
/// limit.
pub(super) struct Backoff {
    poll: Duration,
    max: Duration,
    now: Duration,
}

impl Backoff {
    pub fn new(timing: &Timing) -> Self {
        Backoff {
            poll: timing.poll,
            max: timing.max_backoff.max(timing.poll),
            now: timing.poll,
        }
    }

    pub fn after(&mut self, ok: bool) -> Duration {
        self.now = if ok {
            self.poll
        } else {
            (self.now * 2).min(self.max)
        };
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_limit_and_resets() {
        let timing = Timing {
            poll: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            ..Timing::default()
        };
        let mut b = Backoff::new(&timing);
        let secs: Vec<u64> = [false, false, false, false, true]
            .into_iter()
            .map(|ok| b.after(ok).as_secs())
            .collect();
        assert_eq!(secs, [2, 4, 5, 5, 1]);
    }
}
