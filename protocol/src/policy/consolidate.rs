//! Consolidation: drift's own decision of one host, from its own state and its (possibly stale)
//! table of the other hosts, covering both directions: an overloaded host moves the right VM(s)
//! away, an underloaded host drains all its VMs to fuller hosts and goes standby.
//!
//! Pure and deterministic: time comes in as `now_s`, randomness from the caller's RNG, and the
//! host and VM ids are the caller's (the node passes `NodeId`/`VmId`, the simulator indices).
//! Loads are in one absolute unit of CPU (MIPS in the simulator, permille of a reference core
//! in the node); every fraction below is of the host's own capacity.
//!
//! ## How the node's autopilot calls it
//!
//! Every report interval, after pushing its own load sample:
//!
//! 1. build an [`OwnHost`]: its capacity, its requested-load history (utilization fractions,
//!    newest first), its VMs as [`LocalVm`] (demand history newest first, memory, whether a
//!    migration is under way, when each VM last moved) and whether it is draining;
//! 2. build one [`Row`] per peer from its table (the latest signed report: capacity, requested
//!    load, forecast load, memory free, `standby` = it holds no VM, `draining`), e.g. with
//!    [`Row::from_report`]; rows as old as the mesh makes them are fine, admission catches
//!    what changed;
//! 3. call [`plan`]; for [`Action::Relieve`] and [`Action::Drain`] send every [`Offer`] to its
//!    target (a drain sets the host's `draining` flag in its next reports);
//! 4. a host receiving an offer calls [`admit`] with its own *current* [`TargetState`],
//!    including the forecast demand and memory of the offers it already accepted and whose VMs
//!    have not arrived yet ([`TargetState::reserve`] after each acceptance), and answers with
//!    its current numbers. A source whose offer was refused puts those numbers in its table
//!    and calls [`plan`] again at once (a few rounds, each a round trip), or at the next
//!    interval; targets are drawn among the `choice_spread` best fits so hosts with the same
//!    table do not all pick the same one;
//! 5. when a VM arrives, the host records `moved_at_s` for it: the VM is on cooldown.
//!
//! ```mermaid
//! flowchart TD
//!     S[own load sample] --> C{a VM asks more than one core?}
//!     C -- yes --> M[move it to a host with larger cores]
//!     C -- no --> O{overloaded: load > saturated now, or > upper in k of the last n}
//!     O -- yes --> R[relieve: the VM whose move brings the forecast under relieve_to, least memory first; none on cooldown unless overloaded for long]
//!     R --> T[targets: active hosts that stay under target_limit with the VM's forecast, fullest first; standby hosts only if none fits]
//!     O -- no --> U{load < lower for k samples and forecast < lower, or already draining}
//!     U -- no --> Stay
//!     U -- yes --> D{every VM fits on a fuller active host, none on cooldown?}
//!     D -- no --> Stay
//!     D -- yes --> Drain[offer every VM; standby once empty]
//! ```
//!
//! ## Forecasts, not instants
//!
//! A VM's forecast demand ([`forecast`]) is the `forecast_quantile` of its last
//! `forecast_window` samples, never below its demand now. Placing by forecasts keeps a target
//! under its threshold after the move, so a VM that moved rarely has to move again; the cooldown
//! (`cooldown_s`) forbids moving it back and forth unless its host stays overloaded for
//! `long_overload` samples.

use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::report::{LoadReport, PERMILLE};

