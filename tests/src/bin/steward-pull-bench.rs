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
//! A round of one agent also gives the pull on the agent's own clock (`pull_ms` in its log:
//! from the start of the attempt, before its connection to the control plane is opened,
//! until the verified file is in the cache), which leaves out the `deploy create` command,
//! the scheduling and the push of the new desired state. After the rounds, one more agent,
//! started once and kept running with a cache budget of zero, pulls the model `REPEATS` times
//! (each deployment is deleted once its model is loaded, which evicts the artifact), as a
//! running agent pulls a model it is newly assigned: every round above starts fresh agent
//! processes, which also pay for their first use of memory. Each statistic on one agent ends
//! with its median and best over the pulls.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/steward-pull-bench target/models/gemma3-270m-q4_k_m.gguf [1,5,10 [REPEATS, default 0]]
//! ```

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use steward_tests::bench::{
    BenchControlPlane, PeakRss, cpu_seconds, log_filter, openssl_sha256, path_str as path, rss_mib,
    thread_cpu_seconds, warm,
};
use steward_tests::openai_load;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let file = PathBuf::from(args.first().context(
        "usage: steward-pull-bench MODEL.gguf [COUNTS, default 1,5,10 [REPEATS, default 0]]",
    )?);
    let counts: Vec<usize> = args
        .get(1)
        .map_or("1,5,10", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("counts must be numbers, e.g. 1,5,10")?;
    let repeats: usize = args
        .get(2)
        .map_or(Ok(0), |r| r.parse())
        .context("REPEATS must be a number, e.g. 5")?;
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
        "| agents | size | wall s | aggregate agent-MB/s | per agent MB/s | aggregate ÷ 1 agent | 1 agent ÷ openssl | pull s, agent's clock | agent's clock ÷ openssl | cp RSS before MiB | cp RSS peak MiB | cp CPU s | agents CPU s | of it model loads s | deploy call s | first / last verified s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut bench = Bench {
        cp: &cp,
        digest: &digest,
        size,
        bound_mbps,
        single: None,
    };
    let mut fresh = Vec::new();
    for (round, &n) in counts.iter().enumerate() {
        let agents = (0..n)
            .map(|i| start_agent(&cp, work.path(), &format!("bench-{round}-{i}"), None))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ratios = bench.round(&agents, &format!("bench-{round}"), &n.to_string())?;
        fresh.extend(ratios);
        cp.steward(&["deploy", "delete", &format!("bench-{round}")])?;
        drop(agents);
    }
    let mut running = Vec::new();
    if repeats > 0 {
        // A budget of zero evicts the artifact once its deployment is deleted, so each
        // deployment is pulled again by the same process.
        let agent = start_agent(&cp, work.path(), "bench-running", Some("0"))?;
        let cached = agent.dir.join("artifacts").join(format!("{digest}.gguf"));
        for k in 0..repeats {
            let deployment = format!("bench-running-{k}");
            let label = format!("1, pull {} of one running agent", k + 1);
            running.extend(bench.round(std::slice::from_ref(&agent), &deployment, &label)?);
            wait_until_loaded(&agent)?;
            cp.steward(&["deploy", "delete", &deployment])?;
            wait_until(
                Duration::from_secs(60),
                "the artifact was not evicted",
                || !cached.exists(),
            )?;
        }
    }
    println!();
    println!(
        "| one agent | pulls | 1 agent ÷ openssl, median / best | agent's clock ÷ openssl, median / best |"
    );
    println!("|---|---:|---:|---:|");
    for (what, ratios) in [
        ("fresh agent per round", &fresh),
        ("one running agent", &running),
    ] {
        if ratios.is_empty() {
            continue;
        }
        let (end_to_end, own): (Vec<f64>, Vec<f64>) = ratios.iter().copied().unzip();
        println!(
            "| {what} | {} | {} | {} |",
            ratios.len(),
            median_and_best(end_to_end),
            median_and_best(own)
        );
    }
    cp.stop();
    Ok(())
}

struct Bench<'a> {
    cp: &'a BenchControlPlane,
    digest: &'a str,
    size: u64,
    bound_mbps: f64,
    /// Aggregate throughput of the first round.
    single: Option<f64>,
}

