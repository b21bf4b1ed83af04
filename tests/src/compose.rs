//! drift's compose lab cluster (`deploy/compose.yaml`) driven through the docker CLI, for the
//! deployment tests: the image from `deploy/image/build.sh`, keys and roster from
//! `deploy/compose-init.sh`, then `docker exec <node> drift ...` to read and steer the nodes.
//!
//! Every [`ComposeCluster`] has its own compose project name, and dropping it removes
//! everything the project made (containers, volumes, network), also when the test panicked.
//! Every docker command runs with a deadline.
//!
//! Without a Docker daemon or a Compose tool, [`docker_or_skip`] prints why and the test
//! returns; under `CI=true` that is a failure instead, and so is a missing image (CI builds it
//! in a step of its own). Outside CI the image is built (or found fresh) by the build script
//! once per test process, so the tests never run a stale binary.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::wait_until;

/// The image the tests run: `$DRIFT_IMAGE`, else `drift:dev` (what the build script tags).
pub fn image() -> String {
    std::env::var("DRIFT_IMAGE").unwrap_or_else(|_| "drift:dev".into())
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

/// Whether this is a CI run (`CI=true`), where a missing piece is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Runs a command to completion, killing it after `timeout`. `Err` says what went wrong.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    // Drain both pipes on threads, so a chatty command never blocks on a full pipe.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let status = wait_until(timeout, Duration::from_millis(20), || {
        child.try_wait().ok().flatten()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{what}: still running after {timeout:?}; killed"));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// stdout of a command that must succeed within `timeout`.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let out = run(cmd, timeout)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn docker(args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.args(args);
    c
}

/// The Docker CLI and whichever Compose tool is installed.
#[derive(Debug, Clone)]
pub struct Docker {
    /// `["docker", "compose"]` or `["docker-compose"]`.
    compose: Vec<String>,
}

/// Why the cluster tests cannot run here, or `Ok` with the Docker CLI and a fresh image.
fn probe() -> Result<Docker, String> {
    let info = run(
        &mut docker(&["info", "--format", "{{.ServerVersion}}"]),
        Duration::from_secs(30),
    )
    .map_err(|e| format!("no docker CLI: {e}"))?;
    if !info.status.success() {
        return Err(format!(
            "no Docker daemon answers: {}",
            String::from_utf8_lossy(&info.stderr).trim()
        ));
    }
    let plugin = run(
        &mut docker(&["compose", "version"]),
        Duration::from_secs(30),
    );
    let compose = if plugin.is_ok_and(|o| o.status.success()) {
        vec!["docker".to_string(), "compose".to_string()]
    } else if run(
        Command::new("docker-compose").arg("version"),
        Duration::from_secs(30),
    )
    .is_ok_and(|o| o.status.success())
    {
        vec!["docker-compose".to_string()]
    } else {
        return Err("neither `docker compose` nor `docker-compose` is installed".into());
    };
    Ok(Docker { compose })
}

/// Makes sure the image exists and matches this source tree: in CI it must already exist (a
/// step of `.ci/run` builds it); elsewhere the build script runs (quick when nothing changed).
fn ensure_image() -> Result<(), String> {
    let tag = image();
    if in_ci() {
        return run_ok(
            &mut docker(&["image", "inspect", "--format", "{{.Id}}", &tag]),
            Duration::from_secs(30),
        )
        .map(|_| ())
        .map_err(|_| format!("no image {tag}: .ci/run builds it with deploy/image/build.sh"));
    }
    eprintln!("building {tag} with deploy/image/build.sh (a no-op when it is fresh)...");
    let started = Instant::now();
    run_ok(
        Command::new(repo_root().join("deploy/image/build.sh")).arg(&tag),
        Duration::from_secs(1800),
    )
    .map(|out| eprintln!("{out}({:.0}s)", started.elapsed().as_secs_f64()))
}

