//! Tests of the balancing policy: overload detection (static with hysteresis, MAD, IQR, local
//! regression), VM choice (cooldown, minimum migration time among the VMs whose move ends the
//! overload), target choice (constraints, thresholds with reservations, power of two choices),
//! determinism under a fixed seed, and the simulator: the herd scenario, convergence from skewed
//! starts without ping-pong, and the centralized baseline on the same starting state.

use std::collections::BTreeMap;

use drift_protocol::ids::{NodeId, VmId};
use drift_protocol::keys::SecretKey;
use drift_protocol::migration::{Placement, VmSummary};
use drift_protocol::policy::choose::{Exclusion, LocalState, Outcome};
use drift_protocol::policy::cluster::skewed_counts;
use drift_protocol::policy::detect::{iqr, mad, predict_next, quantile};
use drift_protocol::policy::sim::MAX_SIM_TICKS;
use drift_protocol::policy::{
    check_target, choose_target, decide, estimate_migration, parse_trace, plan_centralized,
    rank_vms, scale_demand, simulate, skewed_cluster, Cluster, ClusterHost, Decision, Demand,
    Detector, DetectorKind, HostView, HostedVm, LoadState, LoadTracker, MigrationModel, MoveLimits,
    PolicyConfig, SimConfig, SimMode, SkewSpec,
};
use drift_protocol::roster::{Capacity, Member, Role, Roster};
use drift_protocol::time::Timestamp;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

// ---------------------------------------------------------------------------------------------
// Fixtures

fn node(i: u8) -> NodeId {
    SecretKey::from_bytes(&[i.wrapping_add(1); 32]).public()
}

fn member(id: NodeId, name: &str, jurisdiction: Option<&str>, region: Option<&str>) -> Member {
    let mut labels = BTreeMap::new();
    if let Some(j) = jurisdiction {
        labels.insert("jurisdiction".to_string(), j.to_string());
    }
    if let Some(r) = region {
        labels.insert("region".to_string(), r.to_string());
    }
    Member {
        id,
        name: name.into(),
        roles: vec![Role::Host],
        labels,
        capacity: Capacity {
            cpus: 8,
            mem_mib: 65_536,
        },
    }
}

fn roster(members: Vec<Member>) -> Roster {
    Roster {
        cluster: "test".into(),
        epoch: 1,
        prev: None,
        not_before: Timestamp(0),
        not_after: Timestamp(u64::MAX),
        members,
        admins: None,
    }
}

fn view(node: NodeId, demand: u32, reserved: u32) -> HostView {
    HostView {
        node,
        demand_permille: demand,
        reserved_permille: reserved,
        mem_used_mib: 4096,
        mem_total_mib: 65_536,
        age_ms: 1000,
        groups: Some(vec![]),
    }
}

fn vm(b: u8, demand: u32, memory_mib: u64, dirty: u64) -> HostedVm {
    HostedVm {
        summary: VmSummary {
            id: VmId::from_bytes([b; 16]),
            name: format!("vm-{b}"),
            memory_mib,
            vcpus: 1,
            demand_permille: demand,
            placement: Placement::default(),
            qemu: None,
        },
        dirty_pages_per_s: dirty,
        last_moved_at: None,
    }
}

/// A tracker fed `samples`; returns its last assessment.
fn overloaded_after(cfg: &PolicyConfig, samples: &[u32]) -> LoadTracker {
    let mut t = LoadTracker::new(cfg);
    for &s in samples {
        t.observe(s, cfg);
    }
    t
}

const NOW: Timestamp = Timestamp(10_000_000);

// ---------------------------------------------------------------------------------------------
// Detection

#[test]
fn history_is_bounded_and_keeps_the_newest() {
    let cfg = PolicyConfig {
        history_len: 5,
        min_history: 5,
        ..PolicyConfig::default()
    };
    let mut t = LoadTracker::new(&cfg);
    for s in 0..2000 {
        t.observe(s, &cfg);
    }
    let h = t.history();
    assert_eq!(h.len(), 5);
    assert_eq!(h.capacity(), 5);
    assert_eq!(
        h.iter().collect::<Vec<_>>(),
        vec![1995, 1996, 1997, 1998, 1999]
    );
    assert_eq!(h.latest(), Some(1999));
}

#[test]
fn static_threshold_needs_k_consecutive_samples_to_enter_and_to_leave() {
    let cfg = PolicyConfig {
        hysteresis: 3,
        ..PolicyConfig::default()
    };
    let mut t = LoadTracker::new(&cfg);
    let states: Vec<LoadState> = [900, 900, 700, 900, 900, 900, 700, 700, 900, 700, 700, 700]
        .iter()
        .map(|&s| t.observe(s, &cfg).state)
        .collect();
    use LoadState::{Normal as N, Overloaded as O};
    assert_eq!(states, vec![N, N, N, N, N, O, O, O, O, O, O, N]);

    // Exactly at the threshold is not above it.
    let t = overloaded_after(&cfg, &[800, 800, 800, 800]);
    assert!(!t.is_overloaded());

    // Underload: k samples below the lower threshold; one sample at it resets.
    let mut t = LoadTracker::new(&cfg);
    let states: Vec<LoadState> = [100, 100, 100, 200, 100]
        .iter()
        .map(|&s| t.observe(s, &cfg).state)
        .collect();
    use LoadState::Underloaded as U;
    assert_eq!(states, vec![N, N, U, N, N]);
}

#[test]
fn overloaded_host_sheds_only_while_its_sample_is_above() {
    let cfg = PolicyConfig {
        hysteresis: 2,
        ..PolicyConfig::default()
    };
    let mut t = LoadTracker::new(&cfg);
    t.observe(900, &cfg);
    let a = t.observe(900, &cfg);
    assert!(a.wants_to_shed());
    // Still overloaded (one clear sample is not k), but nothing left to shed.
    let a = t.observe(700, &cfg);
    assert_eq!(a.state, LoadState::Overloaded);
    assert!(!a.wants_to_shed());
}

