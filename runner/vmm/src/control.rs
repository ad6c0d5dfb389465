//! The control API: newline-delimited JSON over a Unix socket. Each request line gets one
//! response line. Requests: `{"action":"pause"}`, `{"action":"resume"}`, `{"action":"stop"}`,
//! `{"action":"status"}`, `{"action":"snapshot","dir":"/path","resume":false}` (pause, save
//! into `dir`, then resume, or stop the VM), `{"action":"migrate","to":"host:port","tls":{…},
//! "max_downtime_ms":100,"max_rounds":30,"postcopy":false}` (answered once the migration ended).
//! Responses: `{"ok":true,"state":"paused"}` (a
//! snapshot adds `"snapshot":{…}` with its sizes and duration) or `{"ok":false,"error":"…"}`.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

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

/// What the control API acts on.
pub trait Controllable: Send {
    fn handle(&mut self, request: Request) -> Response;
}

/// Serves the control socket from the VMM's main event loop.
pub struct ControlServer<C: Controllable> {
    listener: UnixListener,
    clients: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    target: C,
}

const TOKEN_LISTENER: u32 = u32::MAX;

impl<C: Controllable> ControlServer<C> {
    pub fn new(listener: UnixListener, target: C) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            clients: HashMap::new(),
            target,
        })
    }

    fn answer(&mut self, line: &[u8]) -> Response {
        match serde_json::from_slice::<Request>(line) {
            Ok(req) => self.target.handle(req),
            Err(e) => Response::error(format!("bad request: {e}")),
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
            replies.push(self.answer(&line));
        }
        if overlong {
            replies.push(Response::error("request line too long"));
        }
        let Some((stream, _)) = self.clients.get_mut(&fd) else {
            return false;
        };
        // Replies are small; a blocking write keeps them whole.
        let _ = stream.set_nonblocking(false);
        for r in replies {
            let mut out = serde_json::to_vec(&r).expect("responses always serialize");
            out.push(b'\n');
            if stream.write_all(&out).is_err() {
                return false;
            }
        }
        let _ = stream.set_nonblocking(true);
        !overlong
    }
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
