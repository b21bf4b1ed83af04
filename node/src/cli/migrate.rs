//! `drift migrate` and `drift migrations`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use drift_protocol::migration::Mode;
use drift_protocol::transfer::convergence::Fallback;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::daemon::{runtime, Target};
use crate::control::{client, MigrationsView, StartMigration, VmsView};
use crate::migration::engine::Progress;
use crate::migration::service::MigrationView;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM (name or id) on this node.
    #[arg(required_unless_present = "cancel")]
    pub vm: Option<String>,
    /// The target node (roster name or id).
    #[arg(long, required_unless_present = "cancel")]
    pub to: Option<String>,
    /// Cancel the migration with this id instead (before switchover the VM stays here).
    #[arg(long, conflicts_with_all = ["vm", "to"])]
    pub cancel: Option<String>,
    /// precopy (default), postcopy or hybrid.
    #[arg(long, default_value = "precopy")]
    pub mode: Mode,
    /// Switch over once the remaining pages fit in this downtime (milliseconds; default
    /// `[migration] downtime_limit`).
    #[arg(long)]
    pub downtime_limit_ms: Option<u64>,
    /// Never switch over while the expected downtime is above this (milliseconds; default
    /// `[migration] max_downtime`).
    #[arg(long)]
    pub max_downtime_ms: Option<u64>,
    /// What to do, in order, when the migration does not converge: throttle, postcopy,
    /// abort, comma-separated (default `[migration] fallback`, throttle,abort).
    #[arg(long)]
    pub fallback: Option<Fallback>,
    /// Not converging once the dirty set made no progress for this long (e.g. 150s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub progress_timeout: Option<Duration>,
    /// The migration may run this long per GiB of memory (e.g. 150s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub completion_timeout_per_gib: Option<Duration>,
    /// Cap the transfer at this many MiB per second.
    #[arg(long)]
    pub bandwidth_mib: Option<u64>,
    /// Compress page data (LZ4, page by page, only pages it shrinks by an eighth): fewer bytes
    /// on a slow link for memory that compresses, at some CPU. Sandbox VMs.
    #[arg(long)]
    pub compress: bool,
    /// Follow the migration until it ends, with its progress.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct MigrationsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
}

/// The engine's phase while the migration runs, its state otherwise.
fn shown_phase(m: &MigrationView, p: &Progress) -> String {
    match (m.state.as_str(), p.phase.as_str()) {
        ("running", "") => "starting".into(),
        ("running", phase) => phase.into(),
        (state, _) => state.into(),
    }
}

fn line(m: &MigrationView) -> String {
    let p = m.progress.clone().unwrap_or_default();
    format!(
        "{} {} -> {}  {:<15} round {:>2}  sent {:>8}  {:>7.1} MiB/s  dirty {:>6}  expected downtime {:>6.1} ms{}",
        m.id.short(),
        m.vm,
        m.peer.short(),
        shown_phase(m, &p),
        p.rounds,
        mib(p.bytes_sent),
        p.rate_bytes_per_s / (1024.0 * 1024.0),
        p.dirty_pages,
        p.expected_downtime_ms,
        match (p.downtime_ms, p.total_ms) {
            (Some(d), Some(t)) => format!("  downtime {d:.1} ms, total {t:.0} ms"),
            _ => convergence(&p).map_or(String::new(), |c| format!("  {c}")),
        }
    )
}

/// While pre-copy runs: the dirty rate, the throttle, and whether and why the migration is
/// not converging; `None` before the first round's figures.
fn convergence(p: &Progress) -> Option<String> {
    if p.rounds == 0 {
        return None;
    }
    let mut out = format!(
        "dirtying {:.0} MiB/s",
        p.dirty_rate_bytes_per_s / (1024.0 * 1024.0)
    );
    if p.throttle_pct > 0 {
        out.push_str(&format!(", throttled {} %", p.throttle_pct));
    }
    if let Some(why) = &p.not_converging {
        out.push_str(&format!("; {why}"));
    }
    Some(out)
}

