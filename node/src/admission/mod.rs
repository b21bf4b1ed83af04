//! Target-side admission control: whether this host takes an offered VM, and the capacity it
//! holds for it until the transfer starts.
//!
//! Checks run cheapest first, and nothing is reserved for an offer that is refused:
//!
//! 1. the offer's signer is the authenticated peer that sent it (no cost, unspoofable);
//! 2. that peer's offer rate (per minute, per source);
//! 3. `validate_offer`: roster membership, signature, addressed here, roster epoch, expiry,
//!    placement against this host's admin-attested labels;
//! 4. replay: an offer id is taken once (remembered until the offer expires);
//! 5. the VM is not already here; concurrent incoming migrations under the limit, and this
//!    source's under its share (`per_source`), so one source cannot hold every slot;
//! 6. anti-affinity against the VMs here and those reserved;
//! 7. capacity: memory, and CPU demand staying under the upper threshold, counting every open
//!    reservation whose VM is not here yet (an incoming VM already counts in the host's own
//!    demand once its empty copy exists).
//!
//! CPU demand is compared in this host's units: an offer carries its VM's demand in permille
//! of the source's capacity, scaled here by the two hosts' CPU counts from the roster
//! ([`drift_protocol::policy::scale_demand`]), exactly as the source's policy scaled it when it
//! chose this host. The upper threshold is the balancing policy's (`balance.upper_permille`).
//!
//! Before any of that, a source that is backed off is refused: a source whose migrations here
//! stalled or broke the protocol `backoff_after` times within `strike_window` is refused for
//! `backoff`, doubling with each further back-off up to `backoff_max`; a migration of it that
//! commits here clears its record.
//!
//! A reservation holds its slot until its migration ends ([`Admission::release`]); one whose
//! transfer has not started expires after `reservation_ttl_ms` and frees its capacity.
//! Everything is bounded: reservations by `max_incoming`, the replay cache by
//! `MAX_REMEMBERED`, rate windows and strike records by the roster size.

use std::collections::{BTreeSet, HashMap, VecDeque};

use drift_protocol::migration::{validate_offer, MigrationOffer, RejectReason};
use drift_protocol::policy::{scale_demand, PolicyConfig};
use drift_protocol::roster::Roster;
use drift_protocol::{MigrationId, NodeId, Signed, Timestamp, VmId};

/// Offer ids remembered at most (offers live at most a minute, so this is many minutes of
/// offers at the rate limit of every source).
pub const MAX_REMEMBERED: usize = 65_536;

/// Admission limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Incoming migrations (reserved or transferring) at once.
    pub max_incoming: usize,
    /// Incoming migrations one source may hold at once.
    pub per_source: usize,
    /// Offers accepted for judging per source per minute.
    pub offers_per_source_per_minute: u32,
    /// How long a reservation waits for its transfer to start.
    pub reservation_ttl_ms: u64,
    /// CPU demand (permille of capacity) this host must stay under after a move.
    pub upper_threshold_permille: u32,
    /// Stalled or broken migrations within `strike_window_ms` that back a source off.
    pub backoff_after: u32,
    pub strike_window_ms: u64,
    /// The first back-off; each further one doubles, up to `backoff_max_ms`.
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self::from_policy(&PolicyConfig::default())
    }
}

impl Limits {
    /// The default limits, with the upper threshold of `policy` (the one the sources' own
    /// policy holds this host to).
    pub fn from_policy(policy: &PolicyConfig) -> Self {
        Self {
            max_incoming: 2,
            per_source: 1,
            offers_per_source_per_minute: 30,
            reservation_ttl_ms: 30_000,
            upper_threshold_permille: policy.upper_permille,
            backoff_after: 2,
            strike_window_ms: 600_000,
            backoff_ms: 60_000,
            backoff_max_ms: 3_600_000,
        }
    }

    /// The limits of `[admission]`, with the upper threshold of `policy`.
    pub fn from_config(a: &crate::config::AdmissionSection, policy: &PolicyConfig) -> Self {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            max_incoming: a.max_incoming as usize,
            per_source: a.per_source as usize,
            offers_per_source_per_minute: a.offers_per_source_per_minute,
            reservation_ttl_ms: ms(a.reservation_ttl),
            upper_threshold_permille: policy.upper_permille,
            backoff_after: a.backoff_after,
            strike_window_ms: ms(a.strike_window),
            backoff_ms: ms(a.backoff),
            backoff_max_ms: ms(a.backoff_max),
        }
    }
}

/// What the host holds now, from its own numbers (not from gossip).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLoad {
    /// CPU demand of the VMs here, permille of this host's capacity.
    pub demand_permille: u32,
    /// Memory of the VMs here.
    pub vm_memory_mib: u64,
    /// Memory this host offers to VMs (roster capacity).
    pub capacity_mib: u64,
    /// VMs here.
    pub vms: Vec<VmId>,
    /// Anti-affinity groups of the VMs here.
    pub groups: Vec<String>,
}

