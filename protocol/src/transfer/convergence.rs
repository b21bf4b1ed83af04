//! Convergence control of a pre-copy migration: when the source switches over, and what it does
//! when the guest dirties memory faster than the link carries it.
//!
//! The source asks [`Convergence::after_round`] once the target applied a round and the dirty
//! log was read. The answer is one [`Decision`]:
//!
//! - **switch over** once the pages still dirty, at the rate the link has lately carried, plus
//!   what a switchover itself costs, fit the downtime limit (the target);
//! - otherwise **another round**, while the migration makes progress;
//! - once it does not, the user's [`Fallback`] actions in the user's order:
//!   - `throttle`: slow the guest (auto-converge, as QEMU's `cpu-throttle-*`): a first step of
//!     [`Limits::throttle_initial_pct`], then [`Limits::throttle_step_pct`] more each time the
//!     rounds stall again, up to [`Limits::throttle_max_pct`];
//!   - `postcopy`: switch to post-copy (the target resumes the VM and pulls what it lacks);
//!   - `abort`: give up; the VM keeps running at home, and the [`Why`] names the dirty rate and
//!     the send rate.
//!
//!   `abort` always ends the list: a migration that exhausted its actions is aborted, never
//!   switched over beyond its ceiling.
//!
//! **The hard ceiling.** [`Limits::max_downtime_ms`] is never crossed by a decision: the
//! migration switches over above the downtime limit only when a trigger fired and the expected
//! downtime is still within the ceiling.
//!
//! **Triggers** (as KubeVirt's migration policy defines its timers):
//! - *stalled*: [`Limits::stall_rounds`] rounds in a row without a new low of the dirty set
//!   (by [`PROGRESS_MARGIN`]);
//! - *progress timeout*: no new low for [`Limits::progress_timeout_ms`];
//! - *completion timeout*: the migration has run [`Limits::completion_timeout_per_gib_ms`] per
//!   GiB of memory (at least one GiB's worth);
//! - *too many rounds*: [`Limits::max_rounds`] rounds.
//!
//! The last two mean the time is up: they skip any throttle steps left and go to the next
//! action that ends the migration (`postcopy` or `abort`).
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Rounds
//!     Rounds --> SwitchOver: expected ≤ limit
//!     Rounds --> Rounds: progress
//!     Rounds --> SwitchOver: trigger, expected ≤ max downtime
//!     Rounds --> Throttled: trigger, next action throttle
//!     Throttled --> Rounds: throttle applied, counters reset
//!     Rounds --> PostCopy: trigger, next action postcopy
//!     Rounds --> Abort: trigger, next action abort (or none left)
//! ```
//!
//! Pure: time is milliseconds passed in by the caller; rates are bytes per second.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A new low of the dirty set must be this fraction below the previous low to count as
/// progress (5 %): a dirty set that hovers around the same size is not converging.
pub const PROGRESS_MARGIN: f64 = 0.05;

/// At most this many actions in a [`Fallback`].
pub const MAX_ACTIONS: usize = 3;

/// What the source does when a migration does not converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Slow the guest down in steps until it fits.
    Throttle,
    /// Switch to post-copy.
    PostCopy,
    /// Give up; the VM keeps running at home.
    Abort,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Throttle => "throttle",
            Action::PostCopy => "postcopy",
            Action::Abort => "abort",
        })
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "throttle" => Ok(Action::Throttle),
            "postcopy" => Ok(Action::PostCopy),
            "abort" => Ok(Action::Abort),
            other => Err(format!(
                "unknown action {other:?} (expected throttle, postcopy or abort)"
            )),
        }
    }
}

/// The actions to take, in order, when a migration does not converge: each at most once,
/// at most [`MAX_ACTIONS`]. Anything after `abort` would never run and is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<Action>", into = "Vec<Action>")]
pub struct Fallback(Vec<Action>);

impl Default for Fallback {
    /// Throttle, then abort: the VM never leaves with more downtime than allowed, and never
    /// in post-copy (whose source must then outlive the migration) unless asked.
    fn default() -> Self {
        Fallback(vec![Action::Throttle, Action::Abort])
    }
}

