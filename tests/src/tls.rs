//! Mutual-TLS identities for migration tests: a fleet CA and runner certificates it signs
//! (with the DNS name runners check, "hopper-runner"), made fresh for each test run, and
//! installed into test hosts for `hopper-runner vm migrate` / `vm receive` (and for QEMU's
//! migration over TLS, the benchmark's like-for-like peer).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::{HarnessError, TestHost};

/// The name in every runner certificate (hopper_vmm::migration::transport::PEER_NAME).
const RUNNER_NAME: &str = "hopper-runner";
/// Where a test host keeps its identity.
const DIR: &str = "/etc/hopper/tls";

/// A runner identity: certificate, key and the CA its peers must be signed by (PEM).
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// A CA that signs runner certificates.
pub struct Fleet {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

fn tls_error(e: rcgen::Error) -> HarnessError {
    HarnessError::io("making test certificates")(std::io::Error::other(e))
}

impl Fleet {
    pub fn new(name: &str) -> Result<Fleet, HarnessError> {
        let key = KeyPair::generate().map_err(tls_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = params.self_signed(&key).map_err(tls_error)?;
        Ok(Fleet {
            issuer: Issuer::new(params, key),
            ca_pem: ca.pem(),
        })
    }

    /// A runner certificate signed by this CA.
    pub fn runner(&self) -> Result<Identity, HarnessError> {
        let key = KeyPair::generate().map_err(tls_error)?;
        let params = CertificateParams::new(vec![RUNNER_NAME.to_string()]).map_err(tls_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(tls_error)?;
        Ok(Identity {
            cert: cert.pem(),
            key: key.serialize_pem(),
            ca: self.ca_pem.clone(),
        })
    }
}

impl Identity {
    /// Writes the identity into `host` under `name` and returns the `--tls-*` arguments
    /// that use it.
    pub fn install(&self, host: &TestHost, name: &str) -> Result<String, HarnessError> {
        let dir = install_files(
            host,
            name,
            &[
                ("cert.pem", &self.cert, 0o644),
                ("key.pem", &self.key, 0o600),
                ("ca.pem", &self.ca, 0o644),
            ],
        )?;
        Ok(format!(
            "--tls-cert {dir}/cert.pem --tls-key {dir}/key.pem --tls-ca {dir}/ca.pem"
        ))
    }

    /// Writes the identity into `host` as QEMU's `tls-creds-x509` expects it (one directory
    /// serving as either endpoint) and returns that directory.
    pub fn install_for_qemu(&self, host: &TestHost, name: &str) -> Result<String, HarnessError> {
        install_files(
            host,
            name,
            &[
                ("ca-cert.pem", &self.ca, 0o644),
                ("server-cert.pem", &self.cert, 0o644),
                ("server-key.pem", &self.key, 0o600),
                ("client-cert.pem", &self.cert, 0o644),
                ("client-key.pem", &self.key, 0o600),
            ],
        )
    }
}

/// Writes `files` (name, PEM, mode) into `host`'s directory for identity `name`; returns it.
fn install_files(
    host: &TestHost,
    name: &str,
    files: &[(&str, &String, u32)],
) -> Result<String, HarnessError> {
    let dir = format!("{DIR}/{name}");
    host.sh(&format!("mkdir -p {dir}"))?;
    for (file, pem, mode) in files {
        host.write_file(&format!("{dir}/{file}"), pem.as_bytes(), *mode)?;
    }
    Ok(dir)
}
