//! `drift bench migrate --memory-mib M --dirty-mib-per-s D`: live migrations of one sandbox VM
//! between two in-process nodes, next to baselines measured in the same run.
//!
//! Every run creates a VM of `M` MiB on node-1 through the admin API, writes every page of its
//! memory (a long-running guest's memory is not zero, and zero pages would travel as markers
//! only), lets its workload dirty `D` MiB per second (4 KiB pages), and moves it to node-2 with
//! `POST /v1/migrations`, polling `GET /v1/migrations` for its progress. Afterwards the VM must
//! run on node-2 only, and verify clean page by page there.
//!
//! The runs, in order:
//!
//! 1. **stream**: the raw throughput of a drift stream between the same two nodes, for the
//!    same number of bytes as the VM's memory (see [`super::transfer`]);
//! 2. **data**: the data plane's own rate between the same two nodes, for the same bytes as
//!    page batches on `K` data connections (the nodes' `data.connections`, at least 2), as in
//!    `drift bench transfer`'s `data_k` leg: what migrations move on;
//! 3. **baseline**: pre-copy of the same VM with its workload idle (dirty rate 0): the lower
//!    bound on total time and bytes, and the migration whose throughput is held against the
//!    data plane's ([`Targets::idle_vs_data`]);
//! 4. **pre-copy**, 5. **post-copy**, and optionally 6. **hybrid**, with the workload running;
//! 7. **outrun** (unless `--no-outrun`): a VM whose workload dirties memory as fast as it can,
//!    measured for a second, then moved over a link capped at half that rate, once per
//!    fallback (`abort`, `throttle`, `postcopy`): the abort must leave it running clean at
//!    home, the others must commit within the maximum downtime.
//!
//! The legs and the migrations all run on the caller's runtime, as the two nodes do.
//!
//! Times, downtime, rounds and bytes are the engine's own (`drift migrations` shows the same):
//! pre-copy downtime runs from the pause on the source to the target's commit arriving there;
//! post-copy downtime from the pause to the device state (on which the target resumes) going
//! out.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use drift_protocol::migration::Mode;
use drift_protocol::transfer::convergence::Fallback;
use drift_protocol::transfer::{PageBatch, MAX_PAGES_PER_BATCH, PAGE_SIZE};
use drift_protocol::SecretKey;
use serde::Serialize;

use super::transfer::{data_plane_leg, stream_leg, Leg, PagePayload, Payload};
use super::{start_pair, two_node_configs, Pair, TempDir};
use crate::control::{client, CreateVm, MigrationsView, StartMigration, VmsView};
use crate::hypervisor::guest::{write_page_mixed, VerifyReport, CANARY_PFN};
use crate::hypervisor::vmm::{Request, Response};
use crate::hypervisor::{RunState, SOCKET_FILE};
use crate::migration::service::MigrationView;

/// Targets the figures are printed next to.
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    pub precopy_downtime_ms: f64,
    /// Bytes sent / memory size.
    pub bytes_ratio: f64,
    pub postcopy_downtime_ms: f64,
    /// The idle pre-copy's throughput / the data plane's own rate.
    pub idle_vs_data: f64,
}

/// The targets drift aims for.
pub const TARGETS: Targets = Targets {
    precopy_downtime_ms: 50.0,
    bytes_ratio: 1.3,
    postcopy_downtime_ms: 5.0,
    idle_vs_data: 0.75,
};

