//! Migrations between nodes: one libp2p stream per migration (`/drift/migrate/2`), Noise-
//! encrypted and open only between roster members, for the negotiation; the data plane
//! (`crate::dataplane`) for the bytes; and the resolve protocol (`/drift/resolve/1`) a source
//! uses to learn what became of a migration after it lost contact with the target.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source node
//!     participant T as target node
//!     Note over S: record: copying
//!     S->>T: open /drift/migrate/2
//!     S->>T: Signed<MigrationOffer> {.., data_connections: k}
//!     Note over T: admission (the stream's peer must be the signer); record: receiving
//!     Note over T: on accept: an empty, paused incoming VM; expect n <= k data connections
//!     T->>S: Signed<MigrationDecision> {Accept, data: endpoint, n}
//!     S->>T: n data connections, each bound to the offer (see crate::dataplane)
//!     S->>T: Start {.., data_connections: n, or 0 when none could be made}
//!     S->>T: transfer frames on the data connections, or on this stream (see engine)
//!     Note over S: record: switching, before the VM pauses
//!     Note over T: record: committed, before the VM resumes
//!     T->>S: Commit | Abort | PageRequest
//!     Note over S: record: committed, then destroy the source copy
//! ```
//!
//! Only the two peers of an accepted offer can move its memory: the stream is theirs, and every
//! data connection proves the same offer and the source's key before it carries a byte.
//!
//! - [`incoming`]: the target's side (admission, decision, the transfer or tunnel);
//! - [`outgoing`]: the source's side (offer, data connections, the transfer or tunnel, acting
//!   on the outcome);
//! - [`resolve`]: the resolve protocol, both sides.
//!
//! If the source loses the stream after it paused the VM, it cannot tell whether the target
//! committed. It keeps the VM paused and asks the target on `/drift/resolve/1` (signed query,
//! signed answer) until it learns: committed (destroy the copy), never ran (resume it), or,
//! in post-copy, running without every page (the VM is lost: the source copy is stale). The
//! same happens after a restart, from the durable records (see [`super::record`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drift_protocol::audit::Side;
use drift_protocol::dataplane::DataEndpoint;
use drift_protocol::migration::{
    validate_decision, validate_resolve_answer, validate_resolve_query, MigrationDecision,
    MigrationOffer, Mode, RejectReason, ResolveAnswer, ResolveOutcome, ResolveQuery, Verdict,
    VmSummary,
};
use drift_protocol::policy::PolicyConfig;
use drift_protocol::transfer::deadline::ProgressLimits;
use drift_protocol::transfer::receiver::{Accepted, Receiver};
use drift_protocol::transfer::{Abort, AbortReason, Start, TransferFrame, PAGE_SIZE};
use drift_protocol::{AuditEvent, MigrationId, NodeId, SecretKey, Signed, VmId};
use futures::StreamExt;
use libp2p::StreamProtocol;
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::engine::{
    run_source, run_target, EngineError, Hooks, Point, Progress, SocketVmm, SourceOutcome,
    SourceParams, SourceTransfer, TargetOutcome,
};
use super::fault::{self, Fault};
use super::frames::{read_frame, write_frame};
use super::frames::{read_typed, write_typed};
use super::link::Link;
use super::record::{Phase, Record, Records, Role};
use super::tunnel::source::DataRoute;
use super::tunnel::{
    run_source_qemu, run_target_qemu, ChannelRefusal, IncomingTunnels, QemuParams, QemuSource,
    QemuTarget, CHANNEL_PROTOCOL,
};
use crate::admission::{Admission, AdmissionView, HostLoad, Limits};
use crate::dataplane::{DataPlane, Expectation};
use crate::hypervisor::qemu::QemuSpec;
use crate::hypervisor::{VmSpec, SOCKET_FILE};
use crate::mesh::Client;
use crate::state::NodeState;

mod incoming;
mod outgoing;
mod recover;
mod resolve;