/// The tunables of consolidation. Fractions are of a host's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// A host is overloaded when its requested load is above this in `overload_k` of its last
    /// `overload_n` samples.
    pub upper: f64,
    /// See `upper`.
    pub overload_k: usize,
    /// See `upper`.
    pub overload_n: usize,
    /// A host is overloaded at once when its requested load is above this (it is saturated).
    pub saturated: f64,
    /// A relieved host sheds VMs until its forecast is at most this.
    pub relieve_to: f64,
    /// A target admits a VM only if its forecast (with reservations) stays at most this.
    pub target_limit: f64,
    /// A host whose forecast is under this for `underload_k` samples tries to drain.
    pub lower: f64,
    /// See `lower`.
    pub underload_k: usize,
    /// Samples a VM's forecast looks back over.
    pub forecast_window: usize,
    /// The quantile (0..=1) of those samples the forecast takes.
    pub forecast_quantile: f64,
    /// A VM that moved does not move again for this long (s)…
    pub cooldown_s: f64,
    /// …unless its host has been overloaded for this many samples in a row.
    pub long_overload: usize,
    /// Targets are drawn at random among the this many best fits (1: always the best fit);
    /// spreading keeps hosts with the same stale table from all picking the same target.
    pub choice_spread: usize,
    /// The chance (0..=1) an underloaded host that could drain does so at a given sample;
    /// the others stay and take VMs, so hosts with the same stale table do not all drain
    /// into each other at once.
    pub drain_chance: f64,
    /// Whether targets check memory (the benchmark's simulator does not after placement).
    pub check_memory: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            upper: 0.9,
            overload_k: 2,
            overload_n: 3,
            saturated: 1.0,
            relieve_to: 0.8,
            target_limit: 0.85,
            lower: 0.5,
            underload_k: 3,
            forecast_window: 12,
            forecast_quantile: 0.9,
            cooldown_s: 3.0 * 3600.0,
            long_overload: 3,
            choice_spread: 32,
            drain_chance: 1.0,
            check_memory: false,
        }
    }
}

/// One of the host's own VMs.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalVm<V> {
    /// The VM.
    pub id: V,
    /// Requested demand, newest first; `[0]` is now. Empty: the VM asks for nothing.
    pub demand: Vec<f64>,
    /// Memory (MB).
    pub memory_mb: u64,
    /// A migration of this VM is under way (it is not a candidate).
    pub migrating: bool,
    /// When it last arrived by migration (s), if ever.
    pub moved_at_s: Option<f64>,
}

impl<V> LocalVm<V> {
    /// Its demand now.
    pub fn now(&self) -> f64 {
        self.demand.first().copied().unwrap_or(0.0)
    }

    fn on_cooldown(&self, now_s: f64, cooldown_s: f64) -> bool {
        self.moved_at_s.is_some_and(|t| now_s - t < cooldown_s)
    }
}

/// The deciding host's own, fresh state.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnHost<'a, H, V> {
    /// Its id (never a target of its own offers).
    pub id: H,
    /// CPU capacity.
    pub capacity: f64,
    /// The most one VM can get (one core): a VM asking more is starved here, whatever the
    /// host's total load, and moves to a host with larger cores.
    pub core_capacity: f64,
    /// Requested load as fractions of capacity, newest first; `[0]` is now.
    pub load_history: &'a [f64],
    /// Its VMs.
    pub vms: &'a [LocalVm<V>],
    /// It decided to drain earlier and still holds VMs.
    pub draining: bool,
}

/// A peer as the host's table shows it (possibly stale).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Row<H> {
    /// The peer.
    pub id: H,
    /// CPU capacity.
    pub capacity: f64,
    /// The most one VM can get on it (one core).
    pub core_capacity: f64,
    /// Requested load at the report.
    pub load: f64,
    /// Sum of its VMs' forecasts at the report.
    pub forecast: f64,
    /// Memory free (MB).
    pub memory_free_mb: u64,
    /// It holds no VM and sleeps: a target only when no active host fits.
    pub standby: bool,
    /// It is draining: never a target.
    pub draining: bool,
}

impl Row<NodeId> {
    /// The row of a peer's latest signed report. `capacity` and `core_capacity` are in the
    /// caller's CPU unit (e.g. 1000 × the peer's CPUs from the roster, so permille of one CPU).
    /// Reports carry neither a forecast nor a draining flag: the forecast is the VMs' demand
    /// plus the CPU reserved for incoming migrations, `draining` is false (a draining host
    /// refuses at admission anyway), and `standby` means it says so or reports no VM.
    pub fn from_report(report: &LoadReport, capacity: f64, core_capacity: f64) -> Self {
        let frac = |permille: u32| f64::from(permille) / f64::from(PERMILLE) * capacity;
        Self {
            id: report.node,
            capacity,
            core_capacity,
            load: frac(report.vm_demand_permille),
            forecast: frac(
                report
                    .vm_demand_permille
                    .saturating_add(report.reserved_permille),
            ),
            memory_free_mb: report.mem_total_mib.saturating_sub(report.mem_used_mib),
            standby: report.standby || report.vm_count == 0,
            draining: false,
        }
    }
}

