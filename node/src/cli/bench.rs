//! `drift bench ...`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Gossip: time to full convergence and bytes received per node per second.
    Gossip(GossipArgs),
}

#[derive(Debug, Args)]
pub struct GossipArgs {
    /// Number of in-process nodes.
    #[arg(long, default_value_t = 10)]
    pub nodes: usize,
    /// Report interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Measurement window after convergence.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Give up if not converged by then.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Gossip(a) => {
            let f = super::daemon::runtime()?.block_on(crate::bench::gossip(
                a.nodes, a.interval, a.window, a.timeout,
            ))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                println!(
                    "gossip, {} nodes, one report per {} ms per node",
                    f.nodes, f.interval_ms
                );
                println!("  convergence        {} ms", f.convergence_ms);
                println!("  report frame       {} bytes", f.report_frame_bytes);
                println!(
                    "  received per node  {:.0} B/s mean, {:.0} B/s max",
                    f.recv_bytes_per_node_per_s_mean, f.recv_bytes_per_node_per_s_max
                );
                println!(
                    "  floor (N x size x rate) {:.0} B/s  ->  overhead {:.2}x",
                    f.floor_bytes_per_node_per_s, f.overhead_ratio
                );
                println!(
                    "  reports accepted   {:.1} per node per s",
                    f.reports_accepted_per_node_per_s
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
