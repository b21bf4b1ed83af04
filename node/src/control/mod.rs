//! The admin API: HTTP/1.1 + JSON on a Unix socket, versioned paths.
//!
//! The socket is created mode 0600 in a directory the node owns: whoever can open it may
//! administer the node, and nobody else. Every read has a stable JSON shape carrying
//! `"version": 1`.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/v1/status` | the node, its roster, its counters |
//! | GET | `/v1/peers` | connected peers |
//! | GET | `/v1/table` | the peer load table, one row per roster host |
//! | POST | `/v1/roster` | a signed roster (codec frame) to adopt and announce |
//! | GET | `/v1/vms` | the node's VMs |
//! | POST | `/v1/vms` | start a sandbox VM (`CreateVm`) |
//! | POST | `/v1/vms/{vm}/verify` | check a VM's memory page by page |
//! | DELETE | `/v1/vms/{vm}` | stop and delete a VM |
//! | GET | `/v1/migrations` | running and recent migrations |
//! | POST | `/v1/migrations` | move a VM to another node (`StartMigration`) |
//! | POST | `/v1/migrations/{id}/cancel` | cancel one (before switchover the VM stays here) |
//! | GET | `/v1/decisions` | the balancing autopilot's newest decisions, explained |

pub mod client;
pub mod server;

use std::collections::BTreeMap;

use drift_protocol::NodeId;
use serde::{Deserialize, Serialize};

use crate::mesh::PeerInfo;
use crate::table::Row;

/// The JSON shape version of every response.
pub const API_VERSION: u32 = 1;

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub version: u32,
    pub node: NodeId,
    pub name: Option<String>,
    pub cluster: String,
    pub roster_epoch: u64,
    pub uptime_ms: u64,
    pub listen: Vec<String>,
    pub peers: usize,
    /// Roster hosts by liveness: alive, suspect, gone, unknown.
    pub hosts: BTreeMap<String, usize>,
    pub insecure_open: bool,
    pub reports_accepted: u64,
    pub reports_published: u64,
    pub publish_failures: u64,
    /// Refused reports by reason (every reason listed, zeros included).
    pub reports_rejected: BTreeMap<String, u64>,
    pub connections_denied: u64,
    pub rosters_adopted: u64,
    pub rosters_refused: u64,
    /// Incoming migrations: slots in use, reservations, backed-off sources.
    #[serde(default)]
    pub admission: crate::admission::AdmissionView,
    /// Set when most peers' reports say this host's clock is off, and by how much.
    #[serde(default)]
    pub clock_off: Option<drift_protocol::skew::OwnClockOff>,
    /// Incoming migration streams being served (negotiating or transferring).
    #[serde(default)]
    pub incoming_streams: usize,
}

/// `GET /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersView {
    pub version: u32,
    pub peers: Vec<PeerInfo>,
}

/// `GET /v1/table`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableView {
    pub version: u32,
    pub node: NodeId,
    pub roster_epoch: u64,
    pub rows: Vec<Row>,
}

/// `POST /v1/roster`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RosterPushView {
    pub version: u32,
    pub adopted: bool,
    pub epoch: u64,
}

/// `GET /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmsView {
    pub version: u32,
    /// This node's roster name.
    pub host: String,
    pub vms: Vec<crate::hypervisor::VmView>,
}

/// `POST /v1/vms`: a VM to start (a sandbox VM, or a QEMU VM with `qemu`); also a `[[vm]]`
/// entry of the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    pub memory_mib: u64,
    #[serde(default = "one")]
    pub vcpus: u32,
    /// CPU demand, fraction of the host (0.0 to 1.0).
    pub demand: f64,
    #[serde(default)]
    pub dirty_mib_per_s: f64,
    /// Percent of each page the workload writes random (sandbox VMs; default 100).
    #[serde(default)]
    pub page_random_pct: Option<u8>,
    #[serde(default)]
    pub jurisdictions: Vec<String>,
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// A QEMU VM (its machine); absent: a sandbox VM.
    #[serde(default)]
    pub qemu: Option<crate::hypervisor::qemu::QemuSpec>,
}