/// The Docker CLI, once per test process; `None` (after printing why) when the cluster tests
/// cannot run here. Under `CI=true` a missing daemon, Compose tool or image panics instead.
pub fn docker_or_skip(test: &str) -> Option<Docker> {
    static PROBE: OnceLock<Result<Docker, String>> = OnceLock::new();
    let probed = PROBE.get_or_init(|| {
        let d = probe()?;
        ensure_image().map_err(|e| format!("IMAGE: {e}"))?;
        Ok(d)
    });
    match probed {
        Ok(d) => Some(d.clone()),
        Err(e) if e.starts_with("IMAGE: ") => panic!("{test}: {e}"),
        Err(e) if in_ci() => panic!("{test}: CI=true and {e}"),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            None
        }
    }
}

/// One compose cluster at a time per test process: they share two cores, and liveness and
/// migration timings are in seconds.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A compose project of the lab cluster. Dropping it removes everything it made.
#[derive(Debug)]
pub struct ComposeCluster {
    docker: Docker,
    /// The compose project name, unique per cluster.
    pub project: String,
    /// The admin's directory: `admin.key`, `roster.toml`, `roster`.
    pub admin_dir: tempfile::TempDir,
    /// The admin's public id.
    pub admin_id: String,
    /// Service name to container id.
    containers: BTreeMap<String, String>,
    /// The node services, in order: node-1 ... node-5.
    pub nodes: Vec<String>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        // Containers started outside compose first (they would keep the network in use).
        let label = format!("label=com.docker.compose.project={}", self.project);
        let stray = |kind: &[&str]| -> Vec<String> {
            let mut args = kind.to_vec();
            args.extend(["--filter", &label]);
            run_ok(&mut docker(&args), Duration::from_secs(60))
                .map(|o| o.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        let remove = |what: &[&str], ids: Vec<String>| {
            if !ids.is_empty() {
                let mut args = what.to_vec();
                args.extend(ids.iter().map(String::as_str));
                let _ = run(&mut docker(&args), Duration::from_secs(120));
            }
        };
        let outside: Vec<String> = stray(&["ps", "-aq"])
            .into_iter()
            .filter(|id| !self.containers.values().any(|c| c.starts_with(id.as_str())))
            .collect();
        remove(&["rm", "-fv"], outside);
        let _ = run(
            &mut self.compose(&["down", "--volumes", "--remove-orphans", "--timeout", "5"]),
            Duration::from_secs(180),
        );
        // Whatever compose left behind.
        remove(&["rm", "-fv"], stray(&["ps", "-aq"]));
        remove(&["volume", "rm", "-f"], stray(&["volume", "ls", "-q"]));
        remove(&["network", "rm"], stray(&["network", "ls", "-q"]));
    }
}

impl ComposeCluster {
    /// Creates the project and runs `deploy/compose-init.sh` on it: network, volumes, stopped
    /// containers, keys, roster and configs. Nothing runs yet.
    pub fn init(docker: &Docker) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let project = format!(
            "drift-test-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = Self {
            docker: docker.clone(),
            project,
            admin_dir: tempfile::tempdir().expect("admin dir"),
            admin_id: String::new(),
            containers: BTreeMap::new(),
            nodes: Vec::new(),
            _turn: turn,
        };
        let started = Instant::now();
        let out = run_ok(
            Command::new(repo_root().join("deploy/compose-init.sh"))
                .args(["-p", &c.project, "--image", &image(), "--admin-dir"])
                .arg(c.admin_dir.path())
                .env("DRIFT_IMAGE", image()),
            Duration::from_secs(600),
        )
        .unwrap_or_else(|e| panic!("compose-init.sh: {e}"));
        // Its last lines: "cluster P ready: N nodes, admin <id> (key in DIR)", "start it: ...".
        c.admin_id = out
            .split_whitespace()
            .skip_while(|w| *w != "admin")
            .nth(1)
            .unwrap_or_else(|| panic!("no admin id in the output of compose-init.sh: {out}"))
            .to_string();
        eprintln!(
            "{}: {} ({:.1}s)",
            c.project,
            out.trim(),
            started.elapsed().as_secs_f64()
        );
        let services = run_ok(
            &mut c.compose(&["config", "--services"]),
            Duration::from_secs(60),
        )
        .expect("compose config");
        c.nodes = services
            .split_whitespace()
            .filter(|s| s.starts_with("node-"))
            .map(str::to_string)
            .collect();
        c.nodes
            .sort_by_key(|s| s.trim_start_matches("node-").parse::<u32>().unwrap_or(0));
        for svc in c.nodes.clone() {
            let id = c.container_of(&svc);
            c.containers.insert(svc, id);
        }
        c
    }

