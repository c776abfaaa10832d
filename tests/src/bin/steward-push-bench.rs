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

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use steward_tests::bench::{BenchControlPlane, PeakRss, openssl_sha256, path_str, rss_mib, warm};

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
    let work = tempfile::tempdir()?;
    let cp = BenchControlPlane::start(work.path())?;
    let pid = cp.child.id();
    let key_path = cp.trust_fresh_key(work.path())?;

    println!(
        "| file | size | openssl sha256 s | openssl MB/s | push s | push MB/s | push / openssl | cp RSS before MiB | cp RSS peak MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, file) in files.iter().enumerate() {
        let size = std::fs::metadata(file)?.len();
        let sig = work.path().join(format!("{i}.sig"));
        cp.steward(&[
            "model",
            "sign",
            path_str(file)?,
            "--key",
            path_str(&key_path)?,
            "--output",
            path_str(&sig)?,
        ])?;
        warm(file)?;
        let bound = (0..2)
            .map(|_| openssl_sha256(file))
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .min()
            .context("timing")?;
        let rss_before = rss_mib(pid)?;
        let peak_rss = PeakRss::start(pid);
        let started = Instant::now();
        let pushed = cp.steward(&[
            "model",
            "push",
            path_str(file)?,
            "--name",
            &format!("bench-{i}"),
            "--version",
            "1",
            "--signature",
            path_str(&sig)?,
        ]);
        let push = started.elapsed();
        let peak = peak_rss.stop()?;
        pushed?;
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
    cp.stop();
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
