//! The node's configuration: one TOML file, documented here field by field.
//!
//! Relative paths are resolved against the directory of the config file. Unknown keys are an
//! error, and every semantic error names the key (`load.interval: must be at least 100ms`).
//! `drift testnet --generate-only` writes complete lab examples.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drift_protocol::policy::{Detector, MigrationModel, PolicyConfig};

mod admission;
mod data;
mod migration;
pub use admission::{AdmissionSection, MAX_INCOMING_STREAMS};
pub use data::{DataSection, MAX_DATA_CONNECTIONS_PER_MIGRATION};
use drift_protocol::NodeId;
use libp2p::Multiaddr;
pub use migration::MigrationSection;
use serde::{Deserialize, Serialize};

/// What was wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// The whole configuration of `drift run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    #[serde(default)]
    pub control: ControlSection,
    #[serde(default)]
    pub load: LoadSection,
    #[serde(default)]
    pub gossip: GossipSection,
    #[serde(default)]
    pub balance: BalanceSection,
    /// VMs this node starts the first time it runs on its state directory (`[[vm]]`, the
    /// fields of `POST /v1/vms`, with a `[vm.qemu]` table for a QEMU VM). Created once: a VM
    /// that has since moved to another host is not created again here.
    #[serde(default)]
    pub vm: Vec<crate::control::CreateVm>,
    #[serde(default)]
    pub qemu: QemuSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub admission: AdmissionSection,
    /// Defaults of the migrations this node sends.
    #[serde(default)]
    pub migration: MigrationSection,
}

/// QEMU VMs arriving by migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuSection {
    /// Directories an incoming QEMU VM's kernel, initrd and disk must lie in. An offer names
    /// the files the target's QEMU opens, so a source may point only at images this node
    /// shares out; extra QEMU arguments are never taken from an offer. Empty (the default):
    /// no QEMU VM is accepted by migration.
    #[serde(default)]
    pub image_dirs: Vec<PathBuf>,
}

/// `[node] admin`: one admin id, or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AdminKeys {
    One(NodeId),
    Many(Vec<NodeId>),
}