/// Capacity held for one accepted offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: MigrationId,
    pub source: NodeId,
    pub vm: VmId,
    pub memory_mib: u64,
    pub demand_permille: u32,
    pub group: Option<String>,
    pub until: Timestamp,
    /// The transfer started: the reservation no longer expires, it ends with the migration.
    pub started: bool,
}

/// A source's stalled or broken migrations here, and its back-off.
#[derive(Debug, Clone, Default)]
struct Strikes {
    /// When each recent one ended (at most `backoff_after`).
    recent: VecDeque<Timestamp>,
    /// Back-offs so far: the next one lasts `backoff_ms × 2^level`.
    level: u32,
    until: Option<Timestamp>,
}

/// A source that is backed off, for `drift status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackedOff {
    pub source: NodeId,
    pub until: Timestamp,
    /// Back-offs of this source so far (1 for the first).
    pub level: u32,
}

/// What admission holds now, for `drift status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdmissionView {
    pub max_incoming: usize,
    pub per_source: usize,
    /// Incoming migrations holding a slot (reserved or transferring).
    pub slots_in_use: usize,
    /// Memory reserved for incoming VMs.
    pub reserved_mib: u64,
    pub backed_off: Vec<BackedOff>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Timestamp,
    count: u32,
}

/// The admission state of one target.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    reservations: HashMap<MigrationId, Reservation>,
    /// `(expires_at, id)` of every offer id taken, for replay refusal.
    seen_by_expiry: BTreeSet<(Timestamp, MigrationId)>,
    seen: HashMap<MigrationId, Timestamp>,
    windows: HashMap<NodeId, Window>,
    strikes: HashMap<NodeId, Strikes>,
}

