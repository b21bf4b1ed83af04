//! The centralized baseline: one planner that sees the whole cluster at once and moves VMs
//! greedily, with the same thresholds, VM ranking and target eligibility as the decentralized
//! policy. drift itself never runs it; it is the yardstick the decentralized policy is
//! compared against (migrations, time to balance) on the same starting state.
//!
//! Greedy: repeatedly take the most loaded host above the upper threshold, try its VMs in
//! [`rank_vms`] order, and move the first one that fits somewhere to the host that is least
//! loaded after the move. A host none of whose VMs fits anywhere is set aside.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::choose::{check_target, rank_vms, Candidate};
use super::cluster::{Cluster, ClusterError};
use super::PolicyConfig;
use crate::ids::{NodeId, VmId};
use crate::time::Timestamp;

/// One move of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedMove {
    /// The VM.
    pub vm: VmId,
    /// From this host.
    pub from: NodeId,
    /// To this host.
    pub to: NodeId,
    /// The VM's demand on the source, permille of the source's capacity.
    pub demand_permille: u32,
    /// The target's load after the move, permille.
    pub target_after_permille: u32,
    /// Estimated migration time, milliseconds.
    pub estimate_ms: u64,
}

/// Per-host limits on the moves of one plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveLimits {
    /// Moves out of one host.
    pub out_per_host: u32,
    /// Moves into one host.
    pub in_per_host: u32,
}

impl MoveLimits {
    /// No per-host limit.
    pub const UNLIMITED: MoveLimits = MoveLimits {
        out_per_host: u32::MAX,
        in_per_host: u32::MAX,
    };
}

/// The moves the centralized planner chose, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CentralPlan {
    /// The moves, to be applied in this order.
    pub moves: Vec<PlannedMove>,
    /// Hosts still above the threshold none of whose VMs fits anywhere.
    pub stuck: Vec<NodeId>,
    /// Whether every host is at or under the upper threshold after the moves.
    pub balanced: bool,
}

impl CentralPlan {
    /// Applies the plan's moves to `cluster` (the state it was planned on), in order.
    pub fn apply(&self, cluster: &mut Cluster, now: Timestamp) -> Result<(), ClusterError> {
        for m in &self.moves {
            let from = cluster
                .host_index(&m.from)
                .ok_or(ClusterError::NotAHost(m.from))?;
            let to = cluster
                .host_index(&m.to)
                .ok_or(ClusterError::NotAHost(m.to))?;
            cluster.move_vm(&m.vm, from, to, now)?;
        }
        Ok(())
    }
}

/// Plans at most `max_moves` moves on a copy of `cluster` (see the module docs).
pub fn plan_centralized(
    cluster: &Cluster,
    cfg: &PolicyConfig,
    limits: MoveLimits,
    now: Timestamp,
    max_moves: usize,
) -> CentralPlan {
    let mut work = cluster.clone();
    let n = work.hosts.len();
    let mut out = vec![0u32; n];
    let mut inc = vec![0u32; n];
    let mut set_aside = BTreeSet::new();
    let mut moves = Vec::new();
    while moves.len() < max_moves {
        let source = (0..n)
            .filter(|&i| {
                !set_aside.contains(&i)
                    && out[i] < limits.out_per_host
                    && work.demand(i) > cfg.upper_permille
            })
            .max_by_key(|&i| (work.demand(i), std::cmp::Reverse(i)));
        let Some(s) = source else { break };
        let src_id = work.hosts[s].id;
        let src_cpus = work.cpus(s);
        let ranking = rank_vms(
            cfg,
            work.demand(s),
            cfg.upper_permille,
            &work.hosts[s].vms,
            now,
        );
        let mut found: Option<(VmId, usize, Candidate, u64)> = None;
        for choice in &ranking.ranked {
            let Some(vm) = work.hosts[s].vms.iter().find(|v| v.summary.id == choice.vm) else {
                continue;
            };
            let best = (0..n)
                .filter(|&j| j != s && inc[j] < limits.in_per_host)
                .filter_map(|j| {
                    let view = work.view(j)?;
                    check_target(cfg, &src_id, src_cpus, &vm.summary, work.member(j), &view)
                        .ok()
                        .map(|c| (j, c))
                })
                .min_by_key(|(j, c)| (c.projected_permille, c.load_permille, *j));
            if let Some((j, c)) = best {
                found = Some((choice.vm, j, c, choice.estimate.total_ms));
                break;
            }
        }
        match found {
            Some((vm, j, c, estimate_ms)) => {
                let demand_permille = work.hosts[s]
                    .vms
                    .iter()
                    .find(|v| v.summary.id == vm)
                    .map_or(0, |v| v.summary.demand_permille);
                if work.move_vm(&vm, s, j, now).is_err() {
                    set_aside.insert(s);
                    continue;
                }
                out[s] = out[s].saturating_add(1);
                inc[j] = inc[j].saturating_add(1);
                moves.push(PlannedMove {
                    vm,
                    from: src_id,
                    to: work.hosts[j].id,
                    demand_permille,
                    target_after_permille: c.projected_permille,
                    estimate_ms,
                });
            }
            None => {
                set_aside.insert(s);
            }
        }
    }
    let stuck = set_aside.iter().map(|&i| work.hosts[i].id).collect();
    CentralPlan {
        moves,
        stuck,
        balanced: work.is_balanced(cfg.upper_permille),
    }
}
