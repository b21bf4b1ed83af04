//! Migrations between nodes: one libp2p stream per migration (`/drift/migrate/1`), Noise-
//! encrypted and open only between roster members; and the resolve protocol
//! (`/drift/resolve/1`) a source uses to learn what became of a migration after it lost
//! contact with the target.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source node
//!     participant T as target node
//!     Note over S: record: copying
//!     S->>T: open /drift/migrate/1
//!     S->>T: Signed<MigrationOffer>
//!     Note over T: admission (the stream's peer must be the signer); record: receiving
//!     T->>S: Signed<MigrationDecision>
//!     Note over T: on accept: an empty, paused incoming VM
//!     S->>T: transfer frames (see migration::engine)
//!     Note over S: record: switching, before the VM pauses
//!     Note over T: record: committed, before the VM resumes
//!     T->>S: Commit | Abort | PageRequest
//!     Note over S: record: committed, then destroy the source copy
//! ```
//!
//! Negotiating on the stream that will carry the memory binds the transfer to exactly the two
//! peers of the accepted offer: no other stream can present it.
//!
//! If the source loses the stream after it paused the VM, it cannot tell whether the target
//! committed. It keeps the VM paused and asks the target on `/drift/resolve/1` (signed query,
//! signed answer) until it learns: committed (destroy the copy), never ran (resume it), or,
//! in post-copy, running without every page (the VM is lost: the source copy is stale). The
//! same happens after a restart, from the durable records (see [`super::record`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drift_protocol::audit::Side;
use drift_protocol::migration::{
    validate_decision, validate_resolve_answer, validate_resolve_query, MigrationDecision,
    MigrationOffer, Mode, RejectReason, ResolveAnswer, ResolveOutcome, ResolveQuery, Verdict,
    VmSummary,
};
use drift_protocol::transfer::receiver::{Accepted, Receiver};
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
use super::frames::{read_typed, write_typed};
use super::record::{Phase, Record, Records, Role};
use super::tunnel::{
    run_source_qemu, run_target_qemu, ChannelRefusal, IncomingTunnels, QemuParams, QemuSource,
    QemuTarget, CHANNEL_PROTOCOL,
};
use crate::admission::{Admission, HostLoad, Limits};
use crate::hypervisor::qemu::QemuSpec;
use crate::hypervisor::{VmSpec, SOCKET_FILE};
use crate::mesh::Client;
use crate::state::NodeState;

/// The stream protocol of migrations.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/migrate/1");
/// The stream protocol of resolve queries.
pub const RESOLVE_PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/resolve/1");
/// Negotiation frames are small.
const MAX_NEGOTIATION_FRAME: usize = 64 * 1024;
/// Incoming migration streams handled at once (more wait; admission refuses past its limit).
const MAX_STREAMS: usize = 8;
/// Resolve queries answered at once; more are dropped (the source asks again).
const MAX_RESOLVE_STREAMS: usize = 8;
/// Migrations this node sends at once.
const MAX_OUTGOING: usize = 4;
/// Tunnel channel streams served at once (every QEMU migration opens 1 + multifd of them).
const MAX_CHANNEL_STREAMS: usize = 64;
/// The longest wait between two resolve attempts.
const MAX_RESOLVE_BACKOFF: Duration = Duration::from_secs(5);

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
    #[error("migration records in {path}: {source}")]
    Records {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Fault(String),
}

