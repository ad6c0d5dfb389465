#!/usr/bin/env bash
# The whole job path on this machine, without GitHub or a cloud account: installs and builds
# what is needed (tests/setup.sh), builds the scheduler, the runner and hopper-testhost, then
# `hopper-scheduler up --demo`: the scheduler with its SQLite store in .hopper/, a runner host
# (inside a nested test host when this machine's KVM cannot run guests), one job from
# submission through its microVM to its end, its log, and everything stopped again.
# Arguments go to `hopper-scheduler up` (see `hopper-scheduler up --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

tests/setup.sh

step "Building hopper-scheduler, hopper-runner and hopper-testhost (release)"
cargo build --release -p hopper-scheduler -p hopper-runner -p hopper-tests --bins

step "hopper-scheduler up --demo"
exec "${CARGO_TARGET_DIR:-target}/release/hopper-scheduler" up --demo "$@"
