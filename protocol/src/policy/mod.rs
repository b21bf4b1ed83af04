//! Balancing policy: when a host is overloaded, which of its VMs to move, and where.
//!
//! Every host runs this on its own, with no coordinator: pure, deterministic functions over the
//! host's own load history, its VMs, the roster and the peer table. Time comes in as `now`,
//! randomness only from an RNG the caller seeds, so the same inputs and seed always give the
//! same decision, in the node, in tests and in the simulator.
//!
//! ## Layout
//!
//! - [`detect`]: a bounded [`History`] of load samples and the [`LoadTracker`] that turns each
//!   new sample into an [`Assessment`]: overloaded (with hysteresis), normal or underloaded,
//!   against a static upper threshold or an adaptive one (MAD, IQR, local regression).
//! - [`choose`]: VM choice ([`rank_vms`]: minimum estimated migration time among the VMs whose
//!   move ends the overload, none on cooldown), target choice ([`choose_target`]: eligible hosts,
//!   then the better of two sampled at random) and [`decide`], which returns an explained
//!   [`Decision`].
//! - [`cluster`]: a whole cluster as a value (hosts, VMs, optional demand traces) and builders
//!   for skewed starting states, synthetic or from PlanetLab traces.
//! - [`consolidate`]: drift's consolidation decision, both directions: an overloaded host
//!   moves the right VM away, an underloaded one drains to fuller hosts and goes standby;
//!   forecast-based placement, per-VM cooldown, a target's admission with its reservations.
//!   The module docs say how the node's autopilot calls it with its table.
//! - [`baseline`]: a centralized greedy planner that sees the whole table at once, with the
//!   same thresholds, for comparison.
//! - [`sim`]: a discrete-time simulator of a cluster where every host decides independently
//!   each tick and every target re-checks each offer (admission), counting migrations, ticks to
//!   balance and ping-pong moves.
//!
//! ## The decision of one host, each sample
//!
//! ```mermaid
//! flowchart TD
//!     S[new load sample] --> H[history + threshold: static, MAD, IQR or LR]
//!     H --> K{above the threshold for k samples in a row?}
//!     K -- no --> Stay
//!     K -- yes --> V[rank VMs: not on cooldown; ends the overload; least migration time]
//!     V --> T[eligible targets: fresh, host member, placement, memory, stays under the upper threshold with reservations]
//!     T --> P[sample two eligible at random, take the less loaded]
//!     P --> O[offer to target; the target's admission re-checks]
//! ```
//!
//! ## Overload state (hysteresis)
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Normal
//!     Normal --> Overloaded: k consecutive samples above the upper threshold
//!     Overloaded --> Normal: k consecutive samples not above it
//!     Normal --> Underloaded: k consecutive samples below the lower threshold
//!     Underloaded --> Normal: a sample at or above the lower threshold
//! ```
//!
//! ## Units
//!
//! Loads are in permille of a host's CPU capacity, as in [`LoadReport`](crate::LoadReport): a
//! VM's `demand_permille` is relative to the host it runs on, and [`scale_demand`] converts it
//! to another host's capacity when both CPU counts are known from the roster.
//!
//! ## Adaptive thresholds
//!
//! After Beloglazov & Buyya, "Optimal online deterministic algorithms and adaptive heuristics
//! for energy and performance efficient dynamic consolidation of virtual machines in Cloud data
//! centers" (Concurrency and Computation: Practice and Experience, 2012), on utilization as a
//! fraction `u` of capacity over the recent history:
//!
//! - MAD: upper = 1 − s·MAD(u), MAD the median absolute deviation from the median;
//! - IQR: upper = 1 − s·(Q3 − Q1), quartiles by linear interpolation;
//! - LR: a line fitted to the last `window` samples with tricube weights (newest weighs most;
//!   optionally reweighted with bisquare weights against outliers), overloaded when
//!   s·(predicted next sample) ≥ 1.
//!
//! With too little history an adaptive detector falls back to the static threshold; adaptive
//! thresholds are clamped to `[adaptive_floor_permille, 1000]`.

use serde::{Deserialize, Serialize};

