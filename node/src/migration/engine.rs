//! The transfer engine: the source and target loops of one migration over one stream.
//!
//! The source reads pages from its VMM in batches (each with its pages' leaves), sends them,
//! and follows the dirty log round by round; it switches over when the pages still dirty would
//! take no longer than the downtime limit at the bandwidth measured so far, or after the last
//! allowed round. Pre-copy then stops the VM, sends the last dirty pages and the device state,
//! and sends the signed root; post-copy (and hybrid, after its rounds) stops the VM, marks the
//! pages the target lacks as stale, hands over the device state so the target resumes at once,
//! then serves the target's page requests first and pushes the rest.
//!
//! The target feeds every frame to its [`Receiver`] and applies the steps to its VMM; after the
//! root verifies it records the commit durably (the caller's hook), resumes, and answers with a
//! signed `Commit`.
//!
//! What happens to the VM in each outcome follows the handoff rules: see [`SourceOutcome`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drift_protocol::migration::Mode;
use drift_protocol::transfer::receiver::{Receiver, Step};
use drift_protocol::transfer::sender::{Sender, SenderStep};
use drift_protocol::transfer::{
    memory_root, zero_leaf, Abort, AbortReason, Commit, Complete, DeviceState, PageBatch,
    PageRequest, RoundEnd, StaleRanges, Start, TransferFrame, MAX_PAGES_PER_BATCH,
    MAX_STALE_RANGES, PAGE_SIZE,
};
use drift_protocol::{Hash, MigrationId, SecretKey, Signed};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::sync::{mpsc, watch, Mutex};
use tokio_util::sync::CancellationToken;

use super::frames::{read_frame, write_frame};
use crate::hypervisor::vmm::{Request, Response, Vmm};

/// Frames from the peer waiting to be handled.
const INBOX: usize = 64;
/// Dirty pages fetched per request.
const DIRTY_CHUNK: u32 = 65_536;

/// What went wrong in a transfer.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("VMM: {0}")]
    Vmm(String),
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    #[error("cancelled")]
    Cancelled,
}

/// How long the target waits for the next frame before it decides the source is gone.
const TARGET_IDLE: Duration = Duration::from_secs(30);

/// The points of a transfer where the node acts: durable records, audit, fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Source: pre-copy round `n` (≥ 1) went out.
    RoundSent(u32),
    /// Source: about to pause the VM. The hook must make the switch durable: from here the
    /// target may end up running the VM.
    Pausing,
    /// Source: the VM is paused; its last pages are not sent yet.
    Paused,
    /// Source, post-copy: about to send the device state on which the target resumes. The
    /// hook must make the handover durable.
    HandingOver,
    /// Source, post-copy: the target runs the VM; the first pushed batch went out.
    Pushing,
    /// Source: `Complete` with this root went out.
    CompleteSent(Hash),
    /// Source: the target's signed commit arrived (the caller records it next).
    CommitReceived,
    /// Target: round `n` (≥ 1) arrived.
    RoundReceived(u32),
    /// Target: `Complete` arrived, not verified yet.
    CompleteReceived,
    /// Target, post-copy: about to resume the VM with pages still missing. The hook must make
    /// that durable: from here the VM has run here.
    ResumingPostCopy,
    /// Target: the root verified. The hook must make the commit durable; the VM resumes only
    /// after it succeeds.
    Verified(Hash),
    /// Target: the signed commit went out.
    CommitSent,
}

/// What the node does at each [`Point`]. An error stops the transfer there, as a failure of
/// the stream would.
pub trait Hooks: Sync {
    fn at(&self, point: Point) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

/// No hooks.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {
    async fn at(&self, _point: Point) -> std::io::Result<()> {
        Ok(())
    }
}

/// Access to one VM's VMM (in-process or over its socket).
pub trait VmmAccess: Send + Sync {
    /// One request, one answer.
    fn call(
        &self,
        req: Request,
    ) -> impl std::future::Future<Output = Result<Response, EngineError>> + Send;
}

impl VmmAccess for Arc<Vmm> {
    async fn call(&self, req: Request) -> Result<Response, EngineError> {
        Ok(self.handle(req))
    }
}

/// A VMM reached over its socket, on one connection kept open between requests (a fresh
/// one after any failure).
#[derive(Debug)]
pub struct SocketVmm {
    path: std::path::PathBuf,
    conn: Mutex<Option<tokio::net::UnixStream>>,
}

