//! HTTP to a metadata service: every request with a deadline, never through a proxy.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Client, RequestBuilder, StatusCode};

use crate::host::client::chain;

/// The largest answer read: the documented ones are a few hundred bytes (Azure's scheduled
/// events a few KiB), and a service that sends more is not to be held in memory.
const MAX_BODY: usize = 64 << 10;

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
    #[error("the metadata service's answer is over {MAX_BODY} bytes")]
    TooLarge,
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
        let mut resp = resp;
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(NoticeError::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
        let body = String::from_utf8_lossy(&bytes).into_owned();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A server that answers every request with `len` bytes of `x`.
    fn answering(len: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&vec![b'x'; len]);
            }
        });
        url
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_is_refused_not_held() {
        for (len, fits) in [(MAX_BODY, true), (MAX_BODY + 1, false), (16 << 20, false)] {
            let md = Metadata::new(&answering(len), Duration::from_secs(10)).unwrap();
            let got = md.send(md.http.get(md.url("/"))).await;
            match got {
                Ok(answer) => assert!(fits && answer.body.len() == len, "{len} bytes read"),
                Err(NoticeError::TooLarge) => assert!(!fits, "{len} bytes refused"),
                Err(e) => panic!("{len} bytes: {e}"),
            }
        }
    }
}
