//! Local load sampling and the node's own load report.
//!
//! - CPU utilization: the change of busy time over total time in `/proc/stat` between samples.
//! - Memory: `MemTotal - MemAvailable` from `/proc/meminfo`.
//! - Power: Intel RAPL (`/sys/class/powercap/intel-rapl:0/energy_uj`, energy over time) when
//!   readable; otherwise the linear model `idle + (peak - idle) * utilization` with the
//!   configured watts (the model of Beloglazov & Buyya and of CloudSim), marked as modelled.
//! - Synthetic source (testnets on one machine): `synthetic_cpu` plus a slow sine wave whose
//!   phase comes from the node id, or a replayed trace of percentages, one per interval.
//!
//! - VMs: their count and summed CPU demand ([`vm_load`]; permille of this host's capacity),
//!   and the demand reserved for accepted incoming migrations whose VM is not here yet
//!   ([`pending_reserved`]), so other hosts see capacity this host has promised. The balancing
//!   autopilot samples the same [`vm_load`], so it acts on the number its peers see.
//!
//! The report's `seq` is `max(previous + 1, now in ms)`, so it keeps growing across restarts
//! without any state on disk.

use std::f64::consts::PI;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drift_protocol::codec::encode_frame;
use drift_protocol::{LoadReport, NodeId, SecretKey, Signed, Timestamp};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{LoadSection, LoadSource};
use crate::mesh::{Client, Topic};
use crate::migration::service::Migrations;
use crate::state::NodeState;

const RAPL_ENERGY: &str = "/sys/class/powercap/intel-rapl:0/energy_uj";
const RAPL_RANGE: &str = "/sys/class/powercap/intel-rapl:0/max_energy_range_uj";
/// Period of the synthetic wave.
const WAVE_PERIOD: Duration = Duration::from_secs(120);
/// Longest trace read (lines).
const MAX_TRACE_LINES: usize = 100_000;

/// One sample of the host's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// 0.0 to 1.0.
    pub cpu: f64,
    pub mem_used_mib: u64,
    pub mem_total_mib: u64,
    pub power_mw: u64,
    pub power_measured: bool,
}

/// `(busy, total)` jiffies of the aggregate `cpu` line of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest is already inside user)
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// `(total, available)` in KiB from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// Parses a trace: one utilization in percent per line; blank lines skipped.
pub fn parse_trace(text: &str) -> Result<Vec<f64>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().take(MAX_TRACE_LINES) {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: f64 = line
            .parse()
            .map_err(|_| format!("line {}: {line:?} is not a number", n + 1))?;
        if !(0.0..=100.0).contains(&v) {
            return Err(format!("line {}: {v} is not a percentage", n + 1));
        }
        out.push(v / 100.0);
    }
    if out.is_empty() {
        return Err("trace is empty".into());
    }
    Ok(out)
}

/// The linear power model, in milliwatts.
pub fn modelled_power_mw(cpu: f64, idle_watts: f64, peak_watts: f64) -> u64 {
    let w = idle_watts + (peak_watts - idle_watts) * cpu.clamp(0.0, 1.0);
    (w * 1000.0).round() as u64
}

/// Samples the host (or the synthetic source).
#[derive(Debug)]
pub struct Monitor {
    config: LoadSection,
    trace: Option<Vec<f64>>,
    phase: f64,
    started: Instant,
    step: usize,
    prev_cpu: Option<(u64, u64)>,
    prev_energy: Option<(u64, Instant)>,
}