impl SocketVmm {
    /// A VMM at this socket path.
    pub fn new(path: std::path::PathBuf) -> Self {
        Self {
            path,
            conn: Mutex::new(None),
        }
    }
}

impl Clone for SocketVmm {
    /// The same VMM on a connection of its own.
    fn clone(&self) -> Self {
        Self::new(self.path.clone())
    }
}

impl VmmAccess for SocketVmm {
    async fn call(&self, req: Request) -> Result<Response, EngineError> {
        let mut conn = self.conn.lock().await;
        if conn.is_none() {
            let stream = crate::hypervisor::connect(&self.path)
                .await
                .map_err(|e| EngineError::Vmm(e.to_string()))?;
            *conn = Some(stream);
        }
        let stream = conn.as_mut().expect("connected above");
        match crate::hypervisor::exchange(stream, &req).await {
            Ok(r) => Ok(r),
            Err(e) => {
                *conn = None;
                Err(EngineError::Vmm(e.to_string()))
            }
        }
    }
}

async fn expect_done(vm: &impl VmmAccess, req: Request) -> Result<(), EngineError> {
    match vm.call(req).await? {
        Response::Done => Ok(()),
        Response::Error(e) => Err(EngineError::Vmm(e)),
        other => Err(EngineError::Vmm(format!("unexpected answer {other:?}"))),
    }
}

/// Source settings.
#[derive(Debug, Clone, Copy)]
pub struct SourceParams {
    pub mode: Mode,
    /// Pre-copy rounds after the first at most.
    pub max_rounds: u32,
    /// Switch over once the remaining dirty pages would take no longer than this.
    pub downtime_limit: Duration,
    /// Bytes per second at most on the stream.
    pub bandwidth_cap: Option<u64>,
    /// How long to wait for the target's commit.
    pub commit_timeout: Duration,
}

impl Default for SourceParams {
    fn default() -> Self {
        Self {
            mode: Mode::PreCopy,
            max_rounds: 30,
            downtime_limit: Duration::from_millis(50),
            bandwidth_cap: None,
            commit_timeout: Duration::from_secs(30),
        }
    }
}

/// Progress of a transfer, for `drift migrate --watch` and `drift migrations`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub phase: String,
    pub rounds: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    pub dirty_pages: u64,
    pub rate_bytes_per_s: f64,
    pub expected_downtime_ms: f64,
    pub downtime_ms: Option<f64>,
    pub total_ms: Option<f64>,
}

/// One transfer, as the source knows it.
#[derive(Debug, Clone)]
pub struct SourceTransfer {
    pub id: MigrationId,
    pub offer: Hash,
    pub page_count: u64,
    pub key: SecretKey,
    pub target: drift_protocol::NodeId,
}

/// How a transfer ended for the source.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceOutcome {
    /// The target committed: destroy the source copy.
    Committed { commit: Commit, progress: Progress },
    /// The VM runs here again (cancelled, refused or failed before switchover).
    ResumedHere { reason: String },
    /// The VM is paused here (pre-copy) or was handed over (post-copy) and no answer came:
    /// never resume on a guess; resolve with the target.
    Unknown { reason: String },
}

struct Source<'a, V, S, H> {
    vm: &'a V,
    hooks: &'a H,
    wr: WriteHalf<S>,
    inbox: mpsc::Receiver<Result<TransferFrame, String>>,
    sender: Sender,
    leaves: Vec<Hash>,
    params: SourceParams,
    progress: Progress,
    watch: &'a watch::Sender<Progress>,
    started: Instant,
    cancel: CancellationToken,
    /// Post-copy: from pause until the device state went out.
    switched_at: Option<Duration>,
}