impl TryFrom<Vec<Action>> for Fallback {
    type Error = String;
    fn try_from(actions: Vec<Action>) -> Result<Self, Self::Error> {
        if actions.len() > MAX_ACTIONS {
            return Err(format!("at most {MAX_ACTIONS} actions"));
        }
        for (i, a) in actions.iter().enumerate() {
            if actions[..i].contains(a) {
                return Err(format!("{a} is named twice"));
            }
        }
        if let Some(i) = actions.iter().position(|a| *a == Action::Abort) {
            if i + 1 < actions.len() {
                return Err(format!(
                    "{} after abort would never run",
                    actions[i + 1..]
                        .iter()
                        .map(Action::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Ok(Fallback(actions))
    }
}

impl From<Fallback> for Vec<Action> {
    fn from(f: Fallback) -> Self {
        f.0
    }
}

impl std::str::FromStr for Fallback {
    type Err = String;
    /// A comma-separated list: `throttle,postcopy,abort`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let actions = s
            .split(',')
            .filter(|a| !a.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Action>, _>>()?;
        Fallback::try_from(actions)
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.0.iter().map(Action::to_string).collect();
        f.write_str(&names.join(","))
    }
}

impl Fallback {
    /// The actions in order.
    pub fn actions(&self) -> &[Action] {
        &self.0
    }

    /// Whether the migration may end in post-copy.
    pub fn allows_postcopy(&self) -> bool {
        self.0.contains(&Action::PostCopy)
    }

    /// Whether the guest may be throttled.
    pub fn allows_throttle(&self) -> bool {
        self.0.contains(&Action::Throttle)
    }
}

/// One migration's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The target: switch over once the expected downtime fits.
    pub downtime_limit_ms: u64,
    /// The hard ceiling: never switch over while the expected downtime is above it.
    pub max_downtime_ms: u64,
    /// No new low of the dirty set for this long: not converging.
    pub progress_timeout_ms: u64,
    /// The migration may run this long per GiB of memory (at least one GiB's worth).
    pub completion_timeout_per_gib_ms: u64,
    /// This many rounds in a row without a new low: not converging.
    pub stall_rounds: u32,
    /// Rounds after the first at most.
    pub max_rounds: u32,
    /// What to do when the migration does not converge.
    pub fallback: Fallback,
    /// The first throttle step, percent of the guest's speed taken away.
    pub throttle_initial_pct: u8,
    /// Each further step.
    pub throttle_step_pct: u8,
    /// The most taken away.
    pub throttle_max_pct: u8,
}

impl Default for Limits {
    /// QEMU's and KubeVirt's defaults where they have one: a 150 s progress timeout, 150 s
    /// per GiB to complete, throttle steps of 20 % then 10 % up to 99 %.
    fn default() -> Self {
        Self {
            downtime_limit_ms: 50,
            max_downtime_ms: 500,
            progress_timeout_ms: 150_000,
            completion_timeout_per_gib_ms: 150_000,
            stall_rounds: 3,
            max_rounds: 100,
            fallback: Fallback::default(),
            throttle_initial_pct: 20,
            throttle_step_pct: 10,
            throttle_max_pct: 99,
        }
    }
}

/// Why limits are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct LimitsError {
    pub field: &'static str,
    pub problem: String,
}

impl Limits {
    /// Checks the limits make sense together.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let bad = |field, problem: &str| {
            Err(LimitsError {
                field,
                problem: problem.into(),
            })
        };
        if self.max_downtime_ms < self.downtime_limit_ms {
            return bad("max_downtime", "must be at least the downtime limit");
        }
        if self.stall_rounds == 0 {
            return bad("stall_rounds", "must be at least 1");
        }
        if self.max_rounds == 0 || self.max_rounds > super::receiver::MAX_ROUNDS - 2 {
            return bad("max_rounds", "must be within 1..=1022");
        }
        if self.throttle_initial_pct == 0 || self.throttle_max_pct > 99 {
            return bad("throttle", "steps must be within 1..=99 percent");
        }
        if self.throttle_initial_pct > self.throttle_max_pct || self.throttle_step_pct == 0 {
            return bad(
                "throttle",
                "the first step must be at most the maximum, and steps above 0",
            );
        }
        Ok(())
    }

    /// When a migration of `memory_bytes` runs out of time (at least one GiB's worth).
    pub fn completion_deadline_ms(&self, memory_bytes: u64) -> u64 {
        let gib = (memory_bytes as f64 / (1u64 << 30) as f64).max(1.0);
        (self.completion_timeout_per_gib_ms as f64 * gib).min(u64::MAX as f64) as u64
    }
}

/// What the source saw after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundReport {
    /// Milliseconds since the migration started.
    pub now_ms: u64,
    /// Rounds done after the first (the round about to be sent is `round`).
    pub round: u32,
    /// Bytes still dirty.
    pub dirty_bytes: u64,
    /// What the link has lately carried, bytes per second.
    pub send_rate: f64,
    /// How fast the guest dirtied memory during the last round, bytes per second.
    pub dirty_rate: f64,
    /// What a switchover costs besides the last pages, milliseconds.
    pub switchover_cost_ms: f64,
}

