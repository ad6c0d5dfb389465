//! The source's side of a post-copy once the VM is paused: what the plan names goes to the
//! target, pushed in address order on the main connection, and at once where the target
//! pulls on its own connection.

use super::link::Link;
use super::protocol::{Frame, Plan};
use super::source::send::{send_blocks, send_pages};
use super::source::tracking::{plan_blocks, plan_pages, TrackedDisk};
use super::source::MigrationError;
use crate::vm::Vm;
use std::collections::HashSet;
use std::sync::Mutex;

/// The paused VM's memory and disk, what the target lacks, and what it pulled.
pub(super) struct Holdings<'a> {
    vm: &'a Vm,
    disk: Option<&'a TrackedDisk<'a>>,
    plan: Plan,
    /// Pages and blocks already sent in answer to a pull: the push skips them.
    answered: Mutex<HashSet<Pulled>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pulled {
    Page(u64),
    Block(u64),
}

/// What the push sent (bytes of guest data, before compression).
#[derive(Debug, Default)]
pub(super) struct Pushed {
    pub memory: u64,
    pub disk: u64,
}

/// What the answers to pulls sent.
#[derive(Debug, Default)]
pub(super) struct Answered {
    /// Pages and blocks pulled.
    pub units: u64,
    pub memory: u64,
    pub disk: u64,
    pub wire_bytes: u64,
}

impl<'a> Holdings<'a> {
    pub fn new(vm: &'a Vm, disk: Option<&'a TrackedDisk<'a>>, plan: Plan) -> Self {
        Holdings {
            vm,
            disk,
            plan,
            answered: Mutex::default(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn disk(&self) -> Option<&TrackedDisk<'a>> {
        self.disk
    }

    fn unanswered(&self, unit: Pulled) -> bool {
        !self.answered.lock().unwrap().contains(&unit)
    }
}

/// Sends everything the plan names that no pull took yet, then `Done`.
pub(super) fn push(link: &mut Link, h: &Holdings) -> Result<Pushed, MigrationError> {
    let pages = plan_pages(h.vm, &h.plan.memory).filter(|at| h.unanswered(Pulled::Page(*at)));
    let memory = send_pages(link, h.vm, pages, false)?;
    let disk = match h.disk {
        Some(disk) => {
            let blocks =
                plan_blocks(disk, &h.plan.disk).filter(|at| h.unanswered(Pulled::Block(*at)));
            send_blocks(link, disk, blocks, false)?
        }
        None => 0,
    };
    link.send(&Frame::Done)?;
    link.flush()?;
    Ok(Pushed { memory, disk })
}

/// Answers the target's pulls until it says it has everything.
pub(super) fn answer_pulls(pull: &mut Link, h: &Holdings) -> Result<Answered, MigrationError> {
    let mut answered = Answered::default();
    loop {
        match pull.receive()? {
            Frame::PullPages(pages) => {
                h.answered
                    .lock()
                    .unwrap()
                    .extend(pages.iter().map(|at| Pulled::Page(*at)));
                answered.units += pages.len() as u64;
                answered.memory += send_pages(pull, h.vm, pages, false)?;
            }
            Frame::PullBlocks(blocks) => {
                let Some(disk) = h.disk else {
                    return Err(MigrationError::Invalid(
                        "a pull of disk blocks for a VM without disk".into(),
                    ));
                };
                h.answered
                    .lock()
                    .unwrap()
                    .extend(blocks.iter().map(|at| Pulled::Block(*at)));
                answered.units += blocks.len() as u64;
                answered.disk += send_blocks(pull, disk, blocks, false)?;
            }
            Frame::Complete => {
                answered.wire_bytes = pull.wire_bytes;
                return Ok(answered);
            }
            other => {
                return Err(MigrationError::Invalid(format!(
                    "an unexpected {} frame on the pull channel",
                    other.name()
                )))
            }
        }
    }
}
