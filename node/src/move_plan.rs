//! How the autopilot moves a VM it chose: the mode and the convergence settings, from the
//! VM's measured dirty rate and the rate measured to the target, predicted with the very
//! decisions a migration takes ([`drift_protocol::transfer::convergence::predict`]). A VM
//! predicted not to move within its limits is not offered at all.
//!
//! [`Meter`] keeps the measurements: each sandbox VM's dirty rate from its workload's write
//! counter between two samples, and each target's rate from the moves this node made to it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use drift_protocol::migration::Mode;
use drift_protocol::transfer::convergence::{predict, Action, Fallback, Limits, Prediction};
use drift_protocol::transfer::PAGE_SIZE;
use drift_protocol::{NodeId, VmId};
use serde::{Deserialize, Serialize};

use crate::hypervisor::VmView;
use crate::migration::engine::SourceParams;

const MIB: f64 = 1024.0 * 1024.0;
/// Weight of a new measurement in the running averages.
const NEW_WEIGHT: f64 = 0.5;
/// Targets whose rate is kept (the oldest measured is forgotten first).
const MAX_LINKS: usize = 4096;

/// What the autopilot measured.
#[derive(Debug, Default)]
pub struct Meter {
    /// Per VM: the write counter and when it was read.
    writes: BTreeMap<VmId, (u64, Instant)>,
    /// Per VM: bytes per second it dirties.
    dirty: BTreeMap<VmId, f64>,
    /// Per target: bytes per second a move to it carried, and when it was measured.
    links: BTreeMap<NodeId, (f64, Instant)>,
}

fn blend(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o * (1.0 - NEW_WEIGHT) + new * NEW_WEIGHT)
}

impl Meter {
    /// Takes this host's VMs as listed now: a VM's dirty rate is the pages its workload wrote
    /// since the last sample, per second. VMs no longer here are forgotten.
    pub fn sample(&mut self, vms: &[VmView]) {
        let now = Instant::now();
        self.writes.retain(|id, _| vms.iter().any(|v| &v.id == id));
        self.dirty.retain(|id, _| vms.iter().any(|v| &v.id == id));
        for v in vms.iter().filter(|v| v.backend == "sandbox") {
            if let Some((before, at)) = self.writes.insert(v.id, (v.writes, now)) {
                let secs = now.duration_since(at).as_secs_f64();
                if secs > 0.0 && v.writes >= before {
                    let rate = (v.writes - before) as f64 * PAGE_SIZE as f64 / secs;
                    let old = self.dirty.get(&v.id).copied();
                    self.dirty.insert(v.id, blend(old, rate));
                }
            }
        }
    }

    /// A move to `target` carried `bytes` in `ms`.
    pub fn learn_link(&mut self, target: NodeId, bytes: u64, ms: f64) {
        if ms <= 0.0 || bytes == 0 {
            return;
        }
        let rate = bytes as f64 / (ms / 1e3);
        if self.links.len() >= MAX_LINKS && !self.links.contains_key(&target) {
            if let Some(oldest) = self
                .links
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(n, _)| *n)
            {
                self.links.remove(&oldest);
            }
        }
        let old = self.links.get(&target).map(|(r, _)| *r);
        self.links
            .insert(target, (blend(old, rate), Instant::now()));
    }

    /// The VM's dirty rate in bytes per second: measured, or else as configured.
    pub fn dirty_rate(&self, vm: &VmId, configured_pages_per_s: u64) -> (f64, bool) {
        match self.dirty.get(vm) {
            Some(r) => (*r, true),
            None => (configured_pages_per_s as f64 * PAGE_SIZE as f64, false),
        }
    }

    /// The rate to `target` in bytes per second: measured by an earlier move, or else the
    /// configured bandwidth.
    pub fn link_rate(&self, target: &NodeId, configured_mib_per_s: u32) -> (f64, bool) {
        match self.links.get(target) {
            Some((r, _)) => (*r, true),
            None => (f64::from(configured_mib_per_s) * MIB, false),
        }
    }
}

/// How a move is made, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MovePlan {
    pub mode: Mode,
    pub fallback: String,
    pub dirty_mib_per_s: f64,
    /// Whether the dirty rate was measured (otherwise: as configured).
    pub dirty_measured: bool,
    pub link_mib_per_s: f64,
    /// Whether the link's rate was measured by an earlier move (otherwise: configured).
    pub link_measured: bool,
    pub prediction: Prediction,
}

impl MovePlan {
    /// Whether the VM is expected to move under this plan.
    pub fn moves(&self) -> bool {
        self.prediction.moves()
    }
}

impl fmt::Display for MovePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = |measured: bool| if measured { "measured" } else { "configured" };
        write!(
            f,
            "dirtying {:.0} MiB/s ({}), link {:.0} MiB/s ({}): ",
            self.dirty_mib_per_s,
            how(self.dirty_measured),
            self.link_mib_per_s,
            how(self.link_measured)
        )?;
        if self.moves() {
            write!(
                f,
                "{} with fallback {}, expected {}",
                self.mode, self.fallback, self.prediction
            )
        } else {
            write!(f, "not offered: {}", self.prediction)
        }
    }
}

