//! The source side of a transfer: the frames the target may send back, and the one question
//! the handoff turns on: may the source resume the VM itself?
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Copying
//!     Copying --> Switched: device state sent (post-copy, hybrid): the target may run the VM
//!     Copying --> CompleteSent: Complete sent (pre-copy): the VM stays paused here
//!     Switched --> CompleteSent: Complete sent, every page delivered
//!     CompleteSent --> Switched: post-copy link recovered (Complete goes again)
//!     CompleteSent --> Committed: Commit (signed by the target, same id and root)
//!     Copying --> Aborted: Abort from the target, or a local failure
//!     CompleteSent --> Aborted: Abort from the target (pre-copy: it will never run the VM)
//! ```
//!
//! [`Sender::may_resume_here`] is true only while the target cannot be running the VM:
//! before switchover, or after the target refused the VM before any post-copy switchover. Once
//! a pre-copy `Complete` is out and neither `Commit` nor `Abort` has come back, the outcome is
//! unknown: the VM stays paused until the target answers (after a restart too); the source
//! never resumes on a guess. After a post-copy switchover the VM belongs to the target.

use crate::ids::{Hash, MigrationId, NodeId};
use crate::migration::Mode;
use crate::signed::{Signed, VerifyError};

use super::receiver::frame_name;
use super::{AbortReason, Commit, FrameError, TransferFrame};

/// Where the source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderPhase {
    /// Rounds, or stop-and-copy: the VM is the source's.
    Copying,
    /// Post-copy: the device state went out; the target may be running the VM.
    Switched,
    /// `Complete` went out; waiting for `Commit`.
    CompleteSent,
    /// The target committed: destroy the source copy.
    Committed,
    /// Over without a move.
    Aborted,
}

/// What the node must do after a frame from the target.
#[derive(Debug, PartialEq, Eq)]
pub enum SenderStep {
    /// Post-copy: send these pages first.
    ServePages(Vec<u64>),
    /// The target committed. Record it durably, then destroy the source copy.
    Committed(Commit),
    /// The target gave up. `resume_here`: whether the source may (and must) resume the VM.
    TargetAborted {
        reason: AbortReason,
        resume_here: bool,
    },
    /// Pre-copy: the target applied every page of rounds up to this one.
    Applied(u32),
    /// Post-copy, on a recovered link: the target lacks these pages (runs `(start, len)`,
    /// each within the VM); `done`: the last such frame.
    Missing { ranges: Vec<(u64, u64)>, done: bool },
}

/// Why a frame from the target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("{frame} from the target is not allowed in phase {phase:?}")]
    OutOfOrder {
        frame: &'static str,
        phase: SenderPhase,
    },
    #[error("frame is for migration {got:?}, expected {expected:?}")]
    WrongId {
        expected: MigrationId,
        got: MigrationId,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("commit signature: {0}")]
    CommitSignature(VerifyError),
    #[error("commit names root {got:?}, the source sent {sent:?}")]
    CommitRoot { sent: Hash, got: Hash },
    #[error("missing range {start}+{len} is outside the VM's {page_count} pages")]
    BadRange {
        start: u64,
        len: u64,
        page_count: u64,
    },
}

/// The source side of one transfer.
#[derive(Debug, Clone)]
pub struct Sender {
    id: MigrationId,
    target: NodeId,
    mode: Mode,
    page_count: u64,
    phase: SenderPhase,
    switched: bool,
    root: Option<Hash>,
}

