//! Which VM to move and where: VM ranking, target eligibility, power-of-two-choices target
//! choice, and [`decide`], which puts them together into an explained [`Decision`].

use std::collections::BTreeMap;
use std::fmt;

use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use super::detect::Assessment;
use super::{pick_index, scale_demand, MigrationModel, PolicyConfig};
use crate::ids::{NodeId, VmId};
use crate::migration::{PlacementViolation, VmSummary};
use crate::report::LoadReport;
use crate::roster::{Member, Roster};
use crate::time::Timestamp;
use crate::transfer::PAGE_SIZE;

/// [`decide`] tries at most this many VMs (in rank order) before it gives up for this sample.
pub const MAX_VM_TRIES: usize = 8;

const MIB: f64 = 1024.0 * 1024.0;

/// A VM on this host as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedVm {
    /// Identity, size, CPU demand (permille of this host) and placement constraints.
    pub summary: VmSummary,
    /// Pages the guest dirties per second (drives the pre-copy estimate).
    pub dirty_pages_per_s: u64,
    /// When the VM last arrived on this host by migration, if it did.
    pub last_moved_at: Option<Timestamp>,
}

impl HostedVm {
    /// Whether the VM moved less than `cooldown_ms` before `now` (a time after `now` counts as
    /// just moved).
    pub fn on_cooldown(&self, now: Timestamp, cooldown_ms: u64) -> bool {
        self.last_moved_at
            .is_some_and(|at| now.millis_since(at) < cooldown_ms)
    }
}

/// How long moving a VM by pre-copy is expected to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationEstimate {
    /// Whole migration, milliseconds.
    pub total_ms: u64,
    /// The final stop-and-copy, milliseconds.
    pub downtime_ms: u64,
    /// Pre-copy rounds before the stop-and-copy.
    pub rounds: u32,
    /// Whether the downtime fits the limit (the dirty rate is below the bandwidth enough).
    pub converges: bool,
}

/// Estimates a pre-copy migration: round 0 sends all memory, each later round sends what was
/// dirtied during the previous one (at most all memory), until what is left fits the downtime
/// limit or the round limit is reached; then stop-and-copy sends the rest.
pub fn estimate_migration(
    memory_mib: u64,
    dirty_pages_per_s: u64,
    model: &MigrationModel,
) -> MigrationEstimate {
    let bandwidth = f64::from(model.bandwidth_mib_per_s.max(1));
    let dirty = dirty_pages_per_s as f64 * PAGE_SIZE as f64 / MIB;
    let memory = memory_mib as f64;
    let limit_s = f64::from(model.downtime_limit_ms) / 1000.0;
    let mut remaining = memory;
    let mut total_s = 0.0;
    let mut rounds = 0u32;
    loop {
        let send_s = remaining / bandwidth;
        if send_s <= limit_s || rounds >= model.max_rounds.min(super::MAX_MODEL_ROUNDS) {
            total_s += send_s;
            return MigrationEstimate {
                total_ms: millis(total_s),
                downtime_ms: millis(send_s),
                rounds,
                converges: send_s <= limit_s,
            };
        }
        total_s += send_s;
        rounds += 1;
        remaining = (dirty * send_s).min(memory);
    }
}

fn millis(seconds: f64) -> u64 {
    let ms = (seconds * 1000.0).ceil();
    if ms.is_nan() || ms <= 0.0 {
        0
    } else if ms >= u64::MAX as f64 {
        u64::MAX
    } else {
        ms as u64
    }
}

/// One VM as a candidate to move, with the figures that ranked it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmChoice {
    /// The VM.
    pub vm: VmId,
    /// Its name.
    pub name: String,
    /// Its CPU demand, permille of this host.
    pub demand_permille: u32,
    /// Its memory.
    pub memory_mib: u64,
    /// The estimated migration.
    pub estimate: MigrationEstimate,
    /// Whether moving it alone brings this host to or under the upper threshold.
    pub ends_overload: bool,
    /// This host's load before the move, permille.
    pub host_before_permille: u32,
    /// This host's load after the move, permille.
    pub host_after_permille: u32,
    /// The upper threshold it was measured against, permille.
    pub upper_permille: u32,
}

/// The VMs of a host in the order they should be tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRanking {
    /// Best first: the VMs whose move ends the overload, by estimated migration time; then the
    /// others, largest demand first (they shed the most). Ties by VM id.
    pub ranked: Vec<VmChoice>,
    /// VMs on the host.
    pub total: u32,
    /// VMs skipped because they moved within the cooldown.
    pub on_cooldown: u32,
    /// VMs skipped because they have no CPU demand (moving them sheds nothing).
    pub idle: u32,
}

