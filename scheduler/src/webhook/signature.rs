//! `X-Hub-Signature-256`: `sha256=<hex HMAC-SHA256(secret, raw body)>`.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing X-Hub-Signature-256")]
    Missing,
    #[error("malformed X-Hub-Signature-256")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match")]
    Mismatch,
}

impl SignatureError {
    /// The `reason` label of the rejection metric.
    pub fn reason(self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::Mismatch => "signature_mismatch",
        }
    }
}

fn mac(secret: &[u8], body: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The header value GitHub sends for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(mac(secret, body)))
}

pub fn verify(secret: &[u8], header: Option<&[u8]>, body: &[u8]) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex_part = header
        .strip_prefix(b"sha256=")
        .ok_or(SignatureError::Malformed)?;
    let mut given = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut given).map_err(|_| SignatureError::Malformed)?;
    if bool::from(mac(secret, body).ct_eq(&given)) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's published test vector (docs: "Validating webhook deliveries").
    #[test]
    fn github_test_vector() {
        let secret = b"It's a Secret to Everybody";
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(secret, b"Hello, World!"), expected);
        assert_eq!(
            verify(secret, Some(expected.as_bytes()), b"Hello, World!"),
            Ok(())
        );
        assert_eq!(
            verify(secret, Some(expected.as_bytes()), b"Hello, World?"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", Some(expected.as_bytes()), b"Hello, World!"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify(secret, None, b""), Err(SignatureError::Missing));
        assert_eq!(
            verify(secret, Some(b"sha1=00"), b""),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(secret, Some(b"sha256=zz"), b""),
            Err(SignatureError::Malformed)
        );
    }
}
