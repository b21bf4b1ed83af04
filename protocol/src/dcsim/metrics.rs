//! What a run measures and how: the [`Report`] (energy, SLATAH, PDM, SLAV, ESV, migrations,
//! shutdowns, active hosts, a per-step series) and the meter that integrates it between
//! simulator events exactly as CloudSim 3.0.3's `PowerDatacenter` and `examples/power/Helper`
//! do:
//!
//! - energy: between two consecutive events, every host draws the mean of its power at the
//!   start (after the first event's changes) and at the end (before the second's); a host at
//!   0 % at the start of the interval draws nothing;
//! - SLATAH: an interval counts for a host if it was active (allocated MIPS > 0) at its start,
//!   and as a violation if its allocated MIPS were below its requested MIPS then (a VM's
//!   request above one core is capped at the core, and a VM migrating in counts at its full
//!   request but its 10 % reservation, so a migration target violates while it lasts);
//! - PDM: per VM, the MIPS requested but not allocated over intervals that start while the VM
//!   is migrating out, over all MIPS requested.

use serde::{Deserialize, Serialize};

/// One decision step, for plots.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepSample {
    /// Simulated time (s) of the decision.
    pub time_s: f64,
    /// Hosts with a non-zero allocation after the step's migrations started.
    pub active_hosts: usize,
    /// Total power (W) then.
    pub power_w: f64,
    /// Hosts the policy found overloaded at this step.
    pub overloaded_hosts: usize,
    /// Migrations started at this step.
    pub migrations: usize,
}

/// The figures of one run. Fractions are in `0..=1` (multiply by 100 for percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The policy's name, e.g. `THR-MMT-0.8`.
    pub policy: String,
    /// Number of hosts.
    pub hosts: usize,
    /// Number of VMs at the start.
    pub vms: usize,
    /// VMs that could not be placed at the start.
    pub vms_unplaced: usize,
    /// VMs on a host at the end.
    pub vms_running: usize,
    /// VMs that left because their demand dropped to 0 (CloudSim's finished workloads).
    pub vms_finished: usize,
    /// Decision steps simulated.
    pub steps: usize,
    /// Energy (kWh).
    pub energy_kwh: f64,
    /// SLA violation time per active host: the share of active host time at 100 %.
    pub slatah: f64,
    /// Performance degradation due to migration.
    pub pdm: f64,
    /// SLATAH × PDM.
    pub slav: f64,
    /// Energy (kWh) × SLAV.
    pub esv: f64,
    /// Migrations started.
    pub migrations: usize,
    /// Times a host went from active to idle.
    pub host_shutdowns: usize,
    /// Most active hosts at a step.
    pub peak_active_hosts: usize,
    /// Mean active hosts over the steps.
    pub mean_active_hosts: f64,
    /// One sample per decision step.
    pub series: Vec<StepSample>,
}

/// Host-side state at one event, as the metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct HostFigures {
    /// Allocated MIPS (a migrating-out VM counted at its full allocation).
    pub allocated: f64,
    /// Requested MIPS (migrating-in VMs included).
    pub requested: f64,
    /// Utilization (allocated / total), at most 1.
    pub utilization: f64,
    /// Power (W) at that utilization.
    pub power_w: f64,
}

impl HostFigures {
    pub(crate) fn active(&self) -> bool {
        self.allocated > 0.0
    }
}

/// VM-side state at one event.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct VmFigures {
    pub allocated: f64,
    pub requested: f64,
    pub migrating: bool,
}

/// Integrates the metrics between events.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    last_time: Option<f64>,
    /// Post-event host states of the last event.
    hosts: Vec<HostFigures>,
    /// Post-event VM states of the last event (`None`: no state, the VM is gone or not placed).
    vms: Vec<Option<VmFigures>>,
    /// Whether each host was active at its last recorded state (starts `true`, as CloudSim).
    was_active: Vec<bool>,
    energy_ws: f64,
    active_time: f64,
    violation_time: f64,
    requested: f64,
    degraded_by_migration: f64,
    pub shutdowns: usize,
    /// Every host's full power, when hosts are never managed (metered from time 0).
    always_on: Option<Vec<f64>>,
}

impl Meter {
    pub(crate) fn new(hosts: usize, vms: usize) -> Self {
        Self {
            hosts: vec![HostFigures::default(); hosts],
            vms: vec![None; vms],
            was_active: vec![true; hosts],
            ..Self::default()
        }
    }

    /// Every host draws `full_power_w` all the time, from time 0 (CloudSim's
    /// `PowerDatacenterNonPowerAware`).
    pub(crate) fn always_on(&mut self, full_power_w: Vec<f64>) {
        self.always_on = Some(full_power_w);
        self.last_time = Some(0.0);
    }

    /// Closes the interval since the last event at `time`, with the hosts' power at `time`
    /// before this event changes anything (`power_before`).
    pub(crate) fn close_interval(&mut self, time: f64, power_before: &[f64]) {
        let Some(last) = self.last_time else {
            return;
        };
        let dt = time - last;
        if dt <= 0.0 {
            return;
        }
        if let Some(full) = &self.always_on {
            self.energy_ws += full.iter().sum::<f64>() * dt;
        }
        for (h, start) in self.hosts.iter().enumerate() {
            if self.always_on.is_none() && start.utilization != 0.0 {
                let end = power_before[h];
                self.energy_ws += (start.power_w + (end - start.power_w) / 2.0) * dt;
            }
            if start.active() {
                self.active_time += dt;
                if start.allocated < start.requested {
                    self.violation_time += dt;
                }
            }
        }
        for vm in self.vms.iter().flatten() {
            self.requested += vm.requested * dt;
            if vm.migrating && vm.allocated < vm.requested {
                self.degraded_by_migration += (vm.requested - vm.allocated) * dt;
            }
        }
    }

    /// Records the states after the event at `time`; they hold until the next event.
    pub(crate) fn record(&mut self, time: f64, hosts: &[HostFigures], vms: &[Option<VmFigures>]) {
        for (h, state) in hosts.iter().enumerate() {
            let active = state.active();
            if self.was_active[h] && !active {
                self.shutdowns += 1;
            }
            self.was_active[h] = active;
        }
        self.hosts.clear();
        self.hosts.extend_from_slice(hosts);
        self.vms.clear();
        self.vms.extend_from_slice(vms);
        self.last_time = Some(time);
    }

    pub(crate) fn energy_kwh(&self) -> f64 {
        self.energy_ws / 3_600_000.0
    }

    pub(crate) fn slatah(&self) -> f64 {
        if self.active_time > 0.0 {
            self.violation_time / self.active_time
        } else {
            0.0
        }
    }

    pub(crate) fn pdm(&self) -> f64 {
        if self.requested > 0.0 {
            self.degraded_by_migration / self.requested
        } else {
            0.0
        }
    }
}