/// The outrun cases: a VM of `--outrun-memory-mib` (256 MiB by default)...
pub const OUTRUN_MEMORY_MIB: u64 = 256;
/// ...whose workload dirties memory as fast as this asks (or as it can)...
pub const OUTRUN_DIRTY_MIB_PER_S: f64 = 512.0;
/// ...behind a link capped at half the rate it was measured dirtying, at most this...
pub const OUTRUN_MAX_CAP_MIB_PER_S: u64 = 64;
/// ...with this ceiling on its downtime.
pub const OUTRUN_MAX_DOWNTIME_MS: u64 = 200;
/// The compression cases' link cap (about 1 Gbit/s, where packing pays).
pub const COMPRESSION_CAP_MIB_PER_S: u64 = 128;
/// How long the outrun VM's dirty rate is measured before it moves.
const OUTRUN_MEASURE: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone)]
pub struct MigrateParams {
    pub memory_mib: u64,
    pub dirty_mib_per_s: f64,
    /// Also run hybrid (pre-copy rounds, then post-copy).
    pub hybrid: bool,
    /// Also run the outrun cases, on a VM of this size.
    pub outrun_memory_mib: Option<u64>,
    /// Also run the compression cases, on a VM whose pages are this percent random.
    pub compression_random_pct: Option<u8>,
    /// Switch over once the remaining pages fit in this (the service's default if `None`).
    pub downtime_limit_ms: Option<u64>,
    /// Any one migration gives up after this long.
    pub timeout: Duration,
}

/// A moment of a migration, as polled: one sample per change of phase or round.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Since the migration was requested.
    pub t_ms: f64,
    pub state: String,
    pub phase: String,
    pub round: u32,
    pub bytes_sent: u64,
    pub dirty_pages: u64,
    pub expected_downtime_ms: f64,
}

/// One migration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub label: String,
    /// `precopy`, `postcopy` or `hybrid`.
    pub mode: String,
    pub dirty_mib_per_s: f64,
    /// What the migration did when it did not converge (`throttle,abort`, ...).
    pub fallback: String,
    /// The bandwidth cap, bytes per second, if any.
    pub cap_bytes_per_s: Option<u64>,
    /// The throttle the guest ended at, percent.
    pub throttle_pct: u8,
    /// Why it was found not converging, if it was.
    pub not_converging: Option<String>,
    /// The source's final state: `committed` on success.
    pub outcome: String,
    pub detail: String,
    pub total_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    /// The downtime the switchover was decided on (or the last round's estimate).
    pub expected_downtime_ms: f64,
    pub rounds: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// bytes sent / memory size.
    pub bytes_ratio: f64,
    /// bytes sent / total time.
    pub throughput_bytes_per_s: f64,
    /// throughput / raw stream throughput.
    pub throughput_vs_stream: f64,
    /// throughput / the data plane's own rate.
    pub throughput_vs_data: f64,
    /// Workload pages written on the source before the migration started.
    pub writes_before: u64,
    /// The target's page-by-page check after the migration.
    pub verify: Option<VerifyReport>,
    pub verified_clean: bool,
    pub running_on_target: bool,
    pub gone_from_source: bool,
    pub timeline: Vec<Sample>,
}

/// Figures of one migrate run.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateFigures {
    pub memory_mib: u64,
    pub memory_bytes: u64,
    pub page_count: u64,
    pub dirty_mib_per_s: f64,
    pub dirty_pages_per_s: u64,
    /// The raw stream between the same nodes, for the memory's size in bytes.
    pub stream: Leg,
    /// The data plane between the same nodes on `K` connections, for the same bytes.
    pub data: Leg,
    /// Pre-copy with the workload idle.
    pub baseline: Run,
    pub precopy: Run,
    pub postcopy: Run,
    pub hybrid: Option<Run>,
    /// The memory of the outrun VM, when those cases ran.
    pub outrun_memory_mib: Option<u64>,
    /// A VM dirtying faster than the link, one run per fallback.
    pub outrun: Vec<Run>,
    /// The compression cases: pre-copy of a VM whose memory compresses, behind a link capped
    /// at [`COMPRESSION_CAP_MIB_PER_S`], plain and packed.
    pub compression: Vec<Run>,
    pub targets: Targets,
}

/// The rates, in bytes per second, each migration's throughput is held against.
#[derive(Debug, Clone, Copy)]
struct Rates {
    /// The raw stream's.
    stream: f64,
    /// The data plane's.
    data: f64,
}

