//! GCP: the metadata server, long-polled (`wait_for_change` with the last ETag, as Google
//! documents) on `instance/preempted` and `instance/maintenance-event`.

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::ETAG;
use reqwest::StatusCode;
use tokio::sync::mpsc;

use super::feed::{Backoff, Feed};
use super::{Cloud, Kind, Metadata, Notice, NoticeError, Timing};

const PREEMPTED: &str = "/computeMetadata/v1/instance/preempted";
const MAINTENANCE: &str = "/computeMetadata/v1/instance/maintenance-event";
const FLAVOR: &str = "Metadata-Flavor";
/// Between the preemption notice and the forced stop of a spot or preemptible VM.
const PREEMPTION_NOTICE: Duration = Duration::from_secs(30);

fn notice(kind: Kind, detail: String) -> Notice {
    Notice {
        kind,
        cloud: Cloud::Gcp,
        event_id: None,
        detail,
    }
}

/// `instance/preempted`: `TRUE` or `FALSE`.
pub(super) fn parse_preempted(body: &str, now: SystemTime) -> Result<Option<Notice>, NoticeError> {
    match body.trim() {
        "FALSE" => Ok(None),
        "TRUE" => Ok(Some(notice(
            Kind::Reclaim {
                deadline: now + PREEMPTION_NOTICE,
            },
            "preempted".into(),
        ))),
        _ => Err(NoticeError::malformed(
            "preempted value",
            "not TRUE or FALSE",
            body,
        )),
    }
}

/// `instance/maintenance-event`.
pub(super) fn parse_maintenance(body: &str) -> Result<Option<Notice>, NoticeError> {
    let kind = match body.trim() {
        "NONE" => return Ok(None),
        "MIGRATE_ON_HOST_MAINTENANCE" => Kind::Maintenance,
        "TERMINATE_ON_HOST_MAINTENANCE" => Kind::AtRisk,
        _ => {
            return Err(NoticeError::malformed(
                "maintenance-event value",
                "not a documented value",
                body,
            ))
        }
    };
    Ok(Some(notice(
        kind,
        format!("maintenance-event {}", body.trim()),
    )))
}

pub(super) async fn probe(md: &Metadata) -> bool {
    let req = md.http.get(md.url(PREEMPTED)).header(FLAVOR, "Google");
    md.send(req).await.is_ok_and(|a| {
        a.status == StatusCode::OK && a.headers.get(FLAVOR).is_some_and(|v| v == "Google")
    })
}

pub(super) async fn watch(md: Metadata, timing: Timing, tx: mpsc::Sender<Notice>) {
    let preempted = follow(&md, &timing, &tx, PREEMPTED, "GCP preempted", |body| {
        parse_preempted(body, SystemTime::now())
    });
    let maintenance = follow(
        &md,
        &timing,
        &tx,
        MAINTENANCE,
        "GCP maintenance-event",
        parse_maintenance,
    );
    tokio::join!(preempted, maintenance);
}

/// Reads one value, then waits for each change of it.
async fn follow(
    md: &Metadata,
    timing: &Timing,
    tx: &mpsc::Sender<Notice>,
    path: &str,
    what: &'static str,
    parse: impl Fn(&str) -> Result<Option<Notice>, NoticeError>,
) {
    let mut feed = Feed::new(what);
    let mut backoff = Backoff::new(timing);
    let mut etag: Option<String> = None;
    while !tx.is_closed() {
        let started = Instant::now();
        let long_poll = etag.is_some();
        let mut req = md.http.get(md.url(path)).header(FLAVOR, "Google");
        if let Some(tag) = &etag {
            let wait = timing.long_wait.as_secs().max(1).to_string();
            req = req
                .query(&[
                    ("wait_for_change", "true"),
                    ("last_etag", tag.as_str()),
                    ("timeout_sec", wait.as_str()),
                ])
                .timeout(timing.long_wait + timing.request);
        }
        let polled = md.send(req).await.and_then(|a| {
            if a.status != StatusCode::OK {
                return Err(NoticeError::Status {
                    what: "a metadata read",
                    status: a.status,
                });
            }
            let next = a.headers.get(ETAG).and_then(|v| v.to_str().ok());
            Ok((parse(&a.body)?, next.map(str::to_string)))
        });
        let ok = match polled {
            Ok((notice, next)) => {
                etag = next;
                feed.update(Ok(notice.into_iter().collect()), tx).await
            }
            Err(e) => {
                // Read afresh after a failure rather than wait on a value not understood.
                etag = None;
                feed.update(Err(e), tx).await
            }
        };
        let pause = backoff.after(ok);
        let pause = if !ok {
            pause
        } else if !long_poll && etag.is_some() {
            // A first read: the long poll follows at once.
            Duration::ZERO
        } else {
            // A long poll paces itself; one that came back at once (no ETag to wait on, or a
            // server that does not wait) must not turn into a busy loop.
            pause.saturating_sub(started.elapsed())
        };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preempted_values() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_preempted("FALSE", now).unwrap(), None);
        let n = parse_preempted("TRUE", now).unwrap().unwrap();
        assert_eq!(
            n.kind,
            Kind::Reclaim {
                deadline: now + Duration::from_secs(30)
            }
        );
        assert_eq!(n.cloud, Cloud::Gcp);
        for bad in ["", "true", "YES", "<html>502</html>", "TRUE FALSE"] {
            assert!(parse_preempted(bad, now).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn maintenance_event_values() {
        assert_eq!(parse_maintenance("NONE").unwrap(), None);
        let kind = |v| parse_maintenance(v).unwrap().unwrap().kind;
        assert_eq!(kind("MIGRATE_ON_HOST_MAINTENANCE"), Kind::Maintenance);
        assert_eq!(kind("TERMINATE_ON_HOST_MAINTENANCE"), Kind::AtRisk);
        for bad in ["", "none", "REBOOT", "{}"] {
            assert!(parse_maintenance(bad).is_err(), "{bad:?}");
        }
    }
}
