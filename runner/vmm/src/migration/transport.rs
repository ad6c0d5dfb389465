//! The migration channel: TCP with mutual TLS. Both runners present a certificate signed by
//! the fleet's CA and accept only a peer whose certificate that CA signed, so no
//! unauthenticated peer can push a VM into a runner or pull one out of it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The name every runner's certificate carries (as a DNS subject alternative name); the
/// client checks it, the CA vouches for the rest.
pub const PEER_NAME: &str = "hopper-runner";

/// A peer that stops answering for this long is taken as gone.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// PEM files of this runner's identity and of the CA its peers must be signed by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the TLS configuration is unusable: {0}")]
    Config(String),
    #[error("cannot {what}: {source}")]
    Io { what: String, source: io::Error },
}

/// A byte stream to the peer.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}
pub type Channel = Box<dyn Stream>;

fn pem_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(String) -> TransportError + 'a {
    move |reason| TransportError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    }
}

struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

impl TlsFiles {
    fn load(&self) -> Result<Identity, TransportError> {
        let certs = read_certs(&self.cert, "certificate")?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| pem_error("private key", &self.key)(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&self.ca, "CA certificate")? {
            roots
                .add(ca)
                .map_err(|e| pem_error("CA certificate", &self.ca)(e.to_string()))?;
        }
        Ok(Identity {
            certs,
            key,
            roots: Arc::new(roots),
        })
    }

    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TransportError> {
        let id = self.load()?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_root_certificates(id.roots)
            .with_client_auth_cert(id.certs, id.key)
            .map_err(config_error)?;
        Ok(Arc::new(config))
    }

    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TransportError> {
        let id = self.load()?;
        let verifier = WebPkiClientVerifier::builder_with_provider(id.roots, provider())
            .build()
            .map_err(config_error)?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.certs, id.key)
            .map_err(config_error)?;
        Ok(Arc::new(config))
    }
}

/// TLS 1.3 only (every peer is a Hopper runner) with ring's suites, AES-128-GCM first: every
/// byte of a VM is encrypted once and decrypted once, and AES-128 takes 10 rounds per block
/// where AES-256 takes 14 (about a tenth less time per byte, with or without AES-NI), with a
/// security margin ample for a link that lives minutes.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::*;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn config_error(e: impl std::fmt::Display) -> TransportError {
    TransportError::Config(e.to_string())
}

fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(what, path)(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(what, path)("no certificate in it".into()));
    }
    Ok(certs)
}

fn tuned(tcp: TcpStream) -> io::Result<TcpStream> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(tcp)
}

/// Connects to the receiving runner at `addr` and completes the TLS handshake.
pub fn connect(addr: &str, config: Arc<ClientConfig>) -> Result<Channel, TransportError> {
    connect_closable(addr, config).map(|(channel, _)| channel)
}

/// Shuts a connection down from another thread, so that a thread blocked on it returns.
pub struct Closer(TcpStream);

impl Closer {
    pub fn close(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// [`connect`], with a way to shut the connection down while another thread uses it.
pub fn connect_closable(
    addr: &str,
    config: Arc<ClientConfig>,
) -> Result<(Channel, Closer), TransportError> {
    let io_error = |what: &str| {
        let what = format!("{what} {addr}");
        move |source| TransportError::Io { what, source }
    };
    let target = addr
        .to_socket_addrs()
        .map_err(io_error("resolve"))?
        .next()
        .ok_or_else(|| io_error("resolve")(io::Error::other("no address")))?;
    let tcp = TcpStream::connect_timeout(&target, IO_TIMEOUT)
        .and_then(tuned)
        .map_err(io_error("connect to"))?;
    let closer = Closer(
        tcp.try_clone()
            .map_err(io_error("duplicate the connection to"))?,
    );
    let name = ServerName::try_from(PEER_NAME).expect("a valid DNS name");
    let conn = ClientConnection::new(config, name).map_err(config_error)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    // Handshake now, so that a refused identity shows up here rather than mid-transfer.
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(io_error("authenticate the migration peer at"))?;
    }
    Ok((Box::new(stream), closer))
}

/// Listens for one authenticated source.
pub struct Listener {
    tcp: TcpListener,
    config: Arc<ServerConfig>,
}

impl Listener {
    pub fn bind(addr: &str, config: Arc<ServerConfig>) -> Result<Listener, TransportError> {
        let tcp = TcpListener::bind(addr).map_err(|source| TransportError::Io {
            what: format!("listen on {addr}"),
            source,
        })?;
        Ok(Listener { tcp, config })
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }

    /// Waits for a peer that completes the TLS handshake with a certificate the CA signed;
    /// peers that do not are logged and turned away.
    pub fn accept(&self) -> Result<Channel, TransportError> {
        self.accept_until(None)
    }

