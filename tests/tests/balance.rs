//! Decentralized balancing with real `drift run` processes on loopback: every host decides on
//! its own (its autopilot), negotiates with its target on the migration stream, and the
//! target's admission has the last word.
//!
//! - convergence: 6 nodes start with the `drift testnet --nodes 6 --vms-per-node 4 --skew 0.5`
//!   placement; within a bounded time every host is at or under the upper threshold, with a
//!   bounded number of migrations, no VM moved twice, every VM on exactly one host and clean.
//!   Prints the time to balance and the migrations next to the centralized greedy baseline
//!   (`policy::plan_centralized`, and the simulator in both modes) on the same starting state;
//! - herd: 10 overloaded hosts and 1 idle host decide at once; the idle host ends at or under
//!   the threshold (its admission refuses the excess), refused sources decide again later,
//!   no VM is lost;
//! - jurisdiction: VMs allowed only in `fr` are never offered to the `de` host, the only one
//!   with room; the autopilot says why nothing moves, and a forced offer is refused and audited;
//! - offer flood: a member floods a target with offers, replays and offers it relays for a
//!   non-member; all refused without holding capacity beyond the concurrency limit, and the
//!   target keeps serving an honest source.
//!
//! The tests run one at a time (a lock): each is a whole cluster on a small machine. Starting
//! states are built with balancing off, then every node restarts with it on (sandbox VMs
//! outlive their node), so every host starts deciding from the complete starting state.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use drift_node::autopilot::{Action, DecisionRecord, PolicyRng};
use drift_node::config::Config;
use drift_node::hypervisor::{RunState, VmView};
use drift_node::mesh::peer_id;
use drift_node::migration::frames::{read_typed, write_typed};
use drift_node::migration::service::PROTOCOL;
use drift_protocol::migration::{
    MigrationDecision, MigrationOffer, Mode, Placement, Verdict, VmSummary,
};
use drift_protocol::policy::{
    self, ClusterHost, HostedVm, MoveLimits, Outcome, PolicyConfig, SimConfig, SimMode,
};
use drift_protocol::{MigrationId, NodeId, SecretKey, Signed, VmId};
use drift_tests::api::{all_there_and_clean, restart_all, start_unbalanced, Api, DIRTY_MIB_PER_S};
use drift_tests::{drift, drift_ok, wait_until, Cluster};
use rand_core::{OsRng, RngCore};
use tokio_util::compat::FuturesAsyncReadCompatExt;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn demand(vms: &[VmView]) -> u32 {
    vms.iter().map(|v| v.demand_permille).sum()
}

/// The policy view of a starting placement: the roster and every host's VMs.
fn policy_cluster(c: &Cluster, start: &[Vec<VmView>]) -> policy::Cluster {
    let signed = drift_node::identity::read_signed_roster(&c.path().join("roster")).unwrap();
    let roster = signed.signed.verify().unwrap();
    let hosts = c
        .nodes
        .iter()
        .zip(start)
        .map(|(n, vms)| ClusterHost {
            id: n.node.id,
            vms: vms
                .iter()
                .map(|v| HostedVm {
                    summary: VmSummary {
                        id: v.id,
                        name: v.name.clone(),
                        memory_mib: v.memory_mib,
                        vcpus: v.vcpus,
                        demand_permille: v.demand_permille,
                        placement: v.placement.clone(),
                        qemu: None,
                    },
                    dirty_pages_per_s: (DIRTY_MIB_PER_S * 256.0) as u64,
                    last_moved_at: None,
                })
                .collect(),
        })
        .collect();
    policy::Cluster {
        roster,
        hosts,
        traces: BTreeMap::new(),
    }
}

fn balance_settings(interval: &str, extra: &str) -> String {
    format!(
        "interval = \"{interval}\"\nhysteresis = 2\ncooldown = \"10m\"\nrefusal_backoff = \"1s\"\n{extra}"
    )
}

fn policy_of(c: &Cluster) -> PolicyConfig {
    Config::load(&c.nodes[0].node.config)
        .unwrap()
        .balance
        .policy()
}