/// Identity, membership and network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's secret key file (mode 0600), from `drift keygen`.
    pub key: PathBuf,
    /// The signed roster file, from `drift roster sign`.
    pub roster: PathBuf,
    /// The trust anchor: the cluster admin's public id, or a list of admin ids of which
    /// `admin_threshold` must sign the roster this node loads (and every epoch after a roster
    /// that names no admins of its own).
    pub admin: AdminKeys,
    /// With a list of admins: how many of them must sign (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_threshold: Option<u8>,
    /// Where the node keeps state: adopted rosters, audit log, migration records.
    pub state_dir: PathBuf,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/7400` and `/ip4/0.0.0.0/udp/7400/quic-v1`.
    #[serde(default = "default_listen")]
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and whenever the node has no connection, e.g.
    /// `/ip4/10.0.0.2/tcp/7400` or `/dns4/node-2/tcp/7400`. A `/p2p/<peer id>` suffix
    /// makes the dial check the remote's identity.
    #[serde(default)]
    pub bootstrap: Vec<Multiaddr>,
    /// Accept connections from any peer, not only roster members. For experiments only: the
    /// node says so loudly at start and in `drift status`. Reports are still validated.
    #[serde(default)]
    pub insecure_open: bool,
    /// At most this many established connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

impl NodeSection {
    /// The admins this node trusts for the roster it loads.
    pub fn trust(&self) -> drift_protocol::roster::Admins {
        let keys = match &self.admin {
            AdminKeys::One(k) => vec![*k],
            AdminKeys::Many(ks) => ks.clone(),
        };
        drift_protocol::roster::Admins {
            keys,
            threshold: self.admin_threshold.unwrap_or(1),
        }
    }
}

/// The local admin API.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// The Unix socket of the admin API (created mode 0600: who can open it is the access
    /// control). Default: `<state_dir>/drift.sock`.
    pub socket: Option<PathBuf>,
    /// Also serve `GET /metrics` (and nothing else) on this TCP address, e.g.
    /// `"127.0.0.1:9477"`. Off by default; the admin socket always serves it.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Where the host's load comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoadSource {
    /// The real host: `/proc/stat`, `/proc/meminfo`, RAPL or the power model.
    #[default]
    Host,
    /// A synthetic figure (for testnets on one machine): `synthetic_cpu` plus a slow wave, or
    /// a trace.
    Synthetic,
}

/// Load sampling and reporting.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSection {
    /// How often to sample and publish a report.
    #[serde(with = "humantime_serde", default = "default_interval")]
    pub interval: Duration,
    #[serde(default)]
    pub source: LoadSource,
    /// Synthetic CPU utilization, 0.0 to 1.0.
    #[serde(default = "default_synthetic_cpu")]
    pub synthetic_cpu: f64,
    /// Amplitude of the synthetic wave around `synthetic_cpu`, 0.0 to 1.0.
    #[serde(default)]
    pub synthetic_wave: f64,
    /// A CPU trace to replay instead: one utilization in percent per line (the PlanetLab
    /// format), one line per interval, looping.
    pub trace: Option<PathBuf>,
    /// Synthetic memory size in MiB (synthetic source only).
    #[serde(default = "default_synthetic_mem")]
    pub synthetic_mem_mib: u64,
    /// Power model, used when RAPL is not readable: idle + (peak - idle) * utilization.
    #[serde(default = "default_idle_watts")]
    pub idle_watts: f64,
    #[serde(default = "default_peak_watts")]
    pub peak_watts: f64,
}

impl Default for LoadSection {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            source: LoadSource::Host,
            synthetic_cpu: default_synthetic_cpu(),
            synthetic_wave: 0.0,
            trace: None,
            synthetic_mem_mib: default_synthetic_mem(),
            idle_watts: default_idle_watts(),
            peak_watts: default_peak_watts(),
        }
    }
}

/// Gossip and liveness.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GossipSection {
    /// A host whose newest report is older than this is `suspect`.
    #[serde(with = "humantime_serde", default = "default_suspect_after")]
    pub suspect_after: Duration,
    /// A host whose newest report is older than this is `gone` (kept in the table, marked).
    #[serde(with = "humantime_serde", default = "default_gone_after")]
    pub gone_after: Duration,
    /// Reports issued longer ago than this are refused.
    #[serde(with = "humantime_serde", default = "default_max_age")]
    pub max_report_age: Duration,
    /// Reports issued further than this in the future are refused (clock skew bound).
    #[serde(with = "humantime_serde", default = "default_max_skew")]
    pub max_clock_skew: Duration,
    /// How often the node checks whether its audit log grew and, if so, publishes its signed
    /// head for its peers to witness (at least once a minute regardless).
    #[serde(with = "humantime_serde", default = "default_audit_head_interval")]
    pub audit_head_interval: Duration,
}

impl Default for GossipSection {
    fn default() -> Self {
        Self {
            suspect_after: default_suspect_after(),
            gone_after: default_gone_after(),
            max_report_age: default_max_age(),
            max_clock_skew: default_max_skew(),
            audit_head_interval: default_audit_head_interval(),
        }
    }
}

/// How overload is detected (`balance.detector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DetectorName {
    /// Above `upper_permille`.
    #[default]
    Static,
    /// Above 1 − safety × median absolute deviation of the recent history.
    Mad,
    /// Above 1 − safety × interquartile range of the recent history.
    Iqr,
    /// safety × (next sample predicted by local regression) ≥ 1.
    Lr,
    /// Local regression made robust against single spikes.
    Lrr,
}