#[test]
fn statistics_match_hand_computed_values() {
    let v = [0.4, 0.5, 0.6, 0.5, 0.4, 0.5, 0.6, 0.5, 0.4, 0.5];
    assert!((mad(&v) - 0.05).abs() < 1e-12);
    assert!((quantile(&v, 0.25) - 0.425).abs() < 1e-12);
    // Sorted: 0.4 ×3, 0.5 ×5, 0.6 ×2; Q3 sits between two 0.5s.
    assert!((quantile(&v, 0.75) - 0.5).abs() < 1e-12);
    assert!((iqr(&v) - 0.075).abs() < 1e-12);
    // A straight line is predicted exactly.
    let line: Vec<f64> = (1..=10).map(|i| f64::from(i) / 10.0).collect();
    let next = predict_next(&line, false).expect("a fit");
    assert!((next - 1.1).abs() < 1e-9, "{next}");
    assert_eq!(predict_next(&[0.5, 0.5], false), None);
}

#[test]
fn adaptive_thresholds_follow_beloglazov_and_buyya() {
    let samples = [400, 500, 600, 500, 400, 500, 600, 500, 400, 500];
    let run = |detector| {
        let cfg = PolicyConfig {
            detector,
            ..PolicyConfig::default()
        };
        let mut t = LoadTracker::new(&cfg);
        let mut last = None;
        for s in samples {
            last = Some(t.observe(s, &cfg));
        }
        last.expect("samples").threshold
    };
    let m = run(Detector::mad());
    assert_eq!(
        (m.detector, m.upper_permille, m.above),
        (DetectorKind::Mad, 875, false)
    );
    let q = run(Detector::iqr());
    assert_eq!(
        (q.detector, q.upper_permille, q.above),
        (DetectorKind::Iqr, 888, false)
    );

    // Local regression: a rising trend is overloaded before it crosses anything.
    let cfg = PolicyConfig {
        detector: Detector::local_regression(false),
        ..PolicyConfig::default()
    };
    let mut t = LoadTracker::new(&cfg);
    let mut a = None;
    for s in [300, 360, 420, 480, 540, 600, 660, 720, 780, 840] {
        a = Some(t.observe(s, &cfg));
    }
    let lr = a.expect("samples").threshold;
    assert_eq!(lr.detector, DetectorKind::LocalRegression);
    assert_eq!(lr.predicted_permille, Some(900));
    assert!(lr.above, "1.2 × 0.9 ≥ 1");
    assert_eq!(lr.upper_permille, 833);

    // Flat load is not.
    let mut t = LoadTracker::new(&cfg);
    for _ in 0..10 {
        t.observe(700, &cfg);
    }
    let flat = t.observe(700, &cfg).threshold;
    assert_eq!(flat.predicted_permille, Some(700));
    assert!(!flat.above);

    // Too little history: the static threshold, flagged as a fallback.
    let mut t = LoadTracker::new(&cfg);
    let early = t.observe(900, &cfg).threshold;
    assert_eq!(early.detector, DetectorKind::Static);
    assert!(early.fallback && early.above);
}

#[test]
fn robust_regression_discounts_a_spike() {
    let mut y = vec![0.5; 10];
    y[6] = 1.0;
    let plain = predict_next(&y, false).expect("fit");
    let robust = predict_next(&y, true).expect("fit");
    assert!(
        (robust - 0.5).abs() < (plain - 0.5).abs(),
        "plain {plain}, robust {robust}"
    );
}

#[test]
fn config_errors_name_the_setting() {
    let bad = |c: PolicyConfig| c.validate().expect_err("invalid").field;
    let d = PolicyConfig::default();
    assert_eq!(d.validate(), Ok(()));
    assert_eq!(
        bad(PolicyConfig {
            lower_permille: 900,
            ..d
        }),
        "lower_permille"
    );
    assert_eq!(bad(PolicyConfig { hysteresis: 0, ..d }), "hysteresis");
    assert_eq!(
        bad(PolicyConfig {
            detector: Detector::Mad { safety: f64::NAN },
            ..d
        }),
        "detector.safety"
    );
    assert_eq!(
        bad(PolicyConfig {
            detector: Detector::LocalRegression {
                safety: 1.2,
                window: 2,
                robust: false
            },
            ..d
        }),
        "detector.window"
    );
    assert_eq!(
        bad(PolicyConfig {
            history_len: 5000,
            ..d
        }),
        "history_len"
    );
}

// ---------------------------------------------------------------------------------------------
// VM choice

#[test]
fn migration_estimate_follows_precopy_convergence() {
    let m = MigrationModel::default(); // 125 MiB/s, 300 ms downtime, 30 rounds
    let idle = estimate_migration(1024, 0, &m);
    assert_eq!(idle.total_ms, 8192);
    assert_eq!(
        (idle.rounds, idle.downtime_ms, idle.converges),
        (1, 0, true)
    );
    let busy = estimate_migration(1024, 8000, &m); // 31.25 MiB/s dirtied
    assert!(busy.converges && busy.total_ms > idle.total_ms && busy.rounds > 1);
    // Dirtying as fast as the link: pre-copy never converges.
    let hot = estimate_migration(1024, 32_000, &m);
    assert!(!hot.converges);
    assert_eq!(hot.rounds, m.max_rounds);
    assert!(hot.total_ms > busy.total_ms);
    assert_eq!(estimate_migration(0, 0, &m).total_ms, 0);
}

#[test]
fn vm_choice_takes_the_quickest_vm_that_ends_the_overload_and_skips_cooldown() {
    let cfg = PolicyConfig::default();
    let mut recent = vm(4, 300, 256, 0);
    recent.last_moved_at = Some(Timestamp(NOW.0 - cfg.cooldown_ms + 1));
    let vms = vec![
        vm(1, 200, 4096, 0), // ends the overload, slow
        vm(2, 160, 512, 0),  // ends the overload, quick
        vm(3, 100, 256, 0),  // quicker, but leaves the host above
        recent,              // would be best, but is on cooldown
        vm(5, 0, 128, 0),    // sheds nothing
    ];
    let r = rank_vms(&cfg, 950, 800, &vms, NOW);
    assert_eq!((r.total, r.on_cooldown, r.idle), (5, 1, 1));
    let order: Vec<u8> = r.ranked.iter().map(|c| c.vm.as_bytes()[0]).collect();
    assert_eq!(order, vec![2, 1, 3]);
    assert!(r.ranked[0].ends_overload && !r.ranked[2].ends_overload);
    assert_eq!(r.ranked[0].host_after_permille, 790);

    // Just past the cooldown the VM is a candidate again, and the quickest.
    let later = Timestamp(NOW.0 + 1);
    let r = rank_vms(&cfg, 950, 800, &vms, later);
    assert_eq!(r.ranked[0].vm, VmId::from_bytes([4; 16]));

    // No single VM ends the overload: the one that sheds the most goes first.
    let r = rank_vms(&cfg, 1500, 800, &vms[..3], NOW);
    assert!(r.ranked.iter().all(|c| !c.ends_overload));
    assert_eq!(r.ranked[0].vm, VmId::from_bytes([1; 16]));
}

