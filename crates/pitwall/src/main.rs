//! `pitwall`: the Stream API session service in one binary.
//!
//! - [`cli`]: the command line (flags, `PITWALL_*` variables).
//! - [`serve`]: `pitwall serve`, the server process: config, signals, exit code.
//! - [`session`]: `pitwall session …`, the client commands; [`output`] prints their results,
//!   [`values`] reads and prints details, offsets and times.
//! - [`store`]: `pitwall store check|repair`, on the embedded store of a stopped server.
//! - [`logging`]: the `tracing` subscriber (level and format).

mod cli;
mod logging;
mod output;
mod serve;
mod session;
mod store;
mod values;

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
        cli::Command::Store(args) => return store::run(*args),
        cli::Command::Session(args) => {
            return match runtime.block_on(session::run(*args)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    // The reason may be the server's words: no control characters reach
                    // the terminal.
                    eprintln!("pitwall: {}", output::escape(&e.to_string()));
                    std::process::ExitCode::from(e.exit_code())
                }
            };
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