/// The stream protocol of migrations.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/migrate/2");
/// The stream protocol of resolve queries.
pub const RESOLVE_PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/resolve/1");
/// Negotiation frames are small.
const MAX_NEGOTIATION_FRAME: usize = 64 * 1024;
/// Incoming migration streams handled at once (more are dropped unread; admission refuses
/// past its own limit).
const MAX_STREAMS: usize = crate::config::MAX_INCOMING_STREAMS as usize;
/// Resolve queries answered at once; more are dropped (the source asks again).
const MAX_RESOLVE_STREAMS: usize = 8;
/// Tunnel channel streams served at once (every QEMU migration opens 1 + multifd of them).
const MAX_CHANNEL_STREAMS: usize = 64;
/// The longest wait between two resolve attempts.
const MAX_RESOLVE_BACKOFF: Duration = Duration::from_secs(5);
/// The limits and deadlines of `[admission]` that the service applies.
#[derive(Debug, Clone)]
pub struct ServiceLimits {
    pub admission: Limits,
    /// Migrations this node sends at once.
    pub max_outgoing: usize,
    /// How long a new migration stream may take to send its offer.
    pub negotiation_timeout: Duration,
    /// How long the target waits for the transfer's `Start`, and then for its data
    /// connections.
    pub start_timeout: Duration,
    /// What every incoming transfer is held to once it started.
    pub progress: ProgressLimits,
    /// The convergence limits every outgoing migration starts from (`[migration]`).
    pub migration: drift_protocol::transfer::convergence::Limits,
}

impl ServiceLimits {
    /// The limits of `[admission]`, with the upper threshold of the balancing `policy`.
    pub fn from_config(a: &crate::config::AdmissionSection, policy: &PolicyConfig) -> Self {
        Self {
            admission: Limits::from_config(a, policy),
            max_outgoing: a.max_outgoing as usize,
            negotiation_timeout: a.negotiation_timeout,
            start_timeout: a.start_timeout,
            progress: a.progress(),
            migration: drift_protocol::transfer::convergence::Limits::default(),
        }
    }
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self::from_config(
            &crate::config::AdmissionSection::default(),
            &PolicyConfig::default(),
        )
    }
}

/// One migration as `drift migrations` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationView {
    pub id: MigrationId,
    pub vm: String,
    pub role: String,
    pub peer: NodeId,
    pub mode: Mode,
    /// `running | resolving | committed | resumed | refused | aborted | incomplete | lost`.
    pub state: String,
    /// The durable phase (see `migration::record`).
    #[serde(default)]
    pub phase: String,
    pub detail: String,
    pub progress: Option<Progress>,
}

/// Why a migration could not start.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Vm(#[from] crate::hypervisor::HypervisorError),
    #[error("no roster host named or numbered {0:?}")]
    NoSuchNode(String),
    #[error("cannot migrate to this node itself")]
    ToSelf,
    #[error("{0}")]
    Unsupported(String),
    #[error("could not reach the target: {0}")]
    Unreachable(String),
    #[error("the target refused: {0}")]
    Refused(RejectReason),
    #[error("the target's answer is not valid: {0}")]
    BadDecision(String),
    #[error("{0}")]
    Busy(String),
    #[error("cannot record the migration: {0}")]
    Record(std::io::Error),
}

/// Why the migration service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("migration records in {path}: {cause}")]
    Records {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Fault(String),
}

