//! `drift bench ...`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::bench::migrate::{MigrateFigures, MigrateParams, Run};
use crate::bench::transfer::{Leg, TransferFigures};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Gossip: time to full convergence and bytes received per node per second.
    Gossip(GossipArgs),
    /// Stream throughput: plain TCP vs drift's encrypted streams, for the same bytes.
    Transfer(TransferArgs),
    /// Live migration of a sandbox VM between two nodes, in each mode, against baselines.
    Migrate(MigrateBenchArgs),
    /// A QEMU guest migrated QEMU to QEMU directly and through drift's tunnel.
    Qemu(QemuBenchArgs),
}

#[derive(Debug, Args)]
pub struct QemuBenchArgs {
    /// Memory of the guest.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Migrations of each kind (direct and tunnelled, alternating); medians are compared.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Where deploy/guest/build.sh put vmlinuz and initrd.img.
    #[arg(long, env = "DRIFT_GUEST_DIR")]
    pub guest_dir: Option<std::path::PathBuf>,
    /// Give up on any one migration (or boot) after this long.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
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

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Bytes to send over each transport, e.g. 1GiB, 256MiB or 65536.
    #[arg(long, default_value = "1GiB", value_parser = crate::bench::parse_size)]
    pub bytes: u64,
    /// Skip the QUIC leg.
    #[arg(long)]
    pub no_quic: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MigrateBenchArgs {
    /// Memory of the VM.
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: u64,
    /// How fast its workload dirties memory (4 KiB pages), while it migrates.
    #[arg(long, default_value_t = 64.0)]
    pub dirty_mib_per_s: f64,
    /// Also run a hybrid migration.
    #[arg(long)]
    pub hybrid: bool,
    /// Switch over once the remaining pages fit in this downtime (the node's default if unset).
    #[arg(long)]
    pub downtime_limit_ms: Option<u64>,
    /// Give up on any one migration after this long.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    let rt = super::daemon::runtime()?;
    match cmd {
        BenchCommand::Gossip(a) => {
            let f = rt.block_on(crate::bench::gossip(
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
        BenchCommand::Transfer(a) => {
            let f = rt.block_on(crate::bench::transfer::transfer(a.bytes, !a.no_quic))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                print_transfer(&f);
            }
            let intact =
                f.tcp.intact && f.stream.intact && f.quic.as_ref().is_none_or(|q| q.intact);
            Ok(if intact {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        BenchCommand::Qemu(a) => {
            let guest_dir = match a.guest_dir {
                Some(d) => d,
                None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/drift/guest"),
            };
            let f = rt.block_on(crate::bench::qemu::qemu(
                crate::bench::qemu::QemuBenchParams {
                    memory_mib: a.memory_mib,
                    runs: a.runs,
                    guest_dir,
                    timeout: a.timeout,
                },
            ))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                print_qemu(&f);
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Migrate(a) => {
            let f = rt.block_on(crate::bench::migrate::migrate(MigrateParams {
                memory_mib: a.memory_mib,
                dirty_mib_per_s: a.dirty_mib_per_s,
                hybrid: a.hybrid,
                downtime_limit_ms: a.downtime_limit_ms,
                timeout: a.timeout,
            }))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                print_migrate(&f);
            }
            let ok = [&f.baseline, &f.precopy, &f.postcopy]
                .into_iter()
                .chain(f.hybrid.as_ref())
                .all(|r| r.outcome == "committed" && r.verified_clean);
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn print_qemu(f: &crate::bench::qemu::QemuFigures) {
    println!(
        "qemu, a {} MiB guest ({}), {} pre-copy migrations of each kind, medians",
        f.memory_mib, f.accel, f.runs
    );
    let line = |name: &str, r: &crate::bench::qemu::QemuRun| {
        println!(
            "  {name:<34} total {:>8.1} ms  downtime {:>7.1} ms  {:>7.1} MiB/s  ({:.0} MiB)",
            r.total_ms,
            r.downtime_ms,
            r.throughput_mib_per_s,
            r.bytes as f64 / MIB
        )
    };
    line("QEMU to QEMU, unix socket (baseline)", &f.direct_median);
    line("through drift (tunnelled, encrypted)", &f.tunnelled_median);
    let (d, t) = (&f.direct_median, &f.tunnelled_median);
    println!(
        "  CPU per MiB moved: baseline {:.1} ms ({:.1} cores busy); through drift {:.1} ms \
         ({:.1} cores busy), of which drift's two tunnel ends {:.1} ms",
        d.machine_cpu_ms_per_mib,
        d.busy_cores,
        t.machine_cpu_ms_per_mib,
        t.busy_cores,
        t.drift_cpu_ms_per_mib
    );
    println!(
        "  total {:.2}x direct (target <= 1.15x), downtime {:+.1} ms (target <= +20 ms), \
         throughput {:.2}x",
        f.total_ratio, f.downtime_delta_ms, f.throughput_ratio
    );
}

fn leg_line(name: &str, leg: &Leg) -> String {
    format!(
        "  {name:<28} {:>9.1} MiB/s  ({:.2} s)  {}",
        leg.mib_per_s,
        leg.seconds,
        if leg.intact {
            "intact"
        } else {
            "CORRUPT: bytes or digest differ"
        }
    )
}

fn print_transfer(f: &TransferFigures) {
    println!(
        "transfer, {:.0} MiB in {} KiB writes over 127.0.0.1 (receiver counts and hashes every byte)",
        f.bytes as f64 / MIB,
        f.write_bytes / 1024
    );
    println!("{}", leg_line("plain TCP (baseline)", &f.tcp));
    println!(
        "{}  ->  {:.2}x plain TCP (target >= {:.2}x)",
        leg_line("drift stream TCP+Noise+Yamux", &f.stream),
        f.stream_ratio,
        f.target_ratio
    );
    match (&f.quic, f.quic_ratio, &f.quic_error) {
        (Some(q), Some(r), _) => println!(
            "{}  ->  {r:.2}x plain TCP",
            leg_line("drift stream QUIC", q)
        ),
        (_, _, Some(e)) => println!("  drift stream QUIC            not measured: {e}"),
        _ => {}
    }
    println!(
        "  receiver hashing alone       {:>9.1} MiB/s",
        f.hash_mib_per_s
    );
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} ms"))
}

fn run_line(r: &Run) -> String {
    format!(
        "  {:<10} {:<9} total {:>9}  downtime {:>9}  rounds {:>2}  sent {:>7.1} MiB = {:.2}x memory  {:>7.1} MiB/s ({:.2}x stream)  {}",
        r.label,
        r.outcome,
        r.total_ms.map_or("-".into(), |t| format!("{:.2} s", t / 1e3)),
        opt_ms(r.downtime_ms),
        r.rounds,
        r.bytes_sent as f64 / MIB,
        r.bytes_ratio,
        r.throughput_bytes_per_s / MIB,
        r.throughput_vs_stream,
        match &r.verify {
            Some(v) if r.verified_clean => format!("verified clean ({} pages written)", v.written),
            Some(v) => format!("VERIFY FAILED: {} bad pages", v.bad_count),
            None => format!("not verified: {}", r.detail),
        }
    )
}

fn print_migrate(f: &MigrateFigures) {
    println!(
        "migrate, {} MiB VM (every page written), workload dirtying {:.0} MiB/s ({} pages/s), node-1 -> node-2 on 127.0.0.1",
        f.memory_mib, f.dirty_mib_per_s, f.dirty_pages_per_s
    );
    println!("{}", leg_line("raw drift stream", &f.stream));
    println!("{}   (idle workload: lower bound)", run_line(&f.baseline));
    println!(
        "{}   target downtime <= {:.0} ms, sent <= {:.2}x",
        run_line(&f.precopy),
        f.targets.precopy_downtime_ms,
        f.targets.bytes_ratio
    );
    println!(
        "{}   target downtime <= {:.0} ms",
        run_line(&f.postcopy),
        f.targets.postcopy_downtime_ms
    );
    if let Some(h) = &f.hybrid {
        println!("{}", run_line(h));
    }
    if let (Some(b), Some(p)) = (f.baseline.total_ms, f.precopy.total_ms) {
        println!(
            "  pre-copy vs idle baseline: {:.2}x the time, {:.2}x the bytes",
            p / b.max(1e-9),
            f.precopy.bytes_sent as f64 / (f.baseline.bytes_sent as f64).max(1.0)
        );
    }
}
