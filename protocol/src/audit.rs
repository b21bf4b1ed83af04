//! Audit records: a signed, hash-chained, append-only log per node.
//!
//! Record `n` carries `seq = n` (from 0) and `prev = chain_hash(record n-1)` (zero for the
//! first), and is signed by the node. [`verify_chain`] walks a log and names the first record
//! that breaks: a flipped bit (signature), a deleted or reordered record (seq or link), a record
//! from another signer. A cut-off tail is only visible against an anchor (the newest head the
//! node or its peers recorded), which [`verify_chain`] takes as an option.

use serde::{Deserialize, Serialize};

use crate::ids::{Hash, MigrationId, NodeId, VmId};
use crate::migration::Mode;
use crate::signed::{Signable, Signed, VerifyError};
use crate::time::Timestamp;

/// Free-text fields in audit events are at most this long.
pub const MAX_DETAIL_LEN: usize = 256;

/// Which side of a migration a node is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    Source,
    Target,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditEvent {
    /// The node started with this roster.
    NodeStarted { roster_epoch: u64 },
    /// A roster was adopted (the first, or a successor).
    RosterAdopted { epoch: u64, hash: Hash },
    /// A source sent an offer.
    OfferSent {
        id: MigrationId,
        vm: VmId,
        target: NodeId,
        mode: Mode,
        offer: Hash,
    },
    /// A target received an offer.
    OfferReceived {
        id: MigrationId,
        vm: VmId,
        source: NodeId,
        offer: Hash,
    },
    /// A target decided (`reason` is empty on accept).
    Decision {
        id: MigrationId,
        accepted: bool,
        reason: String,
    },
    /// Memory started to move.
    TransferStarted {
        id: MigrationId,
        side: Side,
        peer: NodeId,
    },
    /// The source paused the VM for the last copy (pre-copy) or handed it over (post-copy).
    Switchover { id: MigrationId, side: Side },
    /// The source sent, or the target verified, the signed root.
    Complete {
        id: MigrationId,
        side: Side,
        root: Hash,
    },
    /// The target committed (target side), or the source holds the target's commit.
    Commit {
        id: MigrationId,
        side: Side,
        root: Hash,
    },
    /// The migration ended without a move; the VM stays on the source.
    Abort {
        id: MigrationId,
        side: Side,
        reason: String,
    },
    /// A request was refused before any migration began (non-member, replay, bad stream...).
    Refused {
        id: Option<MigrationId>,
        peer: Option<NodeId>,
        reason: String,
    },
    /// After losing contact, the source learned from the target what became of a migration
    /// (`outcome` is a [`crate::migration::ResolveOutcome`] label), or the target answered.
    Resolved {
        id: MigrationId,
        side: Side,
        outcome: String,
    },
}

/// One entry of a node's audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    /// [`chain_hash`] of the previous record; [`Hash::ZERO`] for the first.
    pub prev: Hash,
    pub at: Timestamp,
    pub event: AuditEvent,
}

impl Signable for AuditRecord {
    const DOMAIN: &'static str = "drift/audit-record/v1";
}

/// The hash the next record links to.
pub fn chain_hash(record: &Signed<AuditRecord>) -> Hash {
    record.hash()
}

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {index}: {kind}")]
pub struct ChainError {
    /// Position in the log (0-based) of the first bad record.
    pub index: u64,
    pub kind: ChainErrorKind,
}

/// How a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainErrorKind {
    #[error("signature or signer does not verify: {0}")]
    Signature(VerifyError),
    #[error("seq is {got}, expected {expected} (a record was deleted, inserted or moved)")]
    Seq { expected: u64, got: u64 },
    #[error("link to the previous record does not match (a record was altered, deleted or moved)")]
    Link,
    #[error("the log holds {len} records, but its anchor says {} were written (truncated)", .anchor_seq + 1)]
    Truncated { len: u64, anchor_seq: u64 },
    #[error("record {anchor_seq} differs from the anchor")]
    AnchorMismatch { anchor_seq: u64 },
}

/// The newest record known to have been written: `(seq, chain_hash)`.
pub type Anchor = (u64, Hash);

