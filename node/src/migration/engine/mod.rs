//! The transfer engine of sandbox VMs: the source ([`source`]) and target ([`target`]) loops
//! of one migration over one [`Link`](super::link::Link) (the migration's data connections,
//! or its stream).
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

pub mod source;
pub mod target;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use drift_protocol::migration::Mode;
use drift_protocol::transfer::convergence::{Action, Fallback, Limits};
use drift_protocol::transfer::{is_zero_page, Commit, PageBatch, PAGE_SIZE};
use drift_protocol::{Hash, MigrationId, SecretKey};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::hypervisor::shared::SharedMemory;
use crate::hypervisor::vmm::{Request, Response, Vmm};

pub use source::run_source;
pub use target::run_target;

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
    /// Source, post-copy: about to pause the VM, whose device state the target will resume
    /// on. The hook must make the handover durable.
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

    /// Source: pages `pfns` (at most a batch) as a batch of `round`, with each entry's leaf.
    fn read_batch(
        &self,
        round: u32,
        pfns: &[u64],
    ) -> impl std::future::Future<Output = Result<(PageBatch, Vec<Hash>), EngineError>> + Send {
        read_batch_by_request(self, round, pfns)
    }

    /// Target: stores pages that arrived (`None`: a zero page). `whole` is their batch when
    /// they are all of it.
    fn write_pages(
        &self,
        writes: &[(u64, Option<&[u8]>)],
        whole: Option<&PageBatch>,
    ) -> impl std::future::Future<Output = Result<(), EngineError>> + Send {
        write_pages_by_request(self, writes, whole)
    }

    /// Source: up to `max` numbers, ascending from `from`, of pages that are not all zero.
    fn nonzero(
        &self,
        from: u64,
        max: u32,
    ) -> impl std::future::Future<Output = Result<Vec<u64>, EngineError>> + Send {
        nonzero_by_request(self, from, max)
    }

    /// Source: takes up to `max` pages out of the dirty log; with how many are left.
    fn take_dirty(
        &self,
        max: u32,
    ) -> impl std::future::Future<Output = Result<(Vec<u64>, u64), EngineError>> + Send {
        async move {
            match self.call(Request::DirtyFetch { max }).await? {
                Response::Pfns { pfns, remaining } => Ok((pfns, remaining)),
                other => Err(EngineError::Vmm(format!("unexpected {other:?}"))),
            }
        }
    }
}

/// [`VmmAccess::nonzero`] as a request.
async fn nonzero_by_request<V: VmmAccess + ?Sized>(
    vm: &V,
    from: u64,
    max: u32,
) -> Result<Vec<u64>, EngineError> {
    match vm.call(Request::NonZero { from, max }).await? {
        Response::Pfns { pfns, .. } => Ok(pfns),
        other => Err(EngineError::Vmm(format!("unexpected {other:?}"))),
    }
}

/// [`VmmAccess::read_batch`] as a request: the pages cross the VMM's socket.
async fn read_batch_by_request<V: VmmAccess + ?Sized>(
    vm: &V,
    round: u32,
    pfns: &[u64],
) -> Result<(PageBatch, Vec<Hash>), EngineError> {
    let req = Request::ReadBatch {
        round,
        pfns: pfns.to_vec(),
    };
    match vm.call(req).await? {
        Response::Batch { batch, leaves } => Ok((batch, leaves)),
        Response::Error(e) => Err(EngineError::Vmm(e)),
        other => Err(EngineError::Vmm(format!("unexpected {other:?}"))),
    }
}

/// [`VmmAccess::write_pages`] as a request.
async fn write_pages_by_request<V: VmmAccess + ?Sized>(
    vm: &V,
    writes: &[(u64, Option<&[u8]>)],
    whole: Option<&PageBatch>,
) -> Result<(), EngineError> {
    let batch = match whole {
        Some(b) => b.clone(),
        None => PageBatch::build(
            0,
            writes
                .iter()
                .map(|(p, d)| (*p, d.unwrap_or(&[0u8; PAGE_SIZE][..]))),
        ),
    };
    expect_done(vm, Request::WriteBatch(batch)).await
}

impl VmmAccess for Arc<Vmm> {
    async fn call(&self, req: Request) -> Result<Response, EngineError> {
        Ok(self.handle(req))
    }
}

/// A VMM reached over its socket, on one connection kept open between requests (a fresh
/// one after any failure). Pages do not cross the socket: the node maps the guest's memory
/// (see [`crate::hypervisor::shared`]) on first use and reads, writes and takes dirty bits
/// there; only a VMM that does not share its memory gets them as requests.
#[derive(Debug)]
pub struct SocketVmm {
    path: std::path::PathBuf,
    conn: Mutex<Option<tokio::net::UnixStream>>,
    memory: Arc<tokio::sync::OnceCell<Option<Arc<SharedMemory>>>>,
}

