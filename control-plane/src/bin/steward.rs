//! `steward`: the admin CLI.

use clap::Parser;

/// mimalloc reuses the large buffers that streaming artifacts churn through; with the system
/// allocator every 1 MiB chunk was a fresh mmap, page faults and zeroing (seen in push profiles).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before any thread starts: this may replace the process image (same PID).
    steward_proto::glibc_memcpy::reexec_if_memcpy_is_slow();
    run_main()
}

#[tokio::main(flavor = "current_thread")]
async fn run_main() -> std::process::ExitCode {
    let cli = steward_control_plane::cli::Cli::parse();
    match steward_control_plane::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli_error(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// gRPC errors read best as their message alone; everything else with its cause chain.
fn cli_error(e: &anyhow::Error) -> String {
    if let Some(status) = e.downcast_ref::<tonic::Status>() {
        return format!("{}: {}", code_text(status.code()), status.message());
    }
    format!("{e:#}")
}

fn code_text(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unauthenticated => "not authenticated",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::Unavailable => "control plane unavailable",
        _ => "request failed",
    }
}
