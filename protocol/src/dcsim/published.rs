//! The published policies of Beloglazov & Buyya 2012, centralized, as CloudSim 3.0.3 runs them:
//! overload detection (THR, IQR, MAD, LR, the adaptive ones falling back to THR 0.7 while the
//! host's history is short), MMT selection (least RAM first, until the host is no longer
//! overloaded), power-aware best-fit-decreasing placement that never makes a non-empty target
//! overloaded, and the underload pass (the least-utilized active host tries to move all its VMs
//! away; all or none).
//!
//! Faithful to the reference where it differs from the paper's prose:
//!
//! - the detectors compare the *requested* MIPS of the host's VMs (uncapped) with its capacity;
//! - the adaptive detectors use the host's history rebuilt from the histories (newest first, at
//!   most 30) of the VMs it holds *now*, weighted by VM MIPS / host MIPS, zero tail trimmed; IQR
//!   and MAD need 12 non-zero samples, LR 10;
//! - LR is an ordinary least-squares line over the last 10 samples (CloudSim's tricube weights
//!   are never applied), extrapolated `10 + ceil(longest migration / step)` samples ahead;
//! - placement ranks hosts by power after allocation minus the power at the host's utilization
//!   *at the last update* (so a switched-off host counts its idle power as already spent);
//! - the underload pass does not exclude hosts that just received VMs from overloaded hosts
//!   (CloudSim's exclusion list is built from an empty map), only those off at the last update,
//!   overloaded ones, earlier candidates and targets of earlier underload moves; a VM can thus be
//!   moved twice in one step, and both moves count.

use serde::{Deserialize, Serialize};

use super::run::{InitialPlacement, Move, Plan, Planner, View};

/// Threshold of the THR fallback of the adaptive detectors.
pub const FALLBACK_THRESHOLD: f64 = 0.7;
/// Samples (non-zero prefix of the host history) IQR and MAD need.
pub const MIN_SAMPLES_IQR_MAD: usize = 12;
/// Samples LR regresses over.
pub const LR_SAMPLES: usize = 10;

/// An overload detector with its parameter; every one is combined with MMT selection and
/// power-aware best-fit-decreasing placement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "detector")]
pub enum Policy {
    /// Static threshold: overloaded if utilization > `threshold`.
    Thr {
        /// The threshold (fraction).
        threshold: f64,
    },
    /// Interquartile range: threshold `1 − safety × IQR`.
    Iqr {
        /// Safety parameter.
        safety: f64,
    },
    /// Median absolute deviation: threshold `1 − safety × MAD`.
    Mad {
        /// Safety parameter.
        safety: f64,
    },
    /// Local regression: overloaded if `safety × predicted ≥ 1`.
    Lr {
        /// Safety parameter.
        safety: f64,
    },
    /// Baseline: first-fit placement, no migration; power follows utilization.
    Dvfs,
    /// Baseline: first-fit placement, no migration, every host on at full power.
    NoPowerManagement,
}

impl Policy {
    /// The four configurations of the paper's best results.
    pub const PUBLISHED: [Self; 4] = [
        Self::Thr { threshold: 0.8 },
        Self::Iqr { safety: 1.5 },
        Self::Mad { safety: 2.5 },
        Self::Lr { safety: 1.2 },
    ];

    /// The reference's two baselines without consolidation.
    pub const BASELINES: [Self; 2] = [Self::NoPowerManagement, Self::Dvfs];

    /// The name used in the paper, e.g. `THR-MMT-0.8`.
    pub fn name(&self) -> String {
        match self {
            Self::Thr { threshold } => format!("THR-MMT-{threshold}"),
            Self::Iqr { safety } => format!("IQR-MMT-{safety}"),
            Self::Mad { safety } => format!("MAD-MMT-{safety}"),
            Self::Lr { safety } => format!("LR-MMT-{safety}"),
            Self::Dvfs => "DVFS".into(),
            Self::NoPowerManagement => "NPA".into(),
        }
    }
}

