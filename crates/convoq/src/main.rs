//! The `convoq` binary: parses the command line, validates configuration, starts logging, and
//! runs the chosen role (default `serve`).

use clap::Parser;
use convoq::config::{Cli, Command, Config};

// The service allocates small, short-lived buffers on many threads at once (request bodies,
// JSON, SQLite rows); glibc's allocator spent a fifth of the pipeline's CPU on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.settings) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("convoq: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    convoq::telemetry::init_logging(config.log_format, &config.log_filter);
    let command = cli.command.unwrap_or(Command::Serve { no_workers: false });
    match convoq::app::run(command, config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "convoq stopped");
            eprintln!("convoq: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