/// The migrations of one node.
pub struct Migrations {
    state: Arc<NodeState>,
    mesh: Client,
    key: SecretKey,
    admission: Mutex<Admission>,
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
    /// Source migrations waiting for the target's answer.
    resolving: Mutex<BTreeSet<MigrationId>>,
    /// Tunnelled QEMU migrations arriving here, for their channel streams.
    tunnels: Arc<IncomingTunnels>,
    /// Where an incoming QEMU VM's images must lie (`qemu.image_dirs`).
    qemu_image_dirs: Vec<std::path::PathBuf>,
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
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, ServiceError> {
        let dir = state.state_dir.join("migrations");
        let (records, problems) = Records::open(&dir).map_err(|source| ServiceError::Records {
            path: dir.clone(),
            source,
        })?;
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
            admission: Mutex::new(Admission::new(Limits::default())),
            records,
            fault,
            live: Mutex::new(BTreeMap::new()),
            cancels: Mutex::new(BTreeMap::new()),
            outgoing: Mutex::new(BTreeSet::new()),
            receiving: Mutex::new(BTreeSet::new()),
            resolving: Mutex::new(BTreeSet::new()),
            tunnels: Arc::new(IncomingTunnels::default()),
            qemu_image_dirs,
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
                    (Role::Source, Phase::Aborted) if r.detail.starts_with("refused") => "refused",
                    (Role::Source, Phase::Aborted) => "resumed",
                    (Role::Source, Phase::Incomplete) => "lost",
                    (Role::Target, Phase::Aborted) => "aborted",
                    (Role::Target, Phase::Incomplete) => "incomplete",
                    _ => "running",
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
            let (mut migrations, mut resolves, mut channels) = match (
                control.accept(PROTOCOL),
                control.accept(RESOLVE_PROTOCOL),
                control.accept(CHANNEL_PROTOCOL),
            ) {
                (Ok(m), Ok(r), Ok(c)) => (m, r, c),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    warn!(error = %e, "cannot accept migration streams");
                    return;
                }
            };
            let permits = Arc::new(Semaphore::new(MAX_STREAMS));
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

    async fn incoming<S>(self: &Arc<Self>, from: NodeId, mut stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            read_typed::<_, Signed<MigrationOffer>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await;
        let signed = match read {
            Ok(Ok(signed)) => signed,
            Ok(Err(e)) => {
                self.state.audit(AuditEvent::Refused {
                    id: None,
                    peer: Some(from),
                    reason: format!("migration stream did not start with a valid offer: {e}"),
                });
                return;
            }
            Err(_) => {
                self.state.audit(AuditEvent::Refused {
                    id: None,
                    peer: Some(from),
                    reason: "migration stream sent no offer in time".into(),
                });
                return;
            }
        };
        let now = crate::clock::now();
        let load = self.host_load();
        let verdict = {
            let roster = self.state.roster();
            let mut adm = lock(&self.admission);
            adm.decide(&signed, &from, &self.state.me, &roster.roster, &load, now)
        };
        let (offer, reservation) = match verdict {
            Ok(ok) => ok,
            Err(reason) => {
                self.state.audit(AuditEvent::Refused {
                    id: signed.verify().ok().map(|o| o.id),
                    peer: Some(from),
                    reason: format!("offer refused: {} ({reason})", reason.label()),
                });
                info!(from = %from.short(), %reason, "refused a migration offer");
                // Answer only well-formed offers; others get nothing.
                if let Ok(o) = signed.verify() {
                    let _ = self
                        .decide(&mut stream, &signed, &o, Verdict::Reject(reason))
                        .await;
                }
                return;
            }
        };
        self.state.audit(AuditEvent::OfferReceived {
            id: offer.id,
            vm: offer.vm.id,
            source: from,
            offer: signed.hash(),
        });
        let id = offer.id;
        lock(&self.receiving).insert(id);
        self.receive(from, stream, signed, offer, reservation.until)
            .await;
        self.release(&id);
        lock(&self.receiving).remove(&id);
    }

