//! The watchers against the metadata-service stand-ins of hopper-test-support.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hopper_test_support::metadata::{Fault, GcpMetadata, Imds, ScheduledEvents};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn quick() -> Timing {
    Timing {
        poll: ms(50),
        max_backoff: ms(200),
        request: ms(500),
        probe: ms(500),
        long_wait: Duration::from_secs(20),
        token_ttl: Duration::from_secs(21600),
    }
}

/// A time as the clouds write them: to the second.
fn whole_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap().as_secs())
}

struct Watching {
    rx: mpsc::Receiver<Notice>,
    stop: CancellationToken,
}

impl Watching {
    fn start(choice: SourceChoice, url: &str, timing: Timing) -> Watching {
        let stop = CancellationToken::new();
        let rx = spawn(choice, Some(url.to_string()), timing, stop.clone());
        Watching { rx, stop }
    }

    async fn next(&mut self) -> Notice {
        timeout(Duration::from_secs(5), self.rx.recv())
            .await
            .expect("no notice within 5 s")
            .expect("the watcher stopped")
    }

    async fn nothing_for(&mut self, d: Duration) {
        match timeout(d, self.rx.recv()).await {
            Err(_) => {}
            Ok(Some(n)) => panic!("unexpected notice: {n:?}"),
            Ok(None) => panic!("the watcher stopped"),
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not within 5 s: {what}"
        );
        tokio::time::sleep(ms(20)).await;
    }
}

fn reclaim_deadline(n: &Notice) -> SystemTime {
    match n.kind {
        Kind::Reclaim { deadline } => deadline,
        ref k => panic!("not a reclaim: {k:?}"),
    }
}

#[tokio::test]
async fn aws_notices_arrive_once_with_their_deadline() {
    let imds = Imds::start().await;
    let mut w = Watching::start(SourceChoice::Aws, &imds.url, quick());
    w.nothing_for(ms(300)).await;
    let at = whole_seconds(SystemTime::now() + Duration::from_secs(120));
    imds.set_instance_action("terminate", at);
    let n = w.next().await;
    assert_eq!(n.kind, Kind::Reclaim { deadline: at });
    assert_eq!(n.cloud, Cloud::Aws);
    // Announced on every poll, passed on once.
    w.nothing_for(ms(500)).await;
    imds.set_rebalance(SystemTime::now());
    assert_eq!(w.next().await.kind, Kind::AtRisk);
    // A valid notice whose time has passed is due at once.
    let before = whole_seconds(SystemTime::now());
    imds.set_instance_action("stop", SystemTime::now() - Duration::from_secs(600));
    let deadline = reclaim_deadline(&w.next().await);
    assert!(deadline >= before && deadline <= SystemTime::now());
    assert_eq!(imds.common.violations(), Vec::<String>::new());
    assert_eq!(
        imds.tokens_issued(),
        1,
        "one session token serves every poll"
    );
}

