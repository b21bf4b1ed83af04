//! Shared harness of drift's integration tests: find the `drift` binary, run it, and wait for
//! conditions with deadlines instead of sleeps.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `drift` binary of this build: `$DRIFT_BIN`, or `drift` next to the test's `deps/`
/// directory (where `cargo test --workspace` puts it, since drift-node has integration tests).
pub fn drift_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DRIFT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("drift");
    assert!(
        bin.exists(),
        "{} not found: build it with `cargo build -p drift-node` or set DRIFT_BIN",
        bin.display()
    );
    bin
}

/// Runs `drift ARGS` to completion.
pub fn drift(args: &[&str]) -> Output {
    Command::new(drift_bin())
        .args(args)
        .env("DRIFT_LOG", "warn")
        .output()
        .expect("spawn drift")
}

/// stdout of a run that must succeed.
pub fn drift_ok(args: &[&str]) -> String {
    let out = drift(args);
    assert!(
        out.status.success(),
        "drift {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Rewrites the `bootstrap = [...]` list of a generated node config.
pub fn set_bootstrap(config: &std::path::Path, entries: &[String]) {
    let text = std::fs::read_to_string(config).expect("read config");
    let start = text
        .find("bootstrap = [")
        .expect("config has a bootstrap list");
    let end = start + text[start..].find("]\n").expect("bootstrap list ends") + 2;
    let list: Vec<String> = entries.iter().map(|e| format!("    \"{e}\",")).collect();
    let new = format!("bootstrap = [\n{}\n]\n", list.join("\n"));
    std::fs::write(config, format!("{}{}{}", &text[..start], new, &text[end..]))
        .expect("write config");
}

/// Appends TOML to a generated node config (new sections go after the generated ones).
pub fn append_config(config: &std::path::Path, extra: &str) {
    if extra.is_empty() {
        return;
    }
    let text = std::fs::read_to_string(config).expect("read config");
    std::fs::write(config, format!("{text}\n{extra}\n")).expect("write config");
}

/// Sets the `[data]` section's keys of a generated node config (each `key = value` line
/// replaces a line for the same key, or is added to the section).
pub fn set_data_config(config: &std::path::Path, entries: &[(&str, String)]) {
    let text = std::fs::read_to_string(config).expect("read config");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "[data]")
        .expect("config has a [data] section");
    for (key, value) in entries {
        let end = lines[start + 1..]
            .iter()
            .position(|l| l.trim_start().starts_with('['))
            .map_or(lines.len(), |p| start + 1 + p);
        let line = format!("{key} = {value}");
        match lines[start + 1..end]
            .iter()
            .position(|l| l.split('=').next().is_some_and(|k| k.trim() == *key))
        {
            Some(p) => lines[start + 1 + p] = line,
            None => lines.insert(start + 1, line),
        }
    }
    std::fs::write(config, lines.join("\n") + "\n").expect("write config");
}

/// The config of an outsider in `dir`: a member's generated config with the outsider's `key`,
/// state and socket of its own, `insecure_open` (it does not check the roster, so it tries to
/// connect), and any free mesh and data ports. Returns its path.
pub fn outsider_config(
    member_config: &std::path::Path,
    dir: &std::path::Path,
    key: &drift_protocol::SecretKey,
) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create the outsider's dir");
    drift_node::identity::write_key(
        &dir.join("node.key"),
        key,
        drift_node::durable::Overwrite::Refuse,
    )
    .expect("write the outsider's key");
    let mut text = std::fs::read_to_string(member_config)
        .expect("read the member's config")
        .replace(
            "key = \"node.key\"",
            &format!("key = \"{}\"", dir.join("node.key").display()),
        )
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"{}\"", dir.join("state").display()),
        )
        .replace(
            "socket = \"drift.sock\"",
            &format!("socket = \"{}\"", dir.join("o.sock").display()),
        )
        .replace("[node]\n", "[node]\ninsecure_open = true\n");
    let listen_start = text
        .find("listen = [")
        .expect("config has a mesh listen list");
    let listen_end = listen_start + text[listen_start..].find("]\n").expect("listen list ends") + 2;
    text.replace_range(
        listen_start..listen_end,
        "listen = [\"/ip4/127.0.0.1/tcp/0\"]\n",
    );
    let config = dir.join("drift.toml");
    std::fs::write(&config, text).expect("write the outsider's config");
    // The member's data port is the member's: the outsider takes any free one.
    set_data_config(&config, &[("listen", "\"127.0.0.1:0\"".into())]);
    config
}

