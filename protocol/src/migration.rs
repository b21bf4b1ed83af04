//! Negotiating a migration: a signed offer from the source, a signed decision from the target.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source
//!     participant T as target
//!     S->>T: Signed<MigrationOffer> {id, vm, mode, nonce, expires_at}
//!     Note over T: validate_offer: member, addressed to me, fresh, placement, admission
//!     T->>S: Signed<MigrationDecision> {id, offer = hash(offer), Accept | Reject(reason)}
//!     Note over S,T: on Accept, S opens the transfer stream (see transfer)
//! ```
//!
//! The decision names the offer by hash, so it cannot be replayed against another offer; the
//! offer's random id and nonce and its expiry make it single-use (the target keeps the ids it
//! has seen until they expire).

use serde::{Deserialize, Serialize};

use crate::dataplane::{DataEndpoint, MAX_DATA_CONNECTIONS};
use crate::ids::{Hash, MigrationId, NodeId, VmId};
use crate::roster::{valid_name, Member, Role, Roster};
use crate::signed::{Signable, Signed};
use crate::time::Timestamp;

/// Offers may live at most this long.
pub const MAX_OFFER_TTL_MS: u64 = 60_000;
/// The largest VM an offer may describe (4 TiB); a target's admission bounds it further by
/// its own capacity.
pub const MAX_VM_MEMORY_MIB: u64 = 4 * 1024 * 1024;
/// The most vCPUs an offer may describe.
pub const MAX_VCPUS: u32 = 1024;
/// At most this many entries in each placement list.
pub const MAX_PLACEMENT_ENTRIES: usize = 16;

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Mode {
    /// Rounds of copying while the VM runs, then a short stop-and-copy. The default.
    #[default]
    PreCopy,
    /// Switch over at once; the target pulls pages on demand while the source pushes the rest.
    PostCopy,
    /// Pre-copy rounds, then post-copy for what is left.
    Hybrid,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "precopy" | "pre-copy" => Ok(Mode::PreCopy),
            "postcopy" | "post-copy" => Ok(Mode::PostCopy),
            "hybrid" => Ok(Mode::Hybrid),
            other => Err(format!(
                "unknown mode {other:?} (expected precopy, postcopy or hybrid)"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::PreCopy => "precopy",
            Mode::PostCopy => "postcopy",
            Mode::Hybrid => "hybrid",
        })
    }
}

/// Where a VM may run. Empty lists mean "anywhere".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Placement {
    /// Jurisdictions (roster label `jurisdiction`) the VM may run in.
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_PLACEMENT_ENTRIES>")]
    pub jurisdictions: Vec<String>,
    /// Regions (roster label `region`) the VM may run in.
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_PLACEMENT_ENTRIES>")]
    pub regions: Vec<String>,
    /// VMs of the same anti-affinity group never share a host.
    pub anti_affinity: Option<String>,
}

/// Why a host may not take a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PlacementViolation {
    #[error("host jurisdiction {host:?} is not among the allowed {allowed:?}")]
    Jurisdiction {
        host: Option<String>,
        allowed: Vec<String>,
    },
    #[error("host region {host:?} is not among the allowed {allowed:?}")]
    Region {
        host: Option<String>,
        allowed: Vec<String>,
    },
    #[error("host already runs a VM of anti-affinity group {0:?}")]
    AntiAffinity(String),
    #[error("host is not a roster member with the host role")]
    NotAHost,
}