/// The migrations of one node.
pub struct Migrations {
    state: Arc<NodeState>,
    mesh: Client,
    key: SecretKey,
    limits: ServiceLimits,
    admission: Mutex<Admission>,
    /// Incoming migration streams served at once.
    streams: Arc<Semaphore>,
    records: Records,
    fault: Option<Fault>,
    /// Live progress of the migrations running here as the source.
    live: Mutex<BTreeMap<MigrationId, watch::Receiver<Progress>>>,
    /// Cancel handles of the migrations running here as the source.
    cancels: Mutex<BTreeMap<MigrationId, CancellationToken>>,
    /// VMs being sent (or resolved) from here: one migration per VM at a time.
    outgoing: Mutex<BTreeSet<VmId>>,
    /// Transfers running here as the target.
    receiving: Mutex<BTreeSet<MigrationId>>,
    /// Doors of the incoming transfers that may end in post-copy (a broken link reopens them).
    doors: Mutex<BTreeMap<MigrationId, crate::migration::recover::Door>>,
    /// Source migrations waiting for the target's answer.
    resolving: Mutex<BTreeSet<MigrationId>>,
    /// Tunnelled QEMU migrations arriving here, for their channel streams.
    tunnels: Arc<IncomingTunnels>,
    /// Where an incoming QEMU VM's images must lie (`qemu.image_dirs`).
    qemu_image_dirs: Vec<std::path::PathBuf>,
    /// The data connections migrations move on (`None`: data plane off, all on the mesh).
    data: Option<Arc<DataPlane>>,
    /// What this node's switchovers cost besides their last pages, in microseconds: an average
    /// of the ones measured (see `SourceParams::switchover_cost`).
    switchover_cost_us: std::sync::atomic::AtomicU64,
    /// Ends background work (resolvers) with the node.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Migrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrations").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Migrations {
    /// The migration service of a node: reads its records (`<state_dir>/migrations`) and the
    /// fault-injection setting. Call [`Migrations::recover`] next.
    pub fn new(
        state: Arc<NodeState>,
        mesh: Client,
        key: SecretKey,
        qemu_image_dirs: Vec<std::path::PathBuf>,
        data: Option<Arc<DataPlane>>,
        limits: ServiceLimits,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, ServiceError> {
        let dir = state.state_dir.join("migrations");
        let (records, problems) = Records::open(&dir).map_err(|source| ServiceError::Records {
            path: dir.clone(),
            cause: source,
        })?;
        let records = records.with_metrics(state.metrics.clone());
        for p in problems {
            error!(problem = %p, "unreadable migration record left in place");
        }
        let fault = Fault::from_env(&state.state_dir).map_err(ServiceError::Fault)?;
        if fault.is_some() {
            warn!("fault injection is on ({})", fault::ENV);
        }
        Ok(Arc::new(Self {
            state,
            mesh,
            key,
            admission: Mutex::new(Admission::new(limits.admission)),
            limits,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            records,
            fault,
            live: Mutex::new(BTreeMap::new()),
            cancels: Mutex::new(BTreeMap::new()),
            outgoing: Mutex::new(BTreeSet::new()),
            receiving: Mutex::new(BTreeSet::new()),
            doors: Mutex::new(BTreeMap::new()),
            resolving: Mutex::new(BTreeSet::new()),
            tunnels: Arc::new(IncomingTunnels::default()),
            qemu_image_dirs,
            data,
            switchover_cost_us: std::sync::atomic::AtomicU64::new(
                super::engine::DEFAULT_SWITCHOVER_COST.as_micros() as u64,
            ),
            shutdown,
        }))
    }

    fn vmm(&self, vm: &VmId) -> SocketVmm {
        SocketVmm::new(self.state.vms.dir_of(vm).join(SOCKET_FILE))
    }

    fn has_vm(&self, vm: &VmId) -> bool {
        self.state.vms.find(&vm.to_string()).is_ok()
    }

    /// Best-effort resume of a VM that may be paused.
    async fn resume(&self, vm: &VmId) -> Result<(), String> {
        self.state.vms.resume(vm).await.map_err(|e| e.to_string())
    }

    async fn destroy(&self, vm: &VmId) {
        if self.has_vm(vm) {
            if let Err(e) = self.state.vms.destroy(&vm.to_string()).await {
                warn!(error = %e, "could not destroy a VM copy");
            }
        }
    }

    /// Writes a phase durably; logs loudly when the disk refuses.
    fn advance(&self, id: &MigrationId, phase: Phase, detail: &str) -> std::io::Result<()> {
        let r = self.records.advance(id, phase, detail);
        if let Err(e) = &r {
            error!(error = %e, migration = %id.short(), "could not record a migration step");
        }
        r
    }

    /// Brings every recorded migration to a safe state after a restart. Target records are
    /// settled here, before any resolve query can be answered; unresolved source records get
    /// a resolver that asks the target in the background.
    pub async fn recover(self: &Arc<Self>) {
        let records = self.records.all();
        // A VM may have moved away and come back: only its newest migration speaks for the VM
        // here. An older record still settles, but never touches the VM.
        let mut newest: BTreeMap<VmId, (drift_protocol::Timestamp, MigrationId)> = BTreeMap::new();
        for r in &records {
            let e = newest.entry(r.vm).or_insert((r.started_at, r.id));
            if (r.started_at, r.id) > *e {
                *e = (r.started_at, r.id);
            }
        }
        let acts_on_vm = |r: &Record| newest.get(&r.vm).is_some_and(|(_, id)| *id == r.id);
        for r in records.iter().filter(|r| r.role == Role::Target) {
            match &r.phase {
                Phase::Receiving => {
                    // Streams do not survive a restart: this transfer is over and the VM never
                    // ran here.
                    let _ = self.advance(&r.id, Phase::Aborted, "node restarted during transfer");
                    self.state.audit(AuditEvent::Abort {
                        id: r.id,
                        side: Side::Target,
                        reason: "node restarted during transfer".into(),
                    });
                    if acts_on_vm(r) {
                        self.destroy(&r.vm).await;
                    }
                    info!(migration = %r.id.short(), vm = %r.vm_name, "discarded an unfinished incoming VM");
                }
                Phase::RunningPostCopy => {
                    let _ = self.advance(
                        &r.id,
                        Phase::Incomplete,
                        "node restarted during post-copy: pages still missing",
                    );
                    self.state.audit(AuditEvent::Abort {
                        id: r.id,
                        side: Side::Target,
                        reason: "post-copy incomplete: node restarted".into(),
                    });
                    warn!(migration = %r.id.short(), vm = %r.vm_name, "post-copy VM incomplete after restart");
                }
                Phase::Committed { .. } => {
                    if self
                        .state
                        .vms
                        .specs()
                        .iter()
                        .any(|s| s.id == r.vm && s.incoming)
                    {
                        if let Err(e) = self.state.vms.mark_arrived(&r.vm) {
                            error!(error = %e, "could not mark a committed VM as arrived");
                        }
                    }
                    if self.has_vm(&r.vm) {
                        if let Err(e) = self.resume(&r.vm).await {
                            warn!(error = %e, vm = %r.vm_name, "could not resume a committed VM");
                        }
                    }
                }
                _ => {}
            }
        }
        // An incoming VM that no record accounts for never ran here.
        for spec in self.state.vms.specs().into_iter().filter(|s| s.incoming) {
            let accounted = records.iter().any(|r| {
                r.role == Role::Target
                    && r.vm == spec.id
                    && matches!(r.phase, Phase::Committed { .. })
            });
            if !accounted {
                info!(vm = %spec.name, "discarding an incoming VM no migration accounts for");
                self.destroy(&spec.id).await;
            }
        }
        for r in records.iter().filter(|r| r.role == Role::Source) {
            match &r.phase {
                Phase::Copying => {
                    // The record moves to `switching` before the VM pauses: it never paused,
                    // so the target cannot have committed.
                    let _ = self.advance(&r.id, Phase::Aborted, "node restarted before switchover");
                    self.state.audit(AuditEvent::Abort {
                        id: r.id,
                        side: Side::Source,
                        reason: "node restarted before switchover".into(),
                    });
                    if acts_on_vm(r) && self.has_vm(&r.vm) {
                        let _ = self.resume(&r.vm).await;
                    }
                }
                Phase::Switching | Phase::HandedOver => {
                    warn!(migration = %r.id.short(), vm = %r.vm_name, "outcome unknown after restart: VM stays paused until the target answers");
                    self.spawn_resolver(r.id);
                }
                // The VM left: a copy still here is stale, unless the VM came back since.
                Phase::Committed { .. } if acts_on_vm(r) => self.destroy(&r.vm).await,
                _ => {}
            }
        }
    }

    /// The convergence limits a migration from this node starts from (`[migration]`).
    pub fn default_limits(&self) -> drift_protocol::transfer::convergence::Limits {
        self.limits.migration.clone()
    }

    /// Cancels a migration this node is sending. Before switchover the VM resumes here; after
    /// it, the migration completes anyway. Returns whether such a migration was running.
    pub fn cancel(&self, id: &MigrationId) -> bool {
        match lock(&self.cancels).get(id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Every migration recorded here, oldest first.
    pub fn list(&self) -> Vec<MigrationView> {
        let live = lock(&self.live);
        let resolving = lock(&self.resolving);
        let mut records = self.records.all();
        records.sort_by_key(|r| (r.started_at, r.id));
        records
            .into_iter()
            .map(|r| {
                let state = match (r.role, &r.phase) {
                    (_, Phase::Committed { .. }) => "committed",
                    (Role::Source, _) if resolving.contains(&r.id) => "resolving",
                    _ => r.outcome(),
                };
                let progress = live
                    .get(&r.id)
                    .map(|p| p.borrow().clone())
                    .or(r.progress.clone());
                MigrationView {
                    id: r.id,
                    vm: r.vm_name,
                    role: match r.role {
                        Role::Source => "source",
                        Role::Target => "target",
                    }
                    .into(),
                    peer: r.peer,
                    mode: r.mode,
                    state: state.into(),
                    phase: r.phase.label().into(),
                    detail: r.detail,
                    progress,
                }
            })
            .collect()
    }

    /// What admission holds now, and the incoming migration streams in use.
    pub fn admission_view(&self) -> (AdmissionView, usize) {
        let view = lock(&self.admission).view(crate::clock::now());
        (view, MAX_STREAMS - self.streams.available_permits())
    }

    /// CPU demand (permille) reserved for accepted incoming migrations, for the load report.
    pub fn reserved_permille(&self) -> u32 {
        lock(&self.admission).reserved_permille()
    }

    /// When each VM last moved, as far as this node's records tell (it arrived here, or it
    /// was sent from here): the balancing cooldown starts there.
    pub fn last_moves(&self) -> BTreeMap<VmId, drift_protocol::Timestamp> {
        let mut out = BTreeMap::new();
        for r in self.records.all() {
            if matches!(r.phase, Phase::Committed { .. }) {
                let e = out.entry(r.vm).or_insert(r.updated_at);
                if r.updated_at > *e {
                    *e = r.updated_at;
                }
            }
        }
        out
    }

    /// VMs being sent from here now (or whose outcome is being resolved).
    pub fn outgoing(&self) -> BTreeSet<VmId> {
        lock(&self.outgoing).clone()
    }

    fn host_load(&self) -> HostLoad {
        let (_, demand) = self.state.vms.summary();
        let specs = self.state.vms.specs();
        let capacity_mib = self
            .state
            .roster()
            .roster
            .member(&self.state.me)
            .map_or(0, |m| m.capacity.mem_mib);
        HostLoad {
            demand_permille: demand,
            vm_memory_mib: specs.iter().map(|s| s.memory_mib).sum(),
            capacity_mib,
            vms: specs.iter().map(|s| s.id).collect(),
            groups: specs
                .iter()
                .filter_map(|s| s.placement.anti_affinity.clone())
                .collect(),
        }
    }

    /// Accepts migration and resolve streams until `cancel`.
    pub fn spawn_acceptor(
        self: &Arc<Self>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut control = this.mesh.streams();
            let (mut migrations, mut resolves, mut channels, mut recovers) = match (
                control.accept(PROTOCOL),
                control.accept(RESOLVE_PROTOCOL),
                control.accept(CHANNEL_PROTOCOL),
                control.accept(crate::migration::recover::RECOVER_PROTOCOL),
            ) {
                (Ok(m), Ok(r), Ok(c), Ok(v)) => (m, r, c, v),
                (Err(e), _, _, _) | (_, Err(e), _, _) | (_, _, Err(e), _) | (_, _, _, Err(e)) => {
                    warn!(error = %e, "cannot accept migration streams");
                    return;
                }
            };
            let permits = this.streams.clone();
            let resolve_permits = Arc::new(Semaphore::new(MAX_RESOLVE_STREAMS));
            let channel_permits = Arc::new(Semaphore::new(MAX_CHANNEL_STREAMS));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = channels.next() => {
                        let Some((peer, stream)) = next else { break };
                        let Some(from) = crate::mesh::node_id(&peer) else { continue };
                        let Ok(permit) = channel_permits.clone().try_acquire_owned() else {
                            continue;
                        };
                        let this = this.clone();
                        tokio::spawn(async move {
                            match this.tunnels.serve(from, stream.compat()).await {
                                Ok(()) => {}
                                Err(ChannelRefusal::Io(e)) => {
                                    warn!(from = %from.short(), error = %e, "tunnel channel failed");
                                }
                                Err(e) => this.state.audit(AuditEvent::Refused {
                                    id: None,
                                    peer: Some(from),
                                    reason: format!("tunnel channel refused: {e}"),
                                }),
                            }
                            drop(permit);
                        });
                    }
                    next = migrations.next() => {
                        let Some((peer, stream)) = next else { break };
                        let Some(from) = crate::mesh::node_id(&peer) else { continue };
                        // Too many at once: dropping the stream refuses it at no cost.
                        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
                        let this = this.clone();
                        tokio::spawn(async move {
                            this.incoming(from, stream.compat()).await;
                            drop(permit);
                        });
                    }
                    next = recovers.next() => {
                        let Some((peer, stream)) = next else { break };
                        let Some(from) = crate::mesh::node_id(&peer) else { continue };
                        // Shares the resolve streams' bound: both are rare and small.
                        let Ok(permit) = resolve_permits.clone().try_acquire_owned() else {
                            continue;
                        };
                        let this = this.clone();
                        tokio::spawn(async move {
                            this.answer_recover(from, stream.compat()).await;
                            drop(permit);
                        });
                    }
                    next = resolves.next() => {
                        let Some((peer, stream)) = next else { break };
                        let Some(from) = crate::mesh::node_id(&peer) else { continue };
                        let Ok(permit) = resolve_permits.clone().try_acquire_owned() else {
                            continue;
                        };
                        let this = this.clone();
                        tokio::spawn(async move {
                            this.answer_resolve(from, stream.compat()).await;
                            drop(permit);
                        });
                    }
                }
            }
        })
    }
}

