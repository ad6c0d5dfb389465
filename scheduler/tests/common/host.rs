//! A runner host played over HTTP by a test: enrollment (with a real certificate signing
//! request), heartbeat, long-poll, reports and log uploads.

use rcgen::{CertificateParams, KeyPair};
use serde_json::{json, Value};

use super::{Scheduler, ENROLL_SECRET};

pub struct HostClient {
    pub url: String,
    pub token: String,
    pub id: String,
    pub http: reqwest::Client,
}

impl HostClient {
    /// Enrolls with the tests' enrollment secret.
    pub async fn enroll(s: &Scheduler, name: &str, vcpus: u32, memory_mb: u64) -> HostClient {
        Self::enroll_with(s, ENROLL_SECRET, name, vcpus, memory_mb).await
    }

    pub async fn enroll_with(
        s: &Scheduler,
        secret: &str,
        name: &str,
        vcpus: u32,
        memory_mb: u64,
    ) -> HostClient {
        let (_, csr) = csr(&[]);
        let body = json!({ "name": name, "vcpus": vcpus, "memory_mb": memory_mb, "labels": [], "address": "10.1.2.3:7000", "csr": csr });
        Self::enroll_body(s, secret, &body).await.0
    }

    /// Enrolls with `body`; the client and the whole answer.
    pub async fn enroll_body(s: &Scheduler, secret: &str, body: &Value) -> (HostClient, Value) {
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{}/api/v1/hosts/enroll", s.url))
            .bearer_auth(secret)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let v: Value = resp.json().await.unwrap();
        assert!(v["heartbeat_interval_s"].as_u64().unwrap() >= 1);
        let host = HostClient {
            url: s.url.clone(),
            token: v["token"].as_str().unwrap().to_string(),
            id: v["host"]["id"].as_str().unwrap().to_string(),
            http,
        };
        (host, v)
    }

    pub async fn heartbeat(&self) -> reqwest::StatusCode {
        self.http
            .post(format!("{}/api/v1/host/heartbeat", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .status()
    }

    /// Long-polls; `None` on 204.
    pub async fn assignment(&self, wait_s: u64) -> Option<Value> {
        let resp = self
            .http
            .get(format!("{}/api/v1/host/assignment?wait={wait_s}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            204 => None,
            200 => Some(resp.json().await.unwrap()),
            other => panic!("assignment: {other}"),
        }
    }

    pub async fn upload_log(&self, job: u64, name: &str, log: Vec<u8>) -> reqwest::Response {
        self.http
            .put(format!("{}/api/v1/host/jobs/{job}/logs/{name}", self.url))
            .bearer_auth(&self.token)
            .body(log)
            .send()
            .await
            .unwrap()
    }

    pub async fn report(&self, job: u64, vm_state: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/api/v1/host/jobs/{job}/status", self.url))
            .bearer_auth(&self.token)
            .json(&json!({ "vm_state": vm_state }))
            .send()
            .await
            .unwrap()
    }
}

/// A new ECDSA P-256 key and a certificate signing request for it (PEM) asking for `names`.
pub fn csr(names: &[&str]) -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let pem = CertificateParams::new(names)
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key, pem)
}