/// A VM the deciding host asks a target to take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Offer<H, V> {
    /// The VM.
    pub vm: V,
    /// The target.
    pub to: H,
    /// The VM's forecast demand.
    pub forecast: f64,
    /// Its demand now.
    pub demand: f64,
    /// Its memory (MB).
    pub memory_mb: u64,
    /// The source found no active host for it: a standby target may wake up for it.
    pub wake: bool,
}

/// What a host decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<H, V> {
    /// Nothing to do.
    Stay,
    /// Overloaded: move these VMs away (may be empty when no VM can go anywhere).
    Relieve(Vec<Offer<H, V>>),
    /// Underloaded: move every VM away, then go standby.
    Drain(Vec<Offer<H, V>>),
}

/// A target's own current state, for [`admit`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TargetState {
    /// CPU capacity.
    pub capacity: f64,
    /// The most one VM can get (one core).
    pub core_capacity: f64,
    /// Sum of its VMs' forecasts now (VMs arriving included).
    pub forecast: f64,
    /// Memory free now (MB).
    pub memory_free_mb: u64,
    /// Forecast demand of offers accepted whose VMs have not arrived.
    pub reserved: f64,
    /// Memory of those offers (MB).
    pub reserved_mb: u64,
    /// It is draining.
    pub draining: bool,
    /// It holds no VM and nothing is on its way to it.
    pub standby: bool,
}

impl TargetState {
    /// Counts an accepted offer until its VM arrives.
    pub fn reserve<H, V>(&mut self, offer: &Offer<H, V>) {
        self.reserved += offer.forecast;
        self.reserved_mb += offer.memory_mb;
        self.standby = false;
    }
}

/// Why a target refused an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It is draining itself.
    Draining,
    /// It is on standby and the offer does not ask to wake it (an active host may fit).
    Standby,
    /// The VM (now or as forecast) would not fit one core.
    Core,
    /// Its forecast would exceed `target_limit`.
    Load,
    /// Not enough memory.
    Memory,
}

/// A VM's forecast demand: the `forecast_quantile` of its last `forecast_window` samples
/// (nearest rank), never below its demand now.
pub fn forecast(demand: &[f64], p: &Params) -> f64 {
    let now = demand.first().copied().unwrap_or(0.0);
    let w = p.forecast_window.max(1).min(demand.len());
    if w == 0 {
        return 0.0;
    }
    let mut v = demand[..w].to_vec();
    v.sort_by(f64::total_cmp);
    // Nearest rank; w ≥ 1 and the quantile is clamped, so the index is in range.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((p.forecast_quantile.clamp(0.0, 1.0) * w as f64).ceil() as usize).clamp(1, w) - 1;
    v[i].max(now)
}

/// Whether a target takes `offer`, checked against its own current numbers.
pub fn admit<H, V>(p: &Params, target: &TargetState, offer: &Offer<H, V>) -> Result<(), Refusal> {
    if target.draining {
        return Err(Refusal::Draining);
    }
    if target.standby && !offer.wake {
        return Err(Refusal::Standby);
    }
    if offer.demand.max(offer.forecast) > target.core_capacity {
        return Err(Refusal::Core);
    }
    if target.forecast + target.reserved + offer.forecast > p.target_limit * target.capacity {
        return Err(Refusal::Load);
    }
    if p.check_memory && target.reserved_mb + offer.memory_mb > target.memory_free_mb {
        return Err(Refusal::Memory);
    }
    Ok(())
}

/// Samples in a row, newest first, with load above `threshold`.
fn streak(history: &[f64], threshold: f64) -> usize {
    history.iter().take_while(|&&u| u > threshold).count()
}

