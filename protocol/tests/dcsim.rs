//! The data-center simulator on small synthetic clusters: energy, SLATAH and PDM accounting,
//! trace parsing, VM conservation and determinism. Fast; reads no file.

use drift_protocol::dcsim::{
    run, run_with, HostType, Plan, Planner, Policy, PowerModel, Report, Scenario, Trace,
    TraceError, View, VmType,
};
use proptest::prelude::*;

/// `hosts` G4 hosts and one VM type of `vm_mips` MIPS, 613 MB.
fn small(hosts: usize, vm_mips: f64) -> Scenario {
    let mut s = Scenario::paper(hosts);
    s.host_types.truncate(1);
    s.vm_types = vec![VmType {
        mips: vm_mips,
        ram_mb: 613,
    }];
    s
}

fn constant(name: &str, u: f64, samples: usize) -> Trace {
    Trace::from_fractions(name, std::iter::repeat_n(u, samples))
}

fn quiet(s: &Scenario, traces: &[Trace], p: Policy) -> Report {
    run(s, traces, p, &mut |_, _| {})
}

const THR: Policy = Policy::Thr { threshold: 0.8 };

#[test]
fn an_idle_active_host_draws_its_zero_load_power() {
    // One host, one VM asking for (almost) nothing: the host is on at its 0 % power the whole
    // metered time, from the first step to the last. (At exactly 0 % CloudSim, and this model,
    // count a host as off: it draws nothing.)
    let samples = 12;
    let s = small(1, 500.0);
    let r = quiet(&s, &[constant("idle", 1e-9, samples)], THR);
    let metered_s = (samples - 2) as f64 * s.step_s;
    let expected_kwh = PowerModel::HP_G4.power(0.0) * metered_s / 3_600_000.0;
    assert!(
        (r.energy_kwh - expected_kwh).abs() < 1e-9,
        "{} vs {expected_kwh}",
        r.energy_kwh
    );
    assert_eq!(r.slatah, 0.0);
    assert_eq!(r.migrations, 0);
}

#[test]
fn energy_follows_the_power_model_between_steps() {
    // A host at 50 % then 100 %: each interval draws the mean of its ends.
    let s = small(1, 1860.0);
    let trace = Trace::from_fractions("ramp", [1.0, 1.0, 1.0, 1.0]);
    let r = quiet(&s, &[trace], Policy::Thr { threshold: 1.0 });
    // One VM at 1860 MIPS on 3720: 50 % for two intervals of 300 s.
    let expected = PowerModel::HP_G4.power(0.5) * 600.0 / 3_600_000.0;
    assert!((r.energy_kwh - expected).abs() < 1e-9);
}

/// Two hosts, four VMs: quiet for `quiet_steps`, then every VM at 100 %.
fn burst(quiet_steps: usize, burst: bool) -> Vec<Trace> {
    (0..4)
        .map(|i| {
            Trace::from_fractions(
                &format!("vm{i}"),
                (0..quiet_steps + 6).map(|k| if burst && k > quiet_steps { 1.0 } else { 0.1 }),
            )
        })
        .collect()
}

#[test]
fn a_host_asked_for_more_than_its_capacity_violates_the_sla() {
    // Low demand consolidates the four 1000-MIPS VMs on one 3720-MIPS host; the burst asks for
    // 4000 MIPS there, so the host is at 100 % with demand unmet until the overload is handled.
    let s = small(2, 1000.0);
    let p = Policy::Thr { threshold: 1.0 };
    let calm = quiet(&s, &burst(4, false), p);
    assert!(calm.migrations >= 2, "the quiet VMs are consolidated");
    let hot = quiet(&s, &burst(4, true), p);
    assert!(hot.slatah > calm.slatah, "{hot:?}");
    // The calm run's only violations are its migration targets' (CloudSim counts a VM
    // migrating in at its full request but 10 % allocation); without migrations, none.
    let alone = quiet(&small(1, 1000.0), &burst(4, true)[..3], p);
    assert_eq!(alone.migrations, 0);
    assert_eq!(alone.slatah, 0.0);
}

