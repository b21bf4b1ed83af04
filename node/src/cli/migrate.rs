//! `drift migrate` and `drift migrations`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use drift_protocol::migration::Mode;

use super::daemon::{runtime, Target};
use crate::control::{client, MigrationsView, StartMigration};
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
    /// Switch over once the remaining pages fit in this downtime (milliseconds).
    #[arg(long)]
    pub downtime_limit_ms: Option<u64>,
    /// Cap the transfer at this many MiB per second.
    #[arg(long)]
    pub bandwidth_mib: Option<u64>,
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

fn line(m: &MigrationView) -> String {
    let p = m.progress.clone().unwrap_or_default();
    format!(
        "{} {} -> {}  {:<10} round {:>2}  sent {:>8}  {:>7.1} MiB/s  dirty {:>6}  expected downtime {:>6.1} ms{}",
        m.id.short(),
        m.vm,
        m.peer.short(),
        if m.state == "running" { p.phase.clone() } else { m.state.clone() },
        p.rounds,
        mib(p.bytes_sent),
        p.rate_bytes_per_s / (1024.0 * 1024.0),
        p.dirty_pages,
        p.expected_downtime_ms,
        match (p.downtime_ms, p.total_ms) {
            (Some(d), Some(t)) => format!("  downtime {d:.1} ms, total {t:.0} ms"),
            _ => String::new(),
        }
    )
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
    // Bounded: a migration that outlives an hour is reported and left running.
    for _ in 0..(3600 * 5) {
        let v: MigrationsView = rt.block_on(client::get(&socket, "/v1/migrations"))?;
        let Some(m) = v.migrations.iter().find(|m| m.id.to_string() == id) else {
            anyhow::bail!("migration {id} is no longer listed");
        };
        eprint!("\r{}\x1b[K", line(m));
        match m.state.as_str() {
            "running" | "negotiating" => {}
            "committed" => {
                eprintln!();
                println!("{}", line(m));
                return Ok(ExitCode::SUCCESS);
            }
            other => {
                eprintln!();
                println!("migration {id} ended {other}: {}", m.detail);
                return Ok(ExitCode::FAILURE);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!();
    println!("migration {id} still running after an hour; see drift migrations");
    Ok(ExitCode::FAILURE)
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
                m.state.clone(),
                p.rounds.to_string(),
                mib(p.bytes_sent),
                p.downtime_ms.map_or("-".into(), |d| format!("{d:.1}ms")),
                p.total_ms
                    .map_or("-".into(), |t| format!("{:.1}s", t / 1000.0)),
                m.detail.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        super::table::render(
            &[
                "ID", "VM", "ROLE", "PEER", "MODE", "STATE", "ROUNDS", "SENT", "DOWNTIME", "TOTAL",
                "DETAIL"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}
