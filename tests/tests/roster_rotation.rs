//! Membership changes at run time: a roster of the next epoch, pushed to one node, reaches
//! every node by gossip; a revoked member is cut off and cannot come back; a roster not signed
//! by the admin is refused.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use drift_tests::{drift, drift_ok, wait_until, Cluster};

#[test]
fn next_epoch_spreads_and_revoked_member_is_cut_off() {
    let c = Cluster::start(3, Duration::from_millis(250));
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let dir = c.path();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let sock = |i: usize| c.nodes[i].node.socket.to_str().unwrap().to_string();
    let revoked = c.nodes[2].node.id;

    // The admin revokes node-3 in epoch 2.
    drift_ok(&["roster", "remove", &p("roster.toml"), "node-3"]);
    drift_ok(&[
        "roster",
        "sign",
        &p("roster.toml"),
        "--admin-key",
        &p("admin.key"),
        "--out",
        &p("roster.e2"),
        "--prev",
        &p("roster"),
    ]);

    // A well-formed next epoch signed by someone else (a member's key) is refused.
    let e1 = drift_node::identity::read_signed_roster(&dir.join("roster")).unwrap();
    let mut forged = e1.signed.verify().unwrap();
    forged.epoch = 2;
    forged.prev = Some(e1.hash());
    forged.members.retain(|m| m.name == "node-1");
    let member_key = drift_node::identity::read_key(&dir.join("node-1/node.key")).unwrap();
    drift_node::identity::write_signed_roster(
        &dir.join("roster.forged"),
        &drift_protocol::roster::Endorsed::sign(&forged, &member_key),
        drift_node::durable::Overwrite::Refuse,
    )
    .unwrap();
    let out = drift(&["roster", "push", &p("roster.forged"), "--socket", &sock(0)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
    assert_eq!(c.status(0).unwrap().roster_epoch, 1);

    // Pushed to node-1 only; node-2 learns it by gossip.
    let out = drift_ok(&["roster", "push", &p("roster.e2"), "--socket", &sock(0)]);
    assert!(out.contains("epoch 2"), "{out}");
    wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        (c.status(1)?.roster_epoch == 2).then_some(())
    })
    .expect("node-2 adopts epoch 2 by gossip");

    // Both drop node-3 from their tables and connections, and keep refusing it.
    for i in 0..2 {
        let t = c.table(i).unwrap();
        assert_eq!(t.rows.len(), 2, "node-{} still lists node-3", i + 1);
        assert!(t.rows.iter().all(|r| r.id != revoked));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connected_to_revoked = |i: usize| {
        rt.block_on(drift_node::control::client::get::<
            drift_node::control::PeersView,
        >(&c.nodes[i].node.socket, "/v1/peers"))
            .unwrap()
            .peers
            .iter()
            .any(|p| p.id == revoked)
    };
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (!connected_to_revoked(0) && !connected_to_revoked(1)).then_some(())
    })
    .expect("connections to node-3 are dropped");
    // node-3 keeps redialing its bootstrap peers; they refuse it.
    let denied = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let d = c.status(0)?.connections_denied + c.status(1)?.connections_denied;
        (d > 0).then_some(d)
    });
    assert!(denied.is_some(), "node-3 was never refused");
    assert!(!connected_to_revoked(0) && !connected_to_revoked(1));

    // The adopted roster survives a restart.
    let adopted = c.nodes[1].node.dir.join("state/roster.current");
    assert!(adopted.exists());

    // Both nodes' audit logs record the adoption, verify, and name an edited record.
    let config = |i: usize| c.nodes[i].node.config.to_str().unwrap().to_string();
    for i in 0..2 {
        let shown = drift_ok(&["audit", "show", "--config", &config(i)]);
        assert!(shown.contains("roster epoch 2 adopted"), "{shown}");
        let ok = drift_ok(&["audit", "verify", "--config", &config(i)]);
        assert!(
            ok.starts_with("ok: ") && ok.contains("matches the anchor"),
            "{ok}"
        );
    }
    let log = c.nodes[1].node.dir.join("state/audit.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x01;
    let copy = dir.join("audit.tampered");
    std::fs::write(&copy, &bytes).unwrap();
    let out = drift(&[
        "audit",
        "verify",
        "--file",
        copy.to_str().unwrap(),
        "--node",
        &c.nodes[1].node.id.to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("record "), "{err}");
}
