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
//! 5. the VM is not already here; concurrent incoming migrations under the limit;
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
//! Reservations expire; expired ones free their capacity. Everything is bounded: reservations
//! by `max_incoming`, the replay cache by `MAX_REMEMBERED`, rate windows by the roster size.

use std::collections::{BTreeSet, HashMap};

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
    /// Offers accepted for judging per source per minute.
    pub offers_per_source_per_minute: u32,
    /// How long a reservation waits for its transfer to start.
    pub reservation_ttl_ms: u64,
    /// CPU demand (permille of capacity) this host must stay under after a move.
    pub upper_threshold_permille: u32,
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
            offers_per_source_per_minute: 30,
            reservation_ttl_ms: 30_000,
            upper_threshold_permille: policy.upper_permille,
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
        }
    }

    /// Drops expired reservations and forgets offer ids whose offers have expired.
    pub fn expire(&mut self, now: Timestamp) {
        self.reservations.retain(|_, r| r.until > now);
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

    /// Frees a reservation (the VM arrived, or the transfer ended).
    pub fn release(&mut self, id: &MigrationId) -> Option<Reservation> {
        self.reservations.remove(id)
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
        };
        self.reservations.insert(offer.id, reservation.clone());
        Ok((offer, reservation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drift_protocol::migration::{Mode, Placement, PlacementViolation, VmSummary};
    use drift_protocol::roster::{Capacity, Member, Role};
    use drift_protocol::SecretKey;
    use std::collections::BTreeMap;

    struct Fixture {
        src: SecretKey,
        other: SecretKey,
        me: SecretKey,
        outsider: SecretKey,
        roster: Roster,
        n: u8,
    }

    fn member(id: NodeId, name: &str, jurisdiction: &str) -> Member {
        Member {
            id,
            name: name.into(),
            roles: vec![Role::Host],
            labels: BTreeMap::from([("jurisdiction".into(), jurisdiction.into())]),
            capacity: Capacity {
                cpus: 16,
                mem_mib: 65_536,
            },
        }
    }

    fn fixture() -> Fixture {
        let src = SecretKey::from_bytes(&[1; 32]);
        let other = SecretKey::from_bytes(&[2; 32]);
        let me = SecretKey::from_bytes(&[3; 32]);
        let outsider = SecretKey::from_bytes(&[4; 32]);
        let roster = Roster {
            cluster: "c".into(),
            epoch: 1,
            prev: None,
            not_before: Timestamp(0),
            not_after: Timestamp(u64::MAX),
            members: vec![
                member(src.public(), "src", "de"),
                member(other.public(), "other", "de"),
                member(me.public(), "me", "de"),
            ],
        };
        Fixture {
            src,
            other,
            me,
            outsider,
            roster,
            n: 0,
        }
    }

    impl Fixture {
        fn offer(
            &mut self,
            key: &SecretKey,
            mem: u64,
            demand: u32,
            placement: Placement,
        ) -> Signed<MigrationOffer> {
            self.n += 1;
            Signed::sign(
                &MigrationOffer {
                    id: MigrationId::from_bytes([self.n; 16]),
                    source: key.public(),
                    target: self.me.public(),
                    vm: VmSummary {
                        id: VmId::from_bytes([self.n; 16]),
                        name: format!("vm-{}", self.n),
                        memory_mib: mem,
                        vcpus: 1,
                        demand_permille: demand,
                        placement,
                        qemu: None,
                    },
                    mode: Mode::PreCopy,
                    nonce: [self.n; 16],
                    issued_at: Timestamp(1_000),
                    expires_at: Timestamp(31_000),
                    roster_epoch: 1,
                },
                key,
            )
        }
    }

    fn load() -> HostLoad {
        HostLoad {
            demand_permille: 300,
            vm_memory_mib: 1024,
            capacity_mib: 8192,
            vms: vec![],
            groups: vec!["db".into()],
        }
    }

    #[test]
    fn accepts_within_limits_and_reserves() {
        let mut f = fixture();
        let mut a = Admission::new(Limits {
            reservation_ttl_ms: 5_000,
            ..Limits::default()
        });
        let o = f.offer(&f.src.clone(), 512, 200, Placement::default());
        let now = Timestamp(2_000);
        let (offer, r) = a
            .decide(&o, &f.src.public(), &f.me.public(), &f.roster, &load(), now)
            .unwrap();
        assert_eq!(r.id, offer.id);
        assert_eq!(a.reserved_permille(), 200);
        // Replay of the same signed offer.
        assert_eq!(
            a.decide(&o, &f.src.public(), &f.me.public(), &f.roster, &load(), now),
            Err(RejectReason::Replayed)
        );
        // 300 here + 200 reserved + 400 offered > 800.
        let big = f.offer(&f.other.clone(), 512, 400, Placement::default());
        assert_eq!(
            a.decide(
                &big,
                &f.other.public(),
                &f.me.public(),
                &f.roster,
                &load(),
                now
            ),
            Err(RejectReason::NoCapacity)
        );
        assert_eq!(a.reserved_permille(), 200, "a refusal reserves nothing");
        // The reservation expires and frees its capacity.
        let later = now.plus_millis(5_000);
        a.expire(later);
        assert_eq!(a.reserved_permille(), 0);
        let big = f.offer(&f.other.clone(), 512, 400, Placement::default());
        assert!(a
            .decide(
                &big,
                &f.other.public(),
                &f.me.public(),
                &f.roster,
                &load(),
                later
            )
            .is_ok());
    }

    #[test]
    fn refuses_strangers_spoofers_placement_memory_and_anti_affinity() {
        let mut f = fixture();
        let mut a = Admission::new(Limits::default());
        let now = Timestamp(2_000);
        let me = f.me.public();
        let o = f.offer(&f.outsider.clone(), 1, 1, Placement::default());
        assert_eq!(
            a.decide(&o, &f.outsider.public(), &me, &f.roster, &load(), now),
            Err(RejectReason::NotAMember)
        );
        // Signed by src but sent by other: refused before any verification.
        let o = f.offer(&f.src.clone(), 1, 1, Placement::default());
        assert_eq!(
            a.decide(&o, &f.other.public(), &me, &f.roster, &load(), now),
            Err(RejectReason::WrongSigner)
        );
        let fr = Placement {
            jurisdictions: vec!["fr".into()],
            ..Default::default()
        };
        let o = f.offer(&f.src.clone(), 1, 1, fr);
        assert!(matches!(
            a.decide(&o, &f.src.public(), &me, &f.roster, &load(), now),
            Err(RejectReason::Placement(
                PlacementViolation::Jurisdiction { .. }
            ))
        ));
        let db = Placement {
            anti_affinity: Some("db".into()),
            ..Default::default()
        };
        let o = f.offer(&f.src.clone(), 1, 1, db);
        assert!(matches!(
            a.decide(&o, &f.src.public(), &me, &f.roster, &load(), now),
            Err(RejectReason::Placement(PlacementViolation::AntiAffinity(_)))
        ));
        let o = f.offer(&f.src.clone(), 8000, 1, Placement::default());
        assert_eq!(
            a.decide(&o, &f.src.public(), &me, &f.roster, &load(), now),
            Err(RejectReason::NoCapacity)
        );
        assert_eq!(a.reserved_permille(), 0);
    }

    #[test]
    fn demand_is_judged_in_this_hosts_units_and_arrived_vms_count_once() {
        let mut f = fixture();
        // The source has half this host's CPUs: its 600‰ VM is 300‰ here.
        for m in &mut f.roster.members {
            if m.id == f.src.public() {
                m.capacity.cpus = 8;
            }
        }
        let mut a = Admission::new(Limits::from_policy(&PolicyConfig::default()));
        let now = Timestamp(2_000);
        let me = f.me.public();
        let o = f.offer(&f.src.clone(), 512, 600, Placement::default());
        let (offer, r) = a
            .decide(&o, &f.src.public(), &me, &f.roster, &load(), now)
            .unwrap();
        assert_eq!(r.demand_permille, 300);
        assert_eq!(a.reserved_permille(), 300);
        // Once the incoming VM exists here it counts in the host's own demand, not twice.
        let mut arrived = load();
        arrived.demand_permille += 300;
        arrived.vm_memory_mib += 512;
        arrived.vms.push(offer.vm.id);
        assert_eq!(a.pending_permille(&arrived), 0);
        assert_eq!(a.pending_permille(&load()), 300);
        // 600 here + 200 offered = 800: still at the threshold, accepted.
        let o = f.offer(&f.other.clone(), 1, 200, Placement::default());
        assert!(a
            .decide(&o, &f.other.public(), &me, &f.roster, &arrived, now)
            .is_ok());
    }

    #[test]
    fn the_upper_threshold_is_the_policys() {
        let policy = PolicyConfig {
            upper_permille: 500,
            ..PolicyConfig::default()
        };
        assert_eq!(Limits::from_policy(&policy).upper_threshold_permille, 500);
        assert_eq!(
            Limits::default().upper_threshold_permille,
            PolicyConfig::default().upper_permille
        );
        let mut f = fixture();
        let mut a = Admission::new(Limits::from_policy(&policy));
        // 300 here + 201 > 500.
        let o = f.offer(&f.src.clone(), 1, 201, Placement::default());
        assert_eq!(
            a.decide(
                &o,
                &f.src.public(),
                &f.me.public(),
                &f.roster,
                &load(),
                Timestamp(2_000)
            ),
            Err(RejectReason::NoCapacity)
        );
    }

    #[test]
    fn a_flood_from_one_source_is_bounded_and_reserves_at_most_the_limit() {
        let mut f = fixture();
        let limits = Limits::default();
        let mut a = Admission::new(limits);
        let now = Timestamp(2_000);
        let me = f.me.public();
        let mut verdicts = HashMap::<&'static str, usize>::new();
        for _ in 0..200 {
            let o = f.offer(&f.src.clone(), 1, 1, Placement::default());
            let v = a.decide(&o, &f.src.public(), &me, &f.roster, &load(), now);
            *verdicts
                .entry(match v {
                    Ok(_) => "accepted",
                    Err(e) => e.label(),
                })
                .or_default() += 1;
        }
        assert_eq!(verdicts["accepted"], limits.max_incoming);
        assert_eq!(
            verdicts["busy"],
            limits.offers_per_source_per_minute as usize - limits.max_incoming
        );
        assert_eq!(
            verdicts["rate_limited"],
            200 - limits.offers_per_source_per_minute as usize
        );
        assert_eq!(a.reservations.len(), limits.max_incoming);
        // Another source is not starved by the flood's rate limit, only by capacity.
        let o = f.offer(&f.other.clone(), 1, 1, Placement::default());
        assert_eq!(
            a.decide(&o, &f.other.public(), &me, &f.roster, &load(), now),
            Err(RejectReason::Busy)
        );
        // A minute later the source may offer again.
        a.release(&MigrationId::from_bytes([1; 16]));
        let later = now.plus_millis(60_000);
        let o = f.offer(&f.src.clone(), 1, 1, Placement::default());
        let mut fresh = o.verify().unwrap();
        fresh.issued_at = later;
        fresh.expires_at = later.plus_millis(30_000);
        let o = Signed::sign(&fresh, &f.src);
        assert!(a
            .decide(&o, &f.src.public(), &me, &f.roster, &load(), later)
            .is_ok());
    }
}