/// Ranks the VMs of a host whose load is `host_permille` against `upper_permille`, skipping
/// VMs on cooldown and VMs without demand.
pub fn rank_vms(
    cfg: &PolicyConfig,
    host_permille: u32,
    upper_permille: u32,
    vms: &[HostedVm],
    now: Timestamp,
) -> VmRanking {
    let mut ranking = VmRanking {
        ranked: Vec::with_capacity(vms.len()),
        total: u32::try_from(vms.len()).unwrap_or(u32::MAX),
        on_cooldown: 0,
        idle: 0,
    };
    for vm in vms {
        if vm.on_cooldown(now, cfg.cooldown_ms) {
            ranking.on_cooldown += 1;
            continue;
        }
        let demand = vm.summary.demand_permille;
        if demand == 0 {
            ranking.idle += 1;
            continue;
        }
        let after = host_permille.saturating_sub(demand);
        ranking.ranked.push(VmChoice {
            vm: vm.summary.id,
            name: vm.summary.name.clone(),
            demand_permille: demand,
            memory_mib: vm.summary.memory_mib,
            estimate: estimate_migration(
                vm.summary.memory_mib,
                vm.dirty_pages_per_s,
                &cfg.migration,
            ),
            ends_overload: after <= upper_permille,
            host_before_permille: host_permille,
            host_after_permille: after,
            upper_permille,
        });
    }
    ranking.ranked.sort_by(|a, b| {
        b.ends_overload
            .cmp(&a.ends_overload)
            .then_with(|| {
                if a.ends_overload {
                    a.estimate.total_ms.cmp(&b.estimate.total_ms)
                } else {
                    b.demand_permille
                        .cmp(&a.demand_permille)
                        .then(a.estimate.total_ms.cmp(&b.estimate.total_ms))
                }
            })
            .then(a.vm.cmp(&b.vm))
    });
    ranking
}

/// What the source knows about a possible target, from its newest report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// The host.
    pub node: NodeId,
    /// Its VMs' CPU demand, permille of its capacity.
    pub demand_permille: u32,
    /// CPU it has reserved for accepted incoming migrations, permille of its capacity.
    pub reserved_permille: u32,
    /// Memory in use.
    pub mem_used_mib: u64,
    /// Memory in total.
    pub mem_total_mib: u64,
    /// How old the report is, milliseconds (measured by the caller's clock).
    pub age_ms: u64,
    /// Anti-affinity groups of the VMs it holds, when known. Unknown groups do not exclude
    /// the host: its admission checks them.
    pub groups: Option<Vec<String>>,
}

impl HostView {
    /// The view from a report received `age_ms` ago (groups unknown).
    pub fn from_report(report: &LoadReport, age_ms: u64) -> Self {
        Self {
            node: report.node,
            demand_permille: report.vm_demand_permille,
            reserved_permille: report.reserved_permille,
            mem_used_mib: report.mem_used_mib,
            mem_total_mib: report.mem_total_mib,
            age_ms,
            groups: None,
        }
    }
}

/// Why a host is not an eligible target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exclusion {
    /// It is the source itself.
    IsSelf,
    /// Its report is older than the maximum age.
    Stale,
    /// It is not in the roster.
    NotMember,
    /// It is in the roster without the host role.
    NotHost,
    /// Its jurisdiction is not among the VM's allowed ones.
    Jurisdiction,
    /// Its region is not among the VM's allowed ones.
    Region,
    /// It holds a VM of the VM's anti-affinity group.
    AntiAffinity,
    /// The VM's memory does not fit.
    NoMemory,
    /// Its load plus reservations plus the VM would exceed the upper threshold.
    OverThreshold,
}

impl From<PlacementViolation> for Exclusion {
    fn from(v: PlacementViolation) -> Self {
        match v {
            PlacementViolation::Jurisdiction { .. } => Exclusion::Jurisdiction,
            PlacementViolation::Region { .. } => Exclusion::Region,
            PlacementViolation::AntiAffinity(_) => Exclusion::AntiAffinity,
            PlacementViolation::NotAHost => Exclusion::NotHost,
        }
    }
}

/// How many hosts were excluded, per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Exclusions {
    /// The source itself.
    pub is_self: u32,
    /// Reports too old.
    pub stale: u32,
    /// Not in the roster.
    pub not_member: u32,
    /// Roster members without the host role.
    pub not_host: u32,
    /// Jurisdiction not allowed.
    pub jurisdiction: u32,
    /// Region not allowed.
    pub region: u32,
    /// Anti-affinity group already there.
    pub anti_affinity: u32,
    /// Memory does not fit.
    pub no_memory: u32,
    /// Would exceed the upper threshold.
    pub over_threshold: u32,
}

