//! The peer load table: the newest valid report of every host, with its age and liveness.
//!
//! Pure state: callers pass `now` (a monotonic [`Instant`]) in. Age is measured on this node's
//! own monotonic clock from when the report arrived, so clock skew between hosts never makes a
//! live host look dead. A host that stops reporting is marked `suspect`, then `gone`; it stays
//! in the table until the roster drops it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use drift_protocol::roster::{Role, Roster};
use drift_protocol::{LoadReport, NodeId, Timestamp};
use serde::{Deserialize, Serialize};

/// How recently a host was heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Reported within `suspect_after`.
    Alive,
    /// Last report older than `suspect_after`.
    Suspect,
    /// Last report older than `gone_after`.
    Gone,
    /// A roster member never heard from since this node started.
    Unknown,
}

impl std::fmt::Display for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Gone => "gone",
            Liveness::Unknown => "unknown",
        })
    }
}

#[derive(Debug, Clone)]
struct Entry {
    report: LoadReport,
    received: Instant,
}

/// Newest report per node.
#[derive(Debug)]
pub struct Table {
    entries: HashMap<NodeId, Entry>,
    suspect_after: Duration,
    gone_after: Duration,
}

/// One row of `drift table` (and of `GET /v1/table`). Field names are part of the stable JSON
/// output documented in the README.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub id: NodeId,
    pub state: Liveness,
    /// Milliseconds since this node received the host's newest report.
    pub age_ms: Option<u64>,
    pub seq: Option<u64>,
    /// CPU utilization, 0.0 to 1.0.
    pub cpu: Option<f64>,
    pub mem_used_mib: Option<u64>,
    pub mem_total_mib: Option<u64>,
    pub power_watts: Option<f64>,
    pub power_measured: Option<bool>,
    pub vms: Option<u32>,
    /// The VMs' CPU demand, fraction of host capacity.
    pub vm_demand: Option<f64>,
    /// CPU reserved for incoming migrations, fraction of host capacity.
    pub reserved: Option<f64>,
    /// The host drained its VMs to consolidate and sleeps (`balance.consolidate`).
    #[serde(default)]
    pub standby: Option<bool>,
    pub issued_at: Option<Timestamp>,
    pub labels: BTreeMap<String, String>,
    /// This row is the node answering.
    pub me: bool,
}