#[test]
fn a_migration_degrades_the_vm_into_pdm() {
    let s = small(2, 1000.0);
    let calm = quiet(&s, &burst(4, false), THR);
    assert!(calm.migrations > 0);
    assert!(calm.pdm > 0.0);
    // Each migrating VM loses 10 % of its demand for RAM / 62.5 s; all VMs ask the same.
    let lost = 0.1 * s.migration_s(613) * calm.migrations as f64;
    let asked = 4.0 * calm.steps.saturating_sub(1) as f64 * s.step_s;
    assert!(
        (calm.pdm - lost / asked).abs() < 1e-9 * calm.pdm.max(1e-12),
        "{calm:?}"
    );
    // No migration, no PDM: one host for everyone.
    let lone = quiet(&small(1, 500.0), &burst(4, false), THR);
    assert_eq!(lone.migrations, 0);
    assert_eq!(lone.pdm, 0.0);
}

#[test]
fn trace_parsing_names_the_bad_line() {
    let t = Trace::parse("ok", "10\n 20 \n0\n100\n\n").unwrap();
    assert_eq!(t.samples, vec![0.1, 0.2, 0.0, 1.0]);
    match Trace::parse("bad", "10\n20\nx7\n5\n") {
        Err(TraceError::NotANumber {
            line: 3, ref name, ..
        }) if name == "bad" => {}
        other => panic!("{other:?}"),
    }
    let err = Trace::parse("big", "10\n101\n").unwrap_err();
    assert!(matches!(err, TraceError::OutOfRange { line: 2, .. }));
    assert!(err.to_string().contains("line 2"), "{err}");
    assert!(matches!(
        Trace::parse("gap", "1\n\n2\n"),
        Err(TraceError::NotANumber { line: 2, .. })
    ));
    assert!(matches!(
        Trace::parse("e", " \n"),
        Err(TraceError::Empty { .. })
    ));
}

/// Wraps a published policy and checks at every step that each VM is on exactly one host.
struct Checked {
    inner: Policy,
    steps: usize,
}

