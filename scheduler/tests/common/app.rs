//! The real binary with a GitHub App whose API is the stand-in of hopper-test-support.

use hopper_test_support::github::{app_key, StandIn};

use super::{Scheduler, APP_ID, INSTALLATION_ID};

pub struct Setup {
    pub s: Scheduler,
    pub gh: StandIn,
    pub _dir: tempfile::TempDir,
}

/// `hopper-scheduler serve` with the App and `extra` arguments.
pub async fn setup(extra: &[&str]) -> Setup {
    let gh = StandIn::start(APP_ID, INSTALLATION_ID).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("app.pem");
    std::fs::write(&key, &app_key().0).unwrap();
    let app_id = APP_ID.to_string();
    let key_path = key.display().to_string();
    let mut args = vec![
        "--github-api-url",
        gh.url.as_str(),
        "--app-id",
        &app_id,
        "--app-private-key",
        &key_path,
    ];
    args.extend_from_slice(extra);
    let s = Scheduler::start(dir.path(), &args);
    Setup { s, gh, _dir: dir }
}