    /// The compose command of this project (`restart: "no"` is the lab default).
    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.docker.compose[0]);
        cmd.args(&self.docker.compose[1..])
            .args(["-p", &self.project, "-f"])
            .arg(repo_root().join("deploy/compose.yaml"))
            .args(args)
            .env("DRIFT_IMAGE", image());
        cmd
    }

    fn container_of(&self, service: &str) -> String {
        let out = run_ok(
            &mut docker(&[
                "ps",
                "-aq",
                "--no-trunc",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.project),
                "--filter",
                &format!("label=com.docker.compose.service={service}"),
            ]),
            Duration::from_secs(60),
        )
        .expect("docker ps");
        let ids: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(ids.len(), 1, "containers of {service}: {ids:?}");
        ids[0].to_string()
    }

    /// The container id of a node service.
    pub fn container(&self, node: &str) -> &str {
        self.containers
            .get(node)
            .unwrap_or_else(|| panic!("no service {node}"))
    }

    /// `compose up -d` (every node).
    pub fn up(&self) {
        run_ok(&mut self.compose(&["up", "-d"]), Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// `drift ARGS` inside a node's container.
    pub fn drift(&self, node: &str, args: &[&str]) -> Result<Output, String> {
        let mut cmd = docker(&["exec", self.container(node), "drift"]);
        cmd.args(args);
        run(&mut cmd, Duration::from_secs(60))
    }

    /// stdout of `drift ARGS` in a node that must succeed.
    pub fn drift_ok(&self, node: &str, args: &[&str]) -> String {
        let out = self.drift(node, args).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{node}: drift {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The JSON answer of `drift ARGS --json` in a node, if it answers.
    pub fn json(&self, node: &str, args: &[&str]) -> Option<Value> {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.drift(node, &args).ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `(name, state)` of every row of a node's `drift table`.
    pub fn states(&self, node: &str) -> Option<Vec<(String, String)>> {
        let t = self.json(node, &["table"])?;
        t["rows"]
            .as_array()?
            .iter()
            .map(|r| {
                Some((
                    r["name"].as_str()?.to_string(),
                    r["state"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    /// The state `observer` sees `node` in.
    pub fn state_of(&self, observer: &str, node: &str) -> Option<String> {
        self.states(observer)?
            .into_iter()
            .find(|(n, _)| n == node)
            .map(|(_, s)| s)
    }

    /// Waits until every node of `observers` shows every node of `expected` alive.
    pub fn wait_alive(
        &self,
        observers: &[&str],
        expected: &[&str],
        timeout: Duration,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let mut last = String::new();
        wait_until(timeout, Duration::from_millis(500), || {
            let mut missing = Vec::new();
            for o in observers {
                match self.states(o) {
                    Some(rows) => {
                        for e in expected {
                            let state = rows.iter().find(|(n, _)| n == e).map(|(_, s)| s.as_str());
                            if state != Some("alive") {
                                missing.push(format!("{o} sees {e} {state:?}"));
                            }
                        }
                    }
                    None => missing.push(format!("{o} does not answer")),
                }
            }
            last = missing.join("; ");
            missing.is_empty().then(|| started.elapsed())
        })
        .ok_or_else(|| format!("after {timeout:?}: {last}\n{}", self.logs_of(observers)))
    }

    /// Waits until the whole cluster has converged: every node sees every node alive.
    pub fn wait_converged(&self, timeout: Duration) -> Result<Duration, String> {
        let all: Vec<&str> = self.nodes.iter().map(String::as_str).collect();
        self.wait_alive(&all, &all, timeout)
    }

    /// Waits until a node's container reports healthy (`drift status` answers).
    pub fn wait_healthy(&self, node: &str, timeout: Duration) -> Result<(), String> {
        let ctr = self.container(node).to_string();
        wait_until(timeout, Duration::from_millis(500), || {
            let out = run_ok(
                &mut docker(&["inspect", "--format", "{{.State.Health.Status}}", &ctr]),
                Duration::from_secs(30),
            )
            .ok()?;
            (out.trim() == "healthy").then_some(())
        })
        .ok_or_else(|| format!("{node} not healthy after {timeout:?}\n{}", self.logs(node)))
    }

    /// `docker kill` (SIGKILL): the node and every VM in its container die at once.
    pub fn kill(&self, node: &str) {
        run_ok(
            &mut docker(&["kill", self.container(node)]),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// `docker start` a stopped node.
    pub fn start(&self, node: &str) {
        run_ok(
            &mut docker(&["start", self.container(node)]),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The project's network (the only network of every node).
    pub fn network(&self) -> String {
        format!("{}_mesh", self.project)
    }

    /// Cuts a node off the network: a partition.
    pub fn disconnect(&self, node: &str) {
        run_ok(
            &mut docker(&[
                "network",
                "disconnect",
                &self.network(),
                self.container(node),
            ]),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Puts a node back on the network, under its service name.
    pub fn connect(&self, node: &str) {
        run_ok(
            &mut docker(&[
                "network",
                "connect",
                "--alias",
                node,
                &self.network(),
                self.container(node),
            ]),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The last log lines of a node.
    pub fn logs(&self, node: &str) -> String {
        let out = run(
            &mut docker(&["logs", "--tail", "30", self.container(node)]),
            Duration::from_secs(60),
        );
        match out {
            Ok(o) => format!(
                "--- {node}:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("--- {node}: {e}"),
        }
    }

    fn logs_of(&self, nodes: &[&str]) -> String {
        nodes
            .iter()
            .map(|n| self.logs(n))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts a container on the cluster's network that is not a member: its own fresh key,
    /// the cluster's real roster and admin id, `insecure_open` so that it starts at all, and
    /// every node as bootstrap. Removed with the cluster.
    /// Returns the container's name and the outsider's id.
    pub fn start_outsider(&self, name: &str) -> (String, String) {
        let ctr = format!("{}-{name}", self.project);
        let label = format!("com.docker.compose.project={}", self.project);
        let network = self.network();
        run_ok(
            &mut docker(&[
                "create",
                "--name",
                &ctr,
                "--label",
                &label,
                "--network",
                &network,
                "--init",
                "-v",
                "/etc/drift",
                "-v",
                "/var/lib/drift",
                &image(),
            ]),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let id = run_ok(
            &mut docker(&[
                "run",
                "--rm",
                "--network",
                "none",
                "--volumes-from",
                &ctr,
                &image(),
                "keygen",
                "--out",
                "/etc/drift/node.key",
            ]),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string();
        let admin = &self.admin_id;
        let template = std::fs::read_to_string(repo_root().join("deploy/config/drift.lab.toml"))
            .expect("lab config");
        let config: String = template
            .lines()
            .map(|l| {
                if l.starts_with("admin = ") {
                    format!("admin = \"{admin}\"\ninsecure_open = true")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("drift.toml"), config + "\n").expect("write config");
        std::fs::copy(
            self.admin_dir.path().join("roster"),
            dir.path().join("roster"),
        )
        .expect("copy roster");
        for f in ["drift.toml", "roster"] {
            let path = dir.path().join(f);
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .expect("chmod");
            run_ok(
                docker(&["cp"])
                    .arg(&path)
                    .arg(format!("{ctr}:/etc/drift/{f}")),
                Duration::from_secs(60),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        run_ok(&mut docker(&["start", &ctr]), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        (ctr, id)
    }

    /// `drift ARGS` in a container that is not a node of the compose file.
    pub fn drift_in(&self, ctr: &str, args: &[&str]) -> Result<Output, String> {
        let mut cmd = docker(&["exec", ctr, "drift"]);
        cmd.args(args);
        run(&mut cmd, Duration::from_secs(60))
    }
}
