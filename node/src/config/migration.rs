//! `[migration]`: the defaults of every migration this node sends (a request may override
//! each): the downtime limit and its hard ceiling, the progress and completion timeouts, and
//! what to do when a migration does not converge (see
//! `drift_protocol::transfer::convergence`).

use std::time::Duration;

use drift_protocol::transfer::convergence::{Fallback, Limits};
use serde::{Deserialize, Serialize};

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Migration defaults. Every field has a default; see `README.md`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationSection {
    /// Switch over once the expected downtime fits this.
    #[serde(with = "humantime_serde")]
    pub downtime_limit: Duration,
    /// Never switch over while the expected downtime is above this.
    #[serde(with = "humantime_serde")]
    pub max_downtime: Duration,
    /// No new low of the dirty set for this long: the migration is not converging.
    #[serde(with = "humantime_serde")]
    pub progress_timeout: Duration,
    /// A migration may run this long per GiB of memory.
    #[serde(with = "humantime_serde")]
    pub completion_timeout_per_gib: Duration,
    /// Rounds in a row without a new low that count as not converging.
    pub stall_rounds: u32,
    /// Pre-copy rounds after the first at most.
    pub max_rounds: u32,
    /// What to do, in order, when a migration does not converge: `throttle`, `postcopy`,
    /// `abort` (always last, named or not).
    pub fallback: Fallback,
    /// Throttle steps: the first, each further one, and the most (percent of the guest's
    /// speed taken away).
    pub throttle_initial_pct: u8,
    pub throttle_step_pct: u8,
    pub throttle_max_pct: u8,
}

impl Default for MigrationSection {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            downtime_limit: Duration::from_millis(l.downtime_limit_ms),
            max_downtime: Duration::from_millis(l.max_downtime_ms),
            progress_timeout: Duration::from_millis(l.progress_timeout_ms),
            completion_timeout_per_gib: Duration::from_millis(l.completion_timeout_per_gib_ms),
            stall_rounds: l.stall_rounds,
            max_rounds: l.max_rounds,
            fallback: l.fallback,
            throttle_initial_pct: l.throttle_initial_pct,
            throttle_step_pct: l.throttle_step_pct,
            throttle_max_pct: l.throttle_max_pct,
        }
    }
}

impl MigrationSection {
    /// The limits every migration starts from.
    pub fn limits(&self) -> Limits {
        Limits {
            downtime_limit_ms: ms(self.downtime_limit),
            max_downtime_ms: ms(self.max_downtime),
            progress_timeout_ms: ms(self.progress_timeout),
            completion_timeout_per_gib_ms: ms(self.completion_timeout_per_gib),
            stall_rounds: self.stall_rounds,
            max_rounds: self.max_rounds,
            fallback: self.fallback.clone(),
            throttle_initial_pct: self.throttle_initial_pct,
            throttle_step_pct: self.throttle_step_pct,
            throttle_max_pct: self.throttle_max_pct,
        }
    }

    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
        self.limits().validate().map_err(|e| {
            let key = match e.field {
                "max_downtime" => "migration.max_downtime",
                "stall_rounds" => "migration.stall_rounds",
                "max_rounds" => "migration.max_rounds",
                _ => "migration.throttle_*",
            };
            (key, e.problem)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_protocols_and_a_bad_section_names_its_key() {
        let m = MigrationSection::default();
        assert_eq!(m.limits(), Limits::default());
        assert!(m.validate().is_ok());
        let m: MigrationSection = toml::from_str(
            "downtime_limit = \"100ms\"\nmax_downtime = \"50ms\"\nfallback = [\"postcopy\"]",
        )
        .unwrap();
        assert_eq!(m.fallback.to_string(), "postcopy");
        assert_eq!(m.validate().unwrap_err().0, "migration.max_downtime");
        let bad = toml::from_str::<MigrationSection>("fallback = [\"abort\", \"throttle\"]");
        assert!(bad.unwrap_err().to_string().contains("after abort"));
    }
}
