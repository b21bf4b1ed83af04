//! Live migration between two `drift run` processes over the encrypted mesh, in every mode:
//! the VM keeps running, verifies clean page by page on the target, is gone from the source,
//! and both audit logs record the same commit. A VM whose placement forbids the target is
//! refused, stays where it is, and the refusal is audited.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use drift_tests::{drift, drift_ok, wait_until, Cluster};

fn vms(c: &Cluster, i: usize) -> Vec<serde_json::Value> {
    let sock = c.nodes[i].node.socket.to_str().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&drift_ok(&["vms", "--json", "--socket", sock])).unwrap();
    v["vms"].as_array().unwrap().clone()
}

fn audit_events(c: &Cluster, i: usize) -> Vec<serde_json::Value> {
    let config = c.nodes[i].node.config.to_str().unwrap();
    drift_ok(&["audit", "show", "--json", "--config", config])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .collect()
}

fn commit_roots(events: &[serde_json::Value], side: &str) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| e.get("Commit"))
        .filter(|c| c["side"] == side)
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["root"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_running_vm_moves_in_every_mode_and_verifies_clean() {
    let c = Cluster::start(2, Duration::from_millis(300));
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let sock = |i: usize| c.nodes[i].node.socket.to_str().unwrap().to_string();
    drift_ok(&[
        "vm",
        "create",
        "web-1",
        "--memory-mib",
        "32",
        "--dirty-mib-per-s",
        "8",
        "--socket",
        &sock(0),
    ]);
    let mut here = 0;
    for mode in ["precopy", "postcopy", "hybrid", "precopy"] {
        let there = 1 - here;
        let to = format!("node-{}", there + 1);
        let out = drift(&[
            "migrate",
            "web-1",
            "--to",
            &to,
            "--mode",
            mode,
            "--watch",
            "--socket",
            &sock(here),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("committed"), "{mode}: {stdout}");
        // Exactly one host has it, running, and its memory verifies page by page.
        assert!(
            vms(&c, here).is_empty(),
            "{mode}: the source still has the VM"
        );
        let moved = vms(&c, there);
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0]["state"], "running", "{mode}");
        let ok = drift_ok(&["vm", "verify", "web-1", "--socket", &sock(there)]);
        assert!(ok.starts_with("ok: web-1 verified clean"), "{mode}: {ok}");
        // The guest keeps running on the target.
        let writes = moved[0]["writes"].as_u64().unwrap();
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            (vms(&c, there)[0]["writes"].as_u64()? > writes).then_some(())
        })
        .unwrap_or_else(|| panic!("{mode}: the guest does not run on the target"));
        here = there;
    }
    // Every commit is on record on both sides, with the same root.
    let source_side: Vec<_> = [0, 1]
        .iter()
        .flat_map(|&i| commit_roots(&audit_events(&c, i), "Source"))
        .collect();
    let target_side: Vec<_> = [0, 1]
        .iter()
        .flat_map(|&i| commit_roots(&audit_events(&c, i), "Target"))
        .collect();
    assert_eq!(source_side.len(), 4);
    for s in &source_side {
        assert!(
            target_side.contains(s),
            "commit {s:?} missing on the target side"
        );
    }
    for i in 0..2 {
        let config = c.nodes[i].node.config.to_str().unwrap();
        assert!(drift_ok(&["audit", "verify", "--config", config]).starts_with("ok:"));
    }
    drift_ok(&["vm", "destroy", "web-1", "--socket", &sock(here)]);
}

#[test]
fn placement_refusal_keeps_the_vm_home_and_is_audited() {
    // Testnet labels: node-1 is in jurisdiction fr, node-2 in de.
    let c = Cluster::start(2, Duration::from_millis(300));
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let sock = |i: usize| c.nodes[i].node.socket.to_str().unwrap().to_string();
    drift_ok(&[
        "vm",
        "create",
        "fr-only",
        "--memory-mib",
        "8",
        "--jurisdiction",
        "fr",
        "--socket",
        &sock(0),
    ]);
    let out = drift(&["migrate", "fr-only", "--to", "node-2", "--socket", &sock(0)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("jurisdiction"),
        "{err}"
    );
    assert_eq!(vms(&c, 0).len(), 1);
    assert_eq!(vms(&c, 0)[0]["state"], "running");
    assert!(vms(&c, 1).is_empty());
    let refused = audit_events(&c, 1).iter().any(|e| {
        e.get("Refused")
            .is_some_and(|r| r["reason"].as_str().unwrap().contains("jurisdiction"))
    });
    assert!(refused, "the target did not audit the refusal");
    drift_ok(&["vm", "destroy", "fr-only", "--socket", &sock(0)]);
}

#[test]
fn cancel_before_switchover_keeps_the_vm_running_at_home() {
    let c = Cluster::start(2, Duration::from_millis(300));
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let sock = |i: usize| c.nodes[i].node.socket.to_str().unwrap().to_string();
    drift_ok(&[
        "vm",
        "create",
        "slow",
        "--memory-mib",
        "32",
        "--dirty-mib-per-s",
        "4",
        "--socket",
        &sock(0),
    ]);
    // Capped at 1 MiB/s, the first round alone takes seconds: time to cancel.
    let out = drift_ok(&[
        "migrate",
        "slow",
        "--to",
        "node-2",
        "--bandwidth-mib",
        "1",
        "--socket",
        &sock(0),
    ]);
    let id = out
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    std::thread::sleep(Duration::from_millis(300));
    // One migration per VM at a time.
    let twice = drift(&["migrate", "slow", "--to", "node-2", "--socket", &sock(0)]);
    assert_eq!(twice.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already migrating"));
    drift_ok(&["migrate", "--cancel", &id, "--socket", &sock(0)]);
    let state = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        let v: serde_json::Value =
            serde_json::from_str(&drift_ok(&["migrations", "--json", "--socket", &sock(0)]))
                .ok()?;
        let m = v["migrations"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == id.as_str())?
            .clone();
        (m["state"] != "running").then_some(m["state"].as_str()?.to_string())
    })
    .expect("the cancelled migration ends");
    assert_eq!(state, "resumed");
    let home = vms(&c, 0);
    assert_eq!(home.len(), 1);
    assert_eq!(home[0]["state"], "running");
    assert!(drift_ok(&["vm", "verify", "slow", "--socket", &sock(0)]).starts_with("ok:"));
    // The target discarded its incoming copy.
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        vms(&c, 1).is_empty().then_some(())
    })
    .expect("the target discards the incoming VM");
    // Cancelling what is not running is an error.
    let again = drift(&["migrate", "--cancel", &id, "--socket", &sock(0)]);
    assert_eq!(again.status.code(), Some(1));
    drift_ok(&["vm", "destroy", "slow", "--socket", &sock(0)]);
}
