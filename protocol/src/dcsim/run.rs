//! The time loop: initial placement, then every step the hosts' update (demand, MIPS
//! allocation, metrics), the planner's moves, and the migrations' completion events in between,
//! the way CloudSim 3.0.3's `PowerDatacenter` sequences them.
//!
//! ```text
//! t = 0            every VM placed at its full MIPS (power-aware best fit, RAM and 10 VMs/host)
//! t = k·300 + 0.1  update all hosts (close the interval: energy, SLATAH, PDM), drop VMs whose
//!                  demand is 0, push each VM's utilization history, plan, start the moves
//!                  (counted now; the target holds the VM as migrating in), record the states
//! t + RAM/62.5     update all hosts, complete the migrations due, record the states
//! ```
//!
//! Any [`Planner`] can drive it: [`run`] takes one of the published [`Policy`] values, and
//! [`run_with`] any type that looks at a [`View`] of the data center and returns a [`Plan`].

use std::collections::VecDeque;

use super::metrics::{HostFigures, Meter, Report, StepSample, VmFigures};
use super::model::Scenario;
use super::published::Policy;
use super::trace::Trace;

/// Utilization samples a VM keeps (newest first), as CloudSim's `PowerVm`.
pub const VM_HISTORY: usize = 30;

/// One migration a planner asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The VM (index into the traces).
    pub vm: usize,
    /// The target host.
    pub to: usize,
}

/// What a planner decided at one step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Migrations to start now, in order. A move of a VM that is not on a host, to the host
    /// it is on, or to a host out of range is ignored.
    pub moves: Vec<Move>,
    /// How many hosts the planner found overloaded (for the report's series).
    pub overloaded_hosts: usize,
}

/// How VMs are placed at the start, each at its full MIPS, within cores, MIPS, RAM and the
/// per-host VM limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitialPlacement {
    /// The host whose power rises least; a non-empty host may not exceed `threshold`.
    PowerAware {
        /// Utilization limit for a non-empty host.
        threshold: f64,
    },
    /// The first host that fits.
    FirstFit,
}

/// A placement policy the simulator can run: called once per step with the data center's state.
pub trait Planner {
    /// A name for the report.
    fn name(&self) -> String;
    /// How the VMs are placed at the start (default: power-aware best fit, THR 0.7).
    fn initial_placement(&self) -> InitialPlacement {
        InitialPlacement::PowerAware {
            threshold: super::published::FALLBACK_THRESHOLD,
        }
    }
    /// Whether idle hosts switch off and power follows utilization (`false`: every host draws
    /// its full power all the time, CloudSim's `PowerDatacenterNonPowerAware`).
    fn power_managed(&self) -> bool {
        true
    }
    /// The moves to start at this step.
    fn plan(&mut self, view: &View<'_>) -> Plan;
}

#[derive(Debug, Clone)]
struct Host {
    ty: usize,
    vms: Vec<usize>,
    incoming: Vec<usize>,
    /// Utilization at the last update (CloudSim's `getUtilizationOfCpu`).
    last_utilization: f64,
}

#[derive(Debug, Clone)]
struct Vm {
    mips: f64,
    ram_mb: u32,
    host: Option<usize>,
    migrating: bool,
    history: VecDeque<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    vm: usize,
    to: usize,
    start: f64,
    end: f64,
}

/// A read-only view of the data center at a decision step.
#[derive(Debug)]
pub struct View<'a> {
    scenario: &'a Scenario,
    hosts: &'a [Host],
    vms: &'a [Vm],
    demand: &'a [f64],
    time_s: f64,
}