/// Decentralized balancing: the autopilot of `drift run` (see `crate::autopilot`).
///
/// The thresholds are in permille of the host's CPU capacity, like `vm_demand` in the table
/// (`drift table --json` shows fractions: 800 permille is 0.8).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceSection {
    /// Run the autopilot. Off: this node never moves a VM on its own (it still admits
    /// incoming migrations).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Let the autopilot move a VM that pre-copy cannot move within its limits by hybrid
    /// (post-copy once pre-copy stops converging). Off by default, as KubeVirt's
    /// `allowPostCopy`: a post-copy VM is lost if its source dies mid-migration.
    #[serde(default)]
    pub allow_postcopy: bool,
    /// Decide and explain, but never offer a VM (`drift decisions` shows what it would do).
    #[serde(default)]
    pub dry_run: bool,
    /// How often the node samples its own load and decides.
    #[serde(with = "humantime_serde", default = "default_balance_interval")]
    pub interval: Duration,
    /// A host above this load is overloaded; no move may push a target above it, and this
    /// node's admission refuses offers that would push it above it.
    #[serde(default = "default_upper")]
    pub upper_permille: u32,
    /// A host below this load is underloaded.
    #[serde(default = "default_lower")]
    pub lower_permille: u32,
    /// Consecutive samples above the threshold before the host counts as overloaded (and
    /// not above it before it no longer does).
    #[serde(default = "default_hysteresis")]
    pub hysteresis: u32,
    /// `static` (default), `mad`, `iqr`, `lr` or `lrr`.
    #[serde(default)]
    pub detector: DetectorName,
    /// Safety parameter of an adaptive detector (default: 2.5 for mad, 1.5 for iqr, 1.2 for
    /// lr and lrr, after Beloglazov & Buyya 2012).
    pub safety: Option<f64>,
    /// Samples the local-regression detectors fit their line to.
    #[serde(default = "default_lr_window")]
    pub lr_window: usize,
    /// Load samples kept.
    #[serde(default = "default_history_len")]
    pub history_len: usize,
    /// Adaptive detectors use `upper_permille` until this many samples are held.
    #[serde(default = "default_min_history")]
    pub min_history: usize,
    /// Adaptive thresholds never go below this.
    #[serde(default = "default_adaptive_floor")]
    pub adaptive_floor_permille: u32,
    /// A VM that moved less than this long ago is not moved again (no ping-pong).
    #[serde(with = "humantime_serde", default = "default_cooldown")]
    pub cooldown: Duration,
    /// Peer reports older than this are not trusted for target choice.
    #[serde(with = "humantime_serde", default = "default_balance_report_age")]
    pub max_report_age: Duration,
    /// Bandwidth one migration is assumed to get, for the migration-time estimate.
    #[serde(default = "default_bandwidth")]
    pub bandwidth_mib_per_s: u32,
    /// A target that refused an offer (or could not be reached) is left out for this long,
    /// plus a random part of as much again.
    #[serde(with = "humantime_serde", default = "default_refusal_backoff")]
    pub refusal_backoff: Duration,
    /// Offers made at most per decision (each to a target that has not just refused).
    #[serde(default = "default_attempts")]
    pub max_offers_per_decision: u32,
    /// Decisions kept for `drift decisions` (`GET /v1/decisions`).
    #[serde(default = "default_decisions_kept")]
    pub decisions_kept: usize,
    /// Seeds the random choices (target sampling, backoff jitter). Default: derived from
    /// the node id, so runs are reproducible per node.
    pub seed: Option<u64>,
    /// Consolidate rather than only balance (`policy::consolidate`): VMs placed by their
    /// demand forecasts, an underloaded host (under `lower_permille`) drained into fuller
    /// hosts, then asleep (`standby`) until no active host can take a VM.
    #[serde(default)]
    pub consolidate: bool,
    /// A command run when this host goes standby (with the argument `standby`) and when it
    /// takes VMs again (`active`), e.g. to power the machine down and up; at most 30 s each.
    #[serde(default)]
    pub standby_hook: Option<PathBuf>,
}

impl Default for BalanceSection {
    fn default() -> Self {
        Self {
            enabled: true,
            allow_postcopy: false,
            dry_run: false,
            interval: default_balance_interval(),
            upper_permille: default_upper(),
            lower_permille: default_lower(),
            hysteresis: default_hysteresis(),
            detector: DetectorName::Static,
            safety: None,
            lr_window: default_lr_window(),
            history_len: default_history_len(),
            min_history: default_min_history(),
            adaptive_floor_permille: default_adaptive_floor(),
            cooldown: default_cooldown(),
            max_report_age: default_balance_report_age(),
            bandwidth_mib_per_s: default_bandwidth(),
            refusal_backoff: default_refusal_backoff(),
            max_offers_per_decision: default_attempts(),
            decisions_kept: default_decisions_kept(),
            seed: None,
            consolidate: false,
            standby_hook: None,
        }
    }
}

/// Most decisions `balance.decisions_kept` may ask for.
pub const MAX_DECISIONS_KEPT: usize = 4096;
/// Most offers per decision `balance.max_offers_per_decision` may ask for.
pub const MAX_OFFERS_PER_DECISION: u32 = 16;

