//! Wire types. Every frame is one JSON object followed by `\n`.
//!
//! Agent → host:
//! - `{"event":"ready","version":1}` once when the agent starts serving a channel.
//! - replies: `{"id":N, ...}` where the rest depends on the request:
//!   exec → `{"exit":{"code":0}|{"signal":9},"stdout_b64":..,"stderr_b64":..}`,
//!   read_file → `{"data_b64":..}`, ping → `{"version":1}`, write_file/shutdown → `{"ok":true}`,
//!   any failure → `{"error":"..."}` (with `"id":null` when the request could not be parsed).
//!
//! Host → agent: `{"id":N,"op":"ping"|"exec"|"write_file"|"read_file"|"shutdown", ...}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; the client refuses agents that speak another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts. Bounds memory when the peer sends garbage without
/// newlines; file transfers larger than this are chunked by the client.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Ping,
    Exec(ExecRequest),
    WriteFile(WriteFileRequest),
    ReadFile {
        path: String,
    },
    Shutdown {
        #[serde(default)]
        reboot: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to (overriding) the agent's own environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(
        rename = "stdin_b64",
        default,
        with = "b64",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub stdin: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    pub path: String,
    /// Permission bits applied after writing; absent keeps the file's mode (0644 when created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Append instead of truncating: lets the client send files larger than one frame.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub append: bool,
    #[serde(rename = "data_b64", with = "b64")]
    pub data: Vec<u8>,
}

/// Anything the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AgentFrame {
    Event(Event),
    Reply(Reply),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Ready { version: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// `None` only for errors about frames whose id could not be read.
    pub id: Option<u64>,
    #[serde(flatten)]
    pub body: ReplyBody,
}

/// Reply payloads are told apart by their fields; `Error` is tried first so that an error
/// reply never parses as anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReplyBody {
    Error {
        error: String,
    },
    Exec(ExecOutput),
    File {
        #[serde(rename = "data_b64", with = "b64")]
        data: Vec<u8>,
    },
    Pong {
        version: u32,
    },
    Done {
        ok: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    pub exit: ExitStatus,
    #[serde(rename = "stdout_b64", with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(rename = "stderr_b64", with = "b64")]
    pub stderr: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The status a shell would report: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Binary payloads travel as standard base64 strings.
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_request(s: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn exec_request_wire_form() {
        let req = parse_request(
            r#"{"id":1,"op":"exec","argv":["sh","-c","cat"],"env":{"A":"b"},"cwd":"/tmp","stdin_b64":"aGk="}"#,
        )
        .unwrap();
        let Op::Exec(exec) = &req.op else {
            panic!("not exec: {req:?}")
        };
        assert_eq!(exec.argv, ["sh", "-c", "cat"]);
        assert_eq!(exec.env["A"], "b");
        assert_eq!(exec.cwd.as_deref(), Some("/tmp"));
        assert_eq!(exec.stdin, b"hi");
        let back: Request = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn minimal_requests_parse() {
        assert_eq!(
            parse_request(r#"{"id":7,"op":"ping"}"#).unwrap().op,
            Op::Ping
        );
        assert_eq!(
            parse_request(r#"{"id":7,"op":"shutdown"}"#).unwrap().op,
            Op::Shutdown { reboot: false }
        );
        let Op::Exec(e) = parse_request(r#"{"id":2,"op":"exec","argv":["true"]}"#)
            .unwrap()
            .op
        else {
            panic!()
        };
        assert!(e.env.is_empty() && e.cwd.is_none() && e.stdin.is_empty());
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        for bad in [
            "",
            "garbage",
            "{",
            "[]",
            r#"{"op":"ping"}"#,
            r#"{"id":-1,"op":"ping"}"#,
            r#"{"id":1,"op":"launch_missiles"}"#,
            r#"{"id":1,"op":"exec"}"#,
            r#"{"id":1,"op":"write_file","path":"/x","data_b64":"!!not base64!!"}"#,
            "\u{0}\u{1}\u{2}",
        ] {
            assert!(parse_request(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn agent_frames_are_told_apart() {
        let f = |s: &str| serde_json::from_str::<AgentFrame>(s).unwrap();
        assert_eq!(
            f(r#"{"event":"ready","version":1}"#),
            AgentFrame::Event(Event::Ready { version: 1 })
        );
        assert_eq!(
            f(r#"{"id":3,"error":"boom"}"#),
            AgentFrame::Reply(Reply {
                id: Some(3),
                body: ReplyBody::Error {
                    error: "boom".into()
                }
            })
        );
        assert_eq!(
            f(r#"{"id":null,"error":"bad frame"}"#),
            AgentFrame::Reply(Reply {
                id: None,
                body: ReplyBody::Error {
                    error: "bad frame".into()
                }
            })
        );
        assert_eq!(
            f(r#"{"id":4,"exit":{"signal":9},"stdout_b64":"","stderr_b64":"eA=="}"#),
            AgentFrame::Reply(Reply {
                id: Some(4),
                body: ReplyBody::Exec(ExecOutput {
                    exit: ExitStatus::Signal(9),
                    stdout: vec![],
                    stderr: b"x".to_vec()
                })
            })
        );
        assert_eq!(
            f(r#"{"id":5,"data_b64":"AAE="}"#),
            AgentFrame::Reply(Reply {
                id: Some(5),
                body: ReplyBody::File { data: vec![0, 1] }
            })
        );
        assert_eq!(
            f(r#"{"id":6,"version":1}"#),
            AgentFrame::Reply(Reply {
                id: Some(6),
                body: ReplyBody::Pong { version: 1 }
            })
        );
        assert_eq!(
            f(r#"{"id":7,"ok":true}"#),
            AgentFrame::Reply(Reply {
                id: Some(7),
                body: ReplyBody::Done { ok: true }
            })
        );
        assert!(serde_json::from_str::<AgentFrame>(r#"{"id":8}"#).is_err());
        assert!(serde_json::from_str::<AgentFrame>(r#"{"event":"exploded"}"#).is_err());
    }

    #[test]
    fn replies_serialize_to_the_documented_form() {
        let r = Reply {
            id: Some(1),
            body: ReplyBody::Exec(ExecOutput {
                exit: ExitStatus::Code(0),
                stdout: b"hi".to_vec(),
                stderr: vec![],
            }),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":1,"exit":{"code":0},"stdout_b64":"aGk=","stderr_b64":""}"#
        );
        assert_eq!(
            serde_json::to_string(&Event::Ready {
                version: PROTOCOL_VERSION
            })
            .unwrap(),
            r#"{"event":"ready","version":1}"#
        );
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Signal(0).success());
    }
}
