//! Durable migration records: what each side must remember across a crash to keep the handoff
//! invariant (a VM is never lost and never runs on two hosts).
//!
//! One JSON file per migration in `<state_dir>/migrations/<id>.json`, replaced atomically at
//! every step that matters. The order of writes against VM actions is the whole point:
//!
//! | side   | written                                   | phase after           |
//! |--------|-------------------------------------------|-----------------------|
//! | source | before the offer goes out                 | `copying`             |
//! | source | before the VM is paused                   | `switching`           |
//! | source | before the device state of post-copy goes | `handed_over`         |
//! | source | on the target's signed commit, before the source copy is destroyed | `committed` |
//! | target | before the offer is accepted              | `receiving`           |
//! | target | before a post-copy VM resumes             | `running_post_copy`   |
//! | target | after the root verified, before resuming  | `committed`           |
//!
//! On restart ([`super::service::Migrations::recover`]): a source record in `copying` means
//! the VM never paused, so the target cannot have committed: the migration is over. In
//! `switching` or `handed_over` the source keeps the VM paused and asks the target. A target
//! record in `receiving` means the VM never ran there: the incoming copy is discarded, and
//! that is the answer the source will get.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use drift_protocol::migration::Mode;
use drift_protocol::{Hash, MigrationId, NodeId, Timestamp, VmId};
use serde::{Deserialize, Serialize};

use super::engine::Progress;
use crate::durable::{write_atomic, Overwrite};

/// Records kept at most; finished ones are pruned oldest first, never an unfinished one nor a
/// target's post-copy that did not complete.
pub const MAX_RECORDS: usize = 1024;
/// Largest record file read back.
const MAX_RECORD_BYTES: u64 = 64 * 1024;

/// Which end of the migration this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Target,
}

/// Where a migration stands, durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Source: the VM runs here; memory is being copied.
    Copying,
    /// Source: the VM is (about to be) paused here; the target may have committed.
    Switching,
    /// Source, post-copy: the target may run the VM; pages are being pushed.
    HandedOver,
    /// Target: memory is arriving; the VM has never run here.
    Receiving,
    /// Target, post-copy: the VM runs here; pages are still arriving.
    RunningPostCopy,
    /// The VM runs on the target, which verified `root`.
    Committed { root: Hash },
    /// The VM stays on (or went back to) the source; the target discarded its copy.
    Aborted,
    /// Post-copy: the VM ran on the target but not every page arrived; it is lost.
    Incomplete,
}

impl Phase {
    /// Whether the migration is over.
    pub fn finished(&self) -> bool {
        matches!(
            self,
            Phase::Committed { .. } | Phase::Aborted | Phase::Incomplete
        )
    }

    /// A short label for listings.
    pub fn label(&self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::Switching => "switching",
            Phase::HandedOver => "handed_over",
            Phase::Receiving => "receiving",
            Phase::RunningPostCopy => "running_post_copy",
            Phase::Committed { .. } => "committed",
            Phase::Aborted => "aborted",
            Phase::Incomplete => "incomplete",
        }
    }
}

/// One migration as this node recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub id: MigrationId,
    pub role: Role,
    pub vm: VmId,
    pub vm_name: String,
    pub peer: NodeId,
    pub mode: Mode,
    pub phase: Phase,
    pub started_at: Timestamp,
    pub updated_at: Timestamp,
    /// Why it ended as it did, or what it waits for.
    #[serde(default)]
    pub detail: String,
    /// The last progress figures (source side).
    #[serde(default)]
    pub progress: Option<Progress>,
}

impl Record {
    /// How the migration ended, as `drift migrations` says it, or `running`.
    pub fn outcome(&self) -> &'static str {
        match (self.role, &self.phase) {
            (_, Phase::Committed { .. }) => "committed",
            (Role::Source, Phase::Aborted) if self.detail.starts_with("refused") => "refused",
            (Role::Source, Phase::Aborted) => "resumed",
            (Role::Source, Phase::Incomplete) => "lost",
            (Role::Target, Phase::Aborted) => "aborted",
            (Role::Target, Phase::Incomplete) => "incomplete",
            _ => "running",
        }
    }
}