/// Whether the host is overloaded by `p`'s rule, and for how many samples in a row.
pub fn overloaded(p: &Params, load_history: &[f64]) -> (bool, usize) {
    let now = load_history.first().copied().unwrap_or(0.0);
    let above = load_history
        .iter()
        .take(p.overload_n)
        .filter(|&&u| u > p.upper)
        .count();
    (
        now > p.saturated || (above >= p.overload_k && now > p.upper),
        streak(load_history, p.upper),
    )
}

/// The rows with what this plan has already sent to them.
struct Table<'t, H> {
    rows: &'t [Row<H>],
    reserved: Vec<f64>,
    reserved_mb: Vec<u64>,
}

impl<H: Copy + PartialEq> Table<'_, H> {
    fn fits(&self, p: &Params, i: usize, f: f64, now: f64, mem: u64) -> bool {
        let r = &self.rows[i];
        let state = TargetState {
            capacity: r.capacity,
            core_capacity: r.core_capacity,
            forecast: r.forecast,
            memory_free_mb: r.memory_free_mb,
            reserved: self.reserved[i],
            reserved_mb: self.reserved_mb[i],
            draining: r.draining,
            standby: false,
        };
        let offer = Offer {
            vm: (),
            to: (),
            forecast: f,
            demand: now,
            memory_mb: mem,
            wake: true,
        };
        admit(p, &state, &offer).is_ok()
    }

    /// The best fit among active rows accepted by `eligible` (fullest after the move, drawn
    /// among the `choice_spread` best), else, if `wake`, a standby row (largest capacity).
    fn pick(
        &self,
        p: &Params,
        vm: (f64, f64, u64),
        eligible: impl Fn(&Row<H>) -> bool,
        wake: bool,
        rng: &mut impl RngCore,
    ) -> Option<(usize, bool)> {
        let (f, now, mem) = vm;
        let mut fits: Vec<(f64, usize)> = (0..self.rows.len())
            .filter(|&i| !self.rows[i].standby && eligible(&self.rows[i]))
            .filter(|&i| self.fits(p, i, f, now, mem))
            .map(|i| {
                let r = &self.rows[i];
                ((r.forecast + self.reserved[i] + f) / r.capacity, i)
            })
            .collect();
        let woke = fits.is_empty() && wake;
        if woke {
            fits = (0..self.rows.len())
                .filter(|&i| self.rows[i].standby && eligible(&self.rows[i]))
                .filter(|&i| self.fits(p, i, f, now, mem))
                .map(|i| (self.rows[i].capacity, i))
                .collect();
        }
        fits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let spread = p.choice_spread.max(1).min(fits.len());
        if spread == 0 {
            return None;
        }
        // `spread` is small; the modulo picks uniformly enough among the best few.
        #[allow(clippy::cast_possible_truncation)]
        let k = (rng.next_u64() % spread as u64) as usize;
        Some((fits[k].1, woke))
    }

    fn take(&mut self, i: usize, f: f64, mem: u64) {
        self.reserved[i] += f;
        self.reserved_mb[i] += mem;
    }

    /// [`Table::pick`] for `vm` (whose forecast is `f`), then reserves it there: the offer.
    fn place<V: Copy>(
        &mut self,
        p: &Params,
        vm: &LocalVm<V>,
        f: f64,
        eligible: impl Fn(&Row<H>) -> bool,
        wake: bool,
        rng: &mut impl RngCore,
    ) -> Option<Offer<H, V>> {
        let (target, woke) = self.pick(p, (f, vm.now(), vm.memory_mb), eligible, wake, rng)?;
        self.take(target, f, vm.memory_mb);
        Some(Offer {
            vm: vm.id,
            to: self.rows[target].id,
            forecast: f,
            demand: vm.now(),
            memory_mb: vm.memory_mb,
            wake: woke,
        })
    }
}

