//! A discrete-time simulator of a cluster under the balancing policy.
//!
//! Each tick, in [`Mode::Decentralized`]:
//!
//! 1. traced VMs take their demand for this tick;
//! 2. every host takes one sample (its VMs' demand) into its own [`LoadTracker`];
//! 3. every host sees the same snapshot of the table (fresh, exact reports with anti-affinity
//!    groups) and decides on its own with [`decide`], with its own RNG seeded for this tick;
//! 4. the offers reach their targets in a shuffled order; each target re-checks every offer
//!    against its own current numbers (what it already accepted this tick included), placement
//!    and memory, and at most `max_incoming_per_tick` arrivals (admission): accepted offers move
//!    the VM at once, refused sources try again on a later tick.
//!
//! In [`Mode::Centralized`] step 2 and 3 are replaced by [`plan_centralized`] over the whole
//! cluster, with the same per-host limits (one move out of a host, `max_incoming_per_tick` in,
//! per tick) and no hysteresis.
//!
//! A migration takes one tick. A VM moving back onto a host it was on before counts as a
//! ping-pong. Nothing is ever removed: VMs are only moved between hosts, which the report's
//! before and after VM counts show.

use std::collections::BTreeMap;

use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use super::baseline::{plan_centralized, MoveLimits};
use super::choose::{check_target, decide, LocalState, Outcome};
use super::cluster::{Cluster, ClusterError};
use super::detect::LoadTracker;
use super::{pick_index, PolicyConfig, PolicyError};
use crate::ids::{NodeId, VmId};
use crate::time::Timestamp;

/// A simulation runs at most this many ticks.
pub const MAX_SIM_TICKS: u32 = 1_000_000;

/// Who decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every host on its own, with admission at the target.
    Decentralized,
    /// One greedy planner over the whole cluster.
    Centralized,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Decentralized => "decentralized",
            Mode::Centralized => "centralized",
        })
    }
}

/// How to run a simulation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// The policy every host (or the planner) uses.
    pub policy: PolicyConfig,
    /// Who decides.
    pub mode: Mode,
    /// Ticks at most.
    pub max_ticks: u32,
    /// Length of a tick (one load sample, one decision, one migration), milliseconds.
    pub tick_ms: u64,
    /// The time of tick 0.
    pub start: Timestamp,
    /// Arrivals one target admits per tick.
    pub max_incoming_per_tick: u32,
    /// Seeds every host's RNG and the order offers arrive in.
    pub seed: u64,
    /// Stop at the first tick that ends with every host at or under the upper threshold.
    pub stop_when_balanced: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            policy: PolicyConfig::default(),
            mode: Mode::Decentralized,
            max_ticks: 200,
            tick_ms: 10_000,
            start: Timestamp(1_000_000),
            max_incoming_per_tick: 2,
            seed: 1,
            stop_when_balanced: true,
        }
    }
}

/// Why a simulation could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("max_ticks {0} exceeds {MAX_SIM_TICKS}")]
    TooManyTicks(u32),
    #[error("tick_ms must be positive")]
    ZeroTick,
}

/// What happened in a simulation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimReport {
    /// Who decided.
    pub mode: Mode,
    /// Ticks run.
    pub ticks_run: u32,
    /// The first tick count after which every host was at or under the upper threshold
    /// (0: balanced from the start).
    pub ticks_to_balance: Option<u32>,
    /// `ticks_to_balance × tick_ms`.
    pub time_to_balance_ms: Option<u64>,
    /// VMs moved.
    pub migrations: u32,
    /// Offers made (decentralized) or moves planned (centralized).
    pub offers: u32,
    /// Offers refused by the target's admission.
    pub refusals: u32,
    /// Decisions of overloaded hosts that found no VM or no target.
    pub no_move: u32,
    /// Moves of a VM back onto a host it had been on.
    pub ping_pongs: u32,
    /// The most moves of any one VM.
    pub max_moves_per_vm: u32,
    /// VMs at the start.
    pub vms_before: usize,
    /// VMs at the end.
    pub vms_after: usize,
    /// Hosts above the upper threshold, summed over the ticks (after each tick's moves).
    pub overloaded_host_ticks: u64,
    /// Estimated migration time of all moves, milliseconds.
    pub migration_ms: u64,
    /// Every host's demand at the end, in host order, permille.
    pub final_demand_permille: Vec<u32>,
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ticks = self
            .ticks_to_balance
            .map_or("never".to_string(), |t| t.to_string());
        let time = self
            .time_to_balance_ms
            .map_or("-".to_string(), |t| format!("{:.1} s", t as f64 / 1000.0));
        write!(
            f,
            "{:<13} ticks to balance {ticks:>5} ({time}), migrations {:>4}, offers {:>4}, \
             refused {:>3}, no-move {:>4}, ping-pong {}, max moves/VM {}, \
             overloaded host-ticks {}, est. migration time {:.1} s, VMs {} -> {}",
            self.mode.to_string(),
            self.migrations,
            self.offers,
            self.refusals,
            self.no_move,
            self.ping_pongs,
            self.max_moves_per_vm,
            self.overloaded_host_ticks,
            self.migration_ms as f64 / 1000.0,
            self.vms_before,
            self.vms_after,
        )
    }
}