impl Monitor {
    /// A monitor for `config`; the node id seeds the synthetic wave's phase.
    pub fn new(config: &LoadSection, me: &NodeId) -> Result<Self, String> {
        let trace = match &config.trace {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("load.trace {}: {e}", path.display()))?;
                Some(
                    parse_trace(&text)
                        .map_err(|e| format!("load.trace {}: {e}", path.display()))?,
                )
            }
            None => None,
        };
        let phase = f64::from(me.as_bytes()[0]) / 256.0 * 2.0 * PI;
        Ok(Self {
            config: config.clone(),
            trace,
            phase,
            started: Instant::now(),
            step: 0,
            prev_cpu: None,
            prev_energy: None,
        })
    }

    /// Takes one sample.
    pub fn sample(&mut self) -> Sample {
        self.step += 1;
        match self.config.source {
            LoadSource::Synthetic => self.synthetic(),
            LoadSource::Host => self.host(),
        }
    }

    fn synthetic(&mut self) -> Sample {
        let cpu = match &self.trace {
            Some(t) => t[(self.step - 1) % t.len()],
            None => {
                let t = self.started.elapsed().as_secs_f64() / WAVE_PERIOD.as_secs_f64();
                self.config.synthetic_cpu
                    + self.config.synthetic_wave * (2.0 * PI * t + self.phase).sin()
            }
        }
        .clamp(0.0, 1.0);
        let total = self.config.synthetic_mem_mib;
        Sample {
            cpu,
            mem_used_mib: (total as f64 * (0.2 + 0.6 * cpu)) as u64,
            mem_total_mib: total,
            power_mw: modelled_power_mw(cpu, self.config.idle_watts, self.config.peak_watts),
            power_measured: false,
        }
    }

    fn host(&mut self) -> Sample {
        let cpu = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_proc_stat(&t))
            .map(|(busy, total)| {
                let u = match self.prev_cpu {
                    Some((pb, pt)) if total > pt => {
                        busy.saturating_sub(pb) as f64 / (total - pt) as f64
                    }
                    _ => 0.0,
                };
                self.prev_cpu = Some((busy, total));
                u.clamp(0.0, 1.0)
            })
            .unwrap_or(0.0);
        let (mem_total_mib, mem_used_mib) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_meminfo(&t))
            .map(|(total, avail)| (total / 1024, total.saturating_sub(avail) / 1024))
            .unwrap_or((0, 0));
        let (power_mw, power_measured) = match self.rapl() {
            Some(mw) => (mw, true),
            None => (
                modelled_power_mw(cpu, self.config.idle_watts, self.config.peak_watts),
                false,
            ),
        };
        Sample {
            cpu,
            mem_used_mib,
            mem_total_mib,
            power_mw,
            power_measured,
        }
    }

    fn rapl(&mut self) -> Option<u64> {
        let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
        let energy = read(RAPL_ENERGY)?;
        let now = Instant::now();
        let prev = self.prev_energy.replace((energy, now));
        let (pe, pt) = prev?;
        let range = read(RAPL_RANGE).unwrap_or(u64::MAX);
        let delta_uj = if energy >= pe {
            energy - pe
        } else {
            range - pe + energy
        };
        let secs = now.duration_since(pt).as_secs_f64();
        (secs > 0.0).then(|| (delta_uj as f64 / secs / 1000.0) as u64)
    }
}

/// The next report: `seq` grows past `prev_seq` and tracks wall-clock milliseconds.
pub fn build_report(
    me: NodeId,
    prev_seq: u64,
    now: Timestamp,
    roster_epoch: u64,
    sample: &Sample,
) -> LoadReport {
    LoadReport {
        node: me,
        seq: (prev_seq + 1).max(now.as_millis()),
        issued_at: now,
        roster_epoch,
        cpu_permille: (sample.cpu.clamp(0.0, 1.0) * 1000.0).round() as u16,
        mem_used_mib: sample.mem_used_mib.min(sample.mem_total_mib),
        mem_total_mib: sample
            .mem_total_mib
            .min(drift_protocol::report::MAX_MEM_MIB),
        power_mw: sample.power_mw.min(drift_protocol::report::MAX_POWER_MW),
        power_measured: sample.power_measured,
        vm_count: 0,
        vm_demand_permille: 0,
        reserved_permille: 0,
        standby: false,
    }
}

