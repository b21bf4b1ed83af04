//! The target side of a transfer, as a pure state machine over untrusted frames.
//!
//! The node feeds every frame from the source into [`Receiver::on_frame`] and carries out the
//! [`Step`] it returns (write pages into the VM, load device state, resume, verify). The
//! machine checks order, ids, counts, page numbers, hashes and the signed root before anything
//! from the frame is used; any violation is an error after which the transfer is over.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> AwaitStart
//!     AwaitStart --> Copying: Start (id, offer, mode, page count as accepted)
//!     Copying --> Copying: Pages(round), RoundEnd(round)
//!     Copying --> AwaitComplete: DeviceState (pre-copy; hybrid with nothing stale)
//!     Copying --> Switching: Stale (post-copy, hybrid)
//!     Switching --> Switching: Stale
//!     Switching --> PostCopy: DeviceState -> resume now
//!     Copying --> PostCopy: DeviceState (post-copy with nothing stale)
//!     PostCopy --> PostCopy: Pages (only pages still missing are applied)
//!     AwaitComplete --> Verified: Complete (signed by source, root matches)
//!     PostCopy --> Verified: Complete, once no page is missing
//!     Copying --> Aborted: Abort
//!     AwaitComplete --> Aborted: Abort
//! ```
//!
//! Leaves: the machine keeps, for every page, the leaf of the newest content it received
//! (the target's memory starts all zero), so at `Complete` the root is one pass over 32 bytes
//! per page, and it matches only if every page the target holds is the page the source had at
//! switchover.

use crate::ids::{Hash, MigrationId, NodeId};
use crate::migration::Mode;
use crate::signed::VerifyError;

use super::{
    Abort, AbortReason, CheckedBatch, FrameError, Leaves, PageBatch, TransferFrame, PAGE_SIZE,
};

/// At most this many pre-copy rounds.
pub const MAX_ROUNDS: u32 = 1024;

/// What the target accepted: the machine refuses anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: MigrationId,
    /// Hash of the accepted `Signed<MigrationOffer>`.
    pub offer: Hash,
    pub source: NodeId,
    pub mode: Mode,
    /// The VM's memory in pages, from the accepted offer.
    pub page_count: u64,
    /// Data connections the decision granted (0: none).
    pub data_connections: u32,
}

/// Where the transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    AwaitStart,
    /// Pre-copy rounds (and the stop-and-copy round).
    Copying,
    /// Post-copy/hybrid: stale ranges arriving, before the device state.
    Switching,
    /// Pre-copy: device state loaded, waiting for the signed root.
    AwaitComplete,
    /// Post-copy: the VM runs here; missing pages arrive.
    PostCopy,
    /// The root verified: the VM may be committed here.
    Verified,
    /// The transfer is over without a move.
    Aborted,
}

