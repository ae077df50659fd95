//! Serves the demo gRPC service until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use grpc_guard_demo::{serve, DemoError, Observed};
use tokio::net::TcpListener;

/// Serve the grpc-guard demo service (grpcguard.demo.v1.Demo).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port, printed once ready.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo-server: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), DemoError> {
    let bind_error = |source| DemoError::Bind { addr: args.listen, source };
    let listener = TcpListener::bind(args.listen).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    // Scripts and tests wait for this exact line before sending traffic;
    // connections made after it queue in the listen backlog.
    println!("demo-server listening on {addr}");
    serve(listener, Observed::default(), shutdown_requested()).await
}

async fn shutdown_requested() {
    let ctrl_c = async {
        // Without a Ctrl-C handler, keep serving until SIGTERM instead of
        // stopping at once.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
