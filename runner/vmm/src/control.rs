//! The control API: newline-delimited JSON over a Unix socket. Each request line gets one
//! response line. Requests: `{"action":"pause"}`, `{"action":"resume"}`, `{"action":"stop"}`,
//! `{"action":"status"}`, `{"action":"snapshot","dir":"/path","resume":false}` (pause, save
//! into `dir`, then resume, or stop the VM), `{"action":"migrate","to":"host:port","tls":{…},
//! "max_downtime_ms":100,"max_rounds":30,"postcopy":false}` (answered once the migration ended;
//! meanwhile `status` answers `"migrating"` and the rest is refused).
//! Responses: `{"ok":true,"state":"paused"}` (a
//! snapshot adds `"snapshot":{…}` with its sizes and duration) or `{"ok":false,"error":"…"}`.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::migration::{MigrateOptions, MigrationSummary};
use crate::persist::SnapshotSummary;

/// Longest request line accepted; anything longer is not a control request.
const MAX_REQUEST: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Request {
    Pause,
    Resume,
    Stop,
    Status,
    /// Pause, save the VM into `dir`; then resume (`resume`) or stop.
    Snapshot {
        dir: PathBuf,
        resume: bool,
    },
    /// Send the running VM to another host; this VMM stops once the target runs it.
    Migrate(MigrateOptions),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    /// Being sent to another host: it runs, and stops here once the target runs it.
    Migrating,
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<RunState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationSummary>,
}

impl Response {
    pub fn state(state: RunState) -> Self {
        Response {
            ok: true,
            state: Some(state),
            error: None,
            snapshot: None,
            migration: None,
        }
    }
    pub fn migrated(state: RunState, summary: MigrationSummary) -> Self {
        Response {
            migration: Some(summary),
            ..Response::state(state)
        }
    }
    pub fn snapshot(state: RunState, summary: SnapshotSummary) -> Self {
        Response {
            snapshot: Some(summary),
            ..Response::state(state)
        }
    }
    pub fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            state: None,
            error: Some(msg.into()),
            snapshot: None,
            migration: None,
        }
    }
}

/// What a request gets: a response at once, or work whose response comes when it ends
/// (a migration), done on a thread of its own so that other requests are answered meanwhile.
pub enum Answer {
    Now(Response),
    Later(Box<dyn FnOnce() -> Response + Send>),
}

/// What the control API acts on.
pub trait Controllable: Send {
    fn handle(&mut self, request: Request) -> Answer;
}

/// Serves the control socket from the VMM's main event loop.
pub struct ControlServer<C: Controllable> {
    listener: UnixListener,
    clients: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    target: C,
    /// Threads doing work answered later; the server waits for them when dropped, so that
    /// their answers go out before the VMM exits.
    work: Vec<std::thread::JoinHandle<()>>,
}

impl<C: Controllable> Drop for ControlServer<C> {
    fn drop(&mut self) {
        for work in self.work.drain(..) {
            let _ = work.join();
        }
    }
}

const TOKEN_LISTENER: u32 = u32::MAX;
/// How long a response waits for a client that does not read.
const WRITE_PATIENCE_MS: u32 = 1000;