/// Plans a move of a VM of `memory_mib` that dirties `dirty` bytes per second over a link
/// of `link` bytes per second: pre-copy with the node's fallback if that is expected to
/// move it; otherwise, if `allow_postcopy`, hybrid (post-copy once pre-copy stops
/// converging); otherwise a plan that does not move (the VM is not offered).
pub fn plan(
    memory_mib: u64,
    (dirty, dirty_measured): (f64, bool),
    (link, link_measured): (f64, bool),
    switchover_cost_ms: f64,
    limits: &Limits,
    allow_postcopy: bool,
) -> (MovePlan, SourceParams) {
    let memory = memory_mib.saturating_mul(1 << 20);
    let make = |mode: Mode, limits: Limits| {
        let prediction = predict(memory, dirty, link, switchover_cost_ms, &limits);
        let params = SourceParams::new(mode, limits);
        let plan = MovePlan {
            mode,
            fallback: params.limits.fallback.to_string(),
            dirty_mib_per_s: dirty / MIB,
            dirty_measured,
            link_mib_per_s: link / MIB,
            link_measured,
            prediction,
        };
        (plan, params)
    };
    let precopy = make(Mode::PreCopy, limits.clone());
    if precopy.0.moves() || !allow_postcopy {
        return precopy;
    }
    let mut hybrid = limits.clone();
    hybrid.fallback = Fallback::try_from(vec![Action::PostCopy]).expect("one action");
    make(Mode::Hybrid, hybrid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(m: f64) -> f64 {
        m * MIB
    }

    #[test]
    fn a_quiet_vm_moves_by_precopy_and_a_hot_one_is_throttled_switched_or_left_home() {
        let limits = Limits::default();
        let (p, params) = plan(
            1024,
            (mib(8.0), true),
            (mib(300.0), true),
            15.0,
            &limits,
            false,
        );
        assert_eq!((p.mode, params.mode), (Mode::PreCopy, Mode::PreCopy));
        assert!(p.moves());
        assert!(p.to_string().contains("measured"), "{p}");
        // Twice the link: the default fallback throttles it into converging.
        let (p, _) = plan(
            1024,
            (mib(600.0), true),
            (mib(300.0), false),
            15.0,
            &limits,
            false,
        );
        assert!(
            matches!(p.prediction, Prediction::SwitchOver { throttle_pct, .. } if throttle_pct >= 50),
            "{p}"
        );
        // With abort only, it stays home unless post-copy is allowed.
        let abort_only = Limits {
            fallback: "abort".parse().unwrap(),
            ..Limits::default()
        };
        let (p, _) = plan(
            1024,
            (mib(600.0), true),
            (mib(300.0), true),
            15.0,
            &abort_only,
            false,
        );
        assert!(!p.moves());
        assert!(p.to_string().contains("not offered"), "{p}");
        let (p, params) = plan(
            1024,
            (mib(600.0), true),
            (mib(300.0), true),
            15.0,
            &abort_only,
            true,
        );
        assert_eq!(p.mode, Mode::Hybrid);
        assert_eq!(params.wire_mode(), Mode::Hybrid);
        assert!(matches!(p.prediction, Prediction::PostCopy { .. }), "{p}");
    }

    #[test]
    fn the_meter_measures_dirty_rates_from_writes_and_links_from_moves() {
        let mut m = Meter::default();
        let id = VmId::from_bytes([1; 16]);
        let view = |writes| VmView {
            id,
            name: "a".into(),
            memory_mib: 16,
            vcpus: 1,
            demand_permille: 100,
            state: crate::hypervisor::RunState::Running,
            pid: None,
            writes,
            placement: Default::default(),
            backend: "sandbox".into(),
            accel: None,
            heartbeat: None,
        };
        assert_eq!(m.dirty_rate(&id, 10), (10.0 * PAGE_SIZE as f64, false));
        m.sample(&[view(0)]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        m.sample(&[view(1000)]);
        let (rate, measured) = m.dirty_rate(&id, 10);
        assert!(measured);
        // 1,000 pages in about 0.1 s (a slow machine makes it a little lower).
        assert!(
            rate > 1000.0 * 4096.0 && rate <= 1000.0 * 4096.0 / 0.1,
            "{rate}"
        );
        // A VM that left is forgotten.
        m.sample(&[]);
        assert!(!m.dirty_rate(&id, 0).1);
        let target = drift_protocol::SecretKey::from_bytes(&[2; 32]).public();
        assert_eq!(m.link_rate(&target, 100), (100.0 * MIB, false));
        m.learn_link(target, 200 << 20, 1000.0);
        assert_eq!(m.link_rate(&target, 100), (200.0 * MIB, true));
    }
}
