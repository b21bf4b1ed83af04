//! drift's deployment, tested as deployed: the container image, the compose lab cluster
//! (`deploy/compose.yaml`, prepared by `deploy/compose-init.sh`), its example configs and the
//! systemd unit.
//!
//! The cluster tests start five containers and steer them with the docker CLI: full
//! convergence; a partition (`docker network disconnect`) and the rejoin; a container whose
//! key is not in the roster; `docker kill` of the target or the source of a migration. A
//! sandbox VM is a `drift vmm` process inside its node's container, so killing a container
//! kills its VMs with it, exactly like a host that crashes. Without Docker they print why and
//! return; under `CI=true` that is a failure (see `drift_tests::compose`).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use drift_node::config::Config;
use drift_tests::compose::{docker_or_skip, in_ci, repo_root, run, ComposeCluster};
use drift_tests::wait_until;
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Files that need no Docker.

/// Writes `text` as a config file next to nothing and loads it as `drift run` would.
fn load_config(text: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drift.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn example_configs_load_as_written_and_as_compose_init_installs_them() {
    let root = repo_root();
    let prod = Config::load(&root.join("deploy/config/drift.production.toml")).unwrap();
    // The paths the systemd unit provides: StateDirectory=drift, RuntimeDirectory=drift.
    assert_eq!(prod.node.state_dir, Path::new("/var/lib/drift"));
    assert_eq!(prod.socket_path(), Path::new("/run/drift/drift.sock"));
    assert_eq!(prod.node.key, Path::new("/etc/drift/node.key"));
    assert!(prod
        .node
        .listen
        .iter()
        .any(|a| a.to_string().contains("/tcp/7400")));

    let lab_path = root.join("deploy/config/drift.lab.toml");
    let lab = Config::load(&lab_path).unwrap();
    assert_eq!(lab.node.key, root.join("deploy/config/node.key"));
    assert_eq!(lab.socket_path(), Path::new("/var/lib/drift/drift.sock"));
    let bootstrap: Vec<String> = lab.node.bootstrap.iter().map(|a| a.to_string()).collect();
    for n in 1..=5 {
        assert!(
            bootstrap.contains(&format!("/dns4/node-{n}/tcp/7400")),
            "{bootstrap:?}"
        );
    }
    // Short enough for the partition test to see a node gone within seconds.
    assert!(lab.gossip.gone_after <= Duration::from_secs(10));

    // What compose-init.sh makes of it for node-3: the real admin id, its own address gone.
    let admin = drift_protocol::SecretKey::generate(&mut rand_core::OsRng).public();
    let text = std::fs::read_to_string(&lab_path).unwrap();
    let installed: String = text
        .lines()
        .filter(|l| !l.contains("\"/dns4/node-3/tcp/"))
        .map(|l| {
            if l.starts_with("admin = ") {
                format!("admin = \"{admin}\"   # the cluster admin\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let node3 = load_config(&installed);
    assert_eq!(node3.node.admin, drift_node::config::AdminKeys::One(admin));
    assert_eq!(node3.node.bootstrap.len(), 4);
}

#[test]
fn systemd_unit_verifies() {
    let probe = run(
        Command::new("systemd-analyze").arg("--version"),
        Duration::from_secs(30),
    );
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(!in_ci(), "CI=true and systemd-analyze is not installed");
        eprintln!("SKIPPED systemd_unit_verifies: systemd-analyze is not installed");
        return;
    }
    // `verify` checks that ExecStart's binary exists here: point it at an executable that does.
    let unit = std::fs::read_to_string(repo_root().join("deploy/systemd/drift.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/drift run --config /etc/drift/drift.toml"));
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drift.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/drift run",
            &format!("{} run", exe.display()),
        ),
    )
    .unwrap();
    let out = run(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        Duration::from_secs(60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    // The sandboxing the deployment promises.
    for line in [
        "User=drift",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=drift",
        "RuntimeDirectory=drift",
        "CapabilityBoundingSet=\n",
        "Restart=on-failure",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
    let security = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&path),
        Duration::from_secs(60),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&security.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("no overall exposure level printed");
    println!("{}", overall.trim());
}

// ---------------------------------------------------------------------------------------
// The compose cluster.

/// `(name, state, writes)` of every VM of a node, if it answers.
fn vms(c: &ComposeCluster, node: &str) -> Option<Vec<(String, String, u64)>> {
    let v = c.json(node, &["vms"])?;
    v["vms"]
        .as_array()?
        .iter()
        .map(|vm| {
            Some((
                vm["name"].as_str()?.to_string(),
                vm["state"].as_str()?.to_string(),
                vm["writes"].as_u64().unwrap_or(0),
            ))
        })
        .collect()
}

/// The state of VM `name` on `node`: `None` when the node does not hold it (or does not
/// answer: callers check that it does).
fn vm_state(c: &ComposeCluster, node: &str, name: &str) -> Option<String> {
    vms(c, node)?
        .into_iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, s, _)| s)
}

/// Every `(node, state)` holding VM `name`, over the nodes that answer.
fn holders(c: &ComposeCluster, name: &str) -> Vec<(String, String)> {
    c.nodes
        .iter()
        .filter_map(|n| vm_state(c, n, name).map(|s| (n.clone(), s)))
        .collect()
}

/// The VM runs on `node`: its guest keeps writing, and its memory verifies page by page.
fn assert_runs_clean(c: &ComposeCluster, node: &str, name: &str) {
    let writes = |c: &ComposeCluster| {
        vms(c, node)?
            .into_iter()
            .find(|(n, s, _)| n == name && s == "running")
            .map(|(_, _, w)| w)
    };
    let before = writes(c).unwrap_or_else(|| {
        panic!(
            "{name} is not running on {node}: {:?}\n{}",
            vms(c, node),
            c.logs(node)
        )
    });
    wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        (writes(c)? > before).then_some(())
    })
    .unwrap_or_else(|| panic!("the guest of {name} does not run on {node}"));
    let ok = c.drift_ok(node, &["vm", "verify", name]);
    assert!(
        ok.starts_with(&format!("ok: {name} verified clean")),
        "{ok}"
    );
}