    async fn receive<S>(
        self: &Arc<Self>,
        from: NodeId,
        mut stream: S,
        signed: Signed<MigrationOffer>,
        offer: MigrationOffer,
        reserved_until: drift_protocol::Timestamp,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // A QEMU VM's spec names files this node's QEMU will open: only shared images.
        if let Some(q) = &offer.vm.qemu {
            let checked = match QemuSpec::from_wire(q).check_incoming(&self.qemu_image_dirs) {
                Ok(()) => {
                    self.state
                        .vms
                        .qemu()
                        .check_multifd(q.multifd_channels)
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                self.state.audit(AuditEvent::Refused {
                    id: Some(offer.id),
                    peer: Some(from),
                    reason: format!("offer refused: bad_offer (QEMU VM: {e})"),
                });
                warn!(from = %from.short(), error = %e, "refused a QEMU VM");
                let _ = self
                    .decide(
                        &mut stream,
                        &signed,
                        &offer,
                        Verdict::Reject(RejectReason::BadOffer),
                    )
                    .await;
                return;
            }
        }
        let now = crate::clock::now();
        // Durable before anything exists here: an incoming VM is always accounted for.
        let record = Record {
            id: offer.id,
            role: Role::Target,
            vm: offer.vm.id,
            vm_name: offer.vm.name.clone(),
            peer: from,
            mode: offer.mode,
            phase: Phase::Receiving,
            started_at: now,
            updated_at: now,
            detail: String::new(),
            progress: None,
        };
        if let Err(e) = self.records.put(&record) {
            error!(error = %e, "cannot record an incoming migration; refusing it");
            let _ = self
                .decide(
                    &mut stream,
                    &signed,
                    &offer,
                    Verdict::Reject(RejectReason::Busy),
                )
                .await;
            return;
        }
        // An empty, paused VM ready to receive the memory.
        let spec = VmSpec {
            id: offer.vm.id,
            name: offer.vm.name.clone(),
            memory_mib: offer.vm.memory_mib,
            vcpus: offer.vm.vcpus,
            demand_permille: offer.vm.demand_permille,
            dirty_pages_per_s: 0,
            placement: offer.vm.placement.clone(),
            seed: OsRng.next_u64() >> 1,
            incoming: true,
            qemu: offer.vm.qemu.as_ref().map(QemuSpec::from_wire),
        };
        if let Err(e) = self.state.vms.create(spec.clone()).await {
            warn!(error = %e, "could not prepare the incoming VM");
            let _ = self.advance(&offer.id, Phase::Aborted, &format!("no VM: {e}"));
            let _ = self
                .decide(
                    &mut stream,
                    &signed,
                    &offer,
                    Verdict::Reject(RejectReason::Busy),
                )
                .await;
            return;
        }
        if self
            .decide(
                &mut stream,
                &signed,
                &offer,
                Verdict::Accept { reserved_until },
            )
            .await
            .is_err()
        {
            self.discard(&offer, "decision not delivered").await;
            return;
        }
        self.state.audit(AuditEvent::TransferStarted {
            id: offer.id,
            side: Side::Target,
            peer: from,
        });
        let hooks = SideHooks {
            service: self.clone(),
            id: offer.id,
            vm: offer.vm.id,
            peer: from,
            side: Side::Target,
        };
        let outcome = match &offer.vm.qemu {
            Some(q) => {
                let dir = self.state.vms.dir_of(&offer.vm.id);
                match self.state.vms.qemu().qmp(&dir).await {
                    Ok(qmp) => {
                        let target = QemuTarget {
                            qmp,
                            vm_dir: dir,
                            id: offer.id,
                            offer: signed.hash(),
                            source: from,
                            key: self.key.clone(),
                            params: QemuParams {
                                mode: offer.mode,
                                multifd_channels: q.multifd_channels,
                                downtime_limit: Duration::ZERO,
                                bandwidth_cap: None,
                            },
                            tunnels: self.tunnels.clone(),
                        };
                        run_target_qemu(target, &hooks, stream).await
                    }
                    Err(e) => Err(EngineError::Vmm(format!("QMP: {e}"))),
                }
            }
            None => {
                let accepted = Accepted {
                    id: offer.id,
                    offer: signed.hash(),
                    source: from,
                    mode: offer.mode,
                    page_count: offer.vm.memory_mib * 256,
                };
                run_target(
                    &self.vmm(&offer.vm.id),
                    &hooks,
                    stream,
                    Receiver::new(accepted),
                    offer.id,
                    &self.key,
                )
                .await
            }
        };
        let id = offer.id;
        match outcome {
            Ok(TargetOutcome::Committed { root }) => {
                info!(vm = %offer.vm.name, from = %from.short(), root = %root.short(), "VM arrived and runs here");
            }
            Ok(TargetOutcome::Incomplete { reason }) => {
                warn!(vm = %offer.vm.name, %reason, "post-copy incomplete");
                let _ = self.advance(&id, Phase::Incomplete, &reason);
                self.state.audit(AuditEvent::Abort {
                    id,
                    side: Side::Target,
                    reason,
                });
            }
            Ok(TargetOutcome::Aborted { reason }) => self.discard(&offer, &reason).await,
            Err(e) => {
                // What the VM is now follows from what was recorded before the failure.
                match self.records.get(&id).map(|r| r.phase) {
                    Some(Phase::Committed { .. }) => {
                        warn!(error = %e, vm = %offer.vm.name, "committed, but the transfer failed after: resuming");
                        if let Err(e) = self.resume(&offer.vm.id).await {
                            error!(error = %e, "could not resume a committed VM");
                        }
                    }
                    Some(Phase::RunningPostCopy) => {
                        let reason = format!("post-copy failed: {e}");
                        let _ = self.advance(&id, Phase::Incomplete, &reason);
                        self.state.audit(AuditEvent::Abort {
                            id,
                            side: Side::Target,
                            reason,
                        });
                    }
                    _ => self.discard(&offer, &e.to_string()).await,
                }
            }
        }
    }

    fn release(&self, id: &MigrationId) {
        lock(&self.admission).release(id);
    }

    /// The VM never ran here: recorded as such first, then the copy goes.
    async fn discard(&self, offer: &MigrationOffer, reason: &str) {
        let _ = self.advance(&offer.id, Phase::Aborted, reason);
        self.state.audit(AuditEvent::Abort {
            id: offer.id,
            side: Side::Target,
            reason: reason.to_string(),
        });
        self.destroy(&offer.vm.id).await;
    }

    async fn decide<S: tokio::io::AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        signed: &Signed<MigrationOffer>,
        offer: &MigrationOffer,
        verdict: Verdict,
    ) -> std::io::Result<()> {
        let accepted = matches!(verdict, Verdict::Accept { .. });
        let reason = match &verdict {
            Verdict::Reject(r) => r.to_string(),
            Verdict::Accept { .. } => String::new(),
        };
        let decision = MigrationDecision {
            id: offer.id,
            offer: signed.hash(),
            source: offer.source,
            target: self.state.me,
            verdict,
            issued_at: crate::clock::now(),
        };
        self.state.audit(AuditEvent::Decision {
            id: offer.id,
            accepted,
            reason,
        });
        write_typed(stream, &Signed::sign(&decision, &self.key)).await
    }

