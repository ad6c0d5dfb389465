//! The test host's initramfs: busybox, the KVM/TAP/nftables modules, the static project
//! binaries, QEMU (the baseline VMM) and nft with their shared libraries, and the guest
//! images. Cached under .cache/testhost/, keyed on every input's path, size and mtime.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::binaries;
use crate::paths::{cache_dir, repo_root, GuestArtifacts};
use crate::HarnessError;

const INIT: &str = include_str!("../testhost/init");

/// Programs from the machine running the tests, copied with the libraries `ldd` lists.
const HOST_PROGRAMS: [&str; 2] = ["qemu-system-x86_64", "nft"];

/// QEMU firmware the baseline needs: `-M microvm` boots through qboot and loads the kernel
/// with the linuxboot option ROM.
const QEMU_FIRMWARE: [&str; 2] = ["bios-microvm.bin", "linuxboot_dma.bin"];

/// Modules loaded in every test host (dependencies are added from modules.dep):
/// KVM for guests; virtio-pci/net for the host's own NIC; TAP, vhost, bridge and veth for
/// guest networking; nftables (with NAT and conntrack) for guest isolation.
pub(crate) const DEFAULT_MODULES: &[&str] = &[
    "kvm-amd",
    "virtio_pci",
    "virtio_net",
    "tun",
    "vhost_net",
    "vhost_vsock",
    "bridge",
    "veth",
    "nf_tables",
    "nft_ct",
    "nft_nat",
    "nft_masq",
    "nft_chain_nat",
    "nft_reject_inet",
    "nft_fib_inet",
];

/// Returns the path of an up-to-date test-host initramfs for these modules, building it if
/// needed.
pub(crate) fn l1_initramfs(
    guest: &GuestArtifacts,
    modules: &[String],
) -> Result<PathBuf, HarnessError> {
    // One build at a time in this process; other processes are safe through the atomic rename.
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());

    let rust_bins = binaries::build_static()?;
    let programs: Vec<PathBuf> = HOST_PROGRAMS
        .iter()
        .map(|p| which(p))
        .collect::<Result<_, _>>()?;
    let mut libs = BTreeSet::new();
    for p in &programs {
        libs.extend(shared_libraries(p)?);
    }
    let busybox = which("busybox")?;
    let firmware = qemu_firmware()?;
    let module_paths = module_closure(guest, modules)?;
    let images: Vec<PathBuf> = ["vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"]
        .iter()
        .map(|i| guest.images.join(i))
        .collect();

    let mut key = DefaultHasher::new();
    INIT.hash(&mut key);
    module_paths.hash(&mut key);
    let inputs = rust_bins
        .iter()
        .chain(&programs)
        .chain(&libs)
        .chain([&busybox])
        .chain(&firmware)
        .chain(&images);
    for f in inputs.clone() {
        let meta = fs::metadata(f).map_err(|_| HarnessError::MissingCache(f.clone()))?;
        (f, meta.len(), meta.mtime(), meta.mtime_nsec()).hash(&mut key);
    }
    guest.release.hash(&mut key);
    let dir = cache_dir().join("testhost");
    let out = dir.join(format!("l1-{:016x}.cpio.gz", key.finish()));
    if out.exists() {
        return Ok(out);
    }

    let stage = dir.join(format!("stage-{}", std::process::id()));
    let _ = fs::remove_dir_all(&stage);
    let result = (|| {
        for d in [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "etc/testhost",
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "root",
            "guest",
        ] {
            mkdir(&stage.join(d))?;
        }
        write(&stage.join("init"), INIT.as_bytes(), 0o755)?;
        write(
            &stage.join("etc/passwd"),
            b"root:x:0:0:root:/root:/bin/sh\n",
            0o644,
        )?;
        write(&stage.join("etc/group"), b"root:x:0:\n", 0o644)?;
        copy(&busybox, &stage.join("bin/busybox"))?;
        busybox_links(&busybox, &stage)?;
        for bin in &rust_bins {
            strip(bin, &stage.join("bin").join(bin.file_name().unwrap()))?;
        }
        for p in programs.iter().chain(&libs).chain(&firmware) {
            copy(p, &stage.join(p.strip_prefix("/").unwrap()))?;
        }
        let mod_root = Path::new("lib/modules").join(&guest.release);
        let mut list = String::new();
        for m in &module_paths {
            copy(&guest.modules.join(m), &stage.join(&mod_root).join(m))?;
            list.push_str(&format!("{}/{m}\n", guest.release));
        }
        write(&stage.join("etc/testhost/modules"), list.as_bytes(), 0o644)?;
        for i in &images {
            copy(i, &stage.join("guest").join(i.file_name().unwrap()))?;
        }
        pack(&stage, &out)
    })();
    let _ = fs::remove_dir_all(&stage);
    result?;
    // Older builds are never used again.
    for entry in fs::read_dir(&dir)
        .map_err(HarnessError::io("listing .cache/testhost"))?
        .flatten()
    {
        let p = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if p != out && name.starts_with("l1-") && name.ends_with(".cpio.gz") {
            let _ = fs::remove_file(p);
        }
    }
    Ok(out)
}