    /// A further connection of the source already accepted (more streams, the pull
    /// channel), which must come within `patience`: peers turned away meanwhile do not
    /// extend it.
    pub fn accept_more(&self, patience: Duration) -> Result<Channel, TransportError> {
        self.accept_until(Some(Instant::now() + patience))
    }

    fn accept_until(&self, deadline: Option<Instant>) -> Result<Channel, TransportError> {
        loop {
            if let Some(deadline) = deadline {
                self.wait_for_peer(deadline)?;
            }
            let (tcp, peer) = self.tcp.accept().map_err(|source| TransportError::Io {
                what: "accept a migration connection".into(),
                source,
            })?;
            let conn = ServerConnection::new(self.config.clone()).map_err(config_error)?;
            let mut stream = match tuned(tcp) {
                Ok(tcp) => rustls::StreamOwned::new(conn, tcp),
                Err(e) => {
                    log::warn!("migration connection from {peer}: {e}");
                    continue;
                }
            };
            let mut handshake = Ok(());
            while handshake.is_ok() && stream.conn.is_handshaking() {
                handshake = stream.conn.complete_io(&mut stream.sock).map(|_| ());
            }
            match handshake {
                Ok(()) => {
                    log::info!("migration source {peer} authenticated");
                    return Ok(Box::new(stream));
                }
                Err(e) => log::warn!("refused migration connection from {peer}: {e}"),
            }
        }
    }

    /// Returns once a connection waits to be accepted, or fails at `deadline`.
    fn wait_for_peer(&self, deadline: Instant) -> Result<(), TransportError> {
        let mut fd = libc::pollfd {
            fd: self.tcp.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Rounded up, so that a timeout means the deadline has passed.
        let left_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_micros()
            .div_ceil(1000);
        // SAFETY: one valid pollfd for the listening socket, which outlives the call.
        let ready = unsafe { libc::poll(&mut fd, 1, left_ms.min(i32::MAX as u128) as i32) };
        match ready {
            1.. => Ok(()),
            _ => Err(TransportError::Io {
                what: "accept the source's further connection".into(),
                source: match ready {
                    0 => io::ErrorKind::TimedOut.into(),
                    _ => io::Error::last_os_error(),
                },
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    /// A CA and one runner identity it signs, written as PEM files into `dir`.
    pub(crate) fn identity(dir: &Path, name: &str) -> TlsFiles {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![PEER_NAME.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let files = TlsFiles {
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
            ca: dir.join(format!("{name}-ca.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, ca.pem()).unwrap();
        files
    }

    #[test]
    fn only_peers_signed_by_the_fleet_ca_get_through() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = identity(dir.path(), "fleet");
        let outsider = identity(dir.path(), "outsider");
        let listener = Listener::bind("127.0.0.1:0", fleet.server_config().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let mut channel = listener.accept().unwrap();
            let mut got = [0u8; 5];
            channel.read_exact(&mut got).unwrap();
            got
        });
        // The outsider is turned away (the listener keeps waiting), then a fleet member talks.
        let refused = connect(&addr, outsider.client_config().unwrap()).and_then(|mut c| {
            c.write_all(b"x")
                .and_then(|_| c.flush())
                .map_err(|source| TransportError::Io {
                    what: "write".into(),
                    source,
                })
        });
        assert!(refused.is_err(), "a foreign certificate was accepted");
        let mut channel = connect(&addr, fleet.client_config().unwrap()).unwrap();
        channel.write_all(b"hello").unwrap();
        channel.flush().unwrap();
        assert_eq!(&server.join().unwrap(), b"hello");
    }

    #[test]
    fn a_further_connection_must_come_in_time_even_past_refused_peers() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = identity(dir.path(), "fleet");
        let outsider = identity(dir.path(), "outsider");
        let listener = Listener::bind("127.0.0.1:0", fleet.server_config().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let patience = Duration::from_millis(300);

        let started = Instant::now();
        let err = listener
            .accept_more(patience)
            .err()
            .expect("nobody connected");
        assert!(started.elapsed() >= patience, "gave up early");
        assert!(err.to_string().contains("further connection"), "{err}");

        // A refused peer does not restart the wait, nor does the wait end at it.
        let started = Instant::now();
        let knocking =
            std::thread::spawn(move || connect(&addr, outsider.client_config().unwrap()));
        assert!(listener.accept_more(patience).is_err());
        let waited = started.elapsed();
        assert!(waited >= patience, "gave up at the refused peer");
        assert!(waited < patience * 3, "waited past the deadline");
        let _ = knocking.join();
    }

    #[test]
    fn unreadable_identity_files_are_named() {
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            ca: "/nonexistent/ca.pem".into(),
        };
        let err = files.client_config().err().unwrap().to_string();
        assert!(err.contains("certificate /nonexistent/cert.pem"), "{err}");
    }
}
