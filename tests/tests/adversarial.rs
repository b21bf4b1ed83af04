//! Adversarial peers built from the protocol crate.
//!
//! Topology: X and Y are `drift run` processes; Y's only neighbour is X. The adversaries are
//! roster members (so their connections are admitted) running in this test process, each
//! connected only to X. Together they publish every kind of bad report. X must refuse each with
//! its reason counted, keep it out of its table, never forward it (Y sees none of them), and
//! keep running. A forged or malformed report costs its sender its gossip score: one is enough
//! for X to ignore that peer from then on, which is why each such case has its own adversary.
//! An outsider whose key is not in the roster cannot get a connection to X at all.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use drift_node::config::Config;
use drift_node::daemon;
use drift_node::identity::read_key;
use drift_node::mesh::Topic;
use drift_protocol::codec::encode_frame;
use drift_protocol::{LoadReport, NodeId, SecretKey, Signed, Timestamp};
use drift_tests::{set_bootstrap, wait_until, Cluster};

const INTERVAL: Duration = Duration::from_millis(300);
/// A CPU figure no honest node in this test reports: its appearance anywhere is a leak.
const MARKER_PERMILLE: u16 = 999;

/// Keeps only the bootstrap entries of `config` that contain `keep`.
fn only_bootstrap(config: &std::path::Path, keep: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let kept: Vec<String> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("\"/ip4/") && l.contains(keep))
        .map(|l| l.trim().trim_end_matches(',').trim_matches('"').to_string())
        .collect();
    set_bootstrap(config, &kept);
}

fn report(node: NodeId, seq: u64, issued_at: Timestamp) -> LoadReport {
    LoadReport {
        node,
        seq,
        issued_at,
        roster_epoch: 1,
        cpu_permille: MARKER_PERMILLE,
        mem_used_mib: 1,
        mem_total_mib: 2,
        power_mw: 1,
        power_measured: false,
        vm_count: 0,
        vm_demand_permille: 0,
        reserved_permille: 0,
        standby: false,
    }
}