pub(crate) fn migrate(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let socket = a.target.socket()?;
    let rt = runtime()?;
    if let Some(id) = &a.cancel {
        let _: serde_json::Value = rt.block_on(client::post(
            &socket,
            &format!("/v1/migrations/{id}/cancel"),
            Vec::new(),
        ))?;
        println!("cancelling {id}");
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(vm), Some(to)) = (a.vm.clone(), a.to.clone()) else {
        anyhow::bail!("name the VM and --to NODE");
    };
    let req = StartMigration {
        vm: vm.clone(),
        to: to.clone(),
        mode: a.mode,
        downtime_limit_ms: a.downtime_limit_ms,
        bandwidth_cap_bytes_per_s: a.bandwidth_mib.map(|m| m * 1024 * 1024),
        max_downtime_ms: a.max_downtime_ms,
        fallback: a.fallback.clone(),
        progress_timeout_ms: a.progress_timeout.map(|d| d.as_millis() as u64),
        completion_timeout_per_gib_ms: a.completion_timeout_per_gib.map(|d| d.as_millis() as u64),
        compress: a.compress,
    };
    let started: serde_json::Value = rt.block_on(client::post(
        &socket,
        "/v1/migrations",
        serde_json::to_vec(&req)?,
    ))?;
    let id = started["id"].as_str().unwrap_or_default().to_string();
    println!("migration {id}: {vm} -> {to} ({}) accepted", a.mode);
    if !a.watch {
        return Ok(ExitCode::SUCCESS);
    }
    // The VM's size sizes the bar; without it the bar follows the pages known to be left.
    let memory_pages = rt
        .block_on(client::get::<VmsView>(&socket, "/v1/vms"))
        .ok()
        .and_then(|v| {
            v.vms
                .iter()
                .find(|m| m.name == vm || m.id.to_string() == vm)
                .map(|m| m.memory_mib * 256)
        });
    let mut view = if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
        Watch::Bar(Bar::new(memory_pages)?)
    } else {
        Watch::Lines {
            last: None,
            printed_at: None,
        }
    };
    // Bounded: a migration that outlives an hour is reported and left running.
    for _ in 0..(3600 * 5) {
        let v: MigrationsView = rt.block_on(client::get(&socket, "/v1/migrations"))?;
        let Some(m) = v.migrations.iter().find(|m| m.id.to_string() == id) else {
            view.finish();
            anyhow::bail!("migration {id} is no longer listed");
        };
        if in_progress(&m.state) {
            view.show(m);
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        view.finish();
        if m.state == "committed" {
            println!("{}", summary(&id, &vm, &to, m));
            return Ok(ExitCode::SUCCESS);
        }
        println!("migration {id} ended {}: {}", m.state, m.detail);
        return Ok(ExitCode::FAILURE);
    }
    view.finish();
    println!("migration {id} still running after an hour; see drift migrations");
    Ok(ExitCode::FAILURE)
}

/// Whether a migration in this state may still change.
fn in_progress(state: &str) -> bool {
    matches!(state, "negotiating" | "running" | "resolving")
}

/// The line printed when a migration committed.
fn summary(id: &str, vm: &str, to: &str, m: &MigrationView) -> String {
    let p = m.progress.clone().unwrap_or_default();
    let over = if p.transport.is_empty() {
        String::new()
    } else {
        format!(", over {}", p.transport)
    };
    format!(
        "migration {id}: {vm} -> {to} committed in {}, downtime {}, sent {} in {} rounds ({} pages){over}",
        p.total_ms
            .map_or("-".into(), |t| format!("{:.2} s", t / 1e3)),
        p.downtime_ms.map_or("-".into(), |d| format!("{d:.1} ms")),
        mib(p.bytes_sent),
        p.rounds,
        p.pages_sent,
    )
}

/// What carried a migration, in a word: `tls×N` (N data connections), `stream` (the
/// migration's mesh stream, because no data connection could be made), `mesh` (QEMU channels
/// on mesh streams); `--json` has the whole text.
fn via(transport: &str) -> String {
    if let Some(rest) = transport.strip_prefix("data: ") {
        let n = rest.split(' ').next().unwrap_or("?");
        format!("tls×{n}")
    } else if transport.starts_with("stream") {
        "stream".into()
    } else if transport.starts_with("mesh") {
        "mesh".into()
    } else {
        "-".into()
    }
}