impl Bench<'_> {
    /// Deploys the model to `agents` (labelled for the round) as `deployment`, prints the
    /// round's row (`agents` column: `label`) and returns, for a round of one agent, its pull
    /// ÷ openssl end to end and on the agent's clock.
    fn round(
        &mut self,
        agents: &[Agent],
        deployment: &str,
        label: &str,
    ) -> anyhow::Result<Option<(f64, f64)>> {
        let (cp, n) = (self.cp, agents.len());
        wait_ready(cp, agents)?;
        for a in agents {
            cp.steward(&["nodes", "label", &a.name, &format!("round={deployment}")])?;
        }
        let pulls_before: Vec<usize> = agents.iter().map(Agent::pulls_logged).collect();
        let rss_before = rss_mib(cp.child.id())?;
        let peak_rss = PeakRss::start(cp.child.id());
        // (control plane, agents, agents' inference threads)
        let cpu = || -> anyhow::Result<(f64, f64, f64)> {
            let (mut on_agents, mut loading) = (0.0, 0.0);
            for a in agents {
                on_agents += cpu_seconds(a.child.id())?;
                loading += thread_cpu_seconds(a.child.id(), "llama-")?;
            }
            Ok((cpu_seconds(cp.child.id())?, on_agents, loading))
        };
        let (cp_cpu_before, agents_cpu_before, loads_before) = cpu()?;
        let started = Instant::now();
        cp.steward(&[
            "deploy",
            "create",
            deployment,
            "--model",
            "bench-model@1",
            "--nodes",
            &format!("round={deployment}"),
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
            .map(|a| {
                a.dir
                    .join("artifacts")
                    .join(format!("{}.gguf", self.digest))
            })
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
        let (cp_cpu, agents_cpu, loads) = cpu()?;
        let peak = peak_rss.stop()?;
        let mb = self.size as f64 / 1e6;
        let aggregate = n as f64 * mb / wall;
        let one = *self.single.get_or_insert(aggregate);
        let ratios = if n == 1 {
            // The agent logs its pull just after the verified file appears.
            let agent = &agents[0];
            wait_until(
                Duration::from_secs(5),
                "the agent did not log its pull",
                || agent.pulls_logged() > pulls_before[0],
            )?;
            let own = agent.last_pull_seconds().context("no pull logged")?;
            Some((aggregate / self.bound_mbps, own, mb / own / self.bound_mbps))
        } else {
            None
        };
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "| {label} | {mb:.0} MB | {wall:.3} | {aggregate:.0} | {:.0} | {:.2} | {} | {} | {} | {rss_before:.0} | {peak:.0} | {:.2} | {:.2} | {:.2} | {deploy_call:.3} | {:.2} / {:.2} |",
            aggregate / n as f64,
            aggregate / one,
            or_dash(ratios.map(|r| format!("{:.2}", r.0))),
            or_dash(ratios.map(|r| format!("{:.3}", r.1))),
            or_dash(ratios.map(|r| format!("{:.2}", r.2))),
            cp_cpu - cp_cpu_before,
            agents_cpu - agents_cpu_before,
            loads - loads_before,
            verified_at.first().copied().unwrap_or(wall),
            verified_at.last().copied().unwrap_or(wall),
        );
        Ok(ratios.map(|(end_to_end, _, own)| (end_to_end, own)))
    }
}

/// "median / best" of some ratios. Not `openai_load::median`, which takes the upper middle
/// value of an even count: a run often has two single pulls, and their mean is the median.
fn median_and_best(mut ratios: Vec<f64>) -> String {
    ratios.sort_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    let median = if ratios.len() % 2 == 1 {
        ratios[mid]
    } else {
        (ratios[mid - 1] + ratios[mid]) / 2.0
    };
    format!("{median:.2} / {:.2}", ratios[ratios.len() - 1])
}

struct Agent {
    child: Child,
    dir: PathBuf,
    name: String,
    /// `pull_ms` of each pull the agent logged, in seconds.
    pulls: Arc<Mutex<Vec<f64>>>,
}

impl Agent {
    fn pulls_logged(&self) -> usize {
        self.pulls.lock().expect("pull log").len()
    }

    fn last_pull_seconds(&self) -> Option<f64> {
        self.pulls.lock().expect("pull log").last().copied()
    }
}

