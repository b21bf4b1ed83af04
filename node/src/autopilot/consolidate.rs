//! Consolidation in the autopilot (`balance.consolidate`): every interval the host runs
//! [`consolidate::plan`] on its own fresh state and its table, exactly as the simulator's
//! drift policy does (`drift sim`):
//!
//! - its own state: its load (the summed demand of its VMs, as its reports carry it) and each
//!   VM's demand over the last [`HISTORY`] samples, so VMs are placed by their forecasts;
//!   when each VM last arrived (its cooldown); which are migrating already;
//! - its table: every alive roster host's newest report ([`Row::from_report`]) with the
//!   demand this host sent it since added, without the hosts it is backing off from. Hosts
//!   that report `standby` (or no VM) are targets only when no active host fits.
//!
//! An overloaded host offers the VM whose move ends its overload; an underloaded host (under
//! `lower_permille` for `hysteresis` samples) whose every VM fits on fuller hosts drains: it
//! refuses offers from then on ([`NodeState::draining`]) and offers its VMs one at a time.
//! Empty, it goes **standby**: its reports say so, `drift table` shows it, and the
//! `standby_hook` runs with `standby`; once a VM arrives it is active again (the hook runs with
//! `active`). Each target's admission has the last word, as for balancing.
//!
//! Units: CPU in permille of one CPU (a host of 4 CPUs has a capacity of 4000), so hosts of
//! different sizes compare; memory in MiB.
//!
//! [`NodeState::draining`]: crate::state::NodeState::draining

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use drift_protocol::policy::consolidate::{self, LocalVm, OwnHost, Params, Row};
use drift_protocol::policy::{Assessment, Decision, Outcome};
use drift_protocol::{NodeId, Timestamp, VmId};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Action, Autopilot, InFlight, Sent, MAX_SENT};
use crate::hypervisor::VmSpec;
use crate::migration::service::MigrateError;
use crate::table::Liveness;

/// Samples kept of the host's load and of each VM's demand: the forecasts' window.
const HISTORY: usize = 12;
/// The longest a standby hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Consolidation's own part of the autopilot's state.
#[derive(Debug, Default)]
pub(super) struct Histories {
    /// This host's load, fractions of its capacity, newest first.
    load: VecDeque<f64>,
    /// Each VM's demand (permille of one CPU), newest first.
    demand: std::collections::BTreeMap<VmId, VecDeque<f64>>,
}

fn push(h: &mut VecDeque<f64>, v: f64) {
    h.push_front(v);
    h.truncate(HISTORY);
}

impl Autopilot {
    /// Consolidation's parameters from the node's `[balance]` settings.
    fn params(&self) -> Params {
        let upper = f64::from(self.policy.upper_permille) / 1000.0;
        let lower = f64::from(self.policy.lower_permille) / 1000.0;
        let k = usize::try_from(self.policy.hysteresis.max(1)).unwrap_or(1);
        Params {
            upper,
            overload_k: k,
            overload_n: k + 1,
            saturated: 1.0,
            relieve_to: (upper - 0.1).max(lower),
            target_limit: (upper - 0.05).max(lower),
            lower,
            underload_k: k,
            forecast_window: HISTORY,
            cooldown_s: self.settings.cooldown.as_secs_f64(),
            long_overload: k,
            check_memory: true,
            ..Params::default()
        }
    }

    /// This host's capacity, permille of one CPU (1000 per roster CPU).
    fn capacity_of(&self, node: &NodeId) -> f64 {
        let roster = self.state.roster();
        let cpus = roster
            .roster
            .member(node)
            .map_or(1, |m| m.capacity.cpus.max(1));
        f64::from(cpus) * 1000.0
    }

    /// Takes this interval's samples: the host's load (`load_permille` of its capacity) and
    /// each VM's demand.
    pub(super) fn observe_for_consolidation(&mut self, load_permille: u32) {
        let capacity = self.capacity_of(&self.state.me);
        push(&mut self.histories.load, f64::from(load_permille) / 1000.0);
        let specs = self.state.vms.specs();
        self.histories
            .demand
            .retain(|id, _| specs.iter().any(|s| &s.id == id));
        for s in specs.iter().filter(|s| !s.incoming) {
            let demand = f64::from(s.demand_permille) / 1000.0 * capacity;
            push(self.histories.demand.entry(s.id).or_default(), demand);
        }
    }