pub mod baseline;
pub mod choose;
pub mod cluster;
pub mod consolidate;
pub mod detect;
pub mod sim;

pub use baseline::{plan_centralized, CentralPlan, MoveLimits, PlannedMove};
pub use choose::{
    check_target, choose_target, decide, estimate_migration, rank_vms, Candidate, Decision,
    Exclusion, Exclusions, HostView, HostedVm, LocalState, MigrationEstimate, Miss, NoTarget,
    Outcome, TargetChoice, VmChoice, VmRanking, MAX_VM_TRIES,
};
pub use cluster::{
    parse_trace, skewed_cluster, Cluster, ClusterError, ClusterHost, Demand, SkewSpec,
};
pub use detect::{Assessment, DetectorKind, History, LoadState, LoadTracker, Threshold};
pub use sim::{simulate, Mode as SimMode, SimConfig, SimError, SimReport};

use crate::report::PERMILLE;

/// The longest load history a host keeps (samples).
pub const MAX_HISTORY: usize = 1024;
/// The most pre-copy rounds the migration-time model may assume.
pub const MAX_MODEL_ROUNDS: u32 = 1000;

/// How a host decides that it is overloaded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// Above the static upper threshold (`upper_permille`).
    #[default]
    Static,
    /// Above 1 − `safety`·MAD of the recent history.
    Mad {
        /// The safety parameter `s` (Beloglazov & Buyya use 2.5).
        safety: f64,
    },
    /// Above 1 − `safety`·IQR of the recent history.
    Iqr {
        /// The safety parameter `s` (Beloglazov & Buyya use 1.5).
        safety: f64,
    },
    /// `safety` · (next sample predicted by local regression) ≥ 1.
    LocalRegression {
        /// The safety parameter `s` (Beloglazov & Buyya use 1.2).
        safety: f64,
        /// How many of the newest samples the line is fitted to (at least 3).
        window: usize,
        /// Reweight twice with bisquare weights of the residuals, so single spikes weigh less.
        robust: bool,
    },
}

impl Detector {
    /// MAD with the safety parameter of Beloglazov & Buyya (2.5).
    pub const fn mad() -> Self {
        Detector::Mad { safety: 2.5 }
    }

    /// IQR with the safety parameter of Beloglazov & Buyya (1.5).
    pub const fn iqr() -> Self {
        Detector::Iqr { safety: 1.5 }
    }

    /// Local regression over the last 10 samples with safety 1.2 (Beloglazov & Buyya's LR;
    /// `robust` gives their LRR).
    pub const fn local_regression(robust: bool) -> Self {
        Detector::LocalRegression {
            safety: 1.2,
            window: 10,
            robust,
        }
    }

    /// The kind, without parameters.
    pub fn kind(&self) -> DetectorKind {
        match self {
            Detector::Static => DetectorKind::Static,
            Detector::Mad { .. } => DetectorKind::Mad,
            Detector::Iqr { .. } => DetectorKind::Iqr,
            Detector::LocalRegression { .. } => DetectorKind::LocalRegression,
        }
    }
}

/// The pre-copy convergence model used to estimate how long moving a VM takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationModel {
    /// Bandwidth available to one migration, MiB/s.
    pub bandwidth_mib_per_s: u32,
    /// Pre-copy stops once what is left can be sent within this many milliseconds.
    pub downtime_limit_ms: u32,
    /// Pre-copy stops after this many rounds even if it has not converged.
    pub max_rounds: u32,
}

impl Default for MigrationModel {
    fn default() -> Self {
        Self {
            bandwidth_mib_per_s: 125,
            downtime_limit_ms: 300,
            max_rounds: 30,
        }
    }
}

