#!/usr/bin/env bash
# Builds the guest kernel cache and the guest images under .cache/ (see images/README.md):
#   .cache/kernel/                   Debian's cloud kernel package, unpacked (+ modules.dep)
#   .cache/images/vmlinuz            its stock bzImage
#   .cache/images/initramfs.cpio.gz  stage-1 init: virtio modules, then root= disk or itself
#   .cache/images/rootfs.ext4        ext4 root disk: busybox, hopper-agent, init scripts
# Both images carry hopper-workload, the test workload (images/workload).
# Each step is skipped when its output is newer than its inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
cache=$repo/.cache
out=$cache/images
images=$repo/images
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }

# The virtio drivers a guest needs, by module name (dependencies are added).
GUEST_MODULES=(virtio_mmio virtio_blk virtio_net virtio_console vmw_vsock_virtio_transport)
ROOTFS_SIZE=${ROOTFS_SIZE:-64M}
# Where the cloud kernel comes from, and the series it must be.
KERNEL_SUITE=bookworm-backports
KERNEL_SERIES=6.12
AGENT=$repo/target/static/x86_64-unknown-linux-gnu/release/hopper-agent
WORKLOAD=$repo/target/static/x86_64-unknown-linux-gnu/release/hopper-workload
BUSYBOX=$(command -v busybox) || { echo "busybox missing: run tests/setup.sh" >&2; exit 1; }

# up_to_date OUTPUT INPUT...: OUTPUT exists and no input (file or anything under a
# directory) is newer.
up_to_date() {
	local target=$1
	shift
	[ -e "$target" ] || return 1
	[ -z "$(find "$@" -newer "$target" -print -quit)" ]
}

step "Guest kernel (Debian cloud, $KERNEL_SUITE)"
# The kernel comes from $KERNEL_SUITE (tests/setup.sh adds it as an apt source), and must be
# of the $KERNEL_SERIES series: guests and test hosts were measured with it (tests/README.md).
resolve_kernel() {
	apt-cache depends -t "$KERNEL_SUITE" linux-image-cloud-amd64 2>/dev/null |
		awk '/Depends: linux-image-/{print $2; exit}'
}
meta=$(resolve_kernel)
if [ -z "$meta" ]; then
	apt-get update -qq
	meta=$(resolve_kernel)
fi
[ -n "$meta" ] || { echo "cannot resolve linux-image-cloud-amd64 from $KERNEL_SUITE (run tests/setup.sh)" >&2; exit 1; }
case $meta in
linux-image-"$KERNEL_SERIES".*) ;;
*) echo "apt offers $meta, not a $KERNEL_SERIES kernel from $KERNEL_SUITE: without that suite as a source, run tests/setup.sh; if the suite moved on, test the new series (tests/README.md) and update KERNEL_SERIES" >&2; exit 1 ;;
esac
if [ "$(cat "$cache/kernel/package" 2>/dev/null)" = "$meta" ]; then
	note "$meta (cached)"
