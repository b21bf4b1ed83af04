//! `drift bench qemu`: one guest migrated by QEMU alone, QEMU to QEMU over a unix socket (no
//! encryption, no drift: the baseline), and through drift (QEMU's stream tunnelled over two
//! nodes' encrypted mesh, with drift's handoff), in the same run, alternating.
//!
//! Both use the same guest (deploy/guest), the same QEMU command line (drift's own), the same
//! memory and the same migration settings (downtime limit, no bandwidth cap), pre-copy or, with
//! `--postcopy`, post-copy switched to once the first bytes moved. Figures:
//!
//! - total time: QEMU's `total-time` for the baseline; for drift, from the offer to the
//!   target's commit (negotiation, QEMU's migration, the transcript check and the durable
//!   commit included);
//! - downtime: QEMU's `downtime` for the baseline; for drift, QEMU's `downtime` plus the time
//!   from QEMU's completion until the target resumed the guest and committed;
//! - throughput: bytes QEMU sent over total time;
//! - CPU: the whole machine's busy CPU time (`/proc/stat`) over the migration, per MiB moved,
//!   and for drift the benchmark process's own (both nodes' tunnel ends). On a machine that
//!   hosts both QEMUs and both nodes, every core is busy in the baseline already; the
//!   tunnel's encryption, hashing and copies then take time from QEMU, and the CPU figures
//!   say how much.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use drift_protocol::migration::{Mode, Placement};
use drift_protocol::VmId;
use serde::Serialize;
use serde_json::json;

use super::{start_pair, two_node_configs, Pair, TempDir};
use crate::control::{client, CreateVm, MigrationsView, StartMigration, VmsView};
use crate::hypervisor::qemu::{self, binary, command_line, Accel, QemuSpec, QMP_TIMEOUT};
use crate::hypervisor::qmp::Qmp;
use crate::hypervisor::{RunState, VmSpec};

/// What to run.
#[derive(Debug, Clone)]
pub struct QemuBenchParams {
    pub memory_mib: u64,
    /// Migrations of each kind.
    pub runs: u32,
    /// Post-copy instead of pre-copy.
    pub postcopy: bool,
    /// Holds `vmlinuz` and `initrd.img` (deploy/guest/build.sh).
    pub guest_dir: PathBuf,
    pub timeout: Duration,
}

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct QemuRun {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub bytes: u64,
    pub throughput_mib_per_s: f64,
    /// Busy CPU time of the whole machine over the migration, per MiB QEMU sent.
    pub machine_cpu_ms_per_mib: f64,
    /// Mean busy cores over the migration.
    pub busy_cores: f64,
    /// CPU time of drift's nodes (this process) per MiB; 0 for the baseline.
    pub drift_cpu_ms_per_mib: f64,
}

/// Medians of each kind and their ratios.
#[derive(Debug, Clone, Serialize)]
pub struct QemuFigures {
    pub memory_mib: u64,
    pub accel: String,
    pub runs: u32,
    /// `precopy` or `postcopy`.
    pub mode: String,
    pub direct: Vec<QemuRun>,
    pub tunnelled: Vec<QemuRun>,
    pub direct_median: QemuRun,
    pub tunnelled_median: QemuRun,
    /// Tunnelled total time / direct total time (target: at most 1.15).
    pub total_ratio: f64,
    /// Tunnelled downtime − direct downtime (target: at most 20 ms).
    pub downtime_delta_ms: f64,
    /// Tunnelled throughput / direct throughput.
    pub throughput_ratio: f64,
}

/// Downtime limit of both kinds (drift's default).
const DOWNTIME_LIMIT_MS: u64 = 50;
/// Heartbeats the guest must have printed before a migration (it has filled its memory).
const WARM_HEARTBEATS: u64 = 10;

