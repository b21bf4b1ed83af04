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
    /// Throughput and CPU per GiB: plain TCP, rustls, drift's streams and data plane.
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
    /// Post-copy (QEMU's `postcopy-ram`, switched to once the first bytes moved) instead of
    /// pre-copy, both kinds.
    #[arg(long)]
    pub postcopy: bool,
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
    /// Data connections of the many-connection data-plane leg (at least 2). Default: as
    /// `data.connections` (this host's cores, at most 8).
    #[arg(long)]
    pub connections: Option<u32>,
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
    /// Skip the cases of a VM that dirties memory faster than the link carries it.
    #[arg(long)]
    pub no_outrun: bool,
    /// Memory of the VM of those cases.
    #[arg(long, default_value_t = crate::bench::migrate::OUTRUN_MEMORY_MIB)]
    pub outrun_memory_mib: u64,
    /// Also run pre-copy of a VM whose pages are this percent random (the rest compresses),
    /// behind a 128 MiB/s link, plain and with compression.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub compression: Option<u8>,
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
            let f = rt.block_on(crate::bench::transfer::transfer(
                a.bytes,
                !a.no_quic,
                a.connections,
            ))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                print_transfer(&f);
            }
            let intact = [&f.tcp, &f.rustls, &f.stream, &f.data_1, &f.data_k]
                .into_iter()
                .chain(f.quic.as_ref())
                .all(|leg| leg.intact);
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
                    postcopy: a.postcopy,
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
                outrun_memory_mib: (!a.no_outrun).then_some(a.outrun_memory_mib),
                compression_random_pct: a.compression,
                downtime_limit_ms: a.downtime_limit_ms,
                timeout: a.timeout,
            }))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                print_migrate(&f);
            }
            let moved = [&f.baseline, &f.precopy, &f.postcopy]
                .into_iter()
                .chain(f.hybrid.as_ref())
                .chain(&f.compression)
                .all(|r| r.outcome == "committed" && r.verified_clean);
            // An outrun VM ends where its fallback says, clean, never switched over on an
            // expected downtime above its ceiling (the measured one is printed: it depends on
            // what else this machine does).
            let outrun = f.outrun.iter().all(|r| {
                let (expected, decided) = if r.fallback.starts_with("abort") {
                    ("resumed", true)
                } else if r.fallback.starts_with("postcopy") {
                    ("committed", true)
                } else {
                    let max = crate::bench::migrate::OUTRUN_MAX_DOWNTIME_MS as f64;
                    ("committed", r.expected_downtime_ms <= max)
                };
                r.outcome == expected && r.verified_clean && decided
            });
            let ok = moved && outrun;
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
        "qemu, a {} MiB guest ({}), {} {} migrations of each kind, medians (downtime: QEMU's own)",
        f.memory_mib, f.accel, f.runs, f.mode
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
        "  {name:<32} {:>9.1} MiB/s  ({:.2} s)  {}",
        leg.mib_per_s,
        leg.seconds,
        if leg.intact {
            "intact"
        } else {
            "CORRUPT: bytes or digest differ"
        }
    )
}

/// One leg of `drift bench transfer`: rate, against plain TCP, and each side's CPU per GiB.
fn transfer_line(name: &str, leg: &Leg, tcp: &Leg) -> String {
    let cpu = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.2}"));
    format!(
        "  {name:<32} {:>9.1} MiB/s  {:>5.2}x  {:>6.2} s  {:>6} {:>6}  {}",
        leg.mib_per_s,
        leg.bytes_per_s / tcp.bytes_per_s.max(1e-9),
        leg.seconds,
        cpu(leg.cpu_send_s_per_gib),
        cpu(leg.cpu_recv_s_per_gib),
        if leg.intact {
            "intact"
        } else {
            "CORRUPT: bytes or digest differ"
        }
    )
}

fn target_line(what: &str, ratio: f64, target: f64) -> String {
    format!(
        "  {what:<48} {ratio:>5.2}x  (target >= {target:.2}x)  {}",
        if ratio >= target { "met" } else { "MISSED" }
    )
}