else
	note "downloading $meta"
	rm -rf "$cache/kernel.new"
	mkdir -p "$cache/kernel.new/deb"
	(cd "$cache/kernel.new/deb" && apt-get download "$meta" >/dev/null 2>&1) ||
		{ echo "apt-get download $meta failed" >&2; exit 1; }
	dpkg-deb -x "$cache/kernel.new"/deb/*.deb "$cache/kernel.new/root"
	rm -rf "$cache/kernel.new/deb"
	release=$(ls "$cache/kernel.new/root/lib/modules")
	# Debian ships the modules xz-compressed; busybox's insmod loads plain ones.
	find "$cache/kernel.new/root/lib/modules" -name '*.ko.xz' -exec xz -d {} +
	# The package ships no modules.dep (the installer makes it); the harness and this
	# script need it to load modules in dependency order.
	depmod -b "$cache/kernel.new/root" "$release"
	ln -s "root/boot/vmlinuz-$release" "$cache/kernel.new/vmlinuz"
	ln -s "root/lib/modules/$release" "$cache/kernel.new/modules"
	echo "$release" >"$cache/kernel.new/release"
	echo "$meta" >"$cache/kernel.new/package"
	rm -rf "$cache/kernel"
	mv "$cache/kernel.new" "$cache/kernel"
fi
kernel=$cache/kernel
release=$(cat "$kernel/release")

mkdir -p "$out"
step "Kernel image"
if up_to_date "$out/vmlinuz" "$kernel/package"; then
	note "cached"
else
	cp -L "$kernel/vmlinuz" "$out/vmlinuz"
fi

step "hopper-agent, hopper-workload (static)"
# Explicit --target: RUSTFLAGS then apply to the target only, not to proc-macros.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet -p hopper-agent \
	-p hopper-workload --target x86_64-unknown-linux-gnu --target-dir "$repo/target/static"

# stage_base DIR: busybox with its applet links, the agent, the workload, and the init
# scripts shared by the initramfs and the root disk.
stage_base() {
	local dir=$1 applet
	mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root}
	cp "$BUSYBOX" "$dir/bin/busybox"
	for applet in $("$BUSYBOX" --list-full); do
		[ -e "$dir/$applet" ] || ln -s /bin/busybox "$dir/$applet"
	done
	# Without debug info the agent is a quarter of the size: less for the guest to unpack.
	strip --strip-debug -o "$dir/bin/hopper-agent" "$AGENT"
	# Its symbols too: nothing in a guest reads them.
	strip -o "$dir/bin/hopper-workload" "$WORKLOAD"
	cp -r "$images/guest/." "$dir/"
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$dir/etc/passwd"
	printf 'root:x:0:\n' >"$dir/etc/group"
}

inputs=("$BUSYBOX" "$AGENT" "$WORKLOAD" "$images/guest" "$images/build.sh" "$kernel/package")

step "Guest initramfs"
if up_to_date "$out/initramfs.cpio.gz" "${inputs[@]}" "$images/initramfs" "$images/lib"; then
	note "cached"
else
	stage=$cache/stage/initramfs
	rm -rf "$stage"
	stage_base "$stage"
	mkdir -p "$stage/newroot" "$stage/etc/hopper"
	cp "$images/initramfs/init" "$stage/init"
	"$images/lib/modules-closure.sh" "$kernel/modules" "${GUEST_MODULES[@]}" >"$stage/etc/hopper/modules"
	while read -r mod; do
		mkdir -p "$stage/lib/modules/$(dirname "$mod")"
		cp "$kernel/modules/$mod" "$stage/lib/modules/$mod"
	done <"$stage/etc/hopper/modules"
	note "modules: $(xargs -n1 basename <"$stage/etc/hopper/modules" | tr '\n' ' ')"
	(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$out/initramfs.cpio.gz.tmp"
	mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
	note "$(du -h "$out/initramfs.cpio.gz" | cut -f1)"
fi

step "Guest root disk (ext4, $ROOTFS_SIZE)"
if up_to_date "$out/rootfs.ext4" "${inputs[@]}"; then
	note "cached"
else
	stage=$cache/stage/rootfs
	rm -rf "$stage"
	stage_base "$stage"
	mkdir -p "$stage"/{home,var/log,var/tmp,mnt}
	rm -f "$out/rootfs.ext4.tmp"
	truncate -s "$ROOTFS_SIZE" "$out/rootfs.ext4.tmp"
	# -d fills the file system from a directory: no root privileges or loop mounts.
	mke2fs -q -t ext4 -L hopper-root -E root_owner=0:0 -d "$stage" "$out/rootfs.ext4.tmp"
	mv "$out/rootfs.ext4.tmp" "$out/rootfs.ext4"
fi
rm -rf "$cache/stage"
step "Guest images ready in ${out#"$repo"/}"
