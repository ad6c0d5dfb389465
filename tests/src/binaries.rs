//! Static builds of the project binaries that go into test hosts.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use crate::paths::repo_root;
use crate::HarnessError;

/// Binaries copied into every test host. The workload is also run natively, for what an
/// undisturbed run writes (crate::workload).
pub(crate) const PACKAGES: [&str; 3] = ["hopper-runner", "hopper-agent", "hopper-workload"];

/// Moves the static build out of `target/static`, e.g. for a second user of the same checkout
/// who must not share (and wait on) that directory's lock.
const TARGET_DIR_ENV: &str = "HOPPER_STATIC_TARGET_DIR";

/// Static, and linked at a fixed address.
const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static -C relocation-model=static";

/// Builds the binaries static (test hosts have no Rust libraries to link against) and returns
/// their paths. Cargo is incremental, so this is cheap when nothing changed; the lock keeps
/// tests that boot hosts in parallel from starting one build each.
pub(crate) fn build_static() -> Result<Vec<PathBuf>, HarnessError> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let repo = repo_root();
    // Relative to the repository, like the default (joining an absolute path replaces it).
    let target_dir = repo.join(std::env::var_os(TARGET_DIR_ENV).unwrap_or("target/static".into()));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&repo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
        ])
        .arg(&target_dir)
        // An explicit --target keeps RUSTFLAGS off build scripts and proc-macros. Not
        // position-independent: in the emulated test host a static-pie's start-up
        // relocation made every start of hopper-runner take 45 ms instead of 8 ms, and its
        // restore twice as long (tests/README.md).
        .env("RUSTFLAGS", STATIC_RUSTFLAGS);
    for p in PACKAGES {
        cmd.args(["-p", p]);
    }
    let out = cmd.output().map_err(HarnessError::io("running cargo"))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: format!(
                "cargo build --release (static) -p {}",
                PACKAGES.join(" -p ")
            ),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(PACKAGES
        .iter()
        .map(|p| target_dir.join("x86_64-unknown-linux-gnu/release").join(p))
        .collect())
}
