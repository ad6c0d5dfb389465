//! What the agent does for each request. Failures become error replies, never panics.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::thread;

use crate::protocol::{
    ExecOutput, ExecRequest, ExitStatus, Op, ReplyBody, WriteFileRequest, PROTOCOL_VERSION,
};

/// Files larger than this cannot be read in one reply (base64 grows data by a third and the
/// reply must fit in a frame).
pub const MAX_READ_BYTES: u64 = (crate::protocol::MAX_FRAME_BYTES as u64 / 4) * 3 - 4096;

/// Handles every request except `shutdown`, which the server turns into a power action after
/// replying.
pub fn handle(op: &Op) -> ReplyBody {
    let result = match op {
        Op::Ping => Ok(ReplyBody::Pong {
            version: PROTOCOL_VERSION,
        }),
        Op::Exec(req) => exec(req).map(ReplyBody::Exec),
        Op::WriteFile(req) => write_file(req).map(|()| ReplyBody::Done { ok: true }),
        Op::ReadFile { path } => read_file(path).map(|data| ReplyBody::File { data }),
        Op::Shutdown { .. } => Ok(ReplyBody::Done { ok: true }),
    };
    result.unwrap_or_else(|error| ReplyBody::Error { error })
}

fn exec(req: &ExecRequest) -> Result<ExecOutput, String> {
    let (prog, args) = req.argv.split_first().ok_or("exec: argv is empty")?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .envs(&req.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd.spawn().map_err(|e| format!("exec {prog:?}: {e}"))?;
    // Stdin is fed from its own thread: a child that writes a lot before reading would
    // otherwise deadlock against us.
    let stdin = child.stdin.take().expect("stdin was piped");
    let data = req.stdin.clone();
    let feeder = thread::spawn(move || feed(stdin, &data));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("exec {prog:?}: waiting: {e}"))?;
    // A child that exits without reading its input makes the feeder fail with EPIPE; that is
    // the child's business, not an agent error.
    let _ = feeder.join();
    let exit = match (out.status.code(), out.status.signal()) {
        (Some(code), _) => ExitStatus::Code(code),
        (None, Some(sig)) => ExitStatus::Signal(sig),
        (None, None) => {
            return Err(format!(
                "exec {prog:?}: unknown exit status {:?}",
                out.status
            ))
        }
    };
    Ok(ExecOutput {
        exit,
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

fn feed(mut stdin: std::process::ChildStdin, data: &[u8]) -> io::Result<()> {
    stdin.write_all(data)
}

fn write_file(req: &WriteFileRequest) -> Result<(), String> {
    let fail = |e: io::Error| format!("write_file {:?}: {e}", req.path);
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).mode(0o644);
    if req.append {
        opts.append(true);
    } else {
        opts.truncate(true);
    }
    let mut file = opts.open(&req.path).map_err(fail)?;
    file.write_all(&req.data).map_err(fail)?;
    if let Some(mode) = req.mode {
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(fail)?;
    }
    file.sync_all().map_err(fail)
}

fn read_file(path: &str) -> Result<Vec<u8>, String> {
    let fail = |e: io::Error| format!("read_file {path:?}: {e}");
    let file = fs::File::open(path).map_err(fail)?;
    let mut data = Vec::new();
    file.take(MAX_READ_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(fail)?;
    if data.len() as u64 > MAX_READ_BYTES {
        return Err(format!(
            "read_file {path:?}: larger than {MAX_READ_BYTES} bytes"
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            cwd: None,
            stdin: vec![],
        }
    }

    #[test]
    fn exec_collects_output_status_env_cwd_stdin() {
        let mut req = exec_req(&["sh", "-c", "echo $X; pwd; cat; echo err >&2; exit 3"]);
        req.env.insert("X".into(), "from-env".into());
        req.cwd = Some("/".into());
        req.stdin = b"from-stdin\n".to_vec();
        let out = exec(&req).unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "from-env\n/\nfrom-stdin\n"
        );
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.exit, ExitStatus::Code(3));
    }

    #[test]
    fn exec_reports_signals_and_missing_programs() {
        assert_eq!(
            exec(&exec_req(&["sh", "-c", "kill -9 $$"])).unwrap().exit,
            ExitStatus::Signal(9)
        );
        assert!(exec(&exec_req(&["/nonexistent/prog"]))
            .unwrap_err()
            .contains("/nonexistent/prog"));
        assert!(exec(&exec_req(&[])).unwrap_err().contains("argv is empty"));
    }

    #[test]
    fn child_ignoring_large_stdin_does_not_hang() {
        let mut req = exec_req(&["true"]);
        req.stdin = vec![0; 4 << 20];
        assert_eq!(exec(&req).unwrap().exit, ExitStatus::Code(0));
    }

    #[test]
    fn write_append_mode_and_read_back() {
        let dir = std::env::temp_dir().join(format!("hopper-agent-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f").to_string_lossy().into_owned();
        let w = |data: &[u8], append, mode| {
            write_file(&WriteFileRequest {
                path: path.clone(),
                mode,
                append,
                data: data.to_vec(),
            })
        };
        w(b"one", false, Some(0o700)).unwrap();
        w(b"two", true, None).unwrap();
        assert_eq!(read_file(&path).unwrap(), b"onetwo");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        w(b"three", false, None).unwrap();
        assert_eq!(read_file(&path).unwrap(), b"three");
        fs::remove_dir_all(&dir).unwrap();
        assert!(read_file(&path).unwrap_err().contains("No such file"));
        assert!(w(b"x", false, None).unwrap_err().contains("write_file"));
    }
}