impl Exclusions {
    /// Counts one exclusion.
    pub fn add(&mut self, why: Exclusion) {
        let slot = match why {
            Exclusion::IsSelf => &mut self.is_self,
            Exclusion::Stale => &mut self.stale,
            Exclusion::NotMember => &mut self.not_member,
            Exclusion::NotHost => &mut self.not_host,
            Exclusion::Jurisdiction => &mut self.jurisdiction,
            Exclusion::Region => &mut self.region,
            Exclusion::AntiAffinity => &mut self.anti_affinity,
            Exclusion::NoMemory => &mut self.no_memory,
            Exclusion::OverThreshold => &mut self.over_threshold,
        };
        *slot = slot.saturating_add(1);
    }

    /// `(label, count)` of every reason, in a fixed order.
    pub fn counts(&self) -> [(&'static str, u32); 9] {
        [
            ("self", self.is_self),
            ("stale", self.stale),
            ("not_member", self.not_member),
            ("not_host", self.not_host),
            ("jurisdiction", self.jurisdiction),
            ("region", self.region),
            ("anti_affinity", self.anti_affinity),
            ("no_memory", self.no_memory),
            ("over_threshold", self.over_threshold),
        ]
    }

    /// Hosts excluded in all.
    pub fn total(&self) -> u32 {
        self.counts()
            .iter()
            .fold(0u32, |acc, (_, n)| acc.saturating_add(*n))
    }
}

impl fmt::Display for Exclusions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (label, n) in self.counts() {
            if n > 0 {
                if !first {
                    f.write_str(", ")?;
                }
                write!(f, "{label} {n}")?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// An eligible target and the figures that made it so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The host.
    pub node: NodeId,
    /// Its load as reported plus its reservations, permille.
    pub load_permille: u32,
    /// The VM's demand in permille of this host's capacity.
    pub vm_demand_permille: u32,
    /// `load + vm demand`: its load after the move, permille.
    pub projected_permille: u32,
}

/// Whether the host `view` (roster entry `member`) may take `vm` from `source`, by the numbers
/// the caller knows: not the source, fresh, a member with the host role, placement satisfied,
/// memory fits, and its load plus reservations plus the VM's demand (scaled to its capacity
/// from the source's `source_cpus`) stays at or under the upper threshold.
pub fn check_target(
    cfg: &PolicyConfig,
    source: &NodeId,
    source_cpus: u32,
    vm: &VmSummary,
    member: Option<&Member>,
    view: &HostView,
) -> Result<Candidate, Exclusion> {
    if &view.node == source {
        return Err(Exclusion::IsSelf);
    }
    if view.age_ms > cfg.max_report_age_ms {
        return Err(Exclusion::Stale);
    }
    let member = member.ok_or(Exclusion::NotMember)?;
    let groups = view.groups.iter().flatten().map(String::as_str);
    vm.placement.allows(member, groups)?;
    if view.mem_used_mib.saturating_add(vm.memory_mib) > view.mem_total_mib {
        return Err(Exclusion::NoMemory);
    }
    let vm_demand = scale_demand(vm.demand_permille, source_cpus, member.capacity.cpus);
    let load = u64::from(view.demand_permille) + u64::from(view.reserved_permille);
    let projected = load + u64::from(vm_demand);
    if projected > u64::from(cfg.upper_permille) {
        return Err(Exclusion::OverThreshold);
    }
    // Both fit in u32: projected <= upper_permille <= 1000.
    Ok(Candidate {
        node: view.node,
        load_permille: u32::try_from(load).unwrap_or(u32::MAX),
        vm_demand_permille: vm_demand,
        projected_permille: u32::try_from(projected).unwrap_or(u32::MAX),
    })
}

/// The chosen target and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetChoice {
    /// The target.
    pub target: Candidate,
    /// Its roster name.
    pub name: String,
    /// The other host sampled, which was at least as loaded after the move (`None` when only
    /// one host was eligible).
    pub runner_up: Option<Candidate>,
    /// Eligible hosts.
    pub eligible: u32,
    /// The upper threshold the target was held to, permille.
    pub upper_permille: u32,
    /// Hosts excluded, per reason.
    pub excluded: Exclusions,
}

/// Why no target was found for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoTarget {
    /// Hosts in the table.
    pub considered: u32,
    /// Hosts excluded, per reason (all of them).
    pub excluded: Exclusions,
}

