//! `steward-node-agent`: parses flags, installs telemetry, and runs the agent (or, with
//! `simulate`, many simulated agents).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use steward_node_agent::agent::{AgentConfig, run};
use steward_node_agent::simulate::{Simulation, SimulationConfig};
use tokio_util::sync::CancellationToken;

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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run N simulated agents (synthetic hardware, real session code) in this process.
    Simulate(SimulateArgs),
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
        None => {
            let a = cli.agent;
            let mut config = AgentConfig::new(a.control_plane, a.data_dir);
            config.enrollment_token = a.token;
            config.name = a.name;
            config.heartbeat_interval = a.heartbeat_interval;
            run(config, shutdown).await.map_err(anyhow::Error::from)
        }
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
