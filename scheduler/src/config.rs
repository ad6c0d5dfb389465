//! Command line and `HOPPER_*` environment configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "hopper-scheduler", version, about = "Hopper's control plane")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the command line and checks what clap cannot say alone, exiting as clap does
    /// (status 2, before anything is created) when it is wrong.
    pub fn parse_checked() -> Cli {
        let cli = Cli::parse();
        if let Command::Up(up) = &cli.command {
            if let Err(e) = up.runner_hosts() {
                Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, e)
                    .exit();
            }
        }
        cli
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the webhook endpoint, the host API and the operator API.
    Serve(ServeArgs),
    /// Start the whole path on this machine: the scheduler with local defaults and runner
    /// hosts next to it (in a nested test host when this machine's KVM cannot run guests).
    /// Without a GitHub App this is local mode: jobs are submitted to POST /api/v1/jobs (or
    /// --demo runs one); with --app-id and --app-private-key it serves GitHub's webhooks.
    Up(UpArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "HOPPER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory of the embedded SQLite store and of the jobs' logs; created if missing.
    #[arg(long, env = "HOPPER_DATA_DIR", default_value = "/var/lib/hopper")]
    pub data_dir: PathBuf,
    /// File holding the GitHub App's webhook secret.
    #[arg(long, env = "HOPPER_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: PathBuf,
    /// File holding the shared secret runner hosts enroll with. Without it, enrollment is off.
    #[arg(long, env = "HOPPER_ENROLL_SECRET_FILE")]
    pub enroll_secret_file: Option<PathBuf>,
    /// File holding the operator token: the operator API (/api/v1/jobs…, /api/v1/hosts,
    /// /metrics) takes `Authorization: Bearer <token>`. Without it, the operator API is off
    /// (401); webhooks and runner hosts are served either way.
    #[arg(long, env = "HOPPER_OPERATOR_TOKEN_FILE")]
    pub operator_token_file: Option<PathBuf>,
    /// Without a GitHub App, accept jobs submitted to POST /api/v1/jobs (local mode, what
    /// `up` runs). Off by default: whoever holds the operator token could then run jobs on the
    /// hosts.
    #[arg(long, env = "HOPPER_LOCAL_JOBS")]
    pub local_jobs: bool,
    #[command(flatten)]
    pub options: SchedulerOptions,
}