const PAIR_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the migration's progress is read.
const POLL: Duration = Duration::from_millis(20);
/// The workload runs this long before the migration starts.
const WARM_UP: Duration = Duration::from_millis(500);
/// How long the VM may take to settle on each side after the commit.
const SETTLE: Duration = Duration::from_secs(15);

/// Writes every page of the VM (but the canary) as its guest would, `random_pct` percent
/// random, through its VMM socket.
async fn populate(sock: &Path, page_count: u64, random_pct: u8) -> anyhow::Result<()> {
    let mut conn = crate::hypervisor::connect(sock)
        .await
        .with_context(|| format!("connecting to {}", sock.display()))?;
    let seed = match crate::hypervisor::exchange(&mut conn, &Request::Info).await? {
        Response::Info(info) => info.spec.seed,
        other => bail!("VMM answered {other:?} to Info"),
    };
    let mut buf = vec![0u8; MAX_PAGES_PER_BATCH * PAGE_SIZE];
    let pfns: Vec<u64> = (0..page_count).filter(|&p| p != CANARY_PFN).collect();
    for chunk in pfns.chunks(MAX_PAGES_PER_BATCH) {
        for (page, &pfn) in buf.chunks_exact_mut(PAGE_SIZE).zip(chunk) {
            write_page_mixed(page, seed, pfn, 1, random_pct);
        }
        let batch = PageBatch::build(0, chunk.iter().copied().zip(buf.chunks_exact(PAGE_SIZE)));
        match crate::hypervisor::exchange(&mut conn, &Request::WriteBatch(batch)).await? {
            Response::Done => {}
            other => bail!("VMM answered {other:?} to a page write"),
        }
    }
    Ok(())
}

async fn vms(socket: &Path) -> anyhow::Result<VmsView> {
    Ok(client::get(socket, "/v1/vms").await?)
}

/// Removes the VM from both nodes, wherever it is.
async fn clean_up(pair: &Pair, name: &str) {
    for node in [&pair.a, &pair.b] {
        if node.state.vms.find(name).is_ok() {
            let _ = node.state.vms.destroy(name).await;
        }
    }
}

fn sample(t0: Instant, m: &MigrationView) -> Sample {
    let p = m.progress.clone().unwrap_or_default();
    Sample {
        t_ms: t0.elapsed().as_secs_f64() * 1e3,
        state: m.state.clone(),
        phase: p.phase,
        round: p.rounds,
        bytes_sent: p.bytes_sent,
        dirty_pages: p.dirty_pages,
        expected_downtime_ms: p.expected_downtime_ms,
    }
}

/// Whether a migration in this state may still change.
fn in_progress(state: &str) -> bool {
    matches!(state, "negotiating" | "running" | "resolving")
}

/// How one migration is asked for.
#[derive(Debug, Clone)]
struct How {
    mode: Mode,
    dirty_mib_per_s: f64,
    memory_mib: u64,
    /// The request's convergence settings and cap (the node's defaults where `None`).
    fallback: Option<Fallback>,
    cap_bytes_per_s: Option<u64>,
    max_downtime_ms: Option<u64>,
    /// Cap the link at half the rate the VM is measured dirtying, just before it moves.
    outrun: bool,
    /// Percent of each page written random (`None`: all of it).
    random_pct: Option<u8>,
    /// Pack page data.
    compress: bool,
}

impl How {
    fn plain(mode: Mode, dirty_mib_per_s: f64, p: &MigrateParams) -> Self {
        Self {
            mode,
            dirty_mib_per_s,
            memory_mib: p.memory_mib,
            fallback: None,
            cap_bytes_per_s: None,
            max_downtime_ms: None,
            outrun: false,
            random_pct: None,
            compress: false,
        }
    }

