//! Property tests of drift-protocol's wire types: every message round-trips through the frame
//! codec and the signed envelope, no single flipped bit of a signed frame still verifies, a
//! signature made under one type's domain tag never verifies as another type, and
//! `report::validate` accepts exactly the good reports and names every fault.
//!
//! How thorough a run is depends on what a signature check costs (see [`thorough`]): with
//! optimized crypto (release, or the workspace's dev profile), every bit of every small signed
//! frame is flipped and the properties run hundreds of cases; with unoptimized crypto (9 ms a
//! check) fewer cases run and the costly bit positions are sampled, to stay within seconds.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use drift_protocol::audit::{AuditEvent, AuditRecord, Side};
use drift_protocol::codec::{self, encode_frame, DecodeError, FrameDecoder, HEADER_LEN};
use drift_protocol::dataplane::{
    DataAnswer, DataBinding, DataEndpoint, DataFrame, MAX_DATA_CONNECTIONS,
};
use drift_protocol::ids::{Hash, MigrationId, NodeId, VmId};
use drift_protocol::keys::SecretKey;
use drift_protocol::migration::{
    MigrationDecision, MigrationOffer, Mode, Placement, PlacementViolation, RejectReason,
    ResolveAnswer, ResolveOutcome, ResolveQuery, Verdict, VmSummary,
};
use drift_protocol::report::{
    self, Context, Freshness, LoadReport, Rejection, MAX_DEMAND_PERMILLE, MAX_MEM_MIB,
    MAX_POWER_MW, MAX_REPORT_LEN, PERMILLE,
};
use drift_protocol::roster::{Admins, Capacity, Member, Role, Roster};
use drift_protocol::signed::{Signable, Signed, VerifyError, DOMAINS};
use drift_protocol::time::Timestamp;
use drift_protocol::transfer::recover::{RecoverAnswer, RecoverRefusal, RecoverRequest};
use drift_protocol::transfer::{
    self, Abort, AbortReason, Applied, Commit, Complete, DeviceState, MissingRanges, PageBatch,
    PageRequest, RoundEnd, StaleRanges, Start, TransferFrame, PAGE_SIZE,
};
use drift_protocol::witness::{AuditHead, Countersign};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::{Rng, RngCore, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Whether signature checks are fast here, measured once. They are when ed25519 is compiled
/// with optimizations (a release build, or a dev profile that optimizes dependencies, as the
/// workspace's does) and take about 9 ms each when it is not: then the properties run fewer
/// cases and sample bit positions, to stay within seconds. `DRIFT_PROP_ALL_BITS=1` forces the
/// thorough mode.
fn thorough() -> bool {
    static FAST: OnceLock<bool> = OnceLock::new();
    *FAST.get_or_init(|| {
        if !cfg!(debug_assertions) || std::env::var_os("DRIFT_PROP_ALL_BITS").is_some() {
            return true;
        }
        let key = SecretKey::from_bytes(&[1; 32]);
        let commit = Commit {
            id: MigrationId::from_bytes([2; 16]),
            root: Hash([3; 32]),
            committed_at: Timestamp(4),
        };
        let signed = Signed::sign(&commit, &key);
        let started = Instant::now();
        for _ in 0..4 {
            assert!(signed.verify().is_ok());
        }
        // Optimized: well under 0.5 ms each, even on a busy machine; unoptimized: about 9 ms.
        started.elapsed() < Duration::from_millis(8)
    })
}

/// `slow` cases when signature checks are slow, `fast` when they are fast (see [`thorough`]).
/// Failures are not persisted: proptest finds no `lib.rs` to put them beside in an integration
/// test, and prints the minimal failing input anyway.
fn config(slow: u32, fast: u32) -> ProptestConfig {
    ProptestConfig {
        cases: if thorough() { fast } else { slow },
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// A secret key from a generated 32-byte seed.
fn secret_key() -> impl Strategy<Value = SecretKey> {
    any::<[u8; 32]>().prop_map(|seed| SecretKey::from_bytes(&seed))
}

/// A node id: 32 random bytes that happen to be a curve point (about half of them are), which
/// is much cheaper than deriving a key.
fn node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 32]>().prop_filter_map("not a curve point", |b| NodeId::from_bytes(b).ok())
}

fn hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash)
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    any::<u64>().prop_map(Timestamp)
}

fn migration_id() -> impl Strategy<Value = MigrationId> {
    any::<[u8; 16]>().prop_map(MigrationId::from_bytes)
}

fn vm_id() -> impl Strategy<Value = VmId> {
    any::<[u8; 16]>().prop_map(VmId::from_bytes)
}

/// A valid member, cluster or label name.
fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

/// Any text, including multi-byte characters (free-text fields carry whatever they are given).
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::PreCopy),
        Just(Mode::PostCopy),
        Just(Mode::Hybrid)
    ]
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Source), Just(Side::Target)]
}

fn load_report() -> impl Strategy<Value = LoadReport> {
    (
        (
            node_id(),
            any::<u64>(),
            timestamp(),
            any::<u64>(),
            any::<u16>(),
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()),
        (any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |(
                (node, seq, issued_at, roster_epoch, cpu_permille),
                (mem_used_mib, mem_total_mib, power_mw, power_measured),
                (vm_count, vm_demand_permille, reserved_permille),
            )| LoadReport {
                node,
                seq,
                issued_at,
                roster_epoch,
                cpu_permille,
                mem_used_mib,
                mem_total_mib,
                power_mw,
                power_measured,
                vm_count,
                vm_demand_permille,
                reserved_permille,
                standby: false,
            },
        )
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Host), Just(Role::Observer)]
}

fn member() -> impl Strategy<Value = Member> {
    (
        node_id(),
        name(),
        prop::collection::vec(role(), 0..3),
        prop::collection::btree_map(name(), name(), 0..4),
        (any::<u32>(), any::<u64>()),
    )
        .prop_map(|(id, name, roles, labels, (cpus, mem_mib))| Member {
            id,
            name,
            roles,
            labels,
            capacity: Capacity { cpus, mem_mib },
        })
}

fn roster() -> impl Strategy<Value = Roster> {
    (
        name(),
        any::<u64>(),
        prop::option::of(hash()),
        timestamp(),
        timestamp(),
        prop::collection::vec(member(), 0..4),
    )
        .prop_map(
            |(cluster, epoch, prev, not_before, not_after, members)| Roster {
                cluster,
                epoch,
                prev,
                not_before,
                not_after,
                members,
                admins: None,
            },
        )
}

fn placement() -> impl Strategy<Value = Placement> {
    (
        prop::collection::vec(name(), 0..3),
        prop::collection::vec(name(), 0..3),
        prop::option::of(name()),
    )
        .prop_map(|(jurisdictions, regions, anti_affinity)| Placement {
            jurisdictions,
            regions,
            anti_affinity,
        })
}