#[test]
fn a_skewed_testnet_balances_itself_with_few_moves_and_no_ping_pong() {
    let _serial = serial();
    const NODES: usize = 6;
    const PER_NODE: usize = 4;
    const SKEW: f64 = 0.5;
    let interval = Duration::from_millis(300);
    let mut c = start_unbalanced(NODES, interval, Duration::from_secs(60));
    let api = Api::new();
    // The placement of `drift testnet --nodes 6 --vms-per-node 4 --skew 0.5`.
    let plan = drift_node::testnet::plan_vms(NODES, PER_NODE, SKEW);
    for vm in &plan {
        api.create(&c, vm.node, &vm.name, 8, vm.demand, &[]);
    }
    let names: BTreeSet<String> = plan.iter().map(|v| v.name.clone()).collect();
    let start = api.placement(&c);
    let start_demand: Vec<u32> = start.iter().map(|v| demand(v)).collect();

    restart_all(&mut c, &balance_settings("300ms", ""));
    let policy = policy_of(&c);
    let upper = policy.upper_permille;
    assert!(
        start_demand.iter().any(|d| *d > upper),
        "the starting state must be unbalanced: {start_demand:?}"
    );
    let t0 = Instant::now();
    let balanced = wait_until(Duration::from_secs(90), Duration::from_millis(200), || {
        if api.moving(&c) {
            return None;
        }
        let p = api.placement(&c);
        let count: usize = p.iter().map(Vec::len).sum();
        (count == names.len() && p.iter().all(|v| demand(v) <= upper)).then_some(t0.elapsed())
    });
    let Some(time_to_balance) = balanced else {
        let now: Vec<u32> = api.placement(&c).iter().map(|v| demand(v)).collect();
        let logs: Vec<String> = c.nodes.iter().map(|n| n.log_tail()).collect();
        panic!(
            "not balanced within 90 s: {now:?} (upper {upper})\n{}",
            logs.join("\n---\n")
        );
    };
    let moves_at_balance = api.moves(&c).len();
    // It stays balanced: nothing moves back.
    std::thread::sleep(interval * 8);
    assert!(!api.moving(&c), "moves after balance");
    let moves = api.moves(&c);
    assert_eq!(
        moves.len(),
        moves_at_balance,
        "moves after balance: {moves:?}"
    );
    let end: Vec<u32> = api.placement(&c).iter().map(|v| demand(v)).collect();
    assert!(end.iter().all(|d| *d <= upper), "{end:?}");

    // No VM moved twice (so none moved back and forth).
    let mut per_vm = BTreeMap::<&str, usize>::new();
    for (vm, _, _) in &moves {
        *per_vm.entry(vm.as_str()).or_default() += 1;
    }
    assert!(
        per_vm.values().all(|n| *n == 1),
        "a VM moved more than once: {moves:?}"
    );
    all_there_and_clean(&api, &c, &names);

    // The centralized baseline on the same starting state, with the same thresholds.
    let cluster = policy_cluster(&c, &start);
    let now = drift_node::clock::now();
    let central = policy::plan_centralized(&cluster, &policy, MoveLimits::UNLIMITED, now, 1000);
    assert!(
        central.balanced,
        "the baseline cannot balance it: {central:?}"
    );
    assert!(
        moves.len() <= 2 * central.moves.len() + 2,
        "{} migrations, the centralized plan needs {}",
        moves.len(),
        central.moves.len()
    );
    let tick_ms = interval.as_millis() as u64;
    let sim = |mode| {
        policy::simulate::<PolicyRng>(
            &cluster,
            &SimConfig {
                policy,
                mode,
                max_ticks: 1000,
                tick_ms,
                start: now,
                max_incoming_per_tick: 2,
                seed: 1,
                stop_when_balanced: true,
            },
        )
        .unwrap()
        .0
    };
    let sim_central = sim(SimMode::Centralized);
    let sim_decentral = sim(SimMode::Decentralized);
    let decisions = api.all_decisions(&c);
    let count = |f: &dyn Fn(&Action) -> bool| -> usize {
        decisions.iter().flatten().filter(|r| f(&r.action)).count()
    };
    let refused = count(&|a| matches!(a, Action::Refused { .. } | Action::Unreachable { .. }));
    let offers = count(&|a| matches!(a, Action::Offered { .. })) + refused;
    let ticks =
        |t: Option<u64>| t.map_or("never".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
    println!(
        "balance: {NODES} nodes, {} VMs, skew {SKEW}; start {start_demand:?}‰, end {end:?}‰, upper {upper}‰",
        names.len()
    );
    println!(
        "  decentralized, measured ({NODES} drift processes, decisions every {tick_ms} ms, \
         hysteresis {}): balanced after {:.1} s, {} migrations ({offers} offers, {refused} refused)",
        policy.hysteresis,
        time_to_balance.as_secs_f64(),
        moves.len()
    );
    println!(
        "  decentralized, simulated (same start, tick {tick_ms} ms):      balanced after {} ({} ticks), {} migrations",
        ticks(sim_decentral.time_to_balance_ms),
        sim_decentral.ticks_to_balance.map_or(-1, i64::from),
        sim_decentral.migrations
    );
    println!(
        "  centralized greedy, simulated (same start, tick {tick_ms} ms): balanced after {} ({} ticks), {} migrations; one-shot plan: {} moves",
        ticks(sim_central.time_to_balance_ms),
        sim_central.ticks_to_balance.map_or(-1, i64::from),
        sim_central.migrations,
        central.moves.len()
    );
}

#[test]
fn a_herd_of_ten_overloaded_hosts_does_not_overload_the_one_idle_host() {
    let _serial = serial();
    const HOSTS: usize = 11;
    let idle = HOSTS - 1;
    let interval = Duration::from_millis(500);
    let mut c = start_unbalanced(HOSTS, interval, Duration::from_secs(90));
    let api = Api::new();
    // Ten hosts at 900‰: each would shed its small VM (300‰, quickest to move) to the only
    // host with room, which can take two of them.
    let mut names = BTreeSet::new();
    for i in 0..idle {
        for (vm, mib, d) in [("a", 4, 0.3), ("b", 8, 0.6)] {
            let name = format!("h{}-{vm}", i + 1);
            api.create(&c, i, &name, mib, d, &[]);
            names.insert(name);
        }
    }
    restart_all(&mut c, &balance_settings("500ms", ""));
    let upper = policy_of(&c).upper_permille;
    let idle_id = c.nodes[idle].node.id;
    // Settled: something arrived, nothing moves, and the count of moves holds for 3 s.
    let t0 = Instant::now();
    let mut last = (usize::MAX, Instant::now());
    let settled = wait_until(Duration::from_secs(120), Duration::from_millis(250), || {
        if api.moving(&c) {
            return None;
        }
        let n = api.moves(&c).len();
        if n != last.0 {
            last = (n, Instant::now());
            return None;
        }
        (n > 0 && last.1.elapsed() > Duration::from_secs(3)).then_some(t0.elapsed())
    });
    let Some(took) = settled else {
        panic!(
            "the herd did not settle: moves {:?}, idle host {:?}",
            api.moves(&c),
            api.vms(&c, idle)
        );
    };
    let idle_vms = api.vms(&c, idle).unwrap();
    let idle_load = demand(&idle_vms);
    assert!(
        idle_load <= upper,
        "the idle host was pushed to {idle_load}‰ (upper {upper}‰): {idle_vms:?}"
    );
    let moves = api.moves(&c);
    assert!(moves.iter().all(|(_, _, to)| *to == idle), "{moves:?}");
    all_there_and_clean(&api, &c, &names);

    // The excess was refused by admission, and every refused source decided again later,
    // with the idle host back among its candidates.
    let decisions = api.all_decisions(&c);
    let mut refused_sources = 0;
    let mut refusals = 0;
    for (i, records) in decisions.iter().enumerate().take(idle) {
        let refused: Vec<&DecisionRecord> = records
            .iter()
            .filter(|r| {
                matches!(
                    r.action,
                    Action::Refused { .. } | Action::Unreachable { .. }
                )
            })
            .collect();
        if refused.is_empty() {
            continue;
        }
        refused_sources += 1;
        refusals += refused.len();
        let last_refusal = refused.last().unwrap();
        let retry_after = match &last_refusal.action {
            Action::Refused { retry_after, .. } | Action::Unreachable { retry_after, .. } => {
                *retry_after
            }
            _ => unreachable!(),
        };
        let retried = records.iter().any(|r| {
            r.seq > last_refusal.seq
                && r.decision.at >= retry_after
                && !r.backing_off.contains(&idle_id)
        });
        assert!(
            retried,
            "node {i} was refused and never decided again with the idle host: {records:#?}"
        );
    }
    assert!(refusals > 0, "no offer was refused: no herd formed");
    let audit = drift_ok(&[
        "audit",
        "show",
        "--json",
        "--config",
        c.nodes[idle].node.config.to_str().unwrap(),
    ]);
    let refused_at_idle = audit
        .lines()
        .filter(|l| l.contains("\"Refused\"") && l.contains("offer refused"))
        .count();
    println!(
        "herd: {} overloaded hosts, 1 idle; settled after {:.1} s with the idle host at {idle_load}‰ \
         ({} VMs); {} migrations; {refusals} offers refused ({refused_sources} sources), \
         {refused_at_idle} refusals audited by the idle host",
        idle,
        took.as_secs_f64(),
        idle_vms.len(),
        moves.len()
    );
}

#[test]
fn a_vm_pinned_to_a_jurisdiction_is_never_offered_outside_it() {
    let _serial = serial();
    // Testnet labels: node-1 is in jurisdiction fr, node-2 in de.
    let mut c = start_unbalanced(2, Duration::from_millis(300), Duration::from_secs(60));
    let api = Api::new();
    // node-1 at 1150‰: four fr-only VMs (1000‰) and one that may go anywhere.
    let mut names = BTreeSet::new();
    for k in 1..=4 {
        let name = format!("fr-{k}");
        api.create(&c, 0, &name, 4, 0.25, &["fr"]);
        names.insert(name);
    }
    api.create(&c, 0, "free-1", 4, 0.15, &[]);
    names.insert("free-1".to_string());
    let ids: BTreeMap<String, VmId> = api
        .vms(&c, 0)
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.id))
        .collect();
    restart_all(&mut c, &balance_settings("300ms", ""));

    // The free VM moves; then node-1 says why nothing else can.
    let why_nothing = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        if api.moving(&c) || api.vms(&c, 1)?.len() != 1 {
            return None;
        }
        let last = api.decisions(&c, 0)?.decisions.last()?.clone();
        match &last.decision.outcome {
            Outcome::NoTarget { tried, .. } if !tried.is_empty() => Some(last),
            _ => None,
        }
    })
    .unwrap_or_else(|| {
        panic!(
            "node-1 did not settle on `no target`: {:#?}\nnode-2 VMs {:?}",
            api.decisions(&c, 0),
            api.vms(&c, 1)
        )
    });
    let Outcome::NoTarget { tried, .. } = &why_nothing.decision.outcome else {
        unreachable!()
    };
    for miss in tried {
        assert!(miss.name.starts_with("fr-"), "{miss:?}");
        assert_eq!(miss.why.excluded.jurisdiction, 1, "{miss:?}");
    }
    let node2: Vec<String> = api
        .vms(&c, 1)
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(node2, vec!["free-1".to_string()]);
    let text = drift_ok(&[
        "decisions",
        "--last",
        "3",
        "--socket",
        c.nodes[0].node.socket.to_str().unwrap(),
    ]);
    assert!(
        text.contains("no target") && text.contains("jurisdiction 1"),
        "{text}"
    );

    // No offer for a fr VM was ever made or received.
    let audit = |i: usize| -> Vec<serde_json::Value> {
        drift_ok(&[
            "audit",
            "show",
            "--json",
            "--config",
            c.nodes[i].node.config.to_str().unwrap(),
        ])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .collect()
    };
    let free = ids["free-1"].to_string();
    let offered: Vec<String> = audit(0)
        .iter()
        .filter_map(|e| Some(e.get("OfferSent")?["vm"].as_str()?.to_string()))
        .collect();
    assert_eq!(offered, vec![free.clone()], "offers sent by node-1");
    let received: Vec<String> = audit(1)
        .iter()
        .filter_map(|e| Some(e.get("OfferReceived")?["vm"].as_str()?.to_string()))
        .collect();
    assert_eq!(received, vec![free], "offers received by node-2");
    assert!(
        audit(1).iter().all(|e| e.get("Refused").is_none()),
        "node-2 refused something it should never have been offered"
    );

    // Forced by hand, the offer is refused by node-2's admission and audited there.
    let out = drift(&[
        "migrate",
        "fr-1",
        "--to",
        "node-2",
        "--socket",
        c.nodes[0].node.socket.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("jurisdiction"),
        "{err}"
    );
    let audited = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        audit(1)
            .iter()
            .any(|e| {
                e.get("Refused").is_some_and(|r| {
                    r["reason"]
                        .as_str()
                        .is_some_and(|s| s.contains("jurisdiction"))
                })
            })
            .then_some(())
    });
    assert!(audited.is_some(), "node-2 did not audit the refusal");
    all_there_and_clean(&api, &c, &names);
    let node1: BTreeSet<String> = api
        .vms(&c, 0)
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(node1.len(), 4);
    assert!(node1.iter().all(|n| n.starts_with("fr-")));
    println!("jurisdiction: {}", why_nothing.explanation);
}