impl Admission {
    /// Empty admission state.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            reservations: HashMap::new(),
            seen_by_expiry: BTreeSet::new(),
            seen: HashMap::new(),
            windows: HashMap::new(),
            strikes: HashMap::new(),
        }
    }

    /// Drops expired reservations of transfers that never started and forgets offer ids
    /// whose offers have expired.
    pub fn expire(&mut self, now: Timestamp) {
        self.reservations.retain(|_, r| r.started || r.until > now);
        while let Some(&(at, id)) = self.seen_by_expiry.first() {
            if at > now {
                break;
            }
            self.seen_by_expiry.pop_first();
            self.seen.remove(&id);
        }
        self.windows
            .retain(|_, w| now.millis_since(w.start) < 60_000);
    }

    /// CPU demand reserved for incoming VMs (for the load report).
    pub fn reserved_permille(&self) -> u32 {
        self.reservations
            .values()
            .fold(0u32, |acc, r| acc.saturating_add(r.demand_permille))
    }

    /// CPU demand reserved for incoming VMs that are not in `load` yet: once the empty copy
    /// of an incoming VM exists it counts in the host's own demand, and counting its
    /// reservation too would count it twice.
    pub fn pending_permille(&self, load: &HostLoad) -> u32 {
        self.reservations
            .values()
            .filter(|r| !load.vms.contains(&r.vm))
            .fold(0u32, |acc, r| acc.saturating_add(r.demand_permille))
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Frees a reservation (the migration ended here, whichever way).
    pub fn release(&mut self, id: &MigrationId) -> Option<Reservation> {
        self.reservations.remove(id)
    }

    /// The transfer of `id` started: its reservation holds its slot until it is released.
    /// `false` if the reservation expired before.
    pub fn start(&mut self, id: &MigrationId) -> bool {
        match self.reservations.get_mut(id) {
            Some(r) => {
                r.started = true;
                true
            }
            None => false,
        }
    }

    /// A migration from `source` stalled or broke the protocol at `now`. Returns the end of
    /// the back-off this starts, if it starts one.
    pub fn strike(&mut self, source: &NodeId, now: Timestamp) -> Option<BackedOff> {
        let limits = self.limits;
        let s = self.strikes.entry(*source).or_default();
        while s
            .recent
            .front()
            .is_some_and(|at| now.millis_since(*at) >= limits.strike_window_ms)
        {
            s.recent.pop_front();
        }
        s.recent.push_back(now);
        if (s.recent.len() as u32) < limits.backoff_after {
            return None;
        }
        s.recent.clear();
        let factor = 1u64.checked_shl(s.level.min(63)).unwrap_or(u64::MAX);
        let ms = limits
            .backoff_ms
            .saturating_mul(factor)
            .min(limits.backoff_max_ms);
        s.level = s.level.saturating_add(1);
        let until = now.plus_millis(ms);
        s.until = Some(until);
        Some(BackedOff {
            source: *source,
            until,
            level: s.level,
        })
    }

    /// A migration from `source` committed here: its record of strikes is cleared.
    pub fn forgive(&mut self, source: &NodeId) {
        self.strikes.remove(source);
    }

    /// What admission holds at `now`.
    pub fn view(&self, now: Timestamp) -> AdmissionView {
        let mut backed_off: Vec<BackedOff> = self
            .strikes
            .iter()
            .filter_map(|(source, s)| {
                s.until.filter(|u| *u > now).map(|until| BackedOff {
                    source: *source,
                    until,
                    level: s.level,
                })
            })
            .collect();
        backed_off.sort_by_key(|b| b.source);
        AdmissionView {
            max_incoming: self.limits.max_incoming,
            per_source: self.limits.per_source,
            slots_in_use: self.reservations.len(),
            reserved_mib: self
                .reservations
                .values()
                .fold(0u64, |acc, r| acc.saturating_add(r.memory_mib)),
            backed_off,
        }
    }

    /// Judges an offer received from the authenticated peer `from`. On acceptance the
    /// capacity is reserved until the returned reservation's `until`.
    pub fn decide(
        &mut self,
        signed: &Signed<MigrationOffer>,
        from: &NodeId,
        me: &NodeId,
        roster: &Roster,
        load: &HostLoad,
        now: Timestamp,
    ) -> Result<(MigrationOffer, Reservation), RejectReason> {
        self.expire(now);
        if signed.signer() != from {
            return Err(RejectReason::WrongSigner);
        }
        if roster.member(from).is_none() {
            return Err(RejectReason::NotAMember);
        }
        if self
            .strikes
            .get(from)
            .and_then(|s| s.until)
            .is_some_and(|until| until > now)
        {
            return Err(RejectReason::BackedOff);
        }
        let limit = self.limits.offers_per_source_per_minute;
        let window = self.windows.entry(*from).or_insert(Window {
            start: now,
            count: 0,
        });
        if window.count >= limit {
            return Err(RejectReason::RateLimited);
        }
        window.count += 1;
        let offer = validate_offer(signed, me, roster, now)?;
        if self.seen.contains_key(&offer.id) {
            return Err(RejectReason::Replayed);
        }
        if self.seen.len() >= MAX_REMEMBERED {
            return Err(RejectReason::Busy);
        }
        self.seen.insert(offer.id, offer.expires_at);
        self.seen_by_expiry.insert((offer.expires_at, offer.id));

        if load.vms.contains(&offer.vm.id)
            || self.reservations.values().any(|r| r.vm == offer.vm.id)
        {
            return Err(RejectReason::AlreadyHere);
        }
        if self.reservations.len() >= self.limits.max_incoming {
            return Err(RejectReason::Busy);
        }
        if self
            .reservations
            .values()
            .filter(|r| r.source == *from)
            .count()
            >= self.limits.per_source
        {
            return Err(RejectReason::SourceShare);
        }
        let host = roster.member(me).ok_or(RejectReason::NotAMember)?;
        let reserved_groups = self
            .reservations
            .values()
            .filter_map(|r| r.group.as_deref());
        offer.vm.placement.allows(
            host,
            load.groups
                .iter()
                .map(String::as_str)
                .chain(reserved_groups),
        )?;
        let reserved_mem = self
            .reservations
            .values()
            .filter(|r| !load.vms.contains(&r.vm))
            .fold(0u64, |acc, r| acc.saturating_add(r.memory_mib));
        // The offer's demand is relative to the source's capacity; this host judges it in its
        // own (unknown capacity on either side leaves it as it is).
        let source_cpus = roster.member(from).map_or(0, |m| m.capacity.cpus);
        let vm_demand = scale_demand(offer.vm.demand_permille, source_cpus, host.capacity.cpus);
        let demand = u64::from(load.demand_permille)
            .saturating_add(u64::from(self.pending_permille(load)))
            .saturating_add(u64::from(vm_demand));
        if load
            .vm_memory_mib
            .saturating_add(reserved_mem)
            .saturating_add(offer.vm.memory_mib)
            > load.capacity_mib
            || demand > u64::from(self.limits.upper_threshold_permille)
        {
            return Err(RejectReason::NoCapacity);
        }
        let reservation = Reservation {
            id: offer.id,
            source: offer.source,
            vm: offer.vm.id,
            memory_mib: offer.vm.memory_mib,
            demand_permille: vm_demand,
            group: offer.vm.placement.anti_affinity.clone(),
            until: now.plus_millis(self.limits.reservation_ttl_ms),
            started: false,
        };
        self.reservations.insert(offer.id, reservation.clone());
        Ok((offer, reservation))
    }
}

#[cfg(test)]
mod tests;