/// Median as Apache Commons Math's default percentile estimate (mean of the middle two).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        v[n / 2 - 1] + 0.5 * (v[n / 2] - v[n / 2 - 1])
    }
}

/// Median absolute deviation.
pub fn mad(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let m = median(values);
    let dev: Vec<f64> = values.iter().map(|x| (m - x).abs()).collect();
    median(&dev)
}

/// Interquartile range, quartiles picked at `round(q (n + 1)) − 1` of the sorted values.
pub fn iqr(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)]
    let n1 = (v.len() + 1) as f64;
    // Java's Math.round: floor(x + 0.5); both indices are small and non-negative.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let idx = |q: f64| ((q * n1 + 0.5).floor() as usize).saturating_sub(1);
    match (v.get(idx(0.25)), v.get(idx(0.75))) {
        (Some(q1), Some(q3)) => q3 - q1,
        _ => 0.0,
    }
}

/// Intercept and slope of the least-squares line through `(1, y0), (2, y1), …`.
pub fn least_squares(y: &[f64]) -> (f64, f64) {
    #[allow(clippy::cast_precision_loss)]
    let n = y.len() as f64;
    if y.is_empty() {
        return (0.0, 0.0);
    }
    #[allow(clippy::cast_precision_loss)]
    let xs = (1..=y.len()).map(|i| i as f64);
    let mean_x = (n + 1.0) / 2.0;
    let mean_y = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in xs.zip(y) {
        sxy += (x - mean_x) * (y - mean_y);
        sxx += (x - mean_x) * (x - mean_x);
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (mean_y - slope * mean_x, slope)
}

/// The host state the planner changes while it plans: which VMs each host holds.
pub(crate) struct Planning<'v, 'w> {
    view: &'v View<'w>,
    policy: Policy,
    lists: Vec<Vec<usize>>,
    /// Cached sum of capped requested MIPS per host (`None`: stale).
    capped: Vec<Option<f64>>,
}

impl<'v, 'w> Planning<'v, 'w> {
    pub(crate) fn new(view: &'v View<'w>, policy: Policy) -> Self {
        let lists: Vec<Vec<usize>> = (0..view.hosts())
            .map(|h| view.host_vms(h).to_vec())
            .collect();
        let capped = vec![None; lists.len()];
        Self {
            view,
            policy,
            lists,
            capped,
        }
    }

    fn add(&mut self, h: usize, vm: usize) {
        self.lists[h].push(vm);
        self.capped[h] = None;
    }

    fn remove(&mut self, h: usize, vm: usize) {
        if let Some(i) = self.lists[h].iter().position(|&v| v == vm) {
            self.lists[h].remove(i);
        }
        self.capped[h] = None;
    }

    fn capped_sum(&mut self, h: usize) -> f64 {
        if let Some(c) = self.capped[h] {
            return c;
        }
        let pe = self.view.host_pe_mips(h);
        let c = self.lists[h]
            .iter()
            .map(|&v| self.view.vm_demand_mips(v).min(pe))
            .sum();
        self.capped[h] = Some(c);
        c
    }

    /// MIPS the host's scheduler has handed out (scaled down and floored when oversubscribed).
    fn allocated_mips(&mut self, h: usize) -> f64 {
        let need = self.capped_sum(h);
        let total = self.view.host_total_mips(h);
        if need <= total {
            return need;
        }
        let pe = self.view.host_pe_mips(h);
        let scale = total / need;
        self.lists[h]
            .iter()
            .map(|&v| (self.view.vm_demand_mips(v).min(pe) * scale).floor())
            .sum()
    }

    fn available_mips(&mut self, h: usize) -> f64 {
        let need = self.capped_sum(h);
        (self.view.host_total_mips(h) - need).max(0.0)
    }

    fn requested_utilization(&self, h: usize) -> f64 {
        let req: f64 = self.lists[h]
            .iter()
            .map(|&v| self.view.vm_demand_mips(v))
            .sum();
        req / self.view.host_total_mips(h)
    }

    /// The host's utilization history, newest first, rebuilt from its VMs' histories.
    fn history(&self, h: usize) -> Vec<f64> {
        let total = self.view.host_total_mips(h);
        let mut sum = [0.0f64; super::run::VM_HISTORY];
        for &v in &self.lists[h] {
            let w = self.view.vm_mips(v) / total;
            for (slot, u) in sum.iter_mut().zip(self.view.vm_history(v)) {
                *slot += u * w;
            }
        }
        let len = sum.iter().rposition(|&x| x != 0.0).map_or(0, |i| i + 1);
        sum[..len].to_vec()
    }

    fn threshold_check(&self, h: usize, threshold: f64) -> bool {
        self.requested_utilization(h) > threshold
    }

    fn overloaded(&self, h: usize) -> bool {
        match self.policy {
            Policy::Dvfs | Policy::NoPowerManagement => false,
            Policy::Thr { threshold } => self.threshold_check(h, threshold),
            Policy::Iqr { safety } | Policy::Mad { safety } => {
                let hist = self.history(h);
                if hist.len() < MIN_SAMPLES_IQR_MAD {
                    return self.threshold_check(h, FALLBACK_THRESHOLD);
                }
                let spread = if matches!(self.policy, Policy::Iqr { .. }) {
                    iqr(&hist)
                } else {
                    mad(&hist)
                };
                self.threshold_check(h, 1.0 - safety * spread)
            }
            Policy::Lr { safety } => {
                let hist = self.history(h);
                if hist.len() < LR_SAMPLES {
                    return self.threshold_check(h, FALLBACK_THRESHOLD);
                }
                let y: Vec<f64> = hist[..LR_SAMPLES].iter().rev().copied().collect();
                let (a, b) = least_squares(&y);
                let longest = self.lists[h]
                    .iter()
                    .map(|&v| self.view.vm_migration_s(v))
                    .fold(f64::MIN, f64::max);
                #[allow(clippy::cast_precision_loss)]
                let ahead = LR_SAMPLES as f64 + (longest / self.view.step_s()).ceil();
                (a + b * ahead) * safety >= 1.0
            }
        }
    }

    fn overloaded_with(&mut self, h: usize, vm: usize) -> bool {
        self.lists[h].push(vm);
        let over = self.overloaded(h);
        self.lists[h].pop();
        over
    }

    /// Power-aware best fit: the host whose power rises least, skipping `excluded` and any
    /// non-empty host the VM would overload.
    fn find_host(&mut self, vm: usize, excluded: &[bool]) -> Option<usize> {
        let demand = self.view.vm_demand_mips(vm);
        let mut best = None;
        let mut best_diff = f64::MAX;
        for (h, &skip) in excluded.iter().enumerate().take(self.lists.len()) {
            if skip {
                continue;
            }
            if self.view.host_pe_mips(h) < demand || self.available_mips(h) < demand {
                continue;
            }
            let allocated = self.allocated_mips(h);
            let after = (allocated + demand) / self.view.host_total_mips(h);
            let diff = self.view.host_power(h, after)
                - self.view.host_power(h, self.view.host_last_utilization(h));
            // The overload check only matters for a host that would win.
            if diff < best_diff && !(allocated != 0.0 && self.overloaded_with(h, vm)) {
                best_diff = diff;
                best = Some(h);
            }
        }
        best
    }

    fn sort_by_demand(&self, vms: &mut [usize]) {
        vms.sort_by(|&a, &b| {
            self.view
                .vm_demand_mips(b)
                .total_cmp(&self.view.vm_demand_mips(a))
        });
    }

    /// One decision round: overloaded hosts, then the underload pass.
    pub(crate) fn plan(mut self) -> Plan {
        let n = self.lists.len();
        let overloaded: Vec<usize> = (0..n).filter(|&h| self.overloaded(h)).collect();
        let mut to_move = Vec::new();
        for &h in &overloaded {
            loop {
                // MMT: least RAM first, the first such VM in the host's list.
                let pick = self.lists[h]
                    .iter()
                    .copied()
                    .filter(|&v| !self.view.vm_migrating(v))
                    .min_by_key(|&v| self.view.vm_ram_mb(v));
                let Some(vm) = pick else { break };
                to_move.push(vm);
                self.remove(h, vm);
                if !self.overloaded(h) {
                    break;
                }
            }
        }
        self.sort_by_demand(&mut to_move);
        let mut excluded = vec![false; n];
        for &h in &overloaded {
            excluded[h] = true;
        }
        let mut moves = Vec::new();
        for vm in to_move {
            if let Some(to) = self.find_host(vm, &excluded) {
                self.add(to, vm);
                moves.push(Move { vm, to });
            }
        }

        // Underload pass.
        let mut excl_under = excluded.clone();
        let mut excl_place = excluded;
        for h in 0..n {
            if self.view.host_last_utilization(h) == 0.0 {
                excl_under[h] = true;
                excl_place[h] = true;
            }
        }
        loop {
            if excl_under.iter().all(|&x| x) {
                break;
            }
            let mut candidate = None;
            let mut min_u = 1.0;
            for (h, &skip) in excl_under.iter().enumerate() {
                let u = self.view.host_last_utilization(h);
                let settled = self.lists[h].iter().any(|&v| !self.view.vm_migrating(v))
                    && self.view.host_incoming(h).is_empty();
                if !skip && u > 0.0 && u < min_u && settled {
                    min_u = u;
                    candidate = Some(h);
                }
            }
            let Some(h) = candidate else { break };
            excl_under[h] = true;
            excl_place[h] = true;
            let mut vms: Vec<usize> = self.lists[h]
                .iter()
                .copied()
                .filter(|&v| !self.view.vm_migrating(v))
                .collect();
            self.sort_by_demand(&mut vms);
            let mut tentative: Vec<Move> = Vec::new();
            for vm in vms {
                if let Some(to) = self.find_host(vm, &excl_place) {
                    self.add(to, vm);
                    tentative.push(Move { vm, to });
                } else {
                    for m in tentative.drain(..) {
                        self.remove(m.to, m.vm);
                    }
                    break;
                }
            }
            for m in &tentative {
                excl_under[m.to] = true;
            }
            moves.extend(tentative);
        }
        Plan {
            moves,
            overloaded_hosts: overloaded.len(),
        }
    }
}

impl Planner for Policy {
    fn name(&self) -> String {
        Policy::name(self)
    }

    fn initial_placement(&self) -> InitialPlacement {
        match self {
            Self::Thr { threshold } => InitialPlacement::PowerAware {
                threshold: *threshold,
            },
            Self::Iqr { .. } | Self::Mad { .. } | Self::Lr { .. } => InitialPlacement::PowerAware {
                threshold: FALLBACK_THRESHOLD,
            },
            Self::Dvfs | Self::NoPowerManagement => InitialPlacement::FirstFit,
        }
    }

    fn power_managed(&self) -> bool {
        !matches!(self, Self::NoPowerManagement)
    }

    fn plan(&mut self, view: &View<'_>) -> Plan {
        match self {
            Self::Dvfs | Self::NoPowerManagement => Plan::default(),
            _ => Planning::new(view, *self).plan(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_match_commons_math_conventions() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(mad(&[1.0, 1.0, 2.0, 2.0, 4.0, 6.0, 9.0]), 1.0);
        // n = 12: quartiles at round(3.25) − 1 = 2 and round(9.75) − 1 = 9.
        let v: Vec<f64> = (0..12).map(f64::from).collect();
        assert_eq!(iqr(&v), 7.0);
        let (a, b) = least_squares(&[1.0, 3.0, 5.0, 7.0]);
        assert!((a + 1.0).abs() < 1e-12 && (b - 2.0).abs() < 1e-12);
    }
}
