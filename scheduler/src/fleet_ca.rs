//! The fleet's certificate authority. Runner hosts live-migrate VMs to each other over mutual
//! TLS, and a host accepts a peer only with a certificate this CA signed naming
//! `hopper-runner`. The scheduler keeps the CA in its data directory (`fleet-ca.key`, mode 0600,
//! and `fleet-ca.pem`) and signs each host's certificate signing request at enrollment and at
//! renewal. The key never leaves the scheduler: nothing returns it, and neither `Debug` nor any
//! error shows it.

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hopper_api::host::MAX_CSR_BYTES;
use hopper_api::IssuedCertificate;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

pub const KEY_FILE: &str = "fleet-ca.key";
pub const CERT_FILE: &str = "fleet-ca.pem";
pub const CA_NAME: &str = "Hopper fleet CA";
/// The one name in every host certificate: what a migration client checks
/// (`hopper_vmm::migration::transport::PEER_NAME`, which a test compares).
pub const PEER_NAME: &str = "hopper-runner";
/// How long a new CA lasts: hosts' certificates are renewed daily, the CA is meant to stay.
const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Certificates start this far in the past, so that a host whose clock is a little behind
/// accepts a fresh one.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// A host certificate's default lifetime (`--host-cert-validity-hours`).
pub const DEFAULT_HOST_VALIDITY_HOURS: u64 = 24;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("bad certificate signing request: {0}")]
    BadCsr(String),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "the fleet CA key {path} is unusable ({reason}); it was left as it is: restore it from \
         a backup, or move it away to start a new CA (every host then needs a new certificate)"
    )]
    BadKey { path: PathBuf, reason: String },
    #[error(
        "the fleet CA certificate {path} is unusable ({reason}); remove it and the scheduler \
         makes it again from {KEY_FILE}"
    )]
    BadCert { path: PathBuf, reason: String },
    #[error("cannot make a certificate: {0}")]
    Sign(rcgen::Error),
}

/// The CA: its signing key (in memory only) and its certificate.
pub struct FleetCa {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    host_validity: Duration,
}

// By hand: the key stays out of any debug output.
impl fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetCa")
            .field("host_validity", &self.host_validity)
            .finish_non_exhaustive()
    }
}

impl FleetCa {
    /// The CA of `data_dir`, created there if it has none: a new ECDSA P-256 key and a
    /// self-signed certificate for it. A key file that does not parse is an error and is never
    /// replaced: hosts trust the CA it holds. A missing certificate is made again from the key.
    pub fn load_or_create(data_dir: &Path, host_validity: Duration) -> Result<FleetCa, CaError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(io_error("create the data directory", data_dir))?;
        let key_path = data_dir.join(KEY_FILE);
        let cert_path = data_dir.join(CERT_FILE);
        let key = match read_key(&key_path)? {
            Some(key) => key,
            None => create_key(&key_path)?,
        };
        let ca_pem = match fs::read_to_string(&cert_path) {
            Ok(pem) => {
                check_ca_cert(&pem, &key).map_err(|reason| CaError::BadCert {
                    path: cert_path.clone(),
                    reason,
                })?;
                pem
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let pem = self_signed(&key)?;
                write_atomically(&cert_path, pem.as_bytes(), 0o644, true)
                    .map_err(io_error("write the fleet CA certificate", &cert_path))?;
                tracing::info!(path = %cert_path.display(), "made the fleet CA certificate");
                pem
            }
            Err(e) => return Err(io_error("read the fleet CA certificate", &cert_path)(e)),
        };
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| CaError::BadCert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        tracing::info!(path = %cert_path.display(), "fleet CA ready");
        Ok(FleetCa {
            issuer,
            ca_pem,
            host_validity,
        })
    }

    /// A new CA held only in memory (tests).
    pub fn generate(host_validity: Duration) -> Result<FleetCa, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let ca_pem = self_signed(&key)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(CaError::Sign)?;
        Ok(FleetCa {
            issuer,
            ca_pem,
            host_validity,
        })
    }

    /// The CA's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issues host `host_id` a certificate for the key of `csr_pem` (a PEM PKCS#10 request
    /// whose signature must hold, for an ECDSA P-256 key). Only the key is taken from the
    /// request: whatever names or uses it asks for, the certificate names `hopper-runner`
    /// (DNS) and the host id (common name), for TLS server and client authentication, valid
    /// from 5 minutes ago for the host validity.
    pub fn sign(&self, csr_pem: &str, host_id: &str) -> Result<IssuedCertificate, CaError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(CaError::BadCsr(format!("over {MAX_CSR_BYTES} bytes")));
        }
        // Parsing checks the request's signature: whoever sent it holds the key.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CaError::BadCsr(match e {
                rcgen::Error::CouldNotParseCertificationRequest => {
                    "not a PEM PKCS#10 certificate signing request".into()
                }
                rcgen::Error::InvalidCertificationRequestSignature => {
                    "its signature does not verify".into()
                }
                e => e.to_string(),
            })
        })?;
        // The algorithm rcgen reports is the request's signature's; the 65-byte uncompressed
        // point pins the key's curve to P-256 as well.
        let key = &csr.public_key;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 || key.der_bytes().len() != 65 {
            return Err(CaError::BadCsr(
                "the key must be ECDSA P-256, signed with SHA-256".into(),
            ));
        }
        // Whole seconds: what the certificate can hold, so `not_after` is exactly its own.
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 is a valid nanosecond");
        let not_after = now + self.host_validity;
        let mut params = CertificateParams::new(vec![PEER_NAME.to_string()])
            .expect("hopper-runner is a valid DNS name");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host_id);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(key, &self.issuer).map_err(CaError::Sign)?;
        Ok(IssuedCertificate {
            certificate: cert.pem(),
            ca_certificate: self.ca_pem.clone(),
            not_after: not_after.unix_timestamp() * 1000,
        })
    }
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The key in `path`, or `None` if there is no such file.
fn read_key(path: &Path) -> Result<Option<KeyPair>, CaError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read the fleet CA key", path)(e)),
    };
    let bad = |reason: String| CaError::BadKey {
        path: path.to_path_buf(),
        reason,
    };
    let text = String::from_utf8(bytes).map_err(|_| bad("it is not text".into()))?;
    // rcgen's PEM errors may quote the file's bytes; those stay out of the message.
    let key = KeyPair::from_pem(&text).map_err(|e| {
        bad(match e {
            rcgen::Error::PemError(_) => "it is not a PEM private key".into(),
            e => e.to_string(),
        })
    })?;
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the fleet CA key is readable by others than its owner; chmod 600 it");
        }
    }
    Ok(Some(key))
}

