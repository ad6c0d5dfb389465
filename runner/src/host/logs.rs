//! Shipping a job's logs to the scheduler, which serves them to operators: every log before the
//! job's final report, and the logs that grew every 30 s while the job runs, so a long job can
//! be followed and a host that dies mid-job has sent most of them. Best effort: a failed upload
//! is a warning and changes nothing about the job.

use std::io::{self, SeekFrom};
use std::path::Path;
use std::time::Duration;

use hopper_api::{LogName, Secret};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::caplog::KEEP;
use super::client::SchedulerClient;
use super::jobdir::JobDir;

/// How often the logs of a running job are sent.
pub const FOLLOW_PERIOD: Duration = Duration::from_secs(30);

/// Sends every log the job has.
pub async fn upload_all(client: &SchedulerClient, token: &Secret, dir: &JobDir, job: u64) {
    for log in LogName::ALL {
        upload(client, token, dir, job, log).await;
    }
}

/// Sends the end of one log; false when there is no such log or it could not be sent.
async fn upload(
    client: &SchedulerClient,
    token: &Secret,
    dir: &JobDir,
    job: u64,
    log: LogName,
) -> bool {
    let path = dir.log(log);
    let body = match tail(&path).await {
        Ok(Some(body)) => body,
        Ok(None) => return false,
        Err(e) => {
            tracing::warn!(job, log = %path.display(), "cannot read the log to upload it: {e}");
            return false;
        }
    };
    match client.upload_log(token, job, log, body).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(job, log = log.as_str(), "log upload failed: {e}");
            false
        }
    }
}

/// The last [`KEEP`] bytes of a log file (the scheduler keeps the last 8 MiB after redacting
/// the JIT config; the margin lets a config across that line arrive whole); `None` if there is
/// no file.
async fn tail(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata().await?.len();
    let start = len.saturating_sub(KEEP);
    file.seek(SeekFrom::Start(start)).await?;
    // The file may grow while it is read: the body is the length measured here.
    let mut body = Vec::with_capacity((len - start) as usize);
    file.take(len - start).read_to_end(&mut body).await?;
    Ok(Some(body))
}

/// Sends a running job's logs that changed, every period, until stopped.
pub struct Follower {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Follower {
    pub fn start(
        client: SchedulerClient,
        token: Secret,
        dir: JobDir,
        job: u64,
        period: Duration,
    ) -> Follower {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            // Logs grow or are cut at their cap, so an unchanged length means nothing new.
            let mut sent = [None; LogName::ALL.len()];
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                for (log, sent) in LogName::ALL.into_iter().zip(&mut sent) {
                    let len = tokio::fs::metadata(dir.log(log))
                        .await
                        .ok()
                        .map(|m| m.len());
                    if len != *sent && upload(&client, &token, &dir, job, log).await {
                        *sent = len;
                    }
                }
            }
        });
        Follower { stop, task }
    }

    /// Stops, after an upload in flight, so that it cannot land after, and overwrite, the
    /// final one.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// A request the stand-in scheduler received: request line, Authorization, body.
    type Request = (String, String, Vec<u8>);

    /// A stand-in scheduler that records every request and answers 200 `{}`.
    fn scheduler() -> (SchedulerClient, Arc<Mutex<Vec<Request>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = BufReader::new(stream.unwrap());
                let (mut line, mut auth, mut len) = (String::new(), String::new(), 0);
                stream.read_line(&mut line).unwrap();
                loop {
                    let mut header = String::new();
                    stream.read_line(&mut header).unwrap();
                    let (name, value) = header.trim_end().split_once(": ").unwrap_or_default();
                    match name.to_ascii_lowercase().as_str() {
                        "" => break,
                        "authorization" => auth = value.to_string(),
                        "content-length" => len = value.parse().unwrap(),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                stream.read_exact(&mut body).unwrap();
                record
                    .lock()
                    .unwrap()
                    .push((line.trim_end().to_string(), auth, body));
                let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
                stream.get_mut().write_all(answer.as_bytes()).unwrap();
            }
        });
        (SchedulerClient::new(&url).unwrap(), seen)
    }

    /// A fresh data directory for this test, and job 7's directories in it.
    fn job_dir(test: &str) -> (PathBuf, JobDir) {
        let root = std::env::temp_dir().join(format!("hopper-logs-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = JobDir::new(&root, 7);
        fs::create_dir_all(&dir.logs).unwrap();
        (root, dir)
    }

    #[tokio::test]
    async fn every_present_log_is_sent_up_to_its_last_bytes() {
        let (client, seen) = scheduler();
        let (root, dir) = job_dir("all");
        let console: Vec<u8> = (0..KEEP + 1000).map(|i| (i % 251) as u8).collect();
        fs::write(dir.log(LogName::Console), &console).unwrap();
        fs::write(dir.log(LogName::Job), b"job output\n").unwrap();
        upload_all(&client, &Secret::new("hht_test"), &dir, 7).await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "no vmm.log, no upload of it");
        assert_eq!(seen[0].0, "PUT /api/v1/host/jobs/7/logs/console HTTP/1.1");
        assert_eq!(seen[0].1, "Bearer hht_test");
        assert_eq!(seen[0].2, console[1000..]);
        assert_eq!(seen[1].0, "PUT /api/v1/host/jobs/7/logs/job HTTP/1.1");
        assert_eq!(seen[1].2, b"job output\n");
        fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn a_follower_sends_logs_that_grew_until_it_is_stopped() {
        let (client, seen) = scheduler();
        let (root, dir) = job_dir("follow");
        let requests = |n: usize| {
            let seen = seen.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                while seen.lock().unwrap().len() < n && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let bodies: Vec<Vec<u8>> =
                    seen.lock().unwrap().iter().map(|r| r.2.clone()).collect();
                bodies
            }
        };
        let period = Duration::from_millis(20);
        // Each line lands whole (one write), as the follower may look at any time; the file
        // is renamed into place so that it never exists empty.
        let log = dir.log(LogName::Job);
        let append = |line: &[u8]| {
            let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
            f.write_all(line).unwrap();
        };
        let follower = Follower::start(client, Secret::new("t"), dir.clone(), 7, period);
        fs::write(dir.logs.join("new"), b"one\n").unwrap();
        fs::rename(dir.logs.join("new"), &log).unwrap();
        assert_eq!(requests(1).await, vec![b"one\n".to_vec()]);
        // Unchanged: not sent again.
        tokio::time::sleep(period * 10).await;
        assert_eq!(requests(1).await.len(), 1);
        append(b"two\n");
        assert_eq!(requests(2).await[1], b"one\ntwo\n");
        follower.stop().await;
        append(b"three\n");
        tokio::time::sleep(period * 10).await;
        assert_eq!(requests(2).await.len(), 2, "nothing is sent after the stop");
        fs::remove_dir_all(root).unwrap();
    }
}