/// `(state, bytes sent)` of migration `id` as `node` lists it.
fn migration(c: &ComposeCluster, node: &str, id: &str) -> Option<(String, u64)> {
    let v = c.json(node, &["migrations"])?;
    let m = v["migrations"]
        .as_array()?
        .iter()
        .find(|m| m["id"].as_str() == Some(id))?
        .clone();
    Some((
        m["state"].as_str()?.to_string(),
        m["progress"]["bytes_sent"].as_u64().unwrap_or(0),
    ))
}

/// A cluster of five that has converged.
fn converged_cluster(test: &str) -> Option<ComposeCluster> {
    let docker = docker_or_skip(test)?;
    let c = ComposeCluster::init(&docker);
    c.up();
    let took = c.wait_converged(Duration::from_secs(120)).unwrap();
    println!(
        "{test}: {} nodes converged {took:?} after `up`",
        c.nodes.len()
    );
    Some(c)
}

/// Creates VM `name` on `from`, lets its guest dirty a good part of its memory, and starts a
/// migration to `to` capped at 1 MiB/s, so the first round alone lasts well over ten seconds.
/// Returns the migration id once bytes are flowing.
fn start_slow_migration(c: &ComposeCluster, from: &str, name: &str, to: &str) -> String {
    c.drift_ok(
        from,
        &[
            "vm",
            "create",
            name,
            "--memory-mib",
            "64",
            "--dirty-mib-per-s",
            "4",
        ],
    );
    // 3000 pages written: about 12 MiB to send in the first round.
    wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        vms(c, from)?
            .into_iter()
            .find(|(n, _, w)| n == name && *w >= 3000)
    })
    .unwrap_or_else(|| panic!("{name} on {from} does not write"));
    let out = c.drift_ok(from, &["migrate", name, "--to", to, "--bandwidth-mib", "1"]);
    // "migration <id>: <vm> -> <to> (<mode>) accepted"
    let id = out
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let (state, sent) = migration(c, from, &id)?;
        (state == "running" && sent > 0).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "migration {id} does not transfer: {:?}",
            migration(c, from, &id)
        )
    });
    id
}