#[tokio::test]
async fn aws_revoked_token_is_replaced() {
    let imds = Imds::start().await;
    let mut w = Watching::start(SourceChoice::Aws, &imds.url, quick());
    eventually("a first token", || imds.tokens_issued() == 1).await;
    imds.expire_tokens();
    let at = whole_seconds(SystemTime::now() + Duration::from_secs(120));
    imds.set_instance_action("hibernate", at);
    assert_eq!(w.next().await.kind, Kind::Reclaim { deadline: at });
    assert!(imds.unauthorized() >= 1);
    assert_eq!(imds.tokens_issued(), 2);
    assert_eq!(imds.common.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn aws_token_is_renewed_before_it_expires() {
    let imds = Imds::start().await;
    let timing = Timing {
        token_ttl: Duration::from_secs(4),
        ..quick()
    };
    let mut w = Watching::start(SourceChoice::Aws, &imds.url, timing);
    eventually("a first token", || imds.tokens_issued() == 1).await;
    // Renewed a quarter of its life early (at 3 s), so before it lapses at 4 s.
    w.nothing_for(ms(3600)).await;
    assert_eq!(imds.tokens_issued(), 2);
    assert_eq!(
        imds.unauthorized(),
        0,
        "a request went out with a lapsed token"
    );
}

#[tokio::test]
async fn aws_bad_answers_make_no_notice_and_polling_goes_on() {
    let imds = Imds::start().await;
    let mut w = Watching::start(SourceChoice::Aws, &imds.url, quick());
    let in_2m = SystemTime::now() + Duration::from_secs(120);
    for body in [
        json!({ "action": "reboot", "time": "2099-01-01T00:00:00Z" }).to_string(),
        json!({ "action": "terminate", "time": "soon" }).to_string(),
    ] {
        imds.set_instance_action_body(&body);
        w.nothing_for(ms(400)).await;
    }
    // A real notice behind a service that misbehaves is not seen, and no false one either.
    imds.common.set_fault(Fault::Garbage);
    imds.set_instance_action("terminate", in_2m);
    for fault in [Fault::Garbage, Fault::ServerError, Fault::Unreachable] {
        imds.common.set_fault(fault);
        w.nothing_for(ms(1200)).await;
    }
    imds.common.set_fault(Fault::None);
    let n = w.next().await;
    assert_eq!(reclaim_deadline(&n), whole_seconds(in_2m));
}

#[tokio::test]
async fn gcp_preemption_arrives_through_the_long_poll() {
    let gcp = GcpMetadata::start().await;
    // Plain polling would take 30 s: only the long poll can be this quick.
    let timing = Timing {
        poll: Duration::from_secs(30),
        ..quick()
    };
    let mut w = Watching::start(SourceChoice::Gcp, &gcp.url, timing);
    eventually("both values long-polled", || gcp.waiting() == 2).await;
    let before = SystemTime::now();
    gcp.set_preempted(true);
    let deadline = reclaim_deadline(&w.next().await);
    let notice = Duration::from_secs(30);
    assert!(deadline >= before + notice && deadline <= SystemTime::now() + notice);
    let polls = gcp.common.requests();
    assert!(
        polls
            .iter()
            .any(|r| r.contains("wait_for_change=true&last_etag=")),
        "{polls:?}"
    );
    assert_eq!(gcp.common.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn gcp_maintenance_events() {
    let gcp = GcpMetadata::start().await;
    let mut w = Watching::start(SourceChoice::Gcp, &gcp.url, quick());
    gcp.set_maintenance_event("MIGRATE_ON_HOST_MAINTENANCE");
    assert_eq!(w.next().await.kind, Kind::Maintenance);
    gcp.set_maintenance_event("NONE");
    w.nothing_for(ms(300)).await;
    gcp.set_maintenance_event("TERMINATE_ON_HOST_MAINTENANCE");
    assert_eq!(w.next().await.kind, Kind::AtRisk);
    gcp.set_maintenance_event("SOMETHING_NEW");
    w.nothing_for(ms(400)).await;
    assert_eq!(gcp.common.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn gcp_bad_answers_make_no_notice_and_polling_goes_on() {
    let gcp = GcpMetadata::start().await;
    let mut w = Watching::start(SourceChoice::Gcp, &gcp.url, quick());
    eventually("both values long-polled", || gcp.waiting() == 2).await;
    gcp.common.set_fault(Fault::Garbage);
    gcp.set_preempted(true);
    for fault in [Fault::Garbage, Fault::ServerError, Fault::Unreachable] {
        gcp.common.set_fault(fault);
        w.nothing_for(ms(1200)).await;
    }
    gcp.common.set_fault(Fault::None);
    reclaim_deadline(&w.next().await);
}

#[tokio::test]
async fn azure_events_of_this_vm_are_notices_and_acknowledged() {
    let az = ScheduledEvents::start("hopper-7").await;
    let mut w = Watching::start(SourceChoice::Azure, &az.url, quick());
    let at = whole_seconds(SystemTime::now() + Duration::from_secs(60));
    az.schedule("Preempt", &["hopper-8"], Some(at));
    w.nothing_for(ms(400)).await;
    let id = az.schedule("Preempt", &["hopper-7"], Some(at));
    let n = w.next().await;
    assert_eq!(n.kind, Kind::Reclaim { deadline: at });
    assert_eq!(n.event_id.as_deref(), Some(id.as_str()));
    az.schedule("Freeze", &["hopper-7"], Some(at));
    assert_eq!(w.next().await.kind, Kind::Maintenance);

    let md = Metadata::new(&az.url, Duration::from_secs(2)).unwrap();
    azure::acknowledge(&md, &id).await.unwrap();
    assert_eq!(az.acknowledged(), std::slice::from_ref(&id));
    // Approved, the event has started: due now.
    let n = w.next().await;
    assert_eq!(n.event_id.as_deref(), Some(id.as_str()));
    assert!(reclaim_deadline(&n) <= SystemTime::now());
    assert!(azure::acknowledge(&md, "no-such-event").await.is_err());
    assert_eq!(az.common.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn azure_bad_answers_make_no_notice_and_polling_goes_on() {
    let az = ScheduledEvents::start("hopper-7").await;
    let mut w = Watching::start(SourceChoice::Azure, &az.url, quick());
    let event = |event_type: &str, not_before: &str| {
        json!({
            "EventId": format!("odd-{event_type}"), "EventStatus": "Scheduled",
            "EventType": event_type, "ResourceType": "VirtualMachine",
            "Resources": ["hopper-7"], "NotBefore": not_before,
        })
    };
    az.add(event("Explode", "Mon, 19 Sep 2016 18:29:47 GMT"));
    az.add(event("Preempt", "2099-01-01T00:00:00Z"));
    w.nothing_for(ms(400)).await;
    az.clear_events();
    let at = whole_seconds(SystemTime::now() + Duration::from_secs(60));
    az.common.set_fault(Fault::Garbage);
    az.schedule("Terminate", &["hopper-7"], Some(at));
    for fault in [Fault::Garbage, Fault::ServerError, Fault::Unreachable] {
        az.common.set_fault(fault);
        w.nothing_for(ms(1200)).await;
    }
    az.common.set_fault(Fault::None);
    assert_eq!(w.next().await.kind, Kind::Reclaim { deadline: at });
}

#[tokio::test]
async fn auto_picks_the_service_that_answers() {
    let (aws, gcp, az) = (
        Imds::start().await,
        GcpMetadata::start().await,
        ScheduledEvents::start("hopper-7").await,
    );
    for (url, cloud) in [
        (&aws.url, Cloud::Aws),
        (&gcp.url, Cloud::Gcp),
        (&az.url, Cloud::Azure),
    ] {
        assert_eq!(
            detect(Some(url.as_str()), &quick()).await,
            Some(cloud),
            "{url}"
        );
    }
    // Nothing listening, or nothing answering: none, within the probe's limit.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let start = Instant::now();
    assert_eq!(detect(Some(closed.as_str()), &quick()).await, None);
    gcp.common.set_fault(Fault::Unreachable);
    assert_eq!(detect(Some(gcp.url.as_str()), &quick()).await, None);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // What auto finds is watched.
    let mut w = Watching::start(SourceChoice::Auto, &aws.url, quick());
    aws.set_rebalance(SystemTime::now());
    assert_eq!(w.next().await.cloud, Cloud::Aws);
}

#[tokio::test]
async fn no_source_or_a_stop_closes_the_channel() {
    let mut none = Watching::start(SourceChoice::None, "http://127.0.0.1:9", quick());
    assert!(timeout(ms(500), none.rx.recv()).await.unwrap().is_none());
    let imds = Imds::start().await;
    let mut w = Watching::start(SourceChoice::Aws, &imds.url, quick());
    w.nothing_for(ms(200)).await;
    w.stop.cancel();
    assert!(timeout(ms(500), w.rx.recv()).await.unwrap().is_none());
}
