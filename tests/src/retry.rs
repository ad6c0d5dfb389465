//! One more run for a nested test whose test host broke down under it.

use crate::paths::cache_dir;
use crate::HarnessError;
use std::io::Write;
use std::path::Path;

/// Where each breakdown that made a test run again is noted (in .cache/), for tests/run.sh.
const BREAKDOWNS: &str = "breakdowns.log";

/// Runs `test`, and runs it once more if a test host broke down during it
/// ([`HarnessError::HostBroke`]: QEMU's emulation stalled or died, whatever ran inside). Any
/// other failure, and a second breakdown, fails the test: a fault of the code under test
/// fails it every time, and a flaky one is reported when it strikes on the second run too.
pub fn again_if_a_host_broke<T>(test: impl Fn() -> anyhow::Result<T>) -> anyhow::Result<T> {
    again(test, Some(&cache_dir().join(BREAKDOWNS)))
}

/// [`again_if_a_host_broke`], noting each breakdown in `log` if given.
fn again<T>(test: impl Fn() -> anyhow::Result<T>, log: Option<&Path>) -> anyhow::Result<T> {
    let e = match test() {
        Err(e) => e,
        ok => return ok,
    };
    let Some(breakdown) = breakdown(&e) else {
        return Err(e);
    };
    // Straight to stderr, past the test runner's capture: a retried test that then passes
    // still shows that it was retried, and where the breakdown's logs are. tests/run.sh
    // lists the breakdowns of its run from the file.
    let line = format!(
        "warning: {}; running the test once more",
        breakdown.lines().next().unwrap_or_default()
    );
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Some(log) = log {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| writeln!(f, "{line}"));
    }
    println!("a test host broke down; running the test once more. The breakdown: {e:#}");
    test()
}

/// The breakdown behind `e`, if a host broke down.
fn breakdown(e: &anyhow::Error) -> Option<String> {
    e.chain()
        .find_map(|cause| match cause.downcast_ref::<HarnessError>() {
            Some(b @ HarnessError::HostBroke { .. }) => Some(b.to_string()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use std::cell::Cell;

    fn breakdown() -> HarnessError {
        HarnessError::HostBroke {
            host: "(none: simulated by retry.rs's unit test)".into(),
            what: "simulated".into(),
            console: String::new(),
        }
    }

    #[test]
    fn a_breakdown_is_run_again_once_and_other_failures_are_not() {
        let runs = Cell::new(0);
        let log = std::env::temp_dir().join(format!("hopper-breakdowns-{}", std::process::id()));
        let result = again(
            || {
                runs.set(runs.get() + 1);
                if runs.get() == 1 {
                    Err(breakdown()).context("restoring")?;
                }
                Ok(runs.get())
            },
            Some(&log),
        );
        assert_eq!(result.unwrap(), 2);
        let noted = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        assert_eq!(noted.lines().count(), 1, "{noted}");
        assert!(noted.contains("simulated by retry.rs"), "{noted}");

        runs.set(0);
        let result: anyhow::Result<()> = again(
            || {
                runs.set(runs.get() + 1);
                Err(breakdown().into())
            },
            None,
        );
        assert!(result.is_err());
        assert_eq!(runs.get(), 2, "a second breakdown fails the test");

        runs.set(0);
        let result: anyhow::Result<()> = again(
            || {
                runs.set(runs.get() + 1);
                anyhow::bail!("digest differs")
            },
            None,
        );
        assert!(result.is_err());
        assert_eq!(
            runs.get(),
            1,
            "a failure of the code under test is not run again"
        );
    }
}
