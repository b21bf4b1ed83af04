//! The command line: one module per subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod audit;
mod bench;
mod daemon;
mod decisions;
mod doctor;
mod keys;
mod migrate;
mod roster;
mod shell;
mod sim;
mod table;
mod vm;

pub(crate) use daemon::{render_table, runtime as daemon_runtime};

/// drift: decentralized, secure live migration of virtual machines.
#[derive(Debug, Parser)]
#[command(name = "drift", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `drift=debug`.
    #[arg(long, global = true, env = "DRIFT_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new ed25519 key file (mode 0600) for a node or the cluster admin.
    Keygen(keys::KeygenArgs),
    /// Print the public id of a key file.
    Id(keys::IdArgs),
    /// Manage the admin-signed roster of cluster members.
    #[command(subcommand)]
    Roster(roster::RosterCommand),
    /// Run the node daemon.
    Run(daemon::RunArgs),
    /// Show the local daemon's state and counters.
    Status(daemon::ReadArgs),
    /// List the daemon's connected peers.
    Peers(daemon::ReadArgs),
    /// Print the daemon's Prometheus metrics (what `GET /metrics` on its socket serves).
    Metrics(daemon::Target),
    /// Show the peer load table: one row per roster host.
    Table(daemon::TableArgs),
    /// Run a whole cluster on this machine.
    Testnet(crate::testnet::TestnetArgs),
    /// Move a VM of this node to another node, live.
    Migrate(migrate::MigrateArgs),
    /// Running and recent migrations of this node.
    Migrations(migrate::MigrationsArgs),
    /// The balancing autopilot's newest decisions: why this VM, why this target, or why nothing.
    Decisions(decisions::DecisionsArgs),
    /// List the node's VMs.
    Vms(vm::VmsArgs),
    /// Manage the node's VMs.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Run one sandbox VM (started by the node; not for direct use).
    #[command(hide = true)]
    Vmm(vm::VmmArgs),
    /// Read and verify the node's signed, hash-chained audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Benchmarks that print figures next to a baseline.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Replay a PlanetLab day on the placement benchmark's 800-host data center, once per
    /// policy: energy, SLA violations and migrations side by side.
    Sim(sim::SimArgs),
    /// Check this host's setup: key, roster, state directory, ports, QEMU and KVM, image
    /// directories, and (with a running daemon) this host's clock against its peers'.
    Doctor(doctor::DoctorArgs),
    /// Print a shell completion script: `drift completions bash > /etc/bash_completion.d/drift`.
    Completions(shell::CompletionsArgs),
    /// Write the man pages (`drift.1` to stdout, or every page with `--out DIR`).
    Man(shell::ManArgs),
}

/// Logs go to stderr, so command output on stdout stays scriptable.
pub fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen(args) => keys::keygen(args),
        Command::Id(args) => keys::id(args),
        Command::Roster(cmd) => roster::run(cmd),
        Command::Run(args) => daemon::run(args),
        Command::Status(args) => daemon::status(args),
        Command::Peers(args) => daemon::peers(args),
        Command::Metrics(args) => daemon::metrics(args),
        Command::Table(args) => daemon::table(args),
        Command::Testnet(args) => crate::testnet::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Sim(args) => sim::sim(args),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Vms(args) => vm::vms(args),
        Command::Migrate(args) => migrate::migrate(args),
        Command::Migrations(args) => migrate::migrations(args),
        Command::Decisions(args) => decisions::decisions(args),
        Command::Vm(cmd) => vm::run(cmd),
        Command::Vmm(args) => vm::vmm(args),
        Command::Doctor(args) => doctor::doctor(args),
        Command::Completions(args) => shell::completions(args),
        Command::Man(args) => shell::man(args),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
