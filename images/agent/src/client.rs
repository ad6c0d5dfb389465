//! Blocking client for the agent protocol, used by the runner daemon and the test harness.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::framing::{write_frame, FrameError, FrameReader};
use crate::protocol::{
    AgentFrame, Event, ExecOutput, ExecRequest, Op, Reply, ReplyBody, Request, WriteFileRequest,
    PROTOCOL_VERSION,
};

/// How soon `wait_ready` pings when it hears nothing: the agent's one ready frame is lost
/// when it was sent before the host connected to a channel that does not buffer (QEMU's
/// socket chardev drops guest output while no client is connected), and a running guest
/// (one just restored, say) sends none. Soon, since that wait adds to every call on such a
/// channel. The interval doubles up to the maximum: while the guest is still booting nothing
/// reads the channel, and every unread ping takes socket buffer space (a dozen over a boot).
const READY_PING_FIRST: Duration = Duration::from_millis(20);
const READY_PING_MAX: Duration = Duration::from_secs(4);

/// File data per `write_file` frame; larger files are sent as appended chunks.
const WRITE_CHUNK_BYTES: usize = 8 << 20;

/// A byte stream the client can put deadlines on. Writes need one too: a peer that does not
/// read (a guest still booting) eventually blocks them.
pub trait Channel: Read + Write {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Channel for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

impl Channel for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent channel: {0}")]
    Io(#[from] io::Error),
    #[error("agent channel: {0}")]
    Frame(FrameError),
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("agent closed the channel")]
    Closed,
    #[error("agent speaks protocol version {0}, this client speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("agent sent an unparseable frame: {0}")]
    BadFrame(String),
    #[error("agent sent an unexpected reply: {0}")]
    UnexpectedReply(String),
    #[error("agent: {0}")]
    Agent(String),
}

/// A command to run in the guest.
#[derive(Debug, Clone)]
pub struct Exec(ExecRequest);

impl Exec {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Exec(ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            stdin: vec![],
        })
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.env.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.0.cwd = Some(dir.into());
        self
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.0.stdin = data.into();
        self
    }

    pub fn argv(&self) -> &[String] {
        &self.0.argv
    }
}

pub struct AgentClient<S: Channel> {
    stream: S,
    frames: FrameReader,
    next_id: u64,
    /// Limit on each request's reply; `None` waits forever (long-running jobs).
    timeout: Option<Duration>,
}