/// What `serve` and `up` share.
#[derive(Debug, Clone, Args)]
pub struct SchedulerOptions {
    /// Database URL overriding --data-dir (sqlite://PATH).
    #[arg(long, env = "HOPPER_DATABASE")]
    pub database: Option<String>,
    /// GitHub REST API base URL (GitHub Enterprise: https://HOST/api/v3).
    #[arg(
        long,
        env = "HOPPER_GITHUB_API_URL",
        default_value = "https://api.github.com"
    )]
    pub github_api_url: String,
    /// GitHub App id. Without an App, GitHub's jobs are recorded but not placed; `up` (or
    /// `serve --local-jobs`) then runs jobs submitted to POST /api/v1/jobs (local mode).
    #[arg(long, env = "HOPPER_APP_ID", requires = "app_private_key")]
    pub app_id: Option<u64>,
    /// PEM file with the GitHub App's private key.
    #[arg(long, env = "HOPPER_APP_PRIVATE_KEY", requires = "app_id")]
    pub app_private_key: Option<PathBuf>,
    /// Label prefix that marks Hopper's jobs.
    #[arg(long, env = "HOPPER_LABEL_PREFIX", default_value = "hopper", value_parser = parse_prefix)]
    pub label_prefix: String,
    /// Register JIT runners at the organization level instead of the repository.
    #[arg(long, env = "HOPPER_ORG_RUNNERS")]
    pub org_runners: bool,
    /// Runner group of the JIT runners (1 is the default group).
    #[arg(long, env = "HOPPER_RUNNER_GROUP_ID", default_value_t = 1)]
    pub runner_group_id: u64,
    /// How often to compare the store with GitHub's view and remove finished runners.
    #[arg(long, env = "HOPPER_RECONCILE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// How long one job's runner registration at GitHub may take, retries included; past it
    /// the job goes back to the queue and is tried again 30 s later. Other jobs never wait
    /// for it.
    #[arg(long, env = "HOPPER_REGISTRATION_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub registration_timeout: Duration,
    /// A host silent for this long is marked lost, and its jobs with it.
    #[arg(long, env = "HOPPER_HOST_LOST_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub host_lost_after: Duration,
    /// Hours a runner host's certificate (mutual TLS between hosts, for live migration) is
    /// valid; hosts renew theirs when less than half is left.
    #[arg(long, env = "HOPPER_HOST_CERT_VALIDITY_HOURS", default_value_t = crate::fleet_ca::DEFAULT_HOST_VALIDITY_HOURS,
          value_parser = clap::value_parser!(u64).range(1..=720))]
    pub host_cert_validity_hours: u64,
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Address to listen on. The runner host reaches the scheduler through this machine's
    /// loopback, so it must be 127.0.0.1 or 0.0.0.0; 0.0.0.0 also exposes the API to the
    /// network (the operator API takes the operator token).
    #[arg(long, env = "HOPPER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory of the store, the jobs' logs, the generated secrets, the runner host's state
    /// and the logs of both; created (mode 0700) if missing.
    #[arg(long, env = "HOPPER_DATA_DIR", default_value = ".hopper")]
    pub data_dir: PathBuf,
    /// File holding the webhook secret (default: <data-dir>/webhook-secret, generated if
    /// missing; give it to the GitHub App).
    #[arg(long, env = "HOPPER_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// File holding the enrollment secret (default: <data-dir>/enroll-secret, generated if
    /// missing; other runner hosts may enroll with it too).
    #[arg(long, env = "HOPPER_ENROLL_SECRET_FILE")]
    pub enroll_secret_file: Option<PathBuf>,
    /// File holding the operator token the operator API takes (default:
    /// <data-dir>/operator-token, generated if missing).
    #[arg(long, env = "HOPPER_OPERATOR_TOKEN_FILE")]
    pub operator_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub options: SchedulerOptions,
    /// The runner host to start: `auto` (`direct` when this machine's KVM can run guests,
    /// otherwise `testhost`), `direct` (hopper-runner host on this machine; needs root),
    /// `testhost` (hopper-runner host inside a nested QEMU test host) or `none`.
    #[arg(long, value_enum, default_value_t = RunnerMode::Auto)]
    pub runner: RunnerMode,
    /// Guest images of a direct runner host (vmlinuz, initramfs.cpio.gz, rootfs.ext4, as
    /// made by images/build.sh). A test host carries its own copy.
    #[arg(long, default_value = ".cache/images")]
    pub images: PathBuf,
    /// How many runner hosts to start (default 1; 2 with --demo evacuate): each a
    /// `hopper-runner host` of its own (direct), or all in one test host. Named hopper-up,
    /// hopper-up-1, hopper-up-2…
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=MAX_HOSTS as i64))]
    pub hosts: Option<u8>,
    /// vCPUs each runner host offers to jobs (default: all CPUs when direct, 2 in a test host).
    #[arg(long)]
    pub host_vcpus: Option<u32>,
    /// Memory in MiB each runner host offers to jobs (default: all but 1 GiB when direct, 4096
    /// in a test host).
    #[arg(long)]
    pub host_memory_mb: Option<u32>,
    /// The hopper-runner binary of a direct runner host (default: next to this executable).
    #[arg(long)]
    pub runner_bin: Option<PathBuf>,
    /// The hopper-testhost binary (default: next to this executable; built by `cargo build
    /// --release -p hopper-tests --bins`).
    #[arg(long)]
    pub testhost_bin: Option<PathBuf>,
    /// Run a demo, show its progress, then stop everything; the exit status says whether it
    /// succeeded. `job` (what `--demo` alone runs): one job end to end, with its log.
    /// `evacuate`: a job running on one runner host moves to another when its host gets a
    /// termination notice, and that host is killed when the notice runs out (2 hosts or more).
    /// Local mode only.
    #[arg(
        long,
        value_enum,
        num_args = 0..=1,
        default_missing_value = "job",
        conflicts_with = "app_id"
    )]
    pub demo: Option<Demo>,
    /// How long --demo may take in all, the runner hosts' set-up included.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub demo_timeout: Duration,
}

