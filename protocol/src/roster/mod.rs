//! The roster: the admin-signed list of cluster members.
//!
//! Admin keys (kept offline) sign each roster. A roster names the cluster, an epoch, a
//! validity window and the members, each with a node id, a unique name, roles, labels
//! (`region`, `jurisdiction`, ...) and capacity. Labels are attested by the admins, never
//! reported by the node itself. Epochs form a chain: a roster of epoch `e + 1` carries the hash
//! of the signed roster of epoch `e`, and replaces it on every node.
//!
//! Who may sign an epoch is said by the epoch before it: a roster may name its [`Admins`] (keys
//! and a threshold `k`), and the next epoch must then carry valid signatures of at least `k` of
//! them ([`endorse`]), so adding or removing an admin is itself a k-of-n change. A roster that
//! names no admins (the simple default, and every roster of earlier versions) leaves the next
//! epoch to the node's configured trust anchor, one admin key unless configured otherwise.
//! Such a roster encodes exactly as earlier versions encoded it.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Epoch1: k of the configured admins sign (prev = none)
//!     Epoch1 --> Epoch2: k of Epoch1's admins sign (prev = hash(Epoch1))
//!     Epoch2 --> Epoch3: k of Epoch2's admins sign (prev = hash(Epoch2))
//! ```
//!
//! - [`endorse`]: an epoch with every admin signature it gathered, and its file encoding.
//! - [`chain`]: verifying an epoch and walking the chain; the gossiped announcement.

pub mod chain;
pub mod endorse;

pub use chain::{
    advance, verify, verify_successor, Announcement, EndorsedAnnouncement, PlainAnnouncement,
    MAX_ANNOUNCED_EPOCHS,
};
pub use endorse::{Endorsed, Endorsement};

use std::collections::{BTreeMap, HashSet};

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::ids::{Hash, NodeId};
use crate::signed::{Signable, VerifyError};
use crate::time::Timestamp;

/// At most this many members in one roster.
pub const MAX_MEMBERS: usize = 4096;
/// At most this many roles per member.
pub const MAX_ROLES: usize = 4;
/// At most this many labels per member.
pub const MAX_LABELS: usize = 32;
/// Names, label keys and values, and the cluster name are at most this long.
pub const MAX_NAME_LEN: usize = 64;
/// At most this many admin keys in one roster.
pub const MAX_ADMINS: usize = 32;

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

/// The keys that may sign the next epoch, and how many of them must.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admins {
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_ADMINS>")]
    pub keys: Vec<NodeId>,
    /// Signatures of this many distinct keys are needed (1 to the number of keys).
    pub threshold: u8,
}

impl Admins {
    /// One admin key, threshold 1: the simple default.
    pub fn single(key: NodeId) -> Self {
        Self {
            keys: vec![key],
            threshold: 1,
        }
    }

    /// At least one key, no key twice, at most [`MAX_ADMINS`], and a threshold between 1 and
    /// the number of keys.
    pub fn check(&self) -> Result<(), RosterError> {
        let n = self.keys.len();
        if n == 0 || n > MAX_ADMINS {
            return Err(RosterError::BadAdmins(format!(
                "{n} admin keys (1 to {MAX_ADMINS} allowed)"
            )));
        }
        if let Some(dup) = self
            .keys
            .iter()
            .enumerate()
            .find(|(i, k)| self.keys[..*i].contains(k))
        {
            return Err(RosterError::BadAdmins(format!(
                "admin {} is listed twice",
                dup.1
            )));
        }
        if self.threshold == 0 || usize::from(self.threshold) > n {
            return Err(RosterError::BadAdmins(format!(
                "threshold {} with {n} admin keys (1 to {n} allowed)",
                self.threshold
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for Admins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} admins", self.threshold, self.keys.len())
    }
}

/// The membership of a cluster at one epoch.
///
/// Encoded with `admins` last and only when present, so a roster without admins has the
/// layout of earlier versions; decoding reads either ([`Signable::decode`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
    /// Who may sign the next epoch. `None`: the node's configured trust anchor.
    pub admins: Option<Admins>,
}

impl Serialize for Roster {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = if self.admins.is_some() { 7 } else { 6 };
        let mut st = s.serialize_struct("Roster", fields)?;
        st.serialize_field("cluster", &self.cluster)?;
        st.serialize_field("epoch", &self.epoch)?;
        st.serialize_field("prev", &self.prev)?;
        st.serialize_field("not_before", &self.not_before)?;
        st.serialize_field("not_after", &self.not_after)?;
        st.serialize_field("members", &self.members)?;
        if self.admins.is_some() {
            st.serialize_field("admins", &self.admins)?;
        }
        st.end()
    }
}

/// The layout of a roster without admins (and of every roster before admins existed).
#[derive(Serialize, Deserialize)]
struct RosterWithoutAdmins {
    cluster: String,
    epoch: u64,
    prev: Option<Hash>,
    not_before: Timestamp,
    not_after: Timestamp,
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_MEMBERS>")]
    members: Vec<Member>,
}

impl Signable for Roster {
    const DOMAIN: &'static str = "drift/roster/v1";

    /// Either layout, canonical: a roster with admins, or one without (an explicit "no
    /// admins" marker is not canonical, so each roster has exactly one encoding).
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match codec::decode_payload::<Roster>(bytes) {
            Ok(r) if r.admins.is_some() => Ok(r),
            Ok(_) => Err(DecodeError::NotCanonical),
            Err(full) => codec::decode_payload::<RosterWithoutAdmins>(bytes)
                .map(|r| Roster {
                    cluster: r.cluster,
                    epoch: r.epoch,
                    prev: r.prev,
                    not_before: r.not_before,
                    not_after: r.not_after,
                    members: r.members,
                    admins: None,
                })
                .map_err(|_| full),
        }
    }
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
    #[error("bad admin set: {0}")]
    BadAdmins(String),
    #[error(
        "signed by {have} of the {of} admin key(s) that govern this epoch, {need} needed \
         (valid signatures from: {signed_by})"
    )]
    TooFewSignatures {
        have: usize,
        need: u8,
        of: usize,
        /// The short ids of the admins whose signatures verified, or `none`.
        signed_by: String,
    },
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
        if let Some(admins) = &self.admins {
            admins.check()?;
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