impl<V: VmmAccess, S: AsyncRead + AsyncWrite + Send, H: Hooks> Source<'_, V, S, H> {
    async fn send(&mut self, frame: &TransferFrame) -> Result<(), EngineError> {
        let n = write_frame(&mut self.wr, frame).await?;
        self.progress.bytes_sent += n as u64;
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        self.progress.rate_bytes_per_s = self.progress.bytes_sent as f64 / elapsed;
        if let Some(cap) = self.params.bandwidth_cap {
            let due = self.progress.bytes_sent as f64 / cap as f64;
            if due > elapsed {
                tokio::time::sleep(Duration::from_secs_f64(due - elapsed)).await;
            }
        }
        Ok(())
    }

    async fn send_pages(&mut self, round: u32, pfns: &[u64]) -> Result<(), EngineError> {
        for chunk in pfns.chunks(MAX_PAGES_PER_BATCH) {
            // A cancel counts only before switchover; after it, the pages must go.
            if self.cancel.is_cancelled() && self.sender.may_resume_here() {
                return Err(EngineError::Cancelled);
            }
            let (batch, leaves) = match self
                .vm
                .call(Request::ReadBatch {
                    round,
                    pfns: chunk.to_vec(),
                })
                .await?
            {
                Response::Batch { batch, leaves } => (batch, leaves),
                Response::Error(e) => return Err(EngineError::Vmm(e)),
                other => return Err(EngineError::Vmm(format!("unexpected {other:?}"))),
            };
            for (e, l) in batch.entries.iter().zip(leaves) {
                self.leaves[e.pfn as usize] = l;
            }
            self.progress.pages_sent += batch.entries.len() as u64;
            self.send(&TransferFrame::Pages(batch)).await?;
            let _ = self.watch.send(self.progress.clone());
        }
        Ok(())
    }

    async fn dirty(&mut self) -> Result<Vec<u64>, EngineError> {
        let mut all = Vec::new();
        loop {
            match self
                .vm
                .call(Request::DirtyFetch { max: DIRTY_CHUNK })
                .await?
            {
                Response::Pfns { pfns, remaining } => {
                    all.extend(pfns);
                    if remaining == 0 || all.len() as u64 >= self.sender_pages() {
                        all.sort_unstable();
                        all.dedup();
                        return Ok(all);
                    }
                }
                other => return Err(EngineError::Vmm(format!("unexpected {other:?}"))),
            }
        }
    }

    fn sender_pages(&self) -> u64 {
        self.leaves.len() as u64
    }

    /// A frame from the target, if one is waiting.
    fn poll_target(&mut self) -> Result<Option<SenderStep>, EngineError> {
        match self.inbox.try_recv() {
            Ok(Ok(f)) => self
                .sender
                .on_frame(&f)
                .map(Some)
                .map_err(|e| EngineError::Protocol(e.to_string())),
            Ok(Err(e)) => Err(EngineError::Protocol(e)),
            Err(_) => Ok(None),
        }
    }

    async fn resume_here(&mut self, reason: String) -> Result<SourceOutcome, EngineError> {
        expect_done(self.vm, Request::Resume).await?;
        Ok(SourceOutcome::ResumedHere { reason })
    }

    async fn wait_commit(&mut self, paused_at: Instant) -> Result<SourceOutcome, EngineError> {
        let deadline = tokio::time::Instant::now() + self.params.commit_timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.inbox.recv()).await;
            let frame = match frame {
                Err(_) => {
                    return Ok(SourceOutcome::Unknown {
                        reason: "no commit before the timeout".into(),
                    })
                }
                Ok(None) => {
                    return Ok(SourceOutcome::Unknown {
                        reason: "stream closed before the commit".into(),
                    })
                }
                Ok(Some(Err(e))) => {
                    return Ok(SourceOutcome::Unknown {
                        reason: format!("stream failed before the commit: {e}"),
                    })
                }
                Ok(Some(Ok(f))) => f,
            };
            match self.sender.on_frame(&frame) {
                Ok(SenderStep::Committed(commit)) => {
                    self.hooks.at(Point::CommitReceived).await?;
                    let downtime = self.switched_at.unwrap_or_else(|| paused_at.elapsed());
                    self.progress.phase = "committed".into();
                    self.progress.downtime_ms = Some(downtime.as_secs_f64() * 1e3);
                    self.progress.total_ms = Some(self.started.elapsed().as_secs_f64() * 1e3);
                    let _ = self.watch.send(self.progress.clone());
                    return Ok(SourceOutcome::Committed {
                        commit,
                        progress: self.progress.clone(),
                    });
                }
                Ok(SenderStep::TargetAborted {
                    reason,
                    resume_here: true,
                }) => {
                    return self
                        .resume_here(format!("target aborted: {reason:?}"))
                        .await
                }
                Ok(SenderStep::TargetAborted { reason, .. }) => {
                    return Ok(SourceOutcome::Unknown {
                        reason: format!("target aborted after switchover: {reason:?}"),
                    })
                }
                Ok(SenderStep::ServePages(_)) => {}
                Err(e) => return Err(EngineError::Protocol(e.to_string())),
            }
        }
    }
}