/// An offer of a 1 MiB VM named `probe` from `source` to `target`, issued at `issued_at`, valid
/// for `ttl_ms`, asking for `data_connections`: what adversarial tests offer.
pub fn probe_offer(
    source: drift_protocol::NodeId,
    target: drift_protocol::NodeId,
    issued_at: drift_protocol::Timestamp,
    ttl_ms: u64,
    data_connections: u32,
) -> drift_protocol::MigrationOffer {
    use drift_protocol::migration::{Mode, Placement, VmSummary};
    use rand_core::OsRng;
    drift_protocol::MigrationOffer {
        id: drift_protocol::MigrationId::random(&mut OsRng),
        source,
        target,
        vm: VmSummary {
            id: drift_protocol::VmId::random(&mut OsRng),
            name: "probe".into(),
            memory_mib: 1,
            vcpus: 1,
            demand_permille: 10,
            placement: Placement::default(),
            qemu: None,
        },
        mode: Mode::PreCopy,
        nonce: [7; 16],
        issued_at,
        expires_at: issued_at.plus_millis(ttl_ms),
        roster_epoch: 1,
        data_connections,
    }
}

/// A stream of the mesh, as the adversarial tests speak on it.
pub type Stream = tokio_util::compat::Compat<libp2p::Stream>;

/// Opens a `proto` stream to `to` on `mesh`.
pub async fn open(
    mesh: &drift_node::mesh::Client,
    to: &drift_protocol::NodeId,
    proto: libp2p::StreamProtocol,
) -> Stream {
    use tokio_util::compat::FuturesAsyncReadCompatExt;
    let mut control = mesh.streams();
    tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(drift_node::mesh::peer_id(to), proto),
    )
    .await
    .expect("stream opens in time")
    .expect("stream opens")
    .compat()
}

/// Sends an offer on a new migration stream; returns the stream and the target's decision,
/// if it sent one.
pub async fn send_offer(
    mesh: &drift_node::mesh::Client,
    to: &drift_protocol::NodeId,
    signed: &drift_protocol::Signed<drift_protocol::MigrationOffer>,
) -> (Stream, Option<drift_protocol::MigrationDecision>) {
    use drift_node::migration::frames::{read_typed, write_typed};
    let mut s = open(mesh, to, drift_node::migration::service::PROTOCOL).await;
    write_typed(&mut s, signed).await.expect("offer sent");
    let decision = tokio::time::timeout(
        Duration::from_secs(10),
        read_typed::<_, drift_protocol::Signed<drift_protocol::MigrationDecision>>(
            &mut s,
            64 * 1024,
        ),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(|d| d.verify_by(to).expect("decision signed by the target"));
    (s, decision)
}

/// The `reason` of every audit event of kind `event` (`Refused`, `Abort`) in the log of the
/// node of `config`, oldest first.
pub fn audited(config: &std::path::Path, event: &str) -> Vec<String> {
    let config = config.to_str().expect("utf-8 path");
    drift_ok(&["audit", "show", "--json", "--config", config])
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(v["event"].get(event)?["reason"].as_str()?.to_string())
        })
        .collect()
}

