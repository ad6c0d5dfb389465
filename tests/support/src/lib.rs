//! What the scheduler's tests, the runner's tests and the end-to-end tests (hopper-tests) share:
//! the npm fixtures fetched by tests/setup.sh, a GitHub API stand-in server, and stand-ins for
//! the clouds' instance metadata services.

pub mod fixtures;
pub mod github;
pub mod metadata;