fn flood_offer(source: &SecretKey, target: NodeId, k: usize) -> Signed<MigrationOffer> {
    let now = drift_node::clock::now();
    let mut nonce = [0u8; 16];
    OsRng.fill_bytes(&mut nonce);
    let offer = MigrationOffer {
        id: MigrationId::random(&mut OsRng),
        source: source.public(),
        target,
        vm: VmSummary {
            id: VmId::random(&mut OsRng),
            name: format!("flood-{k}"),
            memory_mib: 1,
            vcpus: 1,
            demand_permille: 100,
            placement: Placement::default(),
            qemu: None,
        },
        mode: Mode::PreCopy,
        nonce,
        issued_at: now,
        expires_at: now.plus_millis(30_000),
        roster_epoch: 1,
        data_connections: 0,
    };
    Signed::sign(&offer, source)
}

type Stream = tokio_util::compat::Compat<libp2p::Stream>;

/// Sends an offer on a new migration stream: the stream and the verdict label (`accepted`,
/// a reject label, or `no answer`).
async fn offer_once(
    mesh: &drift_node::mesh::Client,
    to: &NodeId,
    signed: &Signed<MigrationOffer>,
) -> (Stream, String) {
    let mut control = mesh.streams();
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(peer_id(to), PROTOCOL),
    )
    .await
    .expect("stream opens in time")
    .expect("stream opens")
    .compat();
    write_typed(&mut s, signed).await.unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(15),
        read_typed::<_, Signed<MigrationDecision>>(&mut s, 64 * 1024),
    )
    .await;
    let label = match answer {
        Ok(Ok(d)) => match d.verify_by(to).unwrap().verdict {
            Verdict::Accept { .. } => "accepted".to_string(),
            Verdict::Reject(r) => r.label().to_string(),
        },
        _ => "no answer".to_string(),
    };
    (s, label)
}