impl View<'_> {
    /// Simulated time (s).
    pub fn time_s(&self) -> f64 {
        self.time_s
    }
    /// Seconds between steps.
    pub fn step_s(&self) -> f64 {
        self.scenario.step_s
    }
    /// The scenario.
    pub fn scenario(&self) -> &Scenario {
        self.scenario
    }
    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }
    /// Number of VMs (placed, finished or never placed).
    pub fn vms(&self) -> usize {
        self.vms.len()
    }
    /// The VMs on host `h`, in arrival order.
    pub fn host_vms(&self, h: usize) -> &[usize] {
        &self.hosts[h].vms
    }
    /// Host `h`'s total MIPS.
    pub fn host_total_mips(&self, h: usize) -> f64 {
        self.scenario.host_types[self.hosts[h].ty].total_mips()
    }
    /// Host `h`'s MIPS per core.
    pub fn host_pe_mips(&self, h: usize) -> f64 {
        self.scenario.host_types[self.hosts[h].ty].pe_mips
    }
    /// Host `h`'s power (W) at `utilization`.
    pub fn host_power(&self, h: usize, utilization: f64) -> f64 {
        self.scenario.host_types[self.hosts[h].ty]
            .power
            .power(utilization)
    }
    /// Host `h`'s allocated utilization at this step's update (0: switched off).
    pub fn host_last_utilization(&self, h: usize) -> f64 {
        self.hosts[h].last_utilization
    }
    /// VM `v`'s requested MIPS now.
    pub fn vm_demand_mips(&self, v: usize) -> f64 {
        self.demand[v]
    }
    /// VM `v`'s capacity (MIPS).
    pub fn vm_mips(&self, v: usize) -> f64 {
        self.vms[v].mips
    }
    /// VM `v`'s memory (MB).
    pub fn vm_ram_mb(&self, v: usize) -> u32 {
        self.vms[v].ram_mb
    }
    /// Seconds VM `v` takes to migrate.
    pub fn vm_migration_s(&self, v: usize) -> f64 {
        self.scenario.migration_s(self.vms[v].ram_mb)
    }
    /// Whether VM `v` is migrating (only when migrations outlast a step).
    pub fn vm_migrating(&self, v: usize) -> bool {
        self.vms[v].migrating
    }
    /// The VMs migrating into host `h` (also listed in [`View::host_vms`]).
    pub fn host_incoming(&self, h: usize) -> &[usize] {
        &self.hosts[h].incoming
    }
    /// VM `v`'s host (the source while it migrates), `None` if it finished or was never
    /// placed.
    pub fn vm_host(&self, v: usize) -> Option<usize> {
        self.vms[v].host
    }
    /// VM `v`'s utilization history (fractions of its MIPS), newest first.
    pub fn vm_history(&self, v: usize) -> impl Iterator<Item = f64> + '_ {
        self.vms[v].history.iter().copied()
    }
}

struct Sim<'a> {
    scenario: &'a Scenario,
    traces: &'a [Trace],
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    flights: Vec<Flight>,
    finished: usize,
}

