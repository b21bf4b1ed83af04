//! The autopilot: decentralized balancing inside `drift run`.
//!
//! Every host runs one, and nobody coordinates them. Each `balance.interval` it:
//!
//! 1. samples its own load: the summed CPU demand of its VMs, the very figure its load report
//!    carries ([`crate::monitor::vm_load`]), so it acts on the number its peers see;
//! 2. feeds the sample to its [`LoadTracker`] (history, static or adaptive threshold,
//!    hysteresis);
//! 3. builds its own state (its VMs with demand, memory, dirty rate and when each last moved,
//!    leaving out those already migrating) and its view of the table (fresh reports of roster
//!    hosts, their reserved incoming load, plus what this host itself sent them since their
//!    newest report);
//! 4. calls [`policy::decide`] with its own seeded RNG (power of two choices, so hosts deciding
//!    at once spread over the eligible targets);
//! 5. on a move, plans it ([`crate::move_plan`]): the mode and the convergence settings from
//!    the VM's measured dirty rate and the rate measured to the target; a VM predicted not to
//!    move within its limits is not offered (and is left out of the choice for
//!    `balance.cooldown`), and the host decides again without it;
//! 6. offers the VM to the target ([`Migrations::migrate`]). The target's
//!    admission has the last word. A target that refuses (or cannot be reached) is left out for
//!    `balance.refusal_backoff` plus a random part of as much again, and the host decides again
//!    at once without it, at most `balance.max_offers_per_decision` offers per interval; the
//!    rest waits for the next interval.
//!
//! While a move it started is running the autopilot only samples: the host's load changes
//! when the move commits, and deciding on the old figure would shed twice.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant A as autopilot (source)
//!     participant M as Migrations (source)
//!     participant T as target admission
//!     A->>A: sample, track, decide (seeded)
//!     A->>M: migrate(vm, target, pre-copy)
//!     M->>T: Signed<MigrationOffer> on /drift/migrate/2
//!     T-->>M: Signed<MigrationDecision> (accept | reject + reason)
//!     alt accepted
//!         M-->>A: migration id; the transfer runs on the same stream
//!         A->>A: wait for it before deciding again
//!     else refused
//!         M-->>A: reason
//!         A->>A: back off from that target; decide again without it
//!     end
//! ```
//!
//! Every decision, with its explanation (why this VM, why this target, or why nothing) and
//! what came of it, is logged with `tracing` and kept in a bounded [`DecisionLog`] that
//! `drift decisions` (`GET /v1/decisions`) reads. Consecutive decisions with the same outcome
//! share one entry (its `repeated` count grows), so a host that stays balanced for hours keeps
//! its last interesting decisions in view.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drift_protocol::migration::VmSummary;
use drift_protocol::policy::{
    self, Decision, HostView, HostedVm, LoadTracker, LocalState, Outcome, PolicyConfig,
};
use drift_protocol::{MigrationId, NodeId, Roster, Timestamp, VmId};
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::BalanceSection;
use crate::migration::engine::SourceParams;
use crate::migration::service::{MigrateError, Migrations};
use crate::state::NodeState;
use crate::table::Liveness;

mod consolidate;

/// The seedable RNG every policy decision of a node draws from.
pub type PolicyRng = rand_chacha::ChaCha8Rng;

/// How long the autopilot waits for a move it started before it decides again anyway (the VM
/// itself stays out of its choices while it is migrating).
const IN_FLIGHT_PATIENCE: Duration = Duration::from_secs(300);
/// Offers this host sent recently, remembered to correct stale views of their targets.
const MAX_SENT: usize = 64;

/// What the autopilot did about a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Nothing to do: no move was decided.
    None,
    /// Dry run: the move was only logged.
    DryRun,
    /// The target accepted the offer; the migration runs (`state` is `running`) or ended
    /// (`committed`, `resumed`, `refused`, `aborted`, `lost`, ... as `drift migrations` says).
    Offered {
        migration: MigrationId,
        state: String,
    },
    /// The target refused the offer; it is left out of the choice until `retry_after`.
    Refused {
        /// Stable reason label (`busy`, `no_capacity`, `placement`, `rate_limited`, ...).
        label: String,
        /// The target's reason in words.
        reason: String,
        retry_after: Timestamp,
    },
    /// The target could not be reached, or its answer was not valid; it is left out of the
    /// choice until `retry_after`.
    Unreachable {
        error: String,
        retry_after: Timestamp,
    },
    /// The migration could not start on this node (for example, the VM is already migrating).
    Failed { error: String },
    /// The VM is predicted not to move within its limits (see the plan); it is left out of
    /// the choice until `retry_after`.
    Unmovable { retry_after: Timestamp },
}