/// How `--watch` shows a running migration: a progress bar on a terminal, periodic plain
/// lines on stderr otherwise.
enum Watch {
    Bar(Bar),
    Lines {
        last: Option<(String, u32)>,
        printed_at: Option<Instant>,
    },
}

impl Watch {
    fn show(&mut self, m: &MigrationView) {
        match self {
            Watch::Bar(bar) => bar.show(m),
            Watch::Lines { last, printed_at } => {
                let p = m.progress.clone().unwrap_or_default();
                let now = (p.phase.clone(), p.rounds);
                let due = printed_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due || last.as_ref() != Some(&now) {
                    eprintln!("{}", line(m));
                    *last = Some(now);
                    *printed_at = Some(Instant::now());
                }
            }
        }
    }

    fn finish(&self) {
        if let Watch::Bar(bar) = self {
            bar.bar.finish_and_clear();
        }
    }
}

/// The bar: pages sent out of the pages known to need sending (the whole memory, plus each
/// later round's dirty pages as they become known).
struct Bar {
    bar: ProgressBar,
    work: Work,
}

impl Bar {
    fn new(memory_pages: Option<u64>) -> anyhow::Result<Self> {
        let bar = ProgressBar::with_draw_target(
            Some(memory_pages.unwrap_or(1) * PAGE),
            ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix:<15} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {msg}",
            )?
            .progress_chars("=> "),
        );
        bar.set_prefix("negotiating");
        bar.enable_steady_tick(Duration::from_millis(120));
        Ok(Self {
            bar,
            work: Work::new(memory_pages),
        })
    }

    fn show(&mut self, m: &MigrationView) {
        let p = m.progress.clone().unwrap_or_default();
        let (done, total) = self.work.update(&p);
        self.bar.set_prefix(shown_phase(m, &p));
        self.bar.set_length(total * PAGE);
        self.bar.set_position(done * PAGE);
        let eta = eta(total - done, &p).map_or("-".into(), |s| format!("{s:.1} s"));
        self.bar.set_message(format!(
            "round {}  sent {}  {:.1} MiB/s  dirty {}  downtime ~{:.1} ms  ETA {eta}{}",
            p.rounds,
            mib(p.bytes_sent),
            p.rate_bytes_per_s / (1024.0 * 1024.0),
            p.dirty_pages,
            p.expected_downtime_ms,
            convergence(&p).map_or(String::new(), |c| format!("  {c}")),
        ));
    }
}

const PAGE: u64 = drift_protocol::transfer::PAGE_SIZE as u64;

/// Seconds until `pages_left` more pages are sent, at the pages per second so far (zero pages
/// travel as markers, so the page rate, not the byte rate, says how long the rest takes).
/// Once pre-copy rounds run, the engine's own estimate (the dirty set at the link's rate less
/// the guest's), and none while the guest outruns the link.
fn eta(pages_left: u64, p: &Progress) -> Option<f64> {
    if let Some(ms) = p.eta_ms.filter(|_| p.phase == "copying") {
        return Some(ms / 1e3);
    }
    if p.rounds > 0 && p.dirty_rate_bytes_per_s >= p.rate_bytes_per_s {
        return None;
    }
    if p.pages_sent == 0 || p.bytes_sent == 0 || p.rate_bytes_per_s <= 0.0 {
        return None;
    }
    let pages_per_s = p.rate_bytes_per_s * p.pages_sent as f64 / p.bytes_sent as f64;
    Some(pages_left as f64 / pages_per_s)
}

/// Pages sent and pages to send in all, from the progress seen so far.
#[derive(Debug)]
struct Work {
    memory_pages: Option<u64>,
    /// Pages of every round after the first whose dirty count is known.
    later_rounds: u64,
    last_round: u32,
}

impl Work {
    fn new(memory_pages: Option<u64>) -> Self {
        Self {
            memory_pages,
            later_rounds: 0,
            last_round: 0,
        }
    }