#[test]
fn five_nodes_converge_rejoin_after_a_partition_and_keep_an_outsider_out() {
    let Some(c) = converged_cluster("five_nodes_converge") else {
        return;
    };
    let names: Vec<&str> = c.nodes.iter().map(String::as_str).collect();
    assert_eq!(names, ["node-1", "node-2", "node-3", "node-4", "node-5"]);
    for n in &names {
        c.wait_healthy(n, Duration::from_secs(60)).unwrap();
        let rows = c.states(n).unwrap();
        assert_eq!(rows.len(), 5, "{n}: {rows:?}");
        let status = c.json(n, &["status"]).unwrap();
        assert_eq!(status["name"], *n);
        assert_eq!(status["hosts"]["alive"], 5, "{n}: {status}");
    }

    // Partition: node-5 loses its network. The others see it go, and it sees them go.
    let cut = Instant::now();
    c.disconnect("node-5");
    let others = ["node-1", "node-2", "node-3", "node-4"];
    wait_until(Duration::from_secs(60), Duration::from_millis(300), || {
        others
            .iter()
            .all(|o| c.state_of(o, "node-5").as_deref() == Some("gone"))
            .then_some(())
    })
    .unwrap_or_else(|| {
        let seen: Vec<_> = others
            .iter()
            .map(|o| (o, c.state_of(o, "node-5")))
            .collect();
        panic!("node-5 is not gone everywhere: {seen:?}")
    });
    println!(
        "partition: node-5 gone everywhere after {:?}",
        cut.elapsed()
    );
    wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
        let rows = c.states("node-5")?;
        rows.iter()
            .filter(|(n, _)| n != "node-5")
            .all(|(_, s)| s == "gone")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("node-5 still sees peers: {:?}", c.states("node-5")));

    // Reconnect: it rejoins, and every table holds every node alive again.
    let healed = Instant::now();
    c.connect("node-5");
    c.wait_converged(Duration::from_secs(90)).unwrap();
    println!(
        "rejoin: converged {:?} after reconnecting",
        healed.elapsed()
    );

    // An outsider: a container on the same network with its own key, which is not in the
    // roster, dialing every node.
    let denied = |n: &str| {
        c.json(n, &["status"]).unwrap()["connections_denied"]
            .as_u64()
            .unwrap()
    };
    let before: Vec<u64> = names.iter().map(|n| denied(n)).collect();
    let (outsider, outsider_id) = c.start_outsider("outsider");
    // Every node refuses it, again at each of its redials.
    wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        names
            .iter()
            .zip(&before)
            .all(|(n, b)| denied(n) >= b + 2)
            .then_some(())
    })
    .unwrap_or_else(|| {
        let now: Vec<u64> = names.iter().map(|n| denied(n)).collect();
        panic!("connections_denied before {before:?}, now {now:?}")
    });
    for n in &names {
        let table = c.json(n, &["table"]).unwrap();
        let rows = table["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 5, "{n}: {table}");
        assert!(
            rows.iter().all(|r| r["id"] != outsider_id.as_str()),
            "{n} lists the outsider: {table}"
        );
        let peers = c.json(n, &["peers"]).unwrap();
        assert!(
            peers["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["id"] != outsider_id.as_str()),
            "{n} is connected to the outsider: {peers}"
        );
        let status = c.json(n, &["status"]).unwrap();
        assert_eq!(status["hosts"]["alive"], 5, "{n}: {status}");
    }
    // The outsider itself has nobody: no report, no member alive, and no peer (each of its
    // dials lives only from its handshake to the member's refusal).
    let outsider_status = || -> Value {
        let out = c.drift_in(&outsider, &["status", "--json"]).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let status = outsider_status();
    assert_eq!(status["reports_accepted"], 0, "{status}");
    assert_eq!(status["hosts"]["alive"], 0, "{status}");
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (outsider_status()["peers"] == 0).then_some(())
    })
    .unwrap_or_else(|| panic!("the outsider keeps peers: {}", outsider_status()));
}

