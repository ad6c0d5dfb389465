//! Enrollment: the host trades the shared enrollment secret for its own token once, and keeps
//! the token in the data directory (mode 0600) so that a restarted daemon is the same host to
//! the scheduler, with the same jobs, instead of a new one. The enrollment also brings the
//! host's first certificate (`identity`), signed from the request in [`NewHost::csr`].

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use hopper_api::{NewHost, Secret};

use super::client::{ApiError, SchedulerClient};
use super::identity::{self, IdentityError};

pub const FILE: &str = "host-credentials.json";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("cannot read the host credentials {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "the host credentials {path} are not valid JSON ({cause}); remove the file to enroll again"
    )]
    Corrupt {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("cannot store the host credentials in {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("enrollment failed")]
    Api(#[from] ApiError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// This host's identity at one scheduler.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub host_id: String,
    pub token: Secret,
    pub heartbeat_interval: Duration,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    scheduler: String,
    host_id: String,
    token: String,
    heartbeat_interval_s: u64,
}

fn load(path: &Path, scheduler: &str) -> Result<Option<Credentials>, EnrollError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(cause) => {
            return Err(EnrollError::Read {
                path: path.into(),
                cause,
            })
        }
    };
    let stored: Stored = serde_json::from_str(&text).map_err(|cause| EnrollError::Corrupt {
        path: path.into(),
        cause,
    })?;
    // A token is only good at the scheduler that issued it.
    if stored.scheduler != scheduler {
        tracing::info!(
            stored = %stored.scheduler,
            scheduler,
            "stored host credentials belong to another scheduler; enrolling again"
        );
        return Ok(None);
    }
    Ok(Some(Credentials {
        host_id: stored.host_id,
        token: Secret::new(stored.token),
        heartbeat_interval: Duration::from_secs(stored.heartbeat_interval_s.max(1)),
    }))
}

fn store(path: &Path, scheduler: &str, creds: &Credentials) -> Result<(), EnrollError> {
    let err = |cause| EnrollError::Write {
        path: path.into(),
        cause,
    };
    let tmp = path.with_extension("json.tmp");
    let _ = fs::remove_file(&tmp);
    let stored = Stored {
        scheduler: scheduler.to_string(),
        host_id: creds.host_id.clone(),
        token: creds.token.expose().to_string(),
        heartbeat_interval_s: creds.heartbeat_interval.as_secs(),
    };
    // Created 0600 from the start: the token is never readable by others, even briefly.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(
        serde_json::to_string(&stored)
            .expect("plain strings serialize")
            .as_bytes(),
    )
    .map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(err)
}

/// The stored credentials for this scheduler, or new ones from enrolling.
pub async fn load_or_enroll(
    client: &SchedulerClient,
    data_dir: &Path,
    enroll_secret: &Secret,
    info: &NewHost,
) -> Result<Credentials, EnrollError> {
    let path = data_dir.join(FILE);
    if let Some(creds) = load(&path, client.base())? {
        tracing::info!(host = %creds.host_id, "using stored host credentials");
        return Ok(creds);
    }
    enroll(client, data_dir, enroll_secret, info).await
}

/// Enrolls as a new host and stores the token, replacing stored credentials, then the
/// certificate. In that order: a host whose certificate could not be stored renews it at its
/// next start, while a token not stored would mean enrolling as another host.
pub async fn enroll(
    client: &SchedulerClient,
    data_dir: &Path,
    enroll_secret: &Secret,
    info: &NewHost,
) -> Result<Credentials, EnrollError> {
    let enrolled = client.enroll(enroll_secret, info).await?;
    let creds = Credentials {
        host_id: enrolled.host.id,
        token: enrolled.token,
        heartbeat_interval: Duration::from_secs(enrolled.heartbeat_interval_s.max(1)),
    };
    store(&data_dir.join(FILE), client.base(), &creds)?;
    identity::store(data_dir, &enrolled.certificate)?;
    tracing::info!(host = %creds.host_id, name = %info.name, cert_not_after = enrolled.certificate.not_after, "enrolled with the scheduler");
    Ok(creds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_with_mode_0600_and_only_for_their_scheduler() {
        let dir = std::env::temp_dir().join(format!("hopper-creds-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE);
        let creds = Credentials {
            host_id: "h1".into(),
            token: Secret::new("hht_x"),
            heartbeat_interval: Duration::from_secs(20),
        };
        store(&path, "http://s:1", &creds).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = load(&path, "http://s:1").unwrap().unwrap();
        assert_eq!(
            (back.host_id.as_str(), back.token.expose()),
            ("h1", "hht_x")
        );
        assert!(load(&path, "http://other:1").unwrap().is_none());
        fs::write(&path, "{").unwrap();
        assert!(matches!(
            load(&path, "http://s:1"),
            Err(EnrollError::Corrupt { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
