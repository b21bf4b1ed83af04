//! Migrations between nodes: one libp2p stream per migration (`/drift/migrate/1`), Noise-
//! encrypted and open only between roster members.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source node
//!     participant T as target node
//!     S->>T: open /drift/migrate/1
//!     S->>T: Signed<MigrationOffer>
//!     Note over T: admission (the stream's peer must be the signer)
//!     T->>S: Signed<MigrationDecision>
//!     Note over T: on accept: an empty, paused incoming VM
//!     S->>T: transfer frames (see migration::engine)
//!     T->>S: Commit | Abort | PageRequest
//! ```
//!
//! Negotiating on the stream that will carry the memory binds the transfer to exactly the two
//! peers of the accepted offer: no other stream can present it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drift_protocol::audit::Side;
use drift_protocol::migration::{
    validate_decision, MigrationDecision, MigrationOffer, Mode, RejectReason, Verdict, VmSummary,
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
use tracing::{info, warn};

use super::engine::{
    run_source, run_target, Progress, SocketVmm, SourceOutcome, SourceParams, SourceTransfer,
    TargetOutcome,
};
use super::frames::{read_typed, write_typed};
use crate::admission::{Admission, HostLoad, Limits};
use crate::hypervisor::{VmSpec, SOCKET_FILE};
use crate::mesh::{peer_id, Client};
use crate::state::NodeState;

/// The stream protocol of migrations.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/migrate/1");
/// Negotiation frames are small.
const MAX_NEGOTIATION_FRAME: usize = 64 * 1024;
/// Incoming migration streams handled at once (more wait; admission refuses past its limit).
const MAX_STREAMS: usize = 8;
/// Finished migrations remembered for `drift migrations`.
const MAX_FINISHED: usize = 64;
/// Migrations this node sends at once.
const MAX_OUTGOING: usize = 4;

/// One migration as `drift migrations` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationView {
    pub id: MigrationId,
    pub vm: String,
    pub role: String,
    pub peer: NodeId,
    pub mode: Mode,
    /// `negotiating | running | committed | resumed | unknown | aborted | refused`.
    pub state: String,
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
    #[error("could not reach the target: {0}")]
    Unreachable(String),
    #[error("the target refused: {0}")]
    Refused(RejectReason),
    #[error("the target's answer is not valid: {0}")]
    BadDecision(String),
    #[error("{0}")]
    Busy(String),
}

/// A migration's view, and its live progress while it runs here as the source.
type Tracked = (MigrationView, Option<watch::Receiver<Progress>>);

/// The migrations of one node.
pub struct Migrations {
    state: Arc<NodeState>,
    mesh: Client,
    key: SecretKey,
    admission: Mutex<Admission>,
    views: Mutex<BTreeMap<MigrationId, Tracked>>,
    /// Cancel handles of the migrations running here as the source.
    cancels: Mutex<BTreeMap<MigrationId, CancellationToken>>,
    /// VMs being sent from here: one migration per VM at a time, at most `MAX_OUTGOING`.
    outgoing: Mutex<std::collections::BTreeSet<VmId>>,
}

impl std::fmt::Debug for Migrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrations").finish_non_exhaustive()
    }
}

impl Migrations {
    /// The migration service of a node.
    pub fn new(state: Arc<NodeState>, mesh: Client, key: SecretKey) -> Arc<Self> {
        Arc::new(Self {
            state,
            mesh,
            key,
            admission: Mutex::new(Admission::new(Limits::default())),
            views: Mutex::new(BTreeMap::new()),
            cancels: Mutex::new(BTreeMap::new()),
            outgoing: Mutex::new(std::collections::BTreeSet::new()),
        })
    }

    fn set(&self, view: MigrationView, progress: Option<watch::Receiver<Progress>>) {
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        views.insert(view.id, (view, progress));
        while views.len() > MAX_FINISHED {
            let Some(old) = views
                .iter()
                .find(|(_, (v, _))| !matches!(v.state.as_str(), "negotiating" | "running"))
                .map(|(id, _)| *id)
            else {
                break;
            };
            views.remove(&old);
        }
    }

