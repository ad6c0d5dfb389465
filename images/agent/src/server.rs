//! The agent side of one channel: announce readiness, then answer requests one at a time.

use std::io::{Read, Write};

use crate::framing::{write_frame, FrameError, FrameReader};
use crate::handlers::handle;
use crate::protocol::{Event, Op, Reply, ReplyBody, Request, PROTOCOL_VERSION};

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// The host closed the channel.
    Closed,
    /// The host asked for a power-off (or reboot); the reply has been sent, the caller acts.
    Shutdown { reboot: bool },
}

/// Serves one channel until it closes or a shutdown is requested. Malformed frames get an
/// error reply and the channel stays usable; only I/O errors end it early.
pub fn serve<S: Read + Write>(stream: &mut S) -> std::io::Result<Served> {
    write_frame(
        stream,
        &Event::Ready {
            version: PROTOCOL_VERSION,
        },
    )?;
    let mut frames = FrameReader::default();
    loop {
        let line = match frames.read_frame(stream) {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(Served::Closed),
            Err(FrameError::TooLarge(max)) => {
                let error = format!("invalid request: frame longer than {max} bytes");
                write_frame(
                    stream,
                    &Reply {
                        id: None,
                        body: ReplyBody::Error { error },
                    },
                )?;
                continue;
            }
            Err(FrameError::Io(e)) => return Err(e),
        };
        // Blank lines carry nothing (a TTY or a person typing may produce them).
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let req: Request = match serde_json::from_slice(&line) {
            Ok(req) => req,
            Err(e) => {
                let reply = Reply {
                    id: request_id(&line),
                    body: ReplyBody::Error {
                        error: format!("invalid request: {e}"),
                    },
                };
                write_frame(stream, &reply)?;
                continue;
            }
        };
        let body = handle(&req.op);
        write_frame(
            stream,
            &Reply {
                id: Some(req.id),
                body,
            },
        )?;
        if let Op::Shutdown { reboot } = req.op {
            return Ok(Served::Shutdown { reboot });
        }
    }
}

/// Best effort: the id of a request that failed to parse, so that the client can match the
/// error to what it sent.
fn request_id(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()?
        .get("id")?
        .as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::AgentFrame;

    /// A stream that reads from a fixed input and records what is written.
    struct Scripted {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn run(input: &[u8]) -> (Served, Vec<AgentFrame>) {
        let mut s = Scripted {
            input: std::io::Cursor::new(input.to_vec()),
            output: vec![],
        };
        let served = serve(&mut s).unwrap();
        let frames = s
            .output
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        (served, frames)
    }

    fn error_of(frame: &AgentFrame) -> (Option<u64>, &str) {
        match frame {
            AgentFrame::Reply(Reply {
                id,
                body: ReplyBody::Error { error },
            }) => (*id, error),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn garbage_gets_clear_errors_and_the_channel_survives() {
        let input =
            b"garbage\n\n{\"id\":5,\"op\":\"nope\"}\n\xff\xfe\n{\"id\":6,\"op\":\"ping\"}\n";
        let (served, frames) = run(input);
        assert_eq!(served, Served::Closed);
        assert_eq!(frames[0], AgentFrame::Event(Event::Ready { version: 1 }));
        let (id, msg) = error_of(&frames[1]);
        assert_eq!(id, None);
        assert!(msg.starts_with("invalid request:"), "{msg}");
        let (id, msg) = error_of(&frames[2]);
        assert_eq!(id, Some(5));
        assert!(msg.contains("nope"), "{msg}");
        assert_eq!(error_of(&frames[3]).0, None);
        assert_eq!(
            frames[4],
            AgentFrame::Reply(Reply {
                id: Some(6),
                body: ReplyBody::Pong { version: 1 }
            })
        );
        assert_eq!(frames.len(), 5);
    }

    #[test]
    fn shutdown_replies_then_returns() {
        let (served, frames) =
            run(b"{\"id\":1,\"op\":\"shutdown\",\"reboot\":true}\n{\"id\":2,\"op\":\"ping\"}\n");
        assert_eq!(served, Served::Shutdown { reboot: true });
        assert_eq!(frames.len(), 2);
        assert_eq!(
            frames[1],
            AgentFrame::Reply(Reply {
                id: Some(1),
                body: ReplyBody::Done { ok: true }
            })
        );
    }
}
