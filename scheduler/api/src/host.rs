//! The host API's messages: enrollment, assignments and status reports.

use serde::{Deserialize, Serialize};

use crate::job::{Job, VmState};
use crate::secret::{serialize_exposed, Secret};
use crate::shape::Shape;

/// The longest status message a host may send.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// How long the scheduler holds an assignment poll open when the host names no `wait`, and the
/// most it holds one open.
pub const DEFAULT_POLL_WAIT_S: u64 = 25;
pub const MAX_POLL_WAIT_S: u64 = 60;
/// The largest certificate signing request a host may send: a P-256 request is under 1 KiB,
/// and the scheduler parses what it gets.
pub const MAX_CSR_BYTES: usize = 16384;
/// How a certificate signing request (PEM) begins.
pub const CSR_PEM_BEGIN: &str = "-----BEGIN CERTIFICATE REQUEST-----";

/// `lost` once the host has been silent for longer than the scheduler's `--host-lost-after`; a
/// heartbeat makes it `active` again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Active,
    /// Its cloud may reclaim it soon: nothing new is placed there.
    AtRisk,
    /// It is going away (a termination notice, or an operator's drain): nothing new is placed
    /// there and its jobs are moved to other hosts.
    Reclaiming,
    /// Reclaiming, and none of its jobs is left on it: its end loses nothing.
    Evacuated,
    Lost,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Active => "active",
            HostState::AtRisk => "at_risk",
            HostState::Reclaiming => "reclaiming",
            HostState::Evacuated => "evacuated",
            HostState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<HostState> {
        [
            HostState::Active,
            HostState::AtRisk,
            HostState::Reclaiming,
            HostState::Evacuated,
            HostState::Lost,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Whether new jobs (and moving ones) may go there.
    pub fn takes_jobs(self) -> bool {
        self == HostState::Active
    }
}

/// What a host declares when it enrolls.
// The schema's limits are those `validate` checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewHost {
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub name: String,
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4096))]
    pub vcpus: u32,
    #[cfg_attr(feature = "openapi", schema(minimum = 128, maximum = 67108864))]
    pub memory_mb: u64,
    /// Guest images this host runs; empty means any.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 64))]
    pub labels: Vec<String>,
    /// Where this host can be reached (shown to operators).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 256))]
    pub address: String,
    /// A PKCS#10 certificate signing request (PEM) for the host's migration key (ECDSA P-256).
    /// The scheduler ignores the names and extensions it asks for: the certificate it issues
    /// names `hopper-runner` and the host id, nothing else.
    // A literal (utoipa takes no constants); the scheduler's OpenAPI test compares it.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 16384))]
    pub csr: String,
}

impl NewHost {
    /// The scheduler refuses a host that fails this; the host checks before it asks.
    pub fn validate(&self) -> Result<(), String> {
        let text_ok = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
        };
        if !text_ok(&self.name, 128) {
            return Err("name must be 1 to 128 printable characters".into());
        }
        if !text_ok(&self.address, 256) {
            return Err("address must be 1 to 256 printable characters".into());
        }
        if self.vcpus == 0 || self.vcpus > 4096 {
            return Err("vcpus must be 1 to 4096".into());
        }
        if self.memory_mb < 128 || self.memory_mb > 64 * 1024 * 1024 {
            return Err("memory_mb must be 128 to 67108864".into());
        }
        if self.labels.len() > 64 || self.labels.iter().any(|l| !text_ok(l, 128)) {
            return Err("at most 64 labels of 1 to 128 printable characters".into());
        }
        check_csr(&self.csr)
    }
}

/// The shape of a certificate signing request; whether it parses and its signature holds is
/// the scheduler's to check.
fn check_csr(csr: &str) -> Result<(), String> {
    if csr.is_empty() || csr.len() > MAX_CSR_BYTES || !csr.starts_with(CSR_PEM_BEGIN) {
        return Err(format!(
            "csr must be a PEM certificate signing request ({CSR_PEM_BEGIN}…) of at most \
             {MAX_CSR_BYTES} bytes"
        ));
    }
    Ok(())
}

/// A host's request for a new certificate (renewal), made with its migration key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertificateRequest {
    /// A PKCS#10 certificate signing request (PEM) for the host's migration key (ECDSA P-256).
    /// The scheduler ignores the names and extensions it asks for: the certificate it issues
    /// names `hopper-runner` and the host id, nothing else.
    // A literal (utoipa takes no constants); the scheduler's OpenAPI test compares it.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 16384))]
    pub csr: String,
}

impl CertificateRequest {
    /// The scheduler refuses a request that fails this; the host checks before it asks.
    pub fn validate(&self) -> Result<(), String> {
        check_csr(&self.csr)
    }
}

/// A certificate the fleet CA issued to a host, for mutual TLS between hosts (live migration).
/// Public material only: the host's private key never leaves the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssuedCertificate {
    /// The host's certificate (PEM): DNS name `hopper-runner`, common name the host id, for
    /// TLS server and client authentication.
    pub certificate: String,
    /// The fleet CA's certificate (PEM): a host accepts a peer whose certificate it signed.
    pub ca_certificate: String,
    /// When the certificate expires, in milliseconds since the epoch; hosts renew once less
    /// than half of its validity is left.
    pub not_after: i64,
}

