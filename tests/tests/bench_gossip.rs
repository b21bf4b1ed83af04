//! `drift bench gossip` runs end to end and prints figures that hang together.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use drift_tests::drift_ok;

#[test]
fn gossip_bench_prints_consistent_figures() {
    let out = drift_ok(&[
        "bench",
        "gossip",
        "--nodes",
        "3",
        "--interval",
        "300ms",
        "--window",
        "2s",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["nodes"], 3);
    let frame = v["report_frame_bytes"].as_f64().unwrap();
    assert!((100.0..=512.0).contains(&frame), "{frame}");
    let floor = v["floor_bytes_per_node_per_s"].as_f64().unwrap();
    assert!((floor - 3.0 * frame / 0.3).abs() < 1.0, "floor {floor}");
    // Every node received at least the other nodes' reports, so at least 2/3 of the floor.
    let mean = v["recv_bytes_per_node_per_s_mean"].as_f64().unwrap();
    assert!(
        mean >= floor * 2.0 / 3.0,
        "mean {mean} below what the reports alone need"
    );
    assert!(v["recv_bytes_per_node_per_s_max"].as_f64().unwrap() >= mean);
    let accepted = v["reports_accepted_per_node_per_s"].as_f64().unwrap();
    assert!(accepted > 0.0, "no reports accepted during the window");
    assert!(v["convergence_ms"].as_u64().unwrap() > 0);
}
