#!/usr/bin/env bash
# Production guest image recipe: an ext4 root disk with Debian, the official GitHub Actions
# runner and Hopper's guest agent, for the same stage-1 initramfs and kernel as the test image
# (images/build.sh). Run as root on a machine that reaches a Debian mirror and github.com:
#
#   images/production/build-rootfs.sh OUT.ext4 RUNNER_VERSION RUNNER_SHA256 [SIZE]
#
# RUNNER_VERSION and RUNNER_SHA256 are those of actions-runner-linux-x64-<version>.tar.gz on
# https://github.com/actions/runner/releases; the download is refused if the digest differs.
#
# NOT TESTED in this project's environment: its machines reach Debian's mirror but not
# github.com, so the runner cannot be downloaded here; the tests use the test image's stand-in
# (images/guest/usr/bin/hopper-run-job) instead.
set -euo pipefail
out=${1:?usage: build-rootfs.sh OUT.ext4 RUNNER_VERSION RUNNER_SHA256 [SIZE]}
version=${2:?runner version, e.g. 2.321.0}
sha256=${3:?sha256 of actions-runner-linux-x64-$version.tar.gz}
size=${4:-8G}
repo=$(cd "$(dirname "$0")/../.." && pwd)
agent=$repo/target/static/x86_64-unknown-linux-gnu/release/hopper-agent
[ -x "$agent" ] || { echo "build the static agent first: images/build.sh" >&2; exit 1; }
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

step "Debian bookworm (debootstrap)"
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
debootstrap --variant=minbase --include=ca-certificates,curl,git,sudo,busybox-static,iproute2,libicu72,libssl3,libkrb5-3,zlib1g \
	bookworm "$root" http://deb.debian.org/debian

step "actions/runner $version"
tarball=actions-runner-linux-x64-$version.tar.gz
curl -fsSL -o "$root/tmp/$tarball" "https://github.com/actions/runner/releases/download/v$version/$tarball"
echo "$sha256  $root/tmp/$tarball" | sha256sum -c -
chroot "$root" useradd --create-home --shell /bin/bash runner
echo 'runner ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/runner"
mkdir -p "$root/home/runner/actions-runner"
tar -xzf "$root/tmp/$tarball" -C "$root/home/runner/actions-runner"
rm "$root/tmp/$tarball"
chroot "$root" chown -R runner:runner /home/runner

step "Hopper guest agent and init"
install -m 0755 "$agent" "$root/bin/hopper-agent"
cp -r "$repo/images/guest/etc/." "$root/etc/"
# busybox init runs Hopper's rc and keeps the agent alive, as in the test image.
ln -sf /bin/busybox "$root/sbin/init"
install -m 0755 /dev/stdin "$root/usr/bin/hopper-run-job" <<'JOB'
#!/bin/sh
# hopper-run-job JIT_CONFIG_FILE: starts the official runner with the job's JIT config; the
# runner takes exactly one job and exits, and its status is the job's.
set -eu
cfg=${1:?usage: hopper-run-job JIT_CONFIG_FILE}
chown runner "$cfg"
exec sudo -u runner -H sh -c 'cd ~/actions-runner && exec ./run.sh --jitconfig "$(cat "$1")"' sh "$cfg"
JOB

step "ext4 image ($size)"
rm -f "$out"
mke2fs -q -t ext4 -d "$root" "$out" "$size"
echo "wrote $out"