impl Sim<'_> {
    fn demand(&self, v: usize, t: f64) -> f64 {
        self.traces[v].at(t, self.scenario.step_s) * self.vms[v].mips
    }

    /// CloudSim's initial placement: each VM in order at its full MIPS on the host whose power
    /// rises least, within cores, MIPS, RAM and the per-host VM limit.
    fn place_initial(&mut self, how: InitialPlacement) -> usize {
        let n = self.hosts.len();
        let mut allocated = vec![0.0f64; n];
        let mut ram = vec![0u32; n];
        let mut unplaced = 0;
        for v in 0..self.vms.len() {
            let (mips, vm_ram) = (self.vms[v].mips, self.vms[v].ram_mb);
            let mut best = None;
            let mut best_diff = f64::MAX;
            for h in 0..n {
                let ty = &self.scenario.host_types[self.hosts[h].ty];
                let total = ty.total_mips();
                let fits = ty.pe_mips >= mips
                    && total - allocated[h] >= mips
                    && ram[h] + vm_ram <= ty.ram_mb
                    && self.hosts[h].vms.len() < self.scenario.initial_vms_per_host;
                if !fits {
                    continue;
                }
                let threshold = match how {
                    InitialPlacement::FirstFit => {
                        best = Some(h);
                        break;
                    }
                    InitialPlacement::PowerAware { threshold } => threshold,
                };
                // Placed VMs ask for nothing until their workload starts: only this one counts.
                if allocated[h] != 0.0 && mips / total > threshold {
                    continue;
                }
                let diff = ty.power.power((allocated[h] + mips) / total) - ty.power.power(0.0);
                if diff < best_diff {
                    best_diff = diff;
                    best = Some(h);
                }
            }
            match best {
                Some(h) => {
                    allocated[h] += mips;
                    ram[h] += vm_ram;
                    self.hosts[h].vms.push(v);
                    self.vms[v].host = Some(h);
                }
                None => unplaced += 1,
            }
        }
        unplaced
    }

    /// Every host's and VM's state at `t`: the MIPS each scheduler hands out.
    fn update(&self, t: f64) -> (Vec<HostFigures>, Vec<Option<VmFigures>>) {
        let sc = self.scenario;
        let (out_share, in_share) = (sc.migration_source_share, sc.migration_target_share);
        let mut hosts = Vec::with_capacity(self.hosts.len());
        let mut vms = vec![None; self.vms.len()];
        for host in &self.hosts {
            let ty = &sc.host_types[host.ty];
            let total = ty.total_mips();
            let items: Vec<(usize, f64, f64, bool, bool)> = host
                .vms
                .iter()
                .map(|&v| {
                    let req = self.demand(v, t);
                    let incoming = host.incoming.contains(&v);
                    let outgoing = self.vms[v].migrating && !incoming;
                    (v, req, req.min(ty.pe_mips), incoming, outgoing)
                })
                .collect();
            let need: f64 = items
                .iter()
                .map(|&(_, _, c, inc, _)| if inc { c * in_share } else { c })
                .sum();
            let scale = if need <= total {
                None
            } else {
                Some(total / need)
            };
            let (mut allocated, mut requested) = (0.0, 0.0);
            for &(v, req, capped, incoming, outgoing) in &items {
                let share = if outgoing {
                    out_share
                } else if incoming {
                    in_share
                } else {
                    1.0
                };
                let alloc = match scale {
                    None => capped * share,
                    Some(s) if incoming => (capped * share * s).floor(),
                    Some(s) => (capped * s * share).floor(),
                };
                if !incoming {
                    vms[v] = Some(VmFigures {
                        allocated: alloc,
                        requested: req,
                        migrating: outgoing,
                    });
                }
                allocated += if outgoing { alloc / out_share } else { alloc };
                requested += req;
            }
            let mut utilization = allocated / total;
            if utilization > 1.0 && utilization < 1.01 {
                utilization = 1.0;
            }
            hosts.push(HostFigures {
                allocated,
                requested,
                utilization,
                power_w: ty.power.power(utilization),
            });
        }
        (hosts, vms)
    }

    /// Removes VMs that ask for nothing at `t` (and are not migrating); clears their state.
    fn drop_idle(&mut self, t: f64, vm_states: &mut [Option<VmFigures>]) {
        if !self.scenario.drop_idle_vms {
            return;
        }
        for h in 0..self.hosts.len() {
            let idle: Vec<usize> = self.hosts[h]
                .vms
                .iter()
                .copied()
                .filter(|&v| !self.vms[v].migrating && self.demand(v, t) == 0.0)
                .collect();
            for v in idle {
                self.hosts[h].vms.retain(|&x| x != v);
                self.vms[v].host = None;
                vm_states[v] = None;
                self.finished += 1;
            }
        }
    }

    fn start(&mut self, m: Move, t: f64) -> bool {
        let Some(from) = self.vms.get(m.vm).and_then(|vm| vm.host) else {
            return false;
        };
        // A VM already on its way since an earlier step stays on course; a second move of the
        // same VM in one plan is allowed, as CloudSim starts it (see `published`).
        let busy = self.flights.iter().any(|f| f.vm == m.vm && f.start != t);
        if busy
            || m.to >= self.hosts.len()
            || m.to == from
            || self.hosts[m.to].incoming.contains(&m.vm)
        {
            return false;
        }
        self.hosts[m.to].incoming.push(m.vm);
        self.hosts[m.to].vms.push(m.vm);
        self.vms[m.vm].migrating = true;
        let end = t + self.scenario.migration_s(self.vms[m.vm].ram_mb);
        self.flights.push(Flight {
            vm: m.vm,
            to: m.to,
            start: t,
            end,
        });
        true
    }

    fn complete(&mut self, f: Flight) {
        if let Some(from) = self.vms[f.vm].host {
            self.hosts[from].vms.retain(|&x| x != f.vm);
        }
        let target = &mut self.hosts[f.to];
        target.incoming.retain(|&x| x != f.vm);
        target.vms.retain(|&x| x != f.vm);
        target.vms.push(f.vm);
        self.vms[f.vm].host = Some(f.to);
        self.vms[f.vm].migrating = false;
    }
}

fn powers(hosts: &[HostFigures]) -> Vec<f64> {
    hosts.iter().map(|h| h.power_w).collect()
}

/// Replays `traces` (one VM each, in order) on `scenario` under a published policy.
/// `progress(step, total)` is called after every step.
pub fn run(
    scenario: &Scenario,
    traces: &[Trace],
    policy: Policy,
    progress: &mut dyn FnMut(usize, usize),
) -> Report {
    let mut planner = policy;
    run_with(scenario, traces, &mut planner, progress)
}

