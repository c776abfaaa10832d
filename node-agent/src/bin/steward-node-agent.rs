//! `steward-node-agent`: parses flags, installs telemetry, and runs the agent (or, with
//! `simulate`, many simulated agents).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use steward_engine::{GpuLayers, ModelConfig};
use steward_node_agent::agent::{AgentConfig, run};
use steward_node_agent::inventory::{HostProbe, InventoryProbe};
use steward_node_agent::serving::{Serving, ServingConfig};
use steward_node_agent::simulate::{Simulation, SimulationConfig};
use steward_proto::transport::Windows;
use tokio_util::sync::CancellationToken;

/// mimalloc keeps the megabyte buffers an artifact download churns through (tonic's decode
/// buffer) warm for reuse; with the system allocator each was a fresh mmap, and the page
/// faults and zeroing cost a tenth of the agent's CPU during a pull.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Steward node agent. It dials out to the control plane; it never listens for it.
#[derive(Debug, Parser)]
#[command(
    name = "steward-node-agent",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Control-plane gRPC endpoint.
    #[arg(
        long,
        env = "STEWARD_CONTROL_PLANE",
        default_value = "https://127.0.0.1:7443"
    )]
    control_plane: String,
    /// Where the node identity and last desired state are kept.
    #[arg(
        long,
        env = "STEWARD_AGENT_DATA_DIR",
        default_value = "steward-agent-data"
    )]
    data_dir: PathBuf,
    /// Enrollment token (`steward token create`); needed only on the first start.
    #[arg(long, env = "STEWARD_ENROLLMENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Node name to request at enrollment (default: hostname).
    #[arg(long, env = "STEWARD_NODE_NAME")]
    name: Option<String>,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Export traces over OTLP/gRPC to this endpoint.
    #[arg(long, env = "STEWARD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    inference: InferenceArgs,
}

/// The model this node serves from its local configuration, and the API in front of it.
#[derive(Clone, Debug, Args)]
struct InferenceArgs {
    /// A GGUF model to load and serve over the OpenAI-compatible API.
    #[arg(long, env = "STEWARD_MODEL")]
    model: Option<PathBuf>,
    /// The name clients use for the model (default: the file name without `.gguf`).
    #[arg(long, env = "STEWARD_MODEL_NAME")]
    model_name: Option<String>,
    /// Requests generated at once (continuous batching).
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Context tokens per request (prompt and completion).
    #[arg(long, default_value_t = 4096)]
    ctx: u32,
    /// One KV buffer shared by all slots instead of one per slot (see docs/BENCHMARKS.md).
    #[arg(long)]
    kv_unified: bool,
    /// CPU threads for inference (default: every core).
    #[arg(long)]
    threads: Option<u32>,
    /// Layers to offload to the GPU: `auto` (as many as fit the free VRAM) or a number.
    #[arg(long, default_value = "auto")]
    gpu_layers: GpuLayers,
    /// A llama.cpp built-in chat template name (chatml, gemma, llama3, ...) or template
    /// text, instead of the one in the GGUF.
    #[arg(long)]
    chat_template: Option<String>,
    /// Where the OpenAI-compatible API and /metrics listen (default 127.0.0.1:8080). An
    /// agent serves models (its own --model, or deployments) only when one of the two is
    /// given.
    #[arg(long, env = "STEWARD_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// Disk the artifact cache may use, in GiB, before artifacts no deployment needs are
    /// evicted (least recently used first).
    #[arg(long, default_value_t = 100.0, allow_negative_numbers = true, value_parser = cache_budget)]
    cache_budget_gib: f64,
    /// Cap artifact pulls at this many MiB/s (default: no cap), e.g. on a shared link.
    #[arg(long, allow_negative_numbers = true, value_parser = positive_mib_per_second)]
    pull_rate_limit_mib: Option<f64>,
    /// How far, in MiB, the control plane may send an artifact ahead of what this agent has
    /// read (the HTTP/2 stream window; the connection's is twice that). A pull moves at most
    /// this much per round trip: 2 MiB is 2 GB/s at 1 ms but 40 MB/s at 50 ms, so raise it
    /// for a link with long round trips.
    #[arg(
        long,
        default_value_t = 2,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(Windows::MAX_STREAM >> 20))
    )]
    pull_window_mib: u32,
    /// The most memory, in GiB, the control plane may give to models on this node (RAM, or
    /// the largest GPU's memory where models run on a GPU), to leave the rest of the host to
    /// other work. The agent itself loads assigned models only up to it, by the control
    /// plane's estimates. Default: the node's own memory.
    #[arg(long, allow_negative_numbers = true, value_parser = memory_limit_gib)]
    memory_limit_gib: Option<f64>,
    /// API keys clients must present (comma-separated in the environment). Without one,
    /// a key is generated into <data dir>/api-key.
    #[arg(
        long = "api-key",
        env = "STEWARD_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
}