struct Ledger {
    paths: BTreeMap<VmId, Vec<NodeId>>,
    report: SimReport,
}

impl Ledger {
    fn moved(&mut self, vm: VmId, from: NodeId, to: NodeId, estimate_ms: u64) {
        let path = self.paths.entry(vm).or_insert_with(|| vec![from]);
        if path.contains(&to) {
            self.report.ping_pongs = self.report.ping_pongs.saturating_add(1);
        }
        path.push(to);
        let moves = u32::try_from(path.len() - 1).unwrap_or(u32::MAX);
        self.report.max_moves_per_vm = self.report.max_moves_per_vm.max(moves);
        self.report.migrations = self.report.migrations.saturating_add(1);
        self.report.migration_ms = self.report.migration_ms.saturating_add(estimate_ms);
    }
}

/// Runs the simulation from `start` and returns its report and the final cluster. `R` is the
/// seeded RNG every host's decisions draw from; the same `start`, `cfg` and `R` give the same
/// result.
pub fn simulate<R: RngCore + SeedableRng>(
    start: &Cluster,
    cfg: &SimConfig,
) -> Result<(SimReport, Cluster), SimError> {
    cfg.policy.validate()?;
    start.check()?;
    if cfg.max_ticks > MAX_SIM_TICKS {
        return Err(SimError::TooManyTicks(cfg.max_ticks));
    }
    if cfg.tick_ms == 0 {
        return Err(SimError::ZeroTick);
    }
    let policy = &cfg.policy;
    let upper = policy.upper_permille;
    let mut cluster = start.clone();
    let n = cluster.hosts.len();
    let mut trackers: Vec<LoadTracker> = (0..n).map(|_| LoadTracker::new(policy)).collect();
    let mut master = R::seed_from_u64(cfg.seed);
    let mut ledger = Ledger {
        paths: BTreeMap::new(),
        report: SimReport {
            mode: cfg.mode,
            ticks_run: 0,
            ticks_to_balance: None,
            time_to_balance_ms: None,
            migrations: 0,
            offers: 0,
            refusals: 0,
            no_move: 0,
            ping_pongs: 0,
            max_moves_per_vm: 0,
            vms_before: start.vm_count(),
            vms_after: 0,
            overloaded_host_ticks: 0,
            migration_ms: 0,
            final_demand_permille: Vec::new(),
        },
    };
    cluster.apply_traces(0);
    if cluster.is_balanced(upper) {
        ledger.report.ticks_to_balance = Some(0);
        ledger.report.time_to_balance_ms = Some(0);
    }
    let done = |l: &Ledger| cfg.stop_when_balanced && l.report.ticks_to_balance.is_some();
    let mut tick = 0u32;
    while tick < cfg.max_ticks && !done(&ledger) {
        let now = cfg
            .start
            .plus_millis(u64::from(tick).saturating_mul(cfg.tick_ms));
        cluster.apply_traces(u64::from(tick));
        match cfg.mode {
            Mode::Decentralized => decentralized_tick(
                &mut cluster,
                &mut trackers,
                &mut master,
                cfg,
                now,
                &mut ledger,
            )?,
            Mode::Centralized => centralized_tick(&mut cluster, cfg, now, &mut ledger)?,
        }
        tick += 1;
        let over = (0..n).filter(|&i| cluster.demand(i) > upper).count();
        ledger.report.overloaded_host_ticks = ledger
            .report
            .overloaded_host_ticks
            .saturating_add(over as u64);
        if over == 0 && ledger.report.ticks_to_balance.is_none() {
            ledger.report.ticks_to_balance = Some(tick);
            ledger.report.time_to_balance_ms = Some(u64::from(tick).saturating_mul(cfg.tick_ms));
        }
    }
    let mut report = ledger.report;
    report.ticks_run = tick;
    report.vms_after = cluster.vm_count();
    report.final_demand_permille = cluster.demands();
    Ok((report, cluster))
}

