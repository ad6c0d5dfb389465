//! This host's identity for mutual TLS with other hosts (live migration): an ECDSA P-256 key
//! made here and kept in `<data-dir>/tls/host.key` (mode 0600, directory 0700), the
//! certificate the scheduler's fleet CA signed for it (`host.pem`) and that CA's certificate
//! (`fleet-ca.pem`). The key never leaves the host: the scheduler gets a signing request.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hopper_api::IssuedCertificate;
use hopper_vmm::migration::transport::PEER_NAME;
use hopper_vmm::migration::TlsFiles;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};

/// The identity's directory in the data directory.
pub const DIR: &str = "tls";

/// Where the identity's files are, as the migration channel reads them.
pub fn tls_files(data_dir: &Path) -> TlsFiles {
    let dir = data_dir.join(DIR);
    TlsFiles {
        cert: dir.join("host.pem"),
        key: dir.join("host.key"),
        ca: dir.join("fleet-ca.pem"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    #[error("the host key {path} is unusable ({reason}); remove it and the host makes a new one")]
    BadKey { path: PathBuf, reason: String },
    #[error("cannot make a certificate signing request: {0}")]
    Csr(rcgen::Error),
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> IdentityError + 'a {
    move |cause| IdentityError::Io {
        what,
        path: path.to_path_buf(),
        cause,
    }
}

/// The host's private key.
pub struct HostKey(KeyPair);

// By hand: nothing of the key in debug output.
impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostKey(..)")
    }
}

impl HostKey {
    /// The key in `data_dir`, or a new one stored there. A new key removes the certificate of
    /// the old one, so that the two are never paired: the host then has no certificate until
    /// it enrolls or renews.
    pub fn load_or_create(data_dir: &Path) -> Result<HostKey, IdentityError> {
        let files = tls_files(data_dir);
        let dir = files.key.parent().expect("in the tls directory");
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("create", dir))?;
        // Also when it existed: the directory holds the key.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_error("restrict", dir))?;
        match fs::read(&files.key) {
            Ok(bytes) => {
                let bad = |reason: &str| IdentityError::BadKey {
                    path: files.key.clone(),
                    reason: reason.into(),
                };
                let text = String::from_utf8(bytes).map_err(|_| bad("it is not text"))?;
                // rcgen's messages may quote the file; they stay out of ours.
                let key = KeyPair::from_pem(&text).map_err(|_| bad("not a PEM private key"))?;
                if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
                    return Err(bad("not an ECDSA P-256 key"));
                }
                Ok(HostKey(key))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key =
                    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::Csr)?;
                match fs::remove_file(&files.cert) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io_error("remove the old certificate", &files.cert)(e))
                    }
                    _ => {}
                }
                write_atomically(&files.key, key.serialize_pem().as_bytes(), 0o600)
                    .map_err(io_error("store the host key in", &files.key))?;
                tracing::info!(path = %files.key.display(), "made a new host key");
                Ok(HostKey(key))
            }
            Err(e) => Err(io_error("read the host key", &files.key)(e)),
        }
    }

    /// A certificate signing request for this key (PEM). It asks for `hopper-runner`, though
    /// the CA decides what the certificate says.
    pub fn csr(&self) -> Result<String, IdentityError> {
        let mut params =
            CertificateParams::new(vec![PEER_NAME.to_string()]).map_err(IdentityError::Csr)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .serialize_request(&self.0)
            .and_then(|csr| csr.pem())
            .map_err(IdentityError::Csr)
    }
}

/// Stores what the CA issued: the CA's certificate, then the host's, each replacing its file
/// whole.
pub fn store(data_dir: &Path, issued: &IssuedCertificate) -> Result<(), IdentityError> {
    let files = tls_files(data_dir);
    write_atomically(&files.ca, issued.ca_certificate.as_bytes(), 0o644)
        .map_err(io_error("store the fleet CA certificate in", &files.ca))?;
    write_atomically(&files.cert, issued.certificate.as_bytes(), 0o644)
        .map_err(io_error("store the host certificate in", &files.cert))
}

