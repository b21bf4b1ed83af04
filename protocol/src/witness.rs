//! Witnessed audit heads: history that no node can rewrite alone.
//!
//! Each node's audit log is a hash chain it signs itself ([`crate::audit`]), so a node whose key
//! is stolen could rewrite its whole log consistently. To prevent that, every node publishes
//! its signed [`AuditHead`] (the seq and chain hash of its newest record) from time to time;
//! every other member checks it, countersigns it ([`Countersign`]) and keeps it in its
//! [`WitnessBook`]. Later, [`check_log`] proves a log consistent with every head others
//! witnessed, or names the first witnessed head it contradicts: a record rewritten (its hash
//! differs from the witnessed one), a log cut short (it ends before a witnessed record), or a
//! history forked between peers (two witnessed heads of one node disagree on one record).
//!
//! ```text
//! node N:    Signed_N(AuditHead { node: N, seq, hash, at })          gossiped
//! witness W: Signed_W(Countersign { head: hash(Signed_N(..)), .. })  kept with the head
//! ```
//!
//! A witness keeps at most [`MAX_HEADS_PER_NODE`] heads per member, thinned so they stay
//! spread over the log's length (the oldest and the newest always kept), and every conflict it
//! sees between two heads of one member, up to [`MAX_CONFLICTS`].

use serde::{Deserialize, Serialize};

use crate::ids::{Hash, NodeId};
use crate::keys::SecretKey;
use crate::roster::Roster;
use crate::signed::{Signable, Signed, VerifyError};
use crate::time::Timestamp;

/// Heads a witness keeps per member.
pub const MAX_HEADS_PER_NODE: usize = 16;
/// Conflicts a witness keeps in all.
pub const MAX_CONFLICTS: usize = 64;
/// Witnessed heads in one export.
pub const MAX_EXPORTED: usize = 65_536;

/// A node's statement of its audit log's newest record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub node: NodeId,
    /// The newest record's seq (the log holds `seq + 1` records).
    pub seq: u64,
    /// The newest record's chain hash.
    pub hash: Hash,
    pub at: Timestamp,
}

impl Signable for AuditHead {
    const DOMAIN: &'static str = "drift/audit-head/v1";
}

/// A witness's countersignature of a head it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Countersign {
    /// The hash of the node's signed head.
    pub head: Hash,
    pub witness: NodeId,
    /// When the witness accepted it, by the witness's clock.
    pub seen: Timestamp,
}

impl Signable for Countersign {
    const DOMAIN: &'static str = "drift/audit-witness/v1";
}

/// A head and its witness's countersignature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Witnessed {
    pub head: Signed<AuditHead>,
    pub countersign: Signed<Countersign>,
}

/// Why a head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadRejection {
    #[error("the head does not verify: {0}")]
    Signature(VerifyError),
    #[error("the head's node {0} is not a roster member")]
    NotAMember(NodeId),
    #[error("the head of {node} is signed by {signer}")]
    SignerNotNode { node: NodeId, signer: NodeId },
    #[error("the countersignature does not verify or is not for this head")]
    BadCountersign,
}

impl HeadRejection {
    /// Every label, for counters that list zeros too.
    pub const LABELS: &'static [&'static str] = &[
        "bad_signature",
        "not_a_member",
        "signer_not_node",
        "bad_countersign",
    ];

    /// A short, stable label for counters.
    pub fn label(&self) -> &'static str {
        match self {
            HeadRejection::Signature(_) => "bad_signature",
            HeadRejection::NotAMember(_) => "not_a_member",
            HeadRejection::SignerNotNode { .. } => "signer_not_node",
            HeadRejection::BadCountersign => "bad_countersign",
        }
    }
}

/// Checks a gossiped head: signed by the node it names, which is a roster member.
pub fn validate_head(
    signed: &Signed<AuditHead>,
    roster: &Roster,
) -> Result<AuditHead, HeadRejection> {
    let head = signed.verify().map_err(HeadRejection::Signature)?;
    if &head.node != signed.signer() {
        return Err(HeadRejection::SignerNotNode {
            node: head.node,
            signer: *signed.signer(),
        });
    }
    if roster.member(&head.node).is_none() {
        return Err(HeadRejection::NotAMember(head.node));
    }
    Ok(head)
}

/// Countersigns a head this witness accepted.
pub fn countersign(head: Signed<AuditHead>, witness: &SecretKey, seen: Timestamp) -> Witnessed {
    let countersign = Signed::sign(
        &Countersign {
            head: head.hash(),
            witness: witness.public(),
            seen,
        },
        witness,
    );
    Witnessed { head, countersign }
}

