//! A whole cluster as a value, for the centralized baseline and the simulator: the roster, the
//! VMs on each host, and optional per-VM demand traces; and builders for skewed starting
//! states, with synthetic demand or demand from utilization traces (such as PlanetLab's).

use std::collections::{BTreeMap, BTreeSet};

use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use super::choose::{HostView, HostedVm};
use super::scale_demand;
use crate::ids::{NodeId, VmId};
use crate::keys::SecretKey;
use crate::migration::{Placement, VmSummary};
use crate::report::PERMILLE;
use crate::roster::{Capacity, Member, Role, Roster, LABEL_JURISDICTION, MAX_MEMBERS};
use crate::time::Timestamp;

/// At most this many VMs in a built cluster.
pub const MAX_CLUSTER_VMS: usize = 100_000;
/// At most this many samples in one trace.
pub const MAX_TRACE_LEN: usize = 100_000;

/// One host and the VMs on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterHost {
    /// The host (a roster member).
    pub id: NodeId,
    /// Its VMs; demand in permille of this host's capacity.
    pub vms: Vec<HostedVm>,
}

/// A cluster: roster, hosts with their VMs, and demand traces of some VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// Labels and capacities of every host.
    pub roster: Roster,
    /// The hosts, in a fixed order.
    pub hosts: Vec<ClusterHost>,
    /// Utilization of a VM's own vCPUs over time, permille (0..=1000), one sample per tick,
    /// repeating. A VM without a trace keeps its demand.
    pub traces: BTreeMap<VmId, Vec<u32>>,
}

/// What is wrong with a cluster, a spec or a trace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("host {0:?} is not a roster member with the host role")]
    NotAHost(NodeId),
    #[error("host {0:?} is listed twice")]
    DuplicateHost(NodeId),
    #[error("VM {0:?} is on more than one host")]
    DuplicateVm(VmId),
    #[error("no VM {vm:?} on host {host:?}")]
    NoSuchVm { vm: VmId, host: NodeId },
    #[error("host index {0} is out of range")]
    NoSuchHost(usize),
    #[error("spec {field}: {reason}")]
    BadSpec {
        field: &'static str,
        reason: &'static str,
    },
    #[error("host {host} would start with {need_mib} MiB of VMs but has {have_mib} MiB")]
    MemoryOvercommitted {
        host: usize,
        need_mib: u64,
        have_mib: u64,
    },
    #[error("{vms} VMs need as many traces, only {traces} given")]
    NotEnoughTraces { vms: usize, traces: usize },
    #[error("trace line {line}: {text:?} is not a number")]
    TraceNotANumber { line: usize, text: String },
    #[error("trace line {line}: {value} is not a percentage")]
    TraceOutOfRange { line: usize, value: String },
    #[error("trace is empty")]
    TraceEmpty,
    #[error("trace has more than {MAX_TRACE_LEN} samples")]
    TraceTooLong,
}

impl Cluster {
    /// Checks that every host is a roster member with the host role, listed once, and that
    /// every VM is on one host only.
    pub fn check(&self) -> Result<(), ClusterError> {
        let mut hosts = BTreeSet::new();
        let mut vms = BTreeSet::new();
        for h in &self.hosts {
            if !self
                .roster
                .member(&h.id)
                .is_some_and(|m| m.has_role(Role::Host))
            {
                return Err(ClusterError::NotAHost(h.id));
            }
            if !hosts.insert(h.id) {
                return Err(ClusterError::DuplicateHost(h.id));
            }
            for vm in &h.vms {
                if !vms.insert(vm.summary.id) {
                    return Err(ClusterError::DuplicateVm(vm.summary.id));
                }
            }
        }
        Ok(())
    }

    /// The roster entry of host `i`.
    pub fn member(&self, i: usize) -> Option<&Member> {
        self.hosts.get(i).and_then(|h| self.roster.member(&h.id))
    }

    /// CPUs of host `i` (0 when unknown).
    pub fn cpus(&self, i: usize) -> u32 {
        self.member(i).map_or(0, |m| m.capacity.cpus)
    }

    /// The index of host `id`.
    pub fn host_index(&self, id: &NodeId) -> Option<usize> {
        self.hosts.iter().position(|h| &h.id == id)
    }

    /// The VMs' CPU demand on host `i`, permille of its capacity (0 for a bad index).
    pub fn demand(&self, i: usize) -> u32 {
        self.hosts.get(i).map_or(0, |h| {
            h.vms
                .iter()
                .fold(0u32, |acc, v| acc.saturating_add(v.summary.demand_permille))
        })
    }

