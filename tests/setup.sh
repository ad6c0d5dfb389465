#!/usr/bin/env bash
# Installs everything the tests and the local mode need on a fresh Debian machine, and builds
# the cached artefacts (guest kernel, guest images, test fixtures) under .cache/.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

step "Debian packages"
pkgs=(qemu-system-x86 busybox-static cpio e2fsprogs iproute2 kmod nftables binutils libclang-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# Node.js may come from elsewhere than Debian (its own npm then conflicts with Debian's).
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

step "Scheduler test fixtures (npm)"
scheduler/tests/fixtures/fetch.sh

step "Guest kernel and images"
images/build.sh
