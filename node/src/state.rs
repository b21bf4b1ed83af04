//! The shared state of a running node: its roster, its peer table and its counters.
//!
//! The mesh event loop writes reports and rosters; the monitor writes the node's own report;
//! the admin API reads. Locks are held only for short, non-async sections.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Instant;

use drift_protocol::report::Rejection;
use drift_protocol::roster::{self, Admins, Announcement, Endorsed, MAX_ANNOUNCED_EPOCHS};
use drift_protocol::{NodeId, Roster, Timestamp};

use crate::audit::AuditLog;
use crate::durable::Overwrite;
use crate::identity::write_signed_roster;
use crate::table::Table;

/// The roster in force and the epochs before it (for announcements).
#[derive(Debug, Clone)]
pub struct RosterState {
    pub signed: Endorsed,
    pub roster: Roster,
    /// Signed rosters up to and including the current one, oldest first, bounded.
    pub chain: Vec<Endorsed>,
}

impl RosterState {
    /// The announcement that carries this node's chain.
    pub fn announcement(&self) -> Announcement {
        Announcement {
            chain: self.chain.clone(),
        }
    }
}

/// The adopted roster's file in the state directory.
pub const ADOPTED_ROSTER: &str = "roster.current";
/// The adopted epochs' file in the state directory.
pub const ADOPTED_CHAIN: &str = "roster.chain";

/// The roster a node starts with: the newest verified epoch and the epochs before it it can
/// announce.
#[derive(Debug, Clone)]
pub struct LoadedRoster {
    pub signed: Endorsed,
    pub roster: Roster,
    /// Oldest first, ending with `signed`.
    pub chain: Vec<Endorsed>,
}

/// What changed when a roster was adopted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RosterChange {
    pub epoch: u64,
    pub added: Vec<NodeId>,
    pub removed: Vec<NodeId>,
}

/// Counters shown by `drift status`.
#[derive(Debug, Default)]
pub struct Counters {
    rejected: [AtomicU64; Rejection::LABELS.len()],
    pub reports_accepted: AtomicU64,
    pub reports_published: AtomicU64,
    pub publish_failures: AtomicU64,
    pub connections_denied: AtomicU64,
    pub rosters_adopted: AtomicU64,
    pub rosters_refused: AtomicU64,
}

