//! `drift testnet`: a whole cluster on this machine.
//!
//! Creates (or reuses) a directory with an admin key, one key per node, a roster signed by the
//! admin and one config per node; starts one `drift run` process per node on 127.0.0.1; waits
//! until every node's table holds every node alive; prints the table; starts the sandbox VMs
//! (`--vms-per-node K`, spread unevenly with `--skew S` so the balancing autopilot has work);
//! then runs until Ctrl-C (or, with `--check`, exits). Children are stopped with SIGTERM (SIGKILL after a grace
//! period), and the directory is left ready for the next run: keys are kept, configs and the
//! roster are rewritten.
//!
//! Layout of the directory:
//!
//! ```text
//! DIR/admin.key  DIR/roster.toml  DIR/roster
//! DIR/node-1/{node.key, drift.toml, drift.log, drift.sock, state/}
//! ```

use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use drift_protocol::{NodeId, SecretKey};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand_core::OsRng;
use tokio::process::{Child, Command};

use crate::control::{client, TableView};
use crate::durable::{write_atomic, Overwrite};
use crate::identity::{self, DraftMember, RosterDraft};
use crate::table::Liveness;

/// At most this many nodes on one machine.
pub const MAX_NODES: usize = 64;

#[derive(Debug, Args)]
pub struct TestnetArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 5)]
    pub nodes: usize,
    /// Directory for keys, roster, configs, logs and state (reused across runs).
    #[arg(long, default_value = "drift-testnet")]
    pub dir: PathBuf,
    /// First TCP port (node i's mesh listens on base + i - 1, its data plane on base + N +
    /// i - 1); 0 picks free ports.
    #[arg(long, default_value_t = 0)]
    pub base_port: u16,
    /// Wait for full convergence, print the table and exit (0 on success).
    #[arg(long)]
    pub check: bool,
    /// How long to wait for convergence.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Report interval of every node.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Only write keys, roster and configs; start nothing.
    #[arg(long)]
    pub generate_only: bool,
    /// Sandbox VMs to start on every node once the cluster has converged.
    #[arg(long, default_value_t = 0)]
    pub vms_per_node: usize,
    /// Memory of each testnet VM.
    #[arg(long, default_value_t = 64)]
    pub vm_memory_mib: u64,
    /// Uneven placement of the nodes × vms-per-node VMs: node i gets a share proportional
    /// to (1 − skew)^i (0: even; 1: all on node-1), so the balancing autopilot has work to do
    /// (watch it with `drift table --watch`, `drift migrations` and `drift decisions`).
    #[arg(long, default_value_t = 0.0)]
    pub skew: f64,
}

/// One VM a testnet starts.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedVm {
    /// Index of the node it starts on.
    pub node: usize,
    pub name: String,
    /// CPU demand, fraction of a host.
    pub demand: f64,
}

/// The VMs of a testnet of `nodes` nodes: `nodes × per_node` VMs, node i getting a share
/// proportional to `(1 − skew)^i` ([`drift_protocol::policy::cluster::skewed_counts`]), each
/// with a demand of 5% to 25% of a host (mean 15%), named `vm-<node>-<k>`. With `skew` 0
/// every node gets `per_node`.
pub fn plan_vms(nodes: usize, per_node: usize, skew: f64) -> Vec<PlannedVm> {
    let counts =
        drift_protocol::policy::cluster::skewed_counts(nodes.saturating_mul(per_node), nodes, skew);
    let mut out = Vec::new();
    let mut g = 0usize;
    for (i, count) in counts.into_iter().enumerate() {
        for k in 0..count {
            out.push(PlannedVm {
                node: i,
                name: format!("vm-{}-{}", i + 1, k + 1),
                demand: 0.05 + 0.2 * (g % 5) as f64 / 4.0,
            });
            g += 1;
        }
    }
    out
}

/// Starts the planned VMs (skipping names that already exist on their node).
async fn start_vms(
    nodes: &[TestnetNode],
    plan: &[PlannedVm],
    memory_mib: u64,
) -> anyhow::Result<()> {
    for (i, n) in nodes.iter().enumerate() {
        let existing: crate::control::VmsView = client::get(&n.socket, "/v1/vms").await?;
        for vm in plan.iter().filter(|v| v.node == i) {
            if existing.vms.iter().any(|v| v.name == vm.name) {
                continue;
            }
            let req = crate::control::CreateVm {
                name: vm.name.clone(),
                memory_mib,
                vcpus: 1,
                demand: vm.demand,
                dirty_mib_per_s: 2.0,
                page_random_pct: None,
                jurisdictions: Vec::new(),
                regions: Vec::new(),
                anti_affinity: None,
                qemu: None,
            };
            let _: crate::hypervisor::VmView =
                client::post(&n.socket, "/v1/vms", serde_json::to_vec(&req)?).await?;
        }
    }
    Ok(())
}

