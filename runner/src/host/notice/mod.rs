//! Termination notices: word from the cloud, through its instance metadata service, that this
//! spot host will be taken (`Reclaim`), may be taken soon (`AtRisk`), or goes through
//! maintenance that keeps it running (`Maintenance`). One watcher task polls the metadata
//! service of the cloud the host runs on and sends each new notice on a channel; it stops with
//! the daemon's cancellation token. Nothing it meets ends it: unreachable services, error
//! statuses and bodies it does not understand are logged once, retried with backoff, and never
//! turned into a notice.
//!
//! Times: a valid notice whose time has passed is still a real notice, so its deadline becomes
//! "now" (evacuate at once); a notice whose time cannot be read is not believed (logged,
//! ignored), since a false evacuation costs as much as a missed one.

mod ack;
mod aws;
mod azure;
mod feed;
mod gcp;
mod http;
#[cfg(test)]
mod tests;

use std::fmt;
use std::time::{Duration, SystemTime};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use ack::EventApproval;
pub use http::{check_url, Metadata, NoticeError};

/// `--notice-source`: where notices come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceChoice {
    /// The cloud whose metadata service answers (none answering: no notices).
    Auto,
    Aws,
    Gcp,
    Azure,
    /// Watch for no notices.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Gcp,
    Azure,
}

impl Cloud {
    const ALL: [Cloud; 3] = [Cloud::Aws, Cloud::Gcp, Cloud::Azure];

    /// The metadata service's documented address.
    pub fn default_url(self) -> &'static str {
        match self {
            Cloud::Aws | Cloud::Azure => "http://169.254.169.254",
            Cloud::Gcp => "http://metadata.google.internal",
        }
    }
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cloud::Aws => "AWS",
            Cloud::Gcp => "GCP",
            Cloud::Azure => "Azure",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The cloud takes the host at `deadline` (spot reclaim, preemption, termination).
    Reclaim { deadline: SystemTime },
    /// The host's jobs are in danger without a set time: the cloud recommends leaving (AWS
    /// rebalance), or maintenance will stop the host (GCP TERMINATE_ON_HOST_MAINTENANCE, Azure
    /// Reboot and Redeploy).
    AtRisk,
    /// Maintenance the host lives through, paused for a moment (GCP live migration, Azure
    /// Freeze).
    Maintenance,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub kind: Kind,
    pub cloud: Cloud,
    /// Azure's EventId: `azure::acknowledge` lets the event start early once the host is ready.
    pub event_id: Option<String>,
    /// What the metadata service said. Also what tells notices apart: the same words on every
    /// poll are one notice; changed words (a new deadline) are a new one.
    pub detail: String,
}

/// How often and how patiently the watchers ask; tests shorten it all.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Between polls of AWS's and Azure's endpoints (GCP's are long polls).
    pub poll: Duration,
    /// The longest pause after repeated failures. Short: GCP gives 30 s of notice.
    pub max_backoff: Duration,
    /// Limit of one request, connecting included.
    pub request: Duration,
    /// Limit of the `auto` probe of each metadata service.
    pub probe: Duration,
    /// How long a GCP long poll may wait for a change; also the limit of Azure's first request,
    /// which switches scheduled events on and is documented to take up to two minutes.
    pub long_wait: Duration,
    /// Lifetime asked for AWS session tokens (IMDSv2 allows up to 6 hours).
    pub token_ttl: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            poll: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            request: Duration::from_secs(2),
            probe: Duration::from_secs(2),
            long_wait: Duration::from_secs(120),
            token_ttl: Duration::from_secs(6 * 3600),
        }
    }
}

/// Finds the source (for `auto`), then watches it in the background until `stop` fires.
/// Notices arrive on the returned channel, which closes when there is nothing to watch.
pub fn spawn(
    choice: SourceChoice,
    url: Option<String>,
    timing: Timing,
    stop: CancellationToken,
) -> mpsc::Receiver<Notice> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let cloud = match choice {
            SourceChoice::Auto => tokio::select! {
                found = detect(url.as_deref(), &timing) => found,
                _ = stop.cancelled() => return,
            },
            SourceChoice::Aws => Some(Cloud::Aws),
            SourceChoice::Gcp => Some(Cloud::Gcp),
            SourceChoice::Azure => Some(Cloud::Azure),
            SourceChoice::None => None,
        };
        let Some(cloud) = cloud else {
            tracing::info!("no termination notices are watched (no cloud metadata service answered, or --notice-source none)");
            return;
        };
        let base = url.as_deref().unwrap_or(cloud.default_url());
        let md = match Metadata::new(base, timing.request) {
            Ok(md) => md,
            Err(e) => {
                tracing::error!("termination notices are not watched: {e}");
                return;
            }
        };
        tracing::info!(%cloud, url = base, "watching for termination notices");
        tokio::select! {
            () = watch(cloud, md, timing, tx) => {}
            _ = stop.cancelled() => {}
        }
    });
    rx
}

/// Returns only when nobody listens any more.
async fn watch(cloud: Cloud, md: Metadata, timing: Timing, tx: mpsc::Sender<Notice>) {
    match cloud {
        Cloud::Aws => aws::watch(md, timing, tx).await,
        Cloud::Gcp => gcp::watch(md, timing, tx).await,
        Cloud::Azure => azure::watch(md, timing, tx).await,
    }
}

/// The cloud whose metadata service answers its own protocol, asking all at once; `url`
/// replaces each one's documented address.
async fn detect(url: Option<&str>, timing: &Timing) -> Option<Cloud> {
    let mut probes = JoinSet::new();
    for cloud in Cloud::ALL {
        let base = url.unwrap_or(cloud.default_url()).to_string();
        let limit = timing.probe;
        probes.spawn(async move {
            let md = Metadata::new(&base, limit).ok()?;
            let answers = match cloud {
                Cloud::Aws => aws::probe(&md).await,
                Cloud::Gcp => gcp::probe(&md).await,
                Cloud::Azure => azure::probe(&md).await,
            };
            answers.then_some(cloud)
        });
    }
    while let Some(probed) = probes.join_next().await {
        if let Ok(Some(cloud)) = probed {
            return Some(cloud);
        }
    }
    None
}

/// A JSON object as `T`. Serde would also take an array of the fields in order; no metadata
/// service sends one, so it is refused like any other body not understood.
fn json_object<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, serde_json::Error> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body)?;
    serde_json::from_value(object.into())
}

/// An RFC 3339 time as AWS writes them ("2026-12-07T21:00:00Z").
fn rfc3339(text: &str) -> Result<SystemTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| e.to_string())
}

/// A time for logs.
pub fn show_time(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{t:?}"))
}
