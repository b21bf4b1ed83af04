//! The data center's fixed parts: host and VM types, SPECpower models and the [`Scenario`]
//! (how many hosts, which types, how migrations are timed). Defaults are the setup of
//! Beloglazov & Buyya 2012 as CloudSim 3.0.3 ships it.

use serde::{Deserialize, Serialize};

/// Power drawn (W) at 0, 10, …, 100 % CPU, linear in between (a SPECpower table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerModel {
    /// Watts at 0 %, 10 %, …, 100 % utilization.
    pub watts: [f64; 11],
}

impl PowerModel {
    /// HP ProLiant ML110 G4 (Xeon 3040).
    pub const HP_G4: Self = Self {
        watts: [
            86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0,
        ],
    };
    /// HP ProLiant ML110 G5 (Xeon 3075).
    pub const HP_G5: Self = Self {
        watts: [
            93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0,
        ],
    };

    /// Power (W) at `utilization` (a fraction, clamped to 0..=1), interpolated between the two
    /// neighbouring table points the way CloudSim's `PowerModelSpecPower` does.
    pub fn power(&self, utilization: f64) -> f64 {
        let u = utilization.clamp(0.0, 1.0);
        // Truncation is the intent: the table index below and above `u`.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let (lo, hi) = ((u * 10.0).floor() as usize, (u * 10.0).ceil() as usize);
        let (p1, p2) = (self.watts[lo], self.watts[hi]);
        #[allow(clippy::cast_precision_loss)]
        let base = lo as f64 / 10.0;
        p1 + (p2 - p1) / 10.0 * (u - base) * 100.0
    }
}

/// A kind of physical host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostType {
    /// A short name for reports.
    pub name: String,
    /// MIPS of one core; a VM's request is capped at this (a VM has one core).
    pub pe_mips: f64,
    /// Number of cores.
    pub pes: u32,
    /// Memory (MB); only checked at the initial placement, as in CloudSim.
    pub ram_mb: u32,
    /// The SPECpower model.
    pub power: PowerModel,
}

impl HostType {
    /// Total MIPS (cores × MIPS per core).
    pub fn total_mips(&self) -> f64 {
        self.pe_mips * f64::from(self.pes)
    }
}

/// A kind of VM: its full CPU capacity and memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VmType {
    /// MIPS the VM asks for at 100 % of its trace.
    pub mips: f64,
    /// Memory (MB); sets the migration time and the MMT order.
    pub ram_mb: u32,
}

/// Everything about a run except the traces and the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Number of hosts; host `i` has type `host_types[i % host_types.len()]`.
    pub hosts: usize,
    /// Host types, given out in turn.
    pub host_types: Vec<HostType>,
    /// VM types, given out in contiguous blocks: VM `i` of `n` gets type `i / ceil(n / k)`.
    pub vm_types: Vec<VmType>,
    /// Seconds between decisions (and between trace samples).
    pub step_s: f64,
    /// Offset (s) of every decision after the sample time (CloudSim decides at 300 k + 0.1 s).
    pub step_offset_s: f64,
    /// Migration bandwidth (MB/s): a migration lasts RAM / this.
    pub migration_mb_per_s: f64,
    /// At most this many VMs per host at the initial placement (CloudSim's bandwidth check:
    /// 1 Gbit/s host, 100 Mbit/s per VM).
    pub initial_vms_per_host: usize,
    /// A VM whose demand is exactly 0 outside a migration leaves the data center for good
    /// (CloudSim treats it as a finished workload).
    pub drop_idle_vms: bool,
    /// The MIPS share a migrating VM gets at its source.
    pub migration_source_share: f64,
    /// The share of the VM's MIPS its target reserves during the migration.
    pub migration_target_share: f64,
}

impl Default for Scenario {
    fn default() -> Self {
        Self::paper(800)
    }
}

impl Scenario {
    /// The paper's data center with `hosts` hosts: alternating HP G4 / G5, four VM types.
    pub fn paper(hosts: usize) -> Self {
        Self {
            hosts,
            host_types: vec![
                HostType {
                    name: "HP ML110 G4".into(),
                    pe_mips: 1860.0,
                    pes: 2,
                    ram_mb: 4096,
                    power: PowerModel::HP_G4,
                },
                HostType {
                    name: "HP ML110 G5".into(),
                    pe_mips: 2660.0,
                    pes: 2,
                    ram_mb: 4096,
                    power: PowerModel::HP_G5,
                },
            ],
            vm_types: vec![
                VmType {
                    mips: 2500.0,
                    ram_mb: 870,
                },
                VmType {
                    mips: 2000.0,
                    ram_mb: 1740,
                },
                VmType {
                    mips: 1000.0,
                    ram_mb: 1740,
                },
                VmType {
                    mips: 500.0,
                    ram_mb: 613,
                },
            ],
            step_s: 300.0,
            step_offset_s: 0.1,
            migration_mb_per_s: 62.5,
            initial_vms_per_host: 10,
            drop_idle_vms: true,
            migration_source_share: 0.9,
            migration_target_share: 0.1,
        }
    }

    /// The type of host `i`.
    pub fn host_type(&self, i: usize) -> &HostType {
        &self.host_types[i % self.host_types.len()]
    }

    /// The type of VM `i` of `n`.
    pub fn vm_type(&self, i: usize, n: usize) -> VmType {
        let k = self.vm_types.len().max(1);
        let block = n.div_ceil(k).max(1);
        self.vm_types[(i / block).min(k - 1)]
    }

    /// Seconds a VM with `ram_mb` takes to migrate.
    pub fn migration_s(&self, ram_mb: u32) -> f64 {
        f64::from(ram_mb) / self.migration_mb_per_s
    }
}
