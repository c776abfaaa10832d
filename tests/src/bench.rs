//! Helpers the benchmark binaries share: the physical bound (`openssl dgst -sha256` of a
//! page-cached file), a process's resident memory and CPU time, and a real control plane
//! (release binary) with the admin CLI pointed at it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::openai_load::free_port;

/// A `steward-control-plane` process on a free loopback port, with its data under a work
/// directory, and the bootstrap admin credential it printed.
pub struct BenchControlPlane {
    pub child: Child,
    pub data: PathBuf,
    pub port: u16,
    credential: String,
    /// The directory holding the release binaries (`steward`, `steward-node-agent`, ...).
    pub bin: PathBuf,
}

impl BenchControlPlane {
    /// Starts the control plane from the directory of the running benchmark binary and waits
    /// until it is ready. `RUST_LOG` is passed on (default `warn`).
    pub fn start(work: &Path) -> anyhow::Result<Self> {
        let bin = std::env::current_exe()?
            .parent()
            .context("binary dir")?
            .to_owned();
        let data = work.join("cp");
        let port = free_port()?;
        let mut child = Command::new(bin.join("steward-control-plane"))
            .args(["--data-dir", path_str(&data)?])
            .args(["--grpc-listen", &format!("127.0.0.1:{port}")])
            .args(["--http-listen", "127.0.0.1:0"])
            .env("RUST_LOG", log_filter())
            .stdout(Stdio::piped())
            .spawn()?;
        let credential = read_bootstrap_credential(&mut child)?;
        Ok(Self {
            child,
            data,
            port,
            credential,
            bin,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Runs the `steward` CLI as the bootstrap admin; its stdout, or an error with its stderr.
    pub fn steward(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("steward"))
            .args(args)
            .env("STEWARD_ENDPOINT", self.endpoint())
            .env("STEWARD_TOKEN", &self.credential)
            .env("STEWARD_CA_FILE", self.data.join("ca.pem"))
            .output()?;
        if !out.status.success() {
            bail!(
                "steward {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Generates a signing key under `work`, trusts it for models named `bench-*`, and
    /// returns the private key's path.
    pub fn trust_fresh_key(&self, work: &Path) -> anyhow::Result<PathBuf> {
        let key = rcgen::KeyPair::generate()?;
        let key_path = work.join("key.pem");
        let pub_path = work.join("key.pub");
        std::fs::write(&key_path, key.serialize_pem())?;
        std::fs::write(&pub_path, key.public_key_pem())?;
        self.steward(&[
            "trust",
            "add-key",
            path_str(&pub_path)?,
            "--models",
            "bench-*",
        ])?;
        Ok(key_path)
    }

    /// Stops the control plane.
    pub fn stop(self) {
        drop(self);
    }
}

/// A benchmark that fails half-way does not leave its control plane running.
impl Drop for BenchControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a starting control plane's stdout (piped) until it says it is ready; returns the
/// bootstrap admin credential it printed on the way.
pub fn read_bootstrap_credential(child: &mut Child) -> anyhow::Result<String> {
    let stdout = BufReader::new(child.stdout.take().context("stdout is not piped")?);
    let mut credential = None;
    for line in stdout.lines() {
        let line = line?;
        if let Some(c) = line.strip_prefix("bootstrap admin credential (shown once): ") {
            credential = Some(c.to_owned());
        }
        if line.starts_with("control plane ready") {
            break;
        }
    }
    credential.context("the control plane printed no bootstrap credential")
}

/// `RUST_LOG` for the processes a bench starts: the caller's, or `warn`.
pub fn log_filter() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// `p` as UTF-8, for command-line arguments.
pub fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// The peak resident memory of a process, sampled every 20 ms on a thread until stopped.
pub struct PeakRss {
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<f64>,
}

impl PeakRss {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0f64;
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(rss_mib(pid).unwrap_or(0.0));
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak
            })
        };
        Self { stop, sampler }
    }

    /// The peak, MiB.
    pub fn stop(self) -> anyhow::Result<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler
            .join()
            .map_err(|_| anyhow::anyhow!("the RSS sampler panicked"))
    }
}

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
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU time the threads of process `pid` whose name starts with `prefix` have used so far
/// (threads that already exited are not counted), seconds at 10 ms resolution.
pub fn thread_cpu_seconds(pid: u32, prefix: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue; // exited meanwhile
        };
        if comm.starts_with(prefix) {
            total += stat_cpu_seconds(&task.join("stat").to_string_lossy()).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// utime + stime of a `/proc/…/stat` file, seconds.
fn stat_cpu_seconds(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path)?;
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
