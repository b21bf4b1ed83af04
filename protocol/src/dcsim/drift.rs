//! drift's own policy on the benchmark: [`consolidate`](crate::policy::consolidate) run by every
//! host, decentralized as the nodes run it, or centralized with one fresh global view for
//! comparison.
//!
//! ## Decentralized ([`Mode::Decentralized`])
//!
//! Every step (one report interval, 300 s), each host that holds VMs decides alone from:
//!
//! - its own fresh state: its VMs' demand histories (the simulator's 30 samples), its
//!   requested-load history (kept here, one sample a step), its draining flag;
//! - its table: every other host's [`Row`] as that host reported it `lag_steps` steps earlier
//!   (default 1: a report sent at the previous step, gossip delay under one interval, so every
//!   row is 300 s plus the delay old and the moves decided since are not in it).
//!
//! All hosts decide, then offers reach their targets, sources in a random order (the RNG is
//! seeded by [`Drift::new`]); each target admits or refuses each offer with [`admit`] against
//! its own *current* state plus the offers it already accepted this step. A host that decides
//! to drain is draining from then on and refuses every offer. A refused offer is dropped; its
//! source plans again at the next step from a fresher table.
//!
//! ## Centralized ([`Mode::Centralized`])
//!
//! The same rules and parameters with one fresh view: hosts decide in sequence (overloaded
//! ones first, most loaded first, then the rest least loaded first), each from the rows as the
//! decisions before it left them, so no offer is ever made on stale data.

use std::collections::VecDeque;

use rand_core::{impls, RngCore};

use super::run::{Move, Plan, Planner, View};
use crate::policy::consolidate::{
    admit, forecast, plan, Action, LocalVm, Offer, OwnHost, Params, Row, TargetState,
};

/// Where decisions are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every host alone, from a table `lag_steps` steps old.
    Decentralized {
        /// How many steps old every row of a host's table is (≥ 1).
        lag_steps: usize,
    },
    /// One planner with a fresh view, decisions in sequence.
    Centralized,
}

/// Load samples a host keeps of itself.
const LOAD_HISTORY: usize = 12;