    /// Standby when empty (`held` VMs here), active again once a VM arrived; the hook runs on
    /// each change.
    fn settle_standby(&mut self, held: usize) -> bool {
        let standby = self.state.standby.load(Ordering::Relaxed);
        if held == 0 && !standby {
            self.state.draining.store(false, Ordering::Relaxed);
            self.state.standby.store(true, Ordering::Relaxed);
            info!("consolidate: no VM left here; standby");
            self.run_hook("standby");
        } else if held > 0 && standby {
            self.state.standby.store(false, Ordering::Relaxed);
            info!(vms = held, "consolidate: VMs arrived; active again");
            self.run_hook("active");
        }
        held == 0
    }

    fn run_hook(&self, what: &'static str) {
        let Some(hook) = self.settings.standby_hook.clone() else {
            return;
        };
        tokio::spawn(run_hook(hook, what));
    }

    /// This host's VMs (`specs`) as consolidation sees them.
    fn local(&self, specs: &[VmSpec]) -> Vec<LocalVm<VmId>> {
        let outgoing = self.migrations.outgoing();
        let last = self.migrations.last_moves();
        specs
            .iter()
            .filter(|s| !s.incoming)
            .map(|s| LocalVm {
                id: s.id,
                demand: self
                    .histories
                    .demand
                    .get(&s.id)
                    .map(|h| h.iter().copied().collect())
                    .unwrap_or_default(),
                memory_mb: s.memory_mib,
                migrating: outgoing.contains(&s.id) || self.unmovable.contains_key(&s.id),
                moved_at_s: last.get(&s.id).map(|t| t.as_millis() as f64 / 1e3),
            })
            .collect()
    }

    /// The other hosts: alive roster hosts with a report, not backed off from, with what this
    /// host sent them since their report.
    fn rows(&self) -> Vec<Row<NodeId>> {
        let me = self.state.me;
        let roster = self.state.roster().roster.clone();
        let table = self.state.table();
        table
            .rows(&roster, &me, std::time::Instant::now())
            .iter()
            .filter(|r| !r.me && r.state == Liveness::Alive)
            .filter(|r| !self.backoff.contains_key(&r.id))
            .filter_map(|r| {
                let report = table.report(&r.id)?;
                let capacity = self.capacity_of(&r.id);
                let mut row = Row::from_report(report, capacity, capacity);
                let since_report: u32 = self
                    .sent
                    .iter()
                    .filter(|s| s.target == r.id && s.at >= report.issued_at)
                    .fold(0u32, |acc, s| acc.saturating_add(s.demand_permille));
                let extra = f64::from(since_report) / 1000.0 * capacity;
                row.load += extra;
                row.forecast += extra;
                Some(row)
            })
            .collect()
    }

