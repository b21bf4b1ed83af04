//! `drift`: the daemon and its command-line tools. See the crate docs of `drift_node`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = drift_node::cli::Cli::parse();
    drift_node::cli::init_tracing(&cli);
    match drift_node::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("drift: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