type MemberIndex<'a> = BTreeMap<NodeId, &'a Member>;

fn index(roster: &Roster) -> MemberIndex<'_> {
    roster.members.iter().map(|m| (m.id, m)).collect()
}

/// Chooses a target for `vm` from `source`: every host in `table` is checked with
/// [`check_target`]; of the eligible ones, two are sampled at random (power of two choices)
/// and the one less loaded after the move wins (ties: lower load now, then the first sampled).
pub fn choose_target(
    cfg: &PolicyConfig,
    source: &NodeId,
    vm: &VmSummary,
    roster: &Roster,
    table: &[HostView],
    rng: &mut impl RngCore,
) -> Result<TargetChoice, NoTarget> {
    choose_target_in(cfg, source, vm, &index(roster), table, rng)
}

fn choose_target_in(
    cfg: &PolicyConfig,
    source: &NodeId,
    vm: &VmSummary,
    members: &MemberIndex<'_>,
    table: &[HostView],
    rng: &mut impl RngCore,
) -> Result<TargetChoice, NoTarget> {
    let source_cpus = members.get(source).map_or(0, |m| m.capacity.cpus);
    let mut excluded = Exclusions::default();
    let mut eligible: Vec<(Candidate, &str)> = Vec::new();
    for view in table {
        let member = members.get(&view.node).copied();
        match check_target(cfg, source, source_cpus, vm, member, view) {
            Ok(c) => eligible.push((c, member.map_or("", |m| m.name.as_str()))),
            Err(why) => excluded.add(why),
        }
    }
    let considered = u32::try_from(table.len()).unwrap_or(u32::MAX);
    let n = eligible.len();
    let (winner, runner_up) = match n {
        0 => {
            return Err(NoTarget {
                considered,
                excluded,
            })
        }
        1 => (0, None),
        _ => {
            let i = pick_index(rng, n);
            let mut j = pick_index(rng, n - 1);
            if j >= i {
                j += 1;
            }
            // Ties go to the first host sampled, itself random: a fixed tie-break (such as
            // the node id) would send every source deciding at once to the same host.
            let key = |c: &Candidate| (c.projected_permille, c.load_permille);
            if key(&eligible[i].0) <= key(&eligible[j].0) {
                (i, Some(j))
            } else {
                (j, Some(i))
            }
        }
    };
    let (target, name) = eligible[winner];
    Ok(TargetChoice {
        target,
        name: name.to_string(),
        runner_up: runner_up.map(|r| eligible[r].0),
        eligible: u32::try_from(n).unwrap_or(u32::MAX),
        upper_permille: cfg.upper_permille,
        excluded,
    })
}

/// A VM for which no target was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Miss {
    /// The VM.
    pub vm: VmId,
    /// Its name.
    pub name: String,
    /// Why no host would do.
    pub why: NoTarget,
}

/// What the host decided, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Not overloaded (or the newest sample already clears the threshold): nothing to do.
    Stay,
    /// Offer this VM to this target.
    Move {
        /// Why this VM.
        vm: Box<VmChoice>,
        /// Why this target.
        target: Box<TargetChoice>,
        /// VMs tried before this one found a target.
        skipped: Vec<Miss>,
    },
    /// Overloaded, but no VM may move.
    NoVm {
        /// VMs on the host.
        total: u32,
        /// VMs that moved within the cooldown.
        on_cooldown: u32,
        /// VMs without demand.
        idle: u32,
    },
    /// Overloaded, but no host may take any of the VMs tried.
    NoTarget {
        /// The VMs tried (at most [`MAX_VM_TRIES`]), best first, and why each found no target.
        tried: Vec<Miss>,
        /// Candidate VMs not tried.
        untried: u32,
    },
}

/// One host's decision on one sample, with its explanation. Serializable for the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The deciding host.
    pub host: NodeId,
    /// When.
    pub at: Timestamp,
    /// Its load state and thresholds.
    pub assessment: Assessment,
    /// What it decided.
    pub outcome: Outcome,
}

impl Decision {
    /// The move, if the decision is to move: `(vm, target)`.
    pub fn chosen(&self) -> Option<(VmId, NodeId)> {
        match &self.outcome {
            Outcome::Move { vm, target, .. } => Some((vm.vm, target.target.node)),
            _ => None,
        }
    }
}

/// The deciding host's own state.
#[derive(Debug, Clone, Copy)]
pub struct LocalState<'a> {
    /// The host.
    pub id: NodeId,
    /// Its assessment of the newest sample (its load is `assessment.sample_permille`).
    pub assessment: Assessment,
    /// Its VMs (those not already migrating).
    pub vms: &'a [HostedVm],
}

