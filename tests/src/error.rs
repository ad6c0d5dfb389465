use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{0} is missing: run tests/setup.sh")]
    MissingCache(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error("test host {host}: {what}\n--- console (last lines) ---\n{console}")]
    Host {
        host: String,
        what: String,
        console: String,
    },
    /// The test host itself stopped working under the test: its agent did not answer in
    /// time, or its QEMU exited unasked (QEMU 7.2's emulation of nested SVM did, now and
    /// then, whatever ran inside: tests/README.md); see [`crate::again_if_a_host_broke`].
    #[error("test host {host} broke down: {what}\n--- console (last lines) ---\n{console}")]
    HostBroke {
        host: String,
        what: String,
        console: String,
    },
    #[error("test host {host}: no agent after {after:?}: {last}\n--- console (last lines) ---\n{console}")]
    BootTimeout {
        host: String,
        after: Duration,
        last: String,
        console: String,
    },
    #[error("guest {guest}: {what}\n--- guest console (last lines) ---\n{console}")]
    Guest {
        guest: String,
        what: String,
        console: String,
    },
    /// What a workload wrote differs from an undisturbed run's output. The guest runs the
    /// workload from its image, the undisturbed run is built afresh: a stale image differs.
    #[error(
        "{what} differs from an undisturbed run: {detail} \
         (guest images older than images/workload? run tests/setup.sh)"
    )]
    Diverged { what: String, detail: String },
}

impl HarnessError {
    /// The test host, not what ran in it, failed: it stopped answering, its QEMU died, or it
    /// never finished booting.
    pub fn is_breakdown(&self) -> bool {
        matches!(
            self,
            HarnessError::HostBroke { .. } | HarnessError::BootTimeout { .. }
        )
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }
}

/// The last `n` lines of a log, for error messages.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