impl Placement {
    /// Checks the roster-attested labels of `host`; `host_groups` are the anti-affinity groups
    /// of the VMs already on (or reserved for) that host. A host without a label never
    /// satisfies a constraint on that label.
    pub fn allows<'a>(
        &self,
        host: &Member,
        mut host_groups: impl Iterator<Item = &'a str>,
    ) -> Result<(), PlacementViolation> {
        if !host.has_role(Role::Host) {
            return Err(PlacementViolation::NotAHost);
        }
        if !self.jurisdictions.is_empty()
            && !host
                .jurisdiction()
                .is_some_and(|j| self.jurisdictions.iter().any(|a| a == j))
        {
            return Err(PlacementViolation::Jurisdiction {
                host: host.jurisdiction().map(str::to_string),
                allowed: self.jurisdictions.clone(),
            });
        }
        if !self.regions.is_empty()
            && !host
                .region()
                .is_some_and(|r| self.regions.iter().any(|a| a == r))
        {
            return Err(PlacementViolation::Region {
                host: host.region().map(str::to_string),
                allowed: self.regions.clone(),
            });
        }
        if let Some(group) = &self.anti_affinity {
            if host_groups.any(|g| g == group) {
                return Err(PlacementViolation::AntiAffinity(group.clone()));
            }
        }
        Ok(())
    }

    fn well_formed(&self) -> bool {
        self.jurisdictions.len() <= MAX_PLACEMENT_ENTRIES
            && self.regions.len() <= MAX_PLACEMENT_ENTRIES
            && self.jurisdictions.iter().all(|s| valid_name(s))
            && self.regions.iter().all(|s| valid_name(s))
            && self.anti_affinity.as_deref().is_none_or(valid_name)
    }
}

/// What the target needs to know about the VM to decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    pub id: VmId,
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// CPU demand, permille of the source host's capacity.
    pub demand_permille: u32,
    pub placement: Placement,
    /// A QEMU VM: how the target starts the QEMU that receives it. `None`: a sandbox VM.
    pub qemu: Option<QemuVm>,
}

/// Most extra QEMU arguments in an offer.
pub const MAX_QEMU_ARGS: usize = 64;
/// Longest path, command line or argument in a [`QemuVm`].
pub const MAX_QEMU_TEXT: usize = 4096;
/// Most multifd channels of a QEMU migration.
pub const MAX_MULTIFD_CHANNELS: u32 = 16;

/// A QEMU VM's machine, as the target must recreate it to receive the migration. Paths name
/// files that must exist on the target (shared or identical images).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVm {
    pub kernel: String,
    pub initrd: Option<String>,
    pub append: String,
    pub disk: Option<String>,
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_QEMU_ARGS>")]
    pub extra_args: Vec<String>,
    /// Parallel migration channels (multifd); 0 is one stream.
    pub multifd_channels: u32,
}

impl QemuVm {
    fn well_formed(&self) -> bool {
        let text_ok = |t: &str| t.len() <= MAX_QEMU_TEXT && !t.contains('\0');
        let path_ok = |p: &str| text_ok(p) && p.starts_with('/');
        path_ok(&self.kernel)
            && self.initrd.as_deref().is_none_or(path_ok)
            && self.disk.as_deref().is_none_or(path_ok)
            && text_ok(&self.append)
            && self.extra_args.len() <= MAX_QEMU_ARGS
            && self.extra_args.iter().all(|a| text_ok(a))
            && self.multifd_channels <= MAX_MULTIFD_CHANNELS
    }
}

/// A source's signed proposal to move one VM to one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationOffer {
    pub id: MigrationId,
    pub source: NodeId,
    pub target: NodeId,
    pub vm: VmSummary,
    pub mode: Mode,
    /// Random; with `id` makes every offer unique.
    pub nonce: [u8; 16],
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub roster_epoch: u64,
    /// Data connections the source would use for this migration (see [`crate::dataplane`]);
    /// 0: it moves the VM on the migration stream itself.
    pub data_connections: u32,
}

impl Signable for MigrationOffer {
    const DOMAIN: &'static str = "drift/migration-offer/v2";
}

/// Why a target refuses an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RejectReason {
    #[error("offer is malformed or its signature does not verify")]
    BadOffer,
    #[error("source is not a roster member with the host role")]
    NotAMember,
    #[error("offer is addressed to another node")]
    NotForMe,
    #[error("offer was signed by someone other than its source")]
    WrongSigner,
    #[error("offer has expired or is not valid yet")]
    Expired,
    #[error("offer was seen before")]
    Replayed,
    #[error("offer is for roster epoch {offer}, this node is at {mine}")]
    EpochMismatch { offer: u64, mine: u64 },
    // Not `#[from]`: a source would be printed a second time by `{:#}`.
    #[error("placement: {0}")]
    Placement(PlacementViolation),
    #[error("too many migrations in progress")]
    Busy,
    #[error("too many offers from this source; try later")]
    RateLimited,
    #[error("not enough capacity")]
    NoCapacity,
    #[error("VM is already here")]
    AlreadyHere,
    #[error("this source holds its share of the incoming slots already")]
    SourceShare,
    #[error("this source's recent migrations stalled or broke the protocol; it is backed off")]
    BackedOff,
    #[error("this host is draining its VMs to consolidate: it takes none")]
    Draining,
}

