#!/usr/bin/env bash
# The project's test command: installs what is needed, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
cargo test --workspace --release "$@"