/// What an exported witness statement proves once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub head: AuditHead,
    pub witness: NodeId,
    pub seen: Timestamp,
}

impl Witnessed {
    /// Verifies both signatures and that they belong together (no roster needed: the head is
    /// signed by the node it names, the countersignature by the witness it names).
    pub fn check(&self) -> Result<Checked, HeadRejection> {
        let head = self.head.verify().map_err(HeadRejection::Signature)?;
        if &head.node != self.head.signer() {
            return Err(HeadRejection::SignerNotNode {
                node: head.node,
                signer: *self.head.signer(),
            });
        }
        let cs = self
            .countersign
            .verify()
            .map_err(|_| HeadRejection::BadCountersign)?;
        if cs.head != self.head.hash() || &cs.witness != self.countersign.signer() {
            return Err(HeadRejection::BadCountersign);
        }
        Ok(Checked {
            head,
            witness: cs.witness,
            seen: cs.seen,
        })
    }
}

/// Two heads of one node that cannot both be true of one log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub kept: Witnessed,
    pub new: Witnessed,
}

/// What a witness did with a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Newer than every head held of its node.
    Newer,
    /// Already held (same seq and hash).
    Known,
    /// Older than the newest held, and consistent with every head held at its seq.
    Older,
    /// A head held of the same node names another hash for the same record: the node showed
    /// two histories. Both are kept as evidence.
    Fork,
}

/// The heads a witness holds, per member, and the conflicts it saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessBook {
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_EXPORTED>")]
    pub heads: Vec<Witnessed>,
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_CONFLICTS>")]
    pub conflicts: Vec<Conflict>,
}

impl WitnessBook {
    /// Records a head this witness checked ([`validate_head`]) and countersigned.
    pub fn record(&mut self, w: Witnessed, head: &AuditHead) -> Recorded {
        let mut same_node: Vec<(usize, AuditHead)> = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                let held = h.head.decode_unverified().ok()?;
                (held.node == head.node).then_some((i, held))
            })
            .collect();
        if let Some((i, _)) = same_node.iter().find(|(_, h)| h.seq == head.seq) {
            let kept = &self.heads[*i];
            if kept.head.decode_unverified().ok().map(|h| h.hash) == Some(head.hash) {
                return Recorded::Known;
            }
            if self.conflicts.len() < MAX_CONFLICTS {
                self.conflicts.push(Conflict {
                    kept: kept.clone(),
                    new: w,
                });
            }
            return Recorded::Fork;
        }
        let newest = same_node.iter().map(|(_, h)| h.seq).max();
        let outcome = match newest {
            Some(n) if n > head.seq => Recorded::Older,
            _ => Recorded::Newer,
        };
        self.heads.push(w);
        same_node.push((self.heads.len() - 1, *head));
        if same_node.len() > MAX_HEADS_PER_NODE {
            // Drop the head whose neighbours are closest (the oldest such), never the oldest or
            // the newest: what stays spreads over the whole log, so a rewrite of any part of it
            // meets a witnessed head.
            same_node.sort_by_key(|(_, h)| h.seq);
            let drop = (1..same_node.len() - 1)
                .min_by_key(|&j| same_node[j + 1].1.seq - same_node[j - 1].1.seq)
                .map(|j| same_node[j].0);
            if let Some(i) = drop {
                self.heads.remove(i);
            }
        }
        outcome
    }

    /// The heads held of `node`, oldest first.
    pub fn of(&self, node: &NodeId) -> Vec<&Witnessed> {
        let mut out: Vec<(u64, &Witnessed)> = self
            .heads
            .iter()
            .filter_map(|w| {
                let h = w.head.decode_unverified().ok()?;
                (&h.node == node).then_some((h.seq, w))
            })
            .collect();
        out.sort_by_key(|(seq, _)| *seq);
        out.into_iter().map(|(_, w)| w).collect()
    }

    /// Drops the heads of nodes no longer in the roster.
    pub fn retain_members(&mut self, roster: &Roster) {
        self.heads.retain(|w| {
            w.head
                .decode_unverified()
                .is_ok_and(|h| roster.member(&h.node).is_some())
        });
    }
}