/// Decides for one host: when it wants to shed load, tries its VMs in rank order (at most
/// [`MAX_VM_TRIES`]) and returns the first that has a target. Deterministic given the inputs
/// and the RNG's state.
pub fn decide(
    cfg: &PolicyConfig,
    me: &LocalState<'_>,
    roster: &Roster,
    table: &[HostView],
    now: Timestamp,
    rng: &mut impl RngCore,
) -> Decision {
    let a = me.assessment;
    let decision = |outcome| Decision {
        host: me.id,
        at: now,
        assessment: a,
        outcome,
    };
    if !a.wants_to_shed() {
        return decision(Outcome::Stay);
    }
    let ranking = rank_vms(
        cfg,
        a.sample_permille,
        a.threshold.upper_permille,
        me.vms,
        now,
    );
    if ranking.ranked.is_empty() {
        return decision(Outcome::NoVm {
            total: ranking.total,
            on_cooldown: ranking.on_cooldown,
            idle: ranking.idle,
        });
    }
    let members = index(roster);
    let mut misses = Vec::new();
    for choice in ranking.ranked.iter().take(MAX_VM_TRIES) {
        let Some(vm) = me.vms.iter().find(|v| v.summary.id == choice.vm) else {
            continue;
        };
        match choose_target_in(cfg, &me.id, &vm.summary, &members, table, rng) {
            Ok(target) => {
                return decision(Outcome::Move {
                    vm: Box::new(choice.clone()),
                    target: Box::new(target),
                    skipped: misses,
                })
            }
            Err(why) => misses.push(Miss {
                vm: choice.vm,
                name: choice.name.clone(),
                why,
            }),
        }
    }
    let untried = ranking.ranked.len().saturating_sub(MAX_VM_TRIES);
    decision(Outcome::NoTarget {
        tried: misses,
        untried: u32::try_from(untried).unwrap_or(u32::MAX),
    })
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.assessment;
        let t = &a.threshold;
        write!(
            f,
            "{}: {} ({}‰, upper {}‰ {}",
            self.host.short(),
            a.state,
            a.sample_permille,
            t.upper_permille,
            t.detector
        )?;
        if let Some(p) = t.predicted_permille {
            write!(f, ", predicted {p}‰")?;
        }
        if t.fallback {
            f.write_str(", fallback")?;
        }
        write!(f, ", {} above in a row): ", a.above_run)?;
        match &self.outcome {
            Outcome::Stay => f.write_str("stay"),
            Outcome::Move {
                vm,
                target,
                skipped,
            } => {
                let c = &target.target;
                write!(
                    f,
                    "move {} ({}‰, {} MiB, est. {} ms{}, leaves {}‰{} {}‰) to {} ({}‰ → {}‰ ≤ {}‰; ",
                    vm.name,
                    vm.demand_permille,
                    vm.memory_mib,
                    vm.estimate.total_ms,
                    if vm.estimate.converges { "" } else { ", does not converge" },
                    vm.host_after_permille,
                    if vm.ends_overload { " ≤" } else { " still above" },
                    vm.upper_permille,
                    if target.name.is_empty() { c.node.short() } else { target.name.clone() },
                    c.load_permille,
                    c.projected_permille,
                    target.upper_permille,
                )?;
                match &target.runner_up {
                    Some(r) => write!(
                        f,
                        "better of 2 sampled, other at {}‰, among {} eligible",
                        r.projected_permille, target.eligible
                    )?,
                    None => f.write_str("the only eligible host")?,
                }
                if target.excluded.total() > 0 {
                    write!(f, "; excluded: {}", target.excluded)?;
                }
                f.write_str(")")?;
                if !skipped.is_empty() {
                    write!(f, " after {} VMs without a target", skipped.len())?;
                }
                Ok(())
            }
            Outcome::NoVm {
                total,
                on_cooldown,
                idle,
            } => write!(
                f,
                "nothing to move: {total} VMs, {on_cooldown} on cooldown, {idle} idle"
            ),
            Outcome::NoTarget { tried, untried } => {
                write!(f, "no target for {} VMs tried", tried.len())?;
                if *untried > 0 {
                    write!(f, " ({untried} not tried)")?;
                }
                for m in tried {
                    write!(
                        f,
                        "; {}: {} hosts, excluded {}",
                        m.name, m.why.considered, m.why.excluded
                    )?;
                }
                Ok(())
            }
        }
    }
}