/// Destroys every VM of every node that answers.
async fn destroy_vms(nodes: &[TestnetNode]) {
    for n in nodes {
        if let Ok(v) = client::get::<crate::control::VmsView>(&n.socket, "/v1/vms").await {
            for vm in v.vms {
                let path = format!("/v1/vms/{}", vm.id);
                let _ = client::delete::<serde_json::Value>(&n.socket, &path).await;
            }
        }
    }
}

/// One node of a generated testnet.
#[derive(Debug, Clone)]
pub struct TestnetNode {
    pub name: String,
    pub id: NodeId,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    /// The data plane's port (`[data] listen`).
    pub data_port: u16,
}

const REGIONS: [(&str, &str); 3] = [("eu-west", "fr"), ("eu-central", "de"), ("us-east", "us")];

fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    // Hold every listener until all ports are known, so no port is handed out twice.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("finding free ports on 127.0.0.1")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn key_at(path: &Path) -> anyhow::Result<SecretKey> {
    if path.exists() {
        return Ok(identity::read_key(path)?);
    }
    let key = SecretKey::generate(&mut OsRng);
    identity::write_key(path, &key, Overwrite::Refuse)?;
    Ok(key)
}

/// Writes (or refreshes) a testnet directory: keys, roster and configs.
pub fn generate(
    dir: &Path,
    nodes: usize,
    base_port: u16,
    interval: Duration,
) -> anyhow::Result<Vec<TestnetNode>> {
    generate_with(dir, nodes, base_port, interval, Topology::Full)
}

/// Whom each node dials at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Every other node (small testnets).
    Full,
    /// A ring plus two chords per node: connected, and at most about 8 connections per node
    /// (large in-process clusters).
    Sparse,
}

fn neighbours(i: usize, n: usize, topology: Topology) -> Vec<usize> {
    match topology {
        Topology::Full => (0..n).filter(|&j| j != i).collect(),
        Topology::Sparse => {
            let mut v: Vec<usize> = [i + 1, i + n - 1, i + n / 2, i * 7 + 3]
                .iter()
                .map(|j| j % n)
                .filter(|&j| j != i)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        }
    }
}

