//! The `verigate` binary: parse the command line, run it. Everything else is in the library.

use clap::Parser;

/// mimalloc: under load glibc malloc took ~20% of CPU (profiled with `perf record`), much of
/// it waiting on arena locks; see benches/README.md for the before/after figures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("verigate: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

/// mimalloc asks for transparent huge pages (`MADV_HUGEPAGE`) on the regions it maps; with the
/// common `madvise` THP setting each touched 2 MiB region then costs a whole huge page: idle
/// RSS was 24 MB, 12 MB of it in huge pages, and 13 MB without them. A verification gateway
/// has no use for huge pages, so the process opts out before the runtime allocates much.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes integer arguments only and changes a flag of
    // this process; it touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

async fn run() -> std::process::ExitCode {
    let cli = verigate::cli::Cli::parse();
    match verigate::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verigate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