/// Runs the source side. The VM must be running; on return the caller acts on the outcome.
pub async fn run_source<V: VmmAccess, S: AsyncRead + AsyncWrite + Send + 'static, H: Hooks>(
    vm: &V,
    hooks: &H,
    stream: S,
    t: SourceTransfer,
    params: SourceParams,
    watch: &watch::Sender<Progress>,
    cancel: CancellationToken,
) -> Result<SourceOutcome, EngineError> {
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, inbox) = mpsc::channel(INBOX);
    let reader = tokio::spawn(async move {
        loop {
            let r = match read_frame(&mut rd).await {
                Ok(Some(f)) => Ok(f),
                Ok(None) => break,
                Err(e) => Err(e.to_string()),
            };
            let failed = r.is_err();
            if tx.send(r).await.is_err() || failed {
                break;
            }
        }
    });
    let mut s = Source {
        vm,
        hooks,
        wr,
        inbox,
        sender: Sender::new(t.id, t.target, params.mode, t.page_count),
        leaves: vec![zero_leaf(); t.page_count as usize],
        params,
        progress: Progress {
            phase: "copying".into(),
            ..Default::default()
        },
        watch,
        started: Instant::now(),
        cancel,
        switched_at: None,
    };
    let result = source_loop(&mut s, &t).await;
    reader.abort();
    match result {
        Ok(outcome) => Ok(outcome),
        // Before switchover any failure leaves the VM on the source.
        Err(e) if s.sender.may_resume_here() => {
            let reason = match e {
                EngineError::Cancelled => AbortReason::Cancelled,
                _ => AbortReason::LocalError,
            };
            let _ = write_frame(&mut s.wr, &TransferFrame::Abort(Abort { id: t.id, reason })).await;
            s.sender.abandon();
            s.resume_here(format!("stopped before switchover: {e}"))
                .await
        }
        Err(e) => Ok(SourceOutcome::Unknown {
            reason: format!("failed after switchover: {e}"),
        }),
    }
}