/// [`generate`] with a choice of bootstrap topology.
pub fn generate_with(
    dir: &Path,
    nodes: usize,
    base_port: u16,
    interval: Duration,
    topology: Topology,
) -> anyhow::Result<Vec<TestnetNode>> {
    if nodes == 0 || nodes > MAX_NODES {
        bail!("--nodes must be between 1 and {MAX_NODES}");
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let admin = key_at(&dir.join("admin.key"))?;
    // Mesh ports first, then the data ports.
    let ports = if base_port == 0 {
        free_ports(2 * nodes)?
    } else {
        (0..2 * nodes)
            .map(|i| {
                base_port
                    .checked_add(i as u16)
                    .context("--base-port + 2 x --nodes exceeds 65535")
            })
            .collect::<anyhow::Result<_>>()?
    };
    let (ports, data_ports) = ports.split_at(nodes);
    let mut out = Vec::new();
    for (i, (port, data_port)) in ports.iter().zip(data_ports).enumerate() {
        let name = format!("node-{}", i + 1);
        let ndir = dir.join(&name);
        fs::create_dir_all(&ndir)?;
        let key = key_at(&ndir.join("node.key"))?;
        out.push(TestnetNode {
            name,
            id: key.public(),
            config: ndir.join("drift.toml"),
            socket: ndir.join("drift.sock"),
            dir: ndir,
            port: *port,
            data_port: *data_port,
        });
    }
    let draft = RosterDraft {
        admins: Vec::new(),
        threshold: None,
        cluster: "testnet".into(),
        members: out
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let (region, jurisdiction) = REGIONS[i % REGIONS.len()];
                DraftMember {
                    name: n.name.clone(),
                    id: n.id,
                    roles: vec!["host".into()],
                    cpus: 16,
                    mem_mib: 64 * 1024,
                    labels: [
                        ("region".to_string(), region.to_string()),
                        ("jurisdiction".to_string(), jurisdiction.to_string()),
                    ]
                    .into(),
                }
            })
            .collect(),
    };
    identity::write_draft(&dir.join("roster.toml"), &draft, Overwrite::Replace)?;
    let now = crate::clock::now();
    let roster = draft.to_roster(1, None, now, now.plus_millis(365 * 86_400_000))?;
    identity::write_signed_roster(
        &dir.join("roster"),
        &drift_protocol::roster::Endorsed::sign(&roster, &admin),
        Overwrite::Replace,
    )?;
    for (i, n) in out.iter().enumerate() {
        // Spread the nodes' synthetic load from light to heavy, so the table is interesting.
        let cpu = if nodes == 1 {
            0.4
        } else {
            0.1 + 0.8 * i as f64 / (nodes - 1) as f64
        };
        let mut bootstrap = String::new();
        for other in neighbours(i, nodes, topology).into_iter().map(|j| &out[j]) {
            let peer = crate::mesh::peer_id(&other.id);
            let _ = writeln!(
                bootstrap,
                "    \"/ip4/127.0.0.1/tcp/{}/p2p/{peer}\",",
                other.port
            );
        }
        let config = format!(
            "# drift testnet node {name}: generated by `drift testnet`; rewritten on every run.\n\
             [node]\n\
             key = \"node.key\"\n\
             roster = \"../roster\"\n\
             admin = \"{admin}\"\n\
             state_dir = \"state\"\n\
             listen = [\"/ip4/127.0.0.1/tcp/{port}\"]\n\
             bootstrap = [\n{bootstrap}]\n\n\
             [control]\n\
             socket = \"drift.sock\"\n\n\
             [data]\n\
             listen = \"127.0.0.1:{data_port}\"\n\n\
             [load]\n\
             interval = \"{interval}\"\n\
             source = \"synthetic\"\n\
             synthetic_cpu = {cpu:.2}\n\
             synthetic_wave = 0.05\n\
             synthetic_mem_mib = 65536\n\n\
             [gossip]\n\
             suspect_after = \"{suspect}\"\n\
             gone_after = \"{gone}\"\n\n\
             [balance]\n\
             interval = \"{interval}\"\n",
            name = n.name,
            admin = admin.public(),
            port = n.port,
            data_port = n.data_port,
            interval = humantime::format_duration(interval),
            suspect = humantime::format_duration(interval * 5),
            gone = humantime::format_duration(interval * 15),
        );
        write_atomic(&n.config, config.as_bytes(), 0o644, Overwrite::Replace)
            .with_context(|| format!("writing {}", n.config.display()))?;
    }
    Ok(out)
}

/// Whether every table holds every node alive; `Err` lists what is missing.
pub async fn converged(nodes: &[TestnetNode]) -> Result<TableView, String> {
    let mut missing = Vec::new();
    let mut first = None;
    for n in nodes {
        match client::get::<TableView>(&n.socket, "/v1/table").await {
            Ok(t) => {
                let alive = t.rows.iter().filter(|r| r.state == Liveness::Alive).count();
                if alive != nodes.len() {
                    let lacking: Vec<&str> = t
                        .rows
                        .iter()
                        .filter(|r| r.state != Liveness::Alive)
                        .map(|r| r.name.as_str())
                        .collect();
                    missing.push(format!("{} lacks {}", n.name, lacking.join(",")));
                }
                first.get_or_insert(t);
            }
            Err(_) => missing.push(format!("{} is not answering", n.name)),
        }
    }
    match (missing.is_empty(), first) {
        (true, Some(t)) => Ok(t),
        _ => Err(missing.join("; ")),
    }
}

fn stop_children(children: &mut [(String, Child)]) {
    for (_, c) in children.iter() {
        if let Some(pid) = c.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
}

async fn reap(children: &mut Vec<(String, Child)>) {
    stop_children(children);
    let deadline = Instant::now() + Duration::from_secs(10);
    for (name, c) in children.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c.wait()).await.is_err() {
            eprintln!("{name} did not stop in time; killing it");
            let _ = c.kill().await;
        }
    }
    children.clear();
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

