//! The roster: the admin-signed list of cluster members.
//!
//! The cluster admin key (kept offline) signs each roster. A roster names the cluster, an
//! epoch, a validity window and the members, each with a node id, a unique name, roles, labels
//! (`region`, `jurisdiction`, ...) and capacity. Labels are attested by the admin, never
//! reported by the node itself. Epochs form a chain: a roster of epoch `e + 1` carries the hash
//! of the signed roster of epoch `e`, and replaces it on every node.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Epoch1: admin signs (prev = none)
//!     Epoch1 --> Epoch2: admin signs (prev = hash(Epoch1))
//!     Epoch2 --> Epoch3: admin signs (prev = hash(Epoch2))
//! ```

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::ids::{Hash, NodeId};
use crate::signed::{Signable, Signed, VerifyError};
use crate::time::Timestamp;

/// At most this many members in one roster.
pub const MAX_MEMBERS: usize = 4096;
/// At most this many roles per member.
pub const MAX_ROLES: usize = 4;
/// At most this many labels per member.
pub const MAX_LABELS: usize = 32;
/// Names, label keys and values, and the cluster name are at most this long.
pub const MAX_NAME_LEN: usize = 64;

/// The label key of a member's region.
pub const LABEL_REGION: &str = "region";
/// The label key of a member's jurisdiction.
pub const LABEL_JURISDICTION: &str = "jurisdiction";

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Runs VMs: may send and receive migrations, and reports load.
    Host,
    /// Takes part in gossip and may be queried, but hosts no VMs.
    Observer,
}

impl std::str::FromStr for Role {
    type Err = RosterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Role::Host),
            "observer" => Ok(Role::Observer),
            other => Err(RosterError::UnknownRole(other.to_string())),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Host => "host",
            Role::Observer => "observer",
        })
    }
}

/// A host's capacity as attested by the admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Capacity {
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub mem_mib: u64,
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    /// Unique, human-readable name (`[A-Za-z0-9._-]`, at most 64 characters).
    pub name: String,
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_ROLES>")]
    pub roles: Vec<Role>,
    #[serde(deserialize_with = "crate::bounded::map::<_, _, _, MAX_LABELS>")]
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
}

impl Member {
    /// Whether the member has `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The `jurisdiction` label, if any.
    pub fn jurisdiction(&self) -> Option<&str> {
        self.labels.get(LABEL_JURISDICTION).map(String::as_str)
    }

    /// The `region` label, if any.
    pub fn region(&self) -> Option<&str> {
        self.labels.get(LABEL_REGION).map(String::as_str)
    }
}

/// The membership of a cluster at one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    pub cluster: String,
    /// Starts at 1 and grows by one with each new roster.
    pub epoch: u64,
    /// The hash of the signed roster of the previous epoch; `None` only at epoch 1.
    pub prev: Option<Hash>,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_MEMBERS>")]
    pub members: Vec<Member>,
}

/// The leading fields of an encoded [`Roster`]: enough to skip an epoch already held without
/// decoding (or verifying) the rest.
#[derive(Deserialize)]
struct RosterHead {
    #[allow(dead_code)]
    cluster: String,
    epoch: u64,
}

impl Signable for Roster {
    const DOMAIN: &'static str = "drift/roster/v1";
}

