//! The `verigate` binary: parse the command line, run it. Everything else is in the library.

use clap::Parser;

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