/// Every knob of the balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// A host above this load (permille of capacity) is overloaded; no move may push a target
    /// above it. Also the target's admission threshold.
    pub upper_permille: u32,
    /// A host below this load is underloaded (a drain candidate).
    pub lower_permille: u32,
    /// `k`: consecutive samples needed to enter (and to leave) the overloaded state, and to
    /// enter the underloaded state.
    pub hysteresis: u32,
    /// How overload is detected.
    pub detector: Detector,
    /// Samples kept in the history (at most [`MAX_HISTORY`]).
    pub history_len: usize,
    /// Adaptive detectors use the static threshold until the history holds this many samples.
    pub min_history: usize,
    /// Adaptive thresholds never go below this (a noisy history would otherwise call every
    /// host overloaded).
    pub adaptive_floor_permille: u32,
    /// A VM moved less than this long ago is not moved again.
    pub cooldown_ms: u64,
    /// Reports older than this are not trusted for target choice.
    pub max_report_age_ms: u64,
    /// The migration-time model.
    pub migration: MigrationModel,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            upper_permille: 800,
            lower_permille: 200,
            hysteresis: 3,
            detector: Detector::Static,
            history_len: 30,
            min_history: 10,
            adaptive_floor_permille: 500,
            cooldown_ms: 120_000,
            max_report_age_ms: 15_000,
            migration: MigrationModel::default(),
        }
    }
}

/// A policy setting that cannot work; names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy setting {field}: {reason}")]
pub struct PolicyError {
    /// The setting.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl PolicyConfig {
    /// Checks that every setting is usable.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field, reason| Err(PolicyError { field, reason });
        if self.upper_permille == 0 || self.upper_permille > PERMILLE {
            return bad("upper_permille", "must be in 1..=1000");
        }
        if self.lower_permille >= self.upper_permille {
            return bad("lower_permille", "must be below upper_permille");
        }
        if self.hysteresis == 0 {
            return bad("hysteresis", "must be at least 1");
        }
        if self.history_len == 0 || self.history_len > MAX_HISTORY {
            return bad("history_len", "must be in 1..=1024");
        }
        if self.min_history > self.history_len {
            return bad("min_history", "must not exceed history_len");
        }
        if self.adaptive_floor_permille > PERMILLE {
            return bad("adaptive_floor_permille", "must be at most 1000");
        }
        let safety_ok = |s: f64| s.is_finite() && s > 0.0 && s <= 100.0;
        match self.detector {
            Detector::Static => {}
            Detector::Mad { safety } | Detector::Iqr { safety } => {
                if !safety_ok(safety) {
                    return bad("detector.safety", "must be a finite number in (0, 100]");
                }
            }
            Detector::LocalRegression { safety, window, .. } => {
                if !safety_ok(safety) {
                    return bad("detector.safety", "must be a finite number in (0, 100]");
                }
                if window < 3 || window > self.history_len {
                    return bad("detector.window", "must be in 3..=history_len");
                }
            }
        }
        if self.migration.bandwidth_mib_per_s == 0 {
            return bad("migration.bandwidth_mib_per_s", "must be positive");
        }
        if self.migration.max_rounds > MAX_MODEL_ROUNDS {
            return bad("migration.max_rounds", "must be at most 1000");
        }
        Ok(())
    }
}

/// Converts a CPU demand in permille of a host with `from_cpus` CPUs into permille of a host
/// with `to_cpus` CPUs, rounding up (never underestimates). Unknown capacity (0 CPUs on either
/// side) leaves the figure as it is.
pub fn scale_demand(demand_permille: u32, from_cpus: u32, to_cpus: u32) -> u32 {
    if from_cpus == 0 || to_cpus == 0 || from_cpus == to_cpus {
        return demand_permille;
    }
    let scaled = (u64::from(demand_permille) * u64::from(from_cpus)).div_ceil(u64::from(to_cpus));
    u32::try_from(scaled).unwrap_or(u32::MAX)
}

/// A fraction of capacity (1.0 = all CPUs) as permille, rounded, clamped to `0..=u32::MAX`
/// (NaN counts as 0).
pub(crate) fn to_permille(fraction: f64) -> u32 {
    let p = (fraction * f64::from(PERMILLE)).round();
    if p.is_nan() || p <= 0.0 {
        0
    } else if p >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        p as u32
    }
}

/// Picks an index in `0..n` (n > 0) from the RNG by a widening multiply; the bias is at most
/// `n / 2^64`.
pub(crate) fn pick_index(rng: &mut impl rand_core::RngCore, n: usize) -> usize {
    let n = n as u128;
    ((u128::from(rng.next_u64()) * n) >> 64) as usize
}
