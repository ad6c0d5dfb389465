//! Azure: Scheduled Events of the instance metadata service. The document lists the events of
//! every VM in this one's availability set or scale-set placement group, so only those naming
//! this VM count (all of them while its name is unknown). An event can be acknowledged, which
//! lets it start before its `NotBefore`.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::feed::{Backoff, Feed};
use super::{json_object, Cloud, Kind, Metadata, Notice, NoticeError, Timing};

const EVENTS: &str = "/metadata/scheduledevents?api-version=2020-07-01";
const VM_NAME: &str = "/metadata/instance/compute/name?api-version=2021-02-01&format=text";

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Document {
    events: Vec<Event>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Event {
    event_id: String,
    event_type: String,
    #[serde(default)]
    event_status: String,
    #[serde(default)]
    resources: Vec<String>,
    /// RFC 1123; empty once the event has started.
    #[serde(default)]
    not_before: String,
}

pub(super) fn parse_events(body: &str) -> Result<Vec<Event>, NoticeError> {
    json_object::<Document>(body)
        .map(|d| d.events)
        .map_err(|e| NoticeError::malformed("scheduled events document", e, body))
}

/// The notice an event is for this VM (`vm`: its name, when known), if any.
pub(super) fn classify(
    ev: &Event,
    vm: Option<&str>,
    now: SystemTime,
) -> Result<Option<Notice>, NoticeError> {
    if let Some(vm) = vm {
        if !ev.resources.iter().any(|r| r.eq_ignore_ascii_case(vm)) {
            return Ok(None);
        }
    }
    let kind = match ev.event_type.as_str() {
        // With the documented minimum notice of each, for a NotBefore left blank.
        "Preempt" => Kind::Reclaim {
            deadline: deadline(ev, Duration::from_secs(30), now)?,
        },
        "Terminate" => Kind::Reclaim {
            deadline: deadline(ev, Duration::from_secs(5 * 60), now)?,
        },
        "Reboot" | "Redeploy" => Kind::AtRisk,
        "Freeze" => Kind::Maintenance,
        other => {
            let cause = format!("unknown EventType of event {}", ev.event_id);
            return Err(NoticeError::malformed("scheduled event", cause, other));
        }
    };
    Ok(Some(Notice {
        kind,
        cloud: Cloud::Azure,
        event_id: Some(ev.event_id.clone()),
        detail: format!(
            "scheduled event {} {} not before {:?}",
            ev.event_id, ev.event_type, ev.not_before
        ),
    }))
}

fn deadline(ev: &Event, minimum: Duration, now: SystemTime) -> Result<SystemTime, NoticeError> {
    let not_before = ev.not_before.trim();
    if not_before.is_empty() {
        // Azure blanks NotBefore once the event has started.
        return Ok(if ev.event_status == "Started" {
            now
        } else {
            now + minimum
        });
    }
    let at = httpdate::parse_http_date(not_before).map_err(|e| {
        let cause = format!("NotBefore of event {}: {e}", ev.event_id);
        NoticeError::malformed("scheduled event", cause, not_before)
    })?;
    Ok(at.max(now))
}

/// Approves the event so that it may start now, as the host is ready for it.
pub async fn acknowledge(md: &Metadata, event_id: &str) -> Result<(), NoticeError> {
    let body = json!({ "StartRequests": [{ "EventId": event_id }] });
    let req = md
        .http
        .post(md.url(EVENTS))
        .header("Metadata", "true")
        .json(&body);
    let answer = md.send(req).await?;
    if !answer.status.is_success() {
        return Err(NoticeError::Status {
            what: "the acknowledgement of a scheduled event",
            status: answer.status,
        });
    }
    Ok(())
}

async fn vm_name(md: &Metadata) -> Result<String, NoticeError> {
    let answer = md
        .send(md.http.get(md.url(VM_NAME)).header("Metadata", "true"))
        .await?;
    let name = answer.body.trim();
    if answer.status != StatusCode::OK || name.is_empty() {
        return Err(NoticeError::Status {
            what: "the VM name request",
            status: answer.status,
        });
    }
    Ok(name.to_string())
}

pub(super) async fn probe(md: &Metadata) -> bool {
    vm_name(md).await.is_ok()
}

pub(super) async fn watch(md: Metadata, timing: Timing, tx: mpsc::Sender<Notice>) {
    let mut feed = Feed::new("Azure scheduled events");
    // Events that make no notice because they are not understood, logged once each.
    let mut odd = Feed::new("Azure scheduled event");
    let mut name = Feed::new("Azure VM name (events of any VM count until it is known)");
    let mut vm: Option<String> = None;
    let mut switched_on = false;
    let mut backoff = Backoff::new(&timing);
    while !tx.is_closed() {
        if vm.is_none() {
            let got = vm_name(&md).await;
            vm = got.as_ref().ok().cloned();
            name.update(got.map(|_| Vec::new()), &tx).await;
        }
        let mut req = md.http.get(md.url(EVENTS)).header("Metadata", "true");
        if !switched_on {
            req = req.timeout(timing.long_wait);
        }
        let polled = md.send(req).await.and_then(|a| match a.status {
            StatusCode::OK => parse_events(&a.body),
            status => Err(NoticeError::Status {
                what: "the scheduled events request",
                status,
            }),
        });
        switched_on |= polled.is_ok();
        let now = SystemTime::now();
        let mut problem = None;
        let polled = polled.map(|events| {
            let classified = events.iter().map(|e| classify(e, vm.as_deref(), now));
            let mut notices = Vec::new();
            for c in classified {
                match c {
                    Ok(n) => notices.extend(n),
                    Err(e) => problem = Some(e),
                }
            }
            notices
        });
        let ok = feed.update(polled, &tx).await;
        odd.update(problem.map_or(Ok(Vec::new()), Err), &tx).await;
        tokio::time::sleep(backoff.after(ok)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        httpdate::parse_http_date(text).unwrap()
    }

    fn event(event_type: &str, status: &str, resources: &[&str], not_before: &str) -> String {
        json!({
            "DocumentIncarnation": 2,
            "Events": [{
                "EventId": "602d9444-d2cd-49c7-8624-8643e7171297",
                "EventStatus": status,
                "EventType": event_type,
                "ResourceType": "VirtualMachine",
                "Resources": resources,
                "NotBefore": not_before,
                "Description": "",
                "EventSource": "Platform",
                "DurationInSeconds": -1,
            }]
        })
        .to_string()
    }

    fn one(body: &str, vm: Option<&str>, now: SystemTime) -> Option<Notice> {
        let events = parse_events(body).unwrap();
        assert_eq!(events.len(), 1);
        classify(&events[0], vm, now).unwrap()
    }

    const NB: &str = "Mon, 19 Sep 2016 18:29:47 GMT";

    #[test]
    fn preempt_and_terminate_of_this_vm_are_reclaims_until_not_before() {
        let now = at("Mon, 19 Sep 2016 18:29:17 GMT");
        for t in ["Preempt", "Terminate"] {
            let body = event(t, "Scheduled", &["FrontEnd_IN_0", "hopper-7"], NB);
            let n = one(&body, Some("hopper-7"), now).unwrap();
            assert_eq!(n.kind, Kind::Reclaim { deadline: at(NB) });
            assert_eq!(
                n.event_id.as_deref(),
                Some("602d9444-d2cd-49c7-8624-8643e7171297")
            );
            // Another VM's event is not ours; with no name known, any event counts.
            assert_eq!(one(&body, Some("hopper-8"), now), None);
            assert!(one(&body, None, now).is_some());
        }
    }

    #[test]
    fn not_before_blank_or_past() {
        let now = at("Mon, 19 Sep 2016 18:35:00 GMT");
        let started = event("Preempt", "Started", &["vm"], "");
        let deadline = |n: Notice| match n.kind {
            Kind::Reclaim { deadline } => deadline,
            k => panic!("{k:?}"),
        };
        assert_eq!(deadline(one(&started, None, now).unwrap()), now);
        let scheduled = event("Preempt", "Scheduled", &["vm"], "");
        assert_eq!(
            deadline(one(&scheduled, None, now).unwrap()),
            now + Duration::from_secs(30)
        );
        let past = event("Terminate", "Scheduled", &["vm"], NB);
        assert_eq!(deadline(one(&past, None, now).unwrap()), now);
    }

    #[test]
    fn maintenance_events() {
        let now = at(NB);
        let kind = |t| {
            one(&event(t, "Scheduled", &["vm"], NB), None, now)
                .unwrap()
                .kind
        };
        assert_eq!(kind("Freeze"), Kind::Maintenance);
        assert_eq!(kind("Reboot"), Kind::AtRisk);
        assert_eq!(kind("Redeploy"), Kind::AtRisk);
    }

    #[test]
    fn bad_events_and_documents() {
        let now = at(NB);
        for body in [
            event("Explode", "Scheduled", &["vm"], NB),
            event("Preempt", "Scheduled", &["vm"], "2016-09-19T18:29:47Z"),
            event("Preempt", "Scheduled", &["vm"], "soon"),
        ] {
            let events = parse_events(&body).unwrap();
            assert!(classify(&events[0], Some("vm"), now).is_err(), "{body}");
        }
        for body in [
            "",
            "<html></html>",
            "{}",
            r#"{"Events": [{"EventType": "Preempt"}]}"#,
        ] {
            assert!(parse_events(body).is_err(), "{body}");
        }
        let empty = r#"{"DocumentIncarnation": 0, "Events": []}"#;
        assert!(parse_events(empty).unwrap().is_empty());
    }
}
