//! Sandbox VMs as an operator sees them: created on a node, listed, verified page by page,
//! surviving a kill -9 of their node, counted in its load report, destroyed without leftovers.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use drift_tests::{drift, drift_ok, wait_until, Cluster};

fn vmm_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn vms_run_verify_outlive_their_node_and_leave_nothing_behind() {
    let mut c = Cluster::start(2, Duration::from_millis(250));
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let sock = c.nodes[0].node.socket.to_str().unwrap().to_string();
    let out = drift_ok(&[
        "vm",
        "create",
        "web-1",
        "--memory-mib",
        "32",
        "--demand",
        "0.2",
        "--dirty-mib-per-s",
        "8",
        "--jurisdiction",
        "de",
        "--socket",
        &sock,
    ]);
    assert!(out.contains("web-1") && out.contains("running"), "{out}");
    drift_ok(&[
        "vm",
        "create",
        "db-1",
        "--memory-mib",
        "16",
        "--socket",
        &sock,
    ]);
    // Names are unique per node; bad values are refused with a reason.
    let dup = drift(&[
        "vm",
        "create",
        "web-1",
        "--memory-mib",
        "16",
        "--socket",
        &sock,
    ]);
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let big = drift(&[
        "vm",
        "create",
        "huge",
        "--memory-mib",
        "9999999",
        "--socket",
        &sock,
    ]);
    assert!(String::from_utf8_lossy(&big.stderr).contains("memory_mib"));

    let list = |c: &Cluster| -> serde_json::Value {
        serde_json::from_str(&drift_ok(&[
            "vms",
            "--json",
            "--socket",
            c.nodes[0].node.socket.to_str().unwrap(),
        ]))
        .unwrap()
    };
    let v = list(&c);
    assert_eq!(v["vms"].as_array().unwrap().len(), 2);
    let web = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "web-1")
        .unwrap()
        .clone();
    assert_eq!(web["state"], "running");
    let pid = web["pid"].as_u64().unwrap() as u32;

    // The workload writes pages; the memory verifies clean.
    std::thread::sleep(Duration::from_millis(500));
    let ok = drift_ok(&["vm", "verify", "web-1", "--socket", &sock]);
    assert!(ok.starts_with("ok: web-1 verified clean"), "{ok}");

    // The load report carries the VMs: count 2, demand 0.2 + 0.1, seen by the other node.
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let t = c.table(1)?;
        let row = t.rows.iter().find(|r| r.name == "node-1")?;
        (row.vms == Some(2) && row.vm_demand == Some(0.3)).then_some(())
    })
    .expect("node-2 sees node-1's two VMs and their demand");

    // kill -9 the node: the VM keeps running; the restarted node finds it again.
    c.nodes[0].kill9();
    assert!(vmm_alive(pid), "the VM died with its node");
    c.nodes[0].start();
    c.wait_converged(Duration::from_secs(30)).unwrap();
    let v = list(&c);
    assert_eq!(v["vms"].as_array().unwrap().len(), 2);
    assert!(v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["state"] == "running"));
    let ok = drift_ok(&["vm", "verify", "web-1", "--socket", &sock]);
    assert!(ok.starts_with("ok:"), "{ok}");

    // Destroy: the VMM exits and its directory is gone.
    drift_ok(&["vm", "destroy", "web-1", "--socket", &sock]);
    drift_ok(&["vm", "destroy", "db-1", "--socket", &sock]);
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        (!vmm_alive(pid)).then_some(())
    })
    .expect("the destroyed VM's process exits");
    assert_eq!(list(&c)["vms"].as_array().unwrap().len(), 0);
    let vms_dir = c.nodes[0].node.dir.join("state/vms");
    assert_eq!(std::fs::read_dir(vms_dir).unwrap().count(), 0);
    let missing = drift(&["vm", "verify", "web-1", "--socket", &sock]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no VM named"));
}