/// The VMs this node holds (incoming ones included) and their summed CPU demand, permille of
/// this host's capacity, as the load report carries them.
pub fn vm_load(state: &NodeState) -> (u32, u32) {
    let (count, demand) = state.vms.summary();
    (
        count,
        demand.min(drift_protocol::report::MAX_DEMAND_PERMILLE),
    )
}

/// CPU demand reserved for accepted incoming migrations whose VM is not here yet: `reserved`
/// (every open reservation) less the demand of the incoming VMs already created, which
/// [`vm_load`] counts.
pub fn pending_reserved(state: &NodeState, reserved: u32) -> u32 {
    let incoming = state
        .vms
        .specs()
        .iter()
        .filter(|s| s.incoming)
        .fold(0u32, |acc, s| acc.saturating_add(s.demand_permille));
    reserved
        .saturating_sub(incoming)
        .min(drift_protocol::report::MAX_DEMAND_PERMILLE)
}

/// Samples every interval, signs the report, puts it in the node's own table row and
/// publishes it, until `cancel`.
pub async fn run(
    mut monitor: Monitor,
    key: SecretKey,
    state: Arc<NodeState>,
    mesh: Client,
    migrations: Arc<Migrations>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        crate::migration::buffers::trim_idle(crate::migration::buffers::IDLE);
        let sample = monitor.sample();
        let epoch = state.roster().roster.epoch;
        let mut report = build_report(state.me, seq, crate::clock::now(), epoch, &sample);
        let (vm_count, vm_demand) = vm_load(&state);
        report.vm_count = vm_count;
        report.vm_demand_permille = vm_demand;
        report.reserved_permille = pending_reserved(&state, migrations.reserved_permille());
        report.standby = state.standby.load(std::sync::atomic::Ordering::Relaxed);
        seq = report.seq;
        let frame = encode_frame(&Signed::sign(&report, &key));
        state.table().insert(report, Instant::now());
        match mesh.publish(Topic::Reports, frame).await {
            Ok(Ok(())) => {
                state
                    .counters
                    .reports_published
                    .fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                state
                    .counters
                    .publish_failures
                    .fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "report not published");
            }
            Err(e) => {
                warn!(error = %e, "monitor stopping");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_procfs() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_proc_stat(stat), Some((150, 1000)));
        assert_eq!(parse_proc_stat("intr 1 2"), None);
        let mem = "MemTotal:       16000 kB\nMemFree:  100 kB\nMemAvailable:   4000 kB\n";
        assert_eq!(parse_meminfo(mem), Some((16000, 4000)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn power_model_and_traces() {
        assert_eq!(modelled_power_mw(0.0, 100.0, 300.0), 100_000);
        assert_eq!(modelled_power_mw(0.5, 100.0, 300.0), 200_000);
        assert_eq!(modelled_power_mw(2.0, 100.0, 300.0), 300_000);
        assert_eq!(parse_trace("10\n\n55\n").unwrap(), vec![0.1, 0.55]);
        assert!(parse_trace("10\nabc\n").unwrap_err().contains("line 2"));
        assert!(parse_trace("101\n").is_err());
        assert!(parse_trace("").is_err());
    }

    #[test]
    fn seq_grows_across_restarts_and_reports_validate() {
        let key = SecretKey::generate(&mut rand_core::OsRng);
        let s = Sample {
            cpu: 0.42,
            mem_used_mib: 10,
            mem_total_mib: 100,
            power_mw: 1,
            power_measured: false,
        };
        let r1 = build_report(key.public(), 0, Timestamp(5_000), 1, &s);
        assert_eq!((r1.seq, r1.cpu_permille), (5_000, 420));
        let r2 = build_report(key.public(), r1.seq, Timestamp(5_000), 1, &s);
        assert_eq!(r2.seq, 5_001);
        // A restart (prev_seq 0) later in time still outranks both.
        let r3 = build_report(key.public(), 0, Timestamp(6_000), 1, &s);
        assert!(r3.seq > r2.seq);
        assert_eq!(r3.check_ranges(), Ok(()));
    }
}
