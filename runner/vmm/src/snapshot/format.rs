//! The snapshot state file: a fixed header (magic, format version, payload length, SHA-256 of
//! the payload) followed by the payload, the VM's state serialized as JSON. A file that is
//! truncated, altered, from another format version or not a snapshot at all is refused before
//! anything is built from it.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

const MAGIC: [u8; 8] = *b"HOPPERVM";
/// Bumped whenever the payload's meaning changes; older or newer files are refused.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = MAGIC.len() + 4 + 8 + 32;
/// No VM state comes near this; a larger length field means a damaged header.
const MAX_PAYLOAD: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}: not a Hopper snapshot (bad magic)")]
    NotASnapshot(String),
    #[error("{path}: snapshot format version {found}; this Hopper reads version {VERSION}")]
    Version { path: String, found: u32 },
    #[error("{path}: truncated ({found} of {expected} bytes)")]
    Truncated {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("{0}: checksum mismatch, the file is damaged")]
    Checksum(String),
    #[error("{path}: state does not parse: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

/// The state file's bytes for `state`: header, then payload.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, serde_json::Error> {
    let payload = serde_json::to_vec(state)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&Sha256::digest(&payload));
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Writes `state` to `path` (which is replaced), durably.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), FormatError> {
    let io_err = |source| FormatError::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = encode(state).map_err(|e| io_err(io::Error::other(e)))?;
    let mut file = File::create(path).map_err(io_err)?;
    file.write_all(&bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

/// Reads and checks the state at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let name = path.display().to_string();
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| FormatError::Io {
            path: name.clone(),
            source,
        })?;
    decode(&bytes, &name)
}

/// Checks and parses the bytes of a state file; `name` says where they came from in errors.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], name: &str) -> Result<T, FormatError> {
    let name = name.to_string();
    let truncated = |expected: u64| FormatError::Truncated {
        path: name.clone(),
        found: bytes.len() as u64,
        expected,
    };
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::NotASnapshot(name.clone()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(truncated(HEADER_LEN as u64));
    }
    let field = |at: usize, len: usize| &bytes[at..at + len];
    let version = u32::from_le_bytes(field(8, 4).try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(FormatError::Version {
            path: name.clone(),
            found: version,
        });
    }
    let len = u64::from_le_bytes(field(12, 8).try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(FormatError::Checksum(name.clone()));
    }
    let expected = HEADER_LEN as u64 + len;
    if (bytes.len() as u64) < expected {
        return Err(truncated(expected));
    }
    let payload = &bytes[HEADER_LEN..expected as usize];
    if Sha256::digest(payload)[..] != *field(20, 32) || bytes.len() as u64 != expected {
        return Err(FormatError::Checksum(name.clone()));
    }
    serde_json::from_slice(payload).map_err(|source| FormatError::Parse { path: name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct State {
        regs: Vec<u64>,
        name: String,
    }

    fn sample() -> State {
        State {
            regs: vec![0xfff0, 7, u64::MAX],
            name: "vcpu0".into(),
        }
    }

    fn written() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        write(&path, &sample()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        (dir, path, bytes)
    }

    #[test]
    fn round_trips() {
        let (_dir, path, bytes) = written();
        assert_eq!(read::<State>(&path).unwrap(), sample());
        assert_eq!(encode(&sample()).unwrap(), bytes);
        assert_eq!(decode::<State>(&bytes, "in memory").unwrap(), sample());
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let (_dir, path, bytes) = written();
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            std::fs::write(&path, &damaged).unwrap();
            assert!(
                read::<State>(&path).is_err(),
                "flip at byte {at} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_wrong_version_and_foreign_files_are_refused() {
        let (_dir, path, bytes) = written();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(
            read::<State>(&path),
            Err(FormatError::Truncated { .. })
        ));
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert!(matches!(
            read::<State>(&path),
            Err(FormatError::Truncated { .. })
        ));

        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        std::fs::write(&path, &newer).unwrap();
        let err = read::<State>(&path).unwrap_err();
        assert!(matches!(err, FormatError::Version { found, .. } if found == VERSION + 1));
        assert!(err.to_string().contains("version 2"), "{err}");

        std::fs::write(&path, b"{\"regs\":[]}").unwrap();
        assert!(matches!(
            read::<State>(&path),
            Err(FormatError::NotASnapshot(_))
        ));
    }
}