// ---------------------------------------------------------------------------------------------
// Target choice

#[test]
fn every_exclusion_is_counted_and_the_eligible_host_chosen() {
    let me = node(0);
    let hosts: Vec<NodeId> = (1..=9).map(node).collect();
    let mut members = vec![member(me, "me", Some("de"), Some("eu"))];
    for (i, h) in hosts.iter().enumerate() {
        let j = if i == 3 { "fr" } else { "de" };
        let r = if i == 4 { "us" } else { "eu" };
        members.push(member(*h, &format!("h{i}"), Some(j), Some(r)));
    }
    // hosts[1] is not a member; hosts[2] is an observer.
    members.retain(|m| m.id != hosts[1]);
    if let Some(m) = members.iter_mut().find(|m| m.id == hosts[2]) {
        m.roles = vec![Role::Observer];
    }
    let roster = roster(members);
    let cfg = PolicyConfig::default();
    let mut table = vec![view(me, 900, 0)];
    table.push(view(hosts[0], 300, 0)); // eligible
    table.push(view(hosts[1], 100, 0)); // not a member
    table.push(view(hosts[2], 100, 0)); // observer
    table.push(view(hosts[3], 100, 0)); // jurisdiction fr
    table.push(view(hosts[4], 100, 0)); // region us
    let mut g = view(hosts[5], 100, 0);
    g.groups = Some(vec!["db".into()]);
    table.push(g); // anti-affinity
    let mut stale = view(hosts[6], 100, 0);
    stale.age_ms = cfg.max_report_age_ms + 1;
    table.push(stale);
    let mut full = view(hosts[7], 100, 0);
    full.mem_used_mib = full.mem_total_mib - 100;
    table.push(full); // memory
    table.push(view(hosts[8], 500, 200)); // 500 + 200 reserved + 150 > 800

    let mut v = vm(1, 150, 1024, 0).summary;
    v.placement = Placement {
        jurisdictions: vec!["de".into()],
        regions: vec!["eu".into()],
        anti_affinity: Some("db".into()),
    };
    let mut rng = StdRng::seed_from_u64(1);
    let choice = choose_target(&cfg, &me, &v, &roster, &table, &mut rng).expect("one eligible");
    assert_eq!(choice.target.node, hosts[0]);
    assert_eq!(choice.name, "h0");
    assert_eq!(choice.target.projected_permille, 450);
    assert_eq!(choice.runner_up, None);
    assert_eq!(choice.eligible, 1);
    let e = choice.excluded;
    assert_eq!(
        (
            e.is_self,
            e.not_member,
            e.not_host,
            e.jurisdiction,
            e.region
        ),
        (1, 1, 1, 1, 1)
    );
    assert_eq!(
        (e.anti_affinity, e.stale, e.no_memory, e.over_threshold),
        (1, 1, 1, 1)
    );
    assert_eq!(e.total(), 9);

    // Reservations count: 200 reserved makes hosts[8] ineligible, none makes it fine.
    let m8 = roster.member(&hosts[8]);
    assert_eq!(
        check_target(&cfg, &me, 8, &v, m8, &view(hosts[8], 500, 200)),
        Err(Exclusion::OverThreshold)
    );
    assert!(check_target(&cfg, &me, 8, &v, m8, &view(hosts[8], 500, 0)).is_ok());
}

#[test]
fn a_vm_pinned_to_jurisdiction_a_is_never_sent_to_b_even_when_only_b_has_room() {
    let (me, a, b) = (node(0), node(1), node(2));
    let roster = roster(vec![
        member(me, "me", Some("a"), None),
        member(a, "a1", Some("a"), None),
        member(b, "b1", Some("b"), None),
    ]);
    let cfg = PolicyConfig::default();
    let table = vec![view(a, 790, 0), view(b, 0, 0)];
    let mut pinned = vm(1, 200, 1024, 0);
    pinned.summary.placement.jurisdictions = vec!["a".into()];
    let mut tracker = LoadTracker::new(&cfg);
    let mut assessment = tracker.observe(950, &cfg);
    for _ in 1..cfg.hysteresis {
        assessment = tracker.observe(950, &cfg);
    }
    let vms = [pinned];
    let me_state = LocalState {
        id: me,
        assessment,
        vms: &vms,
    };
    for seed in 0..50 {
        let d = decide(
            &cfg,
            &me_state,
            &roster,
            &table,
            NOW,
            &mut StdRng::seed_from_u64(seed),
        );
        match &d.outcome {
            Outcome::NoTarget { tried, untried } => {
                assert_eq!((tried.len(), *untried), (1, 0));
                let e = tried[0].why.excluded;
                assert_eq!((e.jurisdiction, e.over_threshold), (1, 1), "{d}");
            }
            other => panic!("expected no target, got {other:?}"),
        }
    }
}

#[test]
fn demand_is_scaled_between_hosts_of_different_size() {
    assert_eq!(scale_demand(400, 8, 16), 200);
    assert_eq!(scale_demand(401, 8, 16), 201);
    assert_eq!(scale_demand(400, 16, 8), 800);
    assert_eq!(scale_demand(400, 0, 8), 400);
    let (me, small) = (node(0), node(1));
    let mut m = member(small, "small", None, None);
    m.capacity.cpus = 4;
    let cfg = PolicyConfig::default();
    let v = vm(1, 300, 1024, 0).summary; // 300‰ of 8 CPUs = 600‰ of 4 CPUs
    assert_eq!(
        check_target(&cfg, &me, 8, &v, Some(&m), &view(small, 250, 0)),
        Err(Exclusion::OverThreshold)
    );
    let ok = check_target(&cfg, &me, 8, &v, Some(&m), &view(small, 200, 0)).expect("fits");
    assert_eq!(ok.projected_permille, 800);
}