async fn source_loop<V: VmmAccess, S: AsyncRead + AsyncWrite + Send, H: Hooks>(
    s: &mut Source<'_, V, S, H>,
    t: &SourceTransfer,
) -> Result<SourceOutcome, EngineError> {
    s.send(&TransferFrame::Start(Start {
        id: t.id,
        offer: t.offer,
        mode: s.params.mode,
        page_size: PAGE_SIZE as u32,
        page_count: t.page_count,
    }))
    .await?;
    expect_done(s.vm, Request::DirtyLogStart).await?;
    let mut round = 0u32;
    let mut carry: Vec<u64> = Vec::new();
    if s.params.mode != Mode::PostCopy {
        let all: Vec<u64> = (0..t.page_count).collect();
        s.send_pages(0, &all).await?;
        s.send(&TransferFrame::RoundEnd(RoundEnd {
            round: 0,
            pages_sent: t.page_count,
            dirty: 0,
        }))
        .await?;
        round = 1;
        loop {
            if s.cancel.is_cancelled() {
                let _ = s
                    .send(&TransferFrame::Abort(Abort {
                        id: t.id,
                        reason: AbortReason::Cancelled,
                    }))
                    .await;
                s.sender.abandon();
                return Ok(SourceOutcome::ResumedHere {
                    reason: "cancelled".into(),
                });
            }
            if let Some(SenderStep::TargetAborted { reason, .. }) = s.poll_target()? {
                // Still copying: the VM never stopped running here.
                return Ok(SourceOutcome::ResumedHere {
                    reason: format!("target aborted: {reason:?}"),
                });
            }
            let dirty = s.dirty().await?;
            s.progress.dirty_pages = dirty.len() as u64;
            let rate = s.progress.rate_bytes_per_s.max(1.0);
            let expected = dirty.len() as f64 * PAGE_SIZE as f64 / rate;
            s.progress.expected_downtime_ms = expected * 1e3;
            s.progress.rounds = round;
            let _ = s.watch.send(s.progress.clone());
            if expected <= s.params.downtime_limit.as_secs_f64() || round > s.params.max_rounds {
                carry = dirty;
                break;
            }
            s.send_pages(round, &dirty).await?;
            s.send(&TransferFrame::RoundEnd(RoundEnd {
                round,
                pages_sent: dirty.len() as u64,
                dirty: 0,
            }))
            .await?;
            s.hooks.at(Point::RoundSent(round)).await?;
            round += 1;
        }
    }

    // Switchover: the VM stops here.
    s.progress.phase = "switchover".into();
    s.hooks.at(Point::Pausing).await?;
    expect_done(s.vm, Request::Pause).await?;
    let paused_at = Instant::now();
    s.hooks.at(Point::Paused).await?;
    let mut last: BTreeSet<u64> = carry.into_iter().collect();
    last.extend(s.dirty().await?);
    let device = match s.vm.call(Request::DeviceState).await? {
        Response::Device(d) => d,
        other => return Err(EngineError::Vmm(format!("unexpected {other:?}"))),
    };
    let device_hash = Hash::of(&device);

    if s.params.mode == Mode::PreCopy {
        let last: Vec<u64> = last.into_iter().collect();
        s.send_pages(round, &last).await?;
        s.send(&TransferFrame::DeviceState(DeviceState::new(device)))
            .await?;
        return complete(s, t, device_hash, paused_at).await;
    }

    // Post-copy (or hybrid after its rounds): the target lacks every page not yet sent.
    let stale: Vec<u64> = if s.params.mode == Mode::PostCopy {
        let mut nonzero = Vec::new();
        let mut from = 0;
        loop {
            match s
                .vm
                .call(Request::NonZero {
                    from,
                    max: DIRTY_CHUNK,
                })
                .await?
            {
                Response::Pfns { pfns, .. } if pfns.is_empty() => break,
                Response::Pfns { pfns, .. } => {
                    from = pfns.last().map_or(t.page_count, |p| p + 1);
                    nonzero.extend(pfns);
                }
                other => return Err(EngineError::Vmm(format!("unexpected {other:?}"))),
            }
        }
        nonzero
    } else {
        last.into_iter().collect()
    };
    for chunk in stale.chunks(MAX_STALE_RANGES) {
        let ranges = chunk.iter().map(|&p| (p, 1)).collect();
        s.send(&TransferFrame::Stale(StaleRanges { ranges }))
            .await?;
    }
    s.hooks.at(Point::HandingOver).await?;
    s.sender.switched();
    s.send(&TransferFrame::DeviceState(DeviceState::new(device)))
        .await?;
    // The target resumes on this frame: the VM's downtime ends about here.
    s.switched_at = Some(paused_at.elapsed());
    s.progress.phase = "post-copy".into();
    // Serve requests first, push the rest; each page goes once.
    let mut pending: BTreeSet<u64> = stale.into_iter().collect();
    let mut pushed = false;
    while !pending.is_empty() {
        let mut urgent = Vec::new();
        while let Some(step) = s.poll_target()? {
            match step {
                SenderStep::ServePages(pfns) => {
                    urgent.extend(pfns.into_iter().filter(|p| pending.contains(p)))
                }
                SenderStep::TargetAborted { reason, .. } => {
                    return Ok(SourceOutcome::Unknown {
                        reason: format!("target aborted after switchover: {reason:?}"),
                    })
                }
                SenderStep::Committed(_) => {
                    return Err(EngineError::Protocol("commit before complete".into()))
                }
            }
        }
        let batch: Vec<u64> = if urgent.is_empty() {
            pending.iter().take(MAX_PAGES_PER_BATCH).copied().collect()
        } else {
            urgent.sort_unstable();
            urgent.dedup();
            urgent
        };
        for p in &batch {
            pending.remove(p);
        }
        s.send_pages(round, &batch).await?;
        if !pushed {
            pushed = true;
            s.hooks.at(Point::Pushing).await?;
        }
    }
    complete(s, t, device_hash, paused_at).await
}

async fn complete<V: VmmAccess, S: AsyncRead + AsyncWrite + Send, H: Hooks>(
    s: &mut Source<'_, V, S, H>,
    t: &SourceTransfer,
    device_hash: Hash,
    paused_at: Instant,
) -> Result<SourceOutcome, EngineError> {
    let root = memory_root(&s.leaves, &device_hash);
    s.sender.complete_sent(root);
    s.send(&TransferFrame::Complete(Signed::sign(
        &Complete {
            id: t.id,
            offer: t.offer,
            root,
            page_count: t.page_count,
        },
        &t.key,
    )))
    .await?;
    s.hooks.at(Point::CompleteSent(root)).await?;
    s.progress.phase = "awaiting commit".into();
    let _ = s.watch.send(s.progress.clone());
    s.wait_commit(paused_at).await
}

/// How a transfer ended for the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetOutcome {
    /// The VM runs here; the commit was recorded and sent.
    Committed { root: Hash },
    /// Nothing runs here: discard the incoming VM.
    Aborted { reason: String },
    /// Post-copy: the VM runs here but the source went away before every page arrived.
    Incomplete { reason: String },
}

/// Runs the target side for an accepted offer. The hook at [`Point::Verified`] must make the
/// commit durable; the VM is resumed only after it succeeds.
pub async fn run_target<
    V: VmmAccess + Clone + 'static,
    S: AsyncRead + AsyncWrite + Send + 'static,
    H: Hooks,
