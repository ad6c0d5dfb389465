//! Helpers the benchmarks share.

/// Rounds to measure: `HOPPER_BENCH_ROUNDS`, else `default`.
pub fn rounds(default: usize) -> usize {
    std::env::var("HOPPER_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// The median of `samples` (NaN when there are none).
pub fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `migrate -d ARGS` on the QEMU whose human monitor listens on `monitor` (host:port,
/// from `-monitor tcp:HOST:PORT,server,nowait`) inside `host`, waits until the migration
/// has completed, and returns QEMU's final `info migrate`.
pub fn qemu_migrate(host: &crate::TestHost, monitor: &str, args: &str) -> anyhow::Result<String> {
    let (addr, port) = monitor
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("monitor address {monitor:?} is not host:port"))?;
    // QEMU marks a migration completed a moment before it sets its times: a status read in
    // between says "total time: 0 ms" (seen now and then), so it is read again.
    let status = host.sh(&format!(
        "mon() {{ (echo \"$1\"; sleep 0.3) | nc {addr} {port}; }}
mon 'migrate -d {args}' >/dev/null
for i in $(seq 1 3000); do
  out=$(mon 'info migrate')
  case $out in
    *'status: completed'*'total time: 0 ms'*) ;;
    *'status: completed'*) echo \"$out\"; exit 0 ;;
    *'status: failed'*) echo \"$out\"; exit 1 ;;
  esac
  sleep 0.2
done
exit 1"
    ))?;
    Ok(status)
}

/// A number from QEMU's `info migrate` output, e.g. `figure(status, "total time")` for
/// "total time: 1234 ms" (units are dropped).
pub fn qemu_figure(status: &str, name: &str) -> Option<f64> {
    status.lines().find_map(|l| {
        let value = l.trim().strip_prefix(name)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}