/// What a valid chain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    pub records: u64,
    /// `(seq, hash)` of the last record, the anchor of the next check.
    pub head: Option<Anchor>,
}

/// Verifies that `records` form one chain signed by `node`, starting at seq 0, and reach
/// `anchor` when one is given.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a Signed<AuditRecord>>,
    node: &NodeId,
    anchor: Option<Anchor>,
) -> Result<ChainSummary, ChainError> {
    let mut prev = Hash::ZERO;
    let mut n = 0u64;
    let mut head = None;
    for signed in records {
        let err = |kind| ChainError { index: n, kind };
        let record = signed
            .verify_by(node)
            .map_err(|e| err(ChainErrorKind::Signature(e)))?;
        if record.seq != n {
            return Err(err(ChainErrorKind::Seq {
                expected: n,
                got: record.seq,
            }));
        }
        if record.prev != prev {
            return Err(err(ChainErrorKind::Link));
        }
        prev = chain_hash(signed);
        if let Some((seq, hash)) = anchor {
            if seq == n && hash != prev {
                return Err(err(ChainErrorKind::AnchorMismatch { anchor_seq: seq }));
            }
        }
        head = Some((n, prev));
        n += 1;
    }
    if let Some((seq, _)) = anchor {
        if seq >= n {
            return Err(ChainError {
                index: n,
                kind: ChainErrorKind::Truncated {
                    len: n,
                    anchor_seq: seq,
                },
            });
        }
    }
    Ok(ChainSummary { records: n, head })
}

/// Builds the next record of a chain whose head is `head`.
pub fn next_record(head: Option<Anchor>, at: Timestamp, event: AuditEvent) -> AuditRecord {
    let (seq, prev) = match head {
        Some((seq, hash)) => (seq + 1, hash),
        None => (0, Hash::ZERO),
    };
    AuditRecord {
        seq,
        prev,
        at,
        event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use rand::SeedableRng;

    fn chain(key: &SecretKey, n: u64) -> Vec<Signed<AuditRecord>> {
        let mut out = Vec::new();
        let mut head = None;
        for i in 0..n {
            let rec = next_record(
                head,
                Timestamp(i),
                AuditEvent::NodeStarted { roster_epoch: i },
            );
            let signed = Signed::sign(&rec, key);
            head = Some((rec.seq, chain_hash(&signed)));
            out.push(signed);
        }
        out
    }

    #[test]
    fn every_kind_of_edit_is_named() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let key = SecretKey::generate(&mut rng);
        let me = key.public();
        let log = chain(&key, 5);
        let ok = verify_chain(&log, &me, None).unwrap();
        assert_eq!(ok.records, 5);
        let anchor = ok.head;
        assert!(verify_chain(&log, &me, anchor).is_ok());

        let mut deleted = log.clone();
        deleted.remove(2);
        assert_eq!(verify_chain(&deleted, &me, None).unwrap_err().index, 2);

        let mut swapped = log.clone();
        swapped.swap(1, 3);
        assert_eq!(verify_chain(&swapped, &me, None).unwrap_err().index, 1);

        let truncated = &log[..3];
        let err = verify_chain(truncated, &me, anchor).unwrap_err();
        assert_eq!(
            err.kind,
            ChainErrorKind::Truncated {
                len: 3,
                anchor_seq: 4
            }
        );

        // Re-signed by someone else.
        let other = SecretKey::generate(&mut rng);
        let mut resigned = log.clone();
        resigned[4] = Signed::sign(&resigned[4].verify().unwrap(), &other);
        assert!(matches!(
            verify_chain(&resigned, &me, None).unwrap_err().kind,
            ChainErrorKind::Signature(_)
        ));

        // A rewritten tail with valid signatures breaks the anchor.
        let mut rewritten = log[..4].to_vec();
        let rec = next_record(
            Some((3, chain_hash(&log[3]))),
            Timestamp(99),
            AuditEvent::NodeStarted { roster_epoch: 99 },
        );
        rewritten.push(Signed::sign(&rec, &key));
        assert_eq!(
            verify_chain(&rewritten, &me, anchor).unwrap_err().kind,
            ChainErrorKind::AnchorMismatch { anchor_seq: 4 }
        );
    }
}