/// Replays `traces` on `scenario` with any [`Planner`].
pub fn run_with(
    scenario: &Scenario,
    traces: &[Trace],
    planner: &mut dyn Planner,
    progress: &mut dyn FnMut(usize, usize),
) -> Report {
    let n_vms = traces.len();
    let mut sim = Sim {
        scenario,
        traces,
        hosts: (0..scenario.hosts)
            .map(|i| Host {
                ty: i % scenario.host_types.len().max(1),
                vms: Vec::new(),
                incoming: Vec::new(),
                last_utilization: 0.0,
            })
            .collect(),
        vms: (0..n_vms)
            .map(|i| {
                let ty = scenario.vm_type(i, n_vms);
                Vm {
                    mips: ty.mips,
                    ram_mb: ty.ram_mb,
                    host: None,
                    migrating: false,
                    history: VecDeque::with_capacity(VM_HISTORY),
                }
            })
            .collect(),
        flights: Vec::new(),
        finished: 0,
    };
    let vms_unplaced = if scenario.host_types.is_empty() {
        n_vms
    } else {
        sim.place_initial(planner.initial_placement())
    };
    let samples = traces.iter().map(|t| t.samples.len()).min().unwrap_or(0);
    let steps = samples.saturating_sub(1);
    #[allow(clippy::cast_precision_loss)]
    let limit = samples as f64 * scenario.step_s;
    let mut meter = Meter::new(scenario.hosts, n_vms);
    // Without power management every host draws its full power all day, in the energy and in
    // the series alike.
    let always_on_w: Option<f64> = (!planner.power_managed()).then(|| {
        let full: Vec<f64> = sim
            .hosts
            .iter()
            .map(|h| scenario.host_types[h.ty].power.power(1.0))
            .collect();
        let total = full.iter().sum();
        meter.always_on(full);
        total
    });
    let mut series = Vec::with_capacity(steps);
    let mut migrations = 0;
    for k in 1..=steps {
        #[allow(clippy::cast_precision_loss)]
        let t = k as f64 * scenario.step_s + scenario.step_offset_s;
        let (hosts, mut vm_states) = sim.update(t);
        meter.close_interval(t, &powers(&hosts));
        sim.drop_idle(t, &mut vm_states);
        for (h, fig) in hosts.iter().enumerate() {
            sim.hosts[h].last_utilization = fig.utilization;
        }
        let demand: Vec<f64> = (0..n_vms)
            .map(|v| {
                if sim.vms[v].host.is_some() {
                    sim.demand(v, t)
                } else {
                    0.0
                }
            })
            .collect();
        for (v, vm) in sim.vms.iter_mut().enumerate() {
            if vm.host.is_some() {
                if vm.history.len() == VM_HISTORY {
                    vm.history.pop_back();
                }
                vm.history.push_front(demand[v] / vm.mips);
            }
        }
        let plan = {
            let view = View {
                scenario,
                hosts: &sim.hosts,
                vms: &sim.vms,
                demand: &demand,
                time_s: t,
            };
            planner.plan(&view)
        };
        let mut started = 0;
        for m in plan.moves {
            if sim.start(m, t) {
                started += 1;
            }
        }
        migrations += started;
        let (hosts, mut vm_states) = sim.update(t);
        for (v, vm) in sim.vms.iter().enumerate() {
            if vm.host.is_none() {
                vm_states[v] = None;
            }
        }
        meter.record(t, &hosts, &vm_states);
        series.push(StepSample {
            time_s: t,
            active_hosts: hosts.iter().filter(|h| h.active()).count(),
            power_w: always_on_w.unwrap_or_else(|| {
                hosts
                    .iter()
                    .map(|h| if h.utilization > 0.0 { h.power_w } else { 0.0 })
                    .sum()
            }),
            overloaded_hosts: plan.overloaded_hosts,
            migrations: started,
        });

        // Completion events before the next step.
        let next = t + scenario.step_s;
        loop {
            let due = sim
                .flights
                .iter()
                .map(|f| f.end)
                .filter(|&e| e < next && e <= limit)
                .fold(f64::INFINITY, f64::min);
            if !due.is_finite() {
                break;
            }
            let (hosts, mut vm_states) = sim.update(due);
            meter.close_interval(due, &powers(&hosts));
            sim.drop_idle(due, &mut vm_states);
            let (now, later): (Vec<Flight>, Vec<Flight>) =
                sim.flights.iter().partition(|f| f.end == due);
            sim.flights = later;
            for f in now {
                sim.complete(f);
            }
            let (hosts, mut vm_states) = sim.update(due);
            sim.drop_idle(due, &mut vm_states);
            for (v, vm) in sim.vms.iter().enumerate() {
                if vm.host.is_none() {
                    vm_states[v] = None;
                }
            }
            meter.record(due, &hosts, &vm_states);
        }
        progress(k, steps);
    }
    let energy_kwh = meter.energy_kwh();
    let (slatah, pdm) = (meter.slatah(), meter.pdm());
    let peak_active_hosts = series.iter().map(|s| s.active_hosts).max().unwrap_or(0);
    #[allow(clippy::cast_precision_loss)]
    let mean_active_hosts = if series.is_empty() {
        0.0
    } else {
        series.iter().map(|s| s.active_hosts as f64).sum::<f64>() / series.len() as f64
    };
    Report {
        policy: planner.name(),
        hosts: scenario.hosts,
        vms: n_vms,
        vms_unplaced,
        vms_running: sim.vms.iter().filter(|vm| vm.host.is_some()).count(),
        vms_finished: sim.finished,
        steps,
        energy_kwh,
        slatah,
        pdm,
        slav: slatah * pdm,
        esv: energy_kwh * slatah * pdm,
        migrations,
        host_shutdowns: meter.shutdowns,
        peak_active_hosts,
        mean_active_hosts,
        series,
    }
}