/// When the certificate in `data_dir` is due for renewal: once less than half of its validity
/// is left, so that a scheduler down for a while does not leave the host without one. Now
/// (the epoch) when there is no usable certificate or no CA certificate.
pub fn renewal_due(data_dir: &Path) -> SystemTime {
    let files = tls_files(data_dir);
    let validity = fs::read(&files.cert).ok().and_then(|pem| {
        let (_, block) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
        let cert = block.parse_x509().ok()?;
        let v = cert.validity();
        Some((v.not_before.timestamp(), v.not_after.timestamp()))
    });
    match validity {
        Some((from, until)) if until > from && files.ca.is_file() => {
            let half_way = from + (until - from) / 2;
            SystemTime::UNIX_EPOCH + Duration::from_secs(half_way.max(0) as u64)
        }
        _ => SystemTime::UNIX_EPOCH,
    }
}

/// Writes `contents` into a new file beside `path` (mode `mode`), flushed, then renames it to
/// `path`: a reader sees the old file or the new one, never part of one.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateSigningRequestParams, IsCa, Issuer};

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A certificate for `key`'s request valid from `from` to `until` (seconds since the
    /// epoch), as a fleet CA would issue it.
    pub(crate) fn issue(csr: &str, from: i64, until: i64) -> IssuedCertificate {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let mut request = CertificateSigningRequestParams::from_pem(csr).unwrap();
        request.params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        request.params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
        IssuedCertificate {
            certificate: request.signed_by(&issuer).unwrap().pem(),
            ca_certificate: ca.pem(),
            not_after: until * 1000,
        }
    }

    #[test]
    fn the_key_is_private_kept_and_its_certificate_renewed_half_way() {
        let dir = tempfile::tempdir().unwrap();
        let files = tls_files(dir.path());
        // No certificate yet: due now.
        let key = HostKey::load_or_create(dir.path()).unwrap();
        assert_eq!(renewal_due(dir.path()), SystemTime::UNIX_EPOCH);
        assert_eq!(mode(&files.key), 0o600);
        assert_eq!(mode(files.key.parent().unwrap()), 0o700);
        let pem = fs::read_to_string(&files.key).unwrap();
        assert!(!format!("{key:?}").contains(&pem[30..50]));

        let csr = key.csr().unwrap();
        store(dir.path(), &issue(&csr, 1_000_000, 1_086_400)).unwrap();
        assert_eq!(
            renewal_due(dir.path()),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_043_200)
        );
        // The same key again, and its certificate stays.
        let again = HostKey::load_or_create(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(&files.key).unwrap(), pem);
        assert_eq!(again.0.public_key_raw(), key.0.public_key_raw());
        assert!(files.cert.exists());
        // The files are what the migration channel reads.
        files.client_config().unwrap();
        files.server_config().unwrap();
        // Without the CA's certificate the host renews at once.
        fs::remove_file(&files.ca).unwrap();
        assert_eq!(renewal_due(dir.path()), SystemTime::UNIX_EPOCH);
        store(dir.path(), &issue(&csr, 1_000_000, 1_086_400)).unwrap();

        // A lost key: a new one, and the old certificate goes with the old key.
        fs::remove_file(&files.key).unwrap();
        let new = HostKey::load_or_create(dir.path()).unwrap();
        assert_ne!(new.0.public_key_raw(), key.0.public_key_raw());
        assert!(!files.cert.exists());
        assert_eq!(renewal_due(dir.path()), SystemTime::UNIX_EPOCH);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(files.key.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn an_unusable_key_is_named_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let files = tls_files(dir.path());
        fs::create_dir_all(files.key.parent().unwrap()).unwrap();
        fs::write(&files.key, "garbage").unwrap();
        let err = HostKey::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::BadKey { .. }), "{err}");
        assert_eq!(fs::read_to_string(&files.key).unwrap(), "garbage");
    }

    #[test]
    fn the_request_is_signed_by_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = HostKey::load_or_create(dir.path()).unwrap();
        let parsed = CertificateSigningRequestParams::from_pem(&key.csr().unwrap()).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&parsed.public_key),
            key.0.public_key_raw()
        );
    }
}
