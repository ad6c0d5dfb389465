//! One log upload as it arrives: only the end of the body that can be stored is held, and the
//! job's JIT config is redacted before the log is cut to its final size.

use super::MAX_LOG_BYTES;
use crate::redact::JitFingerprint;

/// The end of an upload's body, at most [`MAX_LOG_BYTES`] plus one JIT config's length less one.
/// The extra bytes let a JIT config that straddles the start of the stored tail be found whole,
/// so the cut never leaves a fragment of it behind.
pub struct Upload {
    tail: Vec<u8>,
    keep: usize,
    fingerprint: Option<JitFingerprint>,
}

impl Upload {
    /// `fingerprint`: the job's JIT config, if the store knows it.
    pub fn new(fingerprint: Option<JitFingerprint>) -> Self {
        let extra = fingerprint
            .as_ref()
            .map_or(0, |f| f.secret_len().saturating_sub(1));
        Upload {
            tail: Vec::new(),
            keep: MAX_LOG_BYTES + extra,
            fingerprint,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(self.keep)..];
        self.tail.extend_from_slice(chunk);
        // Dropping the front only once the buffer has doubled keeps the copying linear.
        if self.tail.len() >= 2 * self.keep {
            self.tail.drain(..self.tail.len() - self.keep);
        }
    }

    /// The log to store, and how many JIT configs were redacted in it.
    pub fn finish(mut self) -> (Vec<u8>, usize) {
        let redacted = self
            .fingerprint
            .as_ref()
            .map_or(0, |f| f.redact(&mut self.tail));
        // Redaction keeps lengths, so this cut is where it would have been without it.
        let excess = self.tail.len().saturating_sub(MAX_LOG_BYTES);
        self.tail.drain(..excess);
        (self.tail, redacted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::MARKER;
    use crate::secret::Secret;

    const JIT: &str = "jitcfg_0123456789abcdef0123456789abcdef";

    fn upload(body: &[u8], chunk: usize) -> (Vec<u8>, usize) {
        let mut u = Upload::new(Some(JitFingerprint::of(&Secret::new(JIT))));
        for c in body.chunks(chunk) {
            u.push(c);
        }
        u.finish()
    }

    #[test]
    fn small_logs_are_kept_whole_and_redacted() {
        let body = format!("runner config: {JIT}\ndone\n");
        let (log, n) = upload(body.as_bytes(), 7);
        assert_eq!(n, 1);
        assert_eq!(log.len(), body.len());
        assert!(!String::from_utf8(log).unwrap().contains(JIT));
    }

    #[test]
    fn large_logs_keep_their_end_without_a_fragment_of_the_jit_config() {
        // The JIT config straddles the start of the kept tail: 10 of its bytes fall inside.
        let mut body = vec![b'a'; 1000];
        body.extend_from_slice(JIT.as_bytes());
        body.extend(std::iter::repeat_n(b'b', MAX_LOG_BYTES - 10));
        for chunk in [4096, 3 * MAX_LOG_BYTES] {
            let (log, n) = upload(&body, chunk);
            assert_eq!((log.len(), n), (MAX_LOG_BYTES, 1));
            let mut marker = MARKER.to_vec();
            marker.resize(JIT.len(), b'*');
            assert_eq!(&log[..10], &marker[JIT.len() - 10..]);
            assert!(log[10..].iter().all(|&b| b == b'b'));
        }
    }

    #[test]
    fn without_a_fingerprint_the_end_is_kept_as_is() {
        let mut u = Upload::new(None);
        u.push(&vec![b'x'; MAX_LOG_BYTES]);
        u.push(b"tail");
        let (log, n) = u.finish();
        assert_eq!((log.len(), n), (MAX_LOG_BYTES, 0));
        assert!(log.ends_with(b"xtail"));
    }
}