/// What the node must do after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Nothing to do (a round ended, stale ranges noted).
    Continue,
    /// Write these pages into the VM's memory (`None` data: a zero page).
    WritePages(Vec<(u64, Option<&'a [u8]>)>),
    /// Load the device state into the paused VM (pre-copy: do not resume yet).
    LoadDevice(&'a [u8]),
    /// Post-copy: load the device state and resume the VM now; fetch missing pages on demand.
    LoadDeviceAndResume(&'a [u8]),
    /// The root verified. Record the commit durably, then resume (pre-copy), then send the
    /// signed `Commit`.
    Verified { root: Hash },
    /// The source abandoned the transfer: discard the incoming VM.
    Aborted(AbortReason),
}

/// Why a frame ended the transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error("{frame} is not allowed in phase {phase:?}")]
    OutOfOrder { frame: &'static str, phase: Phase },
    #[error("frame is for migration {got:?}, expected {expected:?}")]
    WrongId {
        expected: MigrationId,
        got: MigrationId,
    },
    #[error("start does not match the accepted offer: {0}")]
    StartMismatch(&'static str),
    #[error("batch of round {got}, expected round {expected}")]
    WrongRound { expected: u32, got: u32 },
    #[error("more than {MAX_ROUNDS} rounds")]
    TooManyRounds,
    #[error("round {round} carried {pages} pages in {batches} batches; the VM has {page_count}")]
    RoundTooLarge {
        round: u32,
        pages: u64,
        batches: u64,
        page_count: u64,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stale range {start}+{len} is outside the VM's {page_count} pages")]
    BadRange {
        start: u64,
        len: u64,
        page_count: u64,
    },
    #[error("complete signature: {0}")]
    CompleteSignature(VerifyError),
    #[error("complete does not match this transfer: {0}")]
    CompleteMismatch(&'static str),
    #[error("complete arrived with {0} pages still missing")]
    PagesMissing(u64),
    #[error("memory root mismatch: source says {claimed:?}, received memory hashes to {actual:?}")]
    BadRoot { claimed: Hash, actual: Hash },
}

impl ReceiveError {
    /// The reason to send back in an `Abort`.
    pub fn abort_reason(&self) -> AbortReason {
        match self {
            ReceiveError::Frame(_) => AbortReason::BadBatch,
            ReceiveError::BadRoot { .. } | ReceiveError::CompleteSignature(_) => {
                AbortReason::BadRoot
            }
            _ => AbortReason::Protocol,
        }
    }
}

/// Counters of a receiving transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    pub rounds: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

/// A bitmap over page numbers.
#[derive(Debug, Clone)]
struct Bitmap {
    words: Vec<u64>,
    set: u64,
}

impl Bitmap {
    fn new(bits: u64) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64) as usize],
            set: 0,
        }
    }
    fn slot(i: u64) -> (usize, u64) {
        ((i / 64) as usize, 1u64 << (i % 64))
    }
    fn get(&self, i: u64) -> bool {
        let (at, mask) = Self::slot(i);
        self.words[at] & mask != 0
    }
    fn insert(&mut self, i: u64) {
        let (at, mask) = Self::slot(i);
        if self.words[at] & mask == 0 {
            self.words[at] |= mask;
            self.set += 1;
        }
    }
    fn remove(&mut self, i: u64) -> bool {
        let (at, mask) = Self::slot(i);
        if self.words[at] & mask == 0 {
            return false;
        }
        self.words[at] &= !mask;
        self.set -= 1;
        true
    }
}

/// The target side of one transfer.
#[derive(Debug, Clone)]
pub struct Receiver {
    accepted: Accepted,
    phase: Phase,
    round: u32,
    leaves: Leaves,
    /// Post-copy: pages whose switchover version has not arrived.
    missing: Option<Bitmap>,
    device: Option<Hash>,
    /// Pages named stale so far: never more than the VM has, so stale ranges cost at most one
    /// pass over the VM's pages in all.
    stale_total: u64,
    /// Pages and batches of the current pre-copy round: a round sends each page at most once,
    /// so it carries at most `page_count` pages (in at most `page_count + 1` batches).
    round_pages: u64,
    round_batches: u64,
    stats: ReceiveStats,
}

impl Receiver {
    /// A receiver for an accepted offer. `page_count` must already be within the target's
    /// admission limits (it sizes the leaf table: 32 bytes per page).
    pub fn new(accepted: Accepted) -> Self {
        let leaves = Leaves::new(accepted.page_count);
        Self {
            accepted,
            phase: Phase::AwaitStart,
            round: 0,
            leaves,
            missing: None,
            device: None,
            stale_total: 0,
            round_pages: 0,
            round_batches: 0,
            stats: ReceiveStats::default(),
        }
    }

    /// The VM's memory in pages, as accepted.
    pub fn page_count(&self) -> u64 {
        self.accepted.page_count
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Counters so far.
    pub fn stats(&self) -> ReceiveStats {
        self.stats
    }

    /// Post-copy: whether page `pfn` has not arrived yet (the VM must wait for it).
    pub fn is_missing(&self, pfn: u64) -> bool {
        self.missing
            .as_ref()
            .is_some_and(|m| pfn < self.accepted.page_count && m.get(pfn))
    }

    /// Post-copy: the pages that have not arrived yet, as runs `(start, len)` in page order.
    pub fn missing_ranges(&self) -> Vec<(u64, u64)> {
        let Some(m) = &self.missing else {
            return Vec::new();
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (w, &word) in m.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let pfn = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match out.last_mut() {
                    Some((start, len)) if *start + *len == pfn => *len += 1,
                    _ => out.push((pfn, 1)),
                }
            }
        }
        out
    }

    /// Post-copy: how many pages have not arrived yet.
    pub fn missing_count(&self) -> u64 {
        self.missing.as_ref().map_or(0, |m| m.set)
    }

    fn out_of_order(&self, frame: &'static str) -> ReceiveError {
        ReceiveError::OutOfOrder {
            frame,
            phase: self.phase,
        }
    }

    fn check_id(&self, id: &MigrationId) -> Result<(), ReceiveError> {
        if id != &self.accepted.id {
            return Err(ReceiveError::WrongId {
                expected: self.accepted.id,
                got: *id,
            });
        }
        Ok(())
    }

    /// Takes one frame from the source. After an error the transfer is over: send `Abort`
    /// with [`ReceiveError::abort_reason`] and discard the incoming VM.
    pub fn on_frame<'a>(&mut self, frame: &'a TransferFrame) -> Result<Step<'a>, ReceiveError> {
        let result = self.step(frame);
        if result.is_err() {
            self.phase = Phase::Aborted;
        }
        result
    }

    fn step<'a>(&mut self, frame: &'a TransferFrame) -> Result<Step<'a>, ReceiveError> {
        use Phase::*;
        match (self.phase, frame) {
            (AwaitStart, TransferFrame::Start(s)) => {
                self.check_id(&s.id)?;
                let a = &self.accepted;
                if s.offer != a.offer {
                    return Err(ReceiveError::StartMismatch("offer hash"));
                }
                if s.mode != a.mode {
                    return Err(ReceiveError::StartMismatch("mode"));
                }
                if s.page_size as usize != PAGE_SIZE {
                    return Err(ReceiveError::StartMismatch("page size"));
                }
                if s.page_count != a.page_count {
                    return Err(ReceiveError::StartMismatch("page count"));
                }
                if s.data_connections > a.data_connections {
                    return Err(ReceiveError::StartMismatch("data connections"));
                }
                self.phase = Copying;
                Ok(Step::Continue)
            }
            (Copying | PostCopy, TransferFrame::Pages(batch)) => {
                let leaves = batch.checked_leaves(self.accepted.page_count)?;
                self.take_pages(batch, &leaves)
            }
            (Copying, TransferFrame::RoundEnd(r)) => {
                if r.round != self.round {
                    return Err(ReceiveError::WrongRound {
                        expected: self.round,
                        got: r.round,
                    });
                }
                self.round += 1;
                self.round_pages = 0;
                self.round_batches = 0;
                self.stats.rounds = self.round;
                // Between rounds, while the VM still runs at the source: the root at the
                // switchover then hashes only the last round's groups.
                self.leaves.refresh();
                if self.round >= MAX_ROUNDS {
                    return Err(ReceiveError::TooManyRounds);
                }
                Ok(Step::Continue)
            }
            (Copying | Switching, TransferFrame::Stale(stale))
                if self.accepted.mode != Mode::PreCopy =>
            {
                let page_count = self.accepted.page_count;
                let missing = self.missing.get_or_insert_with(|| Bitmap::new(page_count));
                for &(start, len) in &stale.ranges {
                    let end = start.checked_add(len).filter(|&e| e <= page_count);
                    let total = self.stale_total.saturating_add(len);
                    let (Some(end), true) = (end, total <= page_count) else {
                        return Err(ReceiveError::BadRange {
                            start,
                            len,
                            page_count,
                        });
                    };
                    self.stale_total = total;
                    for pfn in start..end {
                        missing.insert(pfn);
                    }
                }
                self.phase = Switching;
                Ok(Step::Continue)
            }
            (Copying | Switching, TransferFrame::DeviceState(d)) => {
                d.check()?;
                self.device = Some(d.hash);
                // A pre-copy ending: pre-copy, or hybrid whose rounds converged (nothing was
                // named stale). The VM resumes here only once the root verified.
                let pre_copy_ending = match self.accepted.mode {
                    Mode::PreCopy => true,
                    Mode::Hybrid => self.phase == Copying,
                    Mode::PostCopy => false,
                };
                if pre_copy_ending {
                    self.phase = AwaitComplete;
                    Ok(Step::LoadDevice(&d.bytes))
                } else {
                    self.missing
                        .get_or_insert_with(|| Bitmap::new(self.accepted.page_count));
                    self.phase = PostCopy;
                    Ok(Step::LoadDeviceAndResume(&d.bytes))
                }
            }
            (AwaitComplete | PostCopy, TransferFrame::Complete(signed)) => {
                let c = signed
                    .verify_by(&self.accepted.source)
                    .map_err(ReceiveError::CompleteSignature)?;
                self.check_id(&c.id)?;
                if c.offer != self.accepted.offer {
                    return Err(ReceiveError::CompleteMismatch("offer hash"));
                }
                if c.page_count != self.accepted.page_count {
                    return Err(ReceiveError::CompleteMismatch("page count"));
                }
                if self.missing_count() > 0 {
                    return Err(ReceiveError::PagesMissing(self.missing_count()));
                }
                let device = self.device.expect("device state precedes these phases");
                let actual = self.leaves.root(&device);
                if actual != c.root {
                    return Err(ReceiveError::BadRoot {
                        claimed: c.root,
                        actual,
                    });
                }
                self.phase = Verified;
                Ok(Step::Verified { root: actual })
            }
            (
                AwaitStart | Copying | Switching | AwaitComplete,
                TransferFrame::Abort(Abort { id, reason }),
            ) => {
                self.check_id(id)?;
                self.phase = Aborted;
                Ok(Step::Aborted(reason.clone()))
            }
            (_, f) => Err(self.out_of_order(frame_name(f))),
        }
    }

    /// Takes a batch the node checked already ([`PageBatch::into_checked`]), as
    /// [`Receiver::on_frame`] takes a `Pages` frame, without hashing it again.
    pub fn on_checked<'a>(&mut self, checked: &'a CheckedBatch) -> Result<Step<'a>, ReceiveError> {
        let result = match self.phase {
            _ if checked.page_count() != self.accepted.page_count => {
                Err(ReceiveError::StartMismatch("page count of a checked batch"))
            }
            Phase::Copying | Phase::PostCopy => self.take_pages(checked.batch(), checked.leaves()),
            _ => Err(self.out_of_order("Pages")),
        };
        if result.is_err() {
            self.phase = Phase::Aborted;
        }
        result
    }

    /// The pages of a checked batch, with their leaves, in phase `Copying` or `PostCopy`.
    fn take_pages<'a>(
        &mut self,
        batch: &'a PageBatch,
        leaves: &[Hash],
    ) -> Result<Step<'a>, ReceiveError> {
        if self.phase == Phase::Copying {
            self.expect_round(batch)?;
            let page_count = self.accepted.page_count;
            self.round_pages = self.round_pages.saturating_add(batch.entries.len() as u64);
            self.round_batches += 1;
            if self.round_pages > page_count || self.round_batches > page_count + 1 {
                return Err(ReceiveError::RoundTooLarge {
                    round: self.round,
                    pages: self.round_pages,
                    batches: self.round_batches,
                    page_count,
                });
            }
            let mut writes = Vec::with_capacity(leaves.len());
            for ((pfn, data), leaf) in batch.pages().zip(leaves) {
                self.leaves.set(pfn, *leaf);
                self.count(data);
                writes.push((pfn, data));
            }
            return Ok(Step::WritePages(writes));
        }
        let missing = self.missing.as_mut().expect("post-copy has a missing set");
        let mut writes = Vec::new();
        for ((pfn, data), leaf) in batch.pages().zip(leaves) {
            // Only the first copy of a missing page counts: the VM may already have changed
            // a page it holds, and a duplicate must not undo that.
            if missing.remove(pfn) {
                self.leaves.set(pfn, *leaf);
                self.stats.pages += 1;
                match data {
                    Some(d) => self.stats.bytes += d.len() as u64,
                    None => self.stats.zero_pages += 1,
                }
                writes.push((pfn, data));
            }
        }
        Ok(Step::WritePages(writes))
    }

    fn expect_round(&self, batch: &PageBatch) -> Result<(), ReceiveError> {
        if batch.round != self.round {
            return Err(ReceiveError::WrongRound {
                expected: self.round,
                got: batch.round,
            });
        }
        Ok(())
    }

    fn count(&mut self, data: Option<&[u8]>) {
        self.stats.pages += 1;
        match data {
            Some(d) => self.stats.bytes += d.len() as u64,
            None => self.stats.zero_pages += 1,
        }
    }
}

/// The name of a frame, for errors and logs.
pub fn frame_name(f: &TransferFrame) -> &'static str {
    match f {
        TransferFrame::Start(_) => "Start",
        TransferFrame::Pages(_) => "Pages",
        TransferFrame::RoundEnd(_) => "RoundEnd",
        TransferFrame::DeviceState(_) => "DeviceState",
        TransferFrame::Complete(_) => "Complete",
        TransferFrame::Commit(_) => "Commit",
        TransferFrame::Abort(_) => "Abort",
        TransferFrame::PageRequest(_) => "PageRequest",
        TransferFrame::Stale(_) => "Stale",
        TransferFrame::Applied(_) => "Applied",
        TransferFrame::Missing(_) => "Missing",
    }
}
