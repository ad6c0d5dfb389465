//! The data directory of `up` and the secrets it makes up when none are given (webhook and
//! enrollment secrets, operator token): both private to the user, since the directory holds
//! the secrets, the store and the jobs' logs.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Creates the data directory (mode 0700) if missing.
pub fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))
}

/// The secret file given, or `<dir>/<name>`, created (mode 0600, 32 random bytes in hex) if it
/// does not exist yet and kept for the next run.
pub fn given_or_generated(given: Option<&Path>, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let path = dir.join(name);
    // create_new: an existing secret is never overwritten, even by a concurrent `up`.
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut file) => {
            let secret = hex::encode(rand::random::<[u8; 32]>());
            file.write_all(format!("{secret}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/.hopper");
        create_data_dir(&data).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        let path = given_or_generated(None, &data, "enroll-secret").unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(first.trim().len(), 64);
        assert_eq!(mode(&path), 0o600);
        given_or_generated(None, &data, "enroll-secret").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        let other = given_or_generated(None, &data, "webhook-secret").unwrap();
        assert_ne!(std::fs::read_to_string(other).unwrap(), first);
        let given = dir.path().join("mine");
        assert_eq!(given_or_generated(Some(&given), &data, "x").unwrap(), given);
        assert!(!data.join("x").exists());
    }
}
