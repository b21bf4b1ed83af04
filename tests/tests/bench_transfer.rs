//! `drift bench transfer` runs end to end, and its figures hang together: every leg delivered
//! exactly the bytes it sent (count and digest), and the ratios are the legs' own.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use drift_tests::drift_ok;

fn leg_is_intact(v: &serde_json::Value, bytes: u64) {
    assert_eq!(v["bytes_sent"].as_u64().unwrap(), bytes, "{v}");
    assert_eq!(v["bytes_received"].as_u64().unwrap(), bytes, "{v}");
    let sent = v["digest_sent"].as_str().unwrap();
    assert_eq!(sent.len(), 64, "{v}");
    assert_eq!(v["digest_received"].as_str().unwrap(), sent, "{v}");
    assert_eq!(v["intact"], true, "{v}");
    let seconds = v["seconds"].as_f64().unwrap();
    let rate = v["bytes_per_s"].as_f64().unwrap();
    assert!(seconds > 0.0 && rate > 0.0, "{v}");
    assert!(
        (rate * seconds - bytes as f64).abs() < bytes as f64 * 1e-6,
        "rate x time is not the bytes: {v}"
    );
}

#[test]
fn transfer_bench_delivers_every_byte_on_every_transport() {
    let out = drift_ok(&["bench", "transfer", "--bytes", "64MiB", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bytes = 64u64 << 20;
    assert_eq!(v["bytes"].as_u64().unwrap(), bytes);
    assert_eq!(v["write_bytes"].as_u64().unwrap(), 1 << 20);
    leg_is_intact(&v["tcp"], bytes);
    leg_is_intact(&v["stream"], bytes);
    // Every leg sent the same content.
    assert_eq!(v["tcp"]["digest_sent"], v["stream"]["digest_sent"]);
    let ratio = v["stream_ratio"].as_f64().unwrap();
    let expect =
        v["stream"]["bytes_per_s"].as_f64().unwrap() / v["tcp"]["bytes_per_s"].as_f64().unwrap();
    assert!((ratio - expect).abs() < 1e-9, "{ratio} vs {expect}");
    assert_eq!(v["target_ratio"].as_f64().unwrap(), 0.8);
    // QUIC either ran and delivered everything, or says why not.
    if v["quic"].is_null() {
        assert!(v["quic_error"].is_string(), "{v}");
    } else {
        leg_is_intact(&v["quic"], bytes);
        assert_eq!(v["quic"]["digest_sent"], v["tcp"]["digest_sent"]);
    }
    assert!(v["hash_mib_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn transfer_bench_refuses_a_bad_size_and_says_why() {
    let out = drift_tests::drift(&["bench", "transfer", "--bytes", "12 parsecs"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown unit"), "{err}");
}