/// A host with what its jobs use of it. Holds no secrets (the token is kept only as a hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Host {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub labels: Vec<String>,
    pub address: String,
    pub state: HostState,
    /// When a reclaiming host goes away, milliseconds since the epoch (none for a drain).
    #[serde(default)]
    pub deadline: Option<i64>,
    /// Milliseconds since the epoch.
    pub enrolled_at: i64,
    /// Milliseconds since the epoch.
    pub last_heartbeat: i64,
    pub used_vcpus: u32,
    pub used_memory_mb: u64,
}

/// The answer to an enrollment.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Enrolled {
    pub host: Host,
    /// The host's credential for every later call (`Authorization: Bearer …`). Shown once.
    #[serde(serialize_with = "serialize_exposed")]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub token: Secret,
    /// How often the host should heartbeat.
    pub heartbeat_interval_s: u64,
    /// The host's certificate, signed from its request's `csr`.
    pub certificate: IssuedCertificate,
}

/// What a host gets to run: the job, the VM to boot and the runner's JIT config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignment {
    pub job: Job,
    pub shape: Shape,
    pub image: String,
    pub runner_name: String,
    /// The job's guest network: /30 number `net_slot` of the fleet's guest range, the same on
    /// every host the VM visits (the guest keeps its address when it moves).
    pub net_slot: u32,
    /// A local job's shell script, run as root in the guest instead of the runner; its output
    /// is the job log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Start the runner with `./run.sh --jitconfig <jit_config>`. Single use; never log it.
    #[serde(serialize_with = "serialize_exposed")]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub jit_config: Secret,
}

/// A host's report on a job's VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub vm_state: VmState,
    /// At most 4096 bytes of UTF-8 (`MAX_MESSAGE_BYTES`); `maxLength` counts characters, so a
    /// message within it can still be too long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // A literal (utoipa takes no constants); the scheduler's OpenAPI test compares it.
    #[cfg_attr(feature = "openapi", schema(max_length = 4096))]
    pub message: Option<String>,
}

impl StatusReport {
    /// A report whose message is cut, on a character boundary, to what the scheduler takes.
    pub fn new(vm_state: VmState, message: Option<&str>) -> Self {
        StatusReport {
            vm_state,
            message: message.map(|m| truncate(m, MAX_MESSAGE_BYTES).to_string()),
        }
    }

    pub fn check(&self) -> Result<(), String> {
        match &self.message {
            Some(m) if m.len() > MAX_MESSAGE_BYTES => {
                Err(format!("message over {MAX_MESSAGE_BYTES} bytes"))
            }
            _ => Ok(()),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_carries_its_jit_config_but_never_prints_it() {
        let a: Assignment = serde_json::from_value(serde_json::json!({
            "job": {
                "id": 7, "run_id": 1, "run_attempt": 1, "repository": "o/r",
                "installation_id": null, "labels": ["hopper-1cpu-1gb"], "state": "assigned",
                "conclusion": null, "shape": {"vcpus": 1, "memory_gb": 1}, "image": null,
                "reason": null, "host_id": "h", "runner_id": 3, "runner_name": "hopper-7",
                "vm_state": null, "created_at": 0, "assigned_at": 0, "updated_at": 0
            },
            "shape": { "vcpus": 1, "memory_gb": 1 },
            "image": "ubuntu-24.04",
            "runner_name": "hopper-7",
            "net_slot": 0,
            "jit_config": "jitcfg_secret"
        }))
        .unwrap();
        assert_eq!(a.job.id, 7);
        assert!(!format!("{a:?}").contains("jitcfg_secret"));
        let sent = serde_json::to_value(&a).unwrap();
        assert_eq!(sent["jit_config"], "jitcfg_secret");
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(3000);
        let r = StatusReport::new(VmState::Failed, Some(&long));
        let m = r.message.as_deref().unwrap();
        assert!(m.len() <= MAX_MESSAGE_BYTES && m.chars().all(|c| c == 'é'));
        assert!(r.check().is_ok());
        let over = StatusReport {
            vm_state: VmState::Failed,
            message: Some("x".repeat(MAX_MESSAGE_BYTES + 1)),
        };
        assert!(over.check().is_err());
        assert_eq!(
            StatusReport::new(VmState::Running, Some("short"))
                .message
                .as_deref(),
            Some("short")
        );
    }

    #[test]
    fn the_scheduler_refuses_what_the_host_would_not_send() {
        let mut h = NewHost {
            name: "h".into(),
            vcpus: 2,
            memory_mb: 1024,
            labels: vec![],
            address: "h".into(),
            csr: format!("{CSR_PEM_BEGIN}\nMIIB\n-----END CERTIFICATE REQUEST-----\n"),
        };
        assert!(h.validate().is_ok());
        h.name = "a\nb".into();
        assert!(h.validate().is_err());
    }

    #[test]
    fn a_csr_must_look_like_one_and_fit() {
        let ok = format!("{CSR_PEM_BEGIN}\nMIIB\n-----END CERTIFICATE REQUEST-----\n");
        let request = |csr: &str| CertificateRequest { csr: csr.into() };
        assert!(request(&ok).validate().is_ok());
        for bad in [
            String::new(),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            format!("{ok}{}", "x".repeat(MAX_CSR_BYTES)),
        ] {
            assert!(request(&bad).validate().is_err(), "{bad:.40}");
        }
        let at_limit = format!("{ok}{}", "x".repeat(MAX_CSR_BYTES - ok.len()));
        assert!(request(&at_limit).validate().is_ok());
    }
}