    /// The VMs' memory on host `i`.
    pub fn mem_used(&self, i: usize) -> u64 {
        self.hosts.get(i).map_or(0, |h| {
            h.vms
                .iter()
                .fold(0u64, |acc, v| acc.saturating_add(v.summary.memory_mib))
        })
    }

    /// Host `i` as a fresh, exact report would show it, with its anti-affinity groups known
    /// and no reservations.
    pub fn view(&self, i: usize) -> Option<HostView> {
        let h = self.hosts.get(i)?;
        let mut groups: Vec<String> = h
            .vms
            .iter()
            .filter_map(|v| v.summary.placement.anti_affinity.clone())
            .collect();
        groups.sort();
        groups.dedup();
        Some(HostView {
            node: h.id,
            demand_permille: self.demand(i),
            reserved_permille: 0,
            mem_used_mib: self.mem_used(i),
            mem_total_mib: self.member(i).map_or(0, |m| m.capacity.mem_mib),
            age_ms: 0,
            groups: Some(groups),
        })
    }

    /// [`Cluster::view`] of every host, in host order.
    pub fn views(&self) -> Vec<HostView> {
        (0..self.hosts.len()).filter_map(|i| self.view(i)).collect()
    }

    /// VMs in the cluster.
    pub fn vm_count(&self) -> usize {
        self.hosts.iter().map(|h| h.vms.len()).sum()
    }

    /// Every VM id.
    pub fn vm_ids(&self) -> BTreeSet<VmId> {
        self.hosts
            .iter()
            .flat_map(|h| h.vms.iter().map(|v| v.summary.id))
            .collect()
    }

    /// The demand of every host, in host order.
    pub fn demands(&self) -> Vec<u32> {
        (0..self.hosts.len()).map(|i| self.demand(i)).collect()
    }

    /// Whether every host's demand is at or under `upper_permille`.
    pub fn is_balanced(&self, upper_permille: u32) -> bool {
        (0..self.hosts.len()).all(|i| self.demand(i) <= upper_permille)
    }

    /// Sets every traced VM's demand to its trace's sample `tick` (repeating), on the host it
    /// is on now: utilization × vCPUs / host CPUs, rounded up.
    pub fn apply_traces(&mut self, tick: u64) {
        let cpus: Vec<u32> = (0..self.hosts.len()).map(|i| self.cpus(i)).collect();
        for (h, host_cpus) in self.hosts.iter_mut().zip(cpus) {
            for vm in &mut h.vms {
                if let Some(trace) = self.traces.get(&vm.summary.id) {
                    if !trace.is_empty() {
                        let len = trace.len() as u64;
                        let util = trace[usize::try_from(tick % len).unwrap_or(0)];
                        vm.summary.demand_permille =
                            traced_demand(util, vm.summary.vcpus, host_cpus);
                    }
                }
            }
        }
    }

    /// Moves VM `vm` from host `from` to host `to` (indices), rescaling its demand to the
    /// target's capacity and marking it moved at `now`.
    pub fn move_vm(
        &mut self,
        vm: &VmId,
        from: usize,
        to: usize,
        now: Timestamp,
    ) -> Result<(), ClusterError> {
        if to >= self.hosts.len() {
            return Err(ClusterError::NoSuchHost(to));
        }
        let (from_cpus, to_cpus) = (self.cpus(from), self.cpus(to));
        let host = self
            .hosts
            .get_mut(from)
            .ok_or(ClusterError::NoSuchHost(from))?;
        let pos =
            host.vms
                .iter()
                .position(|v| &v.summary.id == vm)
                .ok_or(ClusterError::NoSuchVm {
                    vm: *vm,
                    host: host.id,
                })?;
        let mut moved = host.vms.remove(pos);
        moved.summary.demand_permille =
            scale_demand(moved.summary.demand_permille, from_cpus, to_cpus);
        moved.last_moved_at = Some(now);
        self.hosts[to].vms.push(moved);
        Ok(())
    }
}

fn traced_demand(util_permille: u32, vcpus: u32, host_cpus: u32) -> u32 {
    if host_cpus == 0 {
        return util_permille;
    }
    let d = (u64::from(util_permille) * u64::from(vcpus)).div_ceil(u64::from(host_cpus));
    u32::try_from(d).unwrap_or(u32::MAX)
}

