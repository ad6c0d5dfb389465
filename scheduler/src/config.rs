//! Command line and `HOPPER_*` environment configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "hopper-scheduler", version, about = "Hopper's control plane")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the webhook endpoint, the host API and the operator API.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "HOPPER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory of the embedded SQLite store and of the jobs' logs; created if missing.
    #[arg(long, env = "HOPPER_DATA_DIR", default_value = "/var/lib/hopper")]
    pub data_dir: PathBuf,
    /// Database URL overriding --data-dir (sqlite://PATH).
    #[arg(long, env = "HOPPER_DATABASE")]
    pub database: Option<String>,
    /// File holding the GitHub App's webhook secret.
    #[arg(long, env = "HOPPER_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: PathBuf,
    /// GitHub REST API base URL (GitHub Enterprise: https://HOST/api/v3).
    #[arg(
        long,
        env = "HOPPER_GITHUB_API_URL",
        default_value = "https://api.github.com"
    )]
    pub github_api_url: String,
    /// GitHub App id. Without an App, jobs are recorded but never placed.
    #[arg(long, env = "HOPPER_APP_ID", requires = "app_private_key")]
    pub app_id: Option<u64>,
    /// PEM file with the GitHub App's private key.
    #[arg(long, env = "HOPPER_APP_PRIVATE_KEY", requires = "app_id")]
    pub app_private_key: Option<PathBuf>,
    /// Label prefix that marks Hopper's jobs.
    #[arg(long, env = "HOPPER_LABEL_PREFIX", default_value = "hopper", value_parser = parse_prefix)]
    pub label_prefix: String,
    /// File holding the shared secret runner hosts enroll with. Without it, enrollment is off.
    #[arg(long, env = "HOPPER_ENROLL_SECRET_FILE")]
    pub enroll_secret_file: Option<PathBuf>,
    /// Register JIT runners at the organization level instead of the repository.
    #[arg(long, env = "HOPPER_ORG_RUNNERS")]
    pub org_runners: bool,
    /// Runner group of the JIT runners (1 is the default group).
    #[arg(long, env = "HOPPER_RUNNER_GROUP_ID", default_value_t = 1)]
    pub runner_group_id: u64,
    /// How often to compare the store with GitHub's view and remove finished runners.
    #[arg(long, env = "HOPPER_RECONCILE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// A host silent for this long is marked lost, and its jobs with it.
    #[arg(long, env = "HOPPER_HOST_LOST_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub host_lost_after: Duration,
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
}