pub(crate) fn run(args: TestnetArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&args.skew) {
        bail!("--skew must be between 0.0 and 1.0");
    }
    let nodes = generate(&args.dir, args.nodes, args.base_port, args.interval)?;
    let dir = args.dir.canonicalize()?;
    if args.generate_only {
        println!(
            "wrote testnet of {} nodes in {}",
            nodes.len(),
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe().context("locating the drift binary")?;
    crate::cli::daemon_runtime()?.block_on(async {
        let mut children = Vec::new();
        for n in &nodes {
            let log = fs::File::create(n.dir.join("drift.log"))?;
            let child = Command::new(&exe)
                .arg("run")
                .arg("--config")
                .arg(&n.config)
                .env("DRIFT_LOG", std::env::var("DRIFT_LOG").unwrap_or_else(|_| "info".into()))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", n.name))?;
            children.push((n.name.clone(), child));
        }
        eprintln!(
            "started {} nodes in {} (logs: node-*/drift.log); waiting for convergence...",
            nodes.len(),
            dir.display()
        );
        let started = Instant::now();
        let outcome = loop {
            if let Some(name) = exited(&mut children) {
                let tail = log_tail(&dir.join(&name).join("drift.log"));
                break Err(format!("{name} exited early; last log lines:\n{tail}"));
            }
            match converged(&nodes).await {
                Ok(t) => break Ok(t),
                Err(missing) if started.elapsed() > args.timeout => break Err(missing),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        let table = match outcome {
            Ok(t) => t,
            Err(missing) => {
                eprintln!(
                    "no convergence after {:.1}s: {missing}",
                    started.elapsed().as_secs_f64()
                );
                reap(&mut children).await;
                return Ok(ExitCode::FAILURE);
            }
        };
        println!(
            "converged: {} nodes, every table holds every node ({:.1}s)\n",
            nodes.len(),
            started.elapsed().as_secs_f64()
        );
        print!("{}", crate::cli::render_table(&table));
        if args.vms_per_node > 0 {
            let plan = plan_vms(nodes.len(), args.vms_per_node, args.skew);
            if let Err(e) = start_vms(&nodes, &plan, args.vm_memory_mib).await {
                eprintln!("could not start the testnet's VMs: {e:#}");
                destroy_vms(&nodes).await;
                reap(&mut children).await;
                return Ok(ExitCode::FAILURE);
            }
            if args.skew > 0.0 {
                let per: Vec<String> = (0..nodes.len())
                    .map(|i| {
                        let on = plan.iter().filter(|v| v.node == i);
                        let demand: f64 = on.clone().map(|v| v.demand).sum();
                        format!("{} {} ({:.0}%)", nodes[i].name, on.count(), demand * 100.0)
                    })
                    .collect();
                println!(
                    "\nstarted {} sandbox VMs, skew {}: {}",
                    plan.len(),
                    args.skew,
                    per.join(", ")
                );
            } else {
                println!(
                    "\nstarted {} sandbox VMs per node (drift vms --socket ...)",
                    args.vms_per_node
                );
            }
        }
        if args.check {
            destroy_vms(&nodes).await;
            reap(&mut children).await;
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "\nwatch it:  drift table --watch --socket {}\n           drift peers --socket {}\n           drift migrations --socket {}\n           drift decisions --socket {}\nCtrl-C stops every node.",
            nodes[0].socket.display(),
            nodes[0].socket.display(),
            nodes[0].socket.display(),
            nodes[0].socket.display()
        );
        let code = tokio::select! {
            _ = crate::daemon::stop_signal() => ExitCode::SUCCESS,
            name = wait_any_exit(&mut children) => {
                eprintln!("{name} exited; stopping the testnet");
                ExitCode::FAILURE
            }
        };
        eprintln!("stopping {} nodes and their VMs...", children.len());
        destroy_vms(&nodes).await;
        reap(&mut children).await;
        eprintln!("stopped; {} is ready for the next run", dir.display());
        Ok(code)
    })
}

/// The name of a child that has exited, if any.
fn exited(children: &mut [(String, Child)]) -> Option<String> {
    children
        .iter_mut()
        .find_map(|(name, c)| matches!(c.try_wait(), Ok(Some(_))).then(|| name.clone()))
}

async fn wait_any_exit(children: &mut [(String, Child)]) -> String {
    loop {
        if let Some(name) = exited(children) {
            return name;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_plans_are_even_without_skew_and_front_loaded_with_it() {
        let even = plan_vms(4, 3, 0.0);
        assert_eq!(even.len(), 12);
        for i in 0..4 {
            assert_eq!(even.iter().filter(|v| v.node == i).count(), 3);
        }
        assert_eq!(even[0].name, "vm-1-1");
        let skewed = plan_vms(6, 4, 0.5);
        assert_eq!(skewed.len(), 24);
        let counts: Vec<usize> = (0..6)
            .map(|i| skewed.iter().filter(|v| v.node == i).count())
            .collect();
        assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
        assert!(counts[0] > 4 * 2, "{counts:?}");
        assert!(skewed.iter().all(|v| (0.05..=0.25).contains(&v.demand)));
        let mut names: Vec<&str> = skewed.iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 24, "names are unique");
    }
}