fn median(runs: &[QemuRun]) -> QemuRun {
    let pick = |f: fn(&QemuRun) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    QemuRun {
        total_ms: pick(|r| r.total_ms),
        downtime_ms: pick(|r| r.downtime_ms),
        bytes: pick(|r| r.bytes as f64) as u64,
        throughput_mib_per_s: pick(|r| r.throughput_mib_per_s),
        machine_cpu_ms_per_mib: pick(|r| r.machine_cpu_ms_per_mib),
        busy_cores: pick(|r| r.busy_cores),
        drift_cpu_ms_per_mib: pick(|r| r.drift_cpu_ms_per_mib),
    }
}

/// CPU time used so far: the whole machine's busy time and this process's.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    at: Instant,
    machine_ms: f64,
    process_ms: f64,
}

impl CpuMark {
    fn now() -> Self {
        let machine_ticks = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| crate::monitor::parse_proc_stat(&t))
            .map_or(0, |(busy, _)| busy);
        let process_ticks = qemu::process_ticks(std::process::id()).unwrap_or(0);
        let ms = |ticks: u64| ticks as f64 * 1e3 / qemu::clock_ticks();
        Self {
            at: Instant::now(),
            machine_ms: ms(machine_ticks),
            process_ms: ms(process_ticks),
        }
    }
}

fn run_of(
    total_ms: f64,
    downtime_ms: f64,
    bytes: u64,
    cpu: (CpuMark, CpuMark),
    drift: bool,
) -> QemuRun {
    let mib = (bytes as f64 / (1 << 20) as f64).max(1e-9);
    let (before, after) = cpu;
    let wall_ms = after.at.duration_since(before.at).as_secs_f64() * 1e3;
    let machine_ms = after.machine_ms - before.machine_ms;
    QemuRun {
        total_ms,
        downtime_ms,
        bytes,
        throughput_mib_per_s: mib / (total_ms / 1e3).max(1e-3),
        machine_cpu_ms_per_mib: machine_ms / mib,
        busy_cores: machine_ms / wall_ms.max(1e-3),
        drift_cpu_ms_per_mib: if drift {
            (after.process_ms - before.process_ms) / mib
        } else {
            0.0
        },
    }
}

fn spec_for(p: &QemuBenchParams, name: &str) -> QemuSpec {
    QemuSpec {
        kernel: p.guest_dir.join("vmlinuz"),
        initrd: Some(p.guest_dir.join("initrd.img")),
        append: format!("console=ttyS0 panic=-1 quiet drift.marker={name}"),
        disk: None,
        extra_args: Vec::new(),
        multifd_channels: 0,
    }
}

/// Runs the benchmark.
pub async fn qemu(p: QemuBenchParams) -> anyhow::Result<QemuFigures> {
    for f in ["vmlinuz", "initrd.img"] {
        if !p.guest_dir.join(f).exists() {
            bail!(
                "{} has no {f}: build the guest with deploy/guest/build.sh",
                p.guest_dir.display()
            );
        }
    }
    if p.runs == 0 || p.runs > 20 {
        bail!("--runs must be 1 to 20");
    }
    let tmp = TempDir::new("q")?;
    let mut configs = two_node_configs(tmp.path(), Duration::from_millis(500))?;
    for c in &mut configs {
        c.qemu.image_dirs = vec![p.guest_dir.clone()];
    }
    let pair = start_pair(configs, Duration::from_secs(30)).await?;
    let accel = pair.a.state.vms.qemu().accel();
    let mut direct = Vec::new();
    let mut tunnelled = Vec::new();
    let mut result = Ok(());
    for i in 0..p.runs {
        match direct_run(&p, tmp.path(), i, accel).await {
            Ok(r) => direct.push(r),
            Err(e) => {
                result = Err(e.context(format!("direct run {}", i + 1)));
                break;
            }
        }
        match tunnelled_run(&p, &pair, i).await {
            Ok(r) => tunnelled.push(r),
            Err(e) => {
                result = Err(e.context(format!("tunnelled run {}", i + 1)));
                break;
            }
        }
    }
    pair.shutdown().await;
    result?;
    let (d, t) = (median(&direct), median(&tunnelled));
    Ok(QemuFigures {
        memory_mib: p.memory_mib,
        accel: accel.to_string(),
        runs: p.runs,
        mode: if p.postcopy { "postcopy" } else { "precopy" }.into(),
        total_ratio: t.total_ms / d.total_ms.max(1e-3),
        downtime_delta_ms: t.downtime_ms - d.downtime_ms,
        throughput_ratio: t.throughput_mib_per_s / d.throughput_mib_per_s.max(1e-9),
        direct,
        tunnelled,
        direct_median: d,
        tunnelled_median: t,
    })
}