    /// Answers one resolve query from `from`.
    async fn answer_resolve<S>(&self, from: NodeId, mut stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            read_typed::<_, Signed<ResolveQuery>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await;
        let refuse = |reason: String| {
            self.state.audit(AuditEvent::Refused {
                id: None,
                peer: Some(from),
                reason,
            });
        };
        let signed = match read {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return refuse(format!("resolve stream without a valid query: {e}")),
            Err(_) => return refuse("resolve stream sent no query in time".into()),
        };
        let query = match validate_resolve_query(&signed, &from, &self.state.me) {
            Ok(q) => q,
            Err(e) => return refuse(format!("resolve query refused: {e}")),
        };
        let live = lock(&self.receiving).contains(&query.id);
        let outcome = if live {
            ResolveOutcome::InProgress
        } else {
            match self.records.get(&query.id) {
                Some(r) if r.role != Role::Target || r.peer != from => {
                    return refuse(format!(
                        "resolve query for migration {} from a node that is not its source",
                        query.id.short()
                    ))
                }
                Some(r) => match r.phase {
                    Phase::Committed { root } => ResolveOutcome::Committed { root },
                    Phase::Aborted => ResolveOutcome::NeverRan,
                    Phase::Incomplete | Phase::RunningPostCopy => ResolveOutcome::RunningIncomplete,
                    _ => ResolveOutcome::InProgress,
                },
                None => self.outcome_from_audit(&query.id, &from),
            }
        };
        if outcome != ResolveOutcome::InProgress {
            self.state.audit(AuditEvent::Resolved {
                id: query.id,
                side: Side::Target,
                outcome: outcome.label().into(),
            });
        }
        let answer = ResolveAnswer {
            id: query.id,
            query: signed.hash(),
            source: query.source,
            target: self.state.me,
            outcome,
            answered_at: crate::clock::now(),
        };
        let _ = write_typed(&mut stream, &Signed::sign(&answer, &self.key)).await;
    }