#[test]
fn killing_the_target_mid_migration_keeps_the_vm_running_at_the_source() {
    let Some(c) = converged_cluster("killing_the_target_mid_migration") else {
        return;
    };
    let id = start_slow_migration(&c, "node-1", "web-a", "node-2");
    assert_eq!(vm_state(&c, "node-2", "web-a").as_deref(), Some("incoming"));
    c.kill("node-2");

    // The migration ends without a commit, and the VM never stopped running at home.
    let (state, _) = wait_until(Duration::from_secs(60), Duration::from_millis(300), || {
        migration(&c, "node-1", &id).filter(|(s, _)| s != "running" && s != "negotiating")
    })
    .unwrap_or_else(|| {
        panic!(
            "migration {id} still running: {:?}",
            migration(&c, "node-1", &id)
        )
    });
    assert_ne!(state, "committed");
    println!("source: migration {id} ended {state}");
    assert_runs_clean(&c, "node-1", "web-a");

    // The target comes back holding no copy.
    c.start("node-2");
    c.wait_healthy("node-2", Duration::from_secs(60)).unwrap();
    c.wait_converged(Duration::from_secs(60)).unwrap();
    wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
        vms(&c, "node-2")?
            .iter()
            .all(|(n, _, _)| n != "web-a")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the restarted target holds {:?}", vms(&c, "node-2")));
    assert_eq!(
        holders(&c, "web-a"),
        [("node-1".to_string(), "running".to_string())]
    );
    assert_runs_clean(&c, "node-1", "web-a");
}

#[test]
fn killing_the_source_after_the_commit_leaves_the_vm_running_on_the_target() {
    let Some(c) = converged_cluster("killing_the_source_after_the_commit") else {
        return;
    };
    c.drift_ok(
        "node-3",
        &[
            "vm",
            "create",
            "web-b",
            "--memory-mib",
            "32",
            "--dirty-mib-per-s",
            "4",
        ],
    );
    let out = c.drift_ok("node-3", &["migrate", "web-b", "--to", "node-4", "--watch"]);
    assert!(out.contains("committed"), "{out}");
    c.kill("node-3");

    assert_runs_clean(&c, "node-4", "web-b");
    c.start("node-3");
    c.wait_healthy("node-3", Duration::from_secs(60)).unwrap();
    c.wait_converged(Duration::from_secs(60)).unwrap();
    assert_eq!(
        vm_state(&c, "node-3", "web-b"),
        None,
        "{:?}",
        vms(&c, "node-3")
    );
    assert_eq!(
        holders(&c, "web-b"),
        [("node-4".to_string(), "running".to_string())]
    );
    assert_runs_clean(&c, "node-4", "web-b");
}

#[test]
fn killing_the_source_mid_transfer_loses_the_vm_and_never_runs_it_twice() {
    let Some(c) = converged_cluster("killing_the_source_mid_transfer") else {
        return;
    };
    let id = start_slow_migration(&c, "node-5", "web-c", "node-1");
    assert_eq!(vm_state(&c, "node-1", "web-c").as_deref(), Some("incoming"));
    c.kill("node-5");

    // The target never resumes its incomplete copy, and discards it.
    wait_until(Duration::from_secs(90), Duration::from_millis(300), || {
        let state = vm_state(&c, "node-1", "web-c");
        assert!(
            matches!(state.as_deref(), None | Some("incoming")),
            "the target runs an incomplete copy: {state:?}"
        );
        // Answering, and without the VM.
        vms(&c, "node-1").filter(|_| state.is_none())
    })
    .unwrap_or_else(|| panic!("the target keeps {:?}", vm_state(&c, "node-1", "web-c")));
    let target_view = migration(&c, "node-1", &id);
    println!("target: migration {id} is {target_view:?}");

    // The source comes back: the VM's VMM died with its container, as on a crashed host. It
    // lists the VM as lost, and no host runs it.
    c.start("node-5");
    c.wait_healthy("node-5", Duration::from_secs(60)).unwrap();
    c.wait_converged(Duration::from_secs(60)).unwrap();
    assert_eq!(
        holders(&c, "web-c"),
        [("node-5".to_string(), "lost".to_string())],
        "{:?}",
        migration(&c, "node-5", &id)
    );
}