fn overloaded_assessment(cfg: &PolicyConfig, load: u32) -> drift_protocol::policy::Assessment {
    let mut t = LoadTracker::new(cfg);
    let mut a = t.observe(load, cfg);
    for _ in 1..cfg.hysteresis {
        a = t.observe(load, cfg);
    }
    a
}

#[test]
fn decisions_explain_themselves_and_round_trip() {
    let cfg = PolicyConfig::default();
    let me = node(0);
    let peers: Vec<NodeId> = (1..=4).map(node).collect();
    let mut members = vec![member(me, "me", None, None)];
    members.extend(
        peers
            .iter()
            .enumerate()
            .map(|(i, p)| member(*p, &format!("peer-{i}"), None, None)),
    );
    let roster = roster(members);
    let table: Vec<HostView> = peers
        .iter()
        .zip([100, 700, 300, 750])
        .map(|(p, d)| view(*p, d, 0))
        .collect();
    let vms = [vm(1, 200, 2048, 1000), vm(2, 120, 512, 100)];
    let a = overloaded_assessment(&cfg, 900);
    let me_state = LocalState {
        id: me,
        assessment: a,
        vms: &vms,
    };
    let d = decide(
        &cfg,
        &me_state,
        &roster,
        &table,
        NOW,
        &mut StdRng::seed_from_u64(3),
    );
    let (vm_id, target) = d.chosen().expect("a move");
    assert_eq!(vm_id, VmId::from_bytes([2; 16]));
    assert!(target == peers[0] || target == peers[2] || target == peers[1]);
    let text = d.to_string();
    assert!(
        text.contains("move vm-2") && text.contains("upper 800"),
        "{text}"
    );
    let bytes = postcard::to_stdvec(&d).expect("encode");
    let back: Decision = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(back, d);

    // Not overloaded: stay.
    let calm = LocalState {
        assessment: LoadTracker::new(&cfg).observe(500, &cfg),
        ..me_state
    };
    let d = decide(
        &cfg,
        &calm,
        &roster,
        &table,
        NOW,
        &mut StdRng::seed_from_u64(3),
    );
    assert_eq!(d.outcome, Outcome::Stay);
    assert!(d.to_string().ends_with("stay"));

    // Every VM on cooldown: nothing to move, and it says so.
    let mut cool = vms.clone();
    for v in &mut cool {
        v.last_moved_at = Some(NOW);
    }
    let stuck = LocalState {
        vms: &cool,
        ..me_state
    };
    let d = decide(
        &cfg,
        &stuck,
        &roster,
        &table,
        NOW,
        &mut StdRng::seed_from_u64(3),
    );
    assert_eq!(
        d.outcome,
        Outcome::NoVm {
            total: 2,
            on_cooldown: 2,
            idle: 0
        }
    );
    assert!(d.to_string().contains("2 on cooldown"));
}

// ---------------------------------------------------------------------------------------------
// Properties of target choice

#[derive(Debug, Clone)]
struct HostSpec {
    member: Option<(bool, Option<u8>, Option<u8>, u32)>, // host role, jurisdiction, region, cpus
    demand: u32,
    reserved: u32,
    mem_used: u64,
    mem_total: u64,
    age_ms: u64,
    groups: Option<Vec<u8>>,
}

fn host_spec() -> impl Strategy<Value = HostSpec> {
    (
        prop::option::weighted(
            0.9,
            (
                prop::bool::weighted(0.9),
                prop::option::of(0u8..3),
                prop::option::of(0u8..3),
                prop_oneof![Just(0u32), Just(4), Just(8), Just(16)],
            ),
        ),
        0u32..1200,
        0u32..400,
        0u64..70_000,
        prop_oneof![Just(16_384u64), Just(65_536)],
        0u64..30_000,
        prop::option::of(prop::collection::vec(0u8..3, 0..3)),
    )
        .prop_map(
            |(member, demand, reserved, mem_used, mem_total, age_ms, groups)| HostSpec {
                member,
                demand,
                reserved,
                mem_used: mem_used.min(mem_total),
                mem_total,
                age_ms,
                groups,
            },
        )
}

#[derive(Debug, Clone)]
struct World {
    cfg: PolicyConfig,
    roster: Roster,
    table: Vec<HostView>,
    vm: VmSummary,
    me: NodeId,
}

fn world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec(host_spec(), 0..12),
        prop::collection::vec(0u8..3, 0..3),
        prop::collection::vec(0u8..3, 0..2),
        prop::option::of(0u8..3),
        1u32..500,
        1u64..8192,
        600u32..=1000,
        prop_oneof![Just(0u32), Just(8)],
    )
        .prop_map(
            |(hosts, juris, regions, group, demand, memory, upper, my_cpus)| {
                let me = node(200);
                let mut me_member = member(me, "me", Some("j0"), None);
                me_member.capacity.cpus = my_cpus;
                let mut members = vec![me_member];
                let mut table = vec![view(me, 900, 0)];
                for (i, h) in hosts.iter().enumerate() {
                    let id = node(i as u8);
                    if let Some((is_host, j, r, cpus)) = h.member {
                        let j = j.map(|j| format!("j{j}"));
                        let r = r.map(|r| format!("r{r}"));
                        let mut m = member(id, &format!("h{i}"), j.as_deref(), r.as_deref());
                        m.capacity.cpus = cpus;
                        if !is_host {
                            m.roles = vec![Role::Observer];
                        }
                        members.push(m);
                    }
                    table.push(HostView {
                        node: id,
                        demand_permille: h.demand,
                        reserved_permille: h.reserved,
                        mem_used_mib: h.mem_used,
                        mem_total_mib: h.mem_total,
                        age_ms: h.age_ms,
                        groups: h
                            .groups
                            .as_ref()
                            .map(|g| g.iter().map(|x| format!("g{x}")).collect()),
                    });
                }
                let cfg = PolicyConfig {
                    upper_permille: upper,
                    lower_permille: 100,
                    ..PolicyConfig::default()
                };
                let vm = VmSummary {
                    id: VmId::from_bytes([7; 16]),
                    name: "vm".into(),
                    memory_mib: memory,
                    vcpus: 1,
                    demand_permille: demand,
                    placement: Placement {
                        jurisdictions: juris.iter().map(|j| format!("j{j}")).collect(),
                        regions: regions.iter().map(|r| format!("r{r}")).collect(),
                        anti_affinity: group.map(|g| format!("g{g}")),
                    },
                    qemu: None,
                };
                World {
                    cfg,
                    roster: roster(members),
                    table,
                    vm,
                    me,
                }
            },
        )
}

