//! `drift sim`: arguments, the progress bar and the table.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use drift_protocol::dcsim::{Report, Scenario};

use crate::sim::{all_policies, load_traces, plot::plot, policy_named, run_all, Order};

#[derive(Debug, Args)]
pub struct SimArgs {
    /// A day of traces: one file per VM, one CPU % per line (288 lines of 5 minutes), e.g. a
    /// day of the PlanetLab workload.
    #[arg(long)]
    pub trace: PathBuf,
    /// Hosts in the data center (half HP ProLiant G4, half G5, alternating).
    #[arg(long, default_value_t = 800)]
    pub hosts: usize,
    /// A policy to run (repeatable): NPA, DVFS, THR-MMT-0.8, IQR-MMT-1.5, MAD-MMT-2.5,
    /// LR-MMT-1.2 (the published ones), drift-decentralized, drift-centralized (drift's own).
    /// Default: all of them.
    #[arg(long = "policy")]
    pub policies: Vec<String>,
    /// Take the trace files in byte order of their names rather than the directory's own
    /// order (the reference simulator's; it sets which VM gets which size).
    #[arg(long)]
    pub sorted: bool,
    /// Keep VMs whose demand drops to 0 (the reference removes them as finished).
    #[arg(long)]
    pub keep_idle: bool,
    /// Draw active hosts, power and overloaded hosts over the day, one line per policy, into
    /// this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print the reports (with their per-step series) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The most hosts a simulated data center may have.
const MAX_HOSTS: usize = 100_000;

pub(crate) fn sim(a: SimArgs) -> anyhow::Result<ExitCode> {
    if a.hosts == 0 || a.hosts > MAX_HOSTS {
        anyhow::bail!("--hosts must be 1 to {MAX_HOSTS}");
    }
    let policies = if a.policies.is_empty() {
        all_policies()
    } else {
        a.policies
            .iter()
            .map(|n| policy_named(n))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let order = if a.sorted {
        Order::Sorted
    } else {
        Order::Directory
    };
    let traces = load_traces(&a.trace, order)?;
    let mut scenario = Scenario::paper(a.hosts);
    scenario.drop_idle_vms = !a.keep_idle;

    let bar = if a.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<20} [{bar:40}] {pos}/{len} steps")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let names: Vec<String> = policies.iter().map(|p| p.name()).collect();
    let started = std::time::Instant::now();
    let reports = run_all(&scenario, &traces, &policies, &mut |i, step, steps| {
        if bar.length() != Some(steps as u64) {
            bar.set_length(steps as u64);
        }
        bar.set_message(names[i].clone());
        bar.set_position(step as u64);
    });
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();

    if let Some(path) = &a.plot {
        let title = format!(
            "{}: {} VMs on {} hosts",
            a.trace.display(),
            traces.len(),
            a.hosts
        );
        plot(path, &title, &reports)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print_table(&a, traces.len(), &reports, secs);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(a: &SimArgs, vms: usize, reports: &[Report], secs: f64) {
    println!(
        "{}: {vms} VMs, {} hosts, {} policies in {secs:.1} s",
        a.trace.display(),
        a.hosts,
        reports.len()
    );
    println!(
        "{:<20} {:>10} {:>8} {:>8} {:>9} {:>9} {:>10} {:>9} {:>6} {:>7}",
        "POLICY",
        "ENERGY kWh",
        "SLATAH%",
        "PDM%",
        "SLAV%",
        "ESV e-3",
        "MIGRATIONS",
        "SHUTDOWNS",
        "PEAK",
        "MEAN"
    );
    for r in reports {
        println!(
            "{:<20} {:>10.2} {:>8.3} {:>8.4} {:>9.6} {:>9.4} {:>10} {:>9} {:>6} {:>7.1}",
            r.policy,
            r.energy_kwh,
            r.slatah * 100.0,
            r.pdm * 100.0,
            r.slav * 100.0,
            r.esv * 1000.0,
            r.migrations,
            r.host_shutdowns,
            r.peak_active_hosts,
            r.mean_active_hosts
        );
    }
    if let Some(p) = &a.plot {
        println!("plot: {}", p.display());
    }
}