impl Planner for Checked {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn plan(&mut self, view: &View<'_>) -> Plan {
        let mut seen = vec![0usize; view.vms()];
        for h in 0..view.hosts() {
            for &v in view.host_vms(h) {
                seen[v] += 1;
                assert_eq!(view.vm_host(v), Some(h), "VM {v} listed on host {h}");
            }
        }
        for (v, &n) in seen.iter().enumerate() {
            let expected = usize::from(view.vm_host(v).is_some());
            assert_eq!(n, expected, "VM {v} listed {n} times");
        }
        self.steps += 1;
        self.inner.plan(view)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn no_vm_is_lost_or_duplicated(
        hosts in 1usize..6,
        loads in proptest::collection::vec(proptest::collection::vec(0u8..=100, 14), 1..12),
        which in 0usize..4,
    ) {
        let mut s = Scenario::paper(hosts);
        s.vm_types = vec![
            VmType { mips: 2500.0, ram_mb: 870 },
            VmType { mips: 500.0, ram_mb: 613 },
        ];
        let traces: Vec<Trace> = loads
            .iter()
            .enumerate()
            .map(|(i, l)| Trace::from_fractions(&format!("v{i}"), l.iter().map(|&p| f64::from(p) / 100.0)))
            .collect();
        let mut planner = Checked { inner: Policy::PUBLISHED[which], steps: 0 };
        let r = run_with(&s, &traces, &mut planner, &mut |_, _| {});
        prop_assert_eq!(planner.steps, 13);
        prop_assert_eq!(r.vms_running + r.vms_finished + r.vms_unplaced, traces.len());
        prop_assert!(r.slatah >= 0.0 && r.slatah <= 1.0);
        prop_assert!(r.pdm >= 0.0 && r.pdm <= 1.0);
    }
}

#[test]
fn the_same_inputs_give_the_same_report() {
    let s = Scenario::paper(6);
    let traces: Vec<Trace> = (0..20)
        .map(|i| {
            Trace::from_fractions(
                &format!("v{i}"),
                (0..40).map(|k| f64::from((i * 37 + k * 11) % 101) / 100.0),
            )
        })
        .collect();
    for p in Policy::PUBLISHED {
        let a = quiet(&s, &traces, p);
        let b = quiet(&s, &traces, p);
        assert_eq!(a, b);
        assert!(
            a.migrations > 0,
            "{}: the workload should move VMs",
            a.policy
        );
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
    }
}

#[test]
fn published_names_match_the_paper() {
    let names: Vec<String> = Policy::PUBLISHED.iter().map(Policy::name).collect();
    assert_eq!(
        names,
        ["THR-MMT-0.8", "IQR-MMT-1.5", "MAD-MMT-2.5", "LR-MMT-1.2"]
    );
}

#[test]
fn host_types_are_the_papers() {
    let s = Scenario::default();
    assert_eq!(s.hosts, 800);
    let HostType { pe_mips, pes, .. } = s.host_type(1);
    assert_eq!((*pe_mips, *pes), (2660.0, 2));
    assert_eq!(s.vm_type(0, 1052).mips, 2500.0);
    assert_eq!(s.vm_type(263, 1052).mips, 2000.0);
    assert_eq!(s.vm_type(1051, 1052).mips, 500.0);
    assert!((s.migration_s(1740) - 27.84).abs() < 1e-9);
}

#[test]
fn baselines_never_migrate_and_npa_draws_full_power_throughout() {
    let s = Scenario::paper(4);
    let traces: Vec<Trace> = (0..6)
        .map(|i| {
            Trace::from_fractions(
                &format!("v{i}"),
                (0..10).map(|k| f64::from((i + k) % 7 + 1) / 10.0),
            )
        })
        .collect();
    let npa = quiet(&s, &traces, Policy::NoPowerManagement);
    let dvfs = quiet(&s, &traces, Policy::Dvfs);
    assert_eq!((npa.migrations, dvfs.migrations), (0, 0));
    // From time 0 to the last step (9 · 300 + 0.1 s), 2 G4 + 2 G5 at 100 %.
    let full = 2.0 * (PowerModel::HP_G4.power(1.0) + PowerModel::HP_G5.power(1.0));
    let expected = full * (9.0 * s.step_s + s.step_offset_s) / 3_600_000.0;
    assert!(
        (npa.energy_kwh - expected).abs() < 1e-9,
        "{} vs {expected}",
        npa.energy_kwh
    );
    assert!(dvfs.energy_kwh < npa.energy_kwh);
    assert_eq!(dvfs.slatah, 0.0);
    // The series says the same: every host at full power at every step.
    assert!(!npa.series.is_empty());
    for step in &npa.series {
        assert!((step.power_w - full).abs() < 1e-9, "{step:?}");
    }
}

/// Moves every settled VM to the next host, every step: a planner of another shape.
struct RoundRobin;

impl Planner for RoundRobin {
    fn name(&self) -> String {
        "round-robin".into()
    }

    fn plan(&mut self, view: &View<'_>) -> Plan {
        let moves = (0..view.vms())
            .filter(|&v| !view.vm_migrating(v))
            .filter_map(|v| view.vm_host(v).map(|h| (v, h)))
            .map(|(vm, h)| drift_protocol::dcsim::Move {
                vm,
                to: (h + 1) % view.hosts(),
            })
            .collect();
        Plan {
            moves,
            overloaded_hosts: 0,
        }
    }
}

#[test]
fn a_custom_planner_plugs_in_even_with_migrations_longer_than_a_step() {
    let mut s = small(3, 500.0);
    s.migration_mb_per_s = 1.0; // 613 s: each migration spans three 300 s steps
    let traces: Vec<Trace> = (0..5)
        .map(|i| constant(&format!("v{i}"), 0.3, 20))
        .collect();
    let a = run_with(&s, &traces, &mut RoundRobin, &mut |_, _| {});
    let b = run_with(&s, &traces, &mut RoundRobin, &mut |_, _| {});
    assert_eq!(a, b);
    assert_eq!(a.policy, "round-robin");
    assert_eq!(a.vms_running, 5);
    assert!(a.migrations > 0 && a.pdm > 0.0);
    // A VM moves at most once per three steps.
    assert!(a.migrations <= 5 * a.steps.div_ceil(3), "{}", a.migrations);
}