fn vm_summary() -> impl Strategy<Value = VmSummary> {
    (
        vm_id(),
        name(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        placement(),
    )
        .prop_map(
            |(id, name, memory_mib, vcpus, demand_permille, placement)| VmSummary {
                id,
                name,
                memory_mib,
                vcpus,
                demand_permille,
                placement,
                qemu: None,
            },
        )
}

fn migration_offer() -> impl Strategy<Value = MigrationOffer> {
    (
        (migration_id(), node_id(), node_id(), vm_summary(), mode()),
        (
            any::<[u8; 16]>(),
            timestamp(),
            timestamp(),
            any::<u64>(),
            0..=MAX_DATA_CONNECTIONS,
        ),
    )
        .prop_map(
            |(
                (id, source, target, vm, mode),
                (nonce, issued_at, expires_at, roster_epoch, data_connections),
            )| {
                MigrationOffer {
                    id,
                    source,
                    target,
                    vm,
                    mode,
                    nonce,
                    issued_at,
                    expires_at,
                    roster_epoch,
                    data_connections,
                }
            },
        )
}

fn data_endpoint() -> impl Strategy<Value = DataEndpoint> {
    (
        any::<u16>(),
        prop::collection::vec("[0-9a-f:.\\[\\]]{1,40}", 0..3),
        1..=MAX_DATA_CONNECTIONS,
    )
        .prop_map(|(port, addrs, connections)| DataEndpoint {
            port,
            addrs,
            connections,
        })
}

fn data_binding() -> impl Strategy<Value = DataBinding> {
    (migration_id(), hash(), any::<u32>(), any::<[u8; 32]>()).prop_map(
        |(id, offer, index, exporter)| DataBinding {
            id,
            offer,
            index,
            exporter,
        },
    )
}

fn placement_violation() -> impl Strategy<Value = PlacementViolation> {
    prop_oneof![
        (
            prop::option::of(name()),
            prop::collection::vec(name(), 0..3)
        )
            .prop_map(|(host, allowed)| PlacementViolation::Jurisdiction { host, allowed }),
        (
            prop::option::of(name()),
            prop::collection::vec(name(), 0..3)
        )
            .prop_map(|(host, allowed)| PlacementViolation::Region { host, allowed }),
        name().prop_map(PlacementViolation::AntiAffinity),
        Just(PlacementViolation::NotAHost),
    ]
}

fn reject_reason() -> impl Strategy<Value = RejectReason> {
    prop_oneof![
        Just(RejectReason::BadOffer),
        Just(RejectReason::NotAMember),
        Just(RejectReason::NotForMe),
        Just(RejectReason::WrongSigner),
        Just(RejectReason::Expired),
        Just(RejectReason::Replayed),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offer, mine)| RejectReason::EpochMismatch { offer, mine }),
        placement_violation().prop_map(RejectReason::Placement),
        Just(RejectReason::Busy),
        Just(RejectReason::RateLimited),
        Just(RejectReason::NoCapacity),
        Just(RejectReason::AlreadyHere),
        Just(RejectReason::SourceShare),
        Just(RejectReason::BackedOff),
    ]
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        (timestamp(), prop::option::of(data_endpoint())).prop_map(|(reserved_until, data)| {
            Verdict::Accept {
                reserved_until,
                data,
            }
        }),
        reject_reason().prop_map(Verdict::Reject),
    ]
}

fn migration_decision() -> impl Strategy<Value = MigrationDecision> {
    (
        migration_id(),
        hash(),
        node_id(),
        node_id(),
        verdict(),
        timestamp(),
    )
        .prop_map(
            |(id, offer, source, target, verdict, issued_at)| MigrationDecision {
                id,
                offer,
                source,
                target,
                verdict,
                issued_at,
            },
        )
}

fn complete() -> impl Strategy<Value = Complete> {
    (migration_id(), hash(), hash(), any::<u64>()).prop_map(|(id, offer, root, page_count)| {
        Complete {
            id,
            offer,
            root,
            page_count,
        }
    })
}

fn commit() -> impl Strategy<Value = Commit> {
    (migration_id(), hash(), timestamp()).prop_map(|(id, root, committed_at)| Commit {
        id,
        root,
        committed_at,
    })
}

fn resolve_query() -> impl Strategy<Value = ResolveQuery> {
    (migration_id(), node_id(), node_id(), timestamp()).prop_map(
        |(id, source, target, asked_at)| ResolveQuery {
            id,
            source,
            target,
            asked_at,
        },
    )
}

fn recover_request() -> impl Strategy<Value = RecoverRequest> {
    (
        migration_id(),
        hash(),
        node_id(),
        node_id(),
        any::<u32>(),
        timestamp(),
    )
        .prop_map(
            |(id, offer, source, target, attempt, issued_at)| RecoverRequest {
                id,
                offer,
                source,
                target,
                attempt,
                issued_at,
            },
        )
}

fn recover_answer() -> impl Strategy<Value = RecoverAnswer> {
    let refusal = prop_oneof![
        Just(None),
        Just(Some(RecoverRefusal::BadSignature)),
        Just(Some(RecoverRefusal::NotForMe)),
        Just(Some(RecoverRefusal::NotWaiting)),
        Just(Some(RecoverRefusal::WrongOffer)),
        Just(Some(RecoverRefusal::Replayed)),
        Just(Some(RecoverRefusal::Expired)),
    ];
    (migration_id(), hash(), node_id(), refusal).prop_map(|(id, request, target, refusal)| {
        RecoverAnswer {
            id,
            request,
            target,
            refusal,
        }
    })
}

fn resolve_answer() -> impl Strategy<Value = ResolveAnswer> {
    let outcome = prop_oneof![
        hash().prop_map(|root| ResolveOutcome::Committed { root }),
        Just(ResolveOutcome::NeverRan),
        Just(ResolveOutcome::RunningIncomplete),
        Just(ResolveOutcome::InProgress),
    ];
    (
        migration_id(),
        hash(),
        node_id(),
        node_id(),
        outcome,
        timestamp(),
    )
        .prop_map(
            |(id, query, source, target, outcome, answered_at)| ResolveAnswer {
                id,
                query,
                source,
                target,
                outcome,
                answered_at,
            },
        )
}

/// The content of one page: all zero, one repeated byte, or random bytes.
#[derive(Debug, Clone, Copy)]
enum PageContent {
    Zero,
    Fill(u8),
    Random(u64),
}

fn page_content() -> impl Strategy<Value = PageContent> {
    prop_oneof![
        Just(PageContent::Zero),
        (1u8..=255).prop_map(PageContent::Fill),
        any::<u64>().prop_map(PageContent::Random),
    ]
}

