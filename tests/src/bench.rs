//! Helpers the benchmark binaries share: the physical bound (`openssl dgst -sha256` of a
//! page-cached file) and a process's resident memory.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

/// Reads `file` once so that it is in the page cache.
pub fn warm(file: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(file)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// Wall time of `openssl dgst -sha256 FILE`: one sha256 pass over the (cached) bytes.
pub fn openssl_sha256(file: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new("openssl")
        .args(["dgst", "-sha256"])
        .arg(file)
        .stdout(Stdio::null())
        .status()
        .context("running openssl")?;
    ensure!(status.success(), "openssl failed");
    Ok(started.elapsed())
}

/// CPU time (user + system, every thread) process `pid` has used so far, seconds, at the
/// kernel's USER_HZ resolution (10 ms).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// Resident set size of process `pid`, MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("VmRSS")?
        .parse()?;
    Ok(kib / 1024.0)
}