impl From<PlacementViolation> for RejectReason {
    fn from(v: PlacementViolation) -> Self {
        RejectReason::Placement(v)
    }
}

impl RejectReason {
    /// A stable, short label for counters, the API and the audit log.
    pub fn label(&self) -> &'static str {
        match self {
            RejectReason::BadOffer => "bad_offer",
            RejectReason::NotAMember => "not_a_member",
            RejectReason::NotForMe => "not_for_me",
            RejectReason::WrongSigner => "wrong_signer",
            RejectReason::Expired => "expired",
            RejectReason::Replayed => "replayed",
            RejectReason::EpochMismatch { .. } => "epoch_mismatch",
            RejectReason::Placement(_) => "placement",
            RejectReason::Busy => "busy",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::NoCapacity => "no_capacity",
            RejectReason::AlreadyHere => "already_here",
            RejectReason::SourceShare => "source_share",
            RejectReason::BackedOff => "backed_off",
            RejectReason::Draining => "draining",
        }
    }
}

/// The target's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Capacity is reserved until `reserved_until`; the transfer must start before then.
    /// `data`: where the target takes the migration's data connections (`None`: on the
    /// migration stream only).
    Accept {
        reserved_until: Timestamp,
        data: Option<DataEndpoint>,
    },
    Reject(RejectReason),
}

/// The target's signed decision on one offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationDecision {
    pub id: MigrationId,
    /// Hash of the `Signed<MigrationOffer>` this answers.
    pub offer: Hash,
    pub source: NodeId,
    pub target: NodeId,
    pub verdict: Verdict,
    pub issued_at: Timestamp,
}

impl Signable for MigrationDecision {
    const DOMAIN: &'static str = "drift/migration-decision/v2";
}

/// What the target checks on an offer before admission control (which needs the node's live
/// state): signature, signer = source, roster membership and roles, addressing, epoch, time,
/// bounds and placement against the target's own roster entry. Replay is checked by the
/// caller's cache of seen ids.
pub fn validate_offer(
    signed: &Signed<MigrationOffer>,
    me: &NodeId,
    roster: &Roster,
    now: Timestamp,
) -> Result<MigrationOffer, RejectReason> {
    // Membership first: a stranger's offer costs no signature check and no decoding.
    if !roster
        .member(signed.signer())
        .is_some_and(|m| m.has_role(Role::Host))
    {
        return Err(RejectReason::NotAMember);
    }
    let offer = signed.verify().map_err(|_| RejectReason::BadOffer)?;
    if signed.signer() != &offer.source {
        return Err(RejectReason::WrongSigner);
    }
    if &offer.target != me {
        return Err(RejectReason::NotForMe);
    }
    if offer.source == offer.target {
        return Err(RejectReason::BadOffer);
    }
    if offer.roster_epoch != roster.epoch {
        return Err(RejectReason::EpochMismatch {
            offer: offer.roster_epoch,
            mine: roster.epoch,
        });
    }
    if now >= offer.expires_at
        || offer.expires_at.millis_since(offer.issued_at) > MAX_OFFER_TTL_MS
        || offer.issued_at > now.plus_millis(MAX_OFFER_TTL_MS)
    {
        return Err(RejectReason::Expired);
    }
    if !valid_name(&offer.vm.name)
        || !offer.vm.placement.well_formed()
        || offer.vm.memory_mib == 0
        || offer.vm.memory_mib > MAX_VM_MEMORY_MIB
        || offer.vm.vcpus == 0
        || offer.vm.vcpus > MAX_VCPUS
        || offer.vm.demand_permille > crate::report::MAX_DEMAND_PERMILLE
        || !offer.vm.qemu.as_ref().is_none_or(QemuVm::well_formed)
        || offer.data_connections > MAX_DATA_CONNECTIONS
    {
        return Err(RejectReason::BadOffer);
    }
    let host = roster.member(me).ok_or(RejectReason::NotAMember)?;
    offer.vm.placement.allows(host, std::iter::empty())?;
    Ok(offer)
}