impl SocketVmm {
    /// A VMM at this socket path.
    pub fn new(path: std::path::PathBuf) -> Self {
        Self {
            path,
            conn: Mutex::new(None),
            memory: Arc::default(),
        }
    }

    /// The guest's memory, mapped here (asked for once).
    async fn memory(&self) -> Option<Arc<SharedMemory>> {
        self.memory
            .get_or_init(|| async {
                let path = self.path.clone();
                match tokio::task::spawn_blocking(move || crate::hypervisor::shared::request(&path))
                    .await
                {
                    Ok(Ok(m)) => Some(Arc::new(m)),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "the VMM does not share its memory: pages go through its socket");
                        None
                    }
                    Err(_) => None,
                }
            })
            .await
            .clone()
    }
}

impl Clone for SocketVmm {
    /// The same VMM on a connection of its own (and the same mapping of its memory).
    fn clone(&self) -> Self {
        Self {
            path: self.path.clone(),
            conn: Mutex::new(None),
            memory: self.memory.clone(),
        }
    }
}

fn shared_error(e: crate::hypervisor::shared::SharedError) -> EngineError {
    EngineError::Vmm(e.to_string())
}

impl VmmAccess for SocketVmm {
    async fn read_batch(
        &self,
        round: u32,
        pfns: &[u64],
    ) -> Result<(PageBatch, Vec<Hash>), EngineError> {
        let Some(memory) = self.memory().await else {
            return read_batch_by_request(self, round, pfns).await;
        };
        if let Some(&pfn) = pfns.iter().find(|&&p| p >= memory.page_count()) {
            return Err(EngineError::Vmm(format!(
                "page {pfn} is beyond the VM's {} pages",
                memory.page_count()
            )));
        }
        let buffer = crate::migration::buffers::take();
        Ok(PageBatch::build_into(round, pfns, buffer, |pfn, out| {
            let _ = memory.read_page(pfn, out);
        }))
    }

    async fn write_pages(
        &self,
        writes: &[(u64, Option<&[u8]>)],
        whole: Option<&PageBatch>,
    ) -> Result<(), EngineError> {
        let Some(memory) = self.memory().await else {
            return write_pages_by_request(self, writes, whole).await;
        };
        for &(pfn, data) in writes {
            memory.write_page(pfn, data).map_err(shared_error)?;
            // After the page: a post-copy guest waiting on it may touch it now.
            memory.clear_missing(pfn);
        }
        Ok(())
    }

    async fn nonzero(&self, from: u64, max: u32) -> Result<Vec<u64>, EngineError> {
        let Some(memory) = self.memory().await else {
            return nonzero_by_request(self, from, max).await;
        };
        // A scan reads up to the whole memory: off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            let mut page = [0u8; PAGE_SIZE];
            (from..memory.page_count())
                .filter(|&p| memory.read_page(p, &mut page).is_ok() && !is_zero_page(&page))
                .take(max as usize)
                .collect()
        })
        .await
        .map_err(|e| EngineError::Vmm(format!("scanning for non-zero pages: {e}")))
    }

    async fn take_dirty(&self, max: u32) -> Result<(Vec<u64>, u64), EngineError> {
        match self.memory().await {
            Some(memory) => Ok(memory.take_dirty(max as usize)),
            None => match self.call(Request::DirtyFetch { max }).await? {
                Response::Pfns { pfns, remaining } => Ok((pfns, remaining)),
                other => Err(EngineError::Vmm(format!("unexpected {other:?}"))),
            },
        }
    }

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

async fn expect_done<V: VmmAccess + ?Sized>(vm: &V, req: Request) -> Result<(), EngineError> {
    match vm.call(req).await? {
        Response::Done => Ok(()),
        Response::Error(e) => Err(EngineError::Vmm(e)),
        other => Err(EngineError::Vmm(format!("unexpected answer {other:?}"))),
    }
}

/// Source settings.
#[derive(Debug, Clone)]
pub struct SourceParams {
    /// The mode the user asked for; the offer names [`SourceParams::wire_mode`].
    pub mode: Mode,
    /// When to switch over, the hard ceiling, the timers and what to do when the migration
    /// does not converge (see [`drift_protocol::transfer::convergence`]).
    pub limits: Limits,
    /// Bytes per second at most on the stream.
    pub bandwidth_cap: Option<u64>,
    /// Pack page data (LZ4, page by page, where it saves an eighth; see
    /// [`drift_protocol::transfer::packed`]). Sandbox VMs only: a QEMU stream travels as
    /// QEMU wrote it.
    pub compress: bool,
    /// How long to wait for the target's commit.
    pub commit_timeout: Duration,
    /// What a switchover costs besides moving the last pages (pausing, the device state, the
    /// root, the target's durable commit, the answer): added to the last pages' time when
    /// deciding whether they fit the downtime limit. The service learns it from the
    /// switchovers it ran ([`Progress::switchover_cost_ms`]).
    pub switchover_cost: Duration,
}

