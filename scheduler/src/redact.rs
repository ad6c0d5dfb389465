//! Finding a job's JIT config in the logs its host uploads, without keeping the JIT config.
//!
//! The store drops a JIT config as soon as its host has it (the first status report), but logs
//! arrive later. So at assignment the store keeps a [`JitFingerprint`] instead: the length, a
//! Rabin–Karp rolling hash under a random per-job base (modulo the prime 2⁶¹−1), and the
//! SHA-256. A scan rolls the hash over every window of the log in one pass and confirms each
//! hash match with SHA-256, so only exact occurrences are redacted and the scan stays linear.
//! The fingerprint reveals nothing useful: SHA-256 only confirms a guess of a secret with
//! thousands of random bits, and the rolling hash is a single 61-bit value of it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// The Mersenne prime 2⁶¹−1: products fit in u128 and reduce with shifts and masks.
const MODULUS: u64 = (1 << 61) - 1;

/// What replaces a JIT config in a log, padded with `*` to the config's length.
pub const MARKER: &[u8] = b"[redacted JIT config]";

/// Enough of a JIT config to find it again, and not enough to use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JitFingerprint {
    len: usize,
    base: u64,
    rolling: u64,
    sha256: [u8; 32],
}

impl JitFingerprint {
    pub fn of(jit_config: &Secret) -> Self {
        let bytes = jit_config.expose().as_bytes();
        // A base above every byte value; random so that no log can be built to collide.
        let base = rand::random_range(256..MODULUS);
        JitFingerprint {
            len: bytes.len(),
            base,
            rolling: hash(bytes, base),
            sha256: Sha256::digest(bytes).into(),
        }
    }

    /// Length of the JIT config in bytes.
    pub fn secret_len(&self) -> usize {
        self.len
    }

    /// Overwrites every occurrence of the JIT config in `log` with [`MARKER`] padded to the
    /// same length, so the log's size and the position of everything else stay as they were.
    /// Returns how many occurrences there were.
    pub fn redact(&self, log: &mut [u8]) -> usize {
        let n = self.len;
        if n == 0 || log.len() < n {
            return 0;
        }
        // The weight of the byte that leaves the window when it moves on by one.
        let leaving = (1..n).fold(1, |acc, _| mul(acc, self.base));
        let mut found = 0;
        let mut start = 0;
        let mut h = hash(&log[..n], self.base);
        loop {
            let end = start + n;
            if h == self.rolling && Sha256::digest(&log[start..end])[..] == self.sha256 {
                overwrite(&mut log[start..end]);
                found += 1;
                // Occurrences do not overlap (a JIT config is not periodic): go on after it.
                start = end;
                if start + n > log.len() {
                    return found;
                }
                h = hash(&log[start..start + n], self.base);
                continue;
            }
            if end == log.len() {
                return found;
            }
            let out = mul(u64::from(log[start]), leaving);
            h = add(mul(sub(h, out), self.base), u64::from(log[end]));
            start += 1;
        }
    }
}

fn overwrite(window: &mut [u8]) {
    let fill = MARKER.iter().chain(std::iter::repeat(&b'*'));
    for (byte, with) in window.iter_mut().zip(fill) {
        *byte = *with;
    }
}

/// Σ bytes[i]·base^(len−1−i) mod 2⁶¹−1, by Horner's rule.
fn hash(bytes: &[u8], base: u64) -> u64 {
    bytes
        .iter()
        .fold(0, |h, &b| add(mul(h, base), u64::from(b)))
}

fn reduce(x: u128) -> u64 {
    // x mod 2⁶¹−1 for x < 2¹²²: 2⁶¹ ≡ 1, so the high part adds onto the low part.
    let r = (x as u64 & MODULUS) + (x >> 61) as u64;
    let r = (r & MODULUS) + (r >> 61);
    if r >= MODULUS {
        r - MODULUS
    } else {
        r
    }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn add(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) + u128::from(b))
}

fn sub(a: u64, b: u64) -> u64 {
    add(a, MODULUS - b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JIT: &str = "eyJydW5uZXIiOiJob3BwZXItNyJ9.c2VjcmV0LWNyZWRlbnRpYWxzLTQyNDI0Mg==";

    fn redacted(jit: &str, log: &str) -> (String, usize) {
        let mut bytes = log.as_bytes().to_vec();
        let n = JitFingerprint::of(&Secret::new(jit)).redact(&mut bytes);
        (String::from_utf8(bytes).unwrap(), n)
    }

    #[test]
    fn every_occurrence_is_overwritten_in_place() {
        let marker = format!(
            "{}{}",
            std::str::from_utf8(MARKER).unwrap(),
            "*".repeat(JIT.len() - MARKER.len())
        );
        let log = format!("{JIT} start\nconfig={JIT}\n{JIT}{JIT}\nend {JIT}");
        let (out, n) = redacted(JIT, &log);
        assert_eq!(n, 5);
        assert_eq!(out, log.replace(JIT, &marker));
        assert_eq!(out.len(), log.len());
        assert_eq!(redacted(JIT, JIT), (marker, 1));
    }

    #[test]
    fn near_misses_and_short_logs_are_left_alone() {
        let mut changed = JIT.to_string();
        changed.replace_range(10..11, "X");
        let log = format!("{changed} {} {}", &JIT[1..], &JIT[..JIT.len() - 1]);
        assert_eq!(redacted(JIT, &log), (log.clone(), 0));
        assert_eq!(redacted(JIT, "short"), ("short".into(), 0));
        assert_eq!(redacted(JIT, ""), (String::new(), 0));
    }

    #[test]
    fn the_hash_rolls_correctly_over_every_byte_value() {
        let jit: String = (0..200)
            .map(|i| char::from(b'!' + (i * 7 % 90) as u8))
            .collect();
        let mut log: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        log.extend_from_slice(jit.as_bytes());
        log.extend((0..=255u8).rev().cycle().take(3000));
        let fp = JitFingerprint::of(&Secret::new(jit.as_str()));
        assert_eq!(fp.secret_len(), 200);
        assert_eq!(fp.redact(&mut log), 1);
        assert_eq!(&log[5000..5000 + MARKER.len()], MARKER);
    }

    #[test]
    fn the_fingerprint_does_not_hold_the_secret() {
        let fp = JitFingerprint::of(&Secret::new(JIT));
        let stored = serde_json::to_string(&fp).unwrap();
        assert!(!stored.contains(JIT) && !stored.contains(&JIT[..16]));
        let back: JitFingerprint = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, fp);
        assert_ne!(JitFingerprint::of(&Secret::new(JIT)).base, fp.base);
    }
}
