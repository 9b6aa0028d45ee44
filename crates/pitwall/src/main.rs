//! `pitwall`: the Stream API session service in one binary.
//!
//! - [`cli`]: the command line (flags, `PITWALL_*` variables).
//! - [`serve`]: `pitwall serve`, the server process: config, signals, exit code.
//! - [`session`]: `pitwall session …`, the client commands; [`output`] prints their results,
//!   [`values`] reads and prints details, offsets and times.
//! - [`packets`]: `pitwall packets tail` and `send`; [`connections`]: `pitwall connections list`.
//! - [`client`]: what the client commands share: connecting, failures as one line.
//! - [`store`]: `pitwall store check|repair`, on the embedded store of a stopped server.
//! - [`logging`]: the `tracing` subscriber (level and format).

mod cli;
mod client;
mod connections;
mod logging;
mod output;
mod packets;
mod serve;
mod session;
mod store;
mod values;

// Every write allocates and frees the session's strings several times on the writer thread and
// on the runtime's; glibc's allocator spent a fifth of the writer's CPU doing so (see
// BENCHMARKS.md, "Session writes ahead of etcd").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    let parsed = cli::parse();
    logging::init(&parsed.cli.log);
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
    let result = match parsed.command() {
        (cli::Command::Serve(args), Some(matches)) => runtime.block_on(serve::run(*args, &matches)),
        (cli::Command::Serve(_), None) => unreachable!("serve always comes with its matches"),
        (cli::Command::Store(args), _) => return store::run(*args),
        (cli::Command::Packets(args), _) => {
            return client_exit(runtime.block_on(packets::run(*args)));
        }
        (cli::Command::Connections(args), _) => {
            return client_exit(runtime.block_on(connections::run(*args)));
        }
        (cli::Command::Session(args), _) => {
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

/// A client command's exit: 0, or its error on one line with its exit code.
fn client_exit(result: Result<(), client::ClientError>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pitwall: {}", output::escape(&e.to_string()));
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

/// Turns transparent huge pages off for this process. The allocator asks for them, and a write
/// that touched fresh memory then waited for the kernel to clear 2 MiB at once: 6 to 7 ms, about
/// every 100 ms under load, which was the whole of the creates' p99 (see BENCHMARKS.md,
/// "Session writes ahead of etcd"). Nothing depends on it: where the kernel refuses, the pages
/// stay as they were.
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes no memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
