//! The pause: what was written since the last round, then the last data (or the post-copy
//! plan), the VM's state and the commit handshake.

use super::send::send_spread;
use super::tracking::Tracking;
use super::{MigrationError, MigrationSummary, Source};
use crate::migration::link::Link;
use crate::migration::protocol::{Frame, Plan};
use crate::migration::serve::Holdings;
use crate::persist;
use crate::snapshot::memory::layout;
use std::time::Instant;

/// With the VM paused: adds what was written since the last round to `pending`. (No flush:
/// the disk is read through the same page cache the guest's writes went to, and on this
/// side it is about to be dropped.)
pub(super) fn last_changes(tracking: &Tracking, mut pending: Plan) -> Result<Plan, MigrationError> {
    let last = tracking.take()?;
    for (words, more) in pending.memory.iter_mut().zip(&last.memory) {
        for (w, m) in words.iter_mut().zip(more) {
            *w |= m;
        }
    }
    for (w, m) in pending.disk.iter_mut().zip(&last.disk) {
        *w |= m;
    }
    Ok(pending)
}

/// With the VM paused: what is still pending (pre-copy) or the plan of what the target lacks
/// (post-copy), the VM's state, then the commit handshake.
pub(super) fn handover(
    src: &Source,
    link: &mut Link,
    extra: &mut [Link],
    holdings: &Holdings,
    postcopy: bool,
    summary: &mut MigrationSummary,
) -> Result<(), MigrationError> {
    let vm = src.parts.vm;
    let plan = holdings.plan();
    let started = Instant::now();
    if !postcopy {
        let sent = send_spread(link, extra, vm, holdings.disk(), plan, false)?;
        summary.memory_bytes += sent.memory;
        summary.disk_bytes += sent.disk;
    }
    // The other streams are done before the state (or plan) goes out on this one.
    for l in extra.iter_mut() {
        l.send(&Frame::Done)?;
        l.flush()?;
    }
    if postcopy {
        link.send(&Frame::Plan(Box::new(plan.clone())))?;
    }
    let data = started.elapsed();
    let state = persist::capture(&src.parts, layout(&vm.memory))?;
    link.send(&Frame::State(Box::new(state)))?;
    let captured = started.elapsed();
    link.expect(Frame::Ready)?;
    let ready = started.elapsed();
    // From here the target may run the VM: this side never resumes it on its own.
    link.send(&Frame::Commit)
        .and_then(|_| link.expect(Frame::Committed))
        .map_err(MigrationError::Unconfirmed)?;
    // Where the pause goes.
    log::info!(
        "migration handover: last data queued after {} ms, state after {} ms, target ready \
         after {} ms, committed after {} ms",
        data.as_millis(),
        captured.as_millis(),
        ready.as_millis(),
        started.elapsed().as_millis()
    );
    Ok(())
}