impl BalanceSection {
    /// The policy these settings describe.
    pub fn policy(&self) -> PolicyConfig {
        let d = PolicyConfig::default();
        let detector = match self.detector {
            DetectorName::Static => Detector::Static,
            DetectorName::Mad => Detector::Mad {
                safety: self.safety.unwrap_or(2.5),
            },
            DetectorName::Iqr => Detector::Iqr {
                safety: self.safety.unwrap_or(1.5),
            },
            DetectorName::Lr | DetectorName::Lrr => Detector::LocalRegression {
                safety: self.safety.unwrap_or(1.2),
                window: self.lr_window,
                robust: self.detector == DetectorName::Lrr,
            },
        };
        PolicyConfig {
            upper_permille: self.upper_permille,
            lower_permille: self.lower_permille,
            hysteresis: self.hysteresis,
            detector,
            history_len: self.history_len,
            min_history: self.min_history,
            adaptive_floor_permille: self.adaptive_floor_permille,
            cooldown_ms: u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX),
            max_report_age_ms: u64::try_from(self.max_report_age.as_millis()).unwrap_or(u64::MAX),
            migration: MigrationModel {
                bandwidth_mib_per_s: self.bandwidth_mib_per_s,
                ..d.migration
            },
        }
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(3600) {
            return Err(("balance.interval", "must be between 100ms and 1h".into()));
        }
        if self.max_offers_per_decision == 0
            || self.max_offers_per_decision > MAX_OFFERS_PER_DECISION
        {
            return Err((
                "balance.max_offers_per_decision",
                format!("must be between 1 and {MAX_OFFERS_PER_DECISION}"),
            ));
        }
        if self.decisions_kept == 0 || self.decisions_kept > MAX_DECISIONS_KEPT {
            return Err((
                "balance.decisions_kept",
                format!("must be between 1 and {MAX_DECISIONS_KEPT}"),
            ));
        }
        if self.refusal_backoff > Duration::from_secs(3600) {
            return Err(("balance.refusal_backoff", "must be at most 1h".into()));
        }
        self.policy().validate().map_err(|e| {
            let key = match e.field {
                "upper_permille" => "balance.upper_permille",
                "lower_permille" => "balance.lower_permille",
                "hysteresis" => "balance.hysteresis",
                "history_len" => "balance.history_len",
                "min_history" => "balance.min_history",
                "adaptive_floor_permille" => "balance.adaptive_floor_permille",
                "detector.safety" => "balance.safety",
                "detector.window" => "balance.lr_window",
                "migration.bandwidth_mib_per_s" => "balance.bandwidth_mib_per_s",
                _ => "balance",
            };
            (key, e.reason.to_string())
        })
    }
}

fn yes() -> bool {
    true
}
fn default_balance_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_upper() -> u32 {
    PolicyConfig::default().upper_permille
}
fn default_lower() -> u32 {
    PolicyConfig::default().lower_permille
}
fn default_hysteresis() -> u32 {
    PolicyConfig::default().hysteresis
}
fn default_lr_window() -> usize {
    10
}
fn default_history_len() -> usize {
    PolicyConfig::default().history_len
}
fn default_min_history() -> usize {
    PolicyConfig::default().min_history
}
fn default_adaptive_floor() -> u32 {
    PolicyConfig::default().adaptive_floor_permille
}
fn default_cooldown() -> Duration {
    Duration::from_millis(PolicyConfig::default().cooldown_ms)
}
fn default_balance_report_age() -> Duration {
    Duration::from_millis(PolicyConfig::default().max_report_age_ms)
}
fn default_bandwidth() -> u32 {
    PolicyConfig::default().migration.bandwidth_mib_per_s
}
fn default_refusal_backoff() -> Duration {
    Duration::from_secs(10)
}
fn default_attempts() -> u32 {
    3
}
fn default_decisions_kept() -> usize {
    64
}