/// Why a roster was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RosterError {
    #[error(transparent)]
    Signature(#[from] VerifyError),
    #[error("epoch must be at least 1")]
    ZeroEpoch,
    #[error("epoch 1 must not link to a previous roster, and later epochs must")]
    BadLink,
    #[error("validity window is empty (not_before {not_before:?} >= not_after {not_after:?})")]
    EmptyWindow {
        not_before: Timestamp,
        not_after: Timestamp,
    },
    #[error("roster is not valid yet (from {0})")]
    NotYetValid(Timestamp),
    #[error("roster expired at {0}")]
    Expired(Timestamp),
    #[error("{count} members exceed the limit of {MAX_MEMBERS}")]
    TooManyMembers { count: usize },
    #[error("node {0:?} is listed twice")]
    DuplicateId(NodeId),
    #[error("name {0:?} is used twice")]
    DuplicateName(String),
    #[error("invalid name {0:?}: use 1 to 64 of [A-Za-z0-9._-]")]
    BadName(String),
    #[error("member {member:?} has {count} labels, more than {MAX_LABELS}")]
    TooManyLabels { member: String, count: usize },
    #[error("member {0:?} has no role")]
    NoRole(String),
    #[error("unknown role {0:?} (expected host or observer)")]
    UnknownRole(String),
    #[error("cluster {got:?} is not this node's cluster {expected:?}")]
    WrongCluster { expected: String, got: String },
    #[error("epoch {got} does not follow epoch {current}")]
    NotNext { current: u64, got: u64 },
    #[error(
        "epoch {got} links to {link:?}, but the roster of epoch {current} hashes to {expected:?}"
    )]
    ChainMismatch {
        current: u64,
        got: u64,
        link: Option<Hash>,
        expected: Hash,
    },
}