/// A new key, stored in `path`; if another scheduler stored one there meanwhile, that one.
fn create_key(path: &Path) -> Result<KeyPair, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
    match write_atomically(path, key.serialize_pem().as_bytes(), 0o600, false) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created a new fleet CA key; back it up: hosts trust only certificates it signs");
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_key(path)?
            .ok_or_else(|| io_error("read the fleet CA key", path)(io::ErrorKind::NotFound.into())),
        Err(e) => Err(io_error("write the fleet CA key", path)(e)),
    }
}

/// A self-signed CA certificate for `key` (PEM).
fn self_signed(key: &KeyPair) -> Result<String, CaError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_NAME.to_string());
    // It signs host certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(key).map_err(CaError::Sign)?;
    Ok(cert.pem())
}

/// Whether `pem` is a CA certificate for `key`; why not if it is not.
fn check_ca_cert(pem: &str, key: &KeyPair) -> Result<(), String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| "it is not a PEM certificate".to_string())?;
    let cert = block
        .parse_x509()
        .map_err(|e| format!("it is not a certificate: {e}"))?;
    if !cert.is_ca() {
        return Err("it is not a CA certificate".into());
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(format!("it is not the certificate of {KEY_FILE}"));
    }
    let left = cert.validity().not_after.timestamp() - OffsetDateTime::now_utc().unix_timestamp();
    if left < 30 * 24 * 3600 {
        tracing::warn!(
            days_left = left / (24 * 3600),
            "the fleet CA certificate expires soon; remove {CERT_FILE} and restart to renew it \
             (the key stays, so hosts' certificates stay valid)"
        );
    }
    Ok(())
}