#[test]
fn testnet_starts_vms_and_stops_them_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = drift(&[
        "testnet",
        "--nodes",
        "2",
        "--dir",
        d,
        "--check",
        "--interval",
        "300ms",
        "--vms-per-node",
        "2",
        "--vm-memory-mib",
        "8",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("started 2 sandbox VMs per node"),
        "{stdout}"
    );
    for n in 1..=2 {
        let vms = dir.path().join(format!("node-{n}/state/vms"));
        assert_eq!(
            std::fs::read_dir(vms).unwrap().count(),
            0,
            "node-{n} left VMs behind"
        );
    }
}

#[test]
fn a_configured_vm_starts_once_and_does_not_come_back_after_it_moved() {
    let mut c = Cluster::generate(2, Duration::from_millis(250));
    let config = c.nodes[0].node.config.clone();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[[vm]]\nname = \"cfg-1\"\nmemory_mib = 16\ndemand = 0.1\n"),
    )
    .unwrap();
    for n in &mut c.nodes {
        n.start();
    }
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let socks: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.node.socket.to_str().unwrap().to_string())
        .collect();
    let sock = |i: usize| socks[i].clone();
    let has = |i: usize| {
        let out = drift(&["vms", "--json", "--socket", &sock(i)]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["vms"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["name"] == "cfg-1"))
    };
    let started = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        has(0).then_some(())
    });
    assert!(started.is_some(), "the configured VM did not start");
    let out = drift_ok(&[
        "migrate",
        "cfg-1",
        "--to",
        "node-2",
        "--watch",
        "--socket",
        &sock(0),
    ]);
    assert!(out.contains("committed"), "{out}");
    let moved = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        (!has(0) && has(1)).then_some(())
    });
    assert!(moved.is_some(), "cfg-1 did not end on node-2 only");
    // Restarted, node-1 does not start it again: it runs on node-2, once.
    assert!(c.nodes[0].terminate(Duration::from_secs(20)));
    c.nodes[0].start();
    c.wait_converged(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !has(0),
        "the configured VM came back on node-1 after it moved"
    );
    assert!(has(1));
    drift_ok(&["vm", "destroy", "cfg-1", "--socket", &sock(1)]);
}

#[test]
fn a_vm_that_went_away_and_came_back_survives_a_restart_of_its_node() {
    let mut c = Cluster::start(2, Duration::from_millis(250));
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let socks: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.node.socket.to_str().unwrap().to_string())
        .collect();
    let has = |i: usize| {
        let out = drift(&["vms", "--json", "--socket", &socks[i]]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["vms"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["name"] == "boomerang"))
    };
    drift_ok(&[
        "vm",
        "create",
        "boomerang",
        "--memory-mib",
        "16",
        "--socket",
        &socks[0],
    ]);
    for (from, to) in [(0, 1), (1, 0)] {
        let out = drift_ok(&[
            "migrate",
            "boomerang",
            "--to",
            &format!("node-{}", to + 1),
            "--watch",
            "--socket",
            &socks[from],
        ]);
        assert!(out.contains("committed"), "{out}");
        let moved = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            (has(to) && !has(from)).then_some(())
        });
        assert!(
            moved.is_some(),
            "boomerang did not end on node-{} only",
            to + 1
        );
    }
    // node-1 holds the record of the VM leaving (committed) and of it coming back: the newer
    // one decides, so the restart must not destroy the VM as a stale copy.
    assert!(c.nodes[0].terminate(Duration::from_secs(20)));
    c.nodes[0].start();
    c.wait_converged(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        has(0),
        "the restarted node destroyed the VM that had come back"
    );
    let ok = drift_ok(&["vm", "verify", "boomerang", "--socket", &socks[0]]);
    assert!(ok.starts_with("ok:"), "{ok}");
    drift_ok(&["vm", "destroy", "boomerang", "--socket", &socks[0]]);
}
