//! `drift sim`: a PlanetLab day replayed on the benchmark's data center (Beloglazov & Buyya
//! 2012: 800 hosts, the paper's power models, VM types and migration model), once per policy,
//! with the figures the field compares (energy, SLATAH, PDM, SLAV, ESV, migrations, host
//! shutdowns, active hosts). The model, the policies and the metrics are pure code in
//! [`drift_protocol::dcsim`]; this module reads the traces, runs the policies with a progress
//! bar and draws the plot ([`plot`]).

pub mod plot;

use std::path::Path;

use anyhow::{bail, Context};
use drift_protocol::dcsim::{run, run_with, Drift, Policy, Report, Scenario, Trace};

/// The most trace files a day may hold (the shipped days hold 898 and 1052).
pub const MAX_TRACES: usize = 100_000;
/// The largest trace file read (288 lines of a few bytes each).
const MAX_TRACE_BYTES: u64 = 1 << 20;

/// How the traces' files are ordered. VM `i` of `n` gets VM type `i / ceil(n / 4)`, so the
/// order decides each VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The directory's own order (`readdir`), which the reference simulator's
    /// `File.listFiles` uses: it reproduces the reference figures on the copy they came from.
    Directory,
    /// Byte order of the file names: the same on every machine.
    Sorted,
}

/// Reads every file of a trace directory as one VM's trace.
pub fn load_traces(dir: &Path, order: Order) -> anyhow::Result<Vec<Trace>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading trace directory {dir:?}"))?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("listing {dir:?}"))?;
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            names.push(e.file_name());
        }
        if names.len() > MAX_TRACES {
            bail!("{dir:?} holds more than {MAX_TRACES} trace files");
        }
    }
    if names.is_empty() {
        bail!("{dir:?} holds no trace file (one file per VM, one CPU % per line)");
    }
    if order == Order::Sorted {
        names.sort();
    }
    let mut traces = Vec::with_capacity(names.len());
    for name in &names {
        let path = dir.join(name);
        let len = std::fs::metadata(&path)
            .with_context(|| format!("reading {path:?}"))?
            .len();
        if len > MAX_TRACE_BYTES {
            bail!("{path:?} is {len} bytes: a trace is at most {MAX_TRACE_BYTES}");
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path:?}"))?;
        let trace = Trace::parse(&name.to_string_lossy(), &text)
            .with_context(|| format!("trace {path:?}"))?;
        traces.push(trace);
    }
    Ok(traces)
}

/// A policy `drift sim` runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SimPolicy {
    /// A published one (or a baseline), centralized as published.
    Published(Policy),
    /// drift's own ([`drift_protocol::policy::consolidate`]): every host on its own from a
    /// table one report old, as the nodes run it.
    DriftDecentralized,
    /// drift's own rules with one fresh view, in sequence: what decentralization costs.
    DriftCentralized,
}

impl SimPolicy {
    /// Its name in tables and plots.
    pub fn name(&self) -> String {
        match self {
            Self::Published(p) => p.name(),
            Self::DriftDecentralized => "drift-decentralized".into(),
            Self::DriftCentralized => "drift-centralized".into(),
        }
    }

    /// Replays the day under this policy.
    pub fn run(
        &self,
        scenario: &Scenario,
        traces: &[Trace],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Report {
        match self {
            Self::Published(p) => run(scenario, traces, *p, progress),
            Self::DriftDecentralized => {
                run_with(scenario, traces, &mut Drift::decentralized(), progress)
            }
            Self::DriftCentralized => {
                run_with(scenario, traces, &mut Drift::centralized(), progress)
            }
        }
    }
}

/// Every policy `drift sim` knows, in the order it runs them.
pub fn all_policies() -> Vec<SimPolicy> {
    Policy::BASELINES
        .into_iter()
        .chain(Policy::PUBLISHED)
        .map(SimPolicy::Published)
        .chain([SimPolicy::DriftDecentralized, SimPolicy::DriftCentralized])
        .collect()
}

/// The policy named `name` (case does not matter), or an error listing the names.
pub fn policy_named(name: &str) -> anyhow::Result<SimPolicy> {
    let all = all_policies();
    all.iter()
        .find(|p| p.name().eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            let names: Vec<String> = all.iter().map(|p| p.name()).collect();
            anyhow::anyhow!("no policy {name:?}; known: {}", names.join(", "))
        })
}

/// Runs every policy over the traces; `progress(policy index, step, steps)` after each step.
pub fn run_all(
    scenario: &Scenario,
    traces: &[Trace],
    policies: &[SimPolicy],
    progress: &mut dyn FnMut(usize, usize, usize),
) -> Vec<Report> {
    policies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.run(scenario, traces, &mut |step, steps| {
                progress(i, step, steps)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    #[test]
    fn a_trace_directory_loads_in_the_order_asked_and_bad_files_are_named() {
        let tmp = std::env::temp_dir().join(format!("drift-sim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let ok = tmp.join("ok");
        day(&ok, &[("b vm", "10\n20\n30\n"), ("a", "0\n5\n100\n")]);
        let sorted = load_traces(&ok, Order::Sorted).unwrap();
        let names: Vec<&str> = sorted.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b vm"]);
        assert_eq!(load_traces(&ok, Order::Directory).unwrap().len(), 2);

        let bad = tmp.join("bad");
        day(&bad, &[("x", "10\nten\n")]);
        let err = format!("{:#}", load_traces(&bad, Order::Sorted).unwrap_err());
        assert!(err.contains("trace x, line 2"), "{err}");

        let empty = tmp.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(load_traces(&empty, Order::Sorted).is_err());
        assert!(load_traces(&tmp.join("missing"), Order::Sorted).is_err());
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn policies_are_found_by_name_and_an_unknown_one_is_refused_with_the_list() {
        assert_eq!(
            policy_named("thr-mmt-0.8").unwrap(),
            SimPolicy::Published(Policy::Thr { threshold: 0.8 })
        );
        assert_eq!(
            policy_named("drift-decentralized").unwrap(),
            SimPolicy::DriftDecentralized
        );
        let err = policy_named("best-fit").unwrap_err().to_string();
        assert!(
            err.contains("LR-MMT-1.2") && err.contains("drift-centralized"),
            "{err}"
        );
    }
}