impl Action {
    fn label(&self) -> &'static str {
        match self {
            Action::None => "none",
            Action::DryRun => "dry_run",
            Action::Offered { .. } => "offered",
            Action::Refused { .. } => "refused",
            Action::Unreachable { .. } => "unreachable",
            Action::Failed { .. } => "failed",
            Action::Unmovable { .. } => "unmovable",
        }
    }
}

/// One decision of this host, as `drift decisions` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Grows by one per entry.
    pub seq: u64,
    /// When this outcome was first decided (`decision.at` is the newest time).
    pub first_at: Timestamp,
    /// How many consecutive decisions had this outcome (1: just this one).
    pub repeated: u32,
    /// The policy's decision with its figures: the host's load state, and why this VM and
    /// why this target, or why nothing.
    pub decision: Decision,
    /// The decision in words (as logged).
    pub explanation: String,
    /// How the move was (or would have been) made, and why.
    #[serde(default)]
    pub plan: Option<crate::move_plan::MovePlan>,
    /// Hosts left out of the choice because they refused (or could not be reached) recently.
    pub backing_off: Vec<NodeId>,
    /// What came of it.
    pub action: Action,
}

/// What makes two consecutive decisions "the same" for [`DecisionLog`]: load state, outcome,
/// chosen move or VMs tried, hosts backed off from, and action (only decisions that led to no
/// offer are ever merged).
fn same_outcome(
    a: &DecisionRecord,
    decision: &Decision,
    action: &Action,
    backing_off: &[NodeId],
) -> bool {
    let outcome_key = |d: &Decision| -> (u8, Vec<VmId>, Option<NodeId>) {
        match &d.outcome {
            Outcome::Stay => (0, Vec::new(), None),
            Outcome::Move { vm, target, .. } => (1, vec![vm.vm], Some(target.target.node)),
            Outcome::NoVm { .. } => (2, Vec::new(), None),
            Outcome::NoTarget { tried, .. } => (3, tried.iter().map(|m| m.vm).collect(), None),
        }
    };
    matches!(action, Action::None | Action::DryRun)
        && a.action == *action
        && a.decision.assessment.state == decision.assessment.state
        && outcome_key(&a.decision) == outcome_key(decision)
        && a.backing_off == backing_off
}

#[derive(Debug)]
struct LogInner {
    next_seq: u64,
    records: VecDeque<DecisionRecord>,
}

/// The newest decisions of this host, bounded; shared by the autopilot (writer) and the admin
/// API (reader).
#[derive(Debug)]
pub struct DecisionLog {
    enabled: bool,
    dry_run: bool,
    upper_permille: u32,
    capacity: usize,
    inner: Mutex<LogInner>,
}