    /// One consolidation decision, and at most one offer.
    pub(super) async fn consolidate_step(
        &mut self,
        cancel: &CancellationToken,
        now: Timestamp,
        assessment: Assessment,
    ) {
        let specs = self.state.vms.specs();
        if self.settle_standby(specs.len()) {
            return;
        }
        let vms = self.local(&specs);
        let load: Vec<f64> = self.histories.load.iter().copied().collect();
        let draining = self.state.draining.load(Ordering::Relaxed);
        let capacity = self.capacity_of(&self.state.me);
        let own = OwnHost {
            id: self.state.me,
            capacity,
            core_capacity: capacity,
            load_history: &load,
            vms: &vms,
            draining,
        };
        let rows = self.rows();
        let now_s = now.as_millis() as f64 / 1e3;
        let action = consolidate::plan(&self.params(), now_s, &own, &rows, &mut self.rng);
        let (offers, drain) = match action {
            consolidate::Action::Stay => {
                if draining {
                    self.state.draining.store(false, Ordering::Relaxed);
                    info!("consolidate: no longer draining (its VMs do not all fit elsewhere now)");
                }
                return;
            }
            consolidate::Action::Relieve(offers) => (offers, false),
            consolidate::Action::Drain(offers) => (offers, true),
        };
        if drain && !draining {
            self.state.draining.store(true, Ordering::Relaxed);
            info!(
                vms = vms.len(),
                "consolidate: underloaded, and every VM fits on a fuller host; draining"
            );
        }
        let Some(offer) = offers.first() else {
            return;
        };
        let name = specs
            .iter()
            .find(|s| s.id == offer.vm)
            .map_or_else(|| offer.vm.to_string(), |s| s.name.clone());
        let why =
            format!(
            "consolidate: {} {name} (forecast {:.0}, memory {} MiB) to {} ({} hosts in the table)",
            if drain { "draining: offering" } else { "overloaded: offering" },
            offer.forecast,
            offer.memory_mb,
            offer.to.short(),
            rows.len()
        );
        let decision = Decision {
            host: self.state.me,
            at: now,
            assessment,
            outcome: Outcome::Stay,
        };
        let hosted = self.local_vms();
        let (plan, params) = self.plan(&hosted, &offer.vm, &offer.to);
        if !plan.moves() {
            let retry_after = now.plus_millis(self.policy.cooldown_ms);
            self.unmovable.insert(offer.vm, retry_after);
            info!(vm = %name, %plan, "consolidate: predicted not to move within its limits; left out for now");
            self.log.push(
                decision,
                format!("{why}; {plan}"),
                Action::Unmovable { retry_after },
                Vec::new(),
                Some(plan),
            );
            return;
        }
        if self.settings.dry_run {
            info!("{why} (dry run)");
            self.log
                .push(decision, why, Action::DryRun, Vec::new(), Some(plan));
            return;
        }
        let demand_permille = (offer.demand / self.capacity_of(&offer.to) * 1000.0).round() as u32;
        let (vm_arg, target_arg) = (offer.vm.to_string(), offer.to.to_string());
        let started = tokio::select! {
            _ = cancel.cancelled() => return,
            r = self.migrations.migrate(&vm_arg, &target_arg, params) => r,
        };
        let action = match started {
            Ok(id) => {
                if self.sent.len() == MAX_SENT {
                    self.sent.pop_front();
                }
                self.sent.push_back(Sent {
                    target: offer.to,
                    at: now,
                    demand_permille,
                });
                info!("{why}: accepted");
                let (seq, _) = self.log.push(
                    decision,
                    why,
                    Action::Offered {
                        migration: id,
                        state: "running".into(),
                    },
                    Vec::new(),
                    Some(plan),
                );
                self.in_flight = Some(InFlight {
                    id,
                    vm: offer.vm,
                    name,
                    target: offer.to,
                    seq,
                    since: std::time::Instant::now(),
                });
                return;
            }
            Err(MigrateError::Refused(reason)) => {
                let retry_after = self.back_off(offer.to, now);
                info!(reason = %reason, "{why}: refused; backing off from that target");
                Action::Refused {
                    label: reason.label().into(),
                    reason: reason.to_string(),
                    retry_after,
                }
            }
            Err(e @ (MigrateError::Unreachable(_) | MigrateError::BadDecision(_))) => {
                let retry_after = self.back_off(offer.to, now);
                warn!(error = %e, "{why}: no valid answer; backing off from that target");
                Action::Unreachable {
                    error: e.to_string(),
                    retry_after,
                }
            }
            Err(e) => {
                warn!(error = %e, "{why}: could not start the move");
                Action::Failed {
                    error: e.to_string(),
                }
            }
        };
        self.log.push(decision, why, action, Vec::new(), Some(plan));
    }
}

/// Runs the standby hook with `what` (`standby` or `active`), for at most [`HOOK_TIMEOUT`].
async fn run_hook(hook: PathBuf, what: &'static str) {
    let child = tokio::process::Command::new(&hook)
        .arg(what)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    match tokio::time::timeout(HOOK_TIMEOUT, child).await {
        Ok(Ok(out)) if out.status.success() => {
            info!(hook = %hook.display(), what, "standby hook ran");
        }
        Ok(Ok(out)) => warn!(
            hook = %hook.display(),
            what,
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "standby hook failed"
        ),
        Ok(Err(e)) => warn!(hook = %hook.display(), what, error = %e, "standby hook did not start"),
        Err(_) => {
            warn!(hook = %hook.display(), what, "standby hook ran over {HOOK_TIMEOUT:?}; killed")
        }
    }
}