/// Agents stop at the end of their round, or when the benchmark fails.
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an agent named `name`, with `--cache-budget-gib` where given. Its log goes to this
/// process's stderr, less the `INFO` lines the benchmark asks for (unless `RUST_LOG` is set),
/// from which it takes each pull's `pull_ms`.
fn start_agent(
    cp: &BenchControlPlane,
    work: &Path,
    name: &str,
    cache_budget_gib: Option<&str>,
) -> anyhow::Result<Agent> {
    let token_json = cp.steward(&["-o", "json", "token", "create", "--ttl", "10m"])?;
    let token = serde_json::from_str::<serde_json::Value>(&token_json)?["token"]
        .as_str()
        .context("token")?
        .to_owned();
    let dir = work.join(name);
    let mut command = Command::new(cp.bin.join("steward-node-agent"));
    command
        .args(["--control-plane", &cp.endpoint()])
        .args(["--data-dir", path(&dir)?, "--token", &token, "--name", name])
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
        ]);
    if let Some(gib) = cache_budget_gib {
        command.args(["--cache-budget-gib", gib]);
    }
    let mut child = command
        .env(
            "RUST_LOG",
            format!("{},steward_node_agent::artifacts=info", log_filter()),
        )
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("the agent's stderr")?;
    let pulls = Arc::new(Mutex::new(Vec::new()));
    let found = pulls.clone();
    let show_info = std::env::var_os("RUST_LOG").is_some();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let plain = strip_ansi(&line);
            if plain.contains("artifact verified and cached")
                && let Some(ms) = field(&plain, "pull_ms")
            {
                found.lock().expect("pull log").push(ms as f64 / 1000.0);
            }
            if show_info || !plain.contains(" INFO ") {
                eprintln!("{line}");
            }
        }
    });
    Ok(Agent {
        child,
        dir,
        name: name.to_owned(),
        pulls,
    })
}

/// `line` without its terminal colour sequences.
fn strip_ansi(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Up to and including the sequence's final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The number logged as `key=N` in a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Waits until the named agents are connected and ready.
fn wait_ready(cp: &BenchControlPlane, agents: &[Agent]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes: serde_json::Value =
            serde_json::from_str(&cp.steward(&["-o", "json", "nodes", "list"])?)?;
        let ready = nodes.as_array().map_or(0, |a| {
            a.iter()
                .filter(|n| n["connected"] == true && n["state"] == "ready")
                .filter(|n| agents.iter().any(|a| n["name"] == a.name.as_str()))
                .count()
        });
        if ready == agents.len() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {ready} of {} agents became ready",
            agents.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the agent's model load is over: its inference threads stop using CPU.
fn wait_until_loaded(agent: &Agent) -> anyhow::Result<()> {
    let mut last = thread_cpu_seconds(agent.child.id(), "llama-")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = thread_cpu_seconds(agent.child.id(), "llama-")?;
        if now > 0.0 && now == last {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "the model did not load in 60 s");
        last = now;
    }
}

fn wait_until(
    limit: Duration,
    failure: &str,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        ensure!(Instant::now() < deadline, "{failure}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_time_is_read_from_a_coloured_log_line() {
        let line = "\u{1b}[2m2026-12-07T03:53:31Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2msteward_node_agent::artifacts\u{1b}[0m\u{1b}[2m:\u{1b}[0m artifact verified and cached \u{1b}[3mbytes\u{1b}[0m\u{1b}[2m=\u{1b}[0m253113024 \u{1b}[3mpull_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m352 \u{1b}[3mreceived_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m340";
        let plain = strip_ansi(line);
        assert!(plain.contains(" INFO "), "{plain}");
        assert_eq!(field(&plain, "pull_ms"), Some(352));
        assert_eq!(field(&plain, "bytes"), Some(253_113_024));
        assert_eq!(field(&plain, "ms"), None, "only the whole key matches");
    }

    #[test]
    fn median_and_best_of_even_and_odd_counts() {
        assert_eq!(median_and_best(vec![0.5, 0.7, 0.6]), "0.60 / 0.70");
        assert_eq!(median_and_best(vec![0.4, 0.5, 0.6, 0.9]), "0.55 / 0.90");
    }
}
