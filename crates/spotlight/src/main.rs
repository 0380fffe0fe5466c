//! `spotlight`: clap → config → telemetry → role. Everything else lives in the libraries.

mod cli;
mod commands;
mod settings;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

/// Every role allocates per frame (protobuf messages, HTTP/2 buffers); glibc's allocator was
/// about a third of the coordinator's CPU in a profile under load, mimalloc much less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
