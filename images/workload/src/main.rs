//! `hopper-workload`: a deterministic, checkable guest workload for snapshot, restore and
//! migration tests. It fills a memory buffer from a SHA-256 chain, then rewrites it one page
//! per step, records progress on its disk (and on a TCP connection) and ends with a digest of
//! the chain and the whole buffer. Everything it writes depends only on `--mib`, `--steps`
//! and `--every`, so a run that was snapshotted, restored or migrated must write exactly what
//! an undisturbed run writes.

use std::fs::File;
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const PAGE: usize = 4096;
/// Versions the output: a change to the algorithm must change every digest.
const SEED: &[u8] = b"hopper-workload v1";
const CONNECT_FOR: Duration = Duration::from_secs(30);
const USAGE: &str = "usage: hopper-workload --mib M --steps N --every K --progress FILE \
                     [--connect HOST:PORT] [--pace-ms P]   (SIGUSR1 ends the pacing)";

type Hash = [u8; 32];

#[derive(Debug)]
struct Args {
    mib: u64,
    steps: u64,
    every: u64,
    progress: PathBuf,
    connect: Option<String>,
    pace_ms: u64,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hopper-workload: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(digest) => {
            println!("digest {digest}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hopper-workload: {e}");
            ExitCode::FAILURE
        }
    }
}

// By hand rather than with clap: it keeps the static binary small.
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut mib, mut steps, mut every, mut progress) = (None, None, None, None);
    let (mut connect, mut pace_ms) = (None, 0);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {value:?}"))
        };
        match flag.as_str() {
            "--mib" => mib = Some(number()?),
            "--steps" => steps = Some(number()?),
            "--every" => every = Some(number()?),
            "--pace-ms" => pace_ms = number()?,
            "--progress" => progress = Some(PathBuf::from(value)),
            "--connect" => connect = Some(value),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    let args = Args {
        mib: mib.ok_or("--mib is required")?,
        steps: steps.ok_or("--steps is required")?,
        every: every.ok_or("--every is required")?,
        progress: progress.ok_or("--progress is required")?,
        connect,
        pace_ms,
    };
    if args.mib == 0 || args.every == 0 {
        return Err("--mib and --every must be at least 1".into());
    }
    Ok(args)
}

/// Where progress lines go: the file (each line made durable before it is sent on) and the
/// connection, so the connection never carries a line the disk lacks.
struct Progress {
    file: File,
    conn: Option<TcpStream>,
}

impl Progress {
    fn line(&mut self, line: &str) -> Result<(), String> {
        let line = format!("{line}\n");
        // One write per line: a reader (or a snapshot) sees a prefix of the lines, at worst
        // with the last one cut short.
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| format!("writing the progress file: {e}"))?;
        if let Some(conn) = &mut self.conn {
            conn.write_all(line.as_bytes())
                .map_err(|e| format!("writing to the connection: {e}"))?;
        }
        Ok(())
    }
}

/// Runs the workload and returns the digest in hex.
fn run(args: &Args) -> Result<String, String> {
    let conn = args.connect.as_deref().map(connect).transpose()?;
    let file = File::create(&args.progress)
        .map_err(|e| format!("creating {}: {e}", args.progress.display()))?;
    let mut progress = Progress { file, conn };
    // A test whose disturbances are over lets the rest run unpaced: pacing only stretches the
    // run, so the output stays the same.
    let hurry = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, hurry.clone())
        .map_err(|e| format!("installing the SIGUSR1 handler: {e}"))?;

    let pages = args
        .mib
        .checked_mul(256)
        .and_then(|p| usize::try_from(p).ok())
        .ok_or("--mib is too large")?;
    let mut buf = vec![0u8; pages * PAGE];
    let mut chain = sha(&[
        SEED,
        &args.mib.to_le_bytes(),
        &args.steps.to_le_bytes(),
        &args.every.to_le_bytes(),
    ]);
    // Every page is written, so the whole buffer is resident (and in every snapshot).
    for page in buf.chunks_exact_mut(PAGE) {
        chain = sha(&[&chain]);
        expand(&chain, page);
    }
    for step in 1..=args.steps {
        let read = pick(&chain, 0, pages) * PAGE;
        chain = sha(&[&chain, &buf[read..read + PAGE]]);
        let write = pick(&chain, 8, pages) * PAGE;
        expand(&chain, &mut buf[write..write + PAGE]);
        if step % args.every == 0 {
            progress.line(&format!("step {step} {}", hex(&chain[..8])))?;
            if !hurry.load(Ordering::Relaxed) {
                sleep(Duration::from_millis(args.pace_ms));
            }
        }
    }
    let digest = hex(&sha(&[&chain, &buf]));
    progress.line(&format!("digest {digest}"))?;
    Ok(digest)
}