    /// For a migration with no record left (records are pruned once finished): the audit log
    /// says whether it committed here; anything else never ran here.
    fn outcome_from_audit(&self, id: &MigrationId, source: &NodeId) -> ResolveOutcome {
        let path = self.state.audit_path();
        let Ok(contents) = crate::audit::read_log(&path) else {
            // Unknowable now: the source asks again rather than act on a guess.
            return ResolveOutcome::InProgress;
        };
        let mut accepted_from_source = false;
        for r in &contents.records {
            let Ok(rec) = r.verify() else { continue };
            match rec.event {
                AuditEvent::Commit {
                    id: i,
                    side: Side::Target,
                    root,
                } if &i == id => return ResolveOutcome::Committed { root },
                AuditEvent::OfferReceived {
                    id: i, source: s, ..
                } if &i == id => {
                    accepted_from_source |= &s == source;
                }
                _ => {}
            }
        }
        let _ = accepted_from_source;
        ResolveOutcome::NeverRan
    }

    /// Offers `vm` to `to` and, once accepted, moves it in the background. Returns when the
    /// target has decided.
    pub async fn migrate(
        self: &Arc<Self>,
        vm: &str,
        to: &str,
        mode: Mode,
        params: SourceParams,
    ) -> Result<MigrationId, MigrateError> {
        let spec = self.state.vms.find(vm)?;
        {
            let mut outgoing = lock(&self.outgoing);
            if outgoing.contains(&spec.id) {
                return Err(MigrateError::Busy(format!(
                    "{} is already migrating",
                    spec.name
                )));
            }
            if outgoing.len() >= MAX_OUTGOING {
                return Err(MigrateError::Busy(format!(
                    "{MAX_OUTGOING} migrations are already leaving this node"
                )));
            }
            outgoing.insert(spec.id);
        }
        let result = self.offer_and_start(&spec, to, mode, params).await;
        if result.is_err() {
            lock(&self.outgoing).remove(&spec.id);
        }
        result
    }