impl RoundReport {
    /// The downtime a switchover now would take, milliseconds.
    pub fn expected_downtime_ms(&self) -> f64 {
        self.dirty_bytes as f64 / self.send_rate.max(1.0) * 1e3 + self.switchover_cost_ms
    }
}

/// What fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Rounds in a row without a new low of the dirty set.
    Stalled { rounds: u32 },
    /// No new low for this long.
    ProgressTimeout { ms: u64 },
    /// The migration ran this long.
    CompletionTimeout { ms: u64 },
    /// This many rounds.
    MaxRounds { rounds: u32 },
}

impl Trigger {
    /// Whether the time is up (no throttle step can help any more).
    pub fn time_is_up(&self) -> bool {
        matches!(
            self,
            Trigger::CompletionTimeout { .. } | Trigger::MaxRounds { .. }
        )
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Stalled { rounds } => {
                write!(f, "the dirty set has not shrunk in {rounds} rounds")
            }
            Trigger::ProgressTimeout { ms } => {
                write!(f, "no progress for {:.0} s", *ms as f64 / 1e3)
            }
            Trigger::CompletionTimeout { ms } => {
                write!(f, "not done after {:.0} s", *ms as f64 / 1e3)
            }
            Trigger::MaxRounds { rounds } => write!(f, "{rounds} rounds"),
        }
    }
}

/// Why the migration does not converge, with the figures an operator needs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Why {
    pub trigger: Trigger,
    /// Bytes per second the guest dirties.
    pub dirty_rate: f64,
    /// Bytes per second the link carries.
    pub send_rate: f64,
    /// The downtime a switchover would have taken, milliseconds.
    pub expected_downtime_ms: f64,
    /// The ceiling it was above.
    pub max_downtime_ms: u64,
    /// The throttle applied when it fired, percent.
    pub throttle_pct: u8,
}

fn mib_per_s(bytes_per_s: f64) -> f64 {
    bytes_per_s / (1024.0 * 1024.0)
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not converging ({}): dirtying {:.0} MiB/s, sending {:.0} MiB/s; expected downtime {:.0} ms ({} than the {} ms maximum)",
            self.trigger,
            mib_per_s(self.dirty_rate),
            mib_per_s(self.send_rate),
            self.expected_downtime_ms,
            if self.expected_downtime_ms > self.max_downtime_ms as f64 {
                "more"
            } else {
                "no more"
            },
            self.max_downtime_ms
        )?;
        if self.throttle_pct > 0 {
            write!(f, " with the guest throttled {} %", self.throttle_pct)?;
        }
        Ok(())
    }
}

/// What the source does next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Send the dirty pages as another round.
    Round,
    /// Stop the VM and move the rest. `over_target`: the expected downtime is above the
    /// downtime limit (a trigger fired) but within the ceiling.
    SwitchOver {
        expected_downtime_ms: f64,
        over_target: bool,
    },
    /// Throttle the guest to this percentage taken away, then another round.
    Throttle { pct: u8, why: Why },
    /// Switch to post-copy now.
    PostCopy { why: Why },
    /// Give up: the VM keeps running at home.
    Abort { why: Why },
}

/// The convergence state of one migration (source side).
#[derive(Debug, Clone)]
pub struct Convergence {
    limits: Limits,
    memory_bytes: u64,
    /// The lowest dirty set so far, and when it was seen.
    low: Option<(u64, u64)>,
    rounds_since_low: u32,
    throttle_pct: u8,
    /// Actions of the fallback already used up (throttle stays current until exhausted).
    next_action: usize,
    /// The last trigger that fired, for reports.
    last: Option<Why>,
}