impl Counters {
    /// Counts a rejected report by its reason.
    pub fn reject(&self, why: &Rejection) {
        if let Some(i) = Rejection::LABELS.iter().position(|l| *l == why.label()) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Rejections by reason label (every label present, zeros included).
    pub fn rejections(&self) -> BTreeMap<String, u64> {
        Rejection::LABELS
            .iter()
            .zip(&self.rejected)
            .map(|(l, c)| (l.to_string(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Everything a running node shares between its tasks.
#[derive(Debug)]
pub struct NodeState {
    pub me: NodeId,
    /// The configured trust anchor: the admins of the roster the node loaded, and of every
    /// epoch after one that names no admins.
    pub trust: Admins,
    pub started: Instant,
    pub insecure_open: bool,
    pub state_dir: PathBuf,
    roster: RwLock<RosterState>,
    table: Mutex<Table>,
    audit: Mutex<AuditLog>,
    pub counters: Counters,
    /// Audit heads judged (`crate::witness`).
    pub head_counters: crate::witness::HeadCounters,
    /// The audit heads of peers this node witnessed.
    witness: Mutex<drift_protocol::witness::WitnessBook>,
    /// The book changed since it was last saved.
    pub book_changed: std::sync::atomic::AtomicBool,
    /// Event counters for `GET /metrics`.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Peers' clocks against this host's, from their reports; and what they say of it.
    pub skew: Mutex<drift_protocol::skew::SkewEstimate>,
    pub clock_off: Mutex<Option<drift_protocol::skew::OwnClockOff>>,
    /// The node's VMs.
    pub vms: crate::hypervisor::Vms,
    /// Consolidation: this host is draining its VMs away and refuses offers meanwhile.
    pub draining: std::sync::atomic::AtomicBool,
    /// Consolidation: this host drained and sleeps; its load reports say so.
    pub standby: std::sync::atomic::AtomicBool,
}

impl NodeState {
    /// New state around a verified roster, for the node `me` configured by `node`.
    pub fn new(
        me: NodeId,
        node: &crate::config::NodeSection,
        loaded: LoadedRoster,
        table: Table,
        audit: AuditLog,
        vms: crate::hypervisor::Vms,
    ) -> Self {
        Self {
            me,
            trust: node.trust(),
            started: Instant::now(),
            insecure_open: node.insecure_open,
            state_dir: node.state_dir.clone(),
            roster: RwLock::new(RosterState {
                chain: loaded.chain,
                signed: loaded.signed,
                roster: loaded.roster,
            }),
            table: Mutex::new(table),
            audit: Mutex::new(audit),
            counters: Counters::default(),
            head_counters: Default::default(),
            witness: Mutex::new(match crate::witness::load_book(&node.state_dir) {
                Ok(book) => book.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring the saved witnessed audit heads");
                    Default::default()
                }
            }),
            book_changed: Default::default(),
            metrics: Default::default(),
            skew: Default::default(),
            clock_off: Default::default(),
            vms,
            draining: Default::default(),
            standby: Default::default(),
        }
    }

    /// The roster in force.
    pub fn roster(&self) -> RwLockReadGuard<'_, RosterState> {
        self.roster.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer table.
    pub fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event to the node's audit log. A failure to write is logged loudly; the node
    /// keeps running (its peers keep their own records).
    pub fn audit(&self, event: drift_protocol::AuditEvent) {
        let mut log = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = log.append(event) {
            tracing::error!(error = %e, "could not write the audit log");
        }
    }

    /// Roster hosts by liveness (`alive`, `suspect`, `gone`, `unknown`; zeros included), as
    /// this node's table sees them now.
    pub fn hosts_by_liveness(&self) -> BTreeMap<String, usize> {
        use crate::table::Liveness;
        let roster = self.roster();
        let rows = self.table().rows(&roster.roster, &self.me, Instant::now());
        [
            Liveness::Alive,
            Liveness::Suspect,
            Liveness::Gone,
            Liveness::Unknown,
        ]
        .into_iter()
        .map(|l| (l.to_string(), rows.iter().filter(|r| r.state == l).count()))
        .collect()
    }

    /// The audit heads of peers this node witnessed.
    pub fn witness_book(&self) -> MutexGuard<'_, drift_protocol::witness::WitnessBook> {
        self.witness.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Signs `value` with the node's key.
    pub fn sign<T: drift_protocol::signed::Signable>(
        &self,
        value: &T,
    ) -> drift_protocol::Signed<T> {
        self.audit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sign(value)
    }

    /// Countersigns a peer's audit head this node accepted.
    pub fn countersign(
        &self,
        head: drift_protocol::Signed<drift_protocol::witness::AuditHead>,
    ) -> drift_protocol::witness::Witnessed {
        let seen = crate::clock::now();
        let countersign = self.sign(&drift_protocol::witness::Countersign {
            head: head.hash(),
            witness: self.me,
            seen,
        });
        drift_protocol::witness::Witnessed { head, countersign }
    }

    /// The newest audit record's `(seq, hash)`, if any.
    pub fn audit_head(&self) -> Option<drift_protocol::audit::Anchor> {
        self.audit.lock().unwrap_or_else(|p| p.into_inner()).head()
    }

    /// The path of the audit log.
    pub fn audit_path(&self) -> PathBuf {
        self.audit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .path()
            .to_owned()
    }

    /// The path of the adopted roster in the state directory.
    pub fn adopted_roster_path(&self) -> PathBuf {
        self.state_dir.join(ADOPTED_ROSTER)
    }

    /// The path of the adopted epochs (an announcement: up to the last
    /// [`MAX_ANNOUNCED_EPOCHS`], oldest first) in the state directory.
    pub fn adopted_chain_path(&self) -> PathBuf {
        self.state_dir.join(ADOPTED_CHAIN)
    }

    /// Adopts the newest roster of `chain` that extends the current one. Persists it (atomic
    /// write) before it takes effect, and drops removed members from the table.
    pub fn adopt(
        &self,
        chain: &[Endorsed],
        now: Timestamp,
    ) -> Result<Option<RosterChange>, roster::RosterError> {
        let mut guard = self.roster.write().unwrap_or_else(|p| p.into_inner());
        let walked = roster::advance(&guard.signed, &guard.roster, chain, &self.trust, now)?;
        let Some((signed, next)) = walked.last().cloned() else {
            return Ok(None);
        };
        let old: Vec<NodeId> = guard.roster.members.iter().map(|m| m.id).collect();
        let new: Vec<NodeId> = next.members.iter().map(|m| m.id).collect();
        let change = RosterChange {
            epoch: next.epoch,
            added: new.iter().filter(|id| !old.contains(id)).copied().collect(),
            removed: old.iter().filter(|id| !new.contains(id)).copied().collect(),
        };
        // Keep every epoch crossed, so this node's announcements can lift laggards.
        guard.chain.extend(walked.into_iter().map(|(s, _)| s));
        let excess = guard.chain.len().saturating_sub(MAX_ANNOUNCED_EPOCHS);
        guard.chain.drain(..excess);
        // Persisted before it takes effect: the head (read by earlier versions and tools) and
        // the chain that proves it from older epochs (read at restart).
        let chain = Announcement {
            chain: guard.chain.clone(),
        };
        let persisted =
            write_signed_roster(&self.adopted_roster_path(), &signed, Overwrite::Replace).and_then(
                |()| {
                    crate::durable::write_atomic(
                        &self.adopted_chain_path(),
                        &chain.encode_frame(),
                        0o644,
                        Overwrite::Replace,
                    )
                    .map_err(|source| crate::identity::FileError::Write {
                        path: self.adopted_chain_path(),
                        cause: source,
                    })
                },
            );
        if let Err(e) = persisted {
            tracing::warn!(error = %e, "could not persist adopted roster; using it in memory");
        }
        self.audit(drift_protocol::AuditEvent::RosterAdopted {
            epoch: next.epoch,
            hash: signed.hash(),
        });
        guard.signed = signed;
        guard.roster = next;
        self.table().retain_members(&guard.roster);
        self.witness_book().retain_members(&guard.roster);
        self.counters
            .rosters_adopted
            .fetch_add(1, Ordering::Relaxed);
        Ok(Some(change))
    }
}
