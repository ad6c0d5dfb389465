//! The metadata stand-ins refuse what their clouds refuse and answer as their clouds document.

use std::time::{Duration, Instant, SystemTime};

use hopper_test_support::metadata::{Fault, GcpMetadata, Imds, ScheduledEvents};
use reqwest::{Client, StatusCode};

const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN: &str = "X-aws-ec2-metadata-token";
const ACTION: &str = "/latest/meta-data/spot/instance-action";

fn client() -> Client {
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn aws_tokens_are_required_and_expire() {
    let imds = Imds::start().await;
    let http = client();
    let put = |ttl: &str| {
        http.put(format!("{}/latest/api/token", imds.url))
            .header(TTL, ttl)
    };
    assert_eq!(
        put("0").send().await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let get = |token: &str| {
        http.get(format!("{}{ACTION}", imds.url))
            .header(TOKEN, token)
    };
    let no_token = http
        .get(format!("{}{ACTION}", imds.url))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(imds.common.violations().len(), 2);

    let token = put("1").send().await.unwrap().text().await.unwrap();
    assert_eq!(
        get(&token).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    imds.set_instance_action(
        "terminate",
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    );
    let body = get(&token).send().await.unwrap().text().await.unwrap();
    assert_eq!(
        body,
        r#"{"action":"terminate","time":"2027-01-15T08:00:00Z"}"#
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get(&token).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    let token = put("21600").send().await.unwrap().text().await.unwrap();
    imds.expire_tokens();
    assert_eq!(
        get(&token).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!((imds.tokens_issued(), imds.unauthorized()), (2, 2));
}

#[tokio::test]
async fn gcp_needs_its_header_and_long_polls() {
    let gcp = GcpMetadata::start().await;
    let http = client();
    let url = format!("{}/computeMetadata/v1/instance/preempted", gcp.url);
    let bare = http.get(&url).send().await.unwrap();
    assert_eq!(bare.status(), StatusCode::FORBIDDEN);
    assert_eq!(gcp.common.violations().len(), 1);

    let read = http
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(read.headers()["metadata-flavor"], "Google");
    let etag = read.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(read.text().await.unwrap(), "FALSE");

    // Unchanged: held until timeout_sec.
    let start = Instant::now();
    let wait = format!("{url}?wait_for_change=true&last_etag={etag}&timeout_sec=1");
    let same = http
        .get(&wait)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert_eq!(same.text().await.unwrap(), "FALSE");
    // Changed while held: answered with the new value and a new ETag.
    let wait = format!("{url}?wait_for_change=true&last_etag={etag}&timeout_sec=30");
    let held = tokio::spawn(http.get(&wait).header("Metadata-Flavor", "Google").send());
    while gcp.waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gcp.set_preempted(true);
    let changed = held.await.unwrap().unwrap();
    assert_ne!(changed.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(changed.text().await.unwrap(), "TRUE");
    // An old ETag: answered at once.
    let stale = http
        .get(&wait)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.text().await.unwrap(), "TRUE");
}

#[tokio::test]
async fn azure_needs_its_header_and_records_approvals() {
    let az = ScheduledEvents::start("hopper-7").await;
    let http = client();
    let url = format!("{}/metadata/scheduledevents?api-version=2020-07-01", az.url);
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let no_version = format!("{}/metadata/scheduledevents", az.url);
    let no_version = http
        .get(no_version)
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(no_version.status(), StatusCode::BAD_REQUEST);
    assert_eq!(az.common.violations().len(), 2);

    let id = az.schedule("Preempt", &["hopper-7"], None);
    let doc: serde_json::Value = serde_json::from_str(
        &http
            .get(&url)
            .header("Metadata", "true")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(doc["Events"][0]["EventId"], id.as_str());
    assert_eq!(doc["Events"][0]["NotBefore"], "");
    let approve = format!(r#"{{"StartRequests":[{{"EventId":"{id}"}}]}}"#);
    let post = http
        .post(&url)
        .header("Metadata", "true")
        .body(approve)
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::OK);
    assert_eq!(az.acknowledged(), [id]);

    az.common.set_fault(Fault::Unreachable);
    let fresh = client();
    assert!(fresh
        .get(&url)
        .header("Metadata", "true")
        .send()
        .await
        .is_err());
}
