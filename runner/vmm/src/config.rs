//! What a VM is made of, as the operator describes it, and the checks made before anything is
//! created: a config that passes [`VmConfig::validate`] names readable files and sane sizes.

use crate::layout::MAX_VCPUS;
use std::path::{Path, PathBuf};

/// Smallest guest that can hold a kernel, its initramfs and the boot structures.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest guest (1 TiB): beyond this the request is a typo, not a plan.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 pci=off";

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub rootfs_read_only: bool,
    pub cpus: u8,
    pub memory_mib: u64,
    pub cmdline: String,
    pub net: Option<NetConfig>,
    /// Unix socket path for the guest agent channel (virtio-console).
    pub agent_socket: Option<PathBuf>,
    /// Unix socket path for the control API (pause, resume, stop).
    pub api_socket: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{what} {path}: {source}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Cpus(u8),
    #[error("--memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0}")]
    Memory(u64),
    #[error("--memory {requested} MiB is more than this host has ({available} MiB)")]
    MemoryExceedsHost { requested: u64, available: u64 },
    #[error("{what} {path} already exists; remove it or choose another path")]
    SocketExists { what: &'static str, path: PathBuf },
}

fn check_file(what: &'static str, path: &Path, write: bool) -> Result<(), ConfigError> {
    let unreadable = |source| ConfigError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(unreadable(std::io::Error::other("not a regular file")));
    }
    if meta.len() == 0 {
        return Err(ConfigError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn host_memory_mib() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| (pages as u64 * size as u64) >> 20)
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if let Some(available) = host_memory_mib() {
            if self.memory_mib > available {
                return Err(ConfigError::MemoryExceedsHost {
                    requested: self.memory_mib,
                    available,
                });
            }
        }
        check_file("kernel", &self.kernel, false)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd, false)?;
        }
        if let Some(rootfs) = &self.rootfs {
            check_file("rootfs", rootfs, !self.rootfs_read_only)?;
        }
        for (what, path) in [
            ("agent socket", &self.agent_socket),
            ("API socket", &self.api_socket),
        ] {
            if let Some(path) = path {
                if path.exists() {
                    return Err(ConfigError::SocketExists {
                        what,
                        path: path.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kernel: &Path) -> VmConfig {
        VmConfig {
            kernel: kernel.to_path_buf(),
            initrd: None,
            rootfs: None,
            rootfs_read_only: false,
            cpus: 1,
            memory_mib: 128,
            cmdline: DEFAULT_CMDLINE.into(),
            net: None,
            agent_socket: None,
            api_socket: None,
        }
    }

    #[test]
    fn refuses_missing_empty_and_absurd() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        assert!(matches!(
            config(&kernel).validate(),
            Err(ConfigError::Unreadable { .. })
        ));
        std::fs::write(&kernel, b"").unwrap();
        assert!(matches!(
            config(&kernel).validate(),
            Err(ConfigError::Empty { .. })
        ));
        std::fs::write(&kernel, b"x").unwrap();
        config(&kernel).validate().unwrap();
        let mut c = config(&kernel);
        c.memory_mib = 1 << 40;
        assert!(matches!(c.validate(), Err(ConfigError::Memory(_))));
        c.memory_mib = MAX_MEMORY_MIB;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryExceedsHost { .. })
        ));
        let mut c = config(&kernel);
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus(0))));
    }
}
