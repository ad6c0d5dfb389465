//! `hopper-runner host`: the runner host daemon. It enrolls with the scheduler, heartbeats,
//! long-polls for orders and runs each job in its own microVM, several at once up to the
//! capacity it announced (the scheduler places no more than that on it). It runs on tokio: one
//! task per job, and one cancellation token that SIGTERM or SIGINT fires, which stops every job
//! (VM stopped, resources removed, job reported) before the daemon exits. A watcher task reads
//! the cloud's termination notices and reports them; the scheduler then orders this host's
//! jobs sent to other hosts (`job`), and other hosts' jobs received here (`receive`). Another
//! task keeps the host's certificate for mutual TLS with other hosts (`identity`) renewed.

mod caplog;
mod client;
mod enroll;
mod identity;
mod job;
mod jobdir;
mod logs;
mod netslot;
mod notice;
mod receive;
mod recover;
mod resources;
mod vm;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::Args;
use hopper_api::{NewHost, NoticeKind, NoticeReport, Order, Secret, SendOrder};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use client::{ApiError, SchedulerClient};
use job::JobContext;
use netslot::NetSlots;
use vm::Images;

/// How long stopping jobs (VM stopped, logs uploaded, job reported) may take on SIGTERM before
/// the daemon exits anyway.
const STOP_GRACE: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct HostArgs {
    /// Base URL of the scheduler, e.g. https://hopper.example.com.
    #[arg(long, env = "HOPPER_SCHEDULER")]
    scheduler: String,
    /// File holding the scheduler's enrollment secret (used once; the host token it buys is
    /// kept in the data directory).
    #[arg(long, env = "HOPPER_ENROLL_SECRET_FILE")]
    enroll_secret_file: PathBuf,
    /// Host state: credentials, the TLS identity (tls/), per-job work directories (disks,
    /// sockets) and per-job logs.
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
    /// Where termination notices (spot reclaim, maintenance) come from: the cloud's instance
    /// metadata service. `auto` uses whichever answers; none answering means no notices.
    #[arg(long, value_enum, default_value = "auto")]
    notice_source: notice::SourceChoice,
    /// Base URL of the metadata service, replacing the cloud's link-local address (e.g. a
    /// stand-in in tests).
    #[arg(long)]
    metadata_url: Option<String>,
    /// Where other hosts reach this one (a host name or IP address): VMs migrating here
    /// come to it. Default: the hostname.
    #[arg(long)]
    address: Option<String>,
    /// Names of this host's guest TAP devices: the prefix, then the job's network slot. Hosts
    /// that share a machine need different ones.
    #[arg(long, default_value = netslot::DEFAULT_TAP_PREFIX, value_parser = tap_prefix)]
    tap_prefix: String,
}