/// Parses a utilization trace: one percentage (0 to 100) per line, blank lines skipped, as in
/// the PlanetLab workload files. Returns permille.
pub fn parse_trace(text: &str) -> Result<Vec<u32>, ClusterError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if out.len() == MAX_TRACE_LEN {
            return Err(ClusterError::TraceTooLong);
        }
        let v: f64 = line.parse().map_err(|_| ClusterError::TraceNotANumber {
            line: n + 1,
            text: line.chars().take(32).collect(),
        })?;
        if !(0.0..=100.0).contains(&v) {
            return Err(ClusterError::TraceOutOfRange {
                line: n + 1,
                value: line.chars().take(32).collect(),
            });
        }
        out.push(super::to_permille(v / 100.0).min(PERMILLE));
    }
    if out.is_empty() {
        return Err(ClusterError::TraceEmpty);
    }
    Ok(out)
}

/// Where the VMs' CPU demand comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Demand {
    /// Constant demand, so that the cluster's mean host load is `load_permille`, each VM's
    /// demand jittered by the spec's `jitter`.
    Mean {
        /// The mean host load, permille.
        load_permille: u32,
    },
    /// VM `k` follows trace `k` (utilization of its own vCPUs, permille per tick; see
    /// [`parse_trace`]).
    Traces(Vec<Vec<u32>>),
}

/// A skewed starting state: `nodes × vms_per_node` VMs spread over the hosts with weights
/// `(1 − skew)^i` (0 = even, 1 = all on the first host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkewSpec {
    /// Hosts.
    pub nodes: usize,
    /// VMs per host on average.
    pub vms_per_node: usize,
    /// 0.0 (even) to 1.0 (everything on the first host).
    pub skew: f64,
    /// Where demand comes from.
    pub demand: Demand,
    /// CPUs of every host.
    pub cpus: u32,
    /// Memory of every host.
    pub host_mem_mib: u64,
    /// Memory of a VM (jittered).
    pub vm_memory_mib: u64,
    /// vCPUs of a VM.
    pub vm_vcpus: u32,
    /// Pages a VM dirties per second (jittered).
    pub dirty_pages_per_s: u64,
    /// Relative jitter (0.0 to 0.9) of each VM's demand (synthetic demand only), memory and
    /// dirty rate.
    pub jitter: f64,
    /// Hosts are labelled with jurisdictions `j0`, `j1`, ... round robin (at least 1).
    pub jurisdictions: usize,
    /// Every `pin_every`-th VM may only run in the jurisdiction it starts in (0: none).
    pub pin_every: usize,
    /// Seeds keys, ids and jitter.
    pub seed: u64,
}

impl Default for SkewSpec {
    fn default() -> Self {
        Self {
            nodes: 6,
            vms_per_node: 8,
            skew: 0.5,
            demand: Demand::Mean { load_permille: 500 },
            cpus: 8,
            host_mem_mib: 65_536,
            vm_memory_mib: 1024,
            vm_vcpus: 1,
            dirty_pages_per_s: 2_000,
            jitter: 0.3,
            jurisdictions: 1,
            pin_every: 0,
            seed: 1,
        }
    }
}