/// One host's decision at `now_s`: relieve, drain or stay. `table` holds the other hosts'
/// rows (a row with the host's own id is ignored).
pub fn plan<H: Copy + PartialEq, V: Copy>(
    p: &Params,
    now_s: f64,
    own: &OwnHost<'_, H, V>,
    table: &[Row<H>],
    rng: &mut impl RngCore,
) -> Action<H, V> {
    let mut t = Table {
        rows: table,
        reserved: vec![0.0; table.len()],
        reserved_mb: vec![0; table.len()],
    };
    let not_me = |r: &Row<H>| r.id != own.id;
    let movable: Vec<&LocalVm<V>> = own.vms.iter().filter(|v| !v.migrating).collect();
    let forecasts: Vec<f64> = movable.iter().map(|v| forecast(&v.demand, p)).collect();
    let starved: Vec<usize> = (0..movable.len())
        .filter(|&i| movable[i].now() > own.core_capacity)
        .collect();
    if !starved.is_empty() {
        let mut offers = Vec::new();
        for i in starved {
            let eligible = |r: &Row<H>| not_me(r) && !r.draining;
            offers.extend(t.place(p, movable[i], forecasts[i], eligible, true, rng));
        }
        return Action::Relieve(offers);
    }
    // Every VM's forecast, those already migrating included: the host's own.
    let own_forecast: f64 = own.vms.iter().map(|v| forecast(&v.demand, p)).sum();
    let (over, long) = overloaded(p, own.load_history);
    if over {
        let ignore_cooldown = long >= p.long_overload;
        let mut total = own_forecast;
        let mut left: Vec<usize> = (0..movable.len())
            .filter(|&i| ignore_cooldown || !movable[i].on_cooldown(now_s, p.cooldown_s))
            .collect();
        let mut offers = Vec::new();
        let goal = p.relieve_to * own.capacity;
        while total > goal && !left.is_empty() {
            // The VM whose move alone reaches the goal with the least memory (the shortest
            // migration), else the largest forecast, and try the next if it fits nowhere.
            let enough = left
                .iter()
                .copied()
                .filter(|&i| total - forecasts[i] <= goal)
                .min_by(|&a, &b| {
                    movable[a]
                        .memory_mb
                        .cmp(&movable[b].memory_mb)
                        .then(forecasts[a].total_cmp(&forecasts[b]))
                });
            let pick = enough.or_else(|| {
                left.iter()
                    .copied()
                    .max_by(|&a, &b| forecasts[a].total_cmp(&forecasts[b]).then(b.cmp(&a)))
            });
            let Some(i) = pick else { break };
            left.retain(|&j| j != i);
            let eligible = |r: &Row<H>| not_me(r) && !r.draining;
            if let Some(offer) = t.place(p, movable[i], forecasts[i], eligible, true, rng) {
                total -= forecasts[i];
                offers.push(offer);
            }
        }
        return Action::Relieve(offers);
    }

    let u = own_forecast / own.capacity;
    let quiet = own.load_history.len() >= p.underload_k
        && own
            .load_history
            .iter()
            .take(p.underload_k)
            .all(|&x| x < p.lower);
    if own.vms.is_empty()
        || movable.len() < own.vms.len()
        || !(own.draining || (quiet && u < p.lower))
    {
        return Action::Stay;
    }
    if movable.iter().any(|v| v.on_cooldown(now_s, p.cooldown_s)) {
        return Action::Stay;
    }
    // 2^53 values: exact in f64.
    #[allow(clippy::cast_precision_loss)]
    let draw = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    if !own.draining && draw >= p.drain_chance {
        return Action::Stay;
    }
    // Fuller hosts only (a strict order, so two hosts never drain into each other), the
    // largest VMs first, all or none.
    let own_load = own.load_history.first().copied().unwrap_or(u);
    let mut order: Vec<usize> = (0..movable.len()).collect();
    order.sort_by(|&a, &b| forecasts[b].total_cmp(&forecasts[a]).then(a.cmp(&b)));
    let mut offers = Vec::with_capacity(order.len());
    for i in order {
        let fuller = |r: &Row<H>| not_me(r) && !r.draining && r.load / r.capacity > own_load;
        let Some(offer) = t.place(p, movable[i], forecasts[i], fuller, false, rng) else {
            return Action::Stay;
        };
        offers.push(offer);
    }
    Action::Drain(offers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcsim::drift::SplitMix;

    const CAP: f64 = 1000.0;

    fn params() -> Params {
        Params {
            drain_chance: 1.0,
            choice_spread: 1,
            ..Params::default()
        }
    }

    fn vm(id: u32, demand: f64) -> LocalVm<u32> {
        LocalVm {
            id,
            demand: vec![demand; 12],
            memory_mb: 1000,
            migrating: false,
            moved_at_s: None,
        }
    }

    fn row(id: u32, forecast: f64) -> Row<u32> {
        Row {
            id,
            capacity: CAP,
            core_capacity: CAP,
            load: forecast,
            forecast,
            memory_free_mb: 4000,
            standby: forecast == 0.0,
            draining: false,
        }
    }

    fn offers(a: &Action<u32, u32>) -> Vec<(u32, u32)> {
        match a {
            Action::Stay => Vec::new(),
            Action::Relieve(o) | Action::Drain(o) => o.iter().map(|o| (o.vm, o.to)).collect(),
        }
    }

    fn decide(own_vms: &[LocalVm<u32>], table: &[Row<u32>], now_s: f64) -> Action<u32, u32> {
        let load: f64 = own_vms.iter().map(LocalVm::now).sum::<f64>() / CAP;
        let hist = vec![load; 6];
        let own = OwnHost {
            id: 0,
            capacity: CAP,
            core_capacity: CAP,
            load_history: &hist,
            vms: own_vms,
            draining: false,
        };
        plan(&params(), now_s, &own, table, &mut SplitMix::new(7))
    }

    #[test]
    fn underloaded_host_drains_when_every_vm_fits_elsewhere() {
        let vms = [vm(1, 100.0), vm(2, 150.0)];
        // Host 1 is fuller and has room for both under the 0.85 limit; host 2 is emptier.
        let table = [row(0, 250.0), row(1, 500.0), row(2, 100.0)];
        let a = decide(&vms, &table, 0.0);
        assert!(matches!(a, Action::Drain(_)), "{a:?}");
        let mut moved = offers(&a);
        moved.sort_unstable();
        assert_eq!(moved, vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn underloaded_host_stays_when_one_vm_fits_nowhere() {
        let vms = [vm(1, 100.0), vm(2, 300.0)];
        // Room for 500 in total, 250 on each host: VM 1 fits, VM 2 nowhere; all or none.
        let table = [row(0, 400.0), row(1, 600.0), row(2, 600.0)];
        assert_eq!(decide(&vms, &table, 0.0), Action::Stay);
        // With room for VM 2 on one of them, it drains.
        let table = [row(0, 400.0), row(1, 600.0), row(2, 500.0)];
        assert!(matches!(decide(&vms, &table, 0.0), Action::Drain(_)));
        // A standby host would fit both, but a drain never wakes one.
        let table = [row(0, 400.0), row(1, 600.0), row(2, 0.0)];
        assert_eq!(decide(&vms, &table, 0.0), Action::Stay);
    }

    #[test]
    fn standby_host_is_a_target_only_when_no_active_host_fits() {
        let vms = [vm(1, 600.0), vm(2, 450.0)];
        let active = [row(0, 1050.0), row(1, 300.0), row(2, 0.0)];
        let a = decide(&vms, &active, 0.0);
        assert!(matches!(a, Action::Relieve(_)), "{a:?}");
        assert_eq!(offers(&a), vec![(2, 1)]);
        let full = [row(0, 1050.0), row(1, 700.0), row(2, 0.0)];
        let a = decide(&vms, &full, 0.0);
        assert_eq!(offers(&a), vec![(2, 2)]);
        let Action::Relieve(o) = a else { panic!() };
        assert!(o[0].wake);
    }

    #[test]
    fn target_refuses_what_would_pass_its_limit_with_reservations() {
        let p = params();
        let mut target = TargetState {
            capacity: CAP,
            core_capacity: CAP,
            forecast: 400.0,
            memory_free_mb: 4000,
            ..TargetState::default()
        };
        let offer = Offer {
            vm: 1,
            to: 9,
            forecast: 300.0,
            demand: 250.0,
            memory_mb: 1000,
            wake: false,
        };
        assert_eq!(admit(&p, &target, &offer), Ok(()));
        target.reserve(&offer);
        assert_eq!(admit(&p, &target, &offer), Err(Refusal::Load));
        let small = Offer {
            forecast: 100.0,
            ..offer
        };
        assert_eq!(admit(&p, &target, &small), Ok(()));
        target.draining = true;
        assert_eq!(admit(&p, &target, &small), Err(Refusal::Draining));
        let asleep = TargetState {
            standby: true,
            forecast: 0.0,
            ..TargetState::default()
        };
        assert_eq!(admit(&p, &asleep, &small), Err(Refusal::Standby));
    }

    #[test]
    fn vm_on_cooldown_is_not_picked() {
        // Overloaded by two samples; VM 1 alone would end it with less memory, but it just
        // moved here.
        let mut vms = [vm(1, 500.0), vm(2, 500.0)];
        vms[0].memory_mb = 500;
        vms[0].moved_at_s = Some(1000.0);
        let table = [row(0, 1000.0), row(1, 200.0)];
        let load = vec![0.95, 0.95, 0.5];
        let own = OwnHost {
            id: 0,
            capacity: CAP,
            core_capacity: CAP,
            load_history: &load,
            vms: &vms,
            draining: false,
        };
        let p = params();
        let a = plan(&p, 2000.0, &own, &table, &mut SplitMix::new(1));
        assert_eq!(offers(&a), vec![(2, 1)]);
        // Off cooldown, the lighter VM goes.
        let a = plan(
            &p,
            1000.0 + p.cooldown_s,
            &own,
            &table,
            &mut SplitMix::new(1),
        );
        assert_eq!(offers(&a), vec![(1, 1)]);
        // A host holding a VM on cooldown does not drain.
        let quiet = [
            vm(3, 100.0),
            LocalVm {
                moved_at_s: Some(1000.0),
                ..vm(4, 100.0)
            },
        ];
        assert_eq!(
            decide(&quiet, &[row(0, 200.0), row(1, 400.0)], 2000.0),
            Action::Stay
        );
        assert!(matches!(
            decide(
                &quiet,
                &[row(0, 200.0), row(1, 400.0)],
                1000.0 + p.cooldown_s
            ),
            Action::Drain(_)
        ));
    }

    #[test]
    fn row_from_a_report_scales_permille_to_capacity() {
        let key = crate::keys::SecretKey::from_slice(&[7; 32]).expect("a 32-byte seed");
        let mut report = LoadReport {
            node: key.public(),
            seq: 1,
            issued_at: crate::time::Timestamp(0),
            roster_epoch: 1,
            cpu_permille: 420,
            mem_used_mib: 1000,
            mem_total_mib: 4000,
            power_mw: 0,
            power_measured: false,
            vm_count: 2,
            vm_demand_permille: 300,
            reserved_permille: 100,
            standby: false,
        };
        let r = Row::from_report(&report, 2000.0, 1000.0);
        assert_eq!((r.load, r.forecast, r.memory_free_mb), (600.0, 800.0, 3000));
        assert!(!r.standby && !r.draining);
        report.vm_count = 0;
        assert!(Row::from_report(&report, 2000.0, 1000.0).standby);
    }

    #[test]
    fn forecast_is_a_high_quantile_never_below_now() {
        let p = params();
        let mut d: Vec<f64> = (1..=10).map(f64::from).collect();
        d.reverse(); // newest first: 10, 9, …, 1
        assert_eq!(forecast(&d, &p), 10.0);
        // Now 1: the 9th of the 10 sorted samples (1, 1, 2, …, 9) is 8.
        d[0] = 1.0;
        assert_eq!(forecast(&d, &p), 8.0);
        // Never below now.
        d[0] = 20.0;
        assert_eq!(forecast(&d, &p), 20.0);
        assert_eq!(forecast(&[], &p), 0.0);
    }
}
