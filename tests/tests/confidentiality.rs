//! Nothing of a guest's memory crosses the wire in clear: every byte between two nodes (their
//! mesh connection and their data connections) passes through recording proxies on loopback
//! while a VM migrates, and the canary string that the guest keeps in its memory never appears
//! in the recording.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use drift_node::hypervisor::guest::CANARY;
use drift_tests::{drift_ok, tapped_pair};

#[test]
fn no_guest_memory_crosses_the_wire_in_clear() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (c, seen) = tapped_pair(&rt, "");
    let sock = |i: usize| c.nodes[i].node.socket.to_str().unwrap().to_string();
    drift_ok(&[
        "vm",
        "create",
        "secret",
        "--memory-mib",
        "16",
        "--socket",
        &sock(0),
    ]);
    let before = seen.lock().unwrap().len();
    let out = drift_ok(&[
        "migrate",
        "secret",
        "--to",
        "node-2",
        "--watch",
        "--socket",
        &sock(0),
    ]);
    assert!(out.contains("committed"), "{out}");
    // It moved on the data plane (TLS), not on the mesh stream.
    let migrations: serde_json::Value =
        serde_json::from_str(&drift_ok(&["migrations", "--json", "--socket", &sock(0)])).unwrap();
    let transport = migrations["migrations"][0]["progress"]["transport"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(transport.starts_with("data: "), "{transport}");
    let ok = drift_ok(&["vm", "verify", "secret", "--socket", &sock(1)]);
    assert!(ok.starts_with("ok:"), "{ok}");

    let recorded = seen.lock().unwrap().clone();
    // The migration went through the proxy: at least the guest's written pages' worth.
    assert!(
        recorded.len() - before > 64 * 1024,
        "only {} bytes passed the proxy during the migration",
        recorded.len() - before
    );
    let canary = &CANARY[..18];
    assert_eq!(canary, b"DRIFT-GUEST-CANARY");
    assert!(
        !recorded.windows(canary.len()).any(|w| w == canary),
        "guest memory (the canary) appeared in clear on the wire"
    );
    // The same search finds the canary where it is in clear: the guest page itself.
    let page = drift_node::hypervisor::guest::canary_page(7);
    assert!(page.windows(canary.len()).any(|w| w == canary));
    drift_ok(&["vm", "destroy", "secret", "--socket", &sock(1)]);
}
