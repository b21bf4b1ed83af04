//! Consolidation with real `drift run` processes on loopback (`balance.consolidate`): an
//! underloaded host drains its VM into a fuller host and goes standby (its reports say so,
//! every node's table shows it, its standby hook runs); then load arrives elsewhere, no active
//! host can take it, and the standby host takes a VM again (the hook runs with `active`).
//! Every VM is on exactly one host and verifies clean at each stage.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::time::Duration;

use drift_tests::api::{all_there_and_clean, restart_all, start_unbalanced, Api};
use drift_tests::{wait_until, Cluster};

/// Node 0 and node 1 hold 0.55 of their capacity each, node 2 holds 0.1: under `lower`
/// (0.2) it drains into one of the fuller hosts (0.65 after the move, under the targets' limit
/// of 0.75: `upper` 0.8 less 0.05).
const START: [&[(&str, f64)]; 3] = [
    &[("a0", 0.3), ("a1", 0.25)],
    &[("b0", 0.3), ("b1", 0.25)],
    &[("c0", 0.1)],
];

fn settings(hook: &std::path::Path) -> String {
    format!(
        "interval = \"300ms\"\nhysteresis = 2\nlower_permille = 200\ncooldown = \"1s\"\n\
         refusal_backoff = \"1s\"\nconsolidate = true\nstandby_hook = \"{}\"\n",
        hook.display()
    )
}

/// Whether node `of`'s table shows node `who` as standby.
fn shows_standby(api: &Api, c: &Cluster, of: usize, who: usize) -> Option<bool> {
    let id = c.nodes[who].node.id;
    let t = api.table(c, of)?;
    t.rows.iter().find(|r| r.id == id)?.standby
}

#[test]
fn an_underloaded_host_drains_sleeps_and_wakes_when_load_arrives() {
    let mut c = start_unbalanced(3, Duration::from_millis(300), Duration::from_secs(60));
    let api = Api::new();
    let mut names = BTreeSet::new();
    for (i, vms) in START.iter().enumerate() {
        for (name, demand) in vms.iter() {
            api.create(&c, i, name, 8, *demand, &[]);
            names.insert(name.to_string());
        }
    }
    // The hook records what it was told, one line each.
    let hook_log = c.path().join("hook.log");
    let hook = c.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1\" >> '{}'\n", hook_log.display()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let hook_lines = || {
        std::fs::read_to_string(&hook_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    restart_all(&mut c, &settings(&hook));

    // Node 2 drains into node 0 or node 1 and sleeps; every node sees it standby.
    let drained = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let p = api.placement(&c);
        let seen = (0..3).all(|of| shows_standby(&api, &c, of, 2) == Some(true));
        (p[2].is_empty() && !api.moving(&c) && seen).then_some(p)
    });
    let Some(p) = drained else {
        let logs: Vec<String> = c.nodes.iter().map(|n| n.log_tail()).collect();
        panic!(
            "node 2 did not drain and go standby within 60 s: {:?}\n{}",
            api.placement(&c)
                .iter()
                .map(|v| v.iter().map(|v| v.name.clone()).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            logs.join("\n---\n")
        );
    };
    assert!(
        p[0].iter().chain(&p[1]).any(|v| v.name == "c0"),
        "c0 went to a fuller host"
    );
    // Only node 2 sleeps: the others hold VMs.
    assert_eq!(shows_standby(&api, &c, 2, 0), Some(false));
    assert_eq!(shows_standby(&api, &c, 2, 1), Some(false));
    let table = drift_tests::drift_ok(&[
        "table",
        "--socket",
        c.nodes[0].node.socket.to_str().unwrap(),
    ]);
    assert!(table.contains("standby"), "drift table shows it:\n{table}");
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            (hook_lines() == ["standby"]).then_some(())
        })
        .is_some(),
        "the hook ran once with `standby`: {:?}",
        hook_lines()
    );
    all_there_and_clean(&api, &c, &names);

    // Load arrives on the host that took c0 (0.95): it is overloaded, the other active host
    // (0.55) has no room for any VM that would relieve it, so only the standby host can.
    let busy = usize::from(!p[0].iter().any(|v| v.name == "c0"));
    api.create(&c, busy, "d0", 8, 0.3, &[]);
    names.insert("d0".into());
    let woke = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let p = api.placement(&c);
        let awake = (0..3).all(|of| shows_standby(&api, &c, of, 2) == Some(false));
        (!p[2].is_empty() && !api.moving(&c) && awake).then_some(p)
    });
    let Some(p) = woke else {
        let logs: Vec<String> = c.nodes.iter().map(|n| n.log_tail()).collect();
        panic!(
            "node 2 took no VM within 60 s of node {busy}'s overload\n{}",
            logs.join("\n---\n")
        );
    };
    let demand: u32 = p[busy].iter().map(|v| v.demand_permille).sum();
    assert!(
        demand <= 800,
        "node {busy} is no longer overloaded: {demand}"
    );
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            (hook_lines() == ["standby", "active"]).then_some(())
        })
        .is_some(),
        "the hook ran with `active` once node 2 took a VM: {:?}",
        hook_lines()
    );
    all_there_and_clean(&api, &c, &names);
}
