#!/usr/bin/env bash
# Installs everything the tests and the local mode need on a fresh Debian machine, and builds
# the cached artefacts (guest kernel, guest images, test fixtures) under .cache/.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# The test hosts' emulator: QEMU 10.0 from bookworm-backports, not bookworm's 7.2, whose
# emulation of nested SVM stalled about one test-host session in ten and corrupted test hosts
# with two CPUs (tests/README.md has the soak figures). Pinned to the 10.0 series.
QEMU_SUITE=bookworm-backports
QEMU_SERIES='1:10.0.*'
QEMU_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-system-gui qemu-utils qemu-block-extra)

step "Debian packages"
sources=/etc/apt/sources.list.d/hopper-$QEMU_SUITE.sources
if [ ! -e "$sources" ]; then
	# The suite sits on the mirror the machine already uses for bookworm.
	mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null |
		grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
	cat >"$sources" <<SOURCES
Types: deb
URIs: ${mirror:-http://deb.debian.org/debian}
Suites: $QEMU_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
	# Its index is fetched below, with the other updates (images/build.sh needs it too).
	new_source=1
fi
# Only the named packages come from the suite at this version; everything else stays bookworm's.
cat >/etc/apt/preferences.d/hopper-qemu <<PREFS
Package: ${QEMU_PACKAGES[*]}
Pin: version $QEMU_SERIES
Pin-Priority: 990
PREFS

pkgs=(busybox-static cpio e2fsprogs iproute2 kmod nftables binutils libclang-dev xz-utils)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# Node.js may come from elsewhere than Debian (its own npm then conflicts with Debian's).
command -v npm >/dev/null || missing+=(nodejs npm)
qemu_version() { dpkg-query -W -f '${Version}' qemu-system-x86 2>/dev/null || true; }
# shellcheck disable=SC2053 # the series is a glob
[[ $(qemu_version) == $QEMU_SERIES ]] || need_qemu=1
if [ ${#missing[@]} -gt 0 ] || [ -n "${need_qemu:-}" ] || [ -n "${new_source:-}" ]; then
	apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -n "${need_qemu:-}" ]; then
	# -t: QEMU's own dependencies may need the suite's newer libraries.
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t "$QEMU_SUITE" qemu-system-x86 >/dev/null
fi
# shellcheck disable=SC2053
[[ $(qemu_version) == $QEMU_SERIES ]] ||
	{ echo "qemu-system-x86 is $(qemu_version), not $QEMU_SERIES from $QEMU_SUITE" >&2; exit 1; }

step "cargo-nextest (tests/run.sh's test runner)"
if ! cargo nextest --version >/dev/null 2>&1; then
	cargo install --locked cargo-nextest
fi

step "Scheduler test fixtures (npm)"
scheduler/tests/fixtures/fetch.sh

step "Guest kernel and images"
images/build.sh