    async fn offer_and_start(
        self: &Arc<Self>,
        spec: &VmSpec,
        to: &str,
        mode: Mode,
        params: SourceParams,
    ) -> Result<MigrationId, MigrateError> {
        let spec = spec.clone();
        let (target, epoch) = {
            let roster = self.state.roster();
            let m = roster
                .roster
                .members
                .iter()
                .find(|m| m.name == to || m.id.to_string() == to)
                .ok_or_else(|| MigrateError::NoSuchNode(to.to_string()))?;
            (m.id, roster.roster.epoch)
        };
        if target == self.state.me {
            return Err(MigrateError::ToSelf);
        }
        if let Some(q) = &spec.qemu {
            self.state
                .vms
                .qemu()
                .check_multifd(q.multifd_channels)
                .await
                .map_err(MigrateError::Unsupported)?;
        }
        let now = crate::clock::now();
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let offer = MigrationOffer {
            id: MigrationId::random(&mut OsRng),
            source: self.state.me,
            target,
            vm: VmSummary {
                id: spec.id,
                name: spec.name.clone(),
                memory_mib: spec.memory_mib,
                vcpus: spec.vcpus,
                demand_permille: spec.demand_permille,
                placement: spec.placement.clone(),
                qemu: spec.qemu.as_ref().map(QemuSpec::to_wire),
            },
            mode,
            nonce,
            issued_at: now,
            expires_at: now.plus_millis(30_000),
            roster_epoch: epoch,
        };
        self.records
            .put(&Record {
                id: offer.id,
                role: Role::Source,
                vm: spec.id,
                vm_name: spec.name.clone(),
                peer: target,
                mode,
                phase: Phase::Copying,
                started_at: now,
                updated_at: now,
                detail: String::new(),
                progress: None,
            })
            .map_err(MigrateError::Record)?;
        let result = self.negotiate(&offer, &spec).await;
        let (stream, signed) = match result {
            Ok(ok) => ok,
            Err(e) => {
                let detail = match &e {
                    MigrateError::Refused(r) => format!("refused: {r}"),
                    other => other.to_string(),
                };
                let _ = self.advance(&offer.id, Phase::Aborted, &detail);
                return Err(e);
            }
        };
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        lock(&self.live).insert(offer.id, progress_rx);
        self.state.audit(AuditEvent::TransferStarted {
            id: offer.id,
            side: Side::Source,
            peer: target,
        });
        let cancel = CancellationToken::new();
        lock(&self.cancels).insert(offer.id, cancel.clone());
        let this = self.clone();
        let transfer = SourceTransfer {
            id: offer.id,
            offer: signed.hash(),
            page_count: spec.memory_mib * 256,
            key: self.key.clone(),
            target,
        };
        tokio::spawn(async move {
            let params = SourceParams { mode, ..params };
            let hooks = SideHooks {
                service: this.clone(),
                id: transfer.id,
                vm: spec.id,
                peer: target,
                side: Side::Source,
            };
            let outcome = match &spec.qemu {
                Some(q) => {
                    this.qemu_source(
                        &spec,
                        q,
                        stream,
                        &transfer,
                        params,
                        &hooks,
                        &progress_tx,
                        cancel,
                    )
                    .await
                }
                None => {
                    run_source(
                        &this.vmm(&spec.id),
                        &hooks,
                        stream,
                        transfer.clone(),
                        params,
                        &progress_tx,
                        cancel,
                    )
                    .await
                }
            };
            let id = transfer.id;
            lock(&this.cancels).remove(&id);
            this.records.set_progress(&id, progress_tx.borrow().clone());
            lock(&this.live).remove(&id);
            let keep_guard = this.source_finished(id, &spec, outcome).await;
            if !keep_guard {
                lock(&this.outgoing).remove(&spec.id);
            }
        });
        Ok(offer.id)
    }