/// 128 random bits, positive (RFC 5280 serials are positive, at most 20 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes = rand::random::<[u8; 16]>();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Writes `contents` into a new file beside `path` (mode `mode`), flushed to disk, then moves
/// it to `path`, so that a reader sees the whole file or none. With `replace` false an
/// existing `path` is kept (`AlreadyExists`): the move is a hard link, which unlike a rename
/// refuses to replace.
fn write_atomically(path: &Path, contents: &[u8], mode: u32, replace: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.{}.tmp",
        hex::encode(rand::random::<[u8; 8]>())
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        if replace {
            fs::rename(&tmp, path)
        } else {
            fs::hard_link(&tmp, path)
        }
    })();
    let _ = fs::remove_file(&tmp);
    written?;
    // The new name is durable too.
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn csr(names: &[&str]) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_once_private_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let ca = FleetCa::load_or_create(&data, DAY).unwrap();
        let key = fs::read_to_string(data.join(KEY_FILE)).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(mode(&data.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&data), 0o700);
        assert_eq!(
            fs::read_to_string(data.join(CERT_FILE)).unwrap(),
            ca.ca_pem()
        );
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&data).unwrap().count(), 2);
        // The key stays out of debug output.
        let shown = format!("{ca:?}");
        assert!(
            !shown.contains("PRIVATE") && !shown.contains(&key[30..60]),
            "{shown}"
        );

        let again = FleetCa::load_or_create(&data, DAY).unwrap();
        assert_eq!(again.ca_pem(), ca.ca_pem());
        assert_eq!(fs::read_to_string(data.join(KEY_FILE)).unwrap(), key);

        // The certificate is made again from the same key when it is gone: new PEM, same key.
        fs::remove_file(data.join(CERT_FILE)).unwrap();
        let remade = FleetCa::load_or_create(&data, DAY).unwrap();
        assert_ne!(remade.ca_pem(), ca.ca_pem());
        assert_eq!(fs::read_to_string(data.join(KEY_FILE)).unwrap(), key);
        let public = |pem: &str| {
            let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            let cert = block.parse_x509().unwrap();
            cert.public_key().raw.to_vec()
        };
        assert_eq!(public(remade.ca_pem()), public(ca.ca_pem()));
    }

    #[test]
    fn a_corrupt_key_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let secretish =
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n";
        for garbage in [secretish.as_bytes(), b"\xff\xfe not text", b"garbage"] {
            fs::write(&path, garbage).unwrap();
            let err = FleetCa::load_or_create(dir.path(), DAY).unwrap_err();
            assert!(matches!(err, CaError::BadKey { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(!text.contains("bm90IGEga2V5"), "{text}");
            assert_eq!(
                fs::read(&path).unwrap(),
                garbage,
                "the key file was replaced"
            );
            assert!(!dir.path().join(CERT_FILE).exists());
        }
    }

    #[test]
    fn a_certificate_of_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        FleetCa::load_or_create(dir.path(), DAY).unwrap();
        let other = FleetCa::generate(DAY).unwrap();
        fs::write(dir.path().join(CERT_FILE), other.ca_pem()).unwrap();
        let err = FleetCa::load_or_create(dir.path(), DAY).unwrap_err();
        assert!(matches!(err, CaError::BadCert { .. }), "{err}");
        assert!(err.to_string().contains("not the certificate of"), "{err}");
    }

    #[test]
    fn only_the_key_is_taken_from_the_request() {
        let ca = FleetCa::generate(DAY).unwrap();
        let (key, pem) = csr(&["evil.example.com", "hopper-runner", "10.0.0.1"]);
        let before = OffsetDateTime::now_utc().unix_timestamp();
        let issued = ca.sign(&pem, "h-0123").unwrap();
        assert_eq!(issued.ca_certificate, ca.ca_pem());
        let (_, block) = x509_parser::pem::parse_x509_pem(issued.certificate.as_bytes()).unwrap();
        let cert = block.parse_x509().unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(names, [PEER_NAME]);
        assert_eq!(cert.subject().to_string(), "CN=h-0123");
        assert_eq!(cert.issuer().to_string(), format!("CN={CA_NAME}"));
        assert!(!cert.is_ca());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let validity = cert.validity();
        assert_eq!(validity.not_after.timestamp() * 1000, issued.not_after);
        let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(lifetime as u64, (DAY + BACKDATE).as_secs());
        assert!((issued.not_after / 1000 - before - DAY.as_secs() as i64).abs() <= 2);
        // Signed by the CA.
        let (_, ca_block) = x509_parser::pem::parse_x509_pem(ca.ca_pem().as_bytes()).unwrap();
        let ca_cert = ca_block.parse_x509().unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn bad_requests_are_refused() {
        let ca = FleetCa::generate(DAY).unwrap();
        let (_, good) = csr(&[]);
        let bad = |pem: &str| match ca.sign(pem, "h") {
            Err(CaError::BadCsr(reason)) => reason,
            other => panic!("{other:?}"),
        };
        assert!(bad("garbage").contains("not a PEM"));
        // One character changed in the signature: the request ends with it, and the end of
        // the next-to-last base64 line lies within its last 55 bytes.
        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        let n = lines.len();
        let line = &mut lines[n - 3];
        let c = if line.as_bytes()[60] == b'A' {
            "B"
        } else {
            "A"
        };
        line.replace_range(60..61, c);
        let tampered = lines.join("\n");
        assert!(bad(&tampered).contains("signature"), "{}", bad(&tampered));
        // Another curve.
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let other = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&p384)
            .unwrap()
            .pem()
            .unwrap();
        assert!(bad(&other).contains("P-256"));
        assert!(bad(&format!("{good}{}", " ".repeat(MAX_CSR_BYTES))).contains("bytes"));
    }
}