    /// `(pages sent, pages to send in all)`; never less sent than in all.
    fn update(&mut self, p: &Progress) -> (u64, u64) {
        // Each later round starts with its dirty count; count each round once.
        if p.rounds > self.last_round {
            self.last_round = p.rounds;
            self.later_rounds += p.dirty_pages;
        }
        let total = match self.memory_pages {
            Some(m) => m + self.later_rounds,
            None => p.pages_sent + p.dirty_pages,
        };
        (p.pages_sent, total.max(p.pages_sent).max(1))
    }
}

pub(crate) fn migrations(a: MigrationsArgs) -> anyhow::Result<ExitCode> {
    let socket = a.target.socket()?;
    let v: MigrationsView = runtime()?.block_on(client::get(&socket, "/v1/migrations"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = v
        .migrations
        .iter()
        .map(|m| {
            let p = m.progress.clone().unwrap_or_default();
            vec![
                m.id.short(),
                m.vm.clone(),
                m.role.clone(),
                m.peer.short(),
                m.mode.to_string(),
                via(&p.transport),
                m.state.clone(),
                p.rounds.to_string(),
                mib(p.bytes_sent),
                p.downtime_ms.map_or("-".into(), |d| format!("{d:.1}ms")),
                p.total_ms
                    .map_or("-".into(), |t| format!("{:.1}s", t / 1000.0)),
                match (in_progress(&m.state), convergence(&p)) {
                    (true, Some(c)) => c,
                    _ => m.detail.clone(),
                },
            ]
        })
        .collect();
    print!(
        "{}",
        super::table::render(
            &[
                "ID", "VM", "ROLE", "PEER", "MODE", "VIA", "STATE", "ROUNDS", "SENT", "DOWNTIME",
                "TOTAL", "DETAIL"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(rounds: u32, pages_sent: u64, dirty_pages: u64) -> Progress {
        Progress {
            phase: "copying".into(),
            rounds,
            pages_sent,
            dirty_pages,
            ..Default::default()
        }
    }

    #[test]
    fn the_bar_counts_the_whole_memory_then_each_rounds_dirty_pages_once() {
        let mut w = Work::new(Some(1000));
        assert_eq!(w.update(&progress(0, 0, 0)), (0, 1000));
        assert_eq!(w.update(&progress(0, 600, 0)), (600, 1000));
        // Round 1 found 100 dirty pages; seen twice while it is sent.
        assert_eq!(w.update(&progress(1, 1000, 100)), (1000, 1100));
        assert_eq!(w.update(&progress(1, 1050, 100)), (1050, 1100));
        assert_eq!(w.update(&progress(2, 1100, 10)), (1100, 1110));
        // More sent than known (a round missed between two looks): never past the end.
        assert_eq!(w.update(&progress(2, 1200, 10)), (1200, 1200));
    }

    #[test]
    fn the_eta_follows_the_page_rate() {
        let mut p = progress(1, 1000, 0);
        assert_eq!(eta(10, &p), None);
        // 1000 pages in 2 MB at 1 MB/s: 500 pages a second.
        p.bytes_sent = 2_000_000;
        p.rate_bytes_per_s = 1_000_000.0;
        assert_eq!(eta(1000, &p), Some(2.0));
        assert_eq!(eta(0, &p), Some(0.0));
        // The engine's own estimate wins while rounds run...
        p.eta_ms = Some(1500.0);
        assert_eq!(eta(1000, &p), Some(1.5));
        // ...and there is none while the guest dirties faster than the link sends.
        p.eta_ms = None;
        p.dirty_rate_bytes_per_s = 2_000_000.0;
        assert_eq!(eta(1000, &p), None);
    }

    #[test]
    fn the_transport_is_named_in_a_word() {
        assert_eq!(via("data: 4 × TLS1.3 AES_256_GCM_SHA384"), "tls×4");
        assert_eq!(
            via("stream (no data connection: cannot reach 10.0.0.2:7401: refused)"),
            "stream"
        );
        assert_eq!(via("mesh streams (data plane off)"), "mesh");
        assert_eq!(via(""), "-");
    }

    #[test]
    fn without_the_memory_size_the_bar_follows_the_pages_left() {
        let mut w = Work::new(None);
        assert_eq!(w.update(&progress(0, 0, 0)), (0, 1));
        assert_eq!(w.update(&progress(3, 500, 20)), (500, 520));
    }
}
