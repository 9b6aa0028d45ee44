//! `pitwall`: the Stream API session service in one binary.
//!
//! - [`cli`]: the command line (flags, `PITWALL_*` variables).
//! - [`serve`]: `pitwall serve`, the server process: config, signals, exit code.
//! - [`logging`]: the `tracing` subscriber (level and format).

mod cli;
mod logging;
mod serve;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    logging::init(&cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pitwall: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command() {
        cli::Command::Serve(args) => runtime.block_on(serve::run(*args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