impl<C: Controllable> ControlServer<C> {
    pub fn new(listener: UnixListener, target: C) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            clients: HashMap::new(),
            target,
            work: Vec::new(),
        })
    }

    fn answer(&mut self, line: &[u8]) -> Answer {
        match serde_json::from_slice::<Request>(line) {
            Ok(req) => self.target.handle(req),
            Err(e) => Answer::Now(Response::error(format!("bad request: {e}"))),
        }
    }

    /// Reads what the client sent and answers each complete line; false when it is gone.
    fn serve(&mut self, fd: RawFd) -> bool {
        let Some((stream, buf)) = self.clients.get_mut(&fd) else {
            return false;
        };
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        let mut lines = Vec::new();
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            lines.push(buf.drain(..=pos).collect::<Vec<u8>>());
        }
        let overlong = buf.len() > MAX_REQUEST;
        let mut replies = Vec::new();
        for line in lines {
            match self.answer(&line) {
                Answer::Now(r) => replies.push(r),
                Answer::Later(work) => self.later(fd, work),
            }
        }
        if overlong {
            replies.push(Response::error("request line too long"));
        }
        let Some((stream, _)) = self.clients.get_mut(&fd) else {
            return false;
        };
        for r in replies {
            if write_response(stream, &r).is_err() {
                return false;
            }
        }
        !overlong
    }

    /// Runs `work` on its own thread, which answers the client at `fd` when it ends. Should
    /// no thread start, the work runs here, as it must end either way (it may have changed
    /// the VM's state, which only its end settles).
    fn later(&mut self, fd: RawFd, work: Box<dyn FnOnce() -> Response + Send>) {
        let Some((stream, _)) = self.clients.get(&fd) else {
            return;
        };
        let stream = match stream.try_clone() {
            Ok(clone) => clone,
            Err(e) => {
                log::warn!("control socket: cannot share a client's stream ({e})");
                let _ = write_response(stream, &work());
                return;
            }
        };
        self.work.retain(|w| !w.is_finished());
        let slot = Arc::new(Mutex::new(Some(work)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("control-work".into())
            .spawn(move || {
                if let Some(work) = theirs.lock().unwrap().take() {
                    // The client may be gone; the work is done either way.
                    let _ = write_response(&stream, &work());
                }
            });
        match spawned {
            Ok(thread) => self.work.push(thread),
            Err(e) => {
                log::warn!("control socket: cannot start a thread ({e}); the work runs here");
                if let Some(work) = slot.lock().unwrap().take() {
                    let _ = write_response(&self.clients[&fd].0, &work());
                }
            }
        }
    }
}

/// Writes one response line on a client's (non-blocking) stream. Responses are small and
/// the socket's buffer large, so a full buffer is rare: it means a client that does not read,
/// which gets a moment and is then given up.
fn write_response(mut stream: &UnixStream, response: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response).expect("responses always serialize");
    out.push(b'\n');
    let mut left = &out[..];
    let mut waited = 0;
    while !left.is_empty() {
        match stream.write(left) {
            Ok(n) => left = &left[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock && waited < WRITE_PATIENCE_MS => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                waited += 1;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl<C: Controllable> MutEventSubscriber for ControlServer<C> {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::with_data(
            &self.listener,
            TOKEN_LISTENER,
            EventSet::IN,
        ))
        .expect("a fresh event loop accepts the control socket");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == TOKEN_LISTENER {
            while let Ok((stream, _)) = self.listener.accept() {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let fd = stream.as_raw_fd();
                if ops
                    .add(Events::with_data(&stream, fd as u32, EventSet::IN))
                    .is_ok()
                {
                    self.clients.insert(fd, (stream, Vec::new()));
                }
            }
            return;
        }
        let fd = events.data() as RawFd;
        if !self.serve(fd) {
            if let Some((stream, _)) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::with_data(&stream, fd as u32, EventSet::empty()));
            }
        }
    }
}

/// A blocking client for the control socket (used by the CLI and tests).
pub fn call(socket: &std::path::Path, request: &Request) -> std::io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    let mut line = serde_json::to_vec(request).expect("requests always serialize");
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        reply.push(byte[0]);
    }
    serde_json::from_slice(&reply).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    /// Pauses later (when the test says so); answers the rest at once.
    struct SlowPause(Arc<Mutex<mpsc::Receiver<()>>>);

    impl Controllable for SlowPause {
        fn handle(&mut self, request: Request) -> Answer {
            match request {
                Request::Pause => {
                    let go = self.0.clone();
                    Answer::Later(Box::new(move || {
                        go.lock().unwrap().recv().unwrap();
                        Response::state(RunState::Paused)
                    }))
                }
                _ => Answer::Now(Response::state(RunState::Running)),
            }
        }
    }

    type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    /// An event loop serving [`SlowPause`] on a socket in `dir`; each message sent on the
    /// returned channel lets one pause end.
    fn slow_server(dir: &std::path::Path) -> (PathBuf, Loop, mpsc::Sender<()>) {
        let path = dir.join("api.sock");
        let (go, wait) = mpsc::channel();
        let server = ControlServer::new(
            UnixListener::bind(&path).unwrap(),
            SlowPause(Arc::new(Mutex::new(wait))),
        )
        .unwrap();
        let mut em = Loop::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(server)));
        (path, em, go)
    }

    #[test]
    fn work_answered_later_does_not_hold_up_other_requests() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut em, go) = slow_server(dir.path());
        let done = Arc::new(AtomicBool::new(false));
        let serving = {
            let done = done.clone();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    em.run_with_timeout(10).unwrap();
                }
            })
        };
        let slow = {
            let path = path.clone();
            std::thread::spawn(move || call(&path, &Request::Pause).unwrap())
        };
        // Answered while the pause waits.
        for _ in 0..3 {
            assert_eq!(
                call(&path, &Request::Status).unwrap().state,
                Some(RunState::Running)
            );
        }
        assert!(!slow.is_finished());
        go.send(()).unwrap();
        assert_eq!(slow.join().unwrap().state, Some(RunState::Paused));
        done.store(true, Ordering::Relaxed);
        serving.join().unwrap();
    }

    /// A server dropped while work runs waits for it, so that its answer goes out.
    #[test]
    fn a_dropped_server_still_answers_its_work() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut em, go) = slow_server(dir.path());
        let slow = {
            let path = path.clone();
            std::thread::spawn(move || call(&path, &Request::Pause).unwrap())
        };
        // Accept the client, then read its request.
        let mut events = 0;
        while events < 2 {
            events += em.run_with_timeout(50).unwrap();
        }
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            go.send(()).unwrap();
        });
        drop(em);
        release.join().unwrap();
        assert_eq!(slow.join().unwrap().state, Some(RunState::Paused));
    }

    #[test]
    fn request_wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Pause).unwrap(),
            r#"{"action":"pause"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"action":"explode"}"#).is_err());
        let r = Response::state(RunState::Paused);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ok":true,"state":"paused"}"#
        );
    }
}
