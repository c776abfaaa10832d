//! Push throughput over loopback TLS against the physical bound measured in the same run.
//!
//! For each file: warm the page cache, time `openssl dgst -sha256` (the bound: one pass of
//! sha256 over cached bytes), then time `steward model push` of the same file into a real
//! `steward-control-plane` (TLS, streaming, hashing, writing, fsync, GGUF pre-parse,
//! signature check, DB row), sampling the control plane's RSS during the push.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/steward-push-bench --make-gguf /tmp/big.gguf 2048   # a valid 2 GiB GGUF
//! target/release/steward-push-bench target/models/gemma3-270m-q4_k_m.gguf /tmp/big.gguf
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use steward_tests::bench::{openssl_sha256, rss_mib, warm};
use steward_tests::openai_load;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--make-gguf") {
        let (Some(path), Some(mib)) = (args.get(1), args.get(2)) else {
            bail!("usage: steward-push-bench --make-gguf PATH MIB");
        };
        return make_gguf(Path::new(path), mib.parse()?);
    }
    let files: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
    if files.is_empty() {
        bail!("usage: steward-push-bench FILE.gguf...");
    }
    let dir = std::env::current_exe()?
        .parent()
        .context("binary dir")?
        .to_owned();
    let work = tempfile::tempdir()?;
    let data = work.path().join("cp");
    let port = openai_load::free_port()?;
    let mut cp = Command::new(dir.join("steward-control-plane"))
        .args(["--data-dir", data.to_str().context("path")?])
        .args(["--grpc-listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", "127.0.0.1:0"])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = cp.id();
    let mut credential = String::new();
    for line in BufReader::new(cp.stdout.take().context("stdout")?).lines() {
        let line = line?;
        if let Some(c) = line.strip_prefix("bootstrap admin credential (shown once): ") {
            credential = c.to_owned();
        }
        if line.starts_with("control plane ready") {
            break;
        }
    }
    let steward = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(dir.join("steward"))
            .args(args)
            .env("STEWARD_ENDPOINT", format!("https://127.0.0.1:{port}"))
            .env("STEWARD_TOKEN", &credential)
            .env("STEWARD_CA_FILE", data.join("ca.pem"))
            .output()?)
    };

    // A fresh signing key trusted for the bench's model names.
    let key = rcgen::KeyPair::generate()?;
    let key_path = work.path().join("key.pem");
    let pub_path = work.path().join("key.pub");
    std::fs::write(&key_path, key.serialize_pem())?;
    std::fs::write(&pub_path, key.public_key_pem())?;
    let out = steward(&[
        "trust",
        "add-key",
        pub_path.to_str().context("path")?,
        "--models",
        "bench-*",
    ])?;
    if !out.status.success() {
        bail!(
            "trust add-key failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    println!(
        "| file | size | openssl sha256 s | openssl MB/s | push s | push MB/s | push / openssl | cp RSS before MiB | cp RSS peak MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, file) in files.iter().enumerate() {
        let size = std::fs::metadata(file)?.len();
        let sig = work.path().join(format!("{i}.sig"));
        let out = steward(&[
            "model",
            "sign",
            file.to_str().context("path")?,
            "--key",
            key_path.to_str().context("path")?,
            "--output",
            sig.to_str().context("path")?,
        ])?;
        if !out.status.success() {
            bail!("sign failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        warm(file)?;
        let bound = (0..2)
            .map(|_| openssl_sha256(file))
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .min()
            .context("timing")?;
        let rss_before = rss_mib(pid)?;
        let sampler_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = sampler_stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0f64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(rss_mib(pid).unwrap_or(0.0));
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak
            })
        };
        let started = Instant::now();
        let out = steward(&[
            "model",
            "push",
            file.to_str().context("path")?,
            "--name",
            &format!("bench-{i}"),
            "--version",
            "1",
            "--signature",
            sig.to_str().context("path")?,
        ])?;
        let push = started.elapsed();
        sampler_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.join().map_err(|_| anyhow::anyhow!("sampler"))?;
        if !out.status.success() {
            bail!("push failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mb = size as f64 / 1e6;
        println!(
            "| {} | {:.0} MB | {:.3} | {:.0} | {:.3} | {:.0} | {:.2} | {:.0} | {:.0} |",
            file.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            mb,
            bound.as_secs_f64(),
            mb / bound.as_secs_f64(),
            push.as_secs_f64(),
            mb / push.as_secs_f64(),
            bound.as_secs_f64() / push.as_secs_f64(),
            rss_before,
            peak
        );
    }
    let _ = cp.kill();
    let _ = cp.wait();
    Ok(())
}

/// Writes a valid GGUF whose single F32 tensor makes it `mib` MiB large.
fn make_gguf(path: &Path, mib: u64) -> anyhow::Result<()> {
    use steward_artifact::gguf::{GgmlType, writer::GgufWriter};
    let floats = mib * (1 << 20) / 4;
    let data = vec![0u8; usize::try_from(floats * 4)?];
    GgufWriter::new(3)
        .kv_string("general.architecture", "llama")
        .kv_string("general.name", "push benchmark filler")
        .kv_u32("llama.context_length", 2048)
        .kv_u32("llama.block_count", 1)
        .tensor_raw("token_embd.weight", &[floats], GgmlType::F32, data)
        .write_to(path)?;
    println!("wrote {} ({} MiB)", path.display(), mib);
    Ok(())
}
