//! The scheduler as the fleet's CA, end to end: the real binary signs hosts' certificate
//! signing requests at enrollment and renewal, and the certificates it issues carry two hosts
//! through a real mutual-TLS handshake of the migration channel (hopper-vmm's transport).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::host::{csr, HostClient};
use common::{Scheduler, ENROLL_SECRET};
use hopper_scheduler::fleet_ca::{CERT_FILE, KEY_FILE};
use hopper_vmm::migration::transport::{self, Listener, TlsFiles, PEER_NAME};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{json, Value};
use x509_parser::extensions::GeneralName;

fn new_host(name: &str, csr: &str) -> Value {
    json!({"name": name, "vcpus": 2, "memory_mb": 4096, "labels": [], "address": "10.0.0.1", "csr": csr})
}

/// The DNS names, the subject and the expiry (seconds) of a PEM certificate.
fn inspect(pem: &str) -> (Vec<String>, String, i64) {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = block.parse_x509().unwrap();
    let names = cert
        .subject_alternative_name()
        .unwrap()
        .expect("a subject alternative name")
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    (
        names,
        cert.subject().to_string(),
        cert.validity().not_after.timestamp(),
    )
}

/// Writes a host's identity into `dir` as the migration channel reads it.
fn install(dir: &Path, name: &str, cert: &str, key: &KeyPair, ca: &str) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join(format!("{name}-ca.pem")),
    };
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    std::fs::write(&files.ca, ca).unwrap();
    files
}

