//! `drift run`, and the commands that read a running daemon: `status`, `peers`, `table`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use drift_protocol::Timestamp;

use crate::config::Config;
use crate::control::{client, PeersView, StatusView, TableView};
use crate::daemon;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The node's configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
}

/// Which daemon to talk to.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The daemon's admin socket.
    #[arg(long, env = "DRIFT_SOCKET", conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// Read the socket path from this config file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// The socket used when neither --socket nor --config is given.
pub(crate) const DEFAULT_SOCKET: &str = "/var/lib/drift/drift.sock";

impl Target {
    pub(crate) fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(c) = &self.config {
            return Ok(Config::load(c)?.socket_path());
        }
        Ok(PathBuf::from(DEFAULT_SOCKET))
    }
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print JSON (stable shape, documented in the README).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TableArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// Redraw every second until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    runtime()?.block_on(async {
        let node = daemon::start(config).await?;
        daemon::stop_signal().await;
        tracing::info!("stopping");
        node.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

fn fmt_duration_ms(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

pub(crate) fn status(args: ReadArgs) -> anyhow::Result<ExitCode> {
    let socket = args.target.socket()?;
    let s: StatusView = runtime()?.block_on(client::get(&socket, "/v1/status"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rejected: Vec<String> = s
        .reports_rejected
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    let hosts = |k: &str| s.hosts.get(k).copied().unwrap_or(0);
    println!(
        "node        {} ({})",
        s.name.as_deref().unwrap_or("-"),
        s.node
    );
    println!(
        "cluster     {} (roster epoch {})",
        s.cluster, s.roster_epoch
    );
    println!("uptime      {}", fmt_duration_ms(s.uptime_ms));
    println!("listen      {}", s.listen.join(" "));
    println!("peers       {}", s.peers);
    println!(
        "hosts       {} alive, {} suspect, {} gone, {} unknown",
        hosts("alive"),
        hosts("suspect"),
        hosts("gone"),
        hosts("unknown")
    );
    println!(
        "reports     {} accepted, {} published, {} not published",
        s.reports_accepted, s.reports_published, s.publish_failures
    );
    println!(
        "rejected    {}",
        if rejected.is_empty() {
            "none".to_string()
        } else {
            rejected.join(" ")
        }
    );
    println!("denied      {} connections", s.connections_denied);
    println!(
        "rosters     {} adopted, {} refused",
        s.rosters_adopted, s.rosters_refused
    );
    let a = &s.admission;
    println!(
        "incoming    {} of {} slots ({} per source), {} MiB reserved, {} streams",
        a.slots_in_use, a.max_incoming, a.per_source, a.reserved_mib, s.incoming_streams
    );
    for b in &a.backed_off {
        let left = b.until.millis_since(crate::clock::now());
        println!(
            "backed off  {} for {} more (back-off {})",
            b.source,
            fmt_duration_ms(left),
            b.level
        );
    }
    if s.insecure_open {
        println!("WARNING     insecure_open: this node accepts connections from any peer");
    }
    if let Some(off) = &s.clock_off {
        println!("WARNING     {}", off.describe());
    }
    Ok(ExitCode::SUCCESS)
}

/// `drift metrics`: what `GET /metrics` serves, as Prometheus would scrape it.
pub(crate) fn metrics(args: Target) -> anyhow::Result<ExitCode> {
    let socket = args.socket()?;
    print!(
        "{}",
        runtime()?.block_on(client::get_text(&socket, "/metrics"))?
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn peers(args: ReadArgs) -> anyhow::Result<ExitCode> {
    let socket = args.target.socket()?;
    let v: PeersView = runtime()?.block_on(client::get(&socket, "/v1/peers"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = v
        .peers
        .iter()
        .map(|p| {
            vec![
                p.name.clone().unwrap_or_else(|| "-".into()),
                p.id.to_string(),
                p.direction.clone(),
                fmt_duration_ms(p.connected_for_ms),
                p.addresses.join(","),
            ]
        })
        .collect();
    print!(
        "{}",
        super::table::render(&["NAME", "ID", "DIRECTION", "UPTIME", "ADDRESSES"], &rows)
    );
    Ok(ExitCode::SUCCESS)
}

/// Renders `drift table` output.
pub(crate) fn render_table(v: &TableView) -> String {
    let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> =
        v.rows
            .iter()
            .map(|r| {
                vec![
                    format!("{}{}", r.name, if r.me { "*" } else { "" }),
                    r.id.short(),
                    if r.standby == Some(true) {
                        format!("{} standby", r.state)
                    } else {
                        r.state.to_string()
                    },
                    opt(r.age_ms.map(fmt_duration_ms)),
                    opt(r.cpu.map(|c| format!("{:.0}%", c * 100.0))),
                    opt(r.mem_used_mib.zip(r.mem_total_mib).map(|(u, t)| {
                        format!("{:.1}/{:.1}G", u as f64 / 1024.0, t as f64 / 1024.0)
                    })),
                    opt(r.power_watts.map(|w| {
                        format!(
                            "{w:.0}W{}",
                            if r.power_measured == Some(true) {
                                ""
                            } else {
                                "~"
                            }
                        )
                    })),
                    opt(r.vms.map(|n| n.to_string())),
                    // The VMs' CPU demand (what balancing acts on), and any reserved for
                    // accepted incoming migrations.
                    opt(r.vm_demand.map(|d| match r.reserved {
                        Some(res) if res > 0.0 => {
                            format!("{:.0}%+{:.0}%", d * 100.0, res * 100.0)
                        }
                        _ => format!("{:.0}%", d * 100.0),
                    })),
                    r.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect();
    super::table::render(
        &[
            "NAME", "ID", "STATE", "AGE", "CPU", "MEM", "POWER", "VMS", "DEMAND", "LABELS",
        ],
        &rows,
    )
}

pub(crate) fn table(args: TableArgs) -> anyhow::Result<ExitCode> {
    let socket = args.read.target.socket()?;
    let rt = runtime()?;
    loop {
        let v: TableView = rt.block_on(client::get(&socket, "/v1/table"))?;
        if args.read.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            if args.watch {
                print!("\x1b[2J\x1b[H");
                println!(
                    "drift table  (node {}, roster epoch {}, {})  Ctrl-C to stop\n",
                    v.node.short(),
                    v.roster_epoch,
                    Timestamp(crate::clock::now().as_millis())
                );
            }
            print!("{}", render_table(&v));
        }
        if !args.watch {
            return Ok(ExitCode::SUCCESS);
        }
        let stop = rt.block_on(async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => true,
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            }
        });
        if stop {
            return Ok(ExitCode::SUCCESS);
        }
    }
}
