//! Artifact distribution throughput: one model deployed to 1, 5 and 10 real agents at once.
//!
//! A real `steward-control-plane` and N real `steward-node-agent` processes on this machine.
//! The model is signed and pushed once; then, per round, N freshly enrolled agents are
//! labelled for the round and a deployment with N replicas is created. The clock runs from
//! the `deploy create` call until every agent has the verified artifact in its cache (pulled
//! over mTLS gRPC in chunks, hashed while received, GGUF pre-parsed, signature verified
//! under the trust policy, renamed into the cache). Aggregate throughput counts agent-bytes
//! verified per second. The bound is `openssl dgst -sha256` of the same page-cached file,
//! timed in the same run; the control plane's RSS is sampled every 20 ms. The CPU time the
//! control plane and the agents used during the round (10 ms resolution) shows where a
//! pull's work goes: on this machine both share the same cores. An agent loads the model
//! as soon as its copy is verified, so in a round of several agents the first ones load
//! while the others still pull: the table gives the CPU their inference threads
//! (`llama-*`, where llama.cpp loads) used before the round ended, how long the
//! `deploy create` command itself took (start of the `steward` process to its exit), and
//! when the first and the last agent had the verified artifact.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/steward-pull-bench target/models/gemma3-270m-q4_k_m.gguf [1,5,10]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use steward_tests::bench::{
    BenchControlPlane, PeakRss, cpu_seconds, log_filter, openssl_sha256, path_str as path, rss_mib,
    thread_cpu_seconds, warm,
};
use steward_tests::openai_load;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let file = PathBuf::from(
        args.first()
            .context("usage: steward-pull-bench MODEL.gguf [COUNTS, default 1,5,10]")?,
    );
    let counts: Vec<usize> = args
        .get(1)
        .map_or("1,5,10", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("counts must be numbers, e.g. 1,5,10")?;
    ensure!(file.is_file(), "{} not found", file.display());
    let work = tempfile::tempdir()?;
    let cp = BenchControlPlane::start(work.path())?;
    let size = std::fs::metadata(&file)?.len();
    let key_path = cp.trust_fresh_key(work.path())?;
    let sig = work.path().join("model.sig");
    cp.steward(&[
        "model",
        "sign",
        path(&file)?,
        "--key",
        path(&key_path)?,
        "--output",
        path(&sig)?,
    ])?;
    let pushed = cp.steward(&[
        "-o",
        "json",
        "model",
        "push",
        path(&file)?,
        "--name",
        "bench-model",
        "--version",
        "1",
        "--signature",
        path(&sig)?,
    ])?;
    let digest = serde_json::from_str::<serde_json::Value>(&pushed)?["digest"]
        .as_str()
        .context("push output has no digest")?
        .to_owned();

    warm(&file)?;
    let bound = (0..3)
        .map(|_| openssl_sha256(&file))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .min()
        .context("timing")?;
    let bound_mbps = size as f64 / 1e6 / bound.as_secs_f64();
    eprintln!(
        "openssl dgst -sha256: {:.3} s ({bound_mbps:.0} MB/s)",
        bound.as_secs_f64()
    );

    println!(
        "| agents | size | wall s | aggregate agent-MB/s | per agent MB/s | aggregate ÷ 1 agent | 1 agent ÷ openssl | cp RSS before MiB | cp RSS peak MiB | cp CPU s | agents CPU s | of it model loads s | deploy call s | first / last verified s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut single = None;
    for (round, &n) in counts.iter().enumerate() {
        let mut agents = Vec::new();
        for i in 0..n {
            agents.push(start_agent(&cp, work.path(), round, i)?);
        }
        wait_ready(&cp, n)?;
        for a in &agents {
            cp.steward(&["nodes", "label", &a.name, &format!("round={round}")])?;
        }
        let rss_before = rss_mib(cp.child.id())?;
        let peak_rss = PeakRss::start(cp.child.id());
        // (control plane, agents, agents' inference threads)
        let cpu = |agents: &[Agent]| -> anyhow::Result<(f64, f64, f64)> {
            let (mut on_agents, mut loading) = (0.0, 0.0);
            for a in agents {
                on_agents += cpu_seconds(a.child.id())?;
                loading += thread_cpu_seconds(a.child.id(), "llama-")?;
            }
            Ok((cpu_seconds(cp.child.id())?, on_agents, loading))
        };
        let (cp_cpu_before, agents_cpu_before, loads_before) = cpu(&agents)?;
        let started = Instant::now();
        cp.steward(&[
            "deploy",
            "create",
            &format!("bench-{round}"),
            "--model",
            "bench-model@1",
            "--nodes",
            &format!("round={round}"),
            "--replicas",
            &n.to_string(),
            "--slots",
            "1",
            "--ctx",
            "256",
        ])?;
        let deploy_call = started.elapsed().as_secs_f64();
        let mut pending: Vec<PathBuf> = agents
            .iter()
            .map(|a| a.dir.join("artifacts").join(format!("{digest}.gguf")))
            .collect();
        let mut verified_at = Vec::new();
        while !pending.is_empty() {
            pending.retain(|p| {
                let there = p.exists();
                if there {
                    verified_at.push(started.elapsed().as_secs_f64());
                }
                !there
            });
            ensure!(
                started.elapsed() < Duration::from_secs(600),
                "agents did not receive the artifact within 10 minutes"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let wall = started.elapsed().as_secs_f64();
        let (cp_cpu, agents_cpu, loads) = cpu(&agents)?;
        let peak = peak_rss.stop()?;
        let aggregate = n as f64 * size as f64 / 1e6 / wall;
        let one = *single.get_or_insert(aggregate);
        println!(
            "| {n} | {:.0} MB | {wall:.3} | {aggregate:.0} | {:.0} | {:.2} | {} | {rss_before:.0} | {peak:.0} | {:.2} | {:.2} | {:.2} | {deploy_call:.3} | {:.2} / {:.2} |",
            size as f64 / 1e6,
            aggregate / n as f64,
            aggregate / one,
            if n == 1 {
                format!("{:.2}", aggregate / bound_mbps)
            } else {
                "-".into()
            },
            cp_cpu - cp_cpu_before,
            agents_cpu - agents_cpu_before,
            loads - loads_before,
            verified_at.first().copied().unwrap_or(wall),
            verified_at.last().copied().unwrap_or(wall),
        );
        cp.steward(&["deploy", "delete", &format!("bench-{round}")])?;
        drop(agents);
    }
    cp.stop();
    Ok(())
}

struct Agent {
    child: Child,
    dir: PathBuf,
    name: String,
}

/// Agents stop at the end of their round, or when the benchmark fails.
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(
    cp: &BenchControlPlane,
    work: &Path,
    round: usize,
    i: usize,
) -> anyhow::Result<Agent> {
    let token_json = cp.steward(&["-o", "json", "token", "create", "--ttl", "10m"])?;
    let token = serde_json::from_str::<serde_json::Value>(&token_json)?["token"]
        .as_str()
        .context("token")?
        .to_owned();
    let name = format!("bench-{round}-{i}");
    let dir = work.join(&name);
    let child = Command::new(cp.bin.join("steward-node-agent"))
        .args(["--control-plane", &cp.endpoint()])
        .args([
            "--data-dir",
            path(&dir)?,
            "--token",
            &token,
            "--name",
            &name,
        ])
        .args([
            "--api-listen",
            &format!("127.0.0.1:{}", openai_load::free_port()?),
        ])
        .args([
            "--api-key",
            "bench",
            "--heartbeat-interval",
            "1s",
            "--threads",
            "1",
        ])
        .env("RUST_LOG", log_filter())
        .spawn()?;
    Ok(Agent { child, dir, name })
}

/// Waits until `want` nodes are connected and ready.
fn wait_ready(cp: &BenchControlPlane, want: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes: serde_json::Value =
            serde_json::from_str(&cp.steward(&["-o", "json", "nodes", "list"])?)?;
        let ready = nodes.as_array().map_or(0, |a| {
            a.iter()
                .filter(|n| n["connected"] == true && n["state"] == "ready")
                .count()
        });
        if ready >= want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {ready} of {want} agents became ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