fn page_bytes(content: PageContent) -> Vec<u8> {
    match content {
        PageContent::Zero => vec![0; PAGE_SIZE],
        PageContent::Fill(b) => vec![b; PAGE_SIZE],
        PageContent::Random(seed) => {
            let mut page = vec![0; PAGE_SIZE];
            rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut page);
            page
        }
    }
}

/// Page numbers stay below 2^40 so a page count one above the largest always exists.
fn page_batch() -> impl Strategy<Value = PageBatch> {
    (
        any::<u32>(),
        prop::collection::vec((0u64..1 << 40, page_content()), 0..4),
    )
        .prop_map(|(round, pages)| {
            let pages: Vec<(u64, Vec<u8>)> = pages
                .into_iter()
                .map(|(pfn, c)| (pfn, page_bytes(c)))
                .collect();
            PageBatch::build(round, pages.iter().map(|(pfn, p)| (*pfn, &p[..])))
        })
}

fn abort_reason() -> impl Strategy<Value = AbortReason> {
    prop_oneof![
        Just(AbortReason::Cancelled),
        Just(AbortReason::LocalError),
        Just(AbortReason::BadBatch),
        Just(AbortReason::BadRoot),
        Just(AbortReason::Protocol),
        Just(AbortReason::Timeout),
        Just(AbortReason::Revoked),
        Just(AbortReason::Malformed),
        Just(AbortReason::Stalled),
        Just(AbortReason::NotConverging),
    ]
}

fn transfer_frame() -> impl Strategy<Value = TransferFrame> {
    prop_oneof![
        (
            migration_id(),
            hash(),
            mode(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(
                |(id, offer, mode, page_size, page_count, data_connections)| {
                    TransferFrame::Start(Start {
                        id,
                        offer,
                        mode,
                        page_size,
                        page_count,
                        data_connections,
                    })
                }
            ),
        any::<u32>().prop_map(|round| TransferFrame::Applied(Applied { round })),
        (
            prop::collection::vec((any::<u64>(), any::<u64>()), 0..8),
            any::<bool>()
        )
            .prop_map(|(ranges, done)| TransferFrame::Missing(MissingRanges { ranges, done })),
        page_batch().prop_map(TransferFrame::Pages),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(round, pages_sent, dirty)| {
            TransferFrame::RoundEnd(RoundEnd {
                round,
                pages_sent,
                dirty,
            })
        }),
        prop::collection::vec(any::<u8>(), 0..512)
            .prop_map(|b| TransferFrame::DeviceState(DeviceState::new(b))),
        (complete(), secret_key())
            .prop_map(|(c, key)| TransferFrame::Complete(Signed::sign(&c, &key))),
        (commit(), secret_key()).prop_map(|(c, key)| TransferFrame::Commit(Signed::sign(&c, &key))),
        (migration_id(), abort_reason())
            .prop_map(|(id, reason)| TransferFrame::Abort(Abort { id, reason })),
        prop::collection::vec(0u64..1 << 40, 0..16)
            .prop_map(|pfns| TransferFrame::PageRequest(PageRequest { pfns })),
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..16)
            .prop_map(|ranges| TransferFrame::Stale(StaleRanges { ranges })),
    ]
}

fn audit_event() -> impl Strategy<Value = AuditEvent> {
    prop_oneof![
        any::<u64>().prop_map(|roster_epoch| AuditEvent::NodeStarted { roster_epoch }),
        (any::<u64>(), hash()).prop_map(|(epoch, hash)| AuditEvent::RosterAdopted { epoch, hash }),
        (migration_id(), vm_id(), node_id(), mode(), hash()).prop_map(
            |(id, vm, target, mode, offer)| AuditEvent::OfferSent {
                id,
                vm,
                target,
                mode,
                offer,
            }
        ),
        (migration_id(), vm_id(), node_id(), hash()).prop_map(|(id, vm, source, offer)| {
            AuditEvent::OfferReceived {
                id,
                vm,
                source,
                offer,
            }
        }),
        (migration_id(), any::<bool>(), text()).prop_map(|(id, accepted, reason)| {
            AuditEvent::Decision {
                id,
                accepted,
                reason,
            }
        }),
        (migration_id(), side(), node_id())
            .prop_map(|(id, side, peer)| AuditEvent::TransferStarted { id, side, peer }),
        (migration_id(), side()).prop_map(|(id, side)| AuditEvent::Switchover { id, side }),
        (migration_id(), side(), hash()).prop_map(|(id, side, root)| AuditEvent::Complete {
            id,
            side,
            root
        }),
        (migration_id(), side(), hash()).prop_map(|(id, side, root)| AuditEvent::Commit {
            id,
            side,
            root
        }),
        (migration_id(), side(), text()).prop_map(|(id, side, reason)| AuditEvent::Abort {
            id,
            side,
            reason
        }),
        (
            prop::option::of(migration_id()),
            prop::option::of(node_id()),
            text()
        )
            .prop_map(|(id, peer, reason)| AuditEvent::Refused { id, peer, reason }),
        (migration_id(), side(), text())
            .prop_map(|(id, side, outcome)| { AuditEvent::Resolved { id, side, outcome } }),
    ]
}

fn audit_record() -> impl Strategy<Value = AuditRecord> {
    (any::<u64>(), hash(), timestamp(), audit_event()).prop_map(|(seq, prev, at, event)| {
        AuditRecord {
            seq,
            prev,
            at,
            event,
        }
    })
}

/// One value of every signed type.
#[derive(Debug, Clone)]
struct AllSigned {
    report: LoadReport,
    roster: Roster,
    offer: MigrationOffer,
    decision: MigrationDecision,
    complete: Complete,
    commit: Commit,
    audit: AuditRecord,
    query: ResolveQuery,
    answer: ResolveAnswer,
    binding: DataBinding,
    recover: RecoverRequest,
    recovered: RecoverAnswer,
    head: AuditHead,
    countersign: Countersign,
}

fn audit_head() -> impl Strategy<Value = AuditHead> {
    (node_id(), any::<u64>(), hash(), timestamp()).prop_map(|(node, seq, hash, at)| AuditHead {
        node,
        seq,
        hash,
        at,
    })
}

fn countersign() -> impl Strategy<Value = Countersign> {
    (hash(), node_id(), timestamp()).prop_map(|(head, witness, seen)| Countersign {
        head,
        witness,
        seen,
    })
}