/// What a switchover is assumed to cost before any was measured.
pub const DEFAULT_SWITCHOVER_COST: Duration = Duration::from_millis(15);

impl Default for SourceParams {
    fn default() -> Self {
        Self::new(Mode::PreCopy, Limits::default())
    }
}

impl SourceParams {
    /// Parameters for `mode` under `limits`. Hybrid is pre-copy that switches to post-copy as
    /// soon as it stops converging: its fallback is post-copy unless the user named one that
    /// includes it.
    pub fn new(mode: Mode, mut limits: Limits) -> Self {
        if mode == Mode::Hybrid && !limits.fallback.allows_postcopy() {
            limits.fallback = Fallback::try_from(vec![Action::PostCopy])
                .expect("a single action is a valid fallback");
        }
        Self {
            mode,
            limits,
            bandwidth_cap: None,
            compress: false,
            commit_timeout: Duration::from_secs(30),
            switchover_cost: DEFAULT_SWITCHOVER_COST,
        }
    }

    /// The mode the offer names: a pre-copy migration that may fall back to post-copy is
    /// offered as hybrid, so the target knows the VM may resume there before every page
    /// arrived (and sets QEMU up for it).
    pub fn wire_mode(&self) -> Mode {
        match self.mode {
            Mode::PreCopy if self.limits.fallback.allows_postcopy() => Mode::Hybrid,
            m => m,
        }
    }

    /// The downtime limit (the target).
    pub fn downtime_limit(&self) -> Duration {
        Duration::from_millis(self.limits.downtime_limit_ms)
    }
}

/// Progress of a transfer, for `drift migrate --watch` and `drift migrations`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub phase: String,
    /// What carries the VM's bytes: `data: N × TLS 1.3 <suite>`, or the migration stream,
    /// with why the data plane was not used.
    #[serde(default)]
    pub transport: String,
    pub rounds: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    pub dirty_pages: u64,
    pub rate_bytes_per_s: f64,
    pub expected_downtime_ms: f64,
    pub downtime_ms: Option<f64>,
    pub total_ms: Option<f64>,
    /// Pre-copy, once committed: the downtime less the last pages' time at the measured
    /// rate, i.e. what the switchover itself cost.
    #[serde(default)]
    pub switchover_cost_ms: Option<f64>,
    /// How fast the guest dirtied memory during the last round, bytes per second.
    #[serde(default)]
    pub dirty_rate_bytes_per_s: f64,
    /// The throttle applied to the guest, percent of its speed taken away.
    #[serde(default)]
    pub throttle_pct: u8,
    /// Set once the migration was found not converging: why, with the rates.
    #[serde(default)]
    pub not_converging: Option<String>,
    /// Time to converge at the current rates, while the link outruns the guest.
    #[serde(default)]
    pub eta_ms: Option<f64>,
    /// What the migration does when it does not converge (`throttle,abort`, ...).
    #[serde(default)]
    pub fallback: String,
}

/// One transfer, as the source knows it.
#[derive(Debug, Clone)]
pub struct SourceTransfer {
    /// What carries the bytes (for [`Progress::transport`]).
    pub transport: String,
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
    Committed {
        commit: Commit,
        progress: Box<Progress>,
    },
    /// The VM runs here again (cancelled, refused or failed before switchover).
    ResumedHere { reason: String },
    /// The VM is paused here (pre-copy) or was handed over (post-copy) and no answer came:
    /// never resume on a guess; resolve with the target.
    Unknown { reason: String },
}

/// How a transfer ended for the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetOutcome {
    /// The VM runs here; the commit was recorded and sent.
    Committed { root: Hash },
    /// Nothing runs here: discard the incoming VM.
    Aborted { reason: String },
    /// Nothing runs here, and the source is to blame: it broke the protocol or the progress
    /// deadlines (`code` is what its `Abort` said). Discard the incoming VM; it counts
    /// against the source (see `crate::admission`).
    Faulted {
        reason: String,
        code: drift_protocol::transfer::AbortReason,
    },
    /// Post-copy: the VM runs here but the source went away before every page arrived.
    Incomplete { reason: String },
}