impl DecisionLog {
    /// An empty log for the autopilot configured by `settings` (also when it is disabled: the
    /// API then says so).
    pub fn new(settings: &BalanceSection) -> Self {
        let capacity = settings
            .decisions_kept
            .clamp(1, crate::config::MAX_DECISIONS_KEPT);
        Self {
            enabled: settings.enabled,
            dry_run: settings.dry_run,
            upper_permille: settings.upper_permille,
            capacity,
            inner: Mutex::new(LogInner {
                next_seq: 1,
                records: VecDeque::with_capacity(capacity),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the autopilot runs.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether it only logs.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The upper threshold it holds hosts to, permille.
    pub fn upper_permille(&self) -> u32 {
        self.upper_permille
    }

    /// Appends a decision, or merges it into the newest entry when the outcome is the same.
    /// Returns the entry's seq and whether it is a new entry.
    pub fn push(
        &self,
        decision: Decision,
        explanation: String,
        action: Action,
        backing_off: Vec<NodeId>,
        plan: Option<crate::move_plan::MovePlan>,
    ) -> (u64, bool) {
        let mut inner = self.lock();
        if let Some(last) = inner.records.back_mut() {
            if same_outcome(last, &decision, &action, &backing_off) {
                last.repeated = last.repeated.saturating_add(1);
                last.decision = decision;
                last.explanation = explanation;
                return (last.seq, false);
            }
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        if inner.records.len() == self.capacity {
            inner.records.pop_front();
        }
        inner.records.push_back(DecisionRecord {
            seq,
            first_at: decision.at,
            repeated: 1,
            decision,
            explanation,
            plan,
            backing_off,
            action,
        });
        (seq, true)
    }

    /// Replaces the action of entry `seq`, if it is still kept.
    pub fn set_action(&self, seq: u64, action: Action) {
        if let Some(r) = self.lock().records.iter_mut().find(|r| r.seq == seq) {
            r.action = action;
        }
    }

    /// Every entry kept, oldest first.
    pub fn snapshot(&self) -> Vec<DecisionRecord> {
        self.lock().records.iter().cloned().collect()
    }
}

/// An offer this host made that its target accepted.
#[derive(Debug, Clone, Copy)]
struct Sent {
    target: NodeId,
    at: Timestamp,
    /// The VM's demand in permille of the target's capacity.
    demand_permille: u32,
}

/// The move the autopilot waits for.
#[derive(Debug, Clone)]
struct InFlight {
    id: MigrationId,
    vm: VmId,
    name: String,
    target: NodeId,
    seq: u64,
    since: Instant,
}

/// The seed of a node's policy RNG: `balance.seed`, or the first 8 bytes of its id.
pub fn seed_for(settings: &BalanceSection, me: &NodeId) -> u64 {
    settings.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&me.as_bytes()[..8]);
        u64::from_le_bytes(b)
    })
}

/// One host's autopilot. Owns its load history, RNG and backoffs; reads the node's state and
/// starts migrations through [`Migrations`].
#[derive(Debug)]
pub struct Autopilot {
    settings: BalanceSection,
    policy: PolicyConfig,
    state: Arc<NodeState>,
    migrations: Arc<Migrations>,
    log: Arc<DecisionLog>,
    tracker: LoadTracker,
    rng: PolicyRng,
    /// Targets left out until the given time.
    backoff: BTreeMap<NodeId, Timestamp>,
    sent: VecDeque<Sent>,
    in_flight: Option<InFlight>,
    /// Dirty rates of this host's VMs and rates to targets, as measured.
    meter: crate::move_plan::Meter,
    /// VMs predicted not to move within their limits, left out until the given time.
    unmovable: BTreeMap<VmId, Timestamp>,
    /// Consolidation's load and demand histories (`balance.consolidate`).
    histories: consolidate::Histories,
}

impl Autopilot {
    /// The autopilot of the node `state`, configured by `settings`, writing to `log`.
    pub fn new(
        settings: &BalanceSection,
        state: Arc<NodeState>,
        migrations: Arc<Migrations>,
        log: Arc<DecisionLog>,
    ) -> Self {
        let policy = settings.policy();
        let seed = seed_for(settings, &state.me);
        Self {
            settings: settings.clone(),
            tracker: LoadTracker::new(&policy),
            policy,
            rng: PolicyRng::seed_from_u64(seed),
            state,
            migrations,
            log,
            backoff: BTreeMap::new(),
            sent: VecDeque::new(),
            in_flight: None,
            meter: Default::default(),
            unmovable: BTreeMap::new(),
            histories: Default::default(),
        }
    }

    /// Decides every interval until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        info!(
            upper_permille = self.policy.upper_permille,
            hysteresis = self.policy.hysteresis,
            detector = %self.policy.detector.kind(),
            interval = %humantime::format_duration(self.settings.interval),
            dry_run = self.settings.dry_run,
            seed = seed_for(&self.settings, &self.state.me),
            "balancing autopilot on"
        );
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.step(&cancel).await;
        }
    }

    /// One sample and, unless a move is running, one decision (with at most
    /// `max_offers_per_decision` offers).
    pub async fn step(&mut self, cancel: &CancellationToken) {
        let now = crate::clock::now();
        self.settle_in_flight(now);
        self.backoff.retain(|_, until| *until > now);
        let max_age = self.policy.max_report_age_ms;
        self.sent.retain(|s| now.millis_since(s.at) <= max_age);
        let (_, load) = crate::monitor::vm_load(&self.state);
        let assessment = self.tracker.observe(load, &self.policy);
        if self.settings.consolidate {
            self.observe_for_consolidation(load);
        }
        if let Some(f) = &self.in_flight {
            debug!(vm = %f.name, target = %f.target.short(), load, "a move is running; not deciding");
            return;
        }
        self.meter.sample(&self.state.vms.list().await);
        self.unmovable.retain(|_, until| *until > now);
        if self.settings.consolidate {
            self.consolidate_step(cancel, now, assessment).await;
            return;
        }
        let roster = self.state.roster().roster.clone();
        let all_vms = self.local_vms();
        let views = self.views(&roster);
        for _ in 0..self.settings.max_offers_per_decision {
            let vms: Vec<HostedVm> = all_vms
                .iter()
                .filter(|v| !self.unmovable.contains_key(&v.summary.id))
                .cloned()
                .collect();
            let me = LocalState {
                id: self.state.me,
                assessment,
                vms: &vms,
            };
            let table: Vec<HostView> = views
                .iter()
                .filter(|v| !self.backoff.contains_key(&v.node))
                .cloned()
                .collect();
            let backing_off: Vec<NodeId> = self
                .backoff
                .keys()
                .filter(|n| views.iter().any(|v| &v.node == *n))
                .copied()
                .collect();
            let decision = policy::decide(&self.policy, &me, &roster, &table, now, &mut self.rng);
            let Outcome::Move { vm, target, .. } = &decision.outcome else {
                self.record(decision, Action::None, backing_off, None);
                return;
            };
            let (vm_id, vm_name, target_id) = (vm.vm, vm.name.clone(), target.target.node);
            let (plan, params) = self.plan(&vms, &vm_id, &target_id);
            if !plan.moves() {
                let retry_after = now.plus_millis(self.policy.cooldown_ms);
                self.unmovable.insert(vm_id, retry_after);
                info!(vm = %vm_name, %plan, "predicted not to move within its limits; deciding again without it");
                self.record(
                    decision,
                    Action::Unmovable { retry_after },
                    backing_off,
                    Some(plan),
                );
                continue;
            }
            if self.settings.dry_run {
                self.record(decision, Action::DryRun, backing_off, Some(plan));
                return;
            }
            let target_demand = target.target.vm_demand_permille;
            let (vm_arg, target_arg) = (vm_id.to_string(), target_id.to_string());
            let started = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.migrations.migrate(&vm_arg, &target_arg, params) => r,
            };
            match started {
                Ok(id) => {
                    let (seq, _) = self.record(
                        decision,
                        Action::Offered {
                            migration: id,
                            state: "running".into(),
                        },
                        backing_off,
                        Some(plan),
                    );
                    if self.sent.len() == MAX_SENT {
                        self.sent.pop_front();
                    }
                    self.sent.push_back(Sent {
                        target: target_id,
                        at: now,
                        demand_permille: target_demand,
                    });
                    self.in_flight = Some(InFlight {
                        id,
                        vm: vm_id,
                        name: vm_name,
                        target: target_id,
                        seq,
                        since: Instant::now(),
                    });
                    return;
                }
                Err(MigrateError::Refused(reason)) => {
                    let retry_after = self.back_off(target_id, now);
                    info!(
                        vm = %vm_name,
                        target = %target_id.short(),
                        reason = %reason,
                        "offer refused; deciding again without that target"
                    );
                    self.record(
                        decision,
                        Action::Refused {
                            label: reason.label().into(),
                            reason: reason.to_string(),
                            retry_after,
                        },
                        backing_off,
                        Some(plan.clone()),
                    );
                }
                Err(e @ (MigrateError::Unreachable(_) | MigrateError::BadDecision(_))) => {
                    let retry_after = self.back_off(target_id, now);
                    warn!(
                        vm = %vm_name,
                        target = %target_id.short(),
                        error = %e,
                        "offer got no valid answer; deciding again without that target"
                    );
                    self.record(
                        decision,
                        Action::Unreachable {
                            error: e.to_string(),
                            retry_after,
                        },
                        backing_off,
                        Some(plan.clone()),
                    );
                }
                Err(e) => {
                    warn!(vm = %vm_name, error = %e, "could not start the move");
                    self.record(
                        decision,
                        Action::Failed {
                            error: e.to_string(),
                        },
                        backing_off,
                        Some(plan),
                    );
                    return;
                }
            }
        }
    }

    /// Leaves `target` out until `now + backoff + jitter` (jitter uniform in `[0, backoff]`,
    /// from the seeded RNG, so refused hosts do not all come back at once).
    fn back_off(&mut self, target: NodeId, now: Timestamp) -> Timestamp {
        let base = u64::try_from(self.settings.refusal_backoff.as_millis()).unwrap_or(u64::MAX);
        let jitter = self.rng.next_u64() % base.saturating_add(1);
        let until = now.plus_millis(base.saturating_add(jitter));
        self.backoff.insert(target, until);
        until
    }

    /// Notices that the move it waits for has ended (or has run too long to wait for).
    fn settle_in_flight(&mut self, now: Timestamp) {
        let Some(f) = &self.in_flight else { return };
        let running = self.migrations.outgoing().contains(&f.vm);
        if running && f.since.elapsed() < IN_FLIGHT_PATIENCE {
            return;
        }
        let f = f.clone();
        self.in_flight = None;
        let state = if running {
            "running".to_string()
        } else {
            self.migrations
                .list()
                .into_iter()
                .find(|m| m.id == f.id)
                .map_or_else(|| "ended".to_string(), |m| m.state)
        };
        if running {
            warn!(vm = %f.name, target = %f.target.short(), "a move runs for long; deciding again meanwhile");
        } else if state == "committed" {
            info!(vm = %f.name, target = %f.target.short(), "move committed");
            let moved = self.migrations.list().into_iter().find(|m| m.id == f.id);
            if let Some(p) = moved.and_then(|m| m.progress) {
                self.meter
                    .learn_link(f.target, p.bytes_sent, p.total_ms.unwrap_or(0.0));
            }
        } else {
            info!(vm = %f.name, target = %f.target.short(), %state, "move did not complete");
            self.back_off(f.target, now);
        }
        self.log.set_action(
            f.seq,
            Action::Offered {
                migration: f.id,
                state,
            },
        );
    }

    /// This host's VMs as the policy sees them, without those migrating already.
    fn local_vms(&self) -> Vec<HostedVm> {
        let outgoing = self.migrations.outgoing();
        let last = self.migrations.last_moves();
        self.state
            .vms
            .specs()
            .into_iter()
            .filter(|s| !s.incoming && !outgoing.contains(&s.id))
            .map(|s| HostedVm {
                last_moved_at: last.get(&s.id).copied(),
                dirty_pages_per_s: s.dirty_pages_per_s,
                summary: VmSummary {
                    id: s.id,
                    name: s.name,
                    memory_mib: s.memory_mib,
                    vcpus: s.vcpus,
                    demand_permille: s.demand_permille,
                    placement: s.placement,
                    qemu: None,
                },
            })
            .collect()
    }

    /// The other hosts as this host knows them: alive roster hosts with a report, with the
    /// demand of the VMs this host sent them since that report added to their reservations.
    fn views(&self, roster: &Roster) -> Vec<HostView> {
        let me = self.state.me;
        let table = self.state.table();
        table
            .rows(roster, &me, Instant::now())
            .iter()
            .filter(|r| !r.me && r.state == Liveness::Alive)
            .filter_map(|r| {
                let report = table.report(&r.id)?;
                let mut view = HostView::from_report(report, r.age_ms?);
                let since_report = self
                    .sent
                    .iter()
                    .filter(|s| s.target == r.id && s.at >= report.issued_at)
                    .fold(0u32, |acc, s| acc.saturating_add(s.demand_permille));
                view.reserved_permille = view.reserved_permille.saturating_add(since_report);
                Some(view)
            })
            .collect()
    }

    /// How to move `vm` to `target`: mode and convergence settings from the measured rates.
    fn plan(
        &self,
        vms: &[HostedVm],
        vm: &VmId,
        target: &NodeId,
    ) -> (crate::move_plan::MovePlan, SourceParams) {
        let (memory_mib, configured) = vms
            .iter()
            .find(|v| &v.summary.id == vm)
            .map_or((0, 0), |v| (v.summary.memory_mib, v.dirty_pages_per_s));
        crate::move_plan::plan(
            memory_mib,
            self.meter.dirty_rate(vm, configured),
            self.meter
                .link_rate(target, self.policy.migration.bandwidth_mib_per_s),
            crate::migration::engine::DEFAULT_SWITCHOVER_COST.as_secs_f64() * 1e3,
            &self.migrations.default_limits(),
            self.settings.allow_postcopy,
        )
    }

    /// Logs a decision and keeps it for the API.
    fn record(
        &mut self,
        decision: Decision,
        action: Action,
        backing_off: Vec<NodeId>,
        plan: Option<crate::move_plan::MovePlan>,
    ) -> (u64, bool) {
        let explanation = match &plan {
            Some(p) => format!("{decision}; {p}"),
            None => decision.to_string(),
        };
        let quiet = matches!(decision.outcome, Outcome::Stay);
        let label = action.label();
        let (seq, new) = self
            .log
            .push(decision, explanation.clone(), action, backing_off, plan);
        if new && !quiet {
            info!(seq, action = label, "{explanation}");
        } else {
            debug!(seq, action = label, "{explanation}");
        }
        (seq, new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drift_protocol::policy::{Assessment, DetectorKind, LoadState, Threshold};
    use drift_protocol::SecretKey;

    fn decision(state: LoadState, outcome: Outcome, at: u64) -> Decision {
        Decision {
            host: SecretKey::from_bytes(&[9; 32]).public(),
            at: Timestamp(at),
            assessment: Assessment {
                state,
                sample_permille: 900,
                threshold: Threshold {
                    detector: DetectorKind::Static,
                    upper_permille: 800,
                    above: true,
                    predicted_permille: None,
                    fallback: false,
                },
                lower_permille: 200,
                above_run: 3,
                clear_run: 0,
                below_lower_run: 0,
                hysteresis: 3,
            },
            outcome,
        }
    }

    #[test]
    fn the_log_merges_repeats_and_stays_bounded() {
        let settings = BalanceSection {
            decisions_kept: 3,
            ..BalanceSection::default()
        };
        let log = DecisionLog::new(&settings);
        let stay = |at| decision(LoadState::Normal, Outcome::Stay, at);
        let (a, new) = log.push(stay(1), "s".into(), Action::None, vec![], None);
        assert!(new);
        let (b, new) = log.push(stay(2), "s".into(), Action::None, vec![], None);
        assert!(!new);
        assert_eq!(a, b);
        let snap = log.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].repeated, 2);
        assert_eq!(snap[0].first_at, Timestamp(1));
        assert_eq!(snap[0].decision.at, Timestamp(2));
        // A different outcome is a new entry; so is every refusal, even a repeated one.
        let novm = |at| {
            decision(
                LoadState::Overloaded,
                Outcome::NoVm {
                    total: 1,
                    on_cooldown: 1,
                    idle: 0,
                },
                at,
            )
        };
        log.push(novm(3), "n".into(), Action::None, vec![], None);
        let refused = || Action::Refused {
            label: "busy".into(),
            reason: "busy".into(),
            retry_after: Timestamp(9),
        };
        log.push(novm(4), "n".into(), refused(), vec![], None);
        let (last, new) = log.push(novm(5), "n".into(), refused(), vec![], None);
        assert!(new);
        let snap = log.snapshot();
        assert_eq!(snap.len(), 3, "bounded by decisions_kept");
        assert_eq!(snap.last().map(|r| r.seq), Some(last));
        assert!(snap.windows(2).all(|w| w[0].seq < w[1].seq));
        log.set_action(last, Action::Failed { error: "x".into() });
        assert!(matches!(
            log.snapshot().last().map(|r| r.action.clone()),
            Some(Action::Failed { .. })
        ));
    }

    #[test]
    fn the_seed_comes_from_the_config_or_the_node_id() {
        let me = SecretKey::from_bytes(&[5; 32]).public();
        let other = SecretKey::from_bytes(&[6; 32]).public();
        let d = BalanceSection::default();
        assert_eq!(seed_for(&d, &me), seed_for(&d, &me));
        assert_ne!(seed_for(&d, &me), seed_for(&d, &other));
        let fixed = BalanceSection {
            seed: Some(42),
            ..BalanceSection::default()
        };
        assert_eq!(seed_for(&fixed, &me), 42);
        let mut a = PolicyRng::seed_from_u64(42);
        let mut b = PolicyRng::seed_from_u64(42);
        assert_eq!(a.next_u64(), b.next_u64());
    }
}