fn all_signed() -> impl Strategy<Value = AllSigned> {
    (
        (
            load_report(),
            roster(),
            migration_offer(),
            migration_decision(),
            complete(),
            commit(),
            audit_record(),
            resolve_query(),
            resolve_answer(),
            data_binding(),
            recover_request(),
            recover_answer(),
        ),
        (audit_head(), countersign()),
    )
        .prop_map(
            |(
                (
                    report,
                    roster,
                    offer,
                    decision,
                    complete,
                    commit,
                    audit,
                    query,
                    answer,
                    binding,
                    recover,
                    recovered,
                ),
                (head, countersign),
            )| {
                AllSigned {
                    report,
                    roster,
                    offer,
                    decision,
                    complete,
                    commit,
                    audit,
                    query,
                    answer,
                    binding,
                    recover,
                    recovered,
                    head,
                    countersign,
                }
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

/// `value` survives `encode_frame` + `decode_exact`, and incremental `decode` needs every byte.
fn frame_round_trip<T>(value: &T) -> Result<Vec<u8>, TestCaseError>
where
    T: Serialize + serde::de::DeserializeOwned + PartialEq + Debug,
{
    let frame = encode_frame(value);
    let dec = FrameDecoder::default();
    prop_assert_eq!(&dec.decode_exact::<T>(&frame)?, value);
    prop_assert_eq!(
        dec.decode::<T>(&frame)?,
        Some((dec.decode_exact::<T>(&frame)?, frame.len()))
    );
    // One byte short is "need more", never an error or a different value.
    prop_assert_eq!(dec.decode::<T>(&frame[..frame.len() - 1])?, None);
    // The payload alone is the same postcard encoding.
    prop_assert_eq!(&frame[HEADER_LEN..], &codec::encode_payload(value)[..]);
    Ok(frame)
}

/// `value` signed by `key` survives the frame codec and verifies as exactly `value`.
fn signed_round_trip<T>(value: &T, key: &SecretKey) -> Result<(), TestCaseError>
where
    T: Signable + PartialEq + Debug + Clone,
{
    let signed = Signed::sign(value, key);
    frame_round_trip(&signed)?;
    let frame = encode_frame(&signed);
    let back: Signed<T> = FrameDecoder::default().decode_exact(&frame)?;
    prop_assert_eq!(back.signer(), &key.public());
    prop_assert_eq!(back.payload(), &codec::encode_payload(value)[..]);
    prop_assert_eq!(back.hash(), signed.hash());
    prop_assert_eq!(back.verify_by(&key.public()), Ok(value.clone()));
    Ok(())
}

proptest! {
    #![proptest_config(config(16, 128))]

    #[test]
    fn load_report_round_trips(v in load_report(), key in secret_key()) {
        frame_round_trip(&v)?;
        signed_round_trip(&v, &key)?;
    }

    #[test]
    fn roster_round_trips(v in roster(), key in secret_key()) {
        // A roster without admins has the layout of earlier versions (read by
        // `Signable::decode`, not by a plain frame decode); one with admins has the full one.
        let payload = codec::encode_payload(&v);
        prop_assert_eq!(<Roster as Signable>::decode(&payload)?, v.clone());
        signed_round_trip(&v, &key)?;
        let mut with = v;
        with.admins = Some(Admins::single(key.public()));
        frame_round_trip(&with)?;
        signed_round_trip(&with, &key)?;
    }

    #[test]
    fn migration_offer_round_trips(v in migration_offer(), key in secret_key()) {
        frame_round_trip(&v)?;
        signed_round_trip(&v, &key)?;
    }

    #[test]
    fn migration_decision_round_trips(v in migration_decision(), key in secret_key()) {
        frame_round_trip(&v)?;
        signed_round_trip(&v, &key)?;
    }

    #[test]
    fn complete_and_commit_round_trip(c in complete(), m in commit(), key in secret_key()) {
        frame_round_trip(&c)?;
        signed_round_trip(&c, &key)?;
        frame_round_trip(&m)?;
        signed_round_trip(&m, &key)?;
    }

    #[test]
    fn resolve_round_trips(q in resolve_query(), a in resolve_answer(), key in secret_key()) {
        frame_round_trip(&q)?;
        signed_round_trip(&q, &key)?;
        frame_round_trip(&a)?;
        signed_round_trip(&a, &key)?;
    }

    #[test]
    fn recover_round_trips(q in recover_request(), a in recover_answer(), key in secret_key()) {
        frame_round_trip(&q)?;
        signed_round_trip(&q, &key)?;
        frame_round_trip(&a)?;
        signed_round_trip(&a, &key)?;
    }

    #[test]
    fn audit_record_round_trips(v in audit_record(), key in secret_key()) {
        frame_round_trip(&v)?;
        signed_round_trip(&v, &key)?;
    }

    #[test]
    fn data_plane_values_round_trip(
        b in data_binding(),
        key in secret_key(),
        seq in any::<u64>(),
        frame in transfer_frame(),
    ) {
        frame_round_trip(&b)?;
        signed_round_trip(&b, &key)?;
        frame_round_trip(&DataFrame { seq, frame })?;
        for answer in [
            DataAnswer::Invalid,
            DataAnswer::Accepted,
            DataAnswer::BadBinding,
            DataAnswer::UnknownMigration,
            DataAnswer::NotTheSource,
            DataAnswer::BeyondAgreed,
            DataAnswer::AlreadyOpen,
        ] {
            frame_round_trip(&answer)?;
        }
    }
}

proptest! {
    #![proptest_config(config(48, 256))]

    /// Every transfer frame round-trips, and the values built by the public constructors pass
    /// their own checks.
    #[test]
    fn transfer_frames_round_trip_and_pass_their_checks(frame in transfer_frame()) {
        frame_round_trip(&frame)?;
        match &frame {
            TransferFrame::Pages(batch) => {
                let page_count = batch.entries.iter().map(|e| e.pfn + 1).max().unwrap_or(0);
                prop_assert_eq!(batch.check(page_count), Ok(()));
                if page_count > 0 {
                    prop_assert!(batch.check(page_count - 1).is_err());
                }
                let full = batch.pages().filter(|(_, d)| d.is_some()).count();
                prop_assert_eq!(batch.data.len(), full * PAGE_SIZE);
            }
            TransferFrame::DeviceState(d) => prop_assert_eq!(d.check(), Ok(())),
            TransferFrame::PageRequest(r) => {
                let page_count = r.pfns.iter().map(|p| p + 1).max().unwrap_or(0);
                prop_assert_eq!(r.check(page_count), Ok(()));
            }
            TransferFrame::Complete(s) => prop_assert!(s.verify().is_ok()),
            TransferFrame::Commit(s) => prop_assert!(s.verify().is_ok()),
            TransferFrame::Start(_)
            | TransferFrame::RoundEnd(_)
            | TransferFrame::Abort(_)
            | TransferFrame::Stale(_)
            | TransferFrame::Missing(_)
            | TransferFrame::Applied(_) => {}
        }
    }

    /// The batch a `PageBatch::build` makes holds exactly the non-zero pages, in order.
    #[test]
    fn page_batch_keeps_pages_in_order(
        round in any::<u32>(),
        pages in prop::collection::vec((0u64..1 << 40, page_content()), 0..6),
    ) {
        let pages: Vec<(u64, Vec<u8>)> =
            pages.into_iter().map(|(pfn, c)| (pfn, page_bytes(c))).collect();
        let batch = PageBatch::build(round, pages.iter().map(|(pfn, p)| (*pfn, &p[..])));
        let got: Vec<(u64, Option<&[u8]>)> = batch.pages().collect();
        prop_assert_eq!(got.len(), pages.len());
        for ((pfn, page), (got_pfn, got_data)) in pages.iter().zip(got) {
            prop_assert_eq!(*pfn, got_pfn);
            if transfer::is_zero_page(page) {
                prop_assert_eq!(got_data, None);
            } else {
                prop_assert_eq!(got_data, Some(&page[..]));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Single bit flips never verify
// ---------------------------------------------------------------------------------------------

/// Frames up to this many bytes get every bit flipped (in the thorough mode); bigger ones every
/// bit of the header, length prefix and signer, and a sample of the payload and signature.
const ALL_BITS_UP_TO: usize = 512;

/// Bits of the costly region (payload and signature: each flip there costs a signature check)
/// sampled in a frame too big to try every bit, or in every frame when checks are slow. Never
/// fewer than make 512 positions with the cheap region.
fn sampled_costly_bits() -> usize {
    if thorough() {
        2048
    } else {
        200
    }
}

/// The bit positions to flip in `frame`, a frame of a `Signed<T>` whose payload is
/// `payload_len` bytes: every bit, or every bit of the header, the length prefix and the
/// signer plus a random sample of the payload and signature bits.
fn flip_positions(frame: &[u8], payload_len: usize, rng: &mut impl Rng) -> Vec<usize> {
    let bits = frame.len() * 8;
    if thorough() && frame.len() <= ALL_BITS_UP_TO {
        return (0..bits).collect();
    }
    // frame = header (5) | varint(payload_len) | payload | signer (32) | signature (64)
    let payload_start = frame.len() - 96 - payload_len;
    let payload_end = payload_start + payload_len;
    let signer_end = payload_end + 32;
    let cheap = |bit: usize| {
        let byte = bit / 8;
        byte < payload_start || (payload_end..signer_end).contains(&byte)
    };
    let mut positions: Vec<usize> = (0..bits).filter(|&b| cheap(b)).collect();
    let costly: Vec<usize> = (0..bits).filter(|&b| !cheap(b)).collect();
    let want = sampled_costly_bits().max(512usize.saturating_sub(positions.len()));
    positions.extend(
        rand::seq::index::sample(rng, costly.len(), want.min(costly.len()))
            .into_iter()
            .map(|i| costly[i]),
    );
    positions
}

/// Flipping any single bit of the frame of `value` signed by `key` yields bytes that either do
/// not decode as a `Signed<T>`, or do not verify as signed by `key`; and even with whatever
/// signer the flipped frame names, they never verify.
fn every_flip_fails<T>(value: &T, key: &SecretKey, flip_seed: u64) -> Result<(), TestCaseError>
where
    T: Signable + PartialEq + Debug,
{
    let signer = key.public();
    let signed = Signed::sign(value, key);
    let frame = encode_frame(&signed);
    let dec = FrameDecoder::default();
    prop_assert!(dec
        .decode_exact::<Signed<T>>(&frame)?
        .verify_by(&signer)
        .is_ok());
    let mut rng = rand::rngs::StdRng::seed_from_u64(flip_seed);
    let positions = flip_positions(&frame, signed.payload().len(), &mut rng);
    prop_assert!(positions.len() >= 512.min(frame.len() * 8));
    let mut decoded = 0usize;
    for bit in positions {
        let mut flipped = frame.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        let Ok(envelope) = dec.decode_exact::<Signed<T>>(&flipped) else {
            continue;
        };
        decoded += 1;
        prop_assert_ne!(&envelope, &signed, "bit {} changed nothing", bit);
        let by_signer = envelope.verify_by(&signer);
        prop_assert!(
            by_signer.is_err(),
            "bit {} of {}: still verifies as {:?}",
            bit,
            T::DOMAIN,
            by_signer
        );
        if envelope.signer() != &signer {
            // A flipped signer: the signature must not verify under the new key either. (A
            // full check costs a signature verification: sampled when those are slow.)
            if thorough() || rng.gen_ratio(1, 16) {
                prop_assert!(
                    envelope.verify().is_err(),
                    "bit {}: forged signer verifies",
                    bit
                );
            }
        } else {
            prop_assert_eq!(by_signer, Err(VerifyError::BadSignature), "bit {}", bit);
        }
    }
    // The payload, signer and signature flips all decode, so most flips reach verification.
    prop_assert!(decoded > 0);
    Ok(())
}

proptest! {
    #![proptest_config(config(1, 12))]

    #[test]
    fn no_bit_flip_of_a_signed_load_report_verifies(v in load_report(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }

    #[test]
    fn no_bit_flip_of_a_signed_roster_verifies(v in roster(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }

    #[test]
    fn no_bit_flip_of_a_signed_offer_verifies(v in migration_offer(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }

    #[test]
    fn no_bit_flip_of_a_signed_decision_verifies(v in migration_decision(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }

    #[test]
    fn no_bit_flip_of_a_signed_complete_verifies(v in complete(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }

    #[test]
    fn no_bit_flip_of_a_signed_commit_verifies(v in commit(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }

    #[test]
    fn no_bit_flip_of_a_signed_audit_record_verifies(v in audit_record(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }

    #[test]
    fn no_bit_flip_of_a_signed_recover_request_verifies(v in recover_request(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }

    #[test]
    fn no_bit_flip_of_a_signed_recover_answer_verifies(v in recover_answer(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }

    #[test]
    fn no_bit_flip_of_a_signed_data_binding_verifies(v in data_binding(), key in secret_key(), s in any::<u64>()) {
        every_flip_fails(&v, &key, s)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Domain separation
// ---------------------------------------------------------------------------------------------

/// A `B` that signs under `A`'s domain tag. It encodes exactly as `B` does (a newtype is
/// transparent in postcard), so its signed bytes are a valid `B` encoding: the only thing that
/// stops them verifying as a `Signed<B>` is the domain tag.
struct As<A, B>(B, PhantomData<fn() -> A>);

impl<A, B: Serialize> Serialize for As<A, B> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, A, B: Deserialize<'de>> Deserialize<'de> for As<A, B> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        B::deserialize(d).map(|b| As(b, PhantomData))
    }
}

impl<A: Signable, B: Signable> Signable for As<A, B> {
    const DOMAIN: &'static str = A::DOMAIN;

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        B::decode(bytes).map(|b| As(b, PhantomData))
    }
}

/// `b` signed under `A`'s domain: verifies as an `As<A, B>` (control), and as a `Signed<B>`
/// only when the two domains are the same.
fn b_signed_as_a<A, B>(b: &B, key: &SecretKey) -> Result<(), TestCaseError>
where
    A: Signable,
    B: Signable + PartialEq + Debug + Clone,
{
    let wrapped = As::<A, B>(b.clone(), PhantomData);
    let (bytes, signer, sig) = Signed::sign(&wrapped, key).into_parts();
    prop_assert_eq!(&bytes, &codec::encode_payload(b));
    let control = Signed::<As<A, B>>::from_parts(bytes.clone(), signer, sig);
    prop_assert_eq!(control.verify().map(|v| v.0), Ok(b.clone()));
    // Through the wire, as a receiver expecting a B would see it.
    let frame = encode_frame(&Signed::<B>::from_parts(bytes, signer, sig));
    let as_b: Signed<B> = FrameDecoder::default().decode_exact(&frame)?;
    if A::DOMAIN == B::DOMAIN {
        prop_assert_eq!(as_b.verify(), Ok(b.clone()));
    } else {
        prop_assert_eq!(
            as_b.verify(),
            Err(VerifyError::BadSignature),
            "{} signature accepted as {}",
            A::DOMAIN,
            B::DOMAIN
        );
    }
    Ok(())
}

/// A real `A` signed as itself, replayed as a `Signed<B>`: refused before any decoding.
fn a_replayed_as_b<A, B>(a: &A, key: &SecretKey) -> Result<(), TestCaseError>
where
    A: Signable,
    B: Signable + Debug + PartialEq,
{
    let (bytes, signer, sig) = Signed::sign(a, key).into_parts();
    let replayed = Signed::<B>::from_parts(bytes, signer, sig);
    if A::DOMAIN != B::DOMAIN {
        prop_assert_eq!(replayed.verify(), Err(VerifyError::BadSignature));
    }
    Ok(())
}

/// Both checks for signing domain `A` against every `B`.
fn domain_a_against_all<A: Signable>(
    a: &A,
    all: &AllSigned,
    key: &SecretKey,
) -> Result<(), TestCaseError> {
    b_signed_as_a::<A, LoadReport>(&all.report, key)?;
    b_signed_as_a::<A, Roster>(&all.roster, key)?;
    b_signed_as_a::<A, MigrationOffer>(&all.offer, key)?;
    b_signed_as_a::<A, MigrationDecision>(&all.decision, key)?;
    b_signed_as_a::<A, Complete>(&all.complete, key)?;
    b_signed_as_a::<A, Commit>(&all.commit, key)?;
    b_signed_as_a::<A, AuditRecord>(&all.audit, key)?;
    b_signed_as_a::<A, ResolveQuery>(&all.query, key)?;
    b_signed_as_a::<A, ResolveAnswer>(&all.answer, key)?;
    b_signed_as_a::<A, DataBinding>(&all.binding, key)?;
    b_signed_as_a::<A, RecoverRequest>(&all.recover, key)?;
    b_signed_as_a::<A, RecoverAnswer>(&all.recovered, key)?;
    b_signed_as_a::<A, AuditHead>(&all.head, key)?;
    b_signed_as_a::<A, Countersign>(&all.countersign, key)?;
    a_replayed_as_b::<A, LoadReport>(a, key)?;
    a_replayed_as_b::<A, Roster>(a, key)?;
    a_replayed_as_b::<A, MigrationOffer>(a, key)?;
    a_replayed_as_b::<A, MigrationDecision>(a, key)?;
    a_replayed_as_b::<A, Complete>(a, key)?;
    a_replayed_as_b::<A, Commit>(a, key)?;
    a_replayed_as_b::<A, AuditRecord>(a, key)?;
    a_replayed_as_b::<A, ResolveQuery>(a, key)?;
    a_replayed_as_b::<A, ResolveAnswer>(a, key)?;
    a_replayed_as_b::<A, DataBinding>(a, key)?;
    a_replayed_as_b::<A, RecoverRequest>(a, key)?;
    a_replayed_as_b::<A, RecoverAnswer>(a, key)?;
    a_replayed_as_b::<A, AuditHead>(a, key)?;
    a_replayed_as_b::<A, Countersign>(a, key)?;
    Ok(())
}

/// The signed types this file covers, by domain. Must match `signed::DOMAINS` exactly, so a new
/// signed type fails here until it is covered.
const COVERED_DOMAINS: [&str; 14] = [
    LoadReport::DOMAIN,
    Roster::DOMAIN,
    MigrationOffer::DOMAIN,
    MigrationDecision::DOMAIN,
    Complete::DOMAIN,
    Commit::DOMAIN,
    AuditRecord::DOMAIN,
    ResolveQuery::DOMAIN,
    ResolveAnswer::DOMAIN,
    DataBinding::DOMAIN,
    RecoverRequest::DOMAIN,
    RecoverAnswer::DOMAIN,
    AuditHead::DOMAIN,
    Countersign::DOMAIN,
];

#[test]
fn every_signed_type_is_covered_and_domains_are_distinct() {
    let mut covered = COVERED_DOMAINS.to_vec();
    let mut listed = DOMAINS.to_vec();
    covered.sort_unstable();
    listed.sort_unstable();
    assert_eq!(covered, listed);
    covered.dedup();
    assert_eq!(
        covered.len(),
        COVERED_DOMAINS.len(),
        "two types share a domain tag"
    );
    for d in DOMAINS {
        // The length-prefixed tag must fit its one length byte.
        assert!(!d.is_empty() && d.len() < 256, "{d}");
    }
}

proptest! {
    #![proptest_config(config(1, 48))]

    #[test]
    fn a_signature_never_crosses_domains(all in all_signed(), key in secret_key()) {
        domain_a_against_all::<LoadReport>(&all.report, &all, &key)?;
        domain_a_against_all::<Roster>(&all.roster, &all, &key)?;
        domain_a_against_all::<MigrationOffer>(&all.offer, &all, &key)?;
        domain_a_against_all::<MigrationDecision>(&all.decision, &all, &key)?;
        domain_a_against_all::<Complete>(&all.complete, &all, &key)?;
        domain_a_against_all::<Commit>(&all.commit, &all, &key)?;
        domain_a_against_all::<AuditRecord>(&all.audit, &all, &key)?;
        domain_a_against_all::<ResolveQuery>(&all.query, &all, &key)?;
        domain_a_against_all::<ResolveAnswer>(&all.answer, &all, &key)?;
        domain_a_against_all::<DataBinding>(&all.binding, &all, &key)?;
        domain_a_against_all::<RecoverRequest>(&all.recover, &all, &key)?;
        domain_a_against_all::<RecoverAnswer>(&all.recovered, &all, &key)?;
        domain_a_against_all::<AuditHead>(&all.head, &all, &key)?;
        domain_a_against_all::<Countersign>(&all.countersign, &all, &key)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Load report validation
// ---------------------------------------------------------------------------------------------

/// A roster with one host and one observer; `outsider` is not a member.
#[derive(Clone)]
struct Cast {
    host: SecretKey,
    observer: SecretKey,
    outsider: SecretKey,
    roster: Roster,
}

fn cast() -> impl Strategy<Value = Cast> {
    (any::<[u8; 32]>(), any::<[u8; 32]>(), any::<[u8; 32]>())
        .prop_filter("keys must differ", |(a, b, c)| a != b && b != c && a != c)
        .prop_map(|(h, o, x)| {
            let host = SecretKey::from_bytes(&h);
            let observer = SecretKey::from_bytes(&o);
            let outsider = SecretKey::from_bytes(&x);
            let member = |id: NodeId, name: &str, role| Member {
                id,
                name: name.into(),
                roles: vec![role],
                labels: BTreeMap::new(),
                capacity: Capacity::default(),
            };
            let roster = Roster {
                cluster: "lab".into(),
                epoch: 1,
                prev: None,
                not_before: Timestamp(0),
                not_after: Timestamp(u64::MAX),
                members: vec![
                    member(host.public(), "host", Role::Host),
                    member(observer.public(), "observer", Role::Observer),
                ],
                admins: None,
            };
            Cast {
                host,
                observer,
                outsider,
                roster,
            }
        })
}

impl Debug for Cast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cast")
            .field("host", &self.host.public())
            .field("observer", &self.observer.public())
            .field("outsider", &self.outsider.public())
            .finish()
    }
}

/// A report by `node` that passes every check at `now` under `freshness`, with the newest seq
/// already held (below the report's).
fn good_report(
    node: NodeId,
    now: Timestamp,
    freshness: Freshness,
) -> impl Strategy<Value = (LoadReport, Option<u64>)> {
    let age = -(freshness.max_age_ms.min(now.0) as i128)..=freshness.max_skew_ms as i128;
    (
        (1u64..=u64::MAX, age, any::<u64>(), 0..=PERMILLE as u16),
        (
            0..=MAX_MEM_MIB,
            0.0f64..=1.0,
            0..=MAX_POWER_MW,
            any::<bool>(),
        ),
        (
            any::<u32>(),
            0..=MAX_DEMAND_PERMILLE,
            0..=MAX_DEMAND_PERMILLE,
        ),
        prop::option::of(any::<u64>()),
    )
        .prop_map(
            move |(
                (seq, offset, roster_epoch, cpu_permille),
                (mem_total_mib, used_share, power_mw, power_measured),
                (vm_count, vm_demand_permille, reserved_permille),
                newest,
            )| {
                let report = LoadReport {
                    node,
                    seq,
                    issued_at: Timestamp((now.0 as i128 + offset) as u64),
                    roster_epoch,
                    cpu_permille,
                    mem_used_mib: (mem_total_mib as f64 * used_share) as u64,
                    mem_total_mib,
                    power_mw,
                    power_measured,
                    vm_count,
                    vm_demand_permille,
                    reserved_permille,
                    standby: false,
                };
                (report, newest.map(|n| n % seq))
            },
        )
}

/// An edit of a report's frame, given the length of its signed payload.
type FrameEdit = Box<dyn Fn(&mut Vec<u8>, usize)>;

/// One way a report can be wrong.
#[derive(Debug, Clone)]
enum Fault {
    None,
    /// Padded past the size limit to this many bytes.
    Oversized(usize),
    /// Cut to this fraction of its length.
    Truncated(f64),
    /// One junk byte after the frame.
    Trailing(u8),
    /// Another protocol version.
    Version(u8),
    /// A bit of the signature flipped.
    FlipSignature(usize),
    /// A bit of the signed payload flipped.
    FlipPayload(usize),
    /// A bit of the signer flipped.
    FlipSigner(usize),
    /// Signed by a non-member.
    Outsider,
    /// Signed by an observer.
    Observer,
    /// The host signs a report about the observer.
    NotSubject,
    /// The newest seq held is this far at or above the report's.
    Stale(u64),
    /// Issued this much longer ago than allowed.
    TooOld(u64),
    /// Issued this much further ahead than allowed.
    FromFuture(u64),
    /// One field out of its range: which, and a random value used to pick the bad value.
    Range(usize, u64),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        2 => Just(Fault::None),
        1 => (MAX_REPORT_LEN + 1..4 * MAX_REPORT_LEN).prop_map(Fault::Oversized),
        1 => (0.0f64..1.0).prop_map(Fault::Truncated),
        1 => any::<u8>().prop_map(Fault::Trailing),
        1 => any::<u8>().prop_filter("not v1", |v| *v != 1).prop_map(Fault::Version),
        1 => (0usize..512).prop_map(Fault::FlipSignature),
        1 => any::<usize>().prop_map(Fault::FlipPayload),
        1 => (0usize..256).prop_map(Fault::FlipSigner),
        1 => Just(Fault::Outsider),
        1 => Just(Fault::Observer),
        1 => Just(Fault::NotSubject),
        1 => (0u64..1000).prop_map(Fault::Stale),
        1 => (1u64..1 << 40).prop_map(Fault::TooOld),
        1 => (1u64..1 << 40).prop_map(Fault::FromFuture),
        1 => (0usize..7, any::<u64>()).prop_map(|(f, v)| Fault::Range(f, v)),
    ]
}

/// Sets one field of `r` out of range; returns the field's name.
fn break_range(r: &mut LoadReport, which: usize, v: u64) -> &'static str {
    let above = |max: u64| max + 1 + v % (u64::MAX - max);
    match which {
        0 => {
            r.cpu_permille =
                (PERMILLE as u16 + 1) + (v % (u16::MAX - PERMILLE as u16) as u64) as u16;
            "cpu_permille"
        }
        1 => {
            r.mem_total_mib = above(MAX_MEM_MIB);
            "mem_total_mib"
        }
        2 => {
            r.mem_used_mib = above(r.mem_total_mib);
            "mem_used_mib"
        }
        3 => {
            r.power_mw = above(MAX_POWER_MW);
            "power_mw"
        }
        4 => {
            r.vm_demand_permille = above(MAX_DEMAND_PERMILLE as u64).min(u32::MAX as u64) as u32;
            "vm_demand_permille"
        }
        5 => {
            r.reserved_permille = above(MAX_DEMAND_PERMILLE as u64).min(u32::MAX as u64) as u32;
            "reserved_permille"
        }
        _ => {
            r.seq = 0;
            "seq"
        }
    }
}

fn freshness() -> impl Strategy<Value = Freshness> {
    prop_oneof![
        Just(Freshness::default()),
        (0u64..1_000_000, 0u64..1_000_000).prop_map(|(max_age_ms, max_skew_ms)| Freshness {
            max_age_ms,
            max_skew_ms
        }),
    ]
}

/// Everything one validation case needs: keys and roster, the time, a good report with the
/// newest seq held, and the fault to inject.
fn validation_case(
) -> impl Strategy<Value = (Cast, Timestamp, Freshness, (LoadReport, Option<u64>), Fault)> {
    (
        cast(),
        (1u64 << 41..1 << 50).prop_map(Timestamp),
        freshness(),
    )
        .prop_flat_map(|(cast, now, fresh)| {
            let host = cast.host.public();
            (
                Just(cast),
                Just(now),
                Just(fresh),
                good_report(host, now, fresh),
                fault(),
            )
        })
}

proptest! {
    #![proptest_config(config(96, 1024))]

    /// A good report by a roster host is accepted as is; each injected fault is refused with
    /// its own `Rejection`, and only late delivery counts as not misbehaving.
    #[test]
    fn validate_accepts_good_reports_and_names_every_fault(
        (cast, now, freshness, (good, newest), fault) in validation_case()
    ) {
        let ctx = Context { now, roster: &cast.roster, freshness };
        let host = cast.host.public();
        let mut report = good.clone();
        let mut key = &cast.host;
        let mut newest_held = newest;
        let mut edit_frame: Option<FrameEdit> = None;
        let expected: Result<(), Rejection>;
        match fault {
            Fault::None => expected = Ok(()),
            Fault::Oversized(len) => {
                expected = Err(Rejection::Oversized { len, max: MAX_REPORT_LEN });
                edit_frame = Some(Box::new(move |f, _| f.resize(len, 0)));
            }
            Fault::Truncated(share) => {
                // Worked out below, once the frame's length is known.
                expected = Err(Rejection::Malformed(DecodeError::Empty));
                edit_frame = Some(Box::new(move |f, _| {
                    let cut = (f.len() as f64 * share) as usize;
                    f.truncate(cut);
                }));
            }
            Fault::Trailing(b) => {
                expected = Err(Rejection::Malformed(DecodeError::TrailingBytes(1)));
                edit_frame = Some(Box::new(move |f, _| f.push(b)));
            }
            Fault::Version(v) => {
                expected = Err(Rejection::Malformed(DecodeError::Version(v)));
                edit_frame = Some(Box::new(move |f, _| f[4] = v));
            }
            Fault::FlipSignature(bit) => {
                expected = Err(Rejection::BadSignature);
                edit_frame = Some(Box::new(move |f, _| {
                    let at = f.len() - 64 + bit / 8;
                    f[at] ^= 1 << (bit % 8);
                }));
            }
            Fault::FlipPayload(bit) => {
                expected = Err(Rejection::BadSignature);
                edit_frame = Some(Box::new(move |f, payload_len| {
                    let bit = bit % (payload_len * 8);
                    let at = f.len() - 96 - payload_len + bit / 8;
                    f[at] ^= 1 << (bit % 8);
                }));
            }
            Fault::FlipSigner(bit) => {
                // Checked by shape below: the flipped id is not a member.
                expected = Err(Rejection::UnknownSigner(host));
                edit_frame = Some(Box::new(move |f, _| {
                    let at = f.len() - 96 + bit / 8;
                    f[at] ^= 1 << (bit % 8);
                }));
            }
            Fault::Outsider => {
                report.node = cast.outsider.public();
                key = &cast.outsider;
                expected = Err(Rejection::UnknownSigner(cast.outsider.public()));
            }
            Fault::Observer => {
                report.node = cast.observer.public();
                key = &cast.observer;
                expected = Err(Rejection::NotAHost(cast.observer.public()));
            }
            Fault::NotSubject => {
                report.node = cast.observer.public();
                expected = Err(Rejection::SignerNotSubject {
                    signer: host,
                    subject: cast.observer.public(),
                });
            }
            Fault::Stale(ahead) => {
                let n = report.seq.saturating_add(ahead);
                newest_held = Some(n);
                expected = Err(Rejection::Stale { newest: n, got: report.seq });
            }
            Fault::TooOld(extra) => {
                let age_ms = freshness.max_age_ms + extra;
                report.issued_at = Timestamp(now.0 - age_ms);
                expected = Err(Rejection::TooOld { node: host, age_ms });
            }
            Fault::FromFuture(extra) => {
                let ahead_ms = freshness.max_skew_ms + extra;
                report.issued_at = now.plus_millis(ahead_ms);
                expected = Err(Rejection::FromFuture { node: host, ahead_ms });
            }
            Fault::Range(which, v) => {
                let field = break_range(&mut report, which, v);
                expected = Err(Rejection::OutOfRange { field });
            }
        }
        let signed = Signed::sign(&report, key);
        let mut frame = encode_frame(&signed);
        prop_assert!(frame.len() <= MAX_REPORT_LEN, "a report frame is {} bytes", frame.len());
        if let Some(edit) = &edit_frame {
            edit(&mut frame, signed.payload().len());
        }
        let got = report::validate(&frame, &ctx, |id| {
            assert_eq!(id, &host, "seq looked up for someone other than the signer");
            newest_held
        });
        match (&fault, &expected, got) {
            (_, Ok(()), Ok((s, r))) => {
                prop_assert_eq!(&r, &good);
                prop_assert_eq!(&s, &signed);
            }
            (Fault::Truncated(_), _, Err(Rejection::Malformed(DecodeError::Truncated { need, have }))) => {
                prop_assert_eq!(have, frame.len());
                prop_assert_eq!(need, if frame.len() >= 4 { encode_frame(&signed).len() } else { HEADER_LEN });
            }
            (Fault::FlipSigner(_), _, got) => {
                // The flipped signer is either another curve point (not a member) or not a
                // point at all (the envelope does not decode).
                let bytes: [u8; 32] = frame[frame.len() - 96..frame.len() - 64]
                    .try_into()
                    .expect("32 bytes");
                match NodeId::from_bytes(bytes) {
                    Ok(id) => {
                        prop_assert_ne!(id, host);
                        prop_assert_eq!(got.map(|_| ()), Err(Rejection::UnknownSigner(id)));
                    }
                    Err(_) => prop_assert_eq!(
                        got.map(|_| ()),
                        Err(Rejection::Malformed(DecodeError::Malformed(
                            postcard::Error::SerdeDeCustom
                        )))
                    ),
                }
            }
            (_, expected, got) => {
                let got = got.map(|_| ());
                prop_assert_eq!(&got, expected);
                let rejection = got.expect_err("compared with an Err");
                prop_assert!(Rejection::LABELS.contains(&rejection.label()));
                // Late reports, and reports of members this node's roster does not know (a
                // roster change spreading), can come from honest relays: no penalty.
                let honest = matches!(fault, Fault::Stale(_) | Fault::TooOld(_) | Fault::FromFuture(_))
                    || matches!(
                        rejection,
                        Rejection::UnknownSigner(_) | Rejection::NotAHost(_)
                    );
                prop_assert_eq!(rejection.is_misbehaviour(), !honest);
            }
        }
    }
}
