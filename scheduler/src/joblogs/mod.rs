//! Per-job logs that runner hosts upload: the VM's serial console, the VMM's messages and the
//! job command's output. They are files, `<data-dir>/logs/<job id>/<name>.log`, not database
//! rows: each is up to 8 MiB, always replaced whole and read whole. When a job's VM moves to
//! another host, the logs so far are sealed as earlier parts (`<name>.log.<n>`): the new host
//! uploads its own from empty, and a read gives the parts and the current log as one.

mod upload;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

pub use upload::Upload;

pub use hopper_api::logs::{LogInfo, LogName, MAX_LOG_BYTES};

#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct LogError {
    action: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError {
        action,
        path,
        source,
    }
}

/// The log files under one directory. Methods block; async callers use `spawn_blocking`.
pub struct JobLogs {
    dir: PathBuf,
}

impl JobLogs {
    pub fn new(dir: PathBuf) -> Self {
        JobLogs { dir }
    }

    fn path(&self, job: u64, name: LogName) -> PathBuf {
        self.dir.join(job.to_string()).join(name.file_name())
    }

    /// Replaces a log with `contents`. Readers see the old log or the new one, never a part:
    /// the new one is written to a temporary file, synced and renamed over the old one (and the
    /// directories synced, so that a stored log survives a machine crash too).
    pub fn put(&self, job: u64, name: LogName, contents: &[u8]) -> Result<LogInfo, LogError> {
        let path = self.path(job, name);
        let dir = path.parent().expect("a log has a job directory");
        fs::create_dir_all(dir).map_err(err("create", dir))?;
        // Unique per upload: concurrent uploads of one log each write their own file and the
        // last rename wins. A crash can leave one behind; it is never listed or served.
        let tmp = dir.join(format!(
            ".{}.{:016x}.tmp",
            name.file_name(),
            rand::random::<u64>()
        ));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            // Logs hold whatever the job printed.
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(contents)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(err("write", &path)(e));
        }
        for d in [dir, &self.dir] {
            File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(err("sync", d))?;
        }
        self.info(job, name)?
            .ok_or_else(|| err("stat", &path)(io::ErrorKind::NotFound.into()))
    }

    /// The sealed parts of a log (oldest first), then the current one: those that exist.
    fn parts(&self, job: u64, name: LogName) -> Vec<PathBuf> {
        let current = self.path(job, name);
        let sealed = (1..).map(|n| PathBuf::from(format!("{}.{n}", current.display())));
        let mut parts: Vec<PathBuf> = sealed.take_while(|p| p.exists()).collect();
        parts.push(current);
        parts
    }

    /// The job's VM moved on: its logs so far become earlier parts, kept as they are.
    pub fn seal(&self, job: u64) -> Result<(), LogError> {
        for name in LogName::ALL {
            let parts = self.parts(job, name);
            let current = parts.last().expect("the current log is always a part");
            let sealed = PathBuf::from(format!("{}.{}", current.display(), parts.len()));
            match fs::rename(current, &sealed) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(err("seal", current)(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn info(&self, job: u64, name: LogName) -> Result<Option<LogInfo>, LogError> {
        let (mut size, mut updated_at, mut found) = (0, 0, false);
        for path in self.parts(job, name) {
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err("stat", &path)(e)),
            };
            found = true;
            size += meta.len();
            updated_at = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(updated_at, |d| d.as_millis() as i64);
        }
        Ok(found.then_some(LogInfo {
            name,
            size,
            updated_at,
        }))
    }

    /// The job's stored logs, in [`LogName::ALL`] order.
    pub fn list(&self, job: u64) -> Result<Vec<LogInfo>, LogError> {
        LogName::ALL
            .into_iter()
            .filter_map(|name| self.info(job, name).transpose())
            .collect()
    }

    /// A log whole: its sealed parts, then the current one.
    pub fn read(&self, job: u64, name: LogName) -> Result<Option<Vec<u8>>, LogError> {
        let mut out: Option<Vec<u8>> = None;
        for path in self.parts(job, name) {
            match fs::read(&path) {
                Ok(data) => out.get_or_insert_with(Vec::new).extend(data),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(err("read", &path)(e)),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_replaced_whole_and_listed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let logs = JobLogs::new(dir.path().join("logs"));
        assert_eq!(logs.list(7).unwrap(), vec![]);
        assert_eq!(logs.read(7, LogName::Job).unwrap(), None);
        logs.put(7, LogName::Job, b"first").unwrap();
        let info = logs.put(7, LogName::Job, b"second upload").unwrap();
        assert_eq!((info.name, info.size), (LogName::Job, 13));
        logs.put(7, LogName::Console, b"boot").unwrap();
        let names: Vec<_> = logs.list(7).unwrap().iter().map(|i| i.name).collect();
        assert_eq!(names, vec![LogName::Console, LogName::Job]);
        assert_eq!(
            logs.read(7, LogName::Job).unwrap().unwrap(),
            b"second upload"
        );
        assert_eq!(logs.list(8).unwrap(), vec![]);
        // No temporary file is left next to the logs.
        let files = fs::read_dir(dir.path().join("logs/7")).unwrap().count();
        assert_eq!(files, 2);
    }

    #[test]
    fn a_moved_job_has_one_log_made_of_each_hosts_part() {
        let dir = tempfile::tempdir().unwrap();
        let logs = JobLogs::new(dir.path().join("logs"));
        logs.seal(7).unwrap();
        logs.put(7, LogName::Console, b"boot on a\n").unwrap();
        logs.seal(7).unwrap();
        // The new host starts its own from empty, and replaces only its own.
        logs.put(7, LogName::Console, b"x").unwrap();
        logs.put(7, LogName::Console, b"on b\n").unwrap();
        logs.seal(7).unwrap();
        logs.put(7, LogName::Console, b"on c\n").unwrap();
        assert_eq!(
            logs.read(7, LogName::Console).unwrap().unwrap(),
            b"boot on a\non b\non c\n"
        );
        assert_eq!(logs.list(7).unwrap()[0].size, 20);
        assert_eq!(logs.read(7, LogName::Job).unwrap(), None);
    }

    #[test]
    fn names_parse_only_the_three_logs() {
        for name in LogName::ALL {
            assert_eq!(LogName::parse(name.as_str()), Some(name));
        }
        assert_eq!(LogName::parse("secrets"), None);
        assert_eq!(LogName::parse("../job"), None);
    }
}