>(
    vm: &V,
    hooks: &H,
    stream: S,
    mut receiver: Receiver,
    id: MigrationId,
    key: &SecretKey,
) -> Result<TargetOutcome, EngineError> {
    let (mut rd, wr) = tokio::io::split(stream);
    let wr = Arc::new(Mutex::new(wr));
    let mut faults: Option<tokio::task::JoinHandle<()>> = None;
    let outcome = loop {
        let frame = match tokio::time::timeout(TARGET_IDLE, read_frame(&mut rd)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None) | Err(_)) | Err(_) => {
                break if receiver.phase() == drift_protocol::transfer::receiver::Phase::PostCopy {
                    TargetOutcome::Incomplete {
                        reason: "the source went away during post-copy".into(),
                    }
                } else {
                    TargetOutcome::Aborted {
                        reason: "the source went away".into(),
                    }
                };
            }
        };
        let running_here = receiver.phase() == drift_protocol::transfer::receiver::Phase::PostCopy;
        if matches!(frame, TransferFrame::Complete(_)) {
            hooks.at(Point::CompleteReceived).await?;
        }
        let step = match receiver.on_frame(&frame) {
            Ok(step) => step,
            // Post-copy: the VM already runs here and nowhere else; a bad frame must not
            // make anyone discard it.
            Err(e) if running_here => {
                break TargetOutcome::Incomplete {
                    reason: format!("source broke the protocol during post-copy: {e}"),
                };
            }
            Err(e) => {
                let _ = write_frame(
                    &mut *wr.lock().await,
                    &TransferFrame::Abort(Abort {
                        id,
                        reason: e.abort_reason(),
                    }),
                )
                .await;
                break TargetOutcome::Aborted {
                    reason: e.to_string(),
                };
            }
        };
        match step {
            Step::Continue => match &frame {
                TransferFrame::Stale(st) => {
                    expect_done(vm, Request::MarkMissing(st.ranges.clone())).await?;
                }
                TransferFrame::RoundEnd(r) if r.round >= 1 => {
                    hooks.at(Point::RoundReceived(r.round)).await?;
                }
                _ => {}
            },
            Step::WritePages(w) => {
                let TransferFrame::Pages(b) = &frame else {
                    continue;
                };
                let batch = if w.len() == b.entries.len() {
                    b.clone()
                } else {
                    PageBatch::build(
                        b.round,
                        w.iter()
                            .map(|(p, d)| (*p, d.unwrap_or(&[0u8; PAGE_SIZE][..]))),
                    )
                };
                if !batch.entries.is_empty() {
                    expect_done(vm, Request::WriteBatch(batch)).await?;
                }
            }
            Step::LoadDevice(d) => expect_done(vm, Request::LoadDevice(d.to_vec())).await?,
            Step::LoadDeviceAndResume(d) => {
                expect_done(vm, Request::LoadDevice(d.to_vec())).await?;
                hooks.at(Point::ResumingPostCopy).await?;
                expect_done(vm, Request::Resume).await?;
                faults = Some(forward_faults(vm.clone(), wr.clone()));
            }
            Step::Verified { root } => {
                if let Some(f) = faults.take() {
                    f.abort();
                }
                hooks.at(Point::Verified(root)).await?;
                expect_done(vm, Request::Resume).await?;
                let commit = Signed::sign(
                    &Commit {
                        id,
                        root,
                        committed_at: crate::clock::now(),
                    },
                    key,
                );
                // The VM runs here now, whatever happens to the stream: a lost commit is
                // what the source's resolve query is for.
                let sent = write_frame(&mut *wr.lock().await, &TransferFrame::Commit(commit)).await;
                if sent.is_ok() {
                    let _ = hooks.at(Point::CommitSent).await;
                }
                break TargetOutcome::Committed { root };
            }
            Step::Aborted(reason) => {
                break TargetOutcome::Aborted {
                    reason: format!("source aborted: {reason:?}"),
                }
            }
        }
    };
    if let Some(f) = faults {
        f.abort();
    }
    Ok(outcome)
}