/// How a log contradicts a witnessed head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Contradiction {
    #[error(
        "{witness} witnessed record {seq} with hash {witnessed} (seen {seen}), \
         but the log's record {seq} hashes to {found}: the log was rewritten"
    )]
    Rewritten {
        witness: NodeId,
        seq: u64,
        witnessed: Hash,
        found: Hash,
        seen: Timestamp,
    },
    #[error(
        "{witness} witnessed record {seq} (seen {seen}), but the log holds only {len} records: \
         the log was cut short"
    )]
    Truncated {
        witness: NodeId,
        seq: u64,
        len: u64,
        seen: Timestamp,
    },
    #[error(
        "the node showed two histories: {a} witnessed record {seq} with hash {hash_a}, \
         {b} with hash {hash_b}"
    )]
    Forked {
        seq: u64,
        a: NodeId,
        hash_a: Hash,
        b: NodeId,
        hash_b: Hash,
    },
    #[error("a witnessed head does not verify: {0}")]
    Invalid(HeadRejection),
}

/// What [`check_log`] found consistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consistent {
    /// Heads of the log's node that were checked.
    pub heads: usize,
    /// Distinct witnesses among them.
    pub witnesses: usize,
}

/// Checks a log against witnessed heads: `hashes[i]` is the chain hash of the log's record `i`
/// (the log verified on its own first); `witnessed` holds heads from any number of witnesses
/// (heads of other nodes are ignored). Forks between the heads themselves are reported
/// first (they prove the node lied whatever the log says); then heads in seq order, so the
/// error names the first witnessed record the log contradicts.
pub fn check_log(
    node: &NodeId,
    hashes: &[Hash],
    witnessed: &[Witnessed],
) -> Result<Consistent, Box<Contradiction>> {
    let mut checked: Vec<Checked> = Vec::new();
    for w in witnessed {
        let c = w.check().map_err(|e| Box::new(Contradiction::Invalid(e)))?;
        if &c.head.node == node {
            checked.push(c);
        }
    }
    checked.sort_by_key(|c| (c.head.seq, c.seen));
    for pair in checked.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.head.seq == b.head.seq && a.head.hash != b.head.hash {
            return Err(Box::new(Contradiction::Forked {
                seq: a.head.seq,
                a: a.witness,
                hash_a: a.head.hash,
                b: b.witness,
                hash_b: b.head.hash,
            }));
        }
    }
    for c in &checked {
        let Some(found) = usize::try_from(c.head.seq).ok().and_then(|i| hashes.get(i)) else {
            return Err(Box::new(Contradiction::Truncated {
                witness: c.witness,
                seq: c.head.seq,
                len: hashes.len() as u64,
                seen: c.seen,
            }));
        };
        if *found != c.head.hash {
            return Err(Box::new(Contradiction::Rewritten {
                witness: c.witness,
                seq: c.head.seq,
                witnessed: c.head.hash,
                found: *found,
                seen: c.seen,
            }));
        }
    }
    let mut witnesses: Vec<NodeId> = checked.iter().map(|c| c.witness).collect();
    witnesses.sort_unstable_by_key(|w| *w.as_bytes());
    witnesses.dedup();
    Ok(Consistent {
        heads: checked.len(),
        witnesses: witnesses.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roster::{Capacity, Member, Role};
    use rand::SeedableRng;

    fn roster(ids: &[NodeId]) -> Roster {
        Roster {
            cluster: "lab".into(),
            epoch: 1,
            prev: None,
            not_before: Timestamp(0),
            not_after: Timestamp(10),
            members: ids
                .iter()
                .enumerate()
                .map(|(i, id)| Member {
                    id: *id,
                    name: format!("n{i}"),
                    roles: vec![Role::Host],
                    labels: Default::default(),
                    capacity: Capacity::default(),
                })
                .collect(),
            admins: None,
        }
    }

    fn head(key: &SecretKey, seq: u64, hash: Hash) -> Signed<AuditHead> {
        Signed::sign(
            &AuditHead {
                node: key.public(),
                seq,
                hash,
                at: Timestamp(seq),
            },
            key,
        )
    }

    #[allow(clippy::result_large_err)] // test helper: the error is matched on, not passed on
    fn check(node: &NodeId, hashes: &[Hash], w: &[Witnessed]) -> Result<Consistent, Contradiction> {
        check_log(node, hashes, w).map_err(|e| *e)
    }

    fn hashes(n: usize, salt: &str) -> Vec<Hash> {
        (0..n)
            .map(|i| Hash::of(format!("{salt}{i}").as_bytes()))
            .collect()
    }

    #[test]
    fn forged_heads_are_refused() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let n = SecretKey::generate(&mut rng);
        let m = SecretKey::generate(&mut rng);
        let outsider = SecretKey::generate(&mut rng);
        let r = roster(&[n.public(), m.public()]);
        let good = head(&n, 3, Hash::ZERO);
        assert!(validate_head(&good, &r).is_ok());
        // m signs a head that names n.
        let by_other = Signed::sign(
            &AuditHead {
                node: n.public(),
                seq: 3,
                hash: Hash::ZERO,
                at: Timestamp(0),
            },
            &m,
        );
        assert!(matches!(
            validate_head(&by_other, &r),
            Err(HeadRejection::SignerNotNode { .. })
        ));
        assert!(matches!(
            validate_head(&head(&outsider, 1, Hash::ZERO), &r),
            Err(HeadRejection::NotAMember(_))
        ));
        let (bytes, signer, _) = good.clone().into_parts();
        let tampered = Signed::from_parts(bytes, signer, crate::keys::Signature([1; 64]));
        assert!(matches!(
            validate_head(&tampered, &r),
            Err(HeadRejection::Signature(_))
        ));
        // A countersignature moved onto another head does not check.
        let w = countersign(good, &m, Timestamp(5));
        assert!(w.check().is_ok());
        let moved = Witnessed {
            head: head(&n, 4, Hash::ZERO),
            countersign: w.countersign,
        };
        assert_eq!(moved.check(), Err(HeadRejection::BadCountersign));
    }

    #[test]
    fn a_log_is_checked_against_every_witnessed_head() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let n = SecretKey::generate(&mut rng);
        let w1 = SecretKey::generate(&mut rng);
        let w2 = SecretKey::generate(&mut rng);
        let log = hashes(10, "a");
        let seen = [
            countersign(head(&n, 3, log[3]), &w1, Timestamp(1)),
            countersign(head(&n, 7, log[7]), &w2, Timestamp(2)),
        ];
        assert_eq!(
            check(&n.public(), &log, &seen),
            Ok(Consistent {
                heads: 2,
                witnesses: 2
            })
        );
        // Rewritten from record 5 on: the head at 7 is contradicted, named.
        let mut rewritten = log.clone();
        for (i, h) in hashes(5, "b").into_iter().enumerate() {
            rewritten[5 + i] = h;
        }
        assert!(matches!(
            check(&n.public(), &rewritten, &seen),
            Err(Contradiction::Rewritten { seq: 7, .. })
        ));
        // Cut short before record 7.
        assert!(matches!(
            check(&n.public(), &log[..6], &seen),
            Err(Contradiction::Truncated { seq: 7, len: 6, .. })
        ));
        // Two witnesses saw two histories: a fork, whatever the log.
        let forked = [
            countersign(head(&n, 4, log[4]), &w1, Timestamp(1)),
            countersign(head(&n, 4, Hash::of(b"other")), &w2, Timestamp(2)),
        ];
        assert!(matches!(
            check(&n.public(), &log, &forked),
            Err(Contradiction::Forked { seq: 4, .. })
        ));
    }

    #[test]
    fn the_book_keeps_spread_heads_and_every_fork() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let n = SecretKey::generate(&mut rng);
        let w = SecretKey::generate(&mut rng);
        let log = hashes(200, "a");
        let mut book = WitnessBook::default();
        let put = |book: &mut WitnessBook, seq: u64, hash: Hash| {
            let s = head(&n, seq, hash);
            let h = s.decode_unverified().unwrap();
            book.record(countersign(s, &w, Timestamp(seq)), &h)
        };
        for seq in 0..200u64 {
            assert_eq!(put(&mut book, seq, log[seq as usize]), Recorded::Newer);
        }
        assert_eq!(put(&mut book, 199, log[199]), Recorded::Known);
        let held: Vec<u64> = book
            .of(&n.public())
            .iter()
            .map(|w| w.head.decode_unverified().unwrap().seq)
            .collect();
        assert_eq!(held.len(), MAX_HEADS_PER_NODE);
        assert_eq!(held.last(), Some(&199), "the newest is kept");
        assert_eq!(held[0], 0, "old history stays witnessed: {held:?}");
        assert!(
            held.windows(2).all(|w| w[1] - w[0] <= 30),
            "spread: {held:?}"
        );
        // A second history at a held seq is a fork, kept as evidence.
        let at = held[3];
        assert_eq!(put(&mut book, at, Hash::of(b"fork")), Recorded::Fork);
        assert_eq!(book.conflicts.len(), 1);
        assert!(check(&n.public(), &log, &book.heads).is_ok());
    }
}
