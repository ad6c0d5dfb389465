//! Where a job lives on the host. `jobs/<id>/` holds what the VM needs while it runs (its disk,
//! sockets, the VMM's pid) and is removed with the VM; `logs/<id>/` keeps the VM's console, the
//! VMM's messages and the job's output after the job, for the operator.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use hopper_api::LogName;
use serde::{Deserialize, Serialize};

use super::caplog;

pub const JOBS: &str = "jobs";
pub const LOGS: &str = "logs";

/// What a restarted daemon needs to know about a job directory it finds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: u64,
    pub runner_name: String,
}

#[derive(Debug, Clone)]
pub struct JobDir {
    pub work: PathBuf,
    pub logs: PathBuf,
}

impl JobDir {
    pub fn new(data_dir: &Path, job_id: u64) -> Self {
        JobDir {
            work: data_dir.join(JOBS).join(job_id.to_string()),
            logs: data_dir.join(LOGS).join(job_id.to_string()),
        }
    }

    pub fn disk(&self) -> PathBuf {
        self.work.join("disk.img")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.work.join("agent.sock")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.work.join("api.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.work.join("vmm.pid")
    }
    fn record_file(&self) -> PathBuf {
        self.work.join("job.json")
    }
    pub fn log(&self, log: LogName) -> PathBuf {
        self.logs.join(log.file_name())
    }

    /// Creates both directories and the record. A work directory that exists already means a
    /// second start of the same job, which is refused.
    pub fn create(&self, record: &JobRecord) -> io::Result<()> {
        fs::create_dir_all(self.work.parent().expect("work dir has a parent"))?;
        fs::create_dir(&self.work)?;
        fs::create_dir_all(&self.logs)?;
        fs::write(
            self.record_file(),
            serde_json::to_vec(record).expect("record serializes"),
        )
    }

    pub fn record(&self) -> io::Result<JobRecord> {
        let data = fs::read(self.record_file())?;
        serde_json::from_slice(&data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn write_pid(&self, pid: u32) -> io::Result<()> {
        fs::write(self.pid_file(), pid.to_string())
    }

    pub fn pid(&self) -> Option<u32> {
        fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Appends a line to the job's log (the host's own notes between the job's output).
    pub fn note(&self, line: &str) {
        self.append(LogName::Job, format!("hopper-runner: {line}\n").as_bytes());
    }

    /// Appends to one of the job's logs, within its cap.
    pub fn append(&self, log: LogName, data: &[u8]) {
        if let Err(e) = caplog::append(&self.log(log), data) {
            tracing::warn!(log = %self.log(log).display(), "cannot write the job's log: {e}");
        }
    }

    /// Removes the work directory: the disk and sockets are gone, the logs stay.
    pub fn remove_work(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.work) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Job directories a previous daemon left in `data_dir`.
pub fn leftovers(data_dir: &Path) -> io::Result<Vec<JobDir>> {
    let jobs = data_dir.join(JOBS);
    let entries = match fs::read_dir(&jobs) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.parse::<u64>().ok()) {
            out.push(JobDir::new(data_dir, id));
        }
    }
    Ok(out)
}