/// An independent statement of eligibility (not via `check_target`): the demand the VM adds
/// to host `m`, or `None` when the host may not take it.
fn oracle(w: &World, v: &HostView) -> Option<u64> {
    if v.node == w.me || v.age_ms > w.cfg.max_report_age_ms {
        return None;
    }
    let m = w.roster.members.iter().find(|m| m.id == v.node)?;
    if !m.roles.contains(&Role::Host) {
        return None;
    }
    let p = &w.vm.placement;
    let label = |k: &str| m.labels.get(k).cloned();
    if !p.jurisdictions.is_empty()
        && !label("jurisdiction").is_some_and(|j| p.jurisdictions.contains(&j))
    {
        return None;
    }
    if !p.regions.is_empty() && !label("region").is_some_and(|r| p.regions.contains(&r)) {
        return None;
    }
    if let (Some(g), Some(held)) = (&p.anti_affinity, &v.groups) {
        if held.contains(g) {
            return None;
        }
    }
    if v.mem_used_mib + w.vm.memory_mib > v.mem_total_mib {
        return None;
    }
    let my_cpus = w.roster.members[0].capacity.cpus;
    let to_cpus = m.capacity.cpus;
    let demand = if my_cpus == 0 || to_cpus == 0 {
        u64::from(w.vm.demand_permille)
    } else {
        (u64::from(w.vm.demand_permille) * u64::from(my_cpus)).div_ceil(u64::from(to_cpus))
    };
    let projected = u64::from(v.demand_permille) + u64::from(v.reserved_permille) + demand;
    (projected <= u64::from(w.cfg.upper_permille)).then_some(projected)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A chosen target satisfies every constraint and stays at or under the upper threshold
    /// by the numbers the source knew, reservations included; when none is chosen, none
    /// qualifies. The two sampled hosts: the winner is the less loaded.
    #[test]
    fn chosen_targets_satisfy_constraints_and_thresholds(w in world(), seed in any::<u64>()) {
        let eligible: Vec<(NodeId, u64)> = w
            .table
            .iter()
            .filter_map(|v| oracle(&w, v).map(|p| (v.node, p)))
            .collect();
        let mut rng = StdRng::seed_from_u64(seed);
        match choose_target(&w.cfg, &w.me, &w.vm, &w.roster, &w.table, &mut rng) {
            Ok(c) => {
                let projected = eligible.iter().find(|(n, _)| *n == c.target.node).map(|(_, p)| *p);
                prop_assert_eq!(projected, Some(u64::from(c.target.projected_permille)));
                prop_assert!(c.target.projected_permille <= w.cfg.upper_permille);
                prop_assert_eq!(c.eligible as usize, eligible.len());
                prop_assert_eq!(c.excluded.total() as usize + eligible.len(), w.table.len());
                if let Some(r) = c.runner_up {
                    prop_assert!(eligible.iter().any(|(n, _)| *n == r.node));
                    prop_assert!(r.node != c.target.node);
                    prop_assert!(c.target.projected_permille <= r.projected_permille);
                }
                let m = w.roster.member(&c.target.node).expect("member");
                let groups = w.table.iter().find(|v| v.node == c.target.node)
                    .and_then(|v| v.groups.clone()).unwrap_or_default();
                prop_assert_eq!(w.vm.placement.allows(m, groups.iter().map(String::as_str)), Ok(()));
            }
            Err(none) => {
                prop_assert!(eligible.is_empty());
                prop_assert_eq!(none.excluded.total() as usize, w.table.len());
                prop_assert_eq!(none.considered as usize, w.table.len());
            }
        }
    }

    /// Same inputs and seed, same decision, explanation included.
    #[test]
    fn decisions_are_deterministic_under_a_seed(w in world(), seed in any::<u64>(), load in 0u32..2000) {
        let a = overloaded_assessment(&w.cfg, load);
        let vms = [
            HostedVm { summary: w.vm.clone(), dirty_pages_per_s: 500, last_moved_at: None },
            vm(9, 50, 256, 10),
        ];
        let me = LocalState { id: w.me, assessment: a, vms: &vms };
        let d1 = decide(&w.cfg, &me, &w.roster, &w.table, NOW, &mut StdRng::seed_from_u64(seed));
        let d2 = decide(&w.cfg, &me, &w.roster, &w.table, NOW, &mut StdRng::seed_from_u64(seed));
        prop_assert_eq!(d1.to_string(), d2.to_string());
        prop_assert_eq!(d1, d2);
    }

    /// The overloaded state is entered only after k consecutive samples above the threshold
    /// and left only after k consecutive samples not above it; k such samples always do it.
    #[test]
    fn hysteresis_needs_k_consecutive_samples(
        k in 1u32..6,
        samples in prop::collection::vec(prop_oneof![600u32..=800, 801u32..1200], 1..80),
    ) {
        let cfg = PolicyConfig { hysteresis: k, ..PolicyConfig::default() };
        let mut t = LoadTracker::new(&cfg);
        let mut was = false;
        for (i, &s) in samples.iter().enumerate() {
            let now = t.observe(s, &cfg).state == LoadState::Overloaded;
            let k = k as usize;
            let last_k = (i + 1 >= k).then(|| &samples[i + 1 - k..=i]);
            let all_above = last_k.is_some_and(|w| w.iter().all(|&x| x > 800));
            let all_clear = last_k.is_some_and(|w| w.iter().all(|&x| x <= 800));
            if now && !was { prop_assert!(all_above, "entered at {i}"); }
            if was && !now { prop_assert!(all_clear, "left at {i}"); }
            if all_above { prop_assert!(now); }
            if all_clear { prop_assert!(!now); }
            was = now;
        }
    }

    /// A VM on cooldown is never ranked nor chosen; if some VM's move ends the overload, the
    /// first choice does, with the least estimated migration time among those that do.
    #[test]
    fn cooldown_vms_are_never_chosen_and_the_quickest_ending_vm_is(
        vms in prop::collection::vec(
            (0u32..400, 1u64..16_384, 0u64..40_000, prop::option::of(0u64..400_000)),
            1..12,
        ),
        load in 500u32..2500,
        seed in any::<u64>(),
    ) {
        let cfg = PolicyConfig::default();
        let vms: Vec<HostedVm> = vms
            .iter()
            .enumerate()
            .map(|(i, &(d, m, dirty, ago))| {
                let mut v = vm(i as u8, d, m, dirty);
                v.last_moved_at = ago.map(|a| Timestamp(NOW.0 - a));
                v
            })
            .collect();
        let r = rank_vms(&cfg, load, cfg.upper_permille, &vms, NOW);
        for c in &r.ranked {
            let v = vms.iter().find(|v| v.summary.id == c.vm).expect("vm");
            prop_assert!(!v.on_cooldown(NOW, cfg.cooldown_ms));
        }
        let ending: Vec<u64> = vms
            .iter()
            .filter(|v| !v.on_cooldown(NOW, cfg.cooldown_ms) && v.summary.demand_permille > 0)
            .filter(|v| load.saturating_sub(v.summary.demand_permille) <= cfg.upper_permille)
            .map(|v| estimate_migration(v.summary.memory_mib, v.dirty_pages_per_s, &cfg.migration).total_ms)
            .collect();
        if let Some(best) = ending.iter().min() {
            prop_assert!(r.ranked[0].ends_overload);
            prop_assert_eq!(r.ranked[0].estimate.total_ms, *best);
        }
        // Through decide, with one roomy target.
        let me = node(100);
        let other = node(101);
        let roster = roster(vec![member(me, "me", None, None), member(other, "o", None, None)]);
        let table = [view(other, 0, 0)];
        let st = LocalState { id: me, assessment: overloaded_assessment(&cfg, load), vms: &vms };
        let d = decide(&cfg, &st, &roster, &table, NOW, &mut StdRng::seed_from_u64(seed));
        if let Some((chosen, _)) = d.chosen() {
            let v = vms.iter().find(|v| v.summary.id == chosen).expect("vm");
            prop_assert!(!v.on_cooldown(NOW, cfg.cooldown_ms));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Simulator

/// `overloaded` hosts with `per_host` VMs of `demand` each, plus `idle` empty hosts.
fn herd_cluster(overloaded: usize, idle: usize, per_host: usize, demand: u32) -> Cluster {
    let n = overloaded + idle;
    let ids: Vec<NodeId> = (0..n).map(|i| node(i as u8)).collect();
    let members = ids
        .iter()
        .enumerate()
        .map(|(i, id)| member(*id, &format!("node-{i}"), None, None))
        .collect();
    let mut b = 0u8;
    let hosts = ids
        .iter()
        .enumerate()
        .map(|(i, id)| ClusterHost {
            id: *id,
            vms: if i < overloaded {
                (0..per_host)
                    .map(|_| {
                        b += 1;
                        vm(b, demand, 1024, 1000)
                    })
                    .collect()
            } else {
                Vec::new()
            },
        })
        .collect();
    Cluster {
        roster: roster(members),
        hosts,
        traces: BTreeMap::new(),
    }
}

#[test]
fn herd_ten_overloaded_hosts_and_one_idle_host() {
    // 10 hosts at 900‰ (6 VMs of 150‰), one idle; the cluster as a whole cannot balance
    // (9000‰ > 11 × 800‰), so the idle host is the only possible target for everyone.
    let start = herd_cluster(10, 1, 6, 150);
    let cfg = SimConfig {
        max_incoming_per_tick: 10, // no cap on arrivals: only the threshold protects the target
        max_ticks: 3,              // k = 3: everyone decides for the first time at tick 3
        ..SimConfig::default()
    };
    let (first, after) = simulate::<StdRng>(&start, &cfg).expect("sim");
    // All ten chose the idle host in the same tick; admission took five (750‰) and refused
    // the rest.
    assert_eq!(first.offers, 10, "{first}");
    assert_eq!(first.migrations, 5, "{first}");
    assert_eq!(first.refusals, 5, "{first}");
    assert_eq!(after.demand(10), 750);

    // Refused sources keep trying later; the idle host never goes over.
    let cfg = SimConfig {
        max_ticks: 40,
        ..cfg
    };
    let (report, end) = simulate::<StdRng>(&start, &cfg).expect("sim");
    println!("herd, 10 overloaded + 1 idle: {report}");
    assert!(end.demand(10) <= 800, "{report}");
    assert_eq!(end.vm_ids(), start.vm_ids(), "no VM lost or duplicated");
    assert_eq!(report.vms_after, report.vms_before);
    assert_eq!(report.ping_pongs, 0);
    assert_eq!(report.ticks_to_balance, None, "infeasible by construction");
    assert!(
        report.no_move > 0,
        "sources saw no target once the idle host was full"
    );
}

#[test]
fn herd_with_room_for_all_balances_without_overshoot() {
    // Ten hosts each need to shed one VM; two idle hosts can take five each.
    let start = herd_cluster(10, 2, 6, 150);
    let cfg = SimConfig {
        max_ticks: 60,
        ..SimConfig::default()
    };
    let (report, end) = simulate::<StdRng>(&start, &cfg).expect("sim");
    println!("herd, 10 overloaded + 2 idle: {report}");
    assert!(end.is_balanced(800), "{report}");
    assert_eq!(report.migrations, 10);
    assert_eq!(report.ping_pongs, 0);
    assert_eq!(end.vm_ids(), start.vm_ids());
}

#[test]
fn simulation_is_deterministic_under_a_seed() {
    let spec = SkewSpec {
        nodes: 8,
        skew: 0.6,
        seed: 4,
        ..SkewSpec::default()
    };
    let start = skewed_cluster::<StdRng>(&spec).expect("cluster");
    assert_eq!(start, skewed_cluster::<StdRng>(&spec).expect("cluster"));
    let cfg = SimConfig {
        seed: 9,
        ..SimConfig::default()
    };
    let a = simulate::<StdRng>(&start, &cfg).expect("sim");
    let b = simulate::<StdRng>(&start, &cfg).expect("sim");
    assert_eq!(a, b);
}

#[test]
fn skewed_counts_spread_by_geometric_weights() {
    assert_eq!(skewed_counts(48, 6, 0.0), vec![8; 6]);
    assert_eq!(skewed_counts(48, 6, 1.0), vec![48, 0, 0, 0, 0, 0]);
    let c = skewed_counts(48, 6, 0.5);
    assert_eq!(c.iter().sum::<usize>(), 48);
    assert!(c.windows(2).all(|w| w[0] >= w[1]), "{c:?}");
    assert_eq!(skewed_counts(5, 0, 0.5), Vec::<usize>::new());
}

#[test]
fn bad_specs_and_traces_are_refused_with_the_reason() {
    let bad = |spec: SkewSpec| {
        skewed_cluster::<StdRng>(&spec)
            .expect_err("invalid")
            .to_string()
    };
    assert!(bad(SkewSpec {
        nodes: 0,
        ..SkewSpec::default()
    })
    .contains("nodes"));
    assert!(bad(SkewSpec {
        skew: 1.5,
        ..SkewSpec::default()
    })
    .contains("skew"));
    assert!(bad(SkewSpec {
        skew: 1.0,
        host_mem_mib: 8192,
        ..SkewSpec::default()
    })
    .contains("MiB"));
    assert!(bad(SkewSpec {
        demand: Demand::Traces(vec![vec![100]; 3]),
        ..SkewSpec::default()
    })
    .contains("traces"));
    assert_eq!(
        parse_trace("12\n\n 30 \n0\n100\n"),
        Ok(vec![120, 300, 0, 1000])
    );
    assert!(parse_trace("12\nabc\n")
        .expect_err("bad")
        .to_string()
        .contains("line 2"));
    assert!(parse_trace("101")
        .expect_err("bad")
        .to_string()
        .contains("percentage"));
    assert!(parse_trace("\n\n").is_err());
    let cfg = SimConfig {
        max_ticks: MAX_SIM_TICKS + 1,
        ..SimConfig::default()
    };
    let start = skewed_cluster::<StdRng>(&SkewSpec::default()).expect("cluster");
    assert!(simulate::<StdRng>(&start, &cfg).is_err());
}

#[test]
fn pinned_vms_stay_in_their_jurisdiction_in_the_simulator() {
    let spec = SkewSpec {
        nodes: 6,
        vms_per_node: 8,
        skew: 0.6,
        jurisdictions: 2,
        pin_every: 2,
        seed: 11,
        ..SkewSpec::default()
    };
    let start = skewed_cluster::<StdRng>(&spec).expect("cluster");
    for mode in [SimMode::Decentralized, SimMode::Centralized] {
        let cfg = SimConfig {
            mode,
            ..SimConfig::default()
        };
        let (report, end) = simulate::<StdRng>(&start, &cfg).expect("sim");
        for (i, h) in end.hosts.iter().enumerate() {
            let j = end
                .member(i)
                .and_then(|m| m.jurisdiction())
                .expect("labelled");
            for v in &h.vms {
                let allowed = &v.summary.placement.jurisdictions;
                assert!(
                    allowed.is_empty() || allowed.iter().any(|a| a == j),
                    "{report}"
                );
            }
        }
        assert_eq!(end.vm_ids(), start.vm_ids());
    }
}

/// Runs both modes on the same start; returns (decentralized, centralized).
fn both(
    start: &Cluster,
    cfg: &SimConfig,
) -> (
    (drift_protocol::policy::SimReport, Cluster),
    (drift_protocol::policy::SimReport, Cluster),
) {
    let d = simulate::<StdRng>(start, cfg).expect("decentralized");
    let c = simulate::<StdRng>(
        start,
        &SimConfig {
            mode: SimMode::Centralized,
            ..*cfg
        },
    )
    .expect("centralized");
    (d, c)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// From any feasible skewed start, the decentralized policy balances within a bounded
    /// number of ticks, moves every VM at most once (no ping-pong), loses none; the
    /// centralized baseline balances the same start.
    #[test]
    fn skewed_starts_converge_without_ping_pong(
        nodes in 3usize..=10,
        vms_per_node in 3usize..=8,
        skew in 0.2f64..=0.9,
        load in 300u32..=500,
        seed in any::<u64>(),
    ) {
        let spec = SkewSpec {
            nodes,
            vms_per_node,
            skew,
            demand: Demand::Mean { load_permille: load },
            host_mem_mib: 1 << 20,
            seed,
            ..SkewSpec::default()
        };
        let start = skewed_cluster::<StdRng>(&spec).expect("cluster");
        let total = start.vm_count() as u32;
        let cfg = SimConfig { seed, max_ticks: 400, ..SimConfig::default() };
        let ((d, d_end), (c, c_end)) = both(&start, &cfg);
        // k − 1 ticks of warm-up, then at least one move per tick while unbalanced, each VM
        // at most once.
        let bound = cfg.policy.hysteresis - 1 + total;
        prop_assert!(d.ticks_to_balance.is_some_and(|t| t <= bound), "{}", d);
        prop_assert!(d_end.is_balanced(cfg.policy.upper_permille));
        prop_assert_eq!(d.ping_pongs, 0);
        prop_assert!(d.max_moves_per_vm <= 1, "{}", d);
        prop_assert_eq!(d_end.vm_ids(), start.vm_ids());
        prop_assert!(c.ticks_to_balance.is_some(), "{}", c);
        prop_assert_eq!(c.ping_pongs, 0);
        prop_assert_eq!(c_end.vm_ids(), start.vm_ids());

        // The one-shot plan (no per-tick limits) balances too.
        let plan = plan_centralized(&start, &cfg.policy, MoveLimits::UNLIMITED, NOW, 10_000);
        prop_assert!(plan.balanced);
        prop_assert!(plan.stuck.is_empty());
        let mut applied = start.clone();
        plan.apply(&mut applied, NOW).expect("apply");
        prop_assert!(applied.is_balanced(cfg.policy.upper_permille));
        prop_assert_eq!(applied.vm_ids(), start.vm_ids());
    }

    /// The herd, with any seed: the idle host never ends above the threshold, nothing is lost.
    #[test]
    fn herd_never_overloads_the_idle_host(seed in any::<u64>(), cap in 1u32..=10) {
        let start = herd_cluster(10, 1, 6, 150);
        let cfg = SimConfig { seed, max_ticks: 20, max_incoming_per_tick: cap, ..SimConfig::default() };
        let (report, end) = simulate::<StdRng>(&start, &cfg).expect("sim");
        prop_assert!(end.demand(10) <= 800);
        prop_assert_eq!(end.vm_ids(), start.vm_ids());
        prop_assert_eq!(report.ping_pongs, 0);
    }
}

#[test]
fn six_node_skewed_scenario_decentralized_vs_centralized() {
    let spec = SkewSpec {
        nodes: 6,
        vms_per_node: 8,
        skew: 0.5,
        demand: Demand::Mean { load_permille: 500 },
        seed: 6,
        ..SkewSpec::default()
    };
    let start = skewed_cluster::<StdRng>(&spec).expect("cluster");
    let cfg = SimConfig {
        seed: 6,
        ..SimConfig::default()
    };
    let ((d, d_end), (c, c_end)) = both(&start, &cfg);
    let plan = plan_centralized(
        &start,
        &cfg.policy,
        MoveLimits::UNLIMITED,
        cfg.start,
        10_000,
    );
    println!(
        "6 nodes × 8 VMs, skew 0.5, mean load 500‰, upper {}‰, k = {}, tick {} ms, \
         ≤ 1 move out and ≤ {} in per host per tick",
        cfg.policy.upper_permille, cfg.policy.hysteresis, cfg.tick_ms, cfg.max_incoming_per_tick
    );
    println!("start demand ‰: {:?}", start.demands());
    println!("{d}");
    println!("  end demand ‰: {:?}", d.final_demand_permille);
    println!("{c}");
    println!("  end demand ‰: {:?}", c.final_demand_permille);
    println!(
        "centralized one-shot plan: {} moves, balanced {}",
        plan.moves.len(),
        plan.balanced
    );
    assert!(d_end.is_balanced(800) && c_end.is_balanced(800));
    assert_eq!(d.ping_pongs + c.ping_pongs, 0);
    assert_eq!(d_end.vm_ids(), start.vm_ids());
    assert_eq!(c_end.vm_ids(), start.vm_ids());
    assert!(plan.balanced);
}

#[test]
fn power_of_two_choices_spread_equal_targets() {
    // Four equally loaded hosts: a fixed tie-break would send every source to the same one.
    let me = node(0);
    let peers: Vec<NodeId> = (1..=4).map(node).collect();
    let mut members = vec![member(me, "me", None, None)];
    members.extend(
        peers
            .iter()
            .map(|p| member(*p, &format!("p{}", p.short()), None, None)),
    );
    let roster = roster(members);
    let table: Vec<HostView> = peers.iter().map(|p| view(*p, 300, 0)).collect();
    let v = vm(1, 100, 1024, 0).summary;
    let cfg = PolicyConfig::default();
    let mut hits = BTreeMap::new();
    for seed in 0..200 {
        let c = choose_target(
            &cfg,
            &me,
            &v,
            &roster,
            &table,
            &mut StdRng::seed_from_u64(seed),
        )
        .expect("eligible");
        *hits.entry(c.target.node).or_insert(0u32) += 1;
    }
    assert_eq!(hits.len(), 4, "{hits:?}");
    assert!(hits.values().all(|&n| n >= 20), "{hits:?}");

    // With different loads, the most loaded of the four is never chosen (it always loses the
    // comparison), and the least loaded wins most often.
    let table: Vec<HostView> = peers
        .iter()
        .zip([100, 200, 300, 400])
        .map(|(p, d)| view(*p, d, 0))
        .collect();
    let mut hits = BTreeMap::new();
    for seed in 0..200 {
        let c = choose_target(
            &cfg,
            &me,
            &v,
            &roster,
            &table,
            &mut StdRng::seed_from_u64(seed),
        )
        .expect("eligible");
        *hits.entry(c.target.node).or_insert(0u32) += 1;
    }
    assert!(!hits.contains_key(&peers[3]), "{hits:?}");
    assert!(
        hits[&peers[0]] > hits[&peers[1]] && hits[&peers[1]] > hits[&peers[2]],
        "{hits:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Absurd numbers (from a buggy or hostile report, or a bad config) never panic: every
    /// sum saturates or widens.
    #[test]
    fn extreme_numbers_never_panic(
        sample in any::<u32>(),
        demand in any::<u32>(),
        reserved in any::<u32>(),
        vm_demand in any::<u32>(),
        memory in any::<u64>(),
        mem_used in any::<u64>(),
        mem_total in any::<u64>(),
        dirty in any::<u64>(),
        cpus in any::<u32>(),
        safety in prop_oneof![Just(0.0), Just(f64::NAN), Just(f64::INFINITY), Just(1e300), 0.01f64..10.0],
        seed in any::<u64>(),
    ) {
        let me = node(0);
        let other = node(1);
        let mut m = member(other, "o", None, None);
        m.capacity.cpus = cpus;
        let roster = roster(vec![member(me, "me", None, None), m]);
        let table = [HostView {
            node: other,
            demand_permille: demand,
            reserved_permille: reserved,
            mem_used_mib: mem_used,
            mem_total_mib: mem_total,
            age_ms: 0,
            groups: None,
        }];
        for detector in [
            Detector::Mad { safety },
            Detector::Iqr { safety },
            Detector::LocalRegression { safety, window: 0, robust: true },
        ] {
            let cfg = PolicyConfig { detector, min_history: 0, ..PolicyConfig::default() };
            let mut t = LoadTracker::new(&cfg);
            for s in [sample, u32::MAX, 0, sample] {
                t.observe(s, &cfg);
            }
            let mut v = vm(1, vm_demand, memory, dirty);
            v.last_moved_at = Some(Timestamp(u64::MAX));
            let vms = [v, vm(2, vm_demand, memory, dirty)];
            let st = LocalState { id: me, assessment: t.observe(sample, &cfg), vms: &vms };
            let d = decide(&cfg, &st, &roster, &table, NOW, &mut StdRng::seed_from_u64(seed));
            let _ = d.to_string();
        }
        let _ = scale_demand(vm_demand, u32::MAX, cpus);
        let _ = estimate_migration(memory, dirty, &MigrationModel { bandwidth_mib_per_s: 1, downtime_limit_ms: 0, max_rounds: u32::MAX });
    }
}