impl Convergence {
    /// Convergence control for a VM of `memory_bytes` under `limits` (validated).
    pub fn new(limits: Limits, memory_bytes: u64) -> Self {
        Self {
            limits,
            memory_bytes,
            low: None,
            rounds_since_low: 0,
            throttle_pct: 0,
            next_action: 0,
            last: None,
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The throttle now applied, percent taken away.
    pub fn throttle_pct(&self) -> u8 {
        self.throttle_pct
    }

    /// The newest reason the migration was found not converging, if any.
    pub fn last_why(&self) -> Option<Why> {
        self.last
    }

    /// Decides after a round (see the module docs).
    pub fn after_round(&mut self, r: &RoundReport) -> Decision {
        let expected = r.expected_downtime_ms();
        if expected <= self.limits.downtime_limit_ms as f64 {
            return Decision::SwitchOver {
                expected_downtime_ms: expected,
                over_target: false,
            };
        }
        let Some(trigger) = self.trigger(r) else {
            return Decision::Round;
        };
        let why = Why {
            trigger,
            dirty_rate: r.dirty_rate,
            send_rate: r.send_rate,
            expected_downtime_ms: expected,
            max_downtime_ms: self.limits.max_downtime_ms,
            throttle_pct: self.throttle_pct,
        };
        self.last = Some(why);
        if expected <= self.limits.max_downtime_ms as f64 {
            return Decision::SwitchOver {
                expected_downtime_ms: expected,
                over_target: true,
            };
        }
        loop {
            match self.limits.fallback.actions().get(self.next_action) {
                Some(Action::Throttle) if !trigger.time_is_up() => {
                    if let Some(pct) = self.next_throttle() {
                        self.throttle_pct = pct;
                        // A fresh start for the throttled guest.
                        self.low = Some((r.dirty_bytes, r.now_ms));
                        self.rounds_since_low = 0;
                        return Decision::Throttle { pct, why };
                    }
                    self.next_action += 1;
                }
                Some(Action::Throttle) => self.next_action += 1,
                Some(Action::PostCopy) => return Decision::PostCopy { why },
                Some(Action::Abort) | None => return Decision::Abort { why },
            }
        }
    }

    /// The next throttle step, or `None` once at the maximum.
    fn next_throttle(&self) -> Option<u8> {
        let l = &self.limits;
        if self.throttle_pct >= l.throttle_max_pct {
            return None;
        }
        Some(if self.throttle_pct == 0 {
            l.throttle_initial_pct
        } else {
            self.throttle_pct
                .saturating_add(l.throttle_step_pct)
                .min(l.throttle_max_pct)
        })
    }

    /// Updates the progress counters and says what fired, if anything.
    fn trigger(&mut self, r: &RoundReport) -> Option<Trigger> {
        match self.low {
            Some((low, _)) if (r.dirty_bytes as f64) < low as f64 * (1.0 - PROGRESS_MARGIN) => {
                self.low = Some((r.dirty_bytes, r.now_ms));
                self.rounds_since_low = 0;
            }
            Some(_) => self.rounds_since_low += 1,
            None => self.low = Some((r.dirty_bytes, r.now_ms)),
        }
        let deadline = self.limits.completion_deadline_ms(self.memory_bytes);
        if r.now_ms >= deadline {
            return Some(Trigger::CompletionTimeout { ms: r.now_ms });
        }
        if r.round >= self.limits.max_rounds {
            return Some(Trigger::MaxRounds { rounds: r.round });
        }
        let since_low = r.now_ms.saturating_sub(self.low.map_or(0, |(_, at)| at));
        if since_low >= self.limits.progress_timeout_ms {
            return Some(Trigger::ProgressTimeout { ms: since_low });
        }
        if self.rounds_since_low >= self.limits.stall_rounds {
            return Some(Trigger::Stalled {
                rounds: self.rounds_since_low,
            });
        }
        None
    }
}

/// How a migration is expected to end, from [`predict`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "ends")]
pub enum Prediction {
    /// Pre-copy switches over within the limit (above it but within the ceiling when
    /// `over_target`), with the guest throttled `throttle_pct` percent (0: not at all).
    SwitchOver {
        rounds: u32,
        total_ms: u64,
        downtime_ms: u64,
        throttle_pct: u8,
        over_target: bool,
    },
    /// The fallback switches to post-copy after `rounds` rounds.
    PostCopy { rounds: u32, total_ms: u64 },
    /// The fallback aborts: the VM would stay home.
    Abort { rounds: u32, total_ms: u64 },
}

impl Prediction {
    /// Whether the VM is expected to move.
    pub fn moves(&self) -> bool {
        !matches!(self, Prediction::Abort { .. })
    }
}

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prediction::SwitchOver {
                rounds,
                total_ms,
                downtime_ms,
                throttle_pct,
                over_target,
            } => {
                write!(
                    f,
                    "pre-copy in {rounds} rounds, {:.1} s, downtime ~{downtime_ms} ms",
                    *total_ms as f64 / 1e3
                )?;
                if *throttle_pct > 0 {
                    write!(f, " with the guest throttled {throttle_pct} %")?;
                }
                if *over_target {
                    write!(f, " (above the downtime limit, within the maximum)")?;
                }
                Ok(())
            }
            Prediction::PostCopy { rounds, total_ms } => write!(
                f,
                "post-copy after {rounds} rounds ({:.1} s)",
                *total_ms as f64 / 1e3
            ),
            Prediction::Abort { rounds, total_ms } => write!(
                f,
                "cannot converge: aborted after {rounds} rounds ({:.1} s)",
                *total_ms as f64 / 1e3
            ),
        }
    }
}