/// Whether `s` is a valid member, cluster or label name.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Roster {
    /// The member with this id.
    pub fn member(&self, id: &NodeId) -> Option<&Member> {
        self.members.iter().find(|m| &m.id == id)
    }

    /// The member with this name.
    pub fn member_by_name(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Structural checks that need no signature and no clock.
    pub fn check(&self) -> Result<(), RosterError> {
        if self.epoch == 0 {
            return Err(RosterError::ZeroEpoch);
        }
        if (self.epoch == 1) != self.prev.is_none() {
            return Err(RosterError::BadLink);
        }
        if !valid_name(&self.cluster) {
            return Err(RosterError::BadName(self.cluster.clone()));
        }
        if self.not_before >= self.not_after {
            return Err(RosterError::EmptyWindow {
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        if self.members.len() > MAX_MEMBERS {
            return Err(RosterError::TooManyMembers {
                count: self.members.len(),
            });
        }
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for m in &self.members {
            if !ids.insert(m.id) {
                return Err(RosterError::DuplicateId(m.id));
            }
            if !valid_name(&m.name) {
                return Err(RosterError::BadName(m.name.clone()));
            }
            if !names.insert(m.name.as_str()) {
                return Err(RosterError::DuplicateName(m.name.clone()));
            }
            if m.roles.is_empty() {
                return Err(RosterError::NoRole(m.name.clone()));
            }
            if m.labels.len() > MAX_LABELS {
                return Err(RosterError::TooManyLabels {
                    member: m.name.clone(),
                    count: m.labels.len(),
                });
            }
            for (k, v) in &m.labels {
                if !valid_name(k) {
                    return Err(RosterError::BadName(k.clone()));
                }
                if !valid_name(v) {
                    return Err(RosterError::BadName(v.clone()));
                }
            }
        }
        Ok(())
    }

    /// Whether `now` is inside the validity window.
    pub fn check_time(&self, now: Timestamp) -> Result<(), RosterError> {
        if now < self.not_before {
            return Err(RosterError::NotYetValid(self.not_before));
        }
        if now >= self.not_after {
            return Err(RosterError::Expired(self.not_after));
        }
        Ok(())
    }
}

/// Verifies a signed roster against the admin key: signature, signer, structure, and (when
/// `now` is given) the validity window.
pub fn verify(
    signed: &Signed<Roster>,
    admin: &NodeId,
    now: Option<Timestamp>,
) -> Result<Roster, RosterError> {
    let roster = signed.verify_by(admin)?;
    roster.check()?;
    if let Some(now) = now {
        roster.check_time(now)?;
    }
    Ok(roster)
}

/// Verifies that `next` may replace `current` (already verified): same cluster, the next epoch,
/// linked to `current` by hash, signed by the admin, valid at `now`.
pub fn verify_successor(
    current: &Signed<Roster>,
    current_roster: &Roster,
    next: &Signed<Roster>,
    admin: &NodeId,
    now: Timestamp,
) -> Result<Roster, RosterError> {
    let roster = verify(next, admin, Some(now))?;
    if roster.cluster != current_roster.cluster {
        return Err(RosterError::WrongCluster {
            expected: current_roster.cluster.clone(),
            got: roster.cluster,
        });
    }
    if roster.epoch != current_roster.epoch + 1 {
        return Err(RosterError::NotNext {
            current: current_roster.epoch,
            got: roster.epoch,
        });
    }
    let expected = current.hash();
    if roster.prev != Some(expected) {
        return Err(RosterError::ChainMismatch {
            current: current_roster.epoch,
            got: roster.epoch,
            link: roster.prev,
            expected,
        });
    }
    Ok(roster)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use rand::SeedableRng;

    fn member(rng: &mut rand::rngs::StdRng, name: &str) -> Member {
        Member {
            id: SecretKey::generate(rng).public(),
            name: name.into(),
            roles: vec![Role::Host],
            labels: BTreeMap::from([("jurisdiction".into(), "de".into())]),
            capacity: Capacity {
                cpus: 8,
                mem_mib: 16384,
            },
        }
    }

    fn roster(rng: &mut rand::rngs::StdRng) -> Roster {
        Roster {
            cluster: "lab".into(),
            epoch: 1,
            prev: None,
            not_before: Timestamp(1000),
            not_after: Timestamp(10_000),
            members: vec![member(rng, "a"), member(rng, "b")],
        }
    }

    #[test]
    fn verify_checks_signer_structure_and_time() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let admin = SecretKey::generate(&mut rng);
        let other = SecretKey::generate(&mut rng);
        let r = roster(&mut rng);
        let signed = Signed::sign(&r, &admin);
        assert_eq!(
            verify(&signed, &admin.public(), Some(Timestamp(2000))),
            Ok(r.clone())
        );
        assert!(matches!(
            verify(&signed, &other.public(), None),
            Err(RosterError::Signature(VerifyError::WrongSigner { .. }))
        ));
        assert_eq!(
            verify(&signed, &admin.public(), Some(Timestamp(10_000))),
            Err(RosterError::Expired(Timestamp(10_000)))
        );
        assert_eq!(
            verify(&signed, &admin.public(), Some(Timestamp(5))),
            Err(RosterError::NotYetValid(Timestamp(1000)))
        );
        let mut dup = r.clone();
        dup.members[1].name = "a".into();
        assert_eq!(
            verify(&Signed::sign(&dup, &admin), &admin.public(), None),
            Err(RosterError::DuplicateName("a".into()))
        );
        let mut bad = r.clone();
        bad.members[0].name = "no spaces".into();
        assert!(matches!(bad.check(), Err(RosterError::BadName(_))));
        let mut linked = r;
        linked.prev = Some(Hash::ZERO);
        assert_eq!(linked.check(), Err(RosterError::BadLink));
    }

    #[test]
    fn advance_walks_a_chain_and_stops_at_a_bad_link() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let admin = SecretKey::generate(&mut rng);
        let mut chain = vec![];
        let mut r = roster(&mut rng);
        let mut prev: Option<Signed<Roster>> = None;
        for epoch in 1..=4 {
            r.epoch = epoch;
            r.prev = prev.as_ref().map(|p| p.hash());
            let s = Signed::sign(&r, &admin);
            chain.push((s.clone(), r.clone()));
            prev = Some(s);
        }
        let signed: Vec<_> = chain.iter().map(|(s, _)| s.clone()).collect();
        let now = Timestamp(2000);
        let (s1, r1) = &chain[0];
        let walked = advance(s1, r1, &signed, &admin.public(), now).unwrap();
        let epochs: Vec<u64> = walked.iter().map(|(_, r)| r.epoch).collect();
        assert_eq!(epochs, vec![2, 3, 4]);
        assert_eq!(walked[2].0, signed[3]);
        assert_eq!(
            advance(&signed[3], &chain[3].1, &signed, &admin.public(), now),
            Ok(vec![])
        );
        // A gap (epoch 2 missing) cannot be crossed.
        let gap = vec![signed[2].clone(), signed[3].clone()];
        assert!(matches!(
            advance(s1, r1, &gap, &admin.public(), now),
            Err(RosterError::NotNext { current: 1, got: 3 })
        ));
        // A roster signed by someone else is refused.
        let eve = SecretKey::generate(&mut rng);
        let mut forged = chain[1].1.clone();
        forged.members.clear();
        let forged = vec![Signed::sign(&forged, &eve)];
        assert!(matches!(
            advance(s1, r1, &forged, &admin.public(), now),
            Err(RosterError::Signature(_))
        ));
    }

    #[test]
    fn successor_must_link_to_current() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let admin = SecretKey::generate(&mut rng);
        let r1 = roster(&mut rng);
        let s1 = Signed::sign(&r1, &admin);
        let mut r2 = r1.clone();
        r2.epoch = 2;
        r2.prev = Some(s1.hash());
        r2.members.pop();
        let s2 = Signed::sign(&r2, &admin);
        let now = Timestamp(2000);
        assert_eq!(
            verify_successor(&s1, &r1, &s2, &admin.public(), now),
            Ok(r2.clone())
        );
        let mut forked = r2.clone();
        forked.prev = Some(Hash::of(b"another history"));
        assert!(matches!(
            verify_successor(
                &s1,
                &r1,
                &Signed::sign(&forked, &admin),
                &admin.public(),
                now
            ),
            Err(RosterError::ChainMismatch { .. })
        ));
        let mut skip = r2.clone();
        skip.epoch = 3;
        assert_eq!(
            verify_successor(&s1, &r1, &Signed::sign(&skip, &admin), &admin.public(), now),
            Err(RosterError::NotNext { current: 1, got: 3 })
        );
        let mut other_cluster = r2;
        other_cluster.cluster = "prod".into();
        assert!(matches!(
            verify_successor(
                &s1,
                &r1,
                &Signed::sign(&other_cluster, &admin),
                &admin.public(),
                now
            ),
            Err(RosterError::WrongCluster { .. })
        ));
    }
}