/// Waits until a guest's console shows `WARM_HEARTBEATS` heartbeats.
async fn warm(serial: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while qemu::last_heartbeat(serial).unwrap_or(0) < WARM_HEARTBEATS {
        if Instant::now() > deadline {
            bail!(
                "the guest did not boot within {timeout:?} ({})",
                serial.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A QEMU started by the baseline, stopped when dropped.
struct Plain {
    dir: PathBuf,
}

impl Plain {
    async fn start(
        spec: &VmSpec,
        q: &QemuSpec,
        dir: PathBuf,
        accel: Accel,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let out = tokio::process::Command::new(binary())
            .args(command_line(spec, q, &dir, accel))
            .output()
            .await
            .context("starting QEMU")?;
        if !out.status.success() {
            bail!("QEMU: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self { dir })
    }

    async fn qmp(&self) -> anyhow::Result<Qmp> {
        Ok(Qmp::connect(&self.dir.join(qemu::QMP_SOCKET), Duration::from_secs(10)).await?)
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("qemu.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// QEMU to QEMU over a unix socket.
async fn direct_run(
    p: &QemuBenchParams,
    dir: &Path,
    i: u32,
    accel: Accel,
) -> anyhow::Result<QemuRun> {
    let name = format!("direct-{i}");
    let q = spec_for(p, &name);
    let mut spec = VmSpec {
        id: VmId::from_bytes([i as u8; 16]),
        name: name.clone(),
        memory_mib: p.memory_mib,
        vcpus: 1,
        demand_permille: 0,
        dirty_pages_per_s: 0,
        page_random_pct: None,
        placement: Placement::default(),
        seed: 1,
        incoming: false,
        qemu: Some(q.clone()),
    };
    let src = Plain::start(&spec, &q, dir.join(format!("{name}-src")), accel).await?;
    spec.incoming = true;
    let dst = Plain::start(&spec, &q, dir.join(format!("{name}-dst")), accel).await?;
    warm(&src.dir.join(qemu::SERIAL_LOG), p.timeout).await?;
    let (sq, dq) = (src.qmp().await?, dst.qmp().await?);
    let caps = [
        ("events", true),
        ("postcopy-ram", p.postcopy),
        ("multifd", false),
    ];
    sq.set_capabilities(&caps).await?;
    dq.set_capabilities(&caps).await?;
    sq.set_parameters(json!({ "downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": 64u64 << 30 }))
        .await?;
    let sock = dst.dir.join("incoming.sock");
    let uri = json!({ "uri": format!("unix:{}", sock.display()) });
    dq.execute("migrate-incoming", Some(uri.clone()), QMP_TIMEOUT)
        .await?;
    let before = CpuMark::now();
    sq.execute("migrate", Some(uri), QMP_TIMEOUT).await?;
    let deadline = Instant::now() + p.timeout;
    // Post-copy: switched to once the first bytes moved (as drift does), and the target
    // resumed once it runs the incoming guest, as QEMU's autostart would.
    let (mut switched, mut resumed) = (!p.postcopy, !p.postcopy);
    let info = loop {
        let info = sq.query_migrate().await?;
        if !switched && info.status.as_deref() == Some("active") && info.ram_transferred > 0 {
            sq.execute("migrate-start-postcopy", None, QMP_TIMEOUT)
                .await?;
            switched = true;
        }
        if switched && !resumed {
            let d = dq.query_migrate().await?;
            if d.status.as_deref() == Some("postcopy-active") {
                dq.cont().await?;
                resumed = true;
            }
        }
        match info.status.as_deref() {
            Some("completed") => break info,
            Some("failed" | "cancelled") => bail!("QEMU's migration failed: {:?}", info.error_desc),
            _ if Instant::now() > deadline => bail!("QEMU's migration did not end in time"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let after = CpuMark::now();
    // The target was started paused (-S), as drift's are: resume it, as QEMU's own autostart
    // would have.
    if !resumed {
        dq.cont().await?;
    }
    let total = info.total_time_ms.ok_or_else(|| anyhow!("no total-time"))? as f64;
    let downtime = info.downtime_ms.unwrap_or(0) as f64;
    let _ = sq.quit().await;
    let _ = dq.quit().await;
    Ok(run_of(
        total,
        downtime,
        info.ram_transferred,
        (before, after),
        false,
    ))
}

/// Through two drift nodes.
async fn tunnelled_run(p: &QemuBenchParams, pair: &Pair, i: u32) -> anyhow::Result<QemuRun> {
    let name = format!("tunnelled-{i}");
    let create = CreateVm {
        name: name.clone(),
        memory_mib: p.memory_mib,
        vcpus: 1,
        demand: 0.1,
        dirty_mib_per_s: 0.0,
        page_random_pct: None,
        jurisdictions: Vec::new(),
        regions: Vec::new(),
        anti_affinity: None,
        qemu: Some(spec_for(p, &name)),
    };
    let vm: crate::hypervisor::VmView =
        client::post(&pair.a.socket, "/v1/vms", serde_json::to_vec(&create)?)
            .await
            .with_context(|| format!("creating {name} on node-1"))?;
    let run = async {
        warm(
            &pair.a.state.vms.dir_of(&vm.id).join(qemu::SERIAL_LOG),
            p.timeout,
        )
        .await?;
        let req = StartMigration {
            vm: name.clone(),
            to: "node-2".into(),
            mode: if p.postcopy {
                Mode::PostCopy
            } else {
                Mode::PreCopy
            },
            downtime_limit_ms: Some(DOWNTIME_LIMIT_MS),
            ..Default::default()
        };
        let before = CpuMark::now();
        let started: serde_json::Value =
            client::post(&pair.a.socket, "/v1/migrations", serde_json::to_vec(&req)?).await?;
        let id = started["id"]
            .as_str()
            .ok_or_else(|| anyhow!("no migration id in {started}"))?
            .to_string();
        let deadline = Instant::now() + p.timeout;
        let last = loop {
            let view: MigrationsView = client::get(&pair.a.socket, "/v1/migrations").await?;
            let m = view
                .migrations
                .into_iter()
                .find(|m| m.id.to_string() == id)
                .ok_or_else(|| anyhow!("migration {id} is no longer listed"))?;
            if !matches!(m.state.as_str(), "negotiating" | "running" | "resolving") {
                break m;
            }
            if Instant::now() > deadline {
                bail!("the migration did not end in time");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let after = CpuMark::now();
        if last.state != "committed" {
            bail!("the migration ended {}: {}", last.state, last.detail);
        }
        let running: VmsView = client::get(&pair.b.socket, "/v1/vms").await?;
        if !running
            .vms
            .iter()
            .any(|v| v.name == name && v.state == RunState::Running)
        {
            bail!("{name} does not run on node-2 after the commit");
        }
        let pr = last.progress.unwrap_or_default();
        Ok(run_of(
            pr.total_ms.unwrap_or(0.0),
            pr.downtime_ms.unwrap_or(0.0),
            pr.bytes_sent,
            (before, after),
            true,
        ))
    }
    .await;
    // Wherever it is now, it goes.
    for node in [&pair.a, &pair.b] {
        let _ = node.state.vms.destroy(&name).await;
    }
    run
}
