//! `hopper-runner host`: the runner host daemon. It enrolls with the scheduler, heartbeats,
//! long-polls for assignments and runs each job in its own microVM, several at once up to the
//! capacity it announced (the scheduler places no more than that on it).

mod api;
mod enroll;
mod job;
mod jobdir;
mod logs;
mod netslot;
mod recover;
mod secret;
mod vm;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use api::{ApiError, HostInfo, SchedulerClient};
use job::JobContext;
use netslot::NetSlots;
use secret::Secret;
use vm::Images;

#[derive(Args)]
pub struct HostArgs {
    /// Base URL of the scheduler, e.g. https://hopper.example.com.
    #[arg(long, env = "HOPPER_SCHEDULER")]
    scheduler: String,
    /// File holding the scheduler's enrollment secret (used once; the host token it buys is
    /// kept in the data directory).
    #[arg(long, env = "HOPPER_ENROLL_SECRET_FILE")]
    enroll_secret_file: PathBuf,
    /// Host state: credentials, per-job work directories (disks, sockets) and per-job logs.
    #[arg(
        long,
        env = "HOPPER_RUNNER_DATA_DIR",
        default_value = "/var/lib/hopper/runner"
    )]
    data_dir: PathBuf,
    /// vCPUs offered to jobs (default: all CPUs of this machine).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory offered to jobs in MiB (default: all memory less 1 GiB for the host).
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Guest images this host runs (comma-separated); a host with labels only gets jobs whose
    /// image label is among them. Default: any.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Name of this host at the scheduler (default: the hostname).
    #[arg(long)]
    name: Option<String>,
    /// Directory with the guest image: vmlinuz, initramfs.cpio.gz, rootfs.ext4 (as made by
    /// images/build.sh). Default: <data-dir>/images.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Guest kernel (default: <images>/vmlinuz).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs (default: <images>/initramfs.cpio.gz).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest root disk; every job boots a private copy (default: <images>/rootfs.ext4).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Seconds a guest's agent may take to come up before the job is failed.
    #[arg(long, default_value_t = 120)]
    agent_timeout: u64,
    /// Seconds a job may run before its VM is killed and the job failed.
    #[arg(long, default_value_t = 6 * 3600)]
    job_timeout: u64,
}

fn read_secret(path: &Path) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the enrollment secret file {}", path.display()))?;
    let value = text.trim();
    if value.is_empty() {
        bail!("the enrollment secret file {} is empty", path.display());
    }
    Ok(Secret::new(value))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "hopper-host".into())
}

fn total_memory_mb() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemTotal in /proc/meminfo")?;
    Ok(kib / 1024)
}

fn images(args: &HostArgs) -> anyhow::Result<Images> {
    let dir = args
        .images
        .clone()
        .unwrap_or_else(|| args.data_dir.join("images"));
    let pick = |given: &Option<PathBuf>, name: &str| -> anyhow::Result<PathBuf> {
        let path = given.clone().unwrap_or_else(|| dir.join(name));
        if !path.is_file() {
            bail!(
                "guest image file {} not found (see --images, --kernel, --initrd, --rootfs)",
                path.display()
            );
        }
        Ok(path)
    };
    Ok(Images {
        kernel: pick(&args.kernel, "vmlinuz")?,
        initrd: pick(&args.initrd, "initramfs.cpio.gz")?,
        rootfs: pick(&args.rootfs, "rootfs.ext4")?,
    })
}