/// What the source checks on a decision: signed by the offer's target, for this offer, granting
/// no more data connections than the offer asked for.
pub fn validate_decision(
    signed: &Signed<MigrationDecision>,
    offer: &Signed<MigrationOffer>,
    offer_value: &MigrationOffer,
) -> Result<MigrationDecision, RejectReason> {
    let decision = signed
        .verify_by(&offer_value.target)
        .map_err(|_| RejectReason::BadOffer)?;
    if decision.offer != offer.hash()
        || decision.id != offer_value.id
        || decision.source != offer_value.source
        || decision.target != offer_value.target
    {
        return Err(RejectReason::BadOffer);
    }
    if let Verdict::Accept {
        data: Some(endpoint),
        ..
    } = &decision.verdict
    {
        if !endpoint.well_formed() || endpoint.connections > offer_value.data_connections {
            return Err(RejectReason::BadOffer);
        }
    }
    Ok(decision)
}

/// After losing contact in the window where it cannot tell whether the target committed, the
/// source asks the target what became of the migration. The VM stays paused at the source
/// until an answer arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolveQuery {
    pub id: MigrationId,
    pub source: NodeId,
    pub target: NodeId,
    pub asked_at: Timestamp,
}

impl Signable for ResolveQuery {
    const DOMAIN: &'static str = "drift/resolve-query/v1";
}

/// What became of a migration, as its target knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResolveOutcome {
    /// The target verified the memory, durably recorded the commit and runs the VM: the source
    /// destroys its copy.
    Committed { root: Hash },
    /// The VM never ran on the target and never will under this migration id (the transfer
    /// ended, the incoming copy is discarded): the source resumes the VM.
    NeverRan,
    /// Post-copy: the VM runs on the target but not every page arrived. The source must not
    /// resume its copy (the guest ran on past it).
    RunningIncomplete,
    /// The target is still working on this migration: ask again later.
    InProgress,
}

impl ResolveOutcome {
    /// A stable, short label.
    pub fn label(&self) -> &'static str {
        match self {
            ResolveOutcome::Committed { .. } => "committed",
            ResolveOutcome::NeverRan => "never_ran",
            ResolveOutcome::RunningIncomplete => "running_incomplete",
            ResolveOutcome::InProgress => "in_progress",
        }
    }
}

/// The target's signed answer to a [`ResolveQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolveAnswer {
    pub id: MigrationId,
    /// Hash of the `Signed<ResolveQuery>` this answers.
    pub query: Hash,
    pub source: NodeId,
    pub target: NodeId,
    pub outcome: ResolveOutcome,
    pub answered_at: Timestamp,
}

impl Signable for ResolveAnswer {
    const DOMAIN: &'static str = "drift/resolve-answer/v1";
}

/// Why a resolve query or answer is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("signature does not verify or the payload is malformed")]
    BadSignature,
    #[error("signed by someone other than the party it names")]
    WrongSigner,
    #[error("addressed to another node")]
    NotForMe,
    #[error("does not answer this query")]
    Mismatch,
}

/// What the target checks on a query that arrived from `peer` (the stream's authenticated
/// peer): signed by that peer, naming it as the source and this node as the target.
pub fn validate_resolve_query(
    signed: &Signed<ResolveQuery>,
    peer: &NodeId,
    me: &NodeId,
) -> Result<ResolveQuery, ResolveError> {
    let query = signed
        .verify_by(peer)
        .map_err(|_| ResolveError::WrongSigner)?;
    if &query.source != peer {
        return Err(ResolveError::WrongSigner);
    }
    if &query.target != me {
        return Err(ResolveError::NotForMe);
    }
    Ok(query)
}

