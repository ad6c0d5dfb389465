//! Where the repository's cached artefacts live (built by tests/setup.sh → images/build.sh).

use std::path::{Path, PathBuf};

use crate::HarnessError;

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

pub(crate) fn cache_dir() -> PathBuf {
    repo_root().join(".cache")
}

/// The guest kernel and images made by images/build.sh.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    /// The unpacked kernel's stock bzImage (also what test hosts boot).
    pub vmlinuz: PathBuf,
    /// lib/modules/<release> of the unpacked kernel, with modules.dep.
    pub modules: PathBuf,
    pub release: String,
    /// .cache/images: vmlinuz, initramfs.cpio.gz, rootfs.ext4.
    pub images: PathBuf,
}

impl GuestArtifacts {
    /// Finds the artefacts, or says to run tests/setup.sh.
    pub fn locate() -> Result<Self, HarnessError> {
        Self::locate_in(&cache_dir())
    }

    fn locate_in(cache: &Path) -> Result<Self, HarnessError> {
        let kernel = cache.join("kernel");
        let images = cache.join("images");
        let need = |p: PathBuf| {
            if p.exists() {
                Ok(p)
            } else {
                Err(HarnessError::MissingCache(p))
            }
        };
        let release_file = need(kernel.join("release"))?;
        let release = std::fs::read_to_string(&release_file)
            .map_err(HarnessError::io(format!(
                "reading {}",
                release_file.display()
            )))?
            .trim()
            .to_string();
        for image in ["vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"] {
            need(images.join(image))?;
        }
        Ok(Self {
            vmlinuz: need(kernel.join("vmlinuz"))?,
            modules: need(kernel.join("modules").join("modules.dep"))?
                .parent()
                .unwrap()
                .to_path_buf(),
            release,
            images,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cache_says_to_run_setup() {
        let empty = std::env::temp_dir().join(format!("hopper-empty-cache-{}", std::process::id()));
        let err = GuestArtifacts::locate_in(&empty).unwrap_err().to_string();
        assert!(
            err.contains("run tests/setup.sh") && err.contains("kernel"),
            "{err}"
        );
    }
}