#[test]
fn an_offer_flood_is_refused_without_holding_capacity_and_the_target_keeps_serving() {
    let _serial = serial();
    // X (node-1) and an honest source H (node-2) are processes; the adversary A (node-3) is a
    // roster member in this process.
    let mut c = Cluster::generate(3, Duration::from_millis(300));
    c.nodes[0].start();
    c.nodes[1].start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = Config::load(&c.nodes[2].node.config).unwrap();
    let key = drift_node::identity::read_key(&config.node.key).unwrap();
    let adversary = rt.block_on(drift_node::daemon::start(config)).unwrap();
    c.wait_converged_subset(&[0, 1], 3, Duration::from_secs(60))
        .unwrap();
    let api = Api::new();
    let x = c.nodes[0].node.id;
    let mesh = adversary.mesh.clone();
    let mut tally = BTreeMap::<String, usize>::new();
    let mut held = Vec::new();

    // Offers signed by a non-member, relayed by A: refused as not signed by the stream's
    // peer, before any rate count, so they cost A none of its own allowance.
    let outsider = SecretKey::generate(&mut OsRng);
    for k in 0..10 {
        let (_, label) = rt.block_on(offer_once(&mesh, &x, &flood_offer(&outsider, x, k)));
        assert_eq!(
            label, "wrong_signer",
            "a non-member's offer was not refused as such"
        );
    }
    // A flood of distinct, valid offers from A; accepted streams are held open (the
    // transfers never start), so their reservations stay.
    let mut accepted = Vec::new();
    for k in 0..25 {
        let offer = flood_offer(&key, x, k);
        let (s, label) = rt.block_on(offer_once(&mesh, &x, &offer));
        if label == "accepted" {
            held.push(s);
            accepted.push(offer);
        }
        *tally.entry(label).or_default() += 1;
    }
    // Replays of an accepted offer.
    for _ in 0..3 {
        let (_, label) = rt.block_on(offer_once(&mesh, &x, &accepted[0]));
        *tally.entry(format!("replay: {label}")).or_default() += 1;
    }
    // More, past the per-source rate limit (30 a minute).
    for k in 25..35 {
        let (s, label) = rt.block_on(offer_once(&mesh, &x, &flood_offer(&key, x, k)));
        if label == "accepted" {
            held.push(s);
        }
        *tally.entry(label).or_default() += 1;
    }
    println!("flood verdicts: {tally:?}");
    // One source holds at most `admission.per_source` (1) of X's incoming slots: the rest of
    // the flood is refused for its share until the rate limit (30 a minute) refuses it unread.
    let expect = BTreeMap::from([
        ("accepted".to_string(), 1),
        ("source_share".to_string(), 26),
        ("replay: replayed".to_string(), 3),
        ("rate_limited".to_string(), 8),
    ]);
    assert_eq!(tally, expect);

    // Only the accepted offer holds capacity at X (as an empty incoming VM).
    let held_capacity = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let t = api.table(&c, 0)?;
        let me = t.rows.iter().find(|r| r.me)?;
        let vms = api.vms(&c, 0)?;
        (vms.len() == 1).then_some((me.vm_demand? + me.reserved?, vms))
    });
    let (held_load, incoming) = held_capacity.expect("X reports its accepted migration");
    assert!(
        held_load <= 0.2 + 1e-9,
        "X holds {held_load} of its capacity"
    );
    assert!(
        incoming.iter().all(|v| v.state == RunState::Incoming),
        "{incoming:?}"
    );

    // A gives up; X discards what it held and frees the capacity.
    drop(held);
    let freed = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let t = api.table(&c, 0)?;
        let me = t.rows.iter().find(|r| r.me)?;
        (api.vms(&c, 0)?.is_empty() && me.reserved == Some(0.0) && me.vm_demand == Some(0.0))
            .then_some(())
    });
    assert!(freed.is_some(), "X did not free the flood's capacity");

    // X keeps serving: an honest source moves a VM to it.
    let h_sock = c.nodes[1].node.socket.to_str().unwrap().to_string();
    drift_ok(&[
        "vm",
        "create",
        "honest",
        "--memory-mib",
        "8",
        "--demand",
        "0.1",
        "--socket",
        &h_sock,
    ]);
    let out = drift_ok(&[
        "migrate", "honest", "--to", "node-1", "--watch", "--socket", &h_sock,
    ]);
    assert!(out.contains("committed"), "{out}");
    let x_sock = c.nodes[0].node.socket.to_str().unwrap().to_string();
    assert!(drift_ok(&["vm", "verify", "honest", "--socket", &x_sock]).starts_with("ok:"));

    // Every refusal is on X's audit record, and the record verifies.
    let config = c.nodes[0].node.config.to_str().unwrap().to_string();
    let audit = drift_ok(&["audit", "show", "--json", "--config", &config]);
    let reasons: Vec<&str> = ["wrong_signer", "source_share", "replayed", "rate_limited"]
        .into_iter()
        .filter(|r| {
            !audit
                .lines()
                .any(|l| l.contains("\"Refused\"") && l.contains(r))
        })
        .collect();
    assert!(reasons.is_empty(), "X did not audit: {reasons:?}");
    assert!(drift_ok(&["audit", "verify", "--config", &config]).starts_with("ok:"));
    rt.block_on(adversary.shutdown());
}