impl Sender {
    /// A sender for an accepted offer.
    pub fn new(id: MigrationId, target: NodeId, mode: Mode, page_count: u64) -> Self {
        Self {
            id,
            target,
            mode,
            page_count,
            phase: SenderPhase::Copying,
            switched: false,
            root: None,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> SenderPhase {
        self.phase
    }

    /// The migration mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the source may resume the VM now.
    pub fn may_resume_here(&self) -> bool {
        match self.phase {
            SenderPhase::Copying => true,
            SenderPhase::Aborted => !self.switched,
            SenderPhase::Switched | SenderPhase::CompleteSent | SenderPhase::Committed => false,
        }
    }

    /// Post-copy/hybrid: the device state is on its way; from now on the VM is the target's.
    pub fn switched(&mut self) {
        if self.phase == SenderPhase::Copying {
            self.switched = true;
            self.phase = SenderPhase::Switched;
        }
    }

    /// `Complete` with `root` is on its way.
    pub fn complete_sent(&mut self, root: Hash) {
        if matches!(self.phase, SenderPhase::Copying | SenderPhase::Switched) {
            self.root = Some(root);
            self.phase = SenderPhase::CompleteSent;
        }
    }

    /// Post-copy: the link broke and a new one carries the transfer on. A `Complete` sent on
    /// the old link may never have arrived: it is sent again once the target's missing pages
    /// are pushed. No effect before the handover or after the commit.
    pub fn relinked(&mut self) {
        if self.switched && self.phase == SenderPhase::CompleteSent {
            self.phase = SenderPhase::Switched;
        }
    }

    /// The source gave up locally (cancel, error, timeout) before switchover. Returns whether
    /// the VM may resume here; `false` means the outcome must be resolved with the target.
    pub fn abandon(&mut self) -> bool {
        if self.phase == SenderPhase::Copying {
            self.phase = SenderPhase::Aborted;
        }
        self.may_resume_here()
    }

    /// Takes one frame from the target.
    pub fn on_frame(&mut self, frame: &TransferFrame) -> Result<SenderStep, SendError> {
        use SenderPhase::*;
        match (self.phase, frame) {
            (Switched, TransferFrame::PageRequest(req)) => {
                req.check(self.page_count)?;
                Ok(SenderStep::ServePages(req.pfns.clone()))
            }
            (Switched, TransferFrame::Missing(m)) => {
                for &(start, len) in &m.ranges {
                    if start
                        .checked_add(len)
                        .is_none_or(|end| end > self.page_count)
                    {
                        return Err(SendError::BadRange {
                            start,
                            len,
                            page_count: self.page_count,
                        });
                    }
                }
                Ok(SenderStep::Missing {
                    ranges: m.ranges.clone(),
                    done: m.done,
                })
            }
            // A request racing with our Complete is harmless: every page is already sent.
            (CompleteSent, TransferFrame::PageRequest(req)) if self.switched => {
                req.check(self.page_count)?;
                Ok(SenderStep::ServePages(Vec::new()))
            }
            (CompleteSent, TransferFrame::Commit(signed)) => {
                let commit = self.check_commit(signed)?;
                self.phase = Committed;
                Ok(SenderStep::Committed(commit))
            }
            // A late acknowledgement of the last round may cross the switchover.
            (Copying | Switched | CompleteSent, TransferFrame::Applied(a)) => {
                Ok(SenderStep::Applied(a.round))
            }
            (Copying | Switched | CompleteSent, TransferFrame::Abort(a)) => {
                if a.id != self.id {
                    return Err(SendError::WrongId {
                        expected: self.id,
                        got: a.id,
                    });
                }
                self.phase = Aborted;
                Ok(SenderStep::TargetAborted {
                    reason: a.reason.clone(),
                    resume_here: !self.switched,
                })
            }
            (phase, f) => Err(SendError::OutOfOrder {
                frame: frame_name(f),
                phase,
            }),
        }
    }

    /// Checks a commit against this transfer (also used when resolving after a restart).
    pub fn check_commit(&self, signed: &Signed<Commit>) -> Result<Commit, SendError> {
        let commit = signed
            .verify_by(&self.target)
            .map_err(SendError::CommitSignature)?;
        if commit.id != self.id {
            return Err(SendError::WrongId {
                expected: self.id,
                got: commit.id,
            });
        }
        match self.root {
            Some(sent) if sent == commit.root => Ok(commit),
            Some(sent) => Err(SendError::CommitRoot {
                sent,
                got: commit.root,
            }),
            None => Err(SendError::OutOfOrder {
                frame: "Commit",
                phase: self.phase,
            }),
        }
    }
}
