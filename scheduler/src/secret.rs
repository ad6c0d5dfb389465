//! A string that must never reach logs or API output.

use std::fmt;
use std::sync::Arc;

/// Holds a secret (webhook secret, tokens, JIT configs). `Debug` and `Display` redact it and it
/// has no `Serialize`, so it can only leave the process through an explicit `expose()`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// Reads a secret from a file, dropping the trailing newline editors add.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Self> {
        let raw = std::fs::read_to_string(path)?;
        let value = raw.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Secret::new(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("ghs_supersecret");
        assert!(!format!("{s:?} {s}").contains("supersecret"));
        assert_eq!(s.expose(), "ghs_supersecret");
    }
}