impl CreateVm {
    /// Checks the request and makes the VM's spec (a fresh id and seed).
    pub fn to_spec(self) -> Result<crate::hypervisor::VmSpec, String> {
        if !(0.0..=1.0).contains(&self.demand)
            || !(0.0..=1024.0).contains(&self.dirty_mib_per_s)
            || self.page_random_pct.is_some_and(|p| p > 100)
        {
            return Err(format!(
                "VM {:?}: demand must be 0.0 to 1.0, dirty_mib_per_s 0 to 1024 and \
                 page_random_pct 0 to 100",
                self.name
            ));
        }
        let names_ok = self
            .jurisdictions
            .iter()
            .chain(&self.regions)
            .chain(self.anti_affinity.iter())
            .all(|n| drift_protocol::roster::valid_name(n));
        let limit = drift_protocol::migration::MAX_PLACEMENT_ENTRIES;
        if !names_ok
            || self.jurisdictions.len() > limit
            || self.regions.len() > limit
            || self.vcpus > drift_protocol::migration::MAX_VCPUS
        {
            return Err(format!(
                "VM {:?}: placement names must be 1 to 64 of [A-Za-z0-9._-], at most {limit} of \
                 each; vcpus at most {}",
                self.name,
                drift_protocol::migration::MAX_VCPUS
            ));
        }
        if let Some(q) = &self.qemu {
            q.validate()
                .map_err(|e| format!("VM {:?}: {e}", self.name))?;
        }
        Ok(crate::hypervisor::VmSpec {
            id: drift_protocol::VmId::random(&mut rand_core::OsRng),
            name: self.name,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus.max(1),
            demand_permille: (self.demand * 1000.0).round() as u32,
            dirty_pages_per_s: (self.dirty_mib_per_s * 256.0).round() as u64,
            page_random_pct: self.page_random_pct,
            placement: drift_protocol::migration::Placement {
                jurisdictions: self.jurisdictions,
                regions: self.regions,
                anti_affinity: self.anti_affinity,
            },
            seed: rand_core::RngCore::next_u64(&mut rand_core::OsRng) >> 1,
            incoming: false,
            qemu: self.qemu,
        })
    }
}

fn one() -> u32 {
    1
}

/// `POST /v1/vms/{vm}/verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyView {
    pub version: u32,
    pub report: crate::hypervisor::guest::VerifyReport,
}

/// `GET /v1/migrations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationsView {
    pub version: u32,
    pub migrations: Vec<crate::migration::service::MigrationView>,
}

/// `POST /v1/migrations`: move a VM of this node to another node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartMigration {
    /// VM name or id.
    pub vm: String,
    /// Target node: roster name or id.
    pub to: String,
    #[serde(default)]
    pub mode: drift_protocol::migration::Mode,
    pub downtime_limit_ms: Option<u64>,
    pub bandwidth_cap_bytes_per_s: Option<u64>,
    /// The hard ceiling on the downtime (default: `[migration] max_downtime`).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// What to do, in order, when the migration does not converge (default:
    /// `[migration] fallback`).
    #[serde(default)]
    pub fallback: Option<drift_protocol::transfer::convergence::Fallback>,
    #[serde(default)]
    pub progress_timeout_ms: Option<u64>,
    #[serde(default)]
    pub completion_timeout_per_gib_ms: Option<u64>,
    /// Pack page data where it pays (sandbox VMs).
    #[serde(default)]
    pub compress: bool,
}

impl StartMigration {
    /// The migration's parameters: this request over the node's defaults.
    pub fn params(
        &self,
        defaults: drift_protocol::transfer::convergence::Limits,
    ) -> crate::migration::engine::SourceParams {
        let mut l = defaults;
        if let Some(ms) = self.downtime_limit_ms {
            l.downtime_limit_ms = ms;
            // A limit above the node's ceiling raises the ceiling with it.
            l.max_downtime_ms = l.max_downtime_ms.max(ms);
        }
        if let Some(ms) = self.max_downtime_ms {
            l.max_downtime_ms = ms;
        }
        if let Some(f) = &self.fallback {
            l.fallback = f.clone();
        }
        if let Some(ms) = self.progress_timeout_ms {
            l.progress_timeout_ms = ms;
        }
        if let Some(ms) = self.completion_timeout_per_gib_ms {
            l.completion_timeout_per_gib_ms = ms;
        }
        crate::migration::engine::SourceParams {
            bandwidth_cap: self.bandwidth_cap_bytes_per_s,
            compress: self.compress,
            ..crate::migration::engine::SourceParams::new(self.mode, l)
        }
    }
}

/// `GET /v1/decisions`: the balancing autopilot's newest decisions, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecisionsView {
    pub version: u32,
    pub node: NodeId,
    /// Whether the autopilot runs (`balance.enabled`).
    pub enabled: bool,
    /// Whether it only logs (`balance.dry_run`).
    pub dry_run: bool,
    /// The upper threshold, permille of capacity (`balance.upper_permille`).
    pub upper_permille: u32,
    pub decisions: Vec<crate::autopilot::DecisionRecord>,
}

/// An error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorView {
    pub error: String,
}