/// Whether `client` gets through a mutual-TLS handshake with `server` and one message across.
fn handshake(server: &TlsFiles, client: &TlsFiles) -> bool {
    let listener = Listener::bind("127.0.0.1:0", server.server_config().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // Only an authenticated peer is accepted; a refused one leaves the wait to time out.
    let accepted = std::thread::spawn(move || {
        let mut channel = listener.accept_more(Duration::from_secs(5)).ok()?;
        let mut got = [0u8; 5];
        channel.read_exact(&mut got).ok()?;
        Some(got)
    });
    // A refused client may learn it only at its first read or write, so whether it got in is
    // the listener's to say.
    if let Ok(mut channel) = transport::connect(&addr, client.client_config().unwrap()) {
        let _ = channel.write_all(b"hello").and_then(|()| channel.flush());
    }
    accepted.join().unwrap() == Some(*b"hello")
}

/// A certificate for `key` naming `hopper-runner` from a CA that is not the fleet's, though
/// it calls itself the same.
fn outsider(key: &KeyPair) -> (String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Hopper fleet CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let cert = CertificateParams::new(vec![PEER_NAME.to_string()])
        .unwrap()
        .signed_by(key, &issuer)
        .unwrap();
    (cert.pem(), ca.pem())
}

async fn renew(s: &Scheduler, token: Option<&str>, csr: &str) -> reqwest::Response {
    let mut req = s
        .client()
        .post(format!("{}/api/v1/host/certificate", s.url))
        .json(&json!({ "csr": csr }));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_get_certificates_that_carry_a_mutual_tls_handshake() {
    assert_eq!(PEER_NAME, hopper_scheduler::fleet_ca::PEER_NAME);
    let dir = tempfile::tempdir().unwrap();
    let tls = tempfile::tempdir().unwrap();
    let s = Scheduler::start(dir.path(), &[]);
    let data = dir.path().join("data");
    let ca_file = std::fs::read_to_string(data.join(CERT_FILE)).unwrap();
    let ca_key = std::fs::read_to_string(data.join(KEY_FILE)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(data.join(KEY_FILE))
                .unwrap()
                .permissions()
        ) & 0o777,
        0o600
    );

    // Host A asks for other names (and for hopper-runner among them); host B for none.
    let (key_a, csr_a) = csr(&["evil.example.com", PEER_NAME, "10.9.9.9"]);
    let (a, enrolled_a) = HostClient::enroll_body(&s, ENROLL_SECRET, &new_host("a", &csr_a)).await;
    let (key_b, csr_b) = csr(&[]);
    let (b, enrolled_b) = HostClient::enroll_body(&s, ENROLL_SECRET, &new_host("b", &csr_b)).await;
    let issued_a = &enrolled_a["certificate"];
    let issued_b = &enrolled_b["certificate"];
    for (host, issued) in [(&a, issued_a), (&b, issued_b)] {
        assert_eq!(issued["ca_certificate"], ca_file.as_str());
        let (names, subject, not_after) = inspect(issued["certificate"].as_str().unwrap());
        assert_eq!(names, [PEER_NAME], "only hopper-runner, whatever was asked");
        assert_eq!(subject, format!("CN={}", host.id));
        assert_eq!(not_after * 1000, issued["not_after"].as_i64().unwrap());
        // The default validity: 24 hours from now.
        let left = not_after * 1000 - hopper_scheduler::now_ms();
        assert!((left - 24 * 3_600_000).abs() < 60_000, "{left} ms left");
    }

    // Two hosts with their issued certificates complete a mutual-TLS handshake, each way.
    let pem = |v: &Value, field: &str| v[field].as_str().unwrap().to_string();
    let files_a = install(
        tls.path(),
        "a",
        &pem(issued_a, "certificate"),
        &key_a,
        &pem(issued_a, "ca_certificate"),
    );
    let files_b = install(
        tls.path(),
        "b",
        &pem(issued_b, "certificate"),
        &key_b,
        &pem(issued_b, "ca_certificate"),
    );
    assert!(handshake(&files_a, &files_b), "B could not reach A");
    assert!(handshake(&files_b, &files_a), "A could not reach B");
    // A certificate for the same key and name from another CA does not get through.
    let (foreign_cert, foreign_ca) = outsider(&key_b);
    let foreign = install(tls.path(), "foreign", &foreign_cert, &key_b, &foreign_ca);
    assert!(
        !handshake(&files_a, &foreign),
        "a foreign certificate was accepted"
    );

    // Refused requests store no host.
    let hosts = s.get_json("/api/v1/hosts").await.as_array().unwrap().len();
    assert_eq!(hosts, 2);
    let garbage =
        "-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n";
    let (_, missing_header) = csr(&[]);
    for (bad, why) in [
        (new_host("c", garbage), "not a PEM PKCS#10"),
        (new_host("c", &missing_header[10..]), "csr must be"),
        (
            json!({"name": "c", "vcpus": 2, "memory_mb": 4096, "address": "x"}),
            "csr",
        ),
    ] {
        let resp = s
            .client()
            .post(format!("{}/api/v1/hosts/enroll", s.url))
            .bearer_auth(ENROLL_SECRET)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let error: Value = resp.json().await.unwrap();
        assert!(error["error"].as_str().unwrap().contains(why), "{error}");
    }
    assert_eq!(
        s.get_json("/api/v1/hosts").await.as_array().unwrap().len(),
        hosts
    );

    // Renewal takes the host's token, and gives a certificate that lasts longer (whole
    // seconds: the wait makes the difference).
    let (key_a2, csr_a2) = csr(&["other.example.com"]);
    assert_eq!(renew(&s, None, &csr_a2).await.status(), 401);
    assert_eq!(renew(&s, Some("hht_unknown"), &csr_a2).await.status(), 401);
    assert_eq!(renew(&s, Some(ENROLL_SECRET), &csr_a2).await.status(), 401);
    assert_eq!(renew(&s, Some(&a.token), garbage).await.status(), 400);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = renew(&s, Some(&a.token), &csr_a2).await;
    assert_eq!(resp.status(), 200);
    let renewed: Value = resp.json().await.unwrap();
    assert!(renewed["not_after"].as_i64() > issued_a["not_after"].as_i64());
    let (names, subject, _) = inspect(renewed["certificate"].as_str().unwrap());
    assert_eq!(
        (names, subject),
        (vec![PEER_NAME.to_string()], format!("CN={}", a.id))
    );
    let files_a2 = install(
        tls.path(),
        "a2",
        &pem(&renewed, "certificate"),
        &key_a2,
        &pem(&renewed, "ca_certificate"),
    );
    assert!(
        handshake(&files_b, &files_a2),
        "the renewed certificate is refused"
    );

    // The CA survives a restart: same certificate, and what it issued before stays good.
    let s = s.restart();
    assert_eq!(
        std::fs::read_to_string(data.join(CERT_FILE)).unwrap(),
        ca_file
    );
    let resp = renew(&s, Some(&b.token), &csr_b).await;
    assert_eq!(resp.status(), 200);
    let after: Value = resp.json().await.unwrap();
    assert_eq!(after["ca_certificate"], ca_file.as_str());
    let files_b2 = install(
        tls.path(),
        "b2",
        &pem(&after, "certificate"),
        &key_b,
        &pem(&after, "ca_certificate"),
    );
    assert!(
        handshake(&files_a, &files_b2),
        "certificates before and after a restart differ in CA"
    );

    // The CA key is in no log line, at any level.
    let key_body: String = ca_key.lines().filter(|l| !l.starts_with("-----")).collect();
    let logs = s.all_logs();
    assert!(logs.contains("fleet CA ready"), "{logs}");
    for part in key_body.as_bytes().chunks_exact(24) {
        assert!(
            !logs.contains(std::str::from_utf8(part).unwrap()),
            "CA key in the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduler_with_a_corrupt_ca_key_does_not_start_and_keeps_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join(KEY_FILE), "not a key").unwrap();
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Scheduler::start(dir.path(), &[])
    }));
    let message = match started {
        Ok(_) => panic!("the scheduler started with a corrupt CA key"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(message.contains("fleet CA key"), "{message}");
    assert_eq!(
        std::fs::read_to_string(data.join(KEY_FILE)).unwrap(),
        "not a key"
    );
}