    fn compression(random_pct: u8, compress: bool, p: &MigrateParams) -> Self {
        Self {
            random_pct: Some(random_pct),
            compress,
            cap_bytes_per_s: Some(COMPRESSION_CAP_MIB_PER_S << 20),
            ..Self::plain(Mode::PreCopy, p.dirty_mib_per_s, p)
        }
    }

    fn outrun(fallback: &str, memory_mib: u64) -> Self {
        Self {
            mode: Mode::PreCopy,
            dirty_mib_per_s: OUTRUN_DIRTY_MIB_PER_S,
            memory_mib,
            fallback: Some(fallback.parse().expect("a valid fallback")),
            cap_bytes_per_s: None,
            max_downtime_ms: Some(OUTRUN_MAX_DOWNTIME_MS),
            outrun: true,
            random_pct: None,
            compress: false,
        }
    }
}

/// Creates, fills and migrates one VM from `pair.a` to `pair.b`, then checks where it ended.
async fn run_one(
    pair: &Pair,
    label: &str,
    how: How,
    p: &MigrateParams,
    rates: Rates,
) -> anyhow::Result<Run> {
    let name = format!("bench-{}", label.replace(' ', "-"));
    let page_count = how.memory_mib * 256;
    let dirty_mib_per_s = how.dirty_mib_per_s;
    let create = CreateVm {
        name: name.clone(),
        memory_mib: how.memory_mib,
        vcpus: 1,
        demand: 0.1,
        dirty_mib_per_s,
        page_random_pct: how.random_pct,
        jurisdictions: Vec::new(),
        regions: Vec::new(),
        anti_affinity: None,
        qemu: None,
    };
    let vm: crate::hypervisor::VmView =
        client::post(&pair.a.socket, "/v1/vms", serde_json::to_vec(&create)?)
            .await
            .with_context(|| format!("creating {name} on node-1"))?;
    let run = migrate_created(pair, label, &how, p, rates, &vm, page_count).await;
    clean_up(pair, &name).await;
    run
}

