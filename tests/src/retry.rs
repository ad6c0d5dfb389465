//! One more run for a nested test whose test host broke down under it.

use crate::HarnessError;
use std::io::Write;

/// Runs `test`, and runs it once more if a test host broke down during it
/// ([`HarnessError::HostBroke`]: QEMU's emulation stalled or died, whatever ran inside). Any
/// other failure, and a second breakdown, fails the test: a fault of the code under test
/// fails it every time, and a flaky one is reported when it strikes on the second run too.
pub fn again_if_a_host_broke<T>(test: impl Fn() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let e = match test() {
        Err(e) => e,
        ok => return ok,
    };
    let Some(breakdown) = breakdown(&e) else {
        return Err(e);
    };
    // Straight to stderr, past the test runner's capture: a retried test that then passes
    // still shows that it was retried, and where the breakdown's logs are.
    let _ = writeln!(
        std::io::stderr(),
        "warning: {}; running the test once more",
        breakdown.lines().next().unwrap_or_default()
    );
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
        let result = again_if_a_host_broke(|| {
            runs.set(runs.get() + 1);
            if runs.get() == 1 {
                Err(breakdown()).context("restoring")?;
            }
            Ok(runs.get())
        });
        assert_eq!(result.unwrap(), 2);

        runs.set(0);
        let result: anyhow::Result<()> = again_if_a_host_broke(|| {
            runs.set(runs.get() + 1);
            Err(breakdown().into())
        });
        assert!(result.is_err());
        assert_eq!(runs.get(), 2, "a second breakdown fails the test");

        runs.set(0);
        let result: anyhow::Result<()> = again_if_a_host_broke(|| {
            runs.set(runs.get() + 1);
            anyhow::bail!("digest differs")
        });
        assert!(result.is_err());
        assert_eq!(
            runs.get(),
            1,
            "a failure of the code under test is not run again"
        );
    }
}
