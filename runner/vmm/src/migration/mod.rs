//! Live migration: a running VM moves to another host over an authenticated, encrypted
//! channel ([`transport`]) speaking [`protocol`]; memory and disk are copied while the guest
//! runs ([`source`]), and the target builds the VM and runs it once the source commits
//! ([`target`]). Never both running: the source resumes only if the handover failed before
//! its commit, and the target runs the VM only after it.

mod link;
pub mod protocol;
mod pull;
mod serve;
pub mod source;
pub mod target;
pub mod transport;

pub use source::{MigrateOptions, MigrationError, MigrationSummary};
pub use target::{Incoming, ReceiveConfig, ReceiveError};
pub use transport::TlsFiles;

/// Memory moves in pages.
pub(crate) const PAGE: usize = 4096;
/// Disk writes are tracked, and the disk moves, in blocks of this size.
pub(crate) const DISK_BLOCK: usize = 64 << 10;

/// The indices of the set bits of a bitmap (bit `i % 64` of word `i / 64`), in order.
pub(crate) fn set_bits(words: &[u64]) -> impl Iterator<Item = usize> + '_ {
    words.iter().enumerate().flat_map(|(w, &word)| {
        let mut rest = word;
        std::iter::from_fn(move || {
            (rest != 0).then(|| {
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                w * 64 + bit
            })
        })
    })
}

/// Whether bit `i` of a bitmap is set (bits past its end are not).
pub(crate) fn bit(words: &[u64], i: usize) -> bool {
    words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Sets bit `i` of a bitmap, which must be long enough to hold it.
pub(crate) fn set_bit(words: &mut [u64], i: usize) {
    words[i / 64] |= 1 << (i % 64);
}

/// `words` as a bitmap of exactly `bits` bits: missing words are zero, bits past the end are
/// cleared.
pub(crate) fn trimmed(words: &[u64], bits: usize) -> Vec<u64> {
    let mut out = words.to_vec();
    out.resize(bits.div_ceil(64), 0);
    if !bits.is_multiple_of(64) {
        *out.last_mut().unwrap() &= (1u64 << (bits % 64)) - 1;
    }
    out
}

/// How many bits are set in all the bitmaps.
pub(crate) fn count_bits(maps: &[Vec<u64>]) -> u64 {
    maps.iter().flatten().map(|w| w.count_ones() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_helpers() {
        let words = vec![0b1001, 0, 1 << 63];
        assert_eq!(set_bits(&words).collect::<Vec<_>>(), vec![0, 3, 191]);
        assert!(bit(&words, 3) && !bit(&words, 4) && bit(&words, 191) && !bit(&words, 192));
        assert_eq!(trimmed(&words, 130), [0b1001, 0, 0]);
        assert_eq!(trimmed(&[u64::MAX], 3), [0b111]);
        assert_eq!(count_bits(&[words, vec![u64::MAX]]), 67);
    }
}