fn print_transfer(f: &TransferFigures) {
    println!(
        "transfer, {:.0} MiB in {} KiB writes over 127.0.0.1; sender and receiver on runtimes of \
         {} threads each; the receiver checks every byte",
        f.bytes as f64 / MIB,
        f.write_bytes / 1024,
        f.worker_threads_per_side
    );
    println!(
        "  {:<32} {:>15}  {:>6}  {:>8}  {:>13}",
        "", "", "x TCP", "time", "CPU s/GiB"
    );
    println!(
        "  {:<32} {:>15}  {:>6}  {:>8}  {:>6} {:>6}",
        "", "", "", "", "send", "recv"
    );
    let k = f.connections;
    let rustls_name = match &f.rustls.cipher {
        Some(c) => format!("rustls {c}"),
        None => "rustls".to_string(),
    };
    let data_k = format!("drift data plane, {k} connections");
    let mut legs = vec![
        ("plain TCP (baseline)", &f.tcp),
        (rustls_name.as_str(), &f.rustls),
        ("libp2p stream TCP+Noise+Yamux", &f.stream),
        ("drift data plane, 1 connection", &f.data_1),
        (data_k.as_str(), &f.data_k),
    ];
    if let Some(q) = &f.quic {
        legs.push(("libp2p stream QUIC", q));
    }
    for (name, leg) in legs {
        println!("{}", transfer_line(name, leg, &f.tcp));
    }
    if let (None, Some(e)) = (&f.quic, &f.quic_error) {
        println!("  {:<32} not measured: {e}", "libp2p stream QUIC");
    }
    println!(
        "  {:<32} {:>9.1} MiB/s",
        "receiver hashing alone, 1 core", f.hash_mib_per_s
    );
    println!("targets:");
    println!(
        "{}",
        target_line(
            "data plane, 1 connection vs rustls",
            f.data_1_vs_rustls,
            f.target_data_1_vs_rustls
        )
    );
    println!(
        "{}",
        target_line(
            &format!("data plane, {k} connections vs plain TCP"),
            f.data_k_vs_tcp,
            f.target_data_k_vs_tcp
        )
    );
    println!(
        "{}",
        target_line(
            "data plane, 1 connection vs libp2p stream",
            f.data_1_vs_stream,
            f.target_data_vs_stream
        )
    );
    println!(
        "{}",
        target_line(
            &format!("data plane, {k} connections vs libp2p stream"),
            f.data_k_vs_stream,
            f.target_data_vs_stream
        )
    );
    println!(
        "{}",
        target_line("libp2p stream vs plain TCP", f.stream_ratio, f.target_ratio)
    );
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} ms"))
}

fn run_line(r: &Run) -> String {
    format!(
        "  {:<10} {:<9} total {:>9}  downtime {:>9}  rounds {:>2}  sent {:>7.1} MiB = {:.2}x memory  {:>7.1} MiB/s ({:.2}x stream, {:.2}x data plane)  {}",
        r.label,
        r.outcome,
        r.total_ms.map_or("-".into(), |t| format!("{:.2} s", t / 1e3)),
        opt_ms(r.downtime_ms),
        r.rounds,
        r.bytes_sent as f64 / MIB,
        r.bytes_ratio,
        r.throughput_bytes_per_s / MIB,
        r.throughput_vs_stream,
        r.throughput_vs_data,
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
    println!("{}", leg_line(&f.data.transport, &f.data));
    let (idle, target) = (f.baseline.throughput_vs_data, f.targets.idle_vs_data);
    println!(
        "{}   (idle workload: lower bound) target >= {target:.2}x data plane: {}",
        run_line(&f.baseline),
        if idle >= target { "met" } else { "MISSED" }
    );
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
    if !f.outrun.is_empty() {
        println!(
            "outrun: a {} MiB VM dirtying as fast as it can behind a link capped at half that, max downtime {} ms",
            f.outrun_memory_mib.unwrap_or_default(),
            crate::bench::migrate::OUTRUN_MAX_DOWNTIME_MS,
        );
    }
    for r in &f.outrun {
        println!(
            "{}   cap {:.0} MiB/s, throttle {} %{}",
            run_line(r),
            r.cap_bytes_per_s.unwrap_or_default() as f64 / MIB,
            r.throttle_pct,
            r.not_converging
                .as_ref()
                .map_or(String::new(), |w| format!("; {w}"))
        );
    }
    if let [plain, packed] = &f.compression[..] {
        println!(
            "compression: pre-copy of a VM whose pages are partly random (the rest compresses), link capped at {} MiB/s",
            crate::bench::migrate::COMPRESSION_CAP_MIB_PER_S
        );
        println!("{}", run_line(plain));
        println!("{}", run_line(packed));
        if let (Some(a), Some(b)) = (plain.total_ms, packed.total_ms) {
            println!(
                "  packed vs plain: {:.2}x the bytes, {:.2}x the time",
                packed.bytes_sent as f64 / (plain.bytes_sent as f64).max(1.0),
                b / a.max(1e-9)
            );
        }
    }
    if let (Some(b), Some(p)) = (f.baseline.total_ms, f.precopy.total_ms) {
        println!(
            "  pre-copy vs idle baseline: {:.2}x the time, {:.2}x the bytes",
            p / b.max(1e-9),
            f.precopy.bytes_sent as f64 / (f.baseline.bytes_sent as f64).max(1.0)
        );
    }
}