/// Connects to the test's server, retrying while it (or the guest's network) comes up.
fn connect(addr: &str) -> Result<TcpStream, String> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(conn) => return Ok(conn),
            Err(e) if start.elapsed() >= CONNECT_FOR => {
                return Err(format!("connecting to {addr} for {CONNECT_FOR:?}: {e}"))
            }
            Err(_) => sleep(Duration::from_millis(200)),
        }
    }
}

fn sha(parts: &[&[u8]]) -> Hash {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// A page index taken from the eight bytes of `h` at `at`.
fn pick(h: &Hash, at: usize, pages: usize) -> usize {
    let n = u64::from_le_bytes(h[at..at + 8].try_into().unwrap());
    (n % pages as u64) as usize
}

/// Fills `page` with a SplitMix64 stream seeded from `h`: hashing every 32 bytes instead
/// would make the fill, not the steps, the bulk of the run.
fn expand(h: &Hash, page: &mut [u8]) {
    let mut state = h
        .chunks_exact(8)
        .fold(0, |acc, w| acc ^ u64::from_le_bytes(w.try_into().unwrap()));
    for word in page.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(steps: u64, pace_ms: u64, name: &str) -> Args {
        let progress = std::env::temp_dir().join(format!(
            "hopper-workload-test-{}-{name}",
            std::process::id()
        ));
        parse_args(
            [
                "--mib",
                "2",
                "--steps",
                &steps.to_string(),
                "--every",
                "100",
                "--pace-ms",
                &pace_ms.to_string(),
                "--progress",
                progress.to_str().unwrap(),
            ]
            .into_iter()
            .map(String::from),
        )
        .unwrap()
    }

    /// Runs and returns the digest and the progress file, removing the file.
    fn run_once(a: &Args) -> (String, String) {
        let digest = run(a).unwrap();
        let file = std::fs::read_to_string(&a.progress).unwrap();
        std::fs::remove_file(&a.progress).unwrap();
        (digest, file)
    }

    #[test]
    fn output_depends_only_on_the_arguments() {
        let (digest, file) = run_once(&args(1000, 0, "a"));
        // Pacing changes the timing, never the output.
        assert_eq!(
            run_once(&args(1000, 1, "b")),
            (digest.clone(), file.clone())
        );
        let lines: Vec<&str> = file.lines().collect();
        assert_eq!(lines.len(), 11, "{file}");
        assert!(lines[0].starts_with("step 100 ") && lines[0].len() == "step 100 ".len() + 16);
        assert_eq!(lines[10], format!("digest {digest}"));

        let (other, other_file) = run_once(&args(1001, 0, "c"));
        assert_ne!(other, digest);
        assert_ne!(other_file, file);
    }

    #[test]
    fn bad_arguments_are_refused() {
        let parse = |a: &[&str]| parse_args(a.iter().map(|s| s.to_string()));
        assert!(parse(&["--mib", "1", "--steps", "1", "--every", "1"])
            .unwrap_err()
            .contains("--progress"));
        assert!(parse(&["--mib", "x"]).unwrap_err().contains("not a number"));
        assert!(parse(&[
            "--mib",
            "0",
            "--steps",
            "1",
            "--every",
            "1",
            "--progress",
            "p"
        ])
        .is_err());
        assert!(parse(&["--bogus", "1"]).unwrap_err().contains("--bogus"));
    }
}