/// A small deterministic RNG (SplitMix64), so the simulator needs no RNG crate.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl RngCore for SplitMix {
    fn next_u32(&mut self) -> u32 {
        // The high half is the better half.
        #[allow(clippy::cast_possible_truncation)]
        let x = (self.next_u64() >> 32) as u32;
        x
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        impls::fill_bytes_via_next(self, dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// drift's policy as a [`Planner`].
#[derive(Debug, Clone)]
pub struct Drift {
    mode: Mode,
    params: Params,
    rng: SplitMix,
    moved_at: Vec<Option<f64>>,
    load: Vec<VecDeque<f64>>,
    draining: Vec<bool>,
    reports: VecDeque<Vec<Row<usize>>>,
}

impl Drift {
    /// drift's policy in `mode` with `params`, its RNG seeded with `seed`.
    pub fn new(mode: Mode, params: Params, seed: u64) -> Self {
        Self {
            mode,
            params,
            rng: SplitMix(seed),
            moved_at: Vec::new(),
            load: Vec::new(),
            draining: Vec::new(),
            reports: VecDeque::new(),
        }
    }

    /// Decentralized with a one-step-old table and the default parameters.
    pub fn decentralized() -> Self {
        Self::new(Mode::Decentralized { lag_steps: 1 }, Params::default(), 1)
    }

    /// Centralized with the default parameters.
    pub fn centralized() -> Self {
        Self::new(Mode::Centralized, Params::default(), 1)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            // i + 1 is small; the modulo keeps it in range.
            #[allow(clippy::cast_possible_truncation)]
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

fn local_vms(view: &View<'_>, vms: &[usize], moved_at: &[Option<f64>]) -> Vec<LocalVm<usize>> {
    vms.iter()
        .map(|&v| {
            let mips = view.vm_mips(v);
            LocalVm {
                id: v,
                demand: view.vm_history(v).map(|u| u * mips).collect(),
                memory_mb: u64::from(view.vm_ram_mb(v)),
                migrating: view.vm_migrating(v),
                moved_at_s: moved_at[v],
            }
        })
        .collect()
}

fn target_state(row: &Row<usize>) -> TargetState {
    TargetState {
        capacity: row.capacity,
        core_capacity: row.core_capacity,
        forecast: row.forecast,
        memory_free_mb: row.memory_free_mb,
        reserved: 0.0,
        reserved_mb: 0,
        draining: row.draining,
    }
}

impl Planner for Drift {
    fn name(&self) -> String {
        match self.mode {
            Mode::Decentralized { .. } => "drift-decentralized".into(),
            Mode::Centralized => "drift-centralized".into(),
        }
    }

    fn plan(&mut self, view: &View<'_>) -> Plan {
        let (n, t, p) = (view.hosts(), view.time_s(), self.params);
        if self.load.len() != n {
            self.load = vec![VecDeque::with_capacity(LOAD_HISTORY); n];
            self.draining = vec![false; n];
        }
        if self.moved_at.len() != view.vms() {
            self.moved_at = vec![None; view.vms()];
        }
        let mut lists: Vec<Vec<usize>> = (0..n).map(|h| view.host_vms(h).to_vec()).collect();
        let mut rows: Vec<Row<usize>> = Vec::with_capacity(n);
        for (h, vms) in lists.iter().enumerate() {
            let capacity = view.host_total_mips(h);
            let requested: f64 = vms.iter().map(|&v| view.vm_demand_mips(v)).sum();
            let hist = &mut self.load[h];
            if hist.len() == LOAD_HISTORY {
                hist.pop_back();
            }
            hist.push_front(requested / capacity);
            if vms.is_empty() {
                self.draining[h] = false;
            }
            let f: f64 = vms
                .iter()
                .map(|&v| {
                    let mips = view.vm_mips(v);
                    let d: Vec<f64> = view.vm_history(v).map(|u| u * mips).collect();
                    forecast(&d, &p)
                })
                .sum();
            let ram: u64 = vms.iter().map(|&v| u64::from(view.vm_ram_mb(v))).sum();
            rows.push(Row {
                id: h,
                capacity,
                core_capacity: view.host_pe_mips(h),
                load: requested,
                forecast: f,
                memory_free_mb: u64::from(view.scenario().host_type(h).ram_mb).saturating_sub(ram),
                standby: vms.is_empty(),
                draining: self.draining[h],
            });
        }
        let mut moves = Vec::new();
        let mut overloaded = 0;
        match self.mode {
            Mode::Decentralized { lag_steps } => {
                let lag = lag_steps.max(1);
                self.reports.push_back(rows.clone());
                while self.reports.len() > lag + 1 {
                    self.reports.pop_front();
                }
                // The oldest kept report is `lag` steps old once the run has lasted that long.
                let table = self.reports.front().cloned().unwrap_or_default();
                let mut actions = Vec::new();
                for (h, vms) in lists.iter().enumerate() {
                    if vms.is_empty() {
                        continue;
                    }
                    let local = local_vms(view, vms, &self.moved_at);
                    let hist: Vec<f64> = self.load[h].iter().copied().collect();
                    let own = OwnHost {
                        id: h,
                        capacity: rows[h].capacity,
                        load_history: &hist,
                        vms: &local,
                        draining: self.draining[h],
                    };
                    let action = plan(&p, t, &own, &table, &mut self.rng);
                    match &action {
                        Action::Stay => self.draining[h] = false,
                        Action::Relieve(_) => {
                            overloaded += 1;
                            self.draining[h] = false;
                        }
                        Action::Drain(_) => self.draining[h] = true,
                    }
                    if let Action::Relieve(o) | Action::Drain(o) = action {
                        if !o.is_empty() {
                            actions.push(o);
                        }
                    }
                }
                let mut targets: Vec<TargetState> = rows
                    .iter()
                    .enumerate()
                    .map(|(h, r)| TargetState {
                        draining: self.draining[h],
                        ..target_state(r)
                    })
                    .collect();
                self.shuffle(&mut actions);
                for offers in actions {
                    for o in offers {
                        if admit(&p, &targets[o.to], &o).is_ok() {
                            targets[o.to].reserve(&o);
                            self.moved_at[o.vm] = Some(t);
                            moves.push(Move { vm: o.vm, to: o.to });
                        }
                    }
                }
            }
            Mode::Centralized => {
                let mut order: Vec<usize> = (0..n).filter(|&h| !lists[h].is_empty()).collect();
                let over: Vec<bool> = (0..n)
                    .map(|h| {
                        let hist: Vec<f64> = self.load[h].iter().copied().collect();
                        crate::policy::consolidate::overloaded(&p, &hist).0
                    })
                    .collect();
                order.sort_by(|&a, &b| {
                    let (ua, ub) = (rows[a].load / rows[a].capacity, rows[b].load / rows[b].capacity);
                    over[b]
                        .cmp(&over[a])
                        .then(if over[a] { ub.total_cmp(&ua) } else { ua.total_cmp(&ub) })
                        .then(a.cmp(&b))
                });
                for h in order {
                    if lists[h].is_empty() {
                        continue;
                    }
                    let local = local_vms(view, &lists[h], &self.moved_at);
                    let hist: Vec<f64> = self.load[h].iter().copied().collect();
                    let own = OwnHost {
                        id: h,
                        capacity: rows[h].capacity,
                        load_history: &hist,
                        vms: &local,
                        draining: self.draining[h],
                    };
                    let action = plan(&p, t, &own, &rows, &mut self.rng);
                    let offers: Vec<Offer<usize, usize>> = match action {
                        Action::Stay => {
                            self.draining[h] = false;
                            continue;
                        }
                        Action::Relieve(o) => {
                            overloaded += 1;
                            self.draining[h] = false;
                            o
                        }
                        Action::Drain(o) => {
                            self.draining[h] = true;
                            rows[h].draining = true;
                            o
                        }
                    };
                    for o in offers {
                        if admit(&p, &target_state(&rows[o.to]), &o).is_err() {
                            continue;
                        }
                        let to = &mut rows[o.to];
                        to.forecast += o.forecast;
                        to.load += o.demand;
                        to.memory_free_mb = to.memory_free_mb.saturating_sub(o.memory_mb);
                        to.standby = false;
                        let from = &mut rows[h];
                        from.forecast -= o.forecast;
                        from.load -= o.demand;
                        from.memory_free_mb += o.memory_mb;
                        lists[h].retain(|&v| v != o.vm);
                        lists[o.to].push(o.vm);
                        self.moved_at[o.vm] = Some(t);
                        moves.push(Move { vm: o.vm, to: o.to });
                    }
                    rows[h].standby = lists[h].is_empty();
                }
            }
        }
        Plan {
            moves,
            overloaded_hosts: overloaded,
        }
    }
}