impl AgentArgs {
    fn config(self) -> AgentConfig {
        let a = self;
        let mut config = AgentConfig::new(a.control_plane, a.data_dir);
        config.enrollment_token = a.token;
        config.name = a.name;
        config.heartbeat_interval = a.heartbeat_interval;
        config.serving = a.inference.serving();
        config.threads = a.inference.threads;
        config.cache_budget_bytes = (a.inference.cache_budget_gib * (1u64 << 30) as f64) as u64;
        config.pull_rate_limit = a
            .inference
            .pull_rate_limit_mib
            .map(|mib| (mib * (1u64 << 20) as f64) as u64);
        config.pull_windows = Windows::per_stream(a.inference.pull_window_mib << 20);
        config.memory_limit_bytes = a
            .inference
            .memory_limit_gib
            .map(|gib| (gib * (1u64 << 30) as f64) as u64);
        config
    }
}

/// A cache budget in GiB: a finite number, zero or more (zero keeps only what is assigned).
fn cache_budget(text: &str) -> Result<f64, String> {
    finite_number(text, |gib| gib >= 0.0, "a size of zero or more GiB")
}

/// A memory limit in GiB: a finite number of at least 0.001 (about a MiB; a smaller one
/// would round to no bytes, which the inventory reports as "no limit").
fn memory_limit_gib(text: &str) -> Result<f64, String> {
    finite_number(text, |gib| gib >= 0.001, "a size of at least 0.001 GiB")
}

/// A rate in MiB/s: a finite number above zero.
fn positive_mib_per_second(text: &str) -> Result<f64, String> {
    finite_number(text, |mib| mib > 0.0, "a rate above zero in MiB/s")
}

/// `text` as a finite number that `accept`s; otherwise says it is not `what`.
fn finite_number(text: &str, accept: fn(f64) -> bool, what: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(n) if n.is_finite() && accept(n) => Ok(n),
        _ => Err(format!("`{text}` is not {what}")),
    }
}

impl InferenceArgs {
    fn serving(&self) -> Option<ServingConfig> {
        let listen = self
            .api_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let Some(path) = self.model.clone() else {
            return self.api_listen.map(|listen| ServingConfig {
                listen,
                api_keys: self.api_keys.clone(),
                models: Vec::new(),
            });
        };
        let name = self.model_name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        });
        let model = ModelConfig {
            slots: self.slots,
            context_per_slot: self.ctx,
            kv_unified: self.kv_unified,
            threads: self.threads,
            gpu_layers: self.gpu_layers,
            chat_template: self.chat_template.clone(),
            ..ModelConfig::new(name, path)
        };
        Some(ServingConfig {
            listen,
            api_keys: self.api_keys.clone(),
            models: vec![model],
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run N simulated agents (synthetic hardware, real session code) in this process.
    Simulate(SimulateArgs),
    /// Serve a local model over the OpenAI-compatible API without a control plane.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Where a generated API key is kept.
    #[arg(
        long,
        env = "STEWARD_AGENT_DATA_DIR",
        default_value = "steward-agent-data"
    )]
    data_dir: PathBuf,
    #[command(flatten)]
    inference: InferenceArgs,
}

#[derive(Debug, Args)]
struct SimulateArgs {
    #[arg(
        long,
        env = "STEWARD_CONTROL_PLANE",
        default_value = "https://127.0.0.1:7443"
    )]
    control_plane: String,
    /// Admin credential, used to create one enrollment token per simulated agent.
    #[arg(long, env = "STEWARD_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The control plane's CA certificate.
    #[arg(long, env = "STEWARD_CA_FILE", default_value = "steward-data/ca.pem")]
    ca_file: PathBuf,
    #[arg(long, default_value_t = 100)]
    count: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    #[arg(long, default_value = "sim")]
    name_prefix: String,
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: this may replace the process image (same PID).
    steward_proto::glibc_memcpy::reexec_if_memcpy_is_slow();
    run_main()
}