/// What the source checks on an answer: signed by the query's target, for this query.
pub fn validate_resolve_answer(
    signed: &Signed<ResolveAnswer>,
    query: &Signed<ResolveQuery>,
    query_value: &ResolveQuery,
) -> Result<ResolveAnswer, ResolveError> {
    let answer = signed
        .verify_by(&query_value.target)
        .map_err(|_| ResolveError::WrongSigner)?;
    if answer.query != query.hash()
        || answer.id != query_value.id
        || answer.source != query_value.source
        || answer.target != query_value.target
    {
        return Err(ResolveError::Mismatch);
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::roster::Capacity;
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    fn host(id: NodeId, name: &str, jurisdiction: &str) -> Member {
        Member {
            id,
            name: name.into(),
            roles: vec![Role::Host],
            labels: BTreeMap::from([("jurisdiction".into(), jurisdiction.into())]),
            capacity: Capacity::default(),
        }
    }

    #[test]
    fn offer_checks_and_decision_binding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let src = SecretKey::generate(&mut rng);
        let dst = SecretKey::generate(&mut rng);
        let eve = SecretKey::generate(&mut rng);
        let roster = Roster {
            cluster: "c".into(),
            epoch: 3,
            prev: Some(Hash::ZERO),
            not_before: Timestamp(0),
            not_after: Timestamp(u64::MAX),
            members: vec![
                host(src.public(), "src", "de"),
                host(dst.public(), "dst", "fr"),
            ],
            admins: None,
        };
        let offer = MigrationOffer {
            id: MigrationId::random(&mut rng),
            source: src.public(),
            target: dst.public(),
            vm: VmSummary {
                id: VmId::random(&mut rng),
                name: "web-1".into(),
                memory_mib: 512,
                vcpus: 1,
                demand_permille: 100,
                placement: Placement::default(),
                qemu: None,
            },
            mode: Mode::PreCopy,
            nonce: [1; 16],
            issued_at: Timestamp(1000),
            expires_at: Timestamp(11_000),
            roster_epoch: 3,
            data_connections: 2,
        };
        let signed = Signed::sign(&offer, &src);
        let now = Timestamp(2000);
        assert_eq!(
            validate_offer(&signed, &dst.public(), &roster, now),
            Ok(offer.clone())
        );
        assert_eq!(
            validate_offer(&signed, &src.public(), &roster, now),
            Err(RejectReason::NotForMe)
        );
        assert_eq!(
            validate_offer(&signed, &dst.public(), &roster, Timestamp(11_000)),
            Err(RejectReason::Expired)
        );
        // A stranger's offer is refused before its signature is even checked.
        let by_eve = Signed::sign(&offer, &eve);
        assert_eq!(
            validate_offer(&by_eve, &dst.public(), &roster, now),
            Err(RejectReason::NotAMember)
        );
        // A member signing an offer in another member's name.
        let by_dst = Signed::sign(&offer, &dst);
        assert_eq!(
            validate_offer(&by_dst, &dst.public(), &roster, now),
            Err(RejectReason::WrongSigner)
        );
        let mut de_only = offer.clone();
        de_only.vm.placement.jurisdictions = vec!["de".into()];
        assert!(matches!(
            validate_offer(&Signed::sign(&de_only, &src), &dst.public(), &roster, now),
            Err(RejectReason::Placement(
                PlacementViolation::Jurisdiction { .. }
            ))
        ));
        // Absurd sizes are refused before they reach any arithmetic or allocation.
        for (mem, vcpus) in [(u64::MAX, 1), (0, 1), (512, 0), (512, u32::MAX)] {
            let mut huge = offer.clone();
            huge.vm.memory_mib = mem;
            huge.vm.vcpus = vcpus;
            assert_eq!(
                validate_offer(&Signed::sign(&huge, &src), &dst.public(), &roster, now),
                Err(RejectReason::BadOffer)
            );
        }
        let mut old_epoch = offer.clone();
        old_epoch.roster_epoch = 2;
        assert_eq!(
            validate_offer(&Signed::sign(&old_epoch, &src), &dst.public(), &roster, now),
            Err(RejectReason::EpochMismatch { offer: 2, mine: 3 })
        );

        let decision = MigrationDecision {
            id: offer.id,
            offer: signed.hash(),
            source: src.public(),
            target: dst.public(),
            verdict: Verdict::Accept {
                reserved_until: Timestamp(20_000),
                data: Some(DataEndpoint {
                    port: 7401,
                    addrs: vec![],
                    connections: 2,
                }),
            },
            issued_at: now,
        };
        let d = Signed::sign(&decision, &dst);
        assert_eq!(validate_decision(&d, &signed, &offer), Ok(decision.clone()));
        // More data connections than the offer asked for.
        let mut greedy = decision.clone();
        greedy.verdict = Verdict::Accept {
            reserved_until: Timestamp(20_000),
            data: Some(DataEndpoint {
                port: 7401,
                addrs: vec![],
                connections: 3,
            }),
        };
        assert_eq!(
            validate_decision(&Signed::sign(&greedy, &dst), &signed, &offer),
            Err(RejectReason::BadOffer)
        );
        let mut too_many = offer.clone();
        too_many.data_connections = MAX_DATA_CONNECTIONS + 1;
        assert_eq!(
            validate_offer(&Signed::sign(&too_many, &src), &dst.public(), &roster, now),
            Err(RejectReason::BadOffer)
        );
        assert_eq!(
            validate_decision(&Signed::sign(&decision, &eve), &signed, &offer),
            Err(RejectReason::BadOffer)
        );
        let other_offer = Signed::sign(&de_only, &src);
        assert_eq!(
            validate_decision(&d, &other_offer, &de_only),
            Err(RejectReason::BadOffer)
        );
    }

    #[test]
    fn anti_affinity_and_unlabelled_hosts() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut m = host(SecretKey::generate(&mut rng).public(), "h", "de");
        let p = Placement {
            jurisdictions: vec![],
            regions: vec!["eu-west".into()],
            anti_affinity: Some("db".into()),
        };
        assert!(matches!(
            p.allows(&m, std::iter::empty()),
            Err(PlacementViolation::Region { host: None, .. })
        ));
        m.labels.insert("region".into(), "eu-west".into());
        assert_eq!(p.allows(&m, ["web"].into_iter()), Ok(()));
        assert_eq!(
            p.allows(&m, ["web", "db"].into_iter()),
            Err(PlacementViolation::AntiAffinity("db".into()))
        );
    }

    #[test]
    fn resolve_queries_and_answers_are_bound_to_both_peers() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let src = SecretKey::generate(&mut rng);
        let dst = SecretKey::generate(&mut rng);
        let eve = SecretKey::generate(&mut rng);
        let query = ResolveQuery {
            id: MigrationId::from_bytes([3; 16]),
            source: src.public(),
            target: dst.public(),
            asked_at: Timestamp(5),
        };
        let signed = Signed::sign(&query, &src);
        assert_eq!(
            validate_resolve_query(&signed, &src.public(), &dst.public()),
            Ok(query.clone())
        );
        // Relayed by another peer, addressed elsewhere, or naming someone else as source.
        assert_eq!(
            validate_resolve_query(&signed, &eve.public(), &dst.public()),
            Err(ResolveError::WrongSigner)
        );
        assert_eq!(
            validate_resolve_query(&signed, &src.public(), &eve.public()),
            Err(ResolveError::NotForMe)
        );
        let claims_other = Signed::sign(
            &ResolveQuery {
                source: eve.public(),
                ..query.clone()
            },
            &src,
        );
        assert_eq!(
            validate_resolve_query(&claims_other, &src.public(), &dst.public()),
            Err(ResolveError::WrongSigner)
        );

        let answer = ResolveAnswer {
            id: query.id,
            query: signed.hash(),
            source: src.public(),
            target: dst.public(),
            outcome: ResolveOutcome::Committed {
                root: Hash::of(b"root"),
            },
            answered_at: Timestamp(6),
        };
        let good = Signed::sign(&answer, &dst);
        assert_eq!(
            validate_resolve_answer(&good, &signed, &query),
            Ok(answer.clone())
        );
        // Only the target may answer, and only this query.
        let forged = Signed::sign(&answer, &eve);
        assert_eq!(
            validate_resolve_answer(&forged, &signed, &query),
            Err(ResolveError::WrongSigner)
        );
        let other_query = Signed::sign(
            &ResolveQuery {
                asked_at: Timestamp(9),
                ..query.clone()
            },
            &src,
        );
        assert_eq!(
            validate_resolve_answer(&good, &other_query, &query),
            Err(ResolveError::Mismatch)
        );
    }
}
