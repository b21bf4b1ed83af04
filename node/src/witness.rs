//! Witnessed audit heads, the node's side (see `drift_protocol::witness`).
//!
//! This module owns: publishing the node's own signed audit head on the `drift/audit-heads/v1`
//! topic (when its log grew, checked every `[gossip] audit_head_interval`, and at least every
//! [`HEAD_HEARTBEAT`]); judging the heads peers publish (refused and counted by reason like bad
//! load reports, or countersigned and kept in the node's [`WitnessBook`]); and keeping that
//! book in the state directory (`witnessed`, replaced atomically), so a witness that restarts
//! still holds what it saw. `GET /v1/audit/witnessed` serves the book to `drift audit
//! witnessed` and `drift audit verify --witnesses`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drift_protocol::codec::{encode_frame, FrameDecoder, MAX_FRAME_LEN};
use drift_protocol::witness::{self, AuditHead, HeadRejection, Recorded, WitnessBook};
use drift_protocol::Signed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::durable::{write_atomic, Overwrite};
use crate::mesh::{Client, Topic, MAX_GOSSIP_MESSAGE};
use crate::state::NodeState;

/// The witness book's file in the state directory.
pub const BOOK_FILE: &str = "witnessed";
/// A head is published at least this often, changed or not, so a peer that joins late or
/// restarted witnesses it.
pub const HEAD_HEARTBEAT: Duration = Duration::from_secs(60);
/// The book is written to disk at most this often.
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// Counters of heads judged.
#[derive(Debug, Default)]
pub struct HeadCounters {
    rejected: [AtomicU64; HeadRejection::LABELS.len()],
    pub witnessed: AtomicU64,
    pub forks: AtomicU64,
    pub published: AtomicU64,
}

impl HeadCounters {
    fn reject(&self, why: &HeadRejection) {
        if let Some(i) = HeadRejection::LABELS.iter().position(|l| *l == why.label()) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refused heads by reason (every reason present, zeros included; `malformed` for bytes
    /// that are not a signed head at all).
    pub fn rejections(&self) -> Vec<(String, u64)> {
        HeadRejection::LABELS
            .iter()
            .zip(&self.rejected)
            .map(|(l, c)| (l.to_string(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// What the mesh should tell gossipsub about a head message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: forward it.
    Accept,
    /// Valid but nothing to do (this node's own head, or one already held): do not forward.
    Ignore,
    /// Forged or malformed: penalise the sender.
    Reject,
}

/// Judges one gossiped head: refuses and counts a bad one; countersigns and keeps a good one.
pub fn on_head(state: &NodeState, data: &[u8]) -> Verdict {
    let Ok(signed) = FrameDecoder::new(MAX_GOSSIP_MESSAGE).decode_exact::<Signed<AuditHead>>(data)
    else {
        state.head_counters.reject(&HeadRejection::Signature(
            drift_protocol::VerifyError::BadSignature,
        ));
        return Verdict::Reject;
    };
    let head = {
        let roster = state.roster();
        witness::validate_head(&signed, &roster.roster)
    };
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            debug!(error = %e, "audit head refused");
            state.head_counters.reject(&e);
            return Verdict::Reject;
        }
    };
    if head.node == state.me {
        return Verdict::Ignore;
    }
    let witnessed = state.countersign(signed);
    let recorded = state.witness_book().record(witnessed, &head);
    if recorded != Recorded::Known {
        state.book_changed.store(true, Ordering::Relaxed);
    }
    match recorded {
        Recorded::Known => Verdict::Ignore,
        Recorded::Fork => {
            state.head_counters.forks.fetch_add(1, Ordering::Relaxed);
            warn!(
                node = %head.node,
                seq = head.seq,
                "a peer showed two different audit histories: both heads kept as evidence"
            );
            Verdict::Accept
        }
        Recorded::Newer | Recorded::Older => {
            state
                .head_counters
                .witnessed
                .fetch_add(1, Ordering::Relaxed);
            Verdict::Accept
        }
    }
}

/// Reads a saved book; `None` when there is none. A file that does not decode is an error.
pub fn load_book(dir: &Path) -> Result<Option<WitnessBook>, String> {
    let path = dir.join(BOOK_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => FrameDecoder::new(MAX_FRAME_LEN * 16)
            .decode_exact::<WitnessBook>(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn save_book(path: &Path, book: &WitnessBook) {
    if let Err(e) = write_atomic(path, &encode_frame(book), 0o600, Overwrite::Replace) {
        warn!(path = %path.display(), error = %e, "could not save the witnessed audit heads");
    }
}

/// Publishes this node's audit head and saves the book, until `cancel`.
pub async fn run(state: Arc<NodeState>, mesh: Client, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published: Option<(drift_protocol::audit::Anchor, Instant)> = None;
    let mut saved_at = Instant::now();
    let book_path = state.state_dir.join(BOOK_FILE);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Some(anchor) = state.audit_head() {
            let due = match published {
                None => true,
                Some((last, at)) => last != anchor || at.elapsed() >= HEAD_HEARTBEAT,
            };
            if due {
                let head = AuditHead {
                    node: state.me,
                    seq: anchor.0,
                    hash: anchor.1,
                    at: crate::clock::now(),
                };
                let data = encode_frame(&state.sign(&head));
                match mesh.publish(Topic::AuditHeads, data).await {
                    Ok(Ok(())) => {
                        state
                            .head_counters
                            .published
                            .fetch_add(1, Ordering::Relaxed);
                        published = Some((anchor, Instant::now()));
                    }
                    // No peer yet: try again next tick.
                    Ok(Err(e)) => debug!(error = %e, "audit head not published"),
                    Err(_) => break,
                }
            }
        }
        if saved_at.elapsed() >= SAVE_EVERY && state.book_changed.swap(false, Ordering::Relaxed) {
            let book = state.witness_book().clone();
            save_book(&book_path, &book);
            saved_at = Instant::now();
        }
    }
    if state.book_changed.swap(false, Ordering::Relaxed) {
        let book = state.witness_book().clone();
        save_book(&book_path, &book);
    }
}