impl<S: Channel> AgentClient<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            frames: FrameReader::default(),
            next_id: 1,
            timeout: None,
        }
    }

    /// Sets how long each request waits for its reply.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Waits until the agent has announced itself (or answered a ping) and checks its protocol
    /// version. Lines that are not agent frames are skipped: a console may carry other output,
    /// and a TTY not yet in raw mode echoes what we send.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<u32, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut ping_interval = READY_PING_FIRST;
        let mut next_ping = Instant::now() + ping_interval;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(timeout));
            }
            if now >= next_ping {
                self.stream.set_write_timeout(Some(deadline - now))?;
                match self.send(Op::Ping) {
                    Err(ClientError::Io(e)) if is_timeout(&e) => {
                        return Err(ClientError::Timeout(timeout))
                    }
                    other => other?,
                };
                ping_interval = (ping_interval * 2).min(READY_PING_MAX);
                next_ping = now + ping_interval;
            }
            let wait = deadline.min(next_ping).saturating_duration_since(now);
            self.stream
                .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            let line = match self.frames.read_frame(&mut self.stream) {
                Ok(Some(line)) => line,
                Ok(None) => return Err(ClientError::Closed),
                Err(FrameError::Io(e)) if is_timeout(&e) => continue,
                Err(FrameError::TooLarge(_)) => continue,
                Err(FrameError::Io(e)) => return Err(e.into()),
            };
            let version = match serde_json::from_slice::<AgentFrame>(&line) {
                Ok(AgentFrame::Event(Event::Ready { version })) => version,
                Ok(AgentFrame::Reply(Reply {
                    body: ReplyBody::Pong { version },
                    ..
                })) => version,
                _ => continue,
            };
            if version != PROTOCOL_VERSION {
                return Err(ClientError::Version(version));
            }
            return Ok(version);
        }
    }

    pub fn ping(&mut self) -> Result<u32, ClientError> {
        match self.request(Op::Ping)? {
            ReplyBody::Pong { version } => Ok(version),
            other => Err(unexpected(other)),
        }
    }

    pub fn exec(&mut self, cmd: &Exec) -> Result<ExecOutput, ClientError> {
        match self.request(Op::Exec(cmd.0.clone()))? {
            ReplyBody::Exec(out) => Ok(out),
            other => Err(unexpected(other)),
        }
    }

    /// Writes `data` to `path` in the guest (replacing it), then sets `mode` if given.
    pub fn write_file(
        &mut self,
        path: &str,
        mode: Option<u32>,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let mut chunks = data.chunks(WRITE_CHUNK_BYTES).peekable();
        let mut append = false;
        // An empty file still needs one (truncating) frame.
        if chunks.peek().is_none() {
            return self.write_chunk(path, mode, false, &[]);
        }
        while let Some(chunk) = chunks.next() {
            // The mode goes with the last chunk so that a file is not executable half-written.
            let last = chunks.peek().is_none();
            self.write_chunk(path, if last { mode } else { None }, append, chunk)?;
            append = true;
        }
        Ok(())
    }

    fn write_chunk(
        &mut self,
        path: &str,
        mode: Option<u32>,
        append: bool,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = WriteFileRequest {
            path: path.to_string(),
            mode,
            append,
            data: data.to_vec(),
        };
        match self.request(Op::WriteFile(req))? {
            ReplyBody::Done { ok: true } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        match self.request(Op::ReadFile {
            path: path.to_string(),
        })? {
            ReplyBody::File { data } => Ok(data),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the agent to sync and power off (or reboot) the guest; returns once it agreed.
    pub fn shutdown(&mut self, reboot: bool) -> Result<(), ClientError> {
        match self.request(Op::Shutdown { reboot })? {
            ReplyBody::Done { ok: true } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn send(&mut self, op: Op) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.stream, &Request { id, op })?;
        Ok(id)
    }

    /// Sends a request and waits for the reply with its id. Other frames are skipped: a late
    /// ready event, or answers to pings sent by `wait_ready`.
    fn request(&mut self, op: Op) -> Result<ReplyBody, ClientError> {
        self.stream.set_write_timeout(self.timeout)?;
        let id = match self.send(op) {
            Err(ClientError::Io(e)) if is_timeout(&e) => {
                return Err(ClientError::Timeout(self.timeout.unwrap_or_default()))
            }
            other => other?,
        };
        self.reply(Some(id)).map(|(_, body)| body)
    }

    /// Waits for the reply to an exec that another client sent on this channel: the host that
    /// sent it handed the VM over while the command ran, and its reply comes here. Lines that
    /// are not frames are skipped (the start of one may have gone to the old host).
    pub fn resume_exec(&mut self) -> Result<ExecOutput, ClientError> {
        let (id, body) = self.reply(None)?;
        // Later requests must not reuse the ids of the other client's.
        self.next_id = self.next_id.max(id + 1);
        match body {
            ReplyBody::Exec(out) => Ok(out),
            other => Err(unexpected(other)),
        }
    }

    /// The reply with id `want`, or with `None` the first reply of any id (frames that do not
    /// parse are then skipped rather than an error).
    fn reply(&mut self, want: Option<u64>) -> Result<(u64, ReplyBody), ClientError> {
        let deadline = self.timeout.map(|t| (Instant::now() + t, t));
        loop {
            let wait = match deadline {
                Some((at, limit)) => Some(
                    at.checked_duration_since(Instant::now())
                        .filter(|d| !d.is_zero())
                        .ok_or(ClientError::Timeout(limit))?,
                ),
                None => None,
            };
            self.stream.set_read_timeout(wait)?;
            let line = match self.frames.read_frame(&mut self.stream) {
                Ok(Some(line)) => line,
                Ok(None) => return Err(ClientError::Closed),
                Err(FrameError::Io(e)) if is_timeout(&e) => continue,
                Err(FrameError::TooLarge(_)) if want.is_none() => continue,
                Err(e) => return Err(ClientError::Frame(e)),
            };
            let frame: AgentFrame = match serde_json::from_slice(&line) {
                Ok(frame) => frame,
                Err(_) if want.is_none() => continue,
                Err(e) => {
                    return Err(ClientError::BadFrame(format!(
                        "{e}: {}",
                        String::from_utf8_lossy(&line)
                    )))
                }
            };
            match frame {
                AgentFrame::Reply(Reply {
                    id: Some(got),
                    body,
                }) if want.is_none_or(|id| id == got) => {
                    return match body {
                        ReplyBody::Error { error } => Err(ClientError::Agent(error)),
                        body => Ok((got, body)),
                    };
                }
                AgentFrame::Reply(Reply {
                    id: None,
                    body: ReplyBody::Error { error },
                }) => {
                    return Err(ClientError::Agent(error));
                }
                _ => continue,
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn unexpected(body: ReplyBody) -> ClientError {
    ClientError::UnexpectedReply(format!("{body:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ExitStatus;
    use crate::server::{serve, Served};
    use std::thread;

    fn agent_pair() -> (AgentClient<UnixStream>, thread::JoinHandle<Served>) {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = thread::spawn(move || serve(&mut guest).unwrap());
        let mut client = AgentClient::new(host);
        client.set_timeout(Some(Duration::from_secs(30)));
        (client, agent)
    }

    /// A VM handed over mid-exec: the new host's client gets the reply the old one waited for,
    /// and its own requests go on from there.
    #[test]
    fn a_new_client_takes_the_reply_to_an_exec_sent_by_another() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = thread::spawn(move || serve(&mut guest).unwrap());
        let mut old = AgentClient::new(host.try_clone().unwrap());
        old.set_timeout(Some(Duration::from_secs(30)));
        old.wait_ready(Duration::from_secs(30)).unwrap();
        let cmd = Exec::new(["/bin/sh", "-c", "sleep 0.3; echo moved"]);
        old.send(Op::Exec(cmd.0.clone())).unwrap();
        drop(old);
        let mut new = AgentClient::new(host);
        new.set_timeout(Some(Duration::from_secs(30)));
        let out = new.resume_exec().unwrap();
        assert_eq!(out.stdout, b"moved\n");
        assert!(out.exit.success());
        assert_eq!(new.ping().unwrap(), crate::protocol::PROTOCOL_VERSION);
        new.shutdown(false).unwrap();
        assert_eq!(agent.join().unwrap(), Served::Shutdown { reboot: false });
    }

    #[test]
    fn end_to_end_over_a_socket() {
        let (mut c, agent) = agent_pair();
        assert_eq!(
            c.wait_ready(Duration::from_secs(5)).unwrap(),
            PROTOCOL_VERSION
        );
        assert_eq!(c.ping().unwrap(), PROTOCOL_VERSION);
        let out = c
            .exec(&Exec::new(["sh", "-c", "cat; exit 4"]).stdin("in"))
            .unwrap();
        assert_eq!(
            (out.exit, out.stdout.as_slice()),
            (ExitStatus::Code(4), &b"in"[..])
        );

        let dir = std::env::temp_dir().join(format!("hopper-agent-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big").to_string_lossy().into_owned();
        let big: Vec<u8> = (0..WRITE_CHUNK_BYTES * 2 + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        c.write_file(&path, Some(0o600), &big).unwrap();
        assert_eq!(c.read_file(&path).unwrap(), big);
        c.write_file(&path, None, b"").unwrap();
        assert_eq!(c.read_file(&path).unwrap(), b"");
        std::fs::remove_dir_all(&dir).unwrap();

        let err = c.read_file("/nonexistent/x").unwrap_err();
        assert!(
            matches!(&err, ClientError::Agent(m) if m.contains("/nonexistent/x")),
            "{err}"
        );
        c.shutdown(false).unwrap();
        assert_eq!(agent.join().unwrap(), Served::Shutdown { reboot: false });
    }

    #[test]
    fn ready_is_found_by_pinging_when_the_announcement_was_lost() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = thread::spawn(move || {
            // Swallow the ready frame, as an unconnected QEMU chardev would, and put some
            // console noise on the line.
            let mut sink = Vec::new();
            write_frame(&mut sink, &Event::Ready { version: 1 }).unwrap();
            guest.write_all(b"[    1.0] some kernel message\n").unwrap();
            let mut frames = FrameReader::default();
            let line = frames.read_frame(&mut guest).unwrap().unwrap();
            let req: Request = serde_json::from_slice(&line).unwrap();
            write_frame(
                &mut guest,
                &Reply {
                    id: Some(req.id),
                    body: ReplyBody::Pong { version: 1 },
                },
            )
            .unwrap();
        });
        let mut c = AgentClient::new(host);
        assert_eq!(c.wait_ready(Duration::from_secs(5)).unwrap(), 1);
        agent.join().unwrap();
    }

    #[test]
    fn timeouts_version_mismatch_and_closed_channels_are_errors() {
        let (host, guest) = UnixStream::pair().unwrap();
        let mut c = AgentClient::new(host);
        let err = c.wait_ready(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, ClientError::Timeout(_)), "{err}");

        let mut g = &guest;
        g.write_all(b"{\"event\":\"ready\",\"version\":99}\n")
            .unwrap();
        assert!(matches!(
            c.wait_ready(Duration::from_secs(5)),
            Err(ClientError::Version(99))
        ));

        c.set_timeout(Some(Duration::from_millis(200)));
        assert!(matches!(c.ping(), Err(ClientError::Timeout(_))));
        g.write_all(b"not json\n").unwrap();
        assert!(matches!(c.ping(), Err(ClientError::BadFrame(_))));
        drop(guest);
        assert!(matches!(
            c.ping(),
            Err(ClientError::Closed | ClientError::Io(_))
        ));
    }
}
