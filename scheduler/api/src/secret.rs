//! Values that must never reach a log line or an API answer by accident: the webhook secret,
//! the enrollment secret, host tokens, JIT configs.

use std::fmt;
use std::path::Path;

use secrecy::{ExposeSecret, SecretString};

/// A secret string. `Debug` and `Display` print `[redacted]`; it has no `Serialize`, so it only
/// leaves the process through [`Secret::expose`] or a field marked
/// `#[serde(serialize_with = "hopper_api::secret::serialize_exposed")]`. Its memory is zeroed
/// when dropped.
#[derive(Clone)]
pub struct Secret(SecretString);

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read the secret file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the secret file {0} is empty")]
    Empty(String),
    /// Refused rather than trimmed: one side trimming and the other not would make the same
    /// file work for one and fail for the other.
    #[error("the secret in {0} starts or ends with white space; remove it")]
    Padded(String),
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// Reads a secret file: its contents without the line ending an editor adds.
    pub fn from_file(path: &Path) -> Result<Self, SecretFileError> {
        let name = || path.display().to_string();
        let raw = std::fs::read_to_string(path).map_err(|source| SecretFileError::Read {
            path: name(),
            source,
        })?;
        let value = raw.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(SecretFileError::Empty(name()));
        }
        if value.trim() != value {
            return Err(SecretFileError::Padded(name()));
        }
        Ok(Secret::new(value))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Writes the secret's value: for the one field of an answer that exists to carry it.
pub fn serialize_exposed<S: serde::Serializer>(secret: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(secret.expose())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_hides_the_value() {
        let s = Secret::new("hht_abc");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hht_abc");
    }

    #[test]
    fn a_secret_file_loses_its_line_ending_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("hopper-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Secret::from_file(&path)
        };
        assert_eq!(file("unix", "s3cret\n").unwrap().expose(), "s3cret");
        assert_eq!(file("dos", "s3cret\r\n").unwrap().expose(), "s3cret");
        assert_eq!(file("bare", "s3cret").unwrap().expose(), "s3cret");
        assert!(matches!(
            file("empty", "\n"),
            Err(SecretFileError::Empty(_))
        ));
        assert!(matches!(
            file("space", "s3cret \n"),
            Err(SecretFileError::Padded(_))
        ));
        assert!(matches!(
            file("tab", "\ts3cret"),
            Err(SecretFileError::Padded(_))
        ));
        assert!(matches!(
            Secret::from_file(&dir.join("missing")),
            Err(SecretFileError::Read { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
