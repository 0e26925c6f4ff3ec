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
    let command = cli.command.unwrap_or(Command::Serve { no_workers: false });
    if command.is_operator_command() {
        return operator_command(command, config).await;
    }
    convoq::telemetry::init_logging(config.log_format, &config.log_filter);
    match convoq::app::run(command, config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "convoq stopped");
            eprintln!("convoq: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `convoq queues …` and `convoq jobs …`: output for a person or a script on stdout, warnings
/// only on stderr unless `CONVOQ_LOG` asks for more.
async fn operator_command(command: Command, config: Config) -> std::process::ExitCode {
    let filter = if config.log_filter == "info" {
        "warn"
    } else {
        config.log_filter.as_str()
    };
    convoq::telemetry::init_logging(config.log_format, filter);
    let app = match convoq::app::App::open(config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("convoq: {e:#}");
            return std::process::ExitCode::from(convoq::cli::Exit::Unavailable as u8);
        }
    };
    let exit = convoq::cli::run(&app, command).await;
    app.close().await;
    std::process::ExitCode::from(exit as u8)
}