/// Predicts how a pre-copy migration of `memory_bytes` ends under `limits`, for a guest that
/// dirties `dirty_rate` and a link that carries `send_rate` (bytes per second), by running the
/// very decisions of [`Convergence`] on a model of the rounds: round 0 sends the memory, each
/// later round what the guest dirtied during the one before (at most the memory; a throttle
/// slows the guest by its percentage), plus `switchover_cost_ms` at the switchover.
pub fn predict(
    memory_bytes: u64,
    dirty_rate: f64,
    send_rate: f64,
    switchover_cost_ms: f64,
    limits: &Limits,
) -> Prediction {
    let send = send_rate.max(1.0);
    let mut c = Convergence::new(limits.clone(), memory_bytes);
    let mut now_s = memory_bytes as f64 / send;
    let mut last_round_s = now_s;
    let mut throttle = 0u8;
    // Every decision either ends the migration or takes a round; the machine ends it by
    // `max_rounds`, and this bound keeps a bad input from looping.
    for round in 1..=limits.max_rounds.saturating_add(2) {
        let guest = dirty_rate.max(0.0) * f64::from(100 - throttle.min(99)) / 100.0;
        let dirty = (guest * last_round_s).min(memory_bytes as f64);
        let report = RoundReport {
            now_ms: (now_s * 1e3).min(u64::MAX as f64) as u64,
            round,
            dirty_bytes: dirty as u64,
            send_rate: send,
            dirty_rate: guest,
            switchover_cost_ms,
        };
        let total_ms = |extra_s: f64| ((now_s + extra_s) * 1e3).min(u64::MAX as f64) as u64;
        match c.after_round(&report) {
            Decision::SwitchOver {
                expected_downtime_ms,
                over_target,
            } => {
                return Prediction::SwitchOver {
                    rounds: round,
                    total_ms: total_ms(expected_downtime_ms / 1e3),
                    downtime_ms: expected_downtime_ms.ceil() as u64,
                    throttle_pct: throttle,
                    over_target,
                }
            }
            Decision::PostCopy { .. } => {
                return Prediction::PostCopy {
                    rounds: round,
                    total_ms: total_ms(dirty / send),
                }
            }
            Decision::Abort { .. } => {
                return Prediction::Abort {
                    rounds: round,
                    total_ms: total_ms(0.0),
                }
            }
            Decision::Throttle { pct, .. } => throttle = pct,
            Decision::Round => {}
        }
        last_round_s = dirty / send;
        now_s += last_round_s;
    }
    Prediction::Abort {
        rounds: limits.max_rounds,
        total_ms: (now_s * 1e3).min(u64::MAX as f64) as u64,
    }
}