/// The firmware files, where this machine's QEMU finds them (`-L help` lists its search path:
/// Debian's QEMU 10 takes bios-microvm.bin from the seabios package's directory). They keep
/// their paths in the test host, whose QEMU has the same search path.
fn qemu_firmware() -> Result<Vec<PathBuf>, HarnessError> {
    let search = run(Command::new("qemu-system-x86_64").args(["-L", "help"]))?;
    QEMU_FIRMWARE
        .iter()
        .map(|f| {
            search
                .lines()
                .map(|dir| Path::new(dir.trim()).join(f))
                .find(|p| p.is_file())
                .ok_or_else(|| HarnessError::MissingCache(Path::new("/usr/share/qemu").join(f)))
        })
        .collect()
}

fn module_closure(guest: &GuestArtifacts, modules: &[String]) -> Result<Vec<String>, HarnessError> {
    let script = repo_root().join("images/lib/modules-closure.sh");
    let out = run(Command::new(&script).arg(&guest.modules).args(modules))?;
    Ok(out.lines().map(str::to_string).collect())
}

/// Absolute paths of the shared libraries (and the dynamic loader) a program needs.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    Ok(parse_ldd(&run(Command::new("ldd").arg(program))?))
}

fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|line| match line.split_once("=>") {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)"; "=> not found" is skipped
            // and then fails at run time with the library's name, which is the clearer error.
            Some((_, rest)) => rest.split_whitespace().next(),
            // "/lib64/ld-linux-x86-64.so.2 (0x…)" or "linux-vdso.so.1 (0x…)"
            None => line.split_whitespace().next(),
        })
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

fn which(program: &str) -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| HarnessError::MissingCache(PathBuf::from(program)))
}

fn busybox_links(busybox: &Path, stage: &Path) -> Result<(), HarnessError> {
    for applet in run(Command::new(busybox).arg("--list-full"))?.lines() {
        let link = stage.join(applet);
        if !link.exists() {
            symlink("/bin/busybox", &link)
                .map_err(HarnessError::io(format!("linking {applet}")))?;
        }
    }
    Ok(())
}

/// Debug info would double the image (and TCG unpacks every byte at boot).
fn strip(src: &Path, dst: &Path) -> Result<(), HarnessError> {
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(dst)
        .arg(src))
    .map(drop)
}

/// `cpio | gzip -1`: fast to make and, more importantly, fast for an emulated CPU to unpack.
fn pack(stage: &Path, out: &Path) -> Result<(), HarnessError> {
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let script = "find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1 > \"$0\"";
    run(Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&tmp)
        .current_dir(stage))?;
    fs::rename(&tmp, out).map_err(HarnessError::io(format!("renaming {}", tmp.display())))
}

fn run(cmd: &mut Command) -> Result<String, HarnessError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(HarnessError::io(format!("running {shown}")))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: shown,
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mkdir(p: &Path) -> Result<(), HarnessError> {
    fs::create_dir_all(p).map_err(HarnessError::io(format!("creating {}", p.display())))
}

fn copy(src: &Path, dst: &Path) -> Result<(), HarnessError> {
    mkdir(dst.parent().unwrap())?;
    fs::copy(src, dst)
        .map(drop)
        .map_err(HarnessError::io(format!("copying {}", src.display())))
}

fn write(p: &Path, data: &[u8], mode: u32) -> Result<(), HarnessError> {
    fs::write(p, data).map_err(HarnessError::io(format!("writing {}", p.display())))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(HarnessError::io(format!("chmod {}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_and_loader_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\tlibgone.so => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