/// The records of one node.
#[derive(Debug)]
pub struct Records {
    dir: PathBuf,
    map: Mutex<BTreeMap<MigrationId, Record>>,
    /// Told of every record that reaches its end.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl Records {
    /// Opens (creating) `dir` and reads every record in it. Files that cannot be read are
    /// reported, left in place and skipped.
    pub fn open(dir: &Path) -> std::io::Result<(Self, Vec<String>)> {
        std::fs::create_dir_all(dir)?;
        let mut map = BTreeMap::new();
        let mut problems = Vec::new();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match read_record(&path) {
                Ok(r) => {
                    map.insert(r.id, r);
                }
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            }
        }
        Ok((
            Self {
                dir: dir.to_owned(),
                map: Mutex::new(map),
                metrics: None,
            },
            problems,
        ))
    }

    /// Counts every record that reaches its end from now on in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<MigrationId, Record>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, id: &MigrationId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `record` durably (atomic replace), then keeps it in memory. Returns only once it
    /// is on disk.
    pub fn put(&self, record: &Record) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        write_atomic(&self.path(&record.id), &bytes, 0o600, Overwrite::Replace)?;
        let mut map = self.map();
        let ended = record.phase.finished();
        let was_ended = map
            .insert(record.id, record.clone())
            .map(|r| r.phase.finished());
        self.prune(&mut map);
        drop(map);
        if ended && was_ended != Some(true) {
            if let Some(m) = &self.metrics {
                m.migration_finished(record);
            }
        }
        Ok(())
    }

    /// Changes the phase (and detail) of a record and writes it durably.
    pub fn advance(&self, id: &MigrationId, phase: Phase, detail: &str) -> std::io::Result<()> {
        let Some(mut r) = self.get(id) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no record of migration {id}"),
            ));
        };
        r.phase = phase;
        r.detail = detail.to_string();
        r.updated_at = crate::clock::now();
        self.put(&r)
    }

    /// Stores the final progress figures of a record (best effort: only for listings).
    pub fn set_progress(&self, id: &MigrationId, progress: Progress) {
        if let Some(mut r) = self.get(id) {
            r.progress = Some(progress);
            if let Err(e) = self.put(&r) {
                tracing::warn!(error = %e, "could not store migration figures");
            }
        }
    }

    /// One record.
    pub fn get(&self, id: &MigrationId) -> Option<Record> {
        self.map().get(id).cloned()
    }

    /// Every record, by id.
    pub fn all(&self) -> Vec<Record> {
        self.map().values().cloned().collect()
    }

    fn prune(&self, map: &mut BTreeMap<MigrationId, Record>) {
        while map.len() > MAX_RECORDS {
            let oldest = map
                .values()
                .filter(|r| {
                    r.phase.finished() && !(r.role == Role::Target && r.phase == Phase::Incomplete)
                })
                .min_by_key(|r| r.updated_at)
                .map(|r| r.id);
            let Some(id) = oldest else { break };
            map.remove(&id);
            let _ = std::fs::remove_file(self.path(&id));
        }
    }
}

fn read_record(path: &Path) -> Result<Record, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_RECORD_BYTES {
        return Err(format!("larger than {MAX_RECORD_BYTES} bytes"));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let expected = format!("{}.json", record.id);
    if path.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
        return Err(format!("holds migration {} under another name", record.id));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(n: u8, phase: Phase, at: u64) -> Record {
        Record {
            id: MigrationId::from_bytes([n; 16]),
            role: Role::Source,
            vm: VmId::from_bytes([n; 16]),
            vm_name: format!("vm-{n}"),
            peer: drift_protocol::SecretKey::from_bytes(&[n; 32]).public(),
            mode: Mode::PreCopy,
            phase,
            started_at: Timestamp(at),
            updated_at: Timestamp(at),
            detail: String::new(),
            progress: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (records, problems) = Records::open(dir.path()).unwrap();
        assert!(problems.is_empty());
        let r = record(1, Phase::Copying, 10);
        records.put(&r).unwrap();
        records.advance(&r.id, Phase::Switching, "paused").unwrap();
        std::fs::write(dir.path().join("junk.json"), b"{not json").unwrap();
        let (again, problems) = Records::open(dir.path()).unwrap();
        let back = again.get(&r.id).unwrap();
        assert_eq!(back.phase, Phase::Switching);
        assert_eq!(back.detail, "paused");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("junk.json"), "{problems:?}");
    }

    #[test]
    fn pruning_keeps_unfinished_records() {
        let dir = tempfile::tempdir().unwrap();
        let (records, _) = Records::open(dir.path()).unwrap();
        let unfinished = record(0, Phase::Switching, 0);
        records.put(&unfinished).unwrap();
        for i in 1..=(MAX_RECORDS + 5) {
            let mut r = record(1, Phase::Aborted, i as u64);
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            r.id = MigrationId::from_bytes(id);
            records.put(&r).unwrap();
        }
        assert_eq!(records.all().len(), MAX_RECORDS);
        assert!(records.get(&unfinished.id).is_some());
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, MAX_RECORDS);
    }
}