    fn update(&self, id: &MigrationId, state: &str, detail: String) {
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, p)) = views.get_mut(id) {
            v.state = state.into();
            v.detail = detail;
            if let Some(p) = p.take() {
                v.progress = Some(p.borrow().clone());
            }
        }
    }

    /// Cancels a migration this node is sending. Before switchover the VM resumes here; after
    /// it, the migration completes anyway. Returns whether such a migration was running.
    pub fn cancel(&self, id: &MigrationId) -> bool {
        let cancels = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
        match cancels.get(id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Every migration known, newest state first in id order.
    pub fn list(&self) -> Vec<MigrationView> {
        let views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        views
            .values()
            .map(|(v, p)| {
                let mut v = v.clone();
                if let Some(p) = p {
                    v.progress = Some(p.borrow().clone());
                }
                v
            })
            .collect()
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

    /// Accepts migration streams until `cancel`.
    pub fn spawn_acceptor(
        self: &Arc<Self>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut control = this.mesh.streams();
            let mut incoming = match control.accept(PROTOCOL) {
                Ok(i) => i,
                Err(e) => {
                    warn!(error = %e, "cannot accept migration streams");
                    return;
                }
            };
            let permits = Arc::new(Semaphore::new(MAX_STREAMS));
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = incoming.next() => next,
                };
                let Some((peer, stream)) = next else { break };
                let Some(from) = crate::mesh::node_id(&peer) else {
                    continue;
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    // Too many at once: dropping the stream refuses it at no cost.
                    continue;
                };
                let this = this.clone();
                tokio::spawn(async move {
                    this.incoming(from, stream.compat()).await;
                    drop(permit);
                });
            }
        })
    }

    async fn incoming<S>(&self, from: NodeId, mut stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            read_typed::<_, Signed<MigrationOffer>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await;
        let Ok(Ok(signed)) = read else {
            self.state.audit(AuditEvent::Refused {
                id: None,
                peer: Some(from),
                reason: "migration stream did not start with a valid offer".into(),
            });
            return;
        };
        let now = crate::clock::now();
        let load = self.host_load();
        let verdict = {
            let roster = self.state.roster();
            let mut adm = self.admission.lock().unwrap_or_else(|p| p.into_inner());
            adm.decide(&signed, &from, &self.state.me, &roster.roster, &load, now)
        };
        let (offer, reservation) = match verdict {
            Ok(ok) => ok,
            Err(reason) => {
                self.state.audit(AuditEvent::Refused {
                    id: None,
                    peer: Some(from),
                    reason: format!("offer refused: {reason}"),
                });
                info!(from = %from.short(), %reason, "refused a migration offer");
                // Answer only well-formed offers addressed here; others get nothing.
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
        };
        if let Err(e) = self.state.vms.create(spec.clone()).await {
            self.release(&offer.id);
            warn!(error = %e, "could not prepare the incoming VM");
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
                Verdict::Accept {
                    reserved_until: reservation.until,
                },
            )
            .await
            .is_err()
        {
            self.discard(&offer, "decision not delivered").await;
            return;
        }
        self.set(
            MigrationView {
                id: offer.id,
                vm: offer.vm.name.clone(),
                role: "target".into(),
                peer: from,
                mode: offer.mode,
                state: "running".into(),
                detail: String::new(),
                progress: None,
            },
            None,
        );
        self.state.audit(AuditEvent::TransferStarted {
            id: offer.id,
            side: Side::Target,
            peer: from,
        });
        let vm = SocketVmm::new(self.state.vms.dir_of(&offer.vm.id).join(SOCKET_FILE));
        let accepted = Accepted {
            id: offer.id,
            offer: signed.hash(),
            source: from,
            mode: offer.mode,
            page_count: offer.vm.memory_mib * 256,
        };
        let state = self.state.clone();
        let id = offer.id;
        let outcome = run_target(
            &vm,
            stream,
            Receiver::new(accepted),
            id,
            &self.key,
            |root| {
                // The commit is durable before the VM resumes here.
                state.audit(AuditEvent::Commit {
                    id,
                    side: Side::Target,
                    root: *root,
                });
                state.vms.mark_arrived(&spec.id)
            },
        )
        .await;
        self.release(&offer.id);
        match outcome {
            Ok(TargetOutcome::Committed { root }) => {
                info!(vm = %offer.vm.name, from = %from.short(), "VM arrived and runs here");
                self.update(&id, "committed", format!("root {}", root.short()));
            }
            Ok(TargetOutcome::Incomplete { reason }) => {
                warn!(vm = %offer.vm.name, %reason, "post-copy incomplete");
                self.state.audit(AuditEvent::Abort {
                    id,
                    side: Side::Target,
                    reason: reason.clone(),
                });
                self.update(&id, "incomplete", reason);
            }
            Ok(TargetOutcome::Aborted { reason }) => {
                self.discard(&offer, &reason).await;
                self.update(&id, "aborted", reason);
            }
            Err(e) => {
                self.discard(&offer, &e.to_string()).await;
                self.update(&id, "aborted", e.to_string());
            }
        }
    }

    fn release(&self, id: &MigrationId) {
        self.admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(id);
    }

    async fn discard(&self, offer: &MigrationOffer, reason: &str) {
        self.state.audit(AuditEvent::Abort {
            id: offer.id,
            side: Side::Target,
            reason: reason.to_string(),
        });
        if let Err(e) = self.state.vms.destroy(&offer.vm.id.to_string()).await {
            warn!(error = %e, "could not discard the incoming VM");
        }
        self.release(&offer.id);
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
            let mut outgoing = self.outgoing.lock().unwrap_or_else(|p| p.into_inner());
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
            self.outgoing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&spec.id);
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
            },
            mode,
            nonce,
            issued_at: now,
            expires_at: now.plus_millis(30_000),
            roster_epoch: epoch,
        };
        let signed = Signed::sign(&offer, &self.key);
        self.state.audit(AuditEvent::OfferSent {
            id: offer.id,
            vm: spec.id,
            target,
            mode,
            offer: signed.hash(),
        });
        let mut control = self.mesh.streams();
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            control.open_stream(peer_id(&target), PROTOCOL),
        )
        .await
        .map_err(|_| MigrateError::Unreachable("timed out".into()))?
        .map_err(|e| MigrateError::Unreachable(e.to_string()))?;
        let mut stream = stream.compat();
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
        let decision = validate_decision(&decision, &signed, &offer)
            .map_err(|e| MigrateError::BadDecision(e.to_string()))?;
        if let Verdict::Reject(reason) = decision.verdict {
            return Err(MigrateError::Refused(reason));
        }
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        self.set(
            MigrationView {
                id: offer.id,
                vm: spec.name.clone(),
                role: "source".into(),
                peer: target,
                mode,
                state: "running".into(),
                detail: String::new(),
                progress: None,
            },
            Some(progress_rx),
        );
        self.state.audit(AuditEvent::TransferStarted {
            id: offer.id,
            side: Side::Source,
            peer: target,
        });
        let cancel = CancellationToken::new();
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(offer.id, cancel.clone());
        let this = self.clone();
        let transfer = SourceTransfer {
            id: offer.id,
            offer: signed.hash(),
            page_count: spec.memory_mib * 256,
            key: self.key.clone(),
            target,
        };
        tokio::spawn(async move {
            let vm = SocketVmm::new(this.state.vms.dir_of(&spec.id).join(SOCKET_FILE));
            let params = SourceParams { mode, ..params };
            let outcome =
                run_source(&vm, stream, transfer.clone(), params, &progress_tx, cancel).await;
            let id = transfer.id;
            this.cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            this.outgoing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&spec.id);
            match outcome {
                Ok(SourceOutcome::Committed { commit, .. }) => {
                    this.state.audit(AuditEvent::Commit {
                        id,
                        side: Side::Source,
                        root: commit.root,
                    });
                    if let Err(e) = this.state.vms.destroy(&spec.id.to_string()).await {
                        warn!(error = %e, "could not destroy the migrated VM's source copy");
                    }
                    info!(vm = %spec.name, "VM moved");
                    this.update(&id, "committed", format!("root {}", commit.root.short()));
                }
                Ok(SourceOutcome::ResumedHere { reason }) => {
                    this.state.audit(AuditEvent::Abort {
                        id,
                        side: Side::Source,
                        reason: reason.clone(),
                    });
                    this.update(&id, "resumed", reason);
                }
                Ok(SourceOutcome::Unknown { reason }) => {
                    warn!(vm = %spec.name, %reason, "migration outcome unknown: VM stays paused");
                    this.update(&id, "unknown", reason);
                }
                Err(e) => this.update(&id, "unknown", e.to_string()),
            }
        });
        Ok(offer.id)
    }
}