/// Polls `cond` until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Forwards TCP connections on a loopback port to `to` (at most 16, one after another),
/// recording every byte of both directions in `seen`: a man in the middle on the wire between
/// two nodes. Returns the proxy's port.
pub async fn recording_proxy(to: u16, seen: Arc<Mutex<Vec<u8>>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("loopback proxy");
    let port = listener.local_addr().expect("loopback proxy").port();
    tokio::spawn(async move {
        // Bounded: the test makes a handful of connections.
        for _ in 0..16 {
            let Ok((inbound, _)) = listener.accept().await else {
                return;
            };
            let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                continue;
            };
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            type Half = (
                Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
            );
            let directions: [Half; 2] =
                [(Box::new(ir), Box::new(ow)), (Box::new(or), Box::new(iw))];
            for (mut r, mut w) in directions {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend_from_slice(&buf[..n]);
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    port
}

/// Two started, converged nodes whose only connections run through [`recording_proxy`]s, and
/// the recording: node-1 dials nobody, node-2 reaches node-1's mesh through one proxy, and each
/// node announces a proxy in front of its own data port, so data connections either way are
/// recorded too. The proxies live on `rt`; `extra_config` is appended to both nodes' configs.
pub fn tapped_pair(
    rt: &tokio::runtime::Runtime,
    extra_config: &str,
) -> (Cluster, Arc<Mutex<Vec<u8>>>) {
    let mut c = Cluster::generate(2, Duration::from_millis(300));
    for n in &c.nodes {
        append_config(&n.node.config, extra_config);
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let proxy = rt.block_on(recording_proxy(c.nodes[0].node.port, seen.clone()));
    for n in &c.nodes {
        let data = rt.block_on(recording_proxy(n.node.data_port, seen.clone()));
        set_data_config(
            &n.node.config,
            &[("advertise", format!("[\"127.0.0.1:{data}\"]"))],
        );
    }
    let node1_peer = drift_node::mesh::peer_id(&c.nodes[0].node.id);
    set_bootstrap(&c.nodes[0].node.config, &[]);
    set_bootstrap(
        &c.nodes[1].node.config,
        &[format!("/ip4/127.0.0.1/tcp/{proxy}/p2p/{node1_peer}")],
    );
    for n in &mut c.nodes {
        n.start();
    }
    c.wait_converged(Duration::from_secs(60))
        .expect("the tapped pair converges");
    (c, seen)
}

pub mod api;
pub mod compose;
pub use cluster::{Cluster, NodeProc};

/// Real `drift run` processes on loopback, started from a generated testnet directory.
pub mod cluster {
    use std::fs;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use drift_node::control::{client, StatusView, TableView};
    use drift_node::testnet::{self, TestnetNode};
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    use super::{drift_bin, wait_until};

    /// One `drift run` process.
    #[derive(Debug)]
    pub struct NodeProc {
        pub node: TestnetNode,
        child: Option<Child>,
    }

    impl NodeProc {
        /// Starts the process (logs to `drift.log` in the node's directory).
        pub fn start(&mut self) {
            self.start_with_env(&[]);
        }

        /// Starts the process with extra environment variables (e.g. `DRIFT_FAULT`).
        pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
            assert!(self.child.is_none(), "{} already running", self.node.name);
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.node.dir.join("drift.log"))
                .expect("open log");
            let child = Command::new(drift_bin())
                .arg("run")
                .arg("--config")
                .arg(&self.node.config)
                .env(
                    "DRIFT_LOG",
                    std::env::var("DRIFT_TEST_LOG").unwrap_or_else(|_| "info,libp2p=warn".into()),
                )
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log"))
                .stderr(log)
                .spawn()
                .expect("spawn drift run");
            self.child = Some(child);
        }

        /// kill -9.
        pub fn kill9(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        /// SIGTERM and wait; returns whether it exited cleanly within `timeout`.
        pub fn terminate(&mut self, timeout: Duration) -> bool {
            let Some(mut c) = self.child.take() else {
                return false;
            };
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let status = wait_until(timeout, Duration::from_millis(50), || {
                c.try_wait().ok().flatten()
            });
            match status {
                Some(s) => s.success(),
                None => {
                    let _ = c.kill();
                    let _ = c.wait();
                    false
                }
            }
        }

        /// The node's state directory.
        pub fn state_dir(&self) -> PathBuf {
            self.node.dir.join("state")
        }

        /// Whether the process is still running.
        pub fn running(&mut self) -> bool {
            self.child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        }

        /// The last lines of the node's log, for failure messages.
        pub fn log_tail(&self) -> String {
            self.log_tail_lines(15)
        }

        /// The last `n` lines of the node's log.
        pub fn log_tail_lines(&self, n: usize) -> String {
            let text = fs::read_to_string(self.node.dir.join("drift.log")).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
    }

    /// A testnet of processes; every process is killed when this is dropped, even on failure.
    #[derive(Debug)]
    pub struct Cluster {
        pub dir: tempfile::TempDir,
        pub nodes: Vec<NodeProc>,
        rt: tokio::runtime::Runtime,
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            // A failing test shows what its nodes said last (their directories go with it).
            if std::thread::panicking() {
                for n in &self.nodes {
                    eprintln!(
                        "--- {}: the end of drift.log ---\n{}",
                        n.node.name,
                        n.log_tail_lines(60)
                    );
                }
            }
            for n in &mut self.nodes {
                n.kill9();
                // QEMU VMs run daemonized and outlive their node, as they should; a test's
                // must not outlive the test. (Sandbox VMMs end when their directory goes.)
                let vms = n.state_dir().join("vms");
                for vm in fs::read_dir(&vms).into_iter().flatten().flatten() {
                    let pid = fs::read_to_string(vm.path().join("qemu.pid"))
                        .ok()
                        .and_then(|p| p.trim().parse::<i32>().ok());
                    if let Some(pid) = pid {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
        }
    }

    impl Cluster {
        /// Generates a testnet of `n` nodes reporting every `interval` (suspect after 5
        /// intervals, gone after 15) and starts them all.
        pub fn start(n: usize, interval: Duration) -> Self {
            let mut c = Self::generate(n, interval);
            for node in &mut c.nodes {
                node.start();
            }
            c
        }

        /// Generates the testnet directory without starting anything.
        pub fn generate(n: usize, interval: Duration) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let nodes = testnet::generate(dir.path(), n, 0, interval)
                .expect("generate testnet")
                .into_iter()
                .map(|node| NodeProc { node, child: None })
                .collect();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            Self { dir, nodes, rt }
        }

        /// The testnet directory.
        pub fn path(&self) -> PathBuf {
            self.dir.path().to_owned()
        }

        /// `GET /v1/table` of node `i`.
        pub fn table(&self, i: usize) -> Option<TableView> {
            self.rt
                .block_on(client::get(&self.nodes[i].node.socket, "/v1/table"))
                .ok()
        }

        /// `GET /v1/status` of node `i`.
        pub fn status(&self, i: usize) -> Option<StatusView> {
            self.rt
                .block_on(client::get(&self.nodes[i].node.socket, "/v1/status"))
                .ok()
        }

        /// Waits until the tables of nodes `which` hold `expect` nodes alive.
        pub fn wait_converged_subset(
            &self,
            which: &[usize],
            expect: usize,
            timeout: Duration,
        ) -> Result<(), String> {
            let alive = |i: usize| {
                self.table(i).map(|t| {
                    t.rows
                        .iter()
                        .filter(|r| r.state == drift_node::table::Liveness::Alive)
                        .count()
                })
            };
            wait_until(timeout, Duration::from_millis(200), || {
                which
                    .iter()
                    .all(|&i| alive(i) == Some(expect))
                    .then_some(())
            })
            .ok_or_else(|| {
                let seen: Vec<_> = which.iter().map(|&i| (i, alive(i))).collect();
                format!("no convergence: alive counts {seen:?}")
            })
        }

        /// Waits until every running node's table holds every node alive.
        pub fn wait_converged(&self, timeout: Duration) -> Result<(), String> {
            let nodes: Vec<TestnetNode> = self.nodes.iter().map(|n| n.node.clone()).collect();
            let mut last = String::new();
            wait_until(timeout, Duration::from_millis(200), || {
                match self.rt.block_on(testnet::converged(&nodes)) {
                    Ok(_) => Some(()),
                    Err(e) => {
                        last = e;
                        None
                    }
                }
            })
            .ok_or_else(|| {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- {}:\n{}", n.node.name, n.log_tail()))
                    .collect();
                format!("no convergence: {last}\n{}", logs.join("\n"))
            })
        }
    }
}