pub fn run(args: HostArgs) -> anyhow::Result<()> {
    // Everything is checked before anything is changed or sent.
    let enroll_secret = read_secret(&args.enroll_secret_file)?;
    let images = images(&args)?;
    let vcpus = match args.vcpus {
        Some(0) => bail!("--vcpus must be at least 1"),
        Some(n) => n,
        None => thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
    };
    let memory_mb = match args.memory_mb {
        Some(m) if m < 128 => bail!("--memory-mb must be at least 128"),
        Some(m) => m,
        None => total_memory_mb()?.saturating_sub(1024).max(128),
    };
    let name = args.name.clone().unwrap_or_else(hostname);
    let client = SchedulerClient::new(&args.scheduler).context("bad --scheduler")?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.data_dir.display()
        )
    })?;

    let info = HostInfo {
        name: name.clone(),
        vcpus,
        memory_mb,
        labels: args.labels.clone(),
        address: name,
    };
    let creds = enroll_when_reachable(&client, &args.data_dir, &enroll_secret, &info)?;
    let ctx = JobContext {
        client: client.clone(),
        token: creds.token.clone(),
        data_dir: args.data_dir.clone(),
        images,
        agent_timeout: Duration::from_secs(args.agent_timeout),
        job_timeout: Duration::from_secs(args.job_timeout),
        net: NetSlots::new(),
        dns: std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|c| netslot::host_nameserver(&c)),
    };
    crate::network::install_guest_nat(netslot::GUEST_NET, netslot::TAP_PREFIX)
        .context("cannot give guests outbound network access")?;
    recover::recover(&ctx).context("cannot clean up the jobs of the previous run")?;
    tracing::info!(host = %creds.host_id, vcpus, memory_mb, scheduler = client.base(), "runner host ready");

    let heartbeat = (
        client.clone(),
        creds.token.clone(),
        creds.heartbeat_interval,
    );
    thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || heartbeat_loop(heartbeat.0, heartbeat.1, heartbeat.2))
        .context("cannot start the heartbeat thread")?;
    poll_loop(&ctx)
}

/// Enrolls (or loads the stored credentials), waiting for a scheduler that is not up yet; any
/// other refusal (wrong secret, bad host data) is final.
fn enroll_when_reachable(
    client: &SchedulerClient,
    data_dir: &Path,
    secret: &Secret,
    info: &HostInfo,
) -> anyhow::Result<enroll::Credentials> {
    let mut wait = Duration::from_secs(1);
    loop {
        match enroll::load_or_enroll(client, data_dir, secret, info) {
            Err(enroll::EnrollError::Api(e @ ApiError::Transport { .. })) => {
                tracing::warn!("{e}; retrying in {wait:?}");
                thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            other => return Ok(other?),
        }
    }
}

/// Heartbeats while no long poll is open (e.g. when the host is full and jobs run long).
fn heartbeat_loop(client: SchedulerClient, token: Secret, interval: Duration) {
    loop {
        thread::sleep(interval);
        if let Err(e) = client.heartbeat(&token) {
            tracing::warn!("heartbeat failed: {e}");
        }
    }
}

/// Takes assignments and starts a supervisor thread for each new job. Returns only when the
/// scheduler no longer knows this host.
fn poll_loop(ctx: &JobContext) -> anyhow::Result<()> {
    let active: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut backoff = Duration::from_secs(1);
    loop {
        let assignment = match ctx.client.next_assignment(&ctx.token) {
            Ok(a) => {
                backoff = Duration::from_secs(1);
                a
            }
            Err(ApiError::Unauthorized(msg)) => bail!(
                "the scheduler no longer accepts this host's token ({msg}); remove {} to enroll again",
                ctx.data_dir.join(enroll::FILE).display()
            ),
            Err(e) => {
                tracing::warn!("assignment poll failed, retrying in {backoff:?}: {e}");
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let Some(a) = assignment else { continue };
        let id = a.job.id;
        // The scheduler repeats an assignment until its first status report arrives; the
        // pause keeps a slow report from turning this into a busy loop.
        if !active.lock().unwrap_or_else(|e| e.into_inner()).insert(id) {
            thread::sleep(Duration::from_millis(200));
            continue;
        }
        tracing::info!(job = id, vcpus = a.shape.vcpus, memory_gb = a.shape.memory_gb, image = %a.image, runner = %a.runner_name, "assignment");
        let (job_ctx, job_active) = (ctx.clone(), active.clone());
        let spawned = thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                job::supervise(&job_ctx, a);
                job_active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
        if let Err(e) = spawned {
            // Not reported: the scheduler hands the job out again and the next poll retries.
            tracing::error!(job = id, "cannot start a supervisor thread: {e}");
            active.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            thread::sleep(backoff);
        }
    }
}
