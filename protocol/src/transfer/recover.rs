//! Post-copy recovery: when the link of a post-copy migration breaks while both nodes live,
//! the VM is not lost. The target keeps running it (a guest that faults on a page it lacks
//! waits), the source keeps serving its pages, and the source opens a new link
//! (`/drift/recover/1`, a mesh stream between the same two peers) with a signed
//! [`RecoverRequest`]. The target accepts it only from the offer's source, only for a
//! post-copy migration of that source that lost its link and is waiting, and only for an
//! attempt newer than any it saw (so a recorded request cannot be replayed); it answers with a
//! signed [`RecoverAnswer`]. Then the transfer goes on over the new link: the target names the
//! pages it still lacks ([`MissingRanges`](super::MissingRanges), the last one `done`), asks
//! again for the pages its guest waits on, and the source pushes exactly those until none is
//! left, then sends `Complete` as before.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source (VM paused, serving pages)
//!     participant T as target (VM running, pages missing)
//!     Note over S,T: the post-copy link breaks
//!     S->>T: /drift/recover/1: RecoverRequest {id, offer, attempt n} (signed)
//!     T->>S: RecoverAnswer {accept} (signed)
//!     T->>S: Missing {ranges, done}... PageRequest...
//!     S->>T: Pages (requested first, then the rest)
//!     S->>T: Complete (signed root)
//!     T->>S: Commit (signed)
//! ```
//!
//! QEMU's `postcopy-recover` is the same idea: the destination sends the bitmap of pages it
//! received, the source resends the rest.

use serde::{Deserialize, Serialize};

use crate::ids::{Hash, MigrationId, NodeId};
use crate::signed::{Signable, Signed};
use crate::time::Timestamp;

/// A source's request to carry on a post-copy migration over a new link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverRequest {
    pub id: MigrationId,
    /// Hash of the accepted `Signed<MigrationOffer>`.
    pub offer: Hash,
    pub source: NodeId,
    pub target: NodeId,
    /// 1 for the first recovery of this migration, then higher.
    pub attempt: u32,
    pub issued_at: Timestamp,
}

impl Signable for RecoverRequest {
    const DOMAIN: &'static str = "drift/recover-request/v1";
}

/// Why a target refuses a recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RecoverRefusal {
    #[error("the request's signature does not verify or its signer is not its source")]
    BadSignature,
    #[error("addressed to another node")]
    NotForMe,
    #[error("no post-copy migration of this source waits for a new link under that id")]
    NotWaiting,
    #[error("the request names another offer")]
    WrongOffer,
    #[error("an attempt this new was seen already")]
    Replayed,
    #[error("issued too long ago or too far in the future")]
    Expired,
}

/// The target's signed answer to a [`RecoverRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverAnswer {
    pub id: MigrationId,
    /// Hash of the `Signed<RecoverRequest>` this answers.
    pub request: Hash,
    pub target: NodeId,
    /// `None`: accepted; the transfer goes on over this stream.
    pub refusal: Option<RecoverRefusal>,
}

impl Signable for RecoverAnswer {
    const DOMAIN: &'static str = "drift/recover-answer/v1";
}

/// What the target knows of a post-copy migration that waits for a new link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub id: MigrationId,
    pub offer: Hash,
    pub source: NodeId,
    /// The newest attempt accepted so far (0: none).
    pub last_attempt: u32,
}

/// Checks a request that arrived from `peer` (the stream's authenticated peer) at `now`
/// against the migration waiting under its id, if any. Requests older than `max_age_ms` or
/// further than `max_skew_ms` in the future are refused.
pub fn validate_recover_request(
    signed: &Signed<RecoverRequest>,
    peer: &NodeId,
    me: &NodeId,
    waiting: Option<&Waiting>,
    now: Timestamp,
    max_age_ms: u64,
    max_skew_ms: u64,
) -> Result<RecoverRequest, RecoverRefusal> {
    let req = signed
        .verify_by(peer)
        .map_err(|_| RecoverRefusal::BadSignature)?;
    if &req.source != peer {
        return Err(RecoverRefusal::BadSignature);
    }
    if &req.target != me {
        return Err(RecoverRefusal::NotForMe);
    }
    if now.millis_since(req.issued_at) > max_age_ms || req.issued_at.millis_since(now) > max_skew_ms
    {
        return Err(RecoverRefusal::Expired);
    }
    let Some(w) = waiting.filter(|w| w.id == req.id && &w.source == peer) else {
        return Err(RecoverRefusal::NotWaiting);
    };
    if w.offer != req.offer {
        return Err(RecoverRefusal::WrongOffer);
    }
    if req.attempt <= w.last_attempt {
        return Err(RecoverRefusal::Replayed);
    }
    Ok(req)
}

/// Checks the target's answer to `request`: signed by the target it names, for this request.
/// `Ok(None)`: accepted; `Ok(Some(why))`: refused.
pub fn check_recover_answer(
    signed: &Signed<RecoverAnswer>,
    request: &Signed<RecoverRequest>,
    sent: &RecoverRequest,
) -> Result<Option<RecoverRefusal>, RecoverRefusal> {
    let answer = signed
        .verify_by(&sent.target)
        .map_err(|_| RecoverRefusal::BadSignature)?;
    if answer.id != sent.id || answer.request != request.hash() || answer.target != sent.target {
        return Err(RecoverRefusal::WrongOffer);
    }
    Ok(answer.refusal)
}
