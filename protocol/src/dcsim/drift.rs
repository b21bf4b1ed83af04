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
    admit, forecast, plan, Action, LocalVm, Offer, OwnHost, Params, Refusal, Row, TargetState,
};

/// Where decisions are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every host alone, from a table `lag_steps` steps old.
    Decentralized {
        /// How many steps old every row of a host's table is (≥ 1).
        lag_steps: usize,
        /// Offer rounds per step (≥ 1): a host whose offer was refused plans again in the
        /// next round with the numbers the refusing target sent back (a round trip, far
        /// shorter than a report interval).
        rounds: usize,
    },
    /// One planner with a fresh view, decisions in sequence.
    Centralized,
}

/// Load samples a host keeps of itself.
const LOAD_HISTORY: usize = 12;

/// A small deterministic RNG (SplitMix64), so the simulator needs no RNG crate.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// Seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
}

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
    stats: Stats,
}

/// What the hosts decided and what their targets answered, over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Decisions to relieve an overloaded host.
    pub relieves: u64,
    /// Decisions to drain.
    pub drains: u64,
    /// Offers sent.
    pub offers: u64,
    /// Offers refused because the target was draining.
    pub refused_draining: u64,
    /// Offers refused for load (the target's forecast would pass its limit).
    pub refused_load: u64,
    /// Offers refused for another reason (core, memory).
    pub refused_other: u64,
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
            stats: Stats::default(),
        }
    }

    /// Decentralized with a one-step-old table and the default parameters.
    pub fn decentralized() -> Self {
        Self::new(
            Mode::Decentralized {
                lag_steps: 1,
                rounds: 10,
            },
            Params::default(),
            1,
        )
    }

    /// Centralized with the default parameters.
    pub fn centralized() -> Self {
        Self::new(Mode::Centralized, Params::default(), 1)
    }

    /// What happened so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn count(&mut self, r: Result<(), Refusal>) -> bool {
        self.stats.offers += 1;
        match r {
            Ok(()) => return true,
            Err(Refusal::Draining) => self.stats.refused_draining += 1,
            Err(Refusal::Load) => self.stats.refused_load += 1,
            Err(_) => self.stats.refused_other += 1,
        }
        false
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
        standby: row.standby,
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
            Mode::Decentralized { lag_steps, rounds } => {
                let lag = lag_steps.max(1);
                self.reports.push_back(rows.clone());
                while self.reports.len() > lag + 1 {
                    self.reports.pop_front();
                }
                // The oldest kept report is `lag` steps old once the run has lasted that long.
                let reports = self.reports.front().cloned().unwrap_or_default();
                let mut targets: Vec<TargetState> = rows.iter().map(target_state).collect();
                // Rows a host learned from its targets' replies this step.
                let mut learned: Vec<Vec<Row<usize>>> = vec![Vec::new(); n];
                let mut pending: Vec<usize> = (0..n).filter(|&h| !lists[h].is_empty()).collect();
                for round in 0..rounds.max(1) {
                    let mut actions = Vec::new();
                    for &h in &pending {
                        if lists[h].is_empty() || targets[h].reserved > 0.0 {
                            continue;
                        }
                        let local = local_vms(view, &lists[h], &self.moved_at);
                        let hist: Vec<f64> = self.load[h].iter().copied().collect();
                        let own = OwnHost {
                            id: h,
                            capacity: rows[h].capacity,
                            core_capacity: rows[h].core_capacity,
                            load_history: &hist,
                            vms: &local,
                            draining: self.draining[h],
                        };
                        let action = if learned[h].is_empty() {
                            plan(&p, t, &own, &reports, &mut self.rng)
                        } else {
                            let mut table = reports.clone();
                            for r in &learned[h] {
                                table[r.id] = *r;
                            }
                            plan(&p, t, &own, &table, &mut self.rng)
                        };
                        match &action {
                            Action::Stay => self.draining[h] = false,
                            Action::Relieve(_) => {
                                if round == 0 {
                                    self.stats.relieves += 1;
                                    overloaded += 1;
                                }
                                self.draining[h] = false;
                            }
                            Action::Drain(_) => {
                                self.stats.drains += 1;
                                self.draining[h] = true;
                            }
                        }
                        targets[h].draining = self.draining[h];
                        if let Action::Relieve(o) | Action::Drain(o) = action {
                            if !o.is_empty() {
                                actions.push((h, o));
                            }
                        }
                    }
                    self.shuffle(&mut actions);
                    pending.clear();
                    for (h, offers) in actions {
                        let (mut accepted, mut refused) = (0, 0);
                        for o in offers {
                            if self.count(admit(&p, &targets[o.to], &o)) {
                                targets[o.to].reserve(&o);
                                self.moved_at[o.vm] = Some(t);
                                moves.push(Move { vm: o.vm, to: o.to });
                                lists[h].retain(|&v| v != o.vm);
                                accepted += 1;
                            } else {
                                refused += 1;
                            }
                            // Every reply carries the target's current numbers.
                            let ts = &targets[o.to];
                            learned[h].push(Row {
                                forecast: ts.forecast + ts.reserved,
                                load: rows[o.to].load + ts.reserved,
                                memory_free_mb: ts.memory_free_mb.saturating_sub(ts.reserved_mb),
                                standby: ts.standby,
                                draining: ts.draining,
                                ..rows[o.to]
                            });
                        }
                        // A drain nobody took has not started: the host is free to take VMs.
                        if accepted == 0 {
                            self.draining[h] = false;
                            targets[h].draining = false;
                        }
                        if refused > 0 {
                            pending.push(h);
                        }
                    }
                    pending.sort_unstable();
                    if pending.is_empty() {
                        break;
                    }
                }
            }
            Mode::Centralized => {
                // One planner with a fresh view needs no spreading: always the best fit.
                let p = Params {
                    choice_spread: 1,
                    ..p
                };
                let mut order: Vec<usize> = (0..n).filter(|&h| !lists[h].is_empty()).collect();
                let over: Vec<bool> = (0..n)
                    .map(|h| {
                        let hist: Vec<f64> = self.load[h].iter().copied().collect();
                        crate::policy::consolidate::overloaded(&p, &hist).0
                    })
                    .collect();
                order.sort_by(|&a, &b| {
                    let (ua, ub) = (
                        rows[a].load / rows[a].capacity,
                        rows[b].load / rows[b].capacity,
                    );
                    over[b]
                        .cmp(&over[a])
                        .then(if over[a] {
                            ub.total_cmp(&ua)
                        } else {
                            ua.total_cmp(&ub)
                        })
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
                        core_capacity: rows[h].core_capacity,
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
                            self.stats.relieves += 1;
                            overloaded += 1;
                            self.draining[h] = false;
                            o
                        }
                        Action::Drain(o) => {
                            self.stats.drains += 1;
                            self.draining[h] = true;
                            rows[h].draining = true;
                            o
                        }
                    };
                    for o in offers {
                        if !self.count(admit(&p, &target_state(&rows[o.to]), &o)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcsim::{run, run_with, Policy, Report, Scenario, Trace};

    /// VMs whose demand swings between 5 % and 95 % on their own periods and phases.
    fn traces(n: usize, samples: usize) -> Vec<Trace> {
        let mut rng = SplitMix::new(42);
        (0..n)
            .map(|i| {
                #[allow(clippy::cast_precision_loss)]
                let (period, phase) = (6.0 + (i % 7) as f64 * 3.0, i as f64);
                let fr: Vec<f64> = (0..samples)
                    .map(|k| {
                        #[allow(clippy::cast_precision_loss)]
                        let x = (k as f64 + phase) / period * std::f64::consts::TAU;
                        #[allow(clippy::cast_precision_loss)]
                        let noise = (rng.next_u64() % 1000) as f64 / 10_000.0;
                        (0.45 + 0.4 * x.sin() + noise).clamp(0.05, 0.95)
                    })
                    .collect();
                Trace::from_fractions(&format!("vm{i}"), fr)
            })
            .collect()
    }

    fn conserved(r: &Report) {
        assert_eq!(r.vms_running + r.vms_finished + r.vms_unplaced, r.vms);
        assert_eq!(r.vms_unplaced, 0);
    }

    #[test]
    fn drift_moves_far_less_than_thr_mmt_and_consolidates() {
        let scenario = Scenario::paper(30);
        let tr = traces(40, 80);
        let thr = run(
            &scenario,
            &tr,
            Policy::Thr { threshold: 0.8 },
            &mut |_, _| {},
        );
        conserved(&thr);
        for mut drift in [
            Drift::decentralized(),
            Drift::centralized(),
            Drift::new(
                Mode::Decentralized {
                    lag_steps: 2,
                    rounds: 1,
                },
                Params::default(),
                3,
            ),
        ] {
            let r = run_with(&scenario, &tr, &mut drift, &mut |_, _| {});
            conserved(&r);
            assert!(
                r.migrations * 3 <= thr.migrations,
                "{}: {} migrations, THR-MMT-0.8 {}",
                r.policy,
                r.migrations,
                thr.migrations
            );
            // It drained hosts: fewer are on at the end than after the initial placement.
            let (first, last) = (&r.series[0], &r.series[r.series.len() - 1]);
            assert!(
                last.active_hosts < first.active_hosts,
                "{}: {first:?} {last:?}",
                r.policy
            );
            assert!(drift.stats().drains > 0);
        }
    }

    #[test]
    fn same_seed_same_run() {
        let scenario = Scenario::paper(12);
        let tr = traces(16, 40);
        let a = run_with(&scenario, &tr, &mut Drift::decentralized(), &mut |_, _| {});
        let b = run_with(&scenario, &tr, &mut Drift::decentralized(), &mut |_, _| {});
        assert_eq!(a.migrations, b.migrations);
        assert_eq!(a.energy_kwh.to_bits(), b.energy_kwh.to_bits());
    }
}