fn default_listen() -> Vec<Multiaddr> {
    vec!["/ip4/0.0.0.0/tcp/7400".parse().expect("valid multiaddr")]
}
fn default_max_connections() -> u32 {
    256
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_synthetic_cpu() -> f64 {
    0.3
}
fn default_synthetic_mem() -> u64 {
    16 * 1024
}
fn default_idle_watts() -> f64 {
    100.0
}
fn default_peak_watts() -> f64 {
    300.0
}
fn default_suspect_after() -> Duration {
    Duration::from_secs(5)
}
fn default_gone_after() -> Duration {
    Duration::from_secs(15)
}
fn default_max_age() -> Duration {
    Duration::from_secs(30)
}
fn default_max_skew() -> Duration {
    Duration::from_secs(5)
}

fn default_audit_head_interval() -> Duration {
    Duration::from_secs(10)
}

impl Config {
    /// Reads, parses, resolves relative paths and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            cause: source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_owned(),
                key,
                message,
            })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.node.key);
        fix(&mut self.node.roster);
        fix(&mut self.node.state_dir);
        if let Some(s) = &mut self.control.socket {
            fix(s);
        }
        if let Some(t) = &mut self.load.trace {
            fix(t);
        }
        for d in &mut self.qemu.image_dirs {
            fix(d);
        }
        for vm in &mut self.vm {
            if let Some(q) = &mut vm.qemu {
                fix(&mut q.kernel);
                for p in [&mut q.initrd, &mut q.disk].into_iter().flatten() {
                    fix(p);
                }
            }
        }
    }

    /// Semantic checks; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let l = &self.load;
        let g = &self.gossip;
        if let Err(e) = self.node.trust().check() {
            return Err(("node.admin", e.to_string()));
        }
        if g.audit_head_interval < Duration::from_millis(100)
            || g.audit_head_interval > Duration::from_secs(3600)
        {
            return Err((
                "gossip.audit_head_interval",
                "must be between 100ms and 1h".into(),
            ));
        }
        if self.node.listen.is_empty() {
            return Err(("node.listen", "needs at least one address".into()));
        }
        if self.node.max_connections == 0 {
            return Err(("node.max_connections", "must be at least 1".into()));
        }
        if l.interval < Duration::from_millis(100) || l.interval > Duration::from_secs(3600) {
            return Err(("load.interval", "must be between 100ms and 1h".into()));
        }
        if !(0.0..=1.0).contains(&l.synthetic_cpu) {
            return Err(("load.synthetic_cpu", "must be between 0.0 and 1.0".into()));
        }
        if !(0.0..=1.0).contains(&l.synthetic_wave) {
            return Err(("load.synthetic_wave", "must be between 0.0 and 1.0".into()));
        }
        if !(l.idle_watts >= 0.0 && l.peak_watts >= l.idle_watts && l.peak_watts <= 100_000.0) {
            return Err((
                "load.peak_watts",
                "need 0 <= idle_watts <= peak_watts <= 100000".into(),
            ));
        }
        if g.suspect_after <= l.interval {
            return Err((
                "gossip.suspect_after",
                "must be longer than load.interval".into(),
            ));
        }
        if g.gone_after <= g.suspect_after {
            return Err((
                "gossip.gone_after",
                "must be longer than gossip.suspect_after".into(),
            ));
        }
        if g.max_report_age < l.interval {
            return Err((
                "gossip.max_report_age",
                "must be at least load.interval".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for vm in &self.vm {
            if !drift_protocol::roster::valid_name(&vm.name) || !names.insert(vm.name.as_str()) {
                return Err((
                    "vm.name",
                    format!("{:?}: names are 1 to 64 of [A-Za-z0-9._-], unique", vm.name),
                ));
            }
            vm.clone().to_spec().map_err(|e| ("vm", e))?;
        }
        self.data.validate()?;
        self.admission.validate()?;
        self.migration.validate()?;
        self.balance.validate()
    }

    /// The admin API socket.
    pub fn socket_path(&self) -> PathBuf {
        self.control
            .socket
            .clone()
            .unwrap_or_else(|| self.node.state_dir.join("drift.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "14qgCK9xTgrxrqFfz5MJXbKz8MP7ayjG5vpbXqm3gNzo";

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("drift.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(&p)
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let c = load(&format!(
            "[node]\nkey = \"node.key\"\nroster = \"/etc/drift/roster\"\nadmin = \"{ADMIN}\"\nstate_dir = \"state\"\n"
        ))
        .unwrap();
        assert!(c.node.key.is_absolute());
        assert_eq!(c.node.roster, PathBuf::from("/etc/drift/roster"));
        assert_eq!(c.load.interval, Duration::from_secs(1));
        assert!(c.socket_path().ends_with("state/drift.sock"));
    }

    #[test]
    fn errors_name_the_key() {
        let base = format!(
            "[node]\nkey = \"k\"\nroster = \"r\"\nadmin = \"{ADMIN}\"\nstate_dir = \"s\"\n"
        );
        let err = load(&format!("{base}[load]\ninterval = \"10ms\"\n")).unwrap_err();
        assert!(err.to_string().contains("load.interval"), "{err}");
        let err = load(&format!("{base}[load]\nbogus = 1\n")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = load(&format!(
            "{base}[gossip]\nsuspect_after = \"20s\"\ngone_after = \"10s\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("gossip.gone_after"), "{err}");
        let err =
            load("[node]\nkey = \"k\"\nroster = \"r\"\nadmin = \"nope\"\nstate_dir = \"s\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("admin"), "{err}");
    }

    #[test]
    fn configured_vms_load_with_resolved_paths_and_bad_ones_are_named() {
        let base = format!(
            "[node]\nkey = \"k\"\nroster = \"r\"\nadmin = \"{ADMIN}\"\nstate_dir = \"s\"\n"
        );
        let c = load(&format!(
            "{base}[[vm]]\nname = \"web-1\"\nmemory_mib = 64\ndemand = 0.2\n\
             jurisdictions = [\"de\"]\n\
             [[vm]]\nname = \"db-1\"\nmemory_mib = 256\ndemand = 0.1\n\
             [vm.qemu]\nkernel = \"images/vmlinuz\"\ninitrd = \"/images/initrd.img\"\n\
             multifd_channels = 2\n"
        ))
        .unwrap();
        assert_eq!(c.vm.len(), 2);
        assert!(c.vm[0].qemu.is_none());
        let q = c.vm[1].qemu.as_ref().unwrap();
        assert!(q.kernel.is_absolute() && q.kernel.ends_with("images/vmlinuz"));
        assert_eq!(q.multifd_channels, 2);
        let twice = format!(
            "{base}[[vm]]\nname = \"a\"\nmemory_mib = 8\ndemand = 0.1\n\
             [[vm]]\nname = \"a\"\nmemory_mib = 8\ndemand = 0.1\n"
        );
        let err = load(&twice).unwrap_err();
        assert!(err.to_string().contains("vm.name"), "{err}");
        let err = load(&format!(
            "{base}[[vm]]\nname = \"a\"\nmemory_mib = 8\ndemand = 3.0\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("demand"), "{err}");
        let err = load(&format!(
            "{base}[[vm]]\nname = \"a\"\nmemory_mib = 8\ndemand = 0.1\nbogus = 1\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn balance_is_on_by_default_and_maps_onto_the_policy() {
        let base = format!(
            "[node]\nkey = \"k\"\nroster = \"r\"\nadmin = \"{ADMIN}\"\nstate_dir = \"s\"\n"
        );
        let c = load(&base).unwrap();
        assert!(c.balance.enabled && !c.balance.dry_run);
        assert_eq!(c.balance.policy(), PolicyConfig::default());
        let c = load(&format!(
            "{base}[balance]\nenabled = false\ndry_run = true\ninterval = \"500ms\"\n\
             upper_permille = 700\nhysteresis = 2\ndetector = \"lrr\"\ncooldown = \"10m\"\n\
             seed = 7\n"
        ))
        .unwrap();
        let p = c.balance.policy();
        assert!(!c.balance.enabled && c.balance.dry_run);
        assert_eq!(c.balance.interval, Duration::from_millis(500));
        assert_eq!(
            (p.upper_permille, p.hysteresis, p.cooldown_ms),
            (700, 2, 600_000)
        );
        assert_eq!(p.detector, Detector::local_regression(true));
        assert_eq!(c.balance.seed, Some(7));
    }

    #[test]
    fn balance_errors_name_the_key() {
        let base = format!(
            "[node]\nkey = \"k\"\nroster = \"r\"\nadmin = \"{ADMIN}\"\nstate_dir = \"s\"\n"
        );
        for (settings, key) in [
            ("upper_permille = 0", "balance.upper_permille"),
            ("lower_permille = 900", "balance.lower_permille"),
            ("hysteresis = 0", "balance.hysteresis"),
            ("detector = \"mad\"\nsafety = -1.0", "balance.safety"),
            ("detector = \"lr\"\nlr_window = 2", "balance.lr_window"),
            ("interval = \"1ms\"", "balance.interval"),
            ("decisions_kept = 0", "balance.decisions_kept"),
            (
                "max_offers_per_decision = 100",
                "balance.max_offers_per_decision",
            ),
            ("detector = \"magic\"", "detector"),
            ("bogus = 1", "bogus"),
        ] {
            let err = load(&format!("{base}[balance]\n{settings}\n")).unwrap_err();
            assert!(err.to_string().contains(key), "{settings}: {err}");
        }
    }
}