fn decentralized_tick<R: RngCore + SeedableRng>(
    cluster: &mut Cluster,
    trackers: &mut [LoadTracker],
    master: &mut R,
    cfg: &SimConfig,
    now: Timestamp,
    ledger: &mut Ledger,
) -> Result<(), SimError> {
    let policy = &cfg.policy;
    let n = cluster.hosts.len();
    let views = cluster.views();
    // (source index, VM, target, estimated ms)
    let mut offers: Vec<(usize, VmId, NodeId, u64)> = Vec::new();
    for (i, tracker) in trackers.iter_mut().enumerate().take(n) {
        let seed = master.next_u64();
        let assessment = tracker.observe(cluster.demand(i), policy);
        if !assessment.wants_to_shed() {
            continue;
        }
        let mut rng = R::seed_from_u64(seed);
        let me = LocalState {
            id: cluster.hosts[i].id,
            assessment,
            vms: &cluster.hosts[i].vms,
        };
        let decision = decide(policy, &me, &cluster.roster, &views, now, &mut rng);
        match decision.outcome {
            Outcome::Move { vm, target, .. } => {
                offers.push((i, vm.vm, target.target.node, vm.estimate.total_ms))
            }
            Outcome::NoVm { .. } | Outcome::NoTarget { .. } => {
                ledger.report.no_move = ledger.report.no_move.saturating_add(1)
            }
            Outcome::Stay => {}
        }
    }
    // Offers arrive in a random order (Fisher-Yates with the master RNG).
    for k in (1..offers.len()).rev() {
        let j = pick_index(master, k + 1);
        offers.swap(k, j);
    }
    let mut arrivals = vec![0u32; n];
    for (s, vm, target, estimate_ms) in offers {
        ledger.report.offers = ledger.report.offers.saturating_add(1);
        let Some(t) = cluster.host_index(&target) else {
            ledger.report.refusals = ledger.report.refusals.saturating_add(1);
            continue;
        };
        let Some(summary) = cluster.hosts[s]
            .vms
            .iter()
            .find(|v| v.summary.id == vm)
            .map(|v| v.summary.clone())
        else {
            ledger.report.refusals = ledger.report.refusals.saturating_add(1);
            continue;
        };
        // The target's admission: its own current numbers, this tick's arrivals included.
        let admitted = arrivals[t] < cfg.max_incoming_per_tick
            && cluster.view(t).is_some_and(|view| {
                check_target(
                    policy,
                    &cluster.hosts[s].id,
                    cluster.cpus(s),
                    &summary,
                    cluster.member(t),
                    &view,
                )
                .is_ok()
            });
        if !admitted {
            ledger.report.refusals = ledger.report.refusals.saturating_add(1);
            continue;
        }
        let from = cluster.hosts[s].id;
        cluster.move_vm(&vm, s, t, now)?;
        arrivals[t] += 1;
        ledger.moved(vm, from, target, estimate_ms);
    }
    Ok(())
}

fn centralized_tick(
    cluster: &mut Cluster,
    cfg: &SimConfig,
    now: Timestamp,
    ledger: &mut Ledger,
) -> Result<(), SimError> {
    let limits = MoveLimits {
        out_per_host: 1,
        in_per_host: cfg.max_incoming_per_tick,
    };
    let plan = plan_centralized(cluster, &cfg.policy, limits, now, cluster.hosts.len());
    ledger.report.no_move = ledger
        .report
        .no_move
        .saturating_add(u32::try_from(plan.stuck.len()).unwrap_or(u32::MAX));
    for m in &plan.moves {
        ledger.report.offers = ledger.report.offers.saturating_add(1);
        let from = cluster
            .host_index(&m.from)
            .ok_or(ClusterError::NotAHost(m.from))?;
        let to = cluster
            .host_index(&m.to)
            .ok_or(ClusterError::NotAHost(m.to))?;
        cluster.move_vm(&m.vm, from, to, now)?;
        ledger.moved(m.vm, m.from, m.to, m.estimate_ms);
    }
    Ok(())
}
