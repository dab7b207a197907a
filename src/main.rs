//! The `verigate` binary: parse the command line, run it. Everything else is in the library.

use clap::Parser;

/// mimalloc: under load glibc malloc took ~20% of CPU (profiled with `perf record`), much of
/// it waiting on arena locks; see benches/README.md for the before/after figures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = verigate::cli::Cli::parse();
    match verigate::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verigate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
