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
use drift_protocol::roster::{self, Announcement, MAX_ANNOUNCED_EPOCHS};
use drift_protocol::{NodeId, Roster, Signed, Timestamp};

use crate::audit::AuditLog;
use crate::durable::Overwrite;
use crate::identity::write_signed_roster;
use crate::table::Table;

/// The roster in force and the epochs before it (for announcements).
#[derive(Debug, Clone)]
pub struct RosterState {
    pub signed: Signed<Roster>,
    pub roster: Roster,
    /// Signed rosters up to and including the current one, oldest first, bounded.
    pub chain: Vec<Signed<Roster>>,
}

impl RosterState {
    /// The announcement that carries this node's chain.
    pub fn announcement(&self) -> Announcement {
        Announcement {
            chain: self.chain.clone(),
        }
    }
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
    pub admin: NodeId,
    pub started: Instant,
    pub insecure_open: bool,
    pub state_dir: PathBuf,
    roster: RwLock<RosterState>,
    table: Mutex<Table>,
    audit: Mutex<AuditLog>,
    pub counters: Counters,
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
        (signed, roster): (Signed<Roster>, Roster),
        table: Table,
        audit: AuditLog,
        vms: crate::hypervisor::Vms,
    ) -> Self {
        Self {
            me,
            admin: node.admin,
            started: Instant::now(),
            insecure_open: node.insecure_open,
            state_dir: node.state_dir.clone(),
            roster: RwLock::new(RosterState {
                chain: vec![signed.clone()],
                signed,
                roster,
            }),
            table: Mutex::new(table),
            audit: Mutex::new(audit),
            counters: Counters::default(),
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
        self.state_dir.join("roster.current")
    }

    /// Adopts the newest roster of `chain` that extends the current one. Persists it (atomic
    /// write) before it takes effect, and drops removed members from the table.
    pub fn adopt(
        &self,
        chain: &[Signed<Roster>],
        now: Timestamp,
    ) -> Result<Option<RosterChange>, roster::RosterError> {
        let mut guard = self.roster.write().unwrap_or_else(|p| p.into_inner());
        let walked = roster::advance(&guard.signed, &guard.roster, chain, &self.admin, now)?;
        let Some((signed, next)) = walked.last().cloned() else {
            return Ok(None);
        };
        if let Err(e) =
            write_signed_roster(&self.adopted_roster_path(), &signed, Overwrite::Replace)
        {
            tracing::warn!(error = %e, "could not persist adopted roster; using it in memory");
        }
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
        self.audit(drift_protocol::AuditEvent::RosterAdopted {
            epoch: next.epoch,
            hash: signed.hash(),
        });
        guard.signed = signed;
        guard.roster = next;
        self.table().retain_members(&guard.roster);
        self.counters
            .rosters_adopted
            .fetch_add(1, Ordering::Relaxed);
        Ok(Some(change))
    }
}
