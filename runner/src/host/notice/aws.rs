//! AWS: the instance metadata service in its IMDSv2 form, where every request carries a session
//! token got by a PUT. Polled: the spot instance action (the two-minute interruption notice)
//! and the rebalance recommendation (the instance is at elevated risk of interruption).

use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::feed::{Backoff, Feed};
use super::{json_object, rfc3339, Cloud, Kind, Metadata, Notice, NoticeError, Timing};

const TOKEN: &str = "/latest/api/token";
const INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";
const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";

#[derive(Deserialize)]
struct InstanceAction {
    action: String,
    time: String,
}

/// `spot/instance-action`: `{"action": "terminate|stop|hibernate", "time": RFC 3339}`.
pub(super) fn parse_instance_action(body: &str, now: SystemTime) -> Result<Notice, NoticeError> {
    let what = "spot instance-action";
    let ia: InstanceAction =
        json_object(body).map_err(|e| NoticeError::malformed(what, e, body))?;
    if !matches!(ia.action.as_str(), "terminate" | "stop" | "hibernate") {
        let cause = format!("unknown action {:?}", ia.action);
        return Err(NoticeError::malformed(what, cause, body));
    }
    let deadline = rfc3339(&ia.time).map_err(|e| NoticeError::malformed(what, e, body))?;
    Ok(Notice {
        kind: Kind::Reclaim {
            deadline: deadline.max(now),
        },
        cloud: Cloud::Aws,
        event_id: None,
        detail: format!("spot instance-action {} at {}", ia.action, ia.time),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rebalance {
    notice_time: String,
}

/// `events/recommendations/rebalance`: `{"noticeTime": RFC 3339}`.
pub(super) fn parse_rebalance(body: &str) -> Result<Notice, NoticeError> {
    let what = "rebalance recommendation";
    let r: Rebalance = json_object(body).map_err(|e| NoticeError::malformed(what, e, body))?;
    rfc3339(&r.notice_time).map_err(|e| NoticeError::malformed(what, e, body))?;
    Ok(Notice {
        kind: Kind::AtRisk,
        cloud: Cloud::Aws,
        event_id: None,
        detail: format!("rebalance recommendation of {}", r.notice_time),
    })
}

struct Token {
    value: String,
    renew_at: Instant,
}

/// The service and this watcher's session token.
struct Imds {
    md: Metadata,
    ttl: Duration,
    token: Option<Token>,
}

impl Imds {
    async fn token(&mut self) -> Result<String, NoticeError> {
        if let Some(t) = &self.token {
            if Instant::now() < t.renew_at {
                return Ok(t.value.clone());
            }
        }
        let secs = self.ttl.as_secs().clamp(1, 21600);
        let req = self
            .md
            .http
            .put(self.md.url(TOKEN))
            .header(TTL_HEADER, secs.to_string());
        let answer = self.md.send(req).await?;
        if answer.status != StatusCode::OK {
            return Err(NoticeError::Status {
                what: "the session token request",
                status: answer.status,
            });
        }
        let value = answer.body.trim().to_string();
        if value.is_empty() || !value.is_ascii() {
            return Err(NoticeError::malformed(
                "session token",
                "not a token",
                &answer.body,
            ));
        }
        // Renewed ahead of its expiry, so that no poll goes out with a token about to lapse.
        let ttl = Duration::from_secs(secs);
        let early = (ttl / 4).min(Duration::from_secs(60));
        self.token = Some(Token {
            value: value.clone(),
            renew_at: Instant::now() + ttl - early,
        });
        Ok(value)
    }

    async fn get_once(&mut self, path: &str) -> Result<super::http::Answer, NoticeError> {
        let token = self.token().await?;
        let req = self
            .md
            .http
            .get(self.md.url(path))
            .header(TOKEN_HEADER, token);
        self.md.send(req).await
    }

    /// 404 is "nothing announced"; 200 is the announcement, for `parse`. A 401 (the token
    /// expired or was revoked) gets a new token and one more try.
    async fn poll(
        &mut self,
        what: &'static str,
        path: &str,
        parse: impl Fn(&str) -> Result<Notice, NoticeError>,
    ) -> Result<Vec<Notice>, NoticeError> {
        let mut answer = self.get_once(path).await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            self.token = None;
            answer = self.get_once(path).await?;
        }
        match answer.status {
            StatusCode::OK => parse(&answer.body).map(|n| vec![n]),
            StatusCode::NOT_FOUND => Ok(Vec::new()),
            status => Err(NoticeError::Status { what, status }),
        }
    }
}

pub(super) async fn probe(md: &Metadata) -> bool {
    let mut imds = Imds {
        md: md.clone(),
        ttl: Duration::from_secs(60),
        token: None,
    };
    imds.token().await.is_ok()
}

pub(super) async fn watch(md: Metadata, timing: Timing, tx: mpsc::Sender<Notice>) {
    let mut imds = Imds {
        md,
        ttl: timing.token_ttl,
        token: None,
    };
    let mut action = Feed::new("AWS spot instance-action");
    let mut rebalance = Feed::new("AWS rebalance recommendation");
    let mut backoff = Backoff::new(&timing);
    while !tx.is_closed() {
        let polled = imds
            .poll("the instance-action request", INSTANCE_ACTION, |body| {
                parse_instance_action(body, SystemTime::now())
            })
            .await;
        let action_ok = action.update(polled, &tx).await;
        let polled = imds
            .poll("the rebalance request", REBALANCE, parse_rebalance)
            .await;
        let rebalance_ok = rebalance.update(polled, &tx).await;
        tokio::time::sleep(backoff.after(action_ok && rebalance_ok)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        rfc3339(text).unwrap()
    }

    #[test]
    fn instance_actions_as_documented() {
        let now = at("2026-12-07T20:58:00Z");
        for action in ["terminate", "stop", "hibernate"] {
            let body = format!(r#"{{"action": "{action}", "time": "2026-12-07T21:00:00Z"}}"#);
            let n = parse_instance_action(&body, now).unwrap();
            assert_eq!(
                n.kind,
                Kind::Reclaim {
                    deadline: at("2026-12-07T21:00:00Z")
                }
            );
            assert_eq!(n.cloud, Cloud::Aws);
            assert!(n.detail.contains(action), "{}", n.detail);
        }
    }

    #[test]
    fn an_instance_action_whose_time_passed_is_due_now() {
        let now = at("2026-12-07T21:05:00Z");
        let n = parse_instance_action(
            r#"{"action":"terminate","time":"2026-12-07T21:00:00Z"}"#,
            now,
        )
        .unwrap();
        assert_eq!(n.kind, Kind::Reclaim { deadline: now });
    }

    #[test]
    fn bad_instance_actions_are_no_notice() {
        let now = SystemTime::now();
        for body in [
            "",
            "<html>502 Bad Gateway</html>",
            r#"{"action":"reboot","time":"2026-12-07T21:00:00Z"}"#,
            r#"{"action":"terminate","time":"tomorrow"}"#,
            r#"{"action":"terminate","time":"Mon, 07 Dec 2026 21:00:00 GMT"}"#,
            r#"{"action":"terminate"}"#,
            r#"{"action":"TERMINATE","time":"2026-12-07T21:00:00Z"}"#,
            r#"["terminate","2026-12-07T21:00:00Z"]"#,
        ] {
            let got = parse_instance_action(body, now);
            assert!(
                matches!(got, Err(NoticeError::Malformed { .. })),
                "{body}: {got:?}"
            );
        }
    }

    #[test]
    fn rebalance_as_documented() {
        let n = parse_rebalance(r#"{"noticeTime": "2020-10-27T08:22:00Z"}"#).unwrap();
        assert_eq!(n.kind, Kind::AtRisk);
        for body in ["", "{}", r#"{"noticeTime": "soon"}"#, "noticeTime"] {
            assert!(parse_rebalance(body).is_err(), "{body}");
        }
    }
}
