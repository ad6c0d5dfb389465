//! HTTP to a metadata service: every request with a deadline, never through a proxy.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Client, RequestBuilder, StatusCode};

use crate::host::client::chain;

#[derive(Debug, thiserror::Error)]
pub enum NoticeError {
    #[error("{0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("cannot reach the metadata service: {0}")]
    Transport(String),
    #[error("the metadata service answered {status} to {what}")]
    Status {
        what: &'static str,
        status: StatusCode,
    },
    #[error("the metadata service's {what} is not understood ({cause}): {body:?}")]
    Malformed {
        what: &'static str,
        cause: String,
        body: String,
    },
}

impl NoticeError {
    pub(super) fn malformed(what: &'static str, cause: impl ToString, body: &str) -> Self {
        // Enough of the body to recognise it in the log, however much garbage came.
        let body = body.chars().take(160).collect();
        NoticeError::Malformed {
            what,
            cause: cause.to_string(),
            body,
        }
    }
}

pub fn check_url(url: &str) -> Result<(), NoticeError> {
    let ok = reqwest::Url::parse(url)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
    if ok {
        Ok(())
    } else {
        Err(NoticeError::BadUrl(url.to_string()))
    }
}

/// One metadata service: its base URL and a client whose requests all have `limit`.
#[derive(Clone)]
pub struct Metadata {
    base: String,
    pub(super) http: Client,
}

pub(super) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Metadata {
    pub fn new(base: &str, limit: Duration) -> Result<Self, NoticeError> {
        check_url(base)?;
        let http = Client::builder()
            .connect_timeout(limit)
            .timeout(limit)
            // The service is link-local: a proxy from the environment could not reach it.
            .no_proxy()
            .build()
            .map_err(|e| NoticeError::Transport(chain(&e)))?;
        Ok(Metadata {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
    }

    pub(super) fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    /// Any status is an answer; only a request that got none is an error.
    pub(super) async fn send(&self, req: RequestBuilder) -> Result<Answer, NoticeError> {
        let transport = |e: reqwest::Error| NoticeError::Transport(chain(&e));
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.text().await.map_err(transport)?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}