/// What a node does at the points of a transfer, on either side.
struct SideHooks {
    service: Arc<Migrations>,
    id: MigrationId,
    vm: VmId,
    peer: NodeId,
    side: Side,
}

impl Hooks for SideHooks {
    async fn at(&self, point: Point) -> std::io::Result<()> {
        let s = &self.service;
        let id = self.id;
        match point {
            Point::Pausing => {
                s.records.advance(&id, Phase::Switching, "")?;
                s.state.audit(AuditEvent::Switchover {
                    id,
                    side: Side::Source,
                });
            }
            Point::HandingOver => s.records.advance(&id, Phase::HandedOver, "")?,
            Point::CompleteSent(root) => s.state.audit(AuditEvent::Complete {
                id,
                side: Side::Source,
                root,
            }),
            Point::ResumingPostCopy => {
                s.records.advance(&id, Phase::RunningPostCopy, "")?;
                s.state.audit(AuditEvent::Switchover {
                    id,
                    side: Side::Target,
                });
            }
            Point::Verified(root) => {
                // Durable before the VM resumes here.
                s.records.advance(
                    &id,
                    Phase::Committed { root },
                    &format!("root {}", root.short()),
                )?;
                s.state.audit(AuditEvent::Complete {
                    id,
                    side: Side::Target,
                    root,
                });
                s.state.audit(AuditEvent::Commit {
                    id,
                    side: Side::Target,
                    root,
                });
                if let Err(e) = s.state.vms.mark_arrived(&self.vm) {
                    // The record is what counts; a restart marks it again.
                    error!(error = %e, "could not mark the VM as arrived");
                }
            }
            _ => {}
        }
        if let Some(f) = &s.fault {
            let p = match (self.side, point) {
                (Side::Source, Point::RoundSent(_)) => Some(fault::Point::SourceRounds),
                (Side::Source, Point::Paused) => Some(fault::Point::SourceStopAndCopy),
                (Side::Source, Point::CompleteSent(_)) => Some(fault::Point::SourceCompleteSent),
                (Side::Source, Point::CommitReceived) => Some(fault::Point::SourceCommitReceived),
                (Side::Source, Point::Pushing) => Some(fault::Point::SourcePostCopy),
                (Side::Target, Point::RoundReceived(_)) => Some(fault::Point::TargetRounds),
                (Side::Target, Point::CompleteReceived) => {
                    Some(fault::Point::TargetCompleteReceived)
                }
                (Side::Target, Point::CommitSent) => Some(fault::Point::TargetCommitSent),
                _ => None,
            };
            if let Some(p) = p {
                f.at(p, &self.peer, &s.mesh, s.data.as_deref()).await;
            }
        }
        Ok(())
    }
}
