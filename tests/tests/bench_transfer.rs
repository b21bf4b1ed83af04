//! `drift bench transfer` runs end to end, and its figures hang together: every leg delivered
//! exactly the bytes it sent (count and digest), every leg has each side's CPU time, and the
//! ratios are the legs' own.

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
    // Each side ran on its own runtime, and moving the bytes cost each some CPU.
    for side in ["cpu_send_s_per_gib", "cpu_recv_s_per_gib"] {
        let cpu = v[side].as_f64().unwrap_or_else(|| panic!("no {side}: {v}"));
        assert!(cpu > 0.0 && cpu.is_finite(), "{side}: {v}");
    }
}

fn ratio_is(v: &serde_json::Value, name: &str, leg: &str, of: &str) {
    let ratio = v[name].as_f64().unwrap();
    let expect = v[leg]["bytes_per_s"].as_f64().unwrap() / v[of]["bytes_per_s"].as_f64().unwrap();
    assert!((ratio - expect).abs() < 1e-9, "{name}: {ratio} vs {expect}");
}

#[test]
fn transfer_bench_delivers_every_byte_on_every_transport() {
    let out = drift_ok(&["bench", "transfer", "--bytes", "32MiB", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bytes = 32u64 << 20;
    assert_eq!(v["bytes"].as_u64().unwrap(), bytes);
    assert_eq!(v["write_bytes"].as_u64().unwrap(), 1 << 20);
    for leg in ["tcp", "rustls", "stream", "data_1", "data_k"] {
        leg_is_intact(&v[leg], bytes);
    }
    // The byte-stream legs sent the same content; the data-plane legs the same batches.
    for leg in ["rustls", "stream"] {
        assert_eq!(v["tcp"]["digest_sent"], v[leg]["digest_sent"], "{leg}");
    }
    assert_eq!(v["data_1"]["digest_sent"], v["data_k"]["digest_sent"]);
    // TLS 1.3 with AES-256-GCM, on rustls and on the data plane alike.
    for leg in ["rustls", "data_1", "data_k"] {
        assert_eq!(
            v[leg]["cipher"].as_str().unwrap(),
            "TLS1.3 AES_256_GCM_SHA384",
            "{leg}"
        );
    }
    let k = v["connections"].as_u64().unwrap();
    assert!((2..=32).contains(&k), "{k}");
    assert!(
        v["data_k"]["transport"]
            .as_str()
            .unwrap()
            .contains(&k.to_string()),
        "{v}"
    );
    ratio_is(&v, "stream_ratio", "stream", "tcp");
    ratio_is(&v, "rustls_ratio", "rustls", "tcp");
    ratio_is(&v, "data_1_vs_rustls", "data_1", "rustls");
    ratio_is(&v, "data_k_vs_tcp", "data_k", "tcp");
    ratio_is(&v, "data_1_vs_stream", "data_1", "stream");
    ratio_is(&v, "data_k_vs_stream", "data_k", "stream");
    assert_eq!(v["target_ratio"].as_f64().unwrap(), 0.8);
    assert_eq!(v["target_data_1_vs_rustls"].as_f64().unwrap(), 0.9);
    assert_eq!(v["target_data_k_vs_tcp"].as_f64().unwrap(), 0.6);
    assert_eq!(v["target_data_vs_stream"].as_f64().unwrap(), 2.5);
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
fn transfer_bench_asks_for_the_connections_it_is_given() {
    let out = drift_ok(&[
        "bench",
        "transfer",
        "--bytes",
        "8MiB",
        "--connections",
        "3",
        "--no-quic",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["connections"].as_u64().unwrap(), 3);
    leg_is_intact(&v["data_k"], 8 << 20);
    assert_eq!(v["quic_error"].as_str().unwrap(), "not requested");
}

#[test]
fn transfer_bench_refuses_a_bad_size_and_says_why() {
    let out = drift_tests::drift(&["bench", "transfer", "--bytes", "12 parsecs"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown unit"), "{err}");

    let out = drift_tests::drift(&["bench", "transfer", "--bytes", "1000"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("whole number of 4096-byte pages"), "{err}");
}
