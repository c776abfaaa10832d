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
    #[arg(long, default_value = "15s", value_parser = positive_duration)]
    heartbeat_timeout: Duration,
    /// Lifetime of agent client certificates; agents renew at two thirds.
    #[arg(long, default_value = "24h", value_parser = positive_duration)]
    agent_certificate_ttl: Duration,
    /// How long one rollout step may take (pull, verify, load, probe) before the rollout
    /// rolls back.
    #[arg(long, default_value = "30m", value_parser = positive_duration)]
    rollout_step_timeout: Duration,
    /// Close a gRPC connection that has not finished its TLS handshake after this long.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    tls_handshake_timeout: Duration,
    /// Close a gRPC connection from which nothing has arrived for this long. The server
    /// pings idle connections every 30 s and waits 10 s for the answer, so a value under
    /// 40 s also closes idle clients that are healthy.
    #[arg(long, default_value = "60s", value_parser = positive_duration)]
    grpc_idle_timeout: Duration,
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
    config.tls_handshake_timeout = args.tls_handshake_timeout;
    config.grpc_idle_timeout = args.grpc_idle_timeout;
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

/// A duration such as `10s` or `1m 30s`; zero is refused, since every duration flag here is a
/// timeout or a lifetime that would end things at once.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (expected a duration such as 10s, 5m or 1h)")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let args = Args::parse_from(["steward-control-plane"]);
        let config = Config::new(&args.data_dir);
        assert_eq!(args.heartbeat_timeout, config.heartbeat_timeout);
        assert_eq!(args.rollout_step_timeout, config.rollout_step_timeout);
        assert_eq!(args.tls_handshake_timeout, config.tls_handshake_timeout);
        assert_eq!(args.grpc_idle_timeout, config.grpc_idle_timeout);
        assert_eq!(
            args.agent_certificate_ttl,
            config.fleet.agent_certificate_ttl
        );
    }

    #[test]
    fn durations_must_be_positive_and_well_formed() {
        assert_eq!(positive_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            positive_duration("0s"),
            Err("must be longer than zero".into())
        );
        let bad = positive_duration("soon").unwrap_err();
        assert!(bad.contains("expected a duration such as 10s"), "{bad}");
    }
}
