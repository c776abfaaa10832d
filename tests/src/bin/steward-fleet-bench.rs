//! Fleet-scale benchmark: N simulated agents (real enrollment, TLS sessions and heartbeats)
//! against one real `steward-control-plane` process, grown in stages.
//!
//! For each stage it prints agents connected, heartbeat round trip p50/p99 as the agents
//! measured it, the control plane's CPU and RSS, and its database writes per second.
//!
//! ```text
//! cargo build --release -p steward-control-plane -p steward-tests
//! target/release/steward-fleet-bench --backend postgres --stages 1000,2000,5000,10000
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use steward_db::testing::PostgresTestDb;
use steward_node_agent::simulate::{Simulation, SimulationConfig};
use steward_tests::bench::{cpu_seconds, read_bootstrap_credential, rss_mib};
use steward_tests::openai_load::free_port;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_enum, default_value_t = Backend::Postgres)]
    backend: Backend,
    /// Fleet sizes to measure, in increasing order; agents are added between stages.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000")]
    stages: Vec<usize>,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Measurement window per stage (after a warm-up of one heartbeat interval).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// The control-plane binary (default: next to this one).
    #[arg(long)]
    control_plane: Option<PathBuf>,
}

struct Row {
    agents: usize,
    connected: i64,
    enroll_secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    samples: usize,
    cpu_percent: f64,
    rss_mib: f64,
    writes_per_sec: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_fd_limit();
    let binary = args.control_plane.clone().unwrap_or_else(|| {
        let mut p = std::env::current_exe().expect("own path");
        p.pop();
        p.join("steward-control-plane")
    });
    let data_dir = tempfile::tempdir()?;
    let pg = match args.backend {
        Backend::Postgres => Some(PostgresTestDb::create().await?),
        Backend::Sqlite => None,
    };
    let (grpc_port, http_port) = (free_port()?, free_port()?);
    let mut cmd = Command::new(&binary);
    cmd.args([
        "--data-dir",
        data_dir.path().to_str().context("utf-8 path")?,
    ])
    .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
    .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
    .args(["--heartbeat-timeout", "20s"])
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(pg) = &pg {
        cmd.args(["--database-url", &pg.url]);
    }
    let mut child = ChildGuard(
        cmd.spawn()
            .with_context(|| format!("starting {}", binary.display()))?,
    );
    let credential = read_bootstrap_credential(&mut child.0)?;
    let pid = child.0.id();
    let endpoint = format!("https://127.0.0.1:{grpc_port}");
    let metrics_url = format!("http://127.0.0.1:{http_port}/metrics");
    let ca = std::fs::read_to_string(data_dir.path().join("ca.pem"))?;

    println!(
        "backend={:?} heartbeat={:?} window={:?} cores={}",
        args.backend,
        args.heartbeat_interval,
        args.window,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut simulations = Vec::new();
    let mut rows = Vec::new();
    let mut total = 0usize;
    for &target in &args.stages {
        if target <= total {
            bail!("stages must increase");
        }
        let enroll_started = Instant::now();
        let sim = Simulation::start(SimulationConfig {
            endpoint: endpoint.clone(),
            admin_credential: credential.clone(),
            ca_certificate_pem: ca.clone(),
            count: target - total,
            heartbeat_interval: args.heartbeat_interval,
            name_prefix: format!("bench{target}"),
            enroll_concurrency: 64,
        })
        .await?;
        simulations.push(sim);
        total = target;
        let connected = || simulations.iter().map(Simulation::connected).sum::<i64>();
        let deadline = Instant::now() + Duration::from_secs(300);
        while connected() < total as i64 {
            if Instant::now() > deadline {
                bail!("only {} of {total} agents connected", connected());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let enroll_secs = enroll_started.elapsed().as_secs_f64();
        tokio::time::sleep(args.heartbeat_interval).await;
        for s in &simulations {
            s.stats.take_rtts();
        }
        let cpu_before = cpu_seconds(pid)?;
        let writes_before = db_writes(&metrics_url).await?;
        let started = Instant::now();
        tokio::time::sleep(args.window).await;
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid)? - cpu_before;
        let writes = db_writes(&metrics_url).await? - writes_before;
        let mut rtts: Vec<u32> = simulations
            .iter()
            .flat_map(|s| s.stats.take_rtts())
            .collect();
        rtts.sort_unstable();
        let row = Row {
            agents: total,
            connected: connected(),
            enroll_secs,
            p50_ms: percentile(&rtts, 0.50),
            p99_ms: percentile(&rtts, 0.99),
            samples: rtts.len(),
            cpu_percent: cpu / elapsed * 100.0,
            rss_mib: rss_mib(pid)?,
            writes_per_sec: writes as f64 / elapsed,
        };
        print_row(&row, rows.is_empty());
        rows.push(row);
    }
    for sim in simulations {
        sim.stop().await;
    }
    drop(child);
    if let Some(pg) = pg {
        pg.drop_database().await?;
    }
    Ok(())
}

fn print_row(row: &Row, header: bool) {
    if header {
        println!(
            "| agents | connected | enroll+connect s | heartbeats measured | hb p50 ms | hb p99 ms | cp CPU % | cp RSS MiB | db writes/s |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    println!(
        "| {} | {} | {:.1} | {} | {:.2} | {:.2} | {:.1} | {:.0} | {:.2} |",
        row.agents,
        row.connected,
        row.enroll_secs,
        row.samples,
        row.p50_ms,
        row.p99_ms,
        row.cpu_percent,
        row.rss_mib,
        row.writes_per_sec
    );
}

fn percentile(sorted_micros: &[u32], q: f64) -> f64 {
    if sorted_micros.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_micros.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted_micros[i]) / 1000.0
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn db_writes(url: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(url).await?.text().await?;
    let line = text
        .lines()
        .find(|l| l.starts_with("steward_db_writes_total "))
        .context("steward_db_writes_total missing from /metrics")?;
    Ok(line.rsplit(' ').next().context("value")?.parse()?)
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