async fn migrate_created(
    pair: &Pair,
    label: &str,
    how: &How,
    p: &MigrateParams,
    rates: Rates,
    vm: &crate::hypervisor::VmView,
    page_count: u64,
) -> anyhow::Result<Run> {
    let (mode, dirty_mib_per_s) = (how.mode, how.dirty_mib_per_s);
    let name = &vm.name;
    let sock = pair.a.state.vms.dir_of(&vm.id).join(SOCKET_FILE);
    populate(&sock, page_count, how.random_pct.unwrap_or(100))
        .await
        .with_context(|| format!("writing the memory of {name}"))?;
    tokio::time::sleep(WARM_UP).await;
    let writes = || async {
        Ok::<_, anyhow::Error>(
            vms(&pair.a.socket)
                .await?
                .vms
                .iter()
                .find(|v| &v.name == name)
                .map_or(0, |v| v.writes),
        )
    };
    let mut writes_before = writes().await?;
    let mut cap = how.cap_bytes_per_s;
    if how.outrun {
        // Whatever this build's workload manages: the link gets half of it.
        tokio::time::sleep(OUTRUN_MEASURE).await;
        let now = writes().await?;
        let rate = now.saturating_sub(writes_before) as f64 * PAGE_SIZE as f64
            / OUTRUN_MEASURE.as_secs_f64();
        cap = Some(((rate / 2.0) as u64).clamp(1 << 20, OUTRUN_MAX_CAP_MIB_PER_S << 20));
        writes_before = now;
    }

    let req = StartMigration {
        vm: name.clone(),
        to: "node-2".into(),
        mode,
        downtime_limit_ms: p.downtime_limit_ms,
        bandwidth_cap_bytes_per_s: cap,
        max_downtime_ms: how.max_downtime_ms,
        fallback: how.fallback.clone(),
        compress: how.compress,
        ..Default::default()
    };
    let t0 = Instant::now();
    let started: serde_json::Value =
        client::post(&pair.a.socket, "/v1/migrations", serde_json::to_vec(&req)?)
            .await
            .with_context(|| format!("starting the {label} migration"))?;
    let id = started["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the start of the migration named no id: {started}"))?
        .to_string();

    let mut timeline: Vec<Sample> = Vec::new();
    let deadline = t0 + p.timeout;
    let last = loop {
        let view: MigrationsView = client::get(&pair.a.socket, "/v1/migrations").await?;
        let m = view
            .migrations
            .into_iter()
            .find(|m| m.id.to_string() == id)
            .ok_or_else(|| anyhow!("migration {id} is no longer listed"))?;
        let s = sample(t0, &m);
        let changed = timeline
            .last()
            .is_none_or(|l| (&l.state, &l.phase, l.round) != (&s.state, &s.phase, s.round));
        if changed {
            timeline.push(s);
        }
        if !in_progress(&m.state) {
            break m;
        }
        if Instant::now() > deadline {
            bail!(
                "the {label} migration did not finish within {:?}",
                p.timeout
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let progress = last.progress.clone().unwrap_or_default();

    // Where did the VM end up? Exactly one side, running, clean.
    let committed = last.state == "committed";
    let mut verify = None;
    if !committed {
        // It must still run, clean, at home.
        verify = Some(
            pair.a
                .state
                .vms
                .verify(name)
                .await
                .with_context(|| format!("verifying {name} at home on node-1"))?,
        );
    }
    let mut running_on_target = false;
    let mut gone_from_source = false;
    if committed {
        let settle = Instant::now() + SETTLE;
        while Instant::now() < settle {
            running_on_target = vms(&pair.b.socket)
                .await?
                .vms
                .iter()
                .any(|v| &v.name == name && v.state == RunState::Running);
            gone_from_source = pair.a.state.vms.find(name).is_err();
            if running_on_target && gone_from_source {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        verify = Some(
            pair.b
                .state
                .vms
                .verify(name)
                .await
                .with_context(|| format!("verifying {name} on node-2"))?,
        );
    }
    let memory_bytes = page_count * PAGE_SIZE as u64;
    let throughput = match progress.total_ms {
        Some(t) if t > 0.0 => progress.bytes_sent as f64 / (t / 1e3),
        _ => 0.0,
    };
    Ok(Run {
        label: label.to_string(),
        mode: mode.to_string(),
        dirty_mib_per_s,
        fallback: progress.fallback.clone(),
        cap_bytes_per_s: cap,
        throttle_pct: progress.throttle_pct,
        not_converging: progress.not_converging.clone(),
        outcome: last.state.clone(),
        detail: last.detail.clone(),
        total_ms: progress.total_ms,
        downtime_ms: progress.downtime_ms,
        expected_downtime_ms: progress.expected_downtime_ms,
        rounds: progress.rounds,
        pages_sent: progress.pages_sent,
        bytes_sent: progress.bytes_sent,
        bytes_ratio: progress.bytes_sent as f64 / memory_bytes as f64,
        throughput_bytes_per_s: throughput,
        throughput_vs_stream: throughput / rates.stream.max(1e-9),
        throughput_vs_data: throughput / rates.data.max(1e-9),
        writes_before,
        verified_clean: verify
            .as_ref()
            .is_some_and(|v| v.bad_count == 0 && v.pages == page_count),
        verify,
        running_on_target,
        gone_from_source,
        timeline,
    })
}

fn check(p: &MigrateParams) -> anyhow::Result<()> {
    if p.memory_mib == 0 || p.memory_mib > crate::hypervisor::MAX_MEMORY_MIB {
        bail!(
            "--memory-mib must be 1 to {}",
            crate::hypervisor::MAX_MEMORY_MIB
        );
    }
    if !(0.0..=1024.0).contains(&p.dirty_mib_per_s) {
        bail!("--dirty-mib-per-s must be 0 to 1024");
    }
    Ok(())
}

/// Runs the migrate benchmark.
pub async fn migrate(p: MigrateParams) -> anyhow::Result<MigrateFigures> {
    check(&p)?;
    let dir = TempDir::new("migrate")?;
    let configs = two_node_configs(dir.path(), Duration::from_millis(500))?;
    let keys = [
        crate::identity::read_key(&configs[0].node.key)?,
        crate::identity::read_key(&configs[1].node.key)?,
    ];
    // As many connections as the nodes give a sandbox migration, and at least 2, as the
    // transfer benchmark's `data_k` leg.
    let connections = configs[0].data.connections().max(2);
    let pair = start_pair(configs, PAIR_TIMEOUT).await?;
    let result = runs(&pair, &keys, connections, &p).await;
    pair.shutdown().await;
    result
}

async fn runs(
    pair: &Pair,
    keys: &[SecretKey; 2],
    connections: u32,
    p: &MigrateParams,
) -> anyhow::Result<MigrateFigures> {
    let memory_bytes = p.memory_mib * 1024 * 1024;
    let payload = Payload::new(memory_bytes);
    let stream = stream_leg(pair, "libp2p tcp+noise+yamux", &payload, payload.digest()).await?;
    let pages = Arc::new(PagePayload::new(&payload));
    let data = data_plane_leg(pair, keys, &pages, connections).await?;
    let rates = Rates {
        stream: stream.bytes_per_s,
        data: data.bytes_per_s,
    };
    let plain = |mode, dirty| How::plain(mode, dirty, p);
    let baseline = run_one(pair, "baseline", plain(Mode::PreCopy, 0.0), p, rates).await?;
    let dirty = p.dirty_mib_per_s;
    let precopy = run_one(pair, "precopy", plain(Mode::PreCopy, dirty), p, rates).await?;
    let postcopy = run_one(pair, "postcopy", plain(Mode::PostCopy, dirty), p, rates).await?;
    let hybrid = if p.hybrid {
        Some(run_one(pair, "hybrid", plain(Mode::Hybrid, dirty), p, rates).await?)
    } else {
        None
    };
    let mut outrun = Vec::new();
    if let Some(memory_mib) = p.outrun_memory_mib {
        for fallback in ["abort", "throttle", "postcopy"] {
            let label = format!("outrun {fallback}");
            let how = How::outrun(fallback, memory_mib);
            outrun.push(run_one(pair, &label, how, p, rates).await?);
        }
    }
    let mut compression = Vec::new();
    if let Some(pct) = p.compression_random_pct {
        for (label, compress) in [("plain", false), ("packed", true)] {
            let how = How::compression(pct, compress, p);
            compression.push(run_one(pair, label, how, p, rates).await?);
        }
    }
    Ok(MigrateFigures {
        memory_mib: p.memory_mib,
        memory_bytes,
        page_count: p.memory_mib * 256,
        dirty_mib_per_s: p.dirty_mib_per_s,
        dirty_pages_per_s: (p.dirty_mib_per_s * 256.0).round() as u64,
        stream,
        data,
        baseline,
        precopy,
        postcopy,
        hybrid,
        outrun_memory_mib: p.outrun_memory_mib,
        outrun,
        compression,
        targets: TARGETS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_settings_are_refused() {
        let p = |memory_mib, dirty_mib_per_s| MigrateParams {
            memory_mib,
            dirty_mib_per_s,
            hybrid: false,
            outrun_memory_mib: None,
            compression_random_pct: None,
            downtime_limit_ms: None,
            timeout: Duration::from_secs(1),
        };
        assert!(check(&p(0, 1.0)).is_err());
        assert!(check(&p(1 << 20, 1.0)).is_err());
        assert!(check(&p(64, -1.0)).is_err());
        assert!(check(&p(64, 2048.0)).is_err());
        assert!(check(&p(64, 64.0)).is_ok());
    }
}