/// Post-copy: forwards the guest's page faults to the source as page requests.
fn forward_faults<V: VmmAccess + 'static, W: AsyncWrite + Unpin + Send + 'static>(
    vm: V,
    wr: Arc<Mutex<W>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let Ok(Response::Pfns { pfns, remaining }) = vm
                .call(Request::Faults {
                    max: drift_protocol::transfer::MAX_PAGE_REQUEST as u32,
                })
                .await
            else {
                return;
            };
            if !pfns.is_empty() {
                let req = TransferFrame::PageRequest(PageRequest { pfns });
                if write_frame(&mut *wr.lock().await, &req).await.is_err() {
                    return;
                }
            }
            if remaining == 0 {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{RunState, VmSpec};
    use drift_protocol::migration::Placement;
    use drift_protocol::transfer::receiver::Accepted;
    use drift_protocol::VmId;

    fn spec(incoming: bool, dirty: u64) -> VmSpec {
        VmSpec {
            id: VmId::from_bytes([4; 16]),
            name: "vm".into(),
            memory_mib: 16,
            vcpus: 1,
            demand_permille: 100,
            dirty_pages_per_s: dirty,
            placement: Placement::default(),
            seed: 99,
            incoming,
            qemu: None,
        }
    }

    /// Keeps the root the target verified, as the node's durable record would.
    struct RecordCommit(Arc<std::sync::Mutex<Option<Hash>>>);

    impl Hooks for RecordCommit {
        async fn at(&self, point: Point) -> std::io::Result<()> {
            if let Point::Verified(root) = point {
                *self.0.lock().unwrap() = Some(root);
            }
            Ok(())
        }
    }

    struct Run {
        source: SourceOutcome,
        target: TargetOutcome,
        src: Arc<Vmm>,
        dst: Arc<Vmm>,
        committed: Option<Hash>,
        /// The source VM's state when the engine returned.
        src_state: RunState,
        src_clean: bool,
    }

    /// What a man in the middle does to the source-to-target direction.
    #[derive(Clone, Copy)]
    enum Tamper {
        /// Flips one bit of the byte at this offset of the stream.
        FlipByte(usize),
        /// Rewrites the source's `Complete` frame, passing every other frame on unchanged.
        Complete(fn(Signed<Complete>) -> Signed<Complete>),
    }

    /// Migrates a running VM between two in-process VMMs over an in-memory pipe; `tamper`
    /// may rewrite what the target receives.
    async fn migrate(mode: Mode, dirty: u64, tamper: Option<Tamper>) -> Run {
        let src = Vmm::new(spec(false, dirty));
        let dst = Vmm::new(spec(true, dirty));
        let w1 = src.start_workload();
        let w2 = dst.start_workload();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let skey = SecretKey::from_bytes(&[1; 32]);
        let tkey = SecretKey::from_bytes(&[2; 32]);
        let id = MigrationId::from_bytes([7; 16]);
        let offer = Hash::of(b"offer");
        let pages = 16 * 256;
        let (a, b) = tokio::io::duplex(1 << 20);
        // A man in the middle on the source-to-target direction.
        let (b, target_side) = match tamper {
            None => (b, None),
            Some(tamper) => {
                let (mitm_in, mitm_out) = tokio::io::duplex(1 << 20);
                let handle = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let (mut from_src_r, mut from_src_w) = tokio::io::split(b);
                    let (mut to_dst_r, mut to_dst_w) = tokio::io::split(mitm_in);
                    let up = async {
                        match tamper {
                            Tamper::FlipByte(at) => {
                                let mut seen = 0usize;
                                let mut buf = vec![0u8; 64 * 1024];
                                loop {
                                    let n = from_src_r.read(&mut buf).await.unwrap_or(0);
                                    if n == 0 {
                                        break;
                                    }
                                    if at >= seen && at < seen + n {
                                        buf[at - seen] ^= 0x20;
                                    }
                                    seen += n;
                                    if to_dst_w.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                            Tamper::Complete(rewrite) => {
                                while let Ok(Some(frame)) = read_frame(&mut from_src_r).await {
                                    let frame = match frame {
                                        TransferFrame::Complete(c) => {
                                            TransferFrame::Complete(rewrite(c))
                                        }
                                        other => other,
                                    };
                                    if write_frame(&mut to_dst_w, &frame).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to_dst_w.shutdown().await;
                    };
                    let down = tokio::io::copy(&mut to_dst_r, &mut from_src_w);
                    let _ = tokio::join!(up, down);
                });
                (mitm_out, Some(handle))
            }
        };
        let accepted = Accepted {
            id,
            offer,
            source: skey.public(),
            mode,
            page_count: pages,
        };
        let committed = Arc::new(std::sync::Mutex::new(None));
        let target = {
            let dst = dst.clone();
            let committed = committed.clone();
            tokio::spawn(async move {
                let hooks = RecordCommit(committed);
                run_target(&dst, &hooks, b, Receiver::new(accepted), id, &tkey)
                    .await
                    .unwrap()
            })
        };
        let (watch_tx, _watch_rx) = watch::channel(Progress::default());
        let source = run_source(
            &src,
            &NoHooks,
            a,
            SourceTransfer {
                id,
                offer,
                page_count: pages,
                key: skey.clone(),
                target: SecretKey::from_bytes(&[2; 32]).public(),
            },
            SourceParams {
                mode,
                max_rounds: 8,
                downtime_limit: Duration::from_millis(50),
                bandwidth_cap: None,
                commit_timeout: Duration::from_secs(10),
            },
            &watch_tx,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let target = target.await.unwrap();
        if let Some(h) = target_side {
            h.abort();
        }
        let committed = *committed.lock().unwrap();
        let src_state = src.info().state;
        let src_clean = verified_clean(&src);
        src.shut_down();
        dst.shut_down();
        let _ = tokio::task::spawn_blocking(move || {
            w1.join().ok();
            w2.join().ok();
        })
        .await;
        Run {
            source,
            target,
            src,
            dst,
            committed,
            src_state,
            src_clean,
        }
    }

    fn verified_clean(vm: &Vmm) -> bool {
        matches!(vm.handle(Request::Verify), Response::Verified(r) if r.bad_count == 0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_mode_moves_a_running_vm_and_commits() {
        for mode in [Mode::PreCopy, Mode::PostCopy, Mode::Hybrid] {
            let r = migrate(mode, 4_000, None).await;
            let SourceOutcome::Committed { commit, progress } = &r.source else {
                panic!("{mode}: {:?}", r.source);
            };
            assert_eq!(r.target, TargetOutcome::Committed { root: commit.root });
            assert_eq!(
                r.committed,
                Some(commit.root),
                "{mode}: commit recorded first"
            );
            assert!(verified_clean(&r.dst), "{mode}");
            assert!(progress.downtime_ms.is_some() && progress.pages_sent > 0);
            // The guest carried on from the source's device state.
            assert!(r.dst.info().writes >= r.src.info().writes, "{mode}");
            // The source stayed paused from switchover on: its copy is the one handed over.
            assert_eq!(r.src_state, RunState::Paused, "{mode}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flipped_byte_in_transit_aborts_and_the_vm_runs_on_the_source() {
        // Byte 200_000 falls inside the first round's page data.
        let r = migrate(Mode::PreCopy, 2_000, Some(Tamper::FlipByte(200_000))).await;
        assert_refused_and_home(&r);
    }

    /// The target refused: nothing committed, nothing runs there, the VM runs on the source
    /// and verifies clean.
    fn assert_refused_and_home(r: &Run) {
        assert!(
            matches!(&r.source, SourceOutcome::ResumedHere { .. }),
            "{:?}",
            r.source
        );
        assert!(
            matches!(&r.target, TargetOutcome::Aborted { .. }),
            "{:?}",
            r.target
        );
        assert_eq!(r.committed, None);
        assert_ne!(r.dst.info().state, RunState::Running);
        assert_eq!(r.src_state, RunState::Running);
        assert!(r.src_clean);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_root_signed_by_the_source_aborts_and_the_vm_runs_on_the_source() {
        // The source's own key signs a root that is not the memory's: the pages verified batch
        // by batch, but the whole does not match.
        fn wrong_root(c: Signed<Complete>) -> Signed<Complete> {
            let mut complete = c.verify().unwrap();
            complete.root = Hash::of(b"not the memory");
            Signed::sign(&complete, &SecretKey::from_bytes(&[1; 32]))
        }
        // Pre-copy: the target verifies before the VM ever runs there. (In post-copy the VM
        // already runs on the target when `Complete` arrives; there a bad root makes the
        // migration incomplete, see the receiver's tests.)
        let r = migrate(Mode::PreCopy, 2_000, Some(Tamper::Complete(wrong_root))).await;
        assert_refused_and_home(&r);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_complete_forged_by_a_third_key_aborts_and_the_vm_runs_on_the_source() {
        // The right root, signed by a key that is not the offer's source.
        fn forged(c: Signed<Complete>) -> Signed<Complete> {
            Signed::sign(&c.verify().unwrap(), &SecretKey::from_bytes(&[3; 32]))
        }
        let r = migrate(Mode::PreCopy, 2_000, Some(Tamper::Complete(forged))).await;
        assert_refused_and_home(&r);
    }
}