/// How many consecutive epochs a roster announcement carries at most.
pub const MAX_ANNOUNCED_EPOCHS: usize = 8;

/// What nodes gossip about membership: the newest signed rosters they hold, oldest first, in
/// consecutive epochs, so a node a few epochs behind can walk the chain forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_ANNOUNCED_EPOCHS>")]
    pub chain: Vec<Signed<Roster>>,
}

/// Walks `chain` forward from `current` and returns the verified successors it crossed, in
/// epoch order (empty when nothing in `chain` is newer); the last is the new head. Entries at
/// or below the current epoch are skipped unverified; the first entry that should link but does
/// not is an error.
pub fn advance(
    current: &Signed<Roster>,
    current_roster: &Roster,
    chain: &[Signed<Roster>],
    admin: &NodeId,
    now: Timestamp,
) -> Result<Vec<(Signed<Roster>, Roster)>, RosterError> {
    let mut walked: Vec<(Signed<Roster>, Roster)> = Vec::new();
    for next in chain.iter().take(MAX_ANNOUNCED_EPOCHS) {
        let (cur_signed, cur_roster) = match walked.last() {
            Some((s, r)) => (s, r),
            None => (current, current_roster),
        };
        // Cheap skip of epochs already held: read only the epoch, verify nothing.
        let Ok((claimed, _)) = postcard::take_from_bytes::<RosterHead>(next.payload()) else {
            return Err(RosterError::Signature(VerifyError::BadSignature));
        };
        if claimed.epoch <= cur_roster.epoch {
            continue;
        }
        let roster = verify_successor(cur_signed, cur_roster, next, admin, now)?;
        walked.push((next.clone(), roster));
    }
    Ok(walked)
}