#[test]
fn bad_reports_are_refused_counted_unforwarded_and_outsiders_cannot_connect() {
    // X, Y, and six adversaries.
    let mut c = Cluster::generate(8, INTERVAL);
    let x_port = c.nodes[0].node.port;
    let x_addr = format!("tcp/{x_port}/");
    for n in &c.nodes[1..] {
        only_bootstrap(&n.node.config, &x_addr);
    }
    c.nodes[0].start();
    c.nodes[1].start();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut adversaries = Vec::new();
    for n in &c.nodes[2..] {
        let config = Config::load(&n.node.config).unwrap();
        let key = read_key(&config.node.key).unwrap();
        adversaries.push((key, rt.block_on(daemon::start(config)).unwrap()));
    }
    c.wait_converged_subset(&[0, 1], 8, Duration::from_secs(60))
        .unwrap();
    let y_id = c.nodes[1].node.id;
    let outsider = SecretKey::generate(&mut rand_core::OsRng);

    // Every kind of bad report, with the reason X must count for it, and who sends it.
    let now = drift_node::clock::now();
    let fresh = |seq_bump: u64| now.as_millis() + 1_000_000 + seq_bump;
    let key = |i: usize| &adversaries[i].0;
    let me = |i: usize| key(i).public();
    let mut cases: Vec<(&str, usize, Vec<u8>)> = Vec::new();
    // Late or early, but honestly signed: dropped without penalty (gossipsub Ignore).
    cases.push((
        "stale_seq",
        0,
        encode_frame(&Signed::sign(&report(me(0), 5, now), key(0))),
    ));
    cases.push((
        "too_old",
        0,
        encode_frame(&Signed::sign(
            &report(me(0), fresh(4), Timestamp(now.as_millis() - 120_000)),
            key(0),
        )),
    ));
    cases.push((
        "from_future",
        0,
        encode_frame(&Signed::sign(
            &report(me(0), fresh(5), now.plus_millis(120_000)),
            key(0),
        )),
    ));
    // Misbehaviour (gossipsub Reject): one per adversary.
    let (bytes, _, sig) = Signed::sign(&report(y_id, fresh(1), now), key(0)).into_parts();
    cases.push((
        "bad_signature",
        0,
        encode_frame(&Signed::<LoadReport>::from_parts(bytes, y_id, sig)),
    ));
    cases.push((
        "unknown_signer",
        1,
        encode_frame(&Signed::sign(
            &report(outsider.public(), fresh(2), now),
            &outsider,
        )),
    ));
    cases.push((
        "signer_not_subject",
        2,
        encode_frame(&Signed::sign(&report(y_id, fresh(3), now), key(2))),
    ));
    let mut hot = report(me(3), fresh(6), now);
    hot.cpu_permille = 5000;
    cases.push(("out_of_range", 3, encode_frame(&Signed::sign(&hot, key(3)))));
    cases.push(("oversized", 4, vec![0x42; 4096]));
    cases.push(("malformed", 5, b"\x00\x00\x00\x05\x01garbage".to_vec()));

    let before = c.status(0).unwrap().reports_rejected;
    for (label, who, bytes) in &cases {
        let sent = rt
            .block_on(
                adversaries[*who]
                    .1
                    .mesh
                    .publish(Topic::Reports, bytes.clone()),
            )
            .unwrap();
        assert_eq!(sent, Ok(()), "adversary could not publish {label}");
        // Let X judge it before the next one, so the penalty order is as listed.
        std::thread::sleep(Duration::from_millis(100));
    }
    let counted = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let after = c.status(0)?.reports_rejected;
        cases
            .iter()
            .all(|(label, _, _)| after[*label] > before[*label])
            .then_some(after)
    });
    let after = counted.unwrap_or_else(|| {
        panic!(
            "X did not count every reason: before {before:?} after {:?}",
            c.status(0).map(|s| s.reports_rejected)
        )
    });
    println!("X counted: {after:?}");

    // The peer that sent garbage is now ignored: more garbage from it is not even judged.
    for _ in 0..3 {
        let _ = rt.block_on(
            adversaries[5]
                .1
                .mesh
                .publish(Topic::Reports, b"\x00\x00\x00\x04\x01junk".to_vec()),
        );
    }
    std::thread::sleep(INTERVAL * 5);
    assert_eq!(
        c.status(0).unwrap().reports_rejected["malformed"],
        after["malformed"],
        "a penalized peer's messages are still being processed"
    );

    // Give forwarding a chance to happen if it were going to.
    std::thread::sleep(INTERVAL * 5);
    for i in 0..2 {
        let t = c.table(i).unwrap();
        assert!(
            t.rows
                .iter()
                .all(|r| r.cpu != Some(f64::from(MARKER_PERMILLE) / 1000.0)),
            "a refused report reached the table of node {i}: {:?}",
            t.rows
        );
        assert!(t.rows.iter().all(|r| r.id != outsider.public()));
    }
    let y = c.status(1).unwrap();
    assert!(
        y.reports_rejected.values().all(|n| *n == 0),
        "Y received refused reports, so X forwarded them: {:?}",
        y.reports_rejected
    );
    assert!(c.nodes[0].running() && c.nodes[1].running());
    // X keeps serving: it answers, and it and Y are alive in its table. (The penalized
    // adversaries' own reports are ignored along with the rest of their messages.)
    let xt = c.table(0).unwrap();
    for i in 0..2 {
        let row = xt.rows.iter().find(|r| r.id == c.nodes[i].node.id).unwrap();
        assert_eq!(row.state, drift_node::table::Liveness::Alive, "{row:?}");
    }

    // An outsider (key not in the roster) dials X: refused at connection level.
    let dir = c.path().join("outsider");
    let outsider_config = drift_tests::outsider_config(&c.nodes[7].node.config, &dir, &outsider);
    let denied_before = c.status(0).unwrap().connections_denied;
    let intruder = rt
        .block_on(daemon::start(Config::load(&outsider_config).unwrap()))
        .unwrap();
    let denied = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        (c.status(0)?.connections_denied > denied_before).then_some(())
    });
    assert!(denied.is_some(), "X never refused the outsider");
    std::thread::sleep(INTERVAL * 5);
    let x_peers = rt.block_on(async {
        drift_node::control::client::get::<drift_node::control::PeersView>(
            &c.nodes[0].node.socket,
            "/v1/peers",
        )
        .await
    });
    assert!(x_peers
        .unwrap()
        .peers
        .iter()
        .all(|p| p.id != outsider.public()));
    // The outsider learned nothing: no report of any member reached it.
    let outsider_table = intruder.state.table();
    for n in &c.nodes {
        assert!(
            outsider_table.report(&n.node.id).is_none(),
            "outsider received {}'s report",
            n.node.name
        );
    }
    drop(outsider_table);
    rt.block_on(intruder.shutdown());
    for (_, a) in adversaries {
        rt.block_on(a.shutdown());
    }
}
