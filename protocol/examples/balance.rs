//! Prints how the decentralized policy balances a skewed cluster, next to the centralized
//! greedy baseline on the same starting state.
//!
//! ```text
//! cargo run -p drift-protocol --example balance
//! cargo run -p drift-protocol --example balance -- <planetlab-day-dir> [nodes] [vms-per-node] [skew]
//! ```
//!
//! Without arguments: synthetic constant demand, several cluster sizes. With a folder of
//! PlanetLab traces (one file per VM, a CPU utilization percentage every 5 minutes; CoMon data
//! as shipped with CloudSim, the workload of Beloglazov & Buyya 2012): one day of 288 ticks,
//! each VM following one trace, for every detector, the centralized baseline, and no balancing
//! at all.

use std::path::Path;

use drift_protocol::policy::{
    parse_trace, simulate, skewed_cluster, Demand, Detector, PolicyConfig, SimConfig, SimMode,
    SkewSpec,
};
use rand::rngs::StdRng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first() {
        None => synthetic(),
        Some(dir) => {
            let num = |i: usize, default: f64| -> Result<f64, Box<dyn std::error::Error>> {
                Ok(match args.get(i) {
                    Some(s) => s.parse()?,
                    None => default,
                })
            };
            traces(
                Path::new(dir),
                num(1, 20.0)? as usize,
                num(2, 10.0)? as usize,
                num(3, 0.3)?,
            )
        }
    }
}

fn synthetic() -> Result<(), Box<dyn std::error::Error>> {
    for (nodes, vms, skew) in [(6, 8, 0.5), (12, 8, 0.5), (24, 10, 0.3), (48, 10, 0.2)] {
        let spec = SkewSpec {
            nodes,
            vms_per_node: vms,
            skew,
            host_mem_mib: 1 << 20,
            ..SkewSpec::default()
        };
        let start = skewed_cluster::<StdRng>(&spec)?;
        println!(
            "{nodes} nodes × {vms} VMs, skew {skew}, start max {}‰",
            start.demands().iter().max().copied().unwrap_or(0)
        );
        for mode in [SimMode::Decentralized, SimMode::Centralized] {
            let cfg = SimConfig {
                mode,
                max_ticks: 1000,
                ..SimConfig::default()
            };
            let (report, _) = simulate::<StdRng>(&start, &cfg)?;
            println!("  {report}");
        }
    }
    Ok(())
}

fn traces(
    dir: &Path,
    nodes: usize,
    vms_per_node: usize,
    skew: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let want = nodes * vms_per_node;
    let mut all = Vec::with_capacity(want);
    for f in files.iter().take(want) {
        let text = std::fs::read_to_string(f)?;
        all.push(parse_trace(&text).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    let spec = SkewSpec {
        nodes,
        vms_per_node,
        skew,
        demand: Demand::Traces(all),
        cpus: 4,
        vm_vcpus: 1,
        host_mem_mib: 1 << 20,
        ..SkewSpec::default()
    };
    let start = skewed_cluster::<StdRng>(&spec)?;
    println!(
        "{} ({} traces): {nodes} nodes × {vms_per_node} VMs, skew {skew}, 288 ticks of 5 min",
        dir.display(),
        want
    );
    let run =
        |label: &str, detector, mode, max_incoming| -> Result<(), Box<dyn std::error::Error>> {
            let cfg = SimConfig {
                policy: PolicyConfig {
                    detector,
                    hysteresis: 1,
                    cooldown_ms: 3_600_000,
                    ..PolicyConfig::default()
                },
                mode,
                max_ticks: 288,
                tick_ms: 300_000,
                max_incoming_per_tick: max_incoming,
                stop_when_balanced: false,
                ..SimConfig::default()
            };
            let (r, _) = simulate::<StdRng>(&start, &cfg)?;
            println!(
                "  {label:<14} migrations {:>4}, overloaded host-ticks {:>5}, refused {:>4}, \
             ping-pong {:>3}, max moves/VM {}",
                r.migrations, r.overloaded_host_ticks, r.refusals, r.ping_pongs, r.max_moves_per_vm
            );
            Ok(())
        };
    run("no balancing", Detector::Static, SimMode::Decentralized, 0)?;
    run("static (THR)", Detector::Static, SimMode::Decentralized, 2)?;
    run("MAD", Detector::mad(), SimMode::Decentralized, 2)?;
    run("IQR", Detector::iqr(), SimMode::Decentralized, 2)?;
    run(
        "LR",
        Detector::local_regression(false),
        SimMode::Decentralized,
        2,
    )?;
    run(
        "LRR",
        Detector::local_regression(true),
        SimMode::Decentralized,
        2,
    )?;
    run("centralized", Detector::Static, SimMode::Centralized, 2)?;
    Ok(())
}
