//! When the pre-copy rounds hand over (the rest fits the pause and rounds no longer halve it)
//! and when they throttle the guest (a round did not shrink the rest).

/// A pause estimated shorter than this is not worth another round to shorten.
const WORTH_ANOTHER_ROUND_MS: u64 = 5;

/// What the rounds so far call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    Handover,
    Round,
    /// Another round, with the guest held back more: it writes about as fast as we send.
    ThrottleAndRound,
}

/// The dirty sets of the rounds so far, which decide when the pre-copy hands over.
#[derive(Debug, Default)]
pub(super) struct Convergence {
    /// What the last round left dirty; none before the first round.
    previous_dirty: Option<u64>,
}

impl Convergence {
    /// After a round that left `dirty` bytes, whose sending is estimated to take
    /// `estimate_ms`: hand over once that fits `max_downtime_ms`, unless rounds still halve
    /// what is left (another is short, and the pause then carries only what the guest
    /// writes during it); throttle when a round did not shrink it by a tenth.
    pub(super) fn after_round(
        &mut self,
        dirty: u64,
        estimate_ms: u64,
        max_downtime_ms: u64,
    ) -> Next {
        let previous = self.previous_dirty.replace(dirty);
        let halving =
            previous.is_none_or(|p| dirty * 2 < p) && estimate_ms > WORTH_ANOTHER_ROUND_MS;
        if estimate_ms <= max_downtime_ms && !halving {
            Next::Handover
        } else if previous.is_some_and(|p| dirty * 10 > p * 9) {
            Next::ThrottleAndRound
        } else {
            Next::Round
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Rounds shrink: they go on past the pause target while each halves what is left, and
    /// hand over once one does not (or too little is left to bother).
    #[test]
    fn a_converging_guest_is_handed_over_once_rounds_stop_halving() {
        let mut c = Convergence::default();
        assert_eq!(c.after_round(64 * MIB, 4000, 100), Next::Round);
        assert_eq!(c.after_round(8 * MIB, 500, 100), Next::Round);
        // Under the target, but halved: one more.
        assert_eq!(c.after_round(MIB, 60, 100), Next::Round);
        assert_eq!(c.after_round(MIB / 4, 15, 100), Next::Round);
        // Under the target and no longer halving.
        assert_eq!(c.after_round(MIB / 5, 12, 100), Next::Handover);
        let mut c = Convergence::default();
        c.after_round(64 * MIB, 4000, 100);
        // Halved, but too little left to be worth a round.
        assert_eq!(c.after_round(16 * 4096, 4, 100), Next::Handover);
    }

    /// A guest that writes as fast as the link carries is throttled from the second round
    /// on, each round that does not shrink by a tenth; a round that does is not.
    #[test]
    fn a_guest_outrunning_the_link_is_throttled_from_the_second_round() {
        let mut c = Convergence::default();
        assert_eq!(c.after_round(64 * MIB, 4000, 100), Next::Round);
        assert_eq!(c.after_round(60 * MIB, 3800, 100), Next::ThrottleAndRound);
        assert_eq!(c.after_round(61 * MIB, 3900, 100), Next::ThrottleAndRound);
        assert_eq!(c.after_round(40 * MIB, 2500, 100), Next::Round);
    }
}
