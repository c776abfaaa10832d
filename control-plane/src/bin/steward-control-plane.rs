//! `steward-control-plane`: parses flags, installs telemetry, and calls
//! [`steward_control_plane::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// mimalloc reuses the large buffers that streaming artifacts churn through; with the system
/// allocator every 1 MiB chunk was a fresh mmap, page faults and zeroing (seen in push profiles).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;
use steward_control_plane::{Config, Listeners};

/// The Steward control plane.
#[derive(Debug, Parser)]
#[command(name = "steward-control-plane", version)]
struct Args {
    /// Directory for the SQLite database and ca.pem.
    #[arg(long, env = "STEWARD_DATA_DIR", default_value = "steward-data")]
    data_dir: PathBuf,
    /// PostgreSQL (`postgres://…`) or SQLite (`sqlite://…`) URL; default: SQLite in the data dir.
    #[arg(long, env = "STEWARD_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// gRPC (TLS) listen address for agents and the CLI.
    #[arg(long, env = "STEWARD_GRPC_LISTEN", default_value = "127.0.0.1:7443")]
    grpc_listen: SocketAddr,
    /// Plain HTTP listen address for /metrics, /healthz and /readyz.
    #[arg(long, env = "STEWARD_HTTP_LISTEN", default_value = "127.0.0.1:9464")]
    http_listen: SocketAddr,
    /// Extra DNS name or IP in the server certificate (repeatable).
    #[arg(
        long = "server-name",
        env = "STEWARD_SERVER_NAMES",
        value_delimiter = ','
    )]
    server_names: Vec<String>,
    /// End a session (node unavailable) after this long without a message from its agent.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// Lifetime of agent client certificates; agents renew at two thirds.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    agent_certificate_ttl: Duration,
    /// How long one rollout step may take (pull, verify, load, probe) before the rollout
    /// rolls back.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    rollout_step_timeout: std::time::Duration,
    /// Largest model artifact accepted by push or import, in bytes.
    #[arg(long, env = "STEWARD_MAX_ARTIFACT_BYTES", default_value_t = 256 << 30)]
    max_artifact_bytes: u64,
    /// Export traces over OTLP/gRPC to this endpoint (e.g. http://127.0.0.1:4317).
    #[arg(long, env = "STEWARD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: this may replace the process image (same PID).
    steward_proto::glibc_memcpy::reexec_if_memcpy_is_slow();
    run_main()
}

#[tokio::main]
async fn run_main() -> std::process::ExitCode {
    // mimalloc asks for transparent huge pages; while uploads stream through tonic's
    // buffers, every fault on such a region zeroed 2 MiB, a quarter of the receiving
    // threads' CPU in push profiles. Without them, upload buffers fault in 4 KiB at a time.
    // Best effort: a kernel that refuses simply keeps the default.
    let _ = nix::sys::prctl::set_thp_disable(true);
    let args = Args::parse();
    let _telemetry = match steward_telemetry::init(&steward_telemetry::TelemetryConfig {
        service_name: "steward-control-plane",
        otlp_endpoint: args.otlp_endpoint.clone(),
    }) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {}", steward_telemetry::chain(&e));
            return std::process::ExitCode::FAILURE;
        }
    };
    match serve(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "control plane stopped");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listeners = Listeners {
        grpc: tokio::net::TcpListener::bind(args.grpc_listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.grpc_listen))?,
        http: tokio::net::TcpListener::bind(args.http_listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.http_listen))?,
    };
    let mut config = Config::new(args.data_dir);
    config.database_url = args.database_url;
    config.server_names = args.server_names;
    config.heartbeat_timeout = args.heartbeat_timeout;
    config.fleet.agent_certificate_ttl = args.agent_certificate_ttl;
    config.registry.max_artifact_bytes = args.max_artifact_bytes;
    config.rollout_step_timeout = args.rollout_step_timeout;
    steward_control_plane::run(config, listeners, shutdown_signal(), |cp| {
        if let Some(credential) = &cp.bootstrap_admin_credential {
            // Printed once, on stdout, and never stored in plain text.
            println!("bootstrap admin credential (shown once): {credential}");
        }
        println!(
            "control plane ready: grpc=https://{} http=http://{} ca-sha256={}",
            cp.grpc_addr, cp.http_addr, cp.ca_sha256
        );
    })
    .await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