#[tokio::main]
async fn run_main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _telemetry = match steward_telemetry::init(&steward_telemetry::TelemetryConfig {
        service_name: "steward-node-agent",
        otlp_endpoint: cli.agent.otlp_endpoint.clone(),
    }) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {}", steward_telemetry::chain(&e));
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            shutdown.cancel();
        }
    });
    let result = match cli.command {
        Some(Command::Simulate(args)) => simulate(args, shutdown).await,
        Some(Command::Serve(args)) => serve(args, shutdown).await,
        None => run(cli.agent.config(), shutdown)
            .await
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent stopped");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args
        .inference
        .serving()
        .filter(|c| !c.models.is_empty())
        .context("`serve` needs a model: pass --model PATH")?;
    let inventory = HostProbe::new(&args.data_dir).inventory().await;
    let serving = Serving::start(config, &args.data_dir, &inventory, shutdown.clone()).await?;
    serving.wait_until_loaded().await?;
    println!(
        "serving the OpenAI API at http://{}/v1",
        serving.local_addr()
    );
    shutdown.cancelled().await;
    serving.unload_all().await;
    Ok(())
}

async fn simulate(args: SimulateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ca_certificate_pem = std::fs::read_to_string(&args.ca_file)
        .with_context(|| format!("cannot read CA certificate {}", args.ca_file.display()))?;
    let simulation = Simulation::start(SimulationConfig {
        endpoint: args.control_plane,
        admin_credential: args.admin_token,
        ca_certificate_pem,
        count: args.count,
        heartbeat_interval: args.heartbeat_interval,
        name_prefix: args.name_prefix,
        enroll_concurrency: 32,
    })
    .await?;
    println!(
        "{} simulated agents enrolled; Ctrl-C to stop",
        simulation.node_ids.len()
    );
    shutdown.cancelled().await;
    simulation.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_config(args: &[&str]) -> Result<AgentConfig, clap::Error> {
        let cli =
            Cli::try_parse_from(std::iter::once("steward-node-agent").chain(args.iter().copied()))?;
        Ok(cli.agent.config())
    }

    #[test]
    fn pull_flags_reach_the_agent_config() {
        let config =
            agent_config(&["--pull-rate-limit-mib", "1.5", "--pull-window-mib", "16"]).unwrap();
        assert_eq!(config.pull_rate_limit, Some(3 << 19));
        assert_eq!(
            config.pull_windows,
            Windows {
                stream: 16 << 20,
                connection: 32 << 20
            }
        );
        let zero = agent_config(&["--cache-budget-gib", "0"]).unwrap();
        assert_eq!(
            zero.cache_budget_bytes, 0,
            "zero keeps only what is assigned"
        );
        let defaults = agent_config(&[]).unwrap();
        assert_eq!(defaults.pull_rate_limit, None);
        assert_eq!(defaults.memory_limit_bytes, None);
        assert_eq!(defaults.pull_windows, Windows::default());
    }

    #[test]
    fn the_memory_limit_reaches_the_agent_config_in_bytes() {
        let config = agent_config(&["--memory-limit-gib", "1.5"]).unwrap();
        assert_eq!(config.memory_limit_bytes, Some(3 << 29));
    }

    #[test]
    fn bad_pull_flags_are_refused_with_the_flag_named() {
        for args in [
            ["--pull-rate-limit-mib", "0"],
            ["--pull-rate-limit-mib", "-3"],
            ["--pull-rate-limit-mib", "NaN"],
            ["--pull-window-mib", "0"],
            ["--pull-window-mib", "1024"],
            ["--cache-budget-gib", "-1"],
            ["--cache-budget-gib", "inf"],
            ["--memory-limit-gib", "0"],
            ["--memory-limit-gib", "1e-12"],
            ["--memory-limit-gib", "-2"],
            ["--memory-limit-gib", "lots"],
        ] {
            let error = agent_config(&args).unwrap_err().to_string();
            assert!(error.contains(args[0]), "{args:?}: {error}");
        }
    }
}