impl Table {
    /// An empty table with the liveness thresholds.
    pub fn new(suspect_after: Duration, gone_after: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            suspect_after,
            gone_after,
        }
    }

    /// The newest seq held for `node`.
    pub fn newest_seq(&self, node: &NodeId) -> Option<u64> {
        self.entries.get(node).map(|e| e.report.seq)
    }

    /// Stores `report` if it is newer than what is held; returns whether it was.
    pub fn insert(&mut self, report: LoadReport, now: Instant) -> bool {
        if self
            .newest_seq(&report.node)
            .is_some_and(|seq| seq >= report.seq)
        {
            return false;
        }
        self.entries.insert(
            report.node,
            Entry {
                report,
                received: now,
            },
        );
        true
    }

    /// The newest report of `node`.
    pub fn report(&self, node: &NodeId) -> Option<&LoadReport> {
        self.entries.get(node).map(|e| &e.report)
    }

    /// Liveness of `node` at `now`.
    pub fn liveness(&self, node: &NodeId, now: Instant) -> Liveness {
        match self.entries.get(node) {
            None => Liveness::Unknown,
            Some(e) => {
                let age = now.saturating_duration_since(e.received);
                if age > self.gone_after {
                    Liveness::Gone
                } else if age > self.suspect_after {
                    Liveness::Suspect
                } else {
                    Liveness::Alive
                }
            }
        }
    }

    /// Forgets nodes that are no longer roster members.
    pub fn retain_members(&mut self, roster: &Roster) {
        self.entries.retain(|id, _| roster.member(id).is_some());
    }

    /// One row per roster host, sorted by name.
    pub fn rows(&self, roster: &Roster, me: &NodeId, now: Instant) -> Vec<Row> {
        let mut rows: Vec<Row> = roster
            .members
            .iter()
            .filter(|m| m.has_role(Role::Host))
            .map(|m| {
                let e = self.entries.get(&m.id);
                let r = e.map(|e| &e.report);
                let frac = |permille: u32| f64::from(permille) / 1000.0;
                Row {
                    name: m.name.clone(),
                    id: m.id,
                    state: self.liveness(&m.id, now),
                    age_ms: e.map(|e| now.saturating_duration_since(e.received).as_millis() as u64),
                    seq: r.map(|r| r.seq),
                    cpu: r.map(|r| frac(u32::from(r.cpu_permille))),
                    mem_used_mib: r.map(|r| r.mem_used_mib),
                    mem_total_mib: r.map(|r| r.mem_total_mib),
                    power_watts: r.map(|r| r.power_mw as f64 / 1000.0),
                    power_measured: r.map(|r| r.power_measured),
                    vms: r.map(|r| r.vm_count),
                    vm_demand: r.map(|r| frac(r.vm_demand_permille)),
                    reserved: r.map(|r| frac(r.reserved_permille)),
                    standby: r.map(|r| r.standby),
                    issued_at: r.map(|r| r.issued_at),
                    labels: m.labels.clone(),
                    me: &m.id == me,
                }
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drift_protocol::roster::{Capacity, Member};
    use drift_protocol::SecretKey;
    use rand_core::OsRng;

    fn report(node: NodeId, seq: u64) -> LoadReport {
        LoadReport {
            node,
            seq,
            issued_at: Timestamp(seq),
            roster_epoch: 1,
            cpu_permille: 500,
            mem_used_mib: 1,
            mem_total_mib: 2,
            power_mw: 200_000,
            power_measured: false,
            vm_count: 0,
            vm_demand_permille: 0,
            reserved_permille: 0,
            standby: false,
        }
    }

    #[test]
    fn keeps_newest_and_ages_into_suspect_then_gone() {
        let a = SecretKey::generate(&mut OsRng).public();
        let mut t = Table::new(Duration::from_secs(5), Duration::from_secs(15));
        let t0 = Instant::now();
        assert_eq!(t.liveness(&a, t0), Liveness::Unknown);
        assert!(t.insert(report(a, 2), t0));
        assert!(!t.insert(report(a, 2), t0));
        assert!(!t.insert(report(a, 1), t0));
        assert_eq!(t.newest_seq(&a), Some(2));
        assert_eq!(t.liveness(&a, t0 + Duration::from_secs(5)), Liveness::Alive);
        assert_eq!(
            t.liveness(&a, t0 + Duration::from_secs(6)),
            Liveness::Suspect
        );
        assert_eq!(t.liveness(&a, t0 + Duration::from_secs(16)), Liveness::Gone);
        assert!(t.insert(report(a, 3), t0 + Duration::from_secs(16)));
        assert_eq!(
            t.liveness(&a, t0 + Duration::from_secs(16)),
            Liveness::Alive
        );
    }

    #[test]
    fn rows_cover_every_roster_host_and_drop_removed_members() {
        let a = SecretKey::generate(&mut OsRng).public();
        let b = SecretKey::generate(&mut OsRng).public();
        let member = |id, name: &str| Member {
            id,
            name: name.into(),
            roles: vec![Role::Host],
            labels: BTreeMap::new(),
            capacity: Capacity::default(),
        };
        let mut roster = Roster {
            cluster: "c".into(),
            epoch: 1,
            prev: None,
            not_before: Timestamp(0),
            not_after: Timestamp(1),
            members: vec![member(b, "b"), member(a, "a")],
            admins: None,
        };
        let mut t = Table::new(Duration::from_secs(5), Duration::from_secs(15));
        let now = Instant::now();
        t.insert(report(a, 1), now);
        t.insert(report(b, 1), now);
        let rows = t.rows(&roster, &a, now);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].name.as_str(), rows[0].me), ("a", true));
        assert_eq!(rows[0].cpu, Some(0.5));
        assert_eq!(rows[1].state, Liveness::Alive);
        roster.members.retain(|m| m.id == a);
        t.retain_members(&roster);
        assert_eq!(t.newest_seq(&b), None);
    }
}