/// A float in `[0, 1)` from the RNG.
fn unit(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `x · (1 + jitter · u)`, u uniform in [−1, 1).
fn jittered(rng: &mut impl RngCore, x: f64, jitter: f64) -> f64 {
    x * (1.0 + jitter * (2.0 * unit(rng) - 1.0))
}

/// How many of `total` items go to each of `n` slots with weights `(1 − skew)^i`: floors of
/// the quotas, then the remainder by largest fraction (ties to the lower index).
pub fn skewed_counts(total: usize, n: usize, skew: f64) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let ratio = 1.0 - skew.clamp(0.0, 1.0);
    let weights: Vec<f64> = (0..n).map(|i| ratio.powi(i as i32)).collect();
    let sum: f64 = weights.iter().sum();
    let quotas: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut counts: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let fa = quotas[a] - quotas[a].floor();
        let fb = quotas[b] - quotas[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let assigned: usize = counts.iter().sum();
    for &i in order.iter().cycle().take(total.saturating_sub(assigned)) {
        counts[i] += 1;
    }
    counts
}

/// Builds the starting state described by `spec`, deterministically from `spec.seed` with the
/// RNG `R`.
pub fn skewed_cluster<R: RngCore + SeedableRng>(spec: &SkewSpec) -> Result<Cluster, ClusterError> {
    let bad = |field, reason| Err(ClusterError::BadSpec { field, reason });
    if spec.nodes == 0 || spec.nodes > MAX_MEMBERS {
        return bad("nodes", "must be in 1..=4096");
    }
    let total = spec.nodes.saturating_mul(spec.vms_per_node);
    if total > MAX_CLUSTER_VMS {
        return bad("vms_per_node", "too many VMs in all (at most 100000)");
    }
    if !(0.0..=1.0).contains(&spec.skew) {
        return bad("skew", "must be in 0.0..=1.0");
    }
    if !(0.0..=0.9).contains(&spec.jitter) {
        return bad("jitter", "must be in 0.0..=0.9");
    }
    if spec.cpus == 0 {
        return bad("cpus", "must be positive");
    }
    if spec.vm_vcpus == 0 || spec.vm_memory_mib == 0 {
        return bad("vm_vcpus", "VMs need at least one vCPU and some memory");
    }
    if spec.jurisdictions == 0 {
        return bad("jurisdictions", "must be at least 1");
    }
    if let Demand::Traces(traces) = &spec.demand {
        if traces.len() < total {
            return Err(ClusterError::NotEnoughTraces {
                vms: total,
                traces: traces.len(),
            });
        }
        if traces.iter().take(total).any(|t| t.is_empty()) {
            return Err(ClusterError::TraceEmpty);
        }
    }
    let mut rng = R::seed_from_u64(spec.seed);
    let mut members = Vec::with_capacity(spec.nodes);
    let mut hosts = Vec::with_capacity(spec.nodes);
    for i in 0..spec.nodes {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let id = SecretKey::from_bytes(&key).public();
        members.push(Member {
            id,
            name: format!("node-{i}"),
            roles: vec![Role::Host],
            labels: BTreeMap::from([(
                LABEL_JURISDICTION.to_string(),
                format!("j{}", i % spec.jurisdictions),
            )]),
            capacity: Capacity {
                cpus: spec.cpus,
                mem_mib: spec.host_mem_mib,
            },
        });
        hosts.push(ClusterHost {
            id,
            vms: Vec::new(),
        });
    }
    let counts = skewed_counts(total, spec.nodes, spec.skew);
    let mut traces = BTreeMap::new();
    let mut k = 0usize;
    for (i, &count) in counts.iter().enumerate() {
        for _ in 0..count {
            let mut id = [0u8; 16];
            rng.fill_bytes(&mut id);
            let id = VmId::from_bytes(id);
            let demand = match &spec.demand {
                Demand::Mean { load_permille } => {
                    let base = f64::from(*load_permille) / spec.vms_per_node.max(1) as f64;
                    jittered(&mut rng, base, spec.jitter).round().max(1.0) as u32
                }
                Demand::Traces(all) => {
                    let trace = all[k].clone();
                    let d = traced_demand(trace[0], spec.vm_vcpus, spec.cpus);
                    traces.insert(id, trace);
                    d
                }
            };
            let memory =
                (jittered(&mut rng, spec.vm_memory_mib as f64, spec.jitter).round() as u64).max(1);
            let dirty =
                jittered(&mut rng, spec.dirty_pages_per_s as f64, spec.jitter).round() as u64;
            let pinned = spec.pin_every > 0 && k.is_multiple_of(spec.pin_every);
            let placement = Placement {
                jurisdictions: if pinned {
                    vec![format!("j{}", i % spec.jurisdictions)]
                } else {
                    Vec::new()
                },
                regions: Vec::new(),
                anti_affinity: None,
            };
            hosts[i].vms.push(HostedVm {
                summary: VmSummary {
                    id,
                    name: format!("vm-{k}"),
                    memory_mib: memory,
                    vcpus: spec.vm_vcpus,
                    demand_permille: demand,
                    placement,
                    qemu: None,
                },
                dirty_pages_per_s: dirty,
                last_moved_at: None,
            });
            k += 1;
        }
    }
    let roster = Roster {
        cluster: "sim".into(),
        epoch: 1,
        prev: None,
        not_before: Timestamp(0),
        not_after: Timestamp(u64::MAX),
        members,
        admins: None,
    };
    let cluster = Cluster {
        roster,
        hosts,
        traces,
    };
    for i in 0..cluster.hosts.len() {
        let need = cluster.mem_used(i);
        if need > spec.host_mem_mib {
            return Err(ClusterError::MemoryOvercommitted {
                host: i,
                need_mib: need,
                have_mib: spec.host_mem_mib,
            });
        }
    }
    cluster.check()?;
    Ok(cluster)
}