fn tap_prefix(s: &str) -> Result<String, String> {
    netslot::check_prefix(s).map(|()| s.to_string())
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
    let enroll_secret = Secret::from_file(&args.enroll_secret_file)?;
    let images = images(&args)?;
    if let Some(url) = &args.metadata_url {
        notice::check_url(url).context("bad --metadata-url")?;
    }
    let vcpus = match args.vcpus {
        Some(0) => bail!("--vcpus must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism()
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
    // Stored before any request: the scheduler only ever gets requests signed with it.
    let key = identity::HostKey::load_or_create(&args.data_dir)
        .context("cannot set up the host's TLS identity")?;
    let info = NewHost {
        address: args.address.clone().unwrap_or_else(|| name.clone()),
        name,
        vcpus,
        memory_mb,
        labels: args.labels.clone(),
        csr: key.csr()?,
    };
    info.validate()
        .map_err(|e| anyhow::anyhow!("the scheduler would refuse this host: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, client, enroll_secret, info, key, images))
}

async fn serve(
    args: HostArgs,
    client: SchedulerClient,
    enroll_secret: Secret,
    info: NewHost,
    key: identity::HostKey,
    images: Images,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    watch_signals(stop.clone()).context("cannot handle signals")?;
    let notices = notice::spawn(
        args.notice_source,
        args.metadata_url.clone(),
        notice::Timing::default(),
        stop.clone(),
    );
    let (reports, to_report) = mpsc::channel(16);
    let (azure_event, pending_event) = watch::channel(None);
    tokio::spawn(forward_notices(notices, reports.clone(), azure_event));
    let mut approval = notice::EventApproval::new(pending_event, args.metadata_url.as_deref());
    let creds = tokio::select! {
        creds = enroll_when_reachable(&client, &args.data_dir, &enroll_secret, &info) => creds?,
        _ = stop.cancelled() => return Ok(()),
    };
    let ctx = Arc::new(JobContext {
        client: client.clone(),
        token: creds.token.clone(),
        data_dir: args.data_dir.clone(),
        images,
        agent_timeout: Duration::from_secs(args.agent_timeout),
        job_timeout: Duration::from_secs(args.job_timeout),
        net: NetSlots::new(&args.tap_prefix),
        dns: std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|c| netslot::host_nameserver(&c)),
        tls: identity::tls_files(&args.data_dir),
        address: info.address.clone(),
    });
    crate::network::install_guest_nat(netslot::GUEST_NET)
        .context("cannot give guests outbound network access")?;
    tokio::spawn(report_notices(ctx.clone(), to_report));
    recover::recover(&ctx)
        .await
        .context("cannot clean up the jobs of the previous run")?;
    tracing::info!(host = %creds.host_id, vcpus = info.vcpus, memory_mb = info.memory_mb, scheduler = client.base(), "runner host ready");

    // A host enrolled by a version without certificates has none yet: renewed at once.
    tokio::spawn(renewal_loop(
        client.clone(),
        creds.token.clone(),
        args.data_dir.clone(),
        key,
        stop.clone(),
    ));
    tokio::spawn(heartbeat_loop(
        client,
        creds.token,
        creds.heartbeat_interval,
        stop.clone(),
    ));
    let mut jobs = JoinSet::new();
    let result = poll_loop(&ctx, &stop, &mut jobs, &reports, &mut approval).await;
    // Whatever ended the loop ends the jobs too: no VM runs without its daemon.
    stop.cancel();
    if !jobs.is_empty() {
        tracing::info!(jobs = jobs.len(), "stopping the running jobs");
        let stopped = tokio::time::timeout(STOP_GRACE, async {
            while jobs.join_next().await.is_some() {}
        });
        if stopped.await.is_err() {
            tracing::error!("jobs still stopping after {STOP_GRACE:?}; killing their VMs");
            jobs.shutdown().await;
        }
    }
    tracing::info!("runner host stopped");
    result
}

/// Fires `stop` on the first SIGTERM or SIGINT.
fn watch_signals(stop: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name}: stopping every job, then exiting");
        stop.cancel();
    });
    Ok(())
}

/// Logs each notice of the cloud and passes those that concern the jobs on to be reported.
async fn forward_notices(
    mut notices: mpsc::Receiver<notice::Notice>,
    reports: mpsc::Sender<NoticeReport>,
    azure_event: watch::Sender<Option<String>>,
) {
    while let Some(n) = notices.recv().await {
        let (cloud, event_id, detail) = (n.cloud, n.event_id.as_deref(), &n.detail);
        let report = match n.kind {
            notice::Kind::Reclaim { deadline } => {
                let left = deadline
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tracing::warn!(%cloud, deadline = %notice::show_time(deadline), seconds_left = left.as_secs(), event_id, "termination notice: the host will be reclaimed ({detail})");
                if let (notice::Cloud::Azure, Some(id)) = (cloud, event_id) {
                    let _ = azure_event.send(Some(id.to_string()));
                }
                NoticeReport {
                    kind: NoticeKind::Reclaim,
                    deadline: Some(epoch_ms(deadline)),
                    source: cloud.to_string(),
                }
            }
            notice::Kind::AtRisk => {
                tracing::warn!(%cloud, event_id, "the host is at risk ({detail})");
                NoticeReport {
                    kind: NoticeKind::AtRisk,
                    deadline: None,
                    source: cloud.to_string(),
                }
            }
            notice::Kind::Maintenance => {
                tracing::warn!(%cloud, event_id, "maintenance notice: the host will be paused a moment ({detail})");
                continue;
            }
        };
        if reports.send(report).await.is_err() {
            return;
        }
    }
}

fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Reports each notice to the scheduler, retrying until it is taken: the scheduler moves the
/// jobs only once it knows.
async fn report_notices(ctx: Arc<JobContext>, mut reports: mpsc::Receiver<NoticeReport>) {
    while let Some(report) = reports.recv().await {
        let mut wait = Duration::from_millis(500);
        loop {
            match ctx.client.report_notice(&ctx.token, &report).await {
                Ok(()) => {
                    tracing::info!(source = %report.source, "notice reported to the scheduler");
                    break;
                }
                Err(e @ ApiError::Status { .. }) => {
                    tracing::error!(source = %report.source, "the scheduler refused the notice: {e}");
                    break;
                }
                Err(e) => {
                    tracing::warn!("notice report failed, retrying in {wait:?}: {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Enrolls (or loads the stored credentials), waiting for a scheduler that is not up yet; any
/// other refusal (wrong secret, bad host data) is final.
async fn enroll_when_reachable(
    client: &SchedulerClient,
    data_dir: &std::path::Path,
    secret: &Secret,
    info: &NewHost,
) -> anyhow::Result<enroll::Credentials> {
    let mut wait = Duration::from_secs(1);
    loop {
        match enroll::load_or_enroll(client, data_dir, secret, info).await {
            Err(enroll::EnrollError::Api(e @ ApiError::Transport { .. })) => {
                tracing::warn!("{e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            other => return Ok(other?),
        }
    }
}

/// Heartbeats while no long poll is open (e.g. when the host is full and jobs run long).
async fn heartbeat_loop(
    client: SchedulerClient,
    token: Secret,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Err(e) = client.heartbeat(&token).await {
            tracing::warn!("heartbeat failed: {e}");
        }
    }
}

/// Renews the host's certificate whenever it is due (`identity::renewal_due`: at once when
/// there is none) until `stop` fires. The key stays the same: only the certificate file
/// changes, each file replaced whole, so whoever reads the files never pairs a certificate with
/// a key it does not belong to (a new key and its certificate cannot be swapped in together).
/// A failed renewal is retried with backoff while the certificate in hand stays in place.
async fn renewal_loop(
    client: SchedulerClient,
    token: Secret,
    data_dir: PathBuf,
    key: identity::HostKey,
    stop: CancellationToken,
) {
    // Looked at again at least this often: the files may change (a new enrollment) and a
    // sleep of hours is better not trusted across clock changes.
    const RECHECK: Duration = Duration::from_secs(3600);
    const FIRST_RETRY: Duration = Duration::from_secs(10);
    let mut retry = FIRST_RETRY;
    loop {
        let wait = identity::renewal_due(&data_dir)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if !wait.is_zero() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait.min(RECHECK)) => continue,
            }
        }
        let renewed = async {
            let issued = client.renew_certificate(&token, key.csr()?).await?;
            identity::store(&data_dir, &issued)?;
            // Else this loop would ask again and again.
            if identity::renewal_due(&data_dir) <= SystemTime::now() {
                bail!(
                    "the new certificate is due for renewal already: is this host's clock right?"
                );
            }
            anyhow::Ok(issued.not_after)
        };
        let renewed = tokio::select! {
            _ = stop.cancelled() => return,
            renewed = renewed => renewed,
        };
        match renewed {
            Ok(not_after) => {
                tracing::info!(not_after, "host certificate renewed");
                retry = FIRST_RETRY;
            }
            Err(e) => {
                tracing::warn!("cannot renew the host certificate, retrying in {retry:?}: {e:#}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(600));
            }
        }
    }
}

/// Takes assignments and starts a task for each new job. Returns when `stop` fires, or with an
/// error when the scheduler no longer knows this host.
/// Takes orders: a task for each new job or arriving VM, send orders to the task of their job,
/// chaos notices to the notice reporter. Returns when `stop` fires, or with an error when the
/// scheduler no longer knows this host.
async fn poll_loop(
    ctx: &Arc<JobContext>,
    stop: &CancellationToken,
    jobs: &mut JoinSet<u64>,
    notices: &mpsc::Sender<NoticeReport>,
    approval: &mut notice::EventApproval,
) -> anyhow::Result<()> {
    // The job tasks, by job id, with where their send orders go.
    let mut active: HashMap<u64, mpsc::Sender<SendOrder>> = HashMap::new();
    // Migrations already taken: their orders come again until reported on.
    let mut taken = HashSet::new();
    let mut backoff = Duration::from_secs(1);
    loop {
        while let Some(done) = jobs.try_join_next() {
            match done {
                Ok(id) => {
                    active.remove(&id);
                }
                // Its VMM was killed and its resources dropped with the task; the job stays
                // failed at the scheduler once the host is found lost or restarted.
                Err(e) => tracing::error!("a job task failed: {e}"),
            }
        }
        // Reclaimed on Azure and empty: the machine may go now rather than at its time.
        if let Some(event) = approval.due(active.len()) {
            approval.approve(event);
        }
        let polled = tokio::select! {
            polled = ctx.client.next_order(&ctx.token) => polled,
            _ = stop.cancelled() => return Ok(()),
        };
        let order = match polled {
            Ok(o) => {
                backoff = Duration::from_secs(1);
                o
            }
            Err(ApiError::Unauthorized(msg)) => bail!(
                "the scheduler no longer accepts this host's token ({msg}); remove {} to enroll again",
                ctx.data_dir.join(enroll::FILE).display()
            ),
            Err(e) => {
                tracing::warn!("order poll failed, retrying in {backoff:?}: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let Some(order) = order else { continue };
        // The scheduler repeats an order until it hears back; the pause keeps a slow report
        // from turning a repeat into a busy loop.
        let repeat = || tokio::time::sleep(Duration::from_millis(200));
        match order {
            Order::Run(a) => {
                let id = a.job.id;
                if active.contains_key(&id) {
                    repeat().await;
                    continue;
                }
                tracing::info!(job = id, vcpus = a.shape.vcpus(), memory_gb = a.shape.memory_gb(), image = %a.image, runner = %a.runner_name, "assignment");
                let (tx, rx) = mpsc::channel(4);
                active.insert(id, tx);
                let (ctx, stop) = (ctx.clone(), stop.child_token());
                jobs.spawn(async move {
                    job::supervise(ctx, a, rx, stop).await;
                    id
                });
            }
            Order::Receive(r) => {
                let id = r.job.id;
                if active.contains_key(&id) || !taken.insert(r.migration) {
                    repeat().await;
                    continue;
                }
                tracing::info!(
                    job = id,
                    migration = r.migration,
                    vcpus = r.shape.vcpus(),
                    memory_gb = r.shape.memory_gb(),
                    "receiving a job's VM from another host"
                );
                let (tx, rx) = mpsc::channel(4);
                active.insert(id, tx);
                let (ctx, stop) = (ctx.clone(), stop.child_token());
                jobs.spawn(async move {
                    receive::receive(ctx, r, rx, stop).await;
                    id
                });
            }
            Order::Send(o) => {
                if !taken.insert(o.migration) {
                    repeat().await;
                    continue;
                }
                match active.get(&o.job_id) {
                    Some(tx) => {
                        let _ = tx.send(o).await;
                    }
                    None => {
                        let failed = hopper_api::MigrationReport::Failed {
                            message: format!("job {} does not run on this host", o.job_id),
                        };
                        job::report_migration(ctx, o.migration, &failed).await;
                    }
                }
            }
            Order::Interrupt(i) => {
                let deadline = SystemTime::now() + Duration::from_secs(i.notice_s);
                tracing::warn!(
                    notice_s = i.notice_s,
                    "chaos: termination notice from the scheduler"
                );
                let report = NoticeReport {
                    kind: NoticeKind::Reclaim,
                    deadline: Some(epoch_ms(deadline)),
                    source: "chaos".into(),
                };
                if notices.send(report).await.is_err() {
                    return Ok(());
                }
                // Acknowledged by the report; until then the order comes again.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;
    use axum::Json;
    use hopper_api::{CertificateRequest, IssuedCertificate};
    use std::sync::Mutex;

    /// A scheduler that answers certificate renewals with certificates valid for `lifetime`
    /// from now, and records the requests' authorization.
    async fn scheduler(lifetime: i64) -> (SchedulerClient, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let renew = move |headers: HeaderMap, Json(req): Json<CertificateRequest>| async move {
            let auth = headers["authorization"].to_str().unwrap().to_string();
            record.lock().unwrap().push(auth);
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            Json::<IssuedCertificate>(identity::tests::issue(&req.csr, now - 300, now + lifetime))
        };
        let app = axum::Router::new().route("/api/v1/host/certificate", axum::routing::post(renew));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (SchedulerClient::new(&url).unwrap(), seen)
    }

    #[tokio::test]
    async fn a_host_without_a_certificate_gets_one_at_once_and_renewal_stops_with_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let key = identity::HostKey::load_or_create(dir.path()).unwrap();
        // A request made with the key shows its public half.
        let public = key.csr().unwrap();
        let (client, seen) = scheduler(3600).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(renewal_loop(
            client,
            Secret::new("hht_test"),
            dir.path().to_path_buf(),
            key,
            stop.clone(),
        ));
        let files = identity::tls_files(dir.path());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !files.cert.exists() {
            assert!(tokio::time::Instant::now() < deadline, "no certificate");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // For the host's key, and usable as the migration channel's identity.
        let pem = std::fs::read(&files.cert).unwrap();
        let (_, block) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = block.parse_x509().unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&public).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            rcgen::PublicKeyData::der_bytes(&csr.public_key)
        );
        files.client_config().unwrap();
        // Not due again for half an hour: one request, with the host token.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*seen.lock().unwrap(), ["Bearer hht_test"]);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("renewal stops with the daemon")
            .unwrap();
    }
}
