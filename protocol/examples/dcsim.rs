//! Replays one PlanetLab day on the paper's data center under every published policy and
//! prints the figures of Beloglazov & Buyya 2012 (energy, SLATAH, PDM, SLAV, ESV, migrations,
//! host shutdowns), to compare with CloudSim 3.0.3's.
//!
//! ```text
//! cargo run --release -p drift-protocol --example dcsim -- <planetlab-day-dir> [hosts] [--json] [--sorted] [--keep-idle] [--drift]
//! ```
//!
//! VM `i` gets type `i / ceil(n / 4)`, so the order of the files matters (±8 % on energy).
//! By default they are taken in the directory's own order, as CloudSim's `File.listFiles`
//! does; on the shipped copy of the evaluation data this reproduces CloudSim 3.0.3's
//! published figures exactly. `--sorted` takes them in byte order of their names (portable, deterministic).
//! `--keep-idle` keeps VMs whose demand drops to 0 (CloudSim removes them).
//!
//! After the published policies it runs drift's own, `drift-decentralized` and
//! `drift-centralized` (see `dcsim::drift`), and prints on stderr what their hosts decided and
//! how their targets answered. `--drift` runs only those two. Environment, for experiments:
//! `DRIFT_PARAMS` (a JSON `policy::consolidate::Params`, every field), `DRIFT_ROUNDS` (offer
//! rounds per step, 10), `DRIFT_LAG` (table age in steps, 1), `DRIFT_SEED` (1).

use std::time::Instant;

use drift_protocol::dcsim::{run_with, Drift, DriftMode, Policy, Report, Scenario, Trace};
use drift_protocol::policy::consolidate::Params;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args.first().ok_or(
        "usage: dcsim <planetlab-day-dir> [hosts] [--json] [--sorted] [--keep-idle] [--drift]",
    )?;
    let hosts: usize = match args.get(1).filter(|a| !a.starts_with("--")) {
        Some(h) => h.parse()?,
        None => 800,
    };
    let json = args.iter().any(|a| a == "--json");
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    // CloudSim numbers the VMs in `File.listFiles` order, the directory's own order (readdir),
    // which sets each VM's type; `--sorted` uses byte order of the names instead.
    if args.iter().any(|a| a == "--sorted") {
        names.sort();
    }
    let mut traces = Vec::with_capacity(names.len());
    for name in &names {
        let path = std::path::Path::new(dir).join(name);
        let text = std::fs::read_to_string(&path)?;
        traces.push(Trace::parse(&name.to_string_lossy(), &text)?);
    }
    let mut scenario = Scenario::paper(hosts);
    scenario.drop_idle_vms = !args.iter().any(|a| a == "--keep-idle");
    println!("{dir}: {} VMs, {hosts} hosts", traces.len());
    println!(
        "{:<20} {:>10} {:>8} {:>8} {:>9} {:>9} {:>10} {:>9} {:>7} {:>6} {:>8} {:>7}",
        "policy",
        "energy kWh",
        "SLATAH%",
        "PDM%",
        "SLAV%",
        "ESV e-3",
        "migrations",
        "shutdowns",
        "peak",
        "mean",
        "finished",
        "secs"
    );
    let only_drift = args.iter().any(|a| a == "--drift");
    if !only_drift {
        for policy in Policy::BASELINES.into_iter().chain(Policy::PUBLISHED) {
            let started = Instant::now();
            let r = run_with(&scenario, &traces, &mut policy.clone(), &mut |_, _| {});
            print_report(&r, started.elapsed().as_secs_f64(), json)?;
        }
    }
    // DRIFT_PARAMS: a JSON `consolidate::Params` to try instead of the defaults.
    let params: Params = match std::env::var("DRIFT_PARAMS") {
        Ok(j) => serde_json::from_str(&j)?,
        Err(_) => Params::default(),
    };
    // DRIFT_ROUNDS, DRIFT_LAG, DRIFT_SEED: offer rounds per step, table age in steps, RNG seed.
    let rounds: usize = std::env::var("DRIFT_ROUNDS").map_or(Ok(10), |r| r.parse())?;
    let lag_steps: usize = std::env::var("DRIFT_LAG").map_or(Ok(1), |r| r.parse())?;
    let seed: u64 = std::env::var("DRIFT_SEED").map_or(Ok(1), |r| r.parse())?;
    // Decentralized (every row one report interval old) and centralized.
    for mode in [
        DriftMode::Decentralized { lag_steps, rounds },
        DriftMode::Centralized,
    ] {
        let mut drift = Drift::new(mode, params, seed);
        let started = Instant::now();
        let r = run_with(&scenario, &traces, &mut drift, &mut |_, _| {});
        print_report(&r, started.elapsed().as_secs_f64(), json)?;
        eprintln!("{}: {:?}", r.policy, drift.stats());
    }
    Ok(())
}

fn print_report(r: &Report, secs: f64, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>10.2} {:>8.2} {:>8.4} {:>9.6} {:>9.4} {:>10} {:>9} {:>7} {:>6.1} {:>8} {:>7.2}",
        r.policy,
        r.energy_kwh,
        r.slatah * 100.0,
        r.pdm * 100.0,
        r.slav * 100.0,
        r.esv * 1000.0,
        r.migrations,
        r.host_shutdowns,
        r.peak_active_hosts,
        r.mean_active_hosts,
        r.vms_finished,
        secs
    );
    Ok(())
}