/// The most runner hosts `up` starts.
pub const MAX_HOSTS: u8 = 8;

impl UpArgs {
    /// How many runner hosts to start: `--hosts`, else 2 for `--demo evacuate`, else 1; an
    /// error where `--demo evacuate` could not run.
    pub fn runner_hosts(&self) -> Result<usize, String> {
        if self.demo == Some(Demo::Evacuate) && self.runner == RunnerMode::None {
            return Err(
                "--demo evacuate kills the runner host it moves the job off: it needs \
                 runner hosts that `up` starts, not --runner none"
                    .into(),
            );
        }
        match (self.demo, self.hosts) {
            (Some(Demo::Evacuate), Some(1)) => Err(
                "--demo evacuate moves a job from one runner host to another: it needs --hosts 2 \
                 or more (or no --hosts: 2)"
                    .into(),
            ),
            (_, Some(n)) => Ok(n.into()),
            (Some(Demo::Evacuate), None) => Ok(2),
            (_, None) => Ok(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Demo {
    Job,
    Evacuate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunnerMode {
    Auto,
    Direct,
    Testhost,
    None,
}

/// Parses `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unit must be ms, s, m or h"
            ))
        }
    };
    if d.is_zero() {
        return Err("duration must be positive".into());
    }
    Ok(d)
}

fn parse_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "invalid label prefix {s:?}: letters, digits, - and _ only"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
    }

    fn up(args: &[&str]) -> Result<UpArgs, clap::Error> {
        let argv = ["hopper-scheduler", "up"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Up(up) => up,
            Command::Serve(_) => unreachable!(),
        })
    }

    #[test]
    fn runner_hosts_are_one_to_eight_and_two_for_the_evacuation_demo() {
        let hosts = |args: &[&str]| up(args).unwrap().runner_hosts();
        assert_eq!(hosts(&[]), Ok(1));
        assert_eq!(hosts(&["--hosts", "8"]), Ok(8));
        assert_eq!(hosts(&["--demo"]), Ok(1));
        assert_eq!(hosts(&["--demo", "evacuate"]), Ok(2));
        assert_eq!(hosts(&["--demo", "evacuate", "--hosts", "3"]), Ok(3));
        let refused = hosts(&["--hosts", "1", "--demo", "evacuate"]).unwrap_err();
        assert!(refused.contains("needs --hosts 2 or more"), "{refused}");
        let refused = hosts(&["--demo", "evacuate", "--runner", "none"]).unwrap_err();
        assert!(refused.contains("not --runner none"), "{refused}");
        assert_eq!(hosts(&["--demo", "--runner", "none"]), Ok(1));
        for bad in ["0", "9", "two"] {
            let e = up(&["--hosts", bad]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
        }
        assert!(up(&["--hosts", "9"])
            .unwrap_err()
            .to_string()
            .contains("1..=8"));
    }

    #[test]
    fn demo_takes_an_optional_kind() {
        assert_eq!(up(&[]).unwrap().demo, None);
        assert_eq!(up(&["--demo"]).unwrap().demo, Some(Demo::Job));
        // A flag after a bare --demo is not taken for its value.
        let args = up(&["--demo", "--hosts", "3"]).unwrap();
        assert_eq!((args.demo, args.hosts), (Some(Demo::Job), Some(3)));
        assert_eq!(up(&["--demo", "job"]).unwrap().demo, Some(Demo::Job));
        assert_eq!(up(&["--demo=evacuate"]).unwrap().demo, Some(Demo::Evacuate));
        assert!(up(&["--demo", "dance"]).is_err());
    }
}
