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
        admins: None,
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
                data_connections: 0,
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
    assert_eq!(verdicts["accepted"], limits.per_source);
    assert_eq!(
        verdicts["source_share"],
        limits.offers_per_source_per_minute as usize - limits.per_source
    );
    assert_eq!(
        verdicts["rate_limited"],
        200 - limits.offers_per_source_per_minute as usize
    );
    assert_eq!(a.reservations.len(), limits.per_source);
    // Another source is not starved by the flood: a slot is left for it.
    let o = f.offer(&f.other.clone(), 1, 1, Placement::default());
    assert!(a
        .decide(&o, &f.other.public(), &me, &f.roster, &load(), now)
        .is_ok());
    assert_eq!(a.reservations.len(), limits.max_incoming);
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

/// An offer from `key` issued at `at`.
fn offer_at(f: &mut Fixture, key: &SecretKey, at: Timestamp) -> Signed<MigrationOffer> {
    let mut o = f.offer(key, 1, 1, Placement::default()).verify().unwrap();
    o.issued_at = at;
    o.expires_at = at.plus_millis(30_000);
    Signed::sign(&o, key)
}

#[test]
fn a_source_that_stalls_repeatedly_is_backed_off_for_longer_each_time() {
    let mut f = fixture();
    let mut a = Admission::new(Limits::default());
    let (src, me) = (f.src.public(), f.me.public());
    let (src_key, other_key) = (f.src.clone(), f.other.clone());
    let t = |ms: u64| Timestamp(1_000_000 + ms);
    // Strikes further apart than the window do not add up.
    assert_eq!(a.strike(&src, t(0)), None);
    assert_eq!(a.strike(&src, t(600_000)), None);
    let first = a.strike(&src, t(601_000)).expect("two within the window");
    assert_eq!((first.until, first.level), (t(661_000), 1));
    let o = offer_at(&mut f, &src_key, t(602_000));
    assert_eq!(
        a.decide(&o, &src, &me, &f.roster, &load(), t(602_000)),
        Err(RejectReason::BackedOff)
    );
    assert_eq!(a.view(t(602_000)).backed_off, vec![first.clone()]);
    // Others are not affected.
    let o = offer_at(&mut f, &other_key, t(602_000));
    assert!(a
        .decide(&o, &f.other.public(), &me, &f.roster, &load(), t(602_000))
        .is_ok());
    // After the back-off the source migrates again.
    let o = offer_at(&mut f, &src_key, t(661_000));
    let (ok, _) = a
        .decide(&o, &src, &me, &f.roster, &load(), t(661_000))
        .unwrap();
    a.release(&ok.id);
    assert!(a.view(t(661_000)).backed_off.is_empty());
    // Again: twice as long.
    a.strike(&src, t(670_000));
    let second = a.strike(&src, t(671_000)).unwrap();
    assert_eq!((second.until, second.level), (t(791_000), 2));
    // A commit clears the record: the next back-off is the first again.
    a.forgive(&src);
    assert!(a.view(t(672_000)).backed_off.is_empty());
    a.strike(&src, t(673_000));
    assert_eq!(a.strike(&src, t(674_000)).unwrap().level, 1);
    // Never longer than the maximum.
    let mut longest = 0;
    for i in 0..40 {
        if let Some(b) = a.strike(&src, t(700_000 + i)) {
            longest = longest.max(b.until.millis_since(t(700_000 + i)));
        }
    }
    assert_eq!(longest, Limits::default().backoff_max_ms);
}

#[test]
fn a_started_transfer_holds_its_slot_until_it_ends_and_an_idle_one_expires() {
    let mut f = fixture();
    let limits = Limits {
        per_source: 2,
        ..Limits::default()
    };
    let mut a = Admission::new(limits);
    let me = f.me.public();
    let src_key = f.src.clone();
    let t0 = Timestamp(2_000);
    let (started, _) = a
        .decide(
            &offer_at(&mut f, &src_key, t0),
            &f.src.public(),
            &me,
            &f.roster,
            &load(),
            t0,
        )
        .unwrap();
    let (idle, _) = a
        .decide(
            &offer_at(&mut f, &src_key, t0),
            &f.src.public(),
            &me,
            &f.roster,
            &load(),
            t0,
        )
        .unwrap();
    assert!(a.start(&started.id));
    assert_eq!(a.view(t0).slots_in_use, 2);
    assert_eq!(a.view(t0).reserved_mib, 2);
    let later = t0.plus_millis(limits.reservation_ttl_ms);
    a.expire(later);
    assert_eq!(
        a.view(later).slots_in_use,
        1,
        "the idle reservation expired"
    );
    assert!(!a.start(&idle.id), "too late to start");
    assert!(a.release(&started.id).is_some());
    assert_eq!(a.view(later).slots_in_use, 0);
}
