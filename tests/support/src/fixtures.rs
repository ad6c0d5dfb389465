//! The npm packages fetched by tests/setup.sh (scheduler/tests/fixtures/fetch.sh): real webhook
//! payloads (`@octokit/webhooks-examples`) and GitHub's REST OpenAPI description
//! (`@octokit/openapi`). Missing fixtures fail the test loudly.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

/// `node_modules/@octokit` of the fixtures, checked to hold both packages.
pub fn octokit_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scheduler/tests/fixtures/node_modules/@octokit");
    for pkg in ["webhooks-examples", "openapi"] {
        assert!(
            dir.join(pkg).join("package.json").is_file(),
            "test fixtures missing: {} not found. Run tests/setup.sh (or scheduler/tests/fixtures/fetch.sh) first.",
            dir.join(pkg).display()
        );
    }
    dir
}

/// GitHub's REST OpenAPI description (api.github.com), parsed once per test binary.
pub fn openapi() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = octokit_dir().join("openapi/generated/api.github.com.json");
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    })
}
