//! QEMU's human monitor on a test host's unix socket: where its CPUs are when the host stops
//! answering, for the post-mortem of a breakdown.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const PROMPT: &str = "(qemu) ";
const WAIT: Duration = Duration::from_secs(5);

/// Runs `commands` on the monitor at `socket` and returns the transcript, or what went wrong:
/// a diagnosis must not hide the failure it describes.
pub(crate) fn ask(socket: &Path, commands: &[&str]) -> String {
    transcript(socket, commands).unwrap_or_else(|e| format!("(monitor: {e})"))
}

fn transcript(socket: &Path, commands: &[&str]) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(WAIT))?;
    read_to_prompt(&mut stream)?;
    let mut out = String::new();
    for command in commands {
        stream.write_all(format!("{command}\n").as_bytes())?;
        let answer = read_to_prompt(&mut stream)?;
        // The first line is the monitor echoing the command, with its line-editing escapes.
        let answer = answer.split_once('\n').map_or("", |(_, rest)| rest);
        out.push_str(&format!("== {command}\n{answer}\n"));
    }
    Ok(out)
}

/// What the monitor wrote up to its next prompt, less the prompt.
fn read_to_prompt(stream: &mut UnixStream) -> std::io::Result<String> {
    let deadline = Instant::now() + WAIT;
    let mut out = String::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(PROMPT) {
        if Instant::now() >= deadline {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    out.truncate(out.len() - PROMPT.len());
    Ok(out)
}