    /// The source side of a QEMU VM's migration: QEMU's stream tunnelled through the mesh.
    #[allow(clippy::too_many_arguments)]
    async fn qemu_source<S>(
        &self,
        spec: &VmSpec,
        q: &QemuSpec,
        stream: S,
        transfer: &SourceTransfer,
        params: SourceParams,
        hooks: &SideHooks,
        progress: &watch::Sender<Progress>,
        cancel: CancellationToken,
    ) -> Result<SourceOutcome, EngineError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let dir = self.state.vms.dir_of(&spec.id);
        let qmp = self
            .state
            .vms
            .qemu()
            .qmp(&dir)
            .await
            .map_err(|e| EngineError::Vmm(format!("QMP: {e}")))?;
        let source = QemuSource {
            qmp,
            vm_dir: dir,
            mesh: self.mesh.clone(),
            id: transfer.id,
            offer: transfer.offer,
            target: transfer.target,
            key: transfer.key.clone(),
            params: QemuParams {
                mode: params.mode,
                multifd_channels: q.multifd_channels,
                downtime_limit: params.downtime_limit,
                bandwidth_cap: params.bandwidth_cap,
            },
            commit_timeout: params.commit_timeout,
        };
        run_source_qemu(source, hooks, stream, progress, cancel).await
    }

    /// Opens the stream, sends the offer and reads the decision.
    async fn negotiate(
        &self,
        offer: &MigrationOffer,
        spec: &VmSpec,
    ) -> Result<
        (
            tokio_util::compat::Compat<libp2p::Stream>,
            Signed<MigrationOffer>,
        ),
        MigrateError,
    > {
        let signed = Signed::sign(offer, &self.key);
        self.state.audit(AuditEvent::OfferSent {
            id: offer.id,
            vm: spec.id,
            target: offer.target,
            mode: offer.mode,
            offer: signed.hash(),
        });
        let mut stream = self
            .mesh
            .open_stream(&offer.target, PROTOCOL, Duration::from_secs(15))
            .await
            .map_err(MigrateError::Unreachable)?;
        write_typed(&mut stream, &signed)
            .await
            .map_err(|e| MigrateError::Unreachable(e.to_string()))?;
        let decision = tokio::time::timeout(
            Duration::from_secs(15),
            read_typed::<_, Signed<MigrationDecision>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await
        .map_err(|_| MigrateError::Unreachable("no decision in time".into()))?
        .map_err(|e| MigrateError::Unreachable(e.to_string()))?;
        let decision = validate_decision(&decision, &signed, offer)
            .map_err(|e| MigrateError::BadDecision(e.to_string()))?;
        if let Verdict::Reject(reason) = decision.verdict {
            return Err(MigrateError::Refused(reason));
        }
        Ok((stream, signed))
    }

    /// Acts on how a transfer ended at the source. Returns whether the VM stays guarded
    /// (a resolver took it over).
    async fn source_finished(
        self: &Arc<Self>,
        id: MigrationId,
        spec: &VmSpec,
        outcome: Result<SourceOutcome, EngineError>,
    ) -> bool {
        match outcome {
            Ok(SourceOutcome::Committed { commit, .. }) => {
                self.state.audit(AuditEvent::Commit {
                    id,
                    side: Side::Source,
                    root: commit.root,
                });
                if self
                    .advance(
                        &id,
                        Phase::Committed { root: commit.root },
                        &format!("root {}", commit.root.short()),
                    )
                    .is_err()
                {
                    // Not destroyed without a durable record: the resolver retries the write.
                    self.spawn_resolver(id);
                    return true;
                }
                self.destroy(&spec.id).await;
                info!(vm = %spec.name, "VM moved");
                false
            }
            Ok(SourceOutcome::ResumedHere { reason }) => {
                self.state.audit(AuditEvent::Abort {
                    id,
                    side: Side::Source,
                    reason: reason.clone(),
                });
                let _ = self.advance(&id, Phase::Aborted, &reason);
                false
            }
            Ok(SourceOutcome::Unknown { reason }) => {
                warn!(vm = %spec.name, %reason, "migration outcome unknown: VM stays paused; asking the target");
                if let Some(r) = self.records.get(&id) {
                    let _ = self.advance(&id, r.phase, &reason);
                }
                self.spawn_resolver(id);
                true
            }
            Err(e) => {
                let phase = self.records.get(&id).map(|r| r.phase);
                if matches!(phase, Some(Phase::Switching | Phase::HandedOver)) {
                    warn!(error = %e, "migration failed after switchover began; asking the target");
                    self.spawn_resolver(id);
                    true
                } else {
                    let _ = self.advance(&id, Phase::Aborted, &e.to_string());
                    false
                }
            }
        }
    }

    /// Asks the target about `id` until it knows, then acts on the answer. The VM stays
    /// paused (and guarded against another migration) meanwhile.
    fn spawn_resolver(self: &Arc<Self>, id: MigrationId) {
        let Some(record) = self.records.get(&id) else {
            return;
        };
        if !lock(&self.resolving).insert(id) {
            return;
        }
        lock(&self.outgoing).insert(record.vm);
        let this = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            let mut attempts = 0u64;
            loop {
                tokio::select! {
                    _ = this.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                attempts += 1;
                match this.ask_target(&record).await {
                    Ok(ResolveOutcome::InProgress) => {}
                    Ok(outcome) => {
                        this.apply_resolution(&record, outcome).await;
                        break;
                    }
                    Err(e) => {
                        if attempts % 10 == 1 {
                            warn!(migration = %id.short(), error = %e, attempts, "cannot resolve yet");
                        }
                    }
                }
                delay = (delay * 2).min(MAX_RESOLVE_BACKOFF);
            }
            lock(&this.resolving).remove(&id);
            lock(&this.outgoing).remove(&record.vm);
        });
    }

    async fn ask_target(&self, record: &Record) -> Result<ResolveOutcome, String> {
        let query = ResolveQuery {
            id: record.id,
            source: self.state.me,
            target: record.peer,
            asked_at: crate::clock::now(),
        };
        let signed = Signed::sign(&query, &self.key);
        let mut stream = self
            .mesh
            .open_stream(&record.peer, RESOLVE_PROTOCOL, Duration::from_secs(5))
            .await?;
        write_typed(&mut stream, &signed)
            .await
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            read_typed::<_, Signed<ResolveAnswer>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?;
        let answer = validate_resolve_answer(&answer, &signed, &query).map_err(|e| {
            self.state.audit(AuditEvent::Refused {
                id: Some(record.id),
                peer: Some(record.peer),
                reason: format!("resolve answer refused: {e}"),
            });
            e.to_string()
        })?;
        Ok(answer.outcome)
    }

    async fn apply_resolution(&self, record: &Record, outcome: ResolveOutcome) {
        let id = record.id;
        self.state.audit(AuditEvent::Resolved {
            id,
            side: Side::Source,
            outcome: outcome.label().into(),
        });
        match outcome {
            ResolveOutcome::Committed { root } => {
                self.state.audit(AuditEvent::Commit {
                    id,
                    side: Side::Source,
                    root,
                });
                let _ = self.advance(
                    &id,
                    Phase::Committed { root },
                    &format!("resolved: the target committed root {}", root.short()),
                );
                self.destroy(&record.vm).await;
                info!(vm = %record.vm_name, "resolved: the VM runs on the target; source copy destroyed");
            }
            ResolveOutcome::NeverRan => {
                let detail = match self.resume(&record.vm).await {
                    Ok(()) => "resolved: the target never ran it; resumed here".to_string(),
                    Err(e) => format!("resolved: the target never ran it; resume failed: {e}"),
                };
                self.state.audit(AuditEvent::Abort {
                    id,
                    side: Side::Source,
                    reason: detail.clone(),
                });
                let _ = self.advance(&id, Phase::Aborted, &detail);
                info!(vm = %record.vm_name, "{detail}");
            }
            ResolveOutcome::RunningIncomplete => {
                // The guest ran on at the target past this copy: resuming it would fork the
                // VM. Post-copy without its source is lost (design §4).
                let detail = "resolved: post-copy ran on the target without every page; VM lost";
                self.state.audit(AuditEvent::Abort {
                    id,
                    side: Side::Source,
                    reason: detail.into(),
                });
                let _ = self.advance(&id, Phase::Incomplete, detail);
                self.destroy(&record.vm).await;
                error!(vm = %record.vm_name, "{detail}");
            }
            ResolveOutcome::InProgress => {}
        }
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
                f.at(p, &self.peer, &s.mesh).await;
            }
        }
        Ok(())
    }
}
