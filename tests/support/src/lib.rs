//! What the scheduler's tests and the end-to-end tests (hopper-tests) share: the npm fixtures
//! fetched by tests/setup.sh and a GitHub API stand-in server.

pub mod fixtures;
pub mod github;
