//! `drift bench migrate` runs end to end on a small VM, and its figures hang together: every
//! migration committed, the VM verified clean on the target and left the source, each moved at
//! least the whole (fully written) memory, and downtime and total time were measured; the raw
//! stream and the data plane each delivered the memory's size intact, and every migration's
//! throughput is held against both. A VM that dirties memory faster than its capped link ends
//! as each fallback says: home and clean (abort), moved within the maximum downtime (throttle,
//! post-copy).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use drift_tests::drift_ok;

const MEMORY_MIB: u64 = 64;

fn check_run(r: &serde_json::Value, mode: &str, dirty: f64) {
    let label = r["label"].as_str().unwrap();
    assert_eq!(r["mode"], mode, "{label}: {r}");
    assert_eq!(r["outcome"], "committed", "{label}: {r}");
    assert_eq!(r["dirty_mib_per_s"].as_f64().unwrap(), dirty, "{label}");
    // On the target only, running, and clean page by page.
    assert_eq!(r["verified_clean"], true, "{label}: {r}");
    let verify = &r["verify"];
    assert_eq!(verify["bad_count"], 0, "{label}: {r}");
    assert_eq!(
        verify["pages"].as_u64().unwrap(),
        MEMORY_MIB * 256,
        "{label}"
    );
    // Every page but the canary was written before the move.
    assert!(
        verify["written"].as_u64().unwrap() >= MEMORY_MIB * 256 - 1,
        "{label}: {verify}"
    );
    assert_eq!(r["running_on_target"], true, "{label}: {r}");
    assert_eq!(r["gone_from_source"], true, "{label}: {r}");
    // The whole memory went over at least once, and the figures agree with each other.
    let bytes = r["bytes_sent"].as_u64().unwrap();
    let ratio = r["bytes_ratio"].as_f64().unwrap();
    assert!(ratio >= 1.0, "{label}: sent {ratio}x the memory");
    let memory = (MEMORY_MIB << 20) as f64;
    assert!((ratio - bytes as f64 / memory).abs() < 1e-9, "{label}");
    assert!(
        r["pages_sent"].as_u64().unwrap() >= MEMORY_MIB * 256 - 1,
        "{label}: {r}"
    );
    let total = r["total_ms"].as_f64().unwrap();
    let downtime = r["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0, "{label}: downtime {downtime}");
    assert!(
        total >= downtime,
        "{label}: total {total} ms below downtime {downtime} ms"
    );
    let tput = r["throughput_bytes_per_s"].as_f64().unwrap();
    assert!(
        (tput * total / 1e3 - bytes as f64).abs() < bytes as f64 * 1e-6,
        "{label}"
    );
    // The timeline starts running and ends where the outcome says.
    let timeline = r["timeline"].as_array().unwrap();
    assert!(!timeline.is_empty(), "{label}");
    assert_eq!(timeline.last().unwrap()["state"], "committed", "{label}");
}

#[test]
fn migrate_bench_moves_a_small_vm_in_every_mode_and_verifies_it() {
    let out = drift_ok(&[
        "bench",
        "migrate",
        "--memory-mib",
        &MEMORY_MIB.to_string(),
        "--dirty-mib-per-s",
        "4",
        "--hybrid",
        "--outrun-memory-mib",
        "16",
        "--timeout",
        "120s",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["memory_mib"], MEMORY_MIB);
    assert_eq!(v["memory_bytes"].as_u64().unwrap(), MEMORY_MIB << 20);
    assert_eq!(v["page_count"].as_u64().unwrap(), MEMORY_MIB * 256);
    assert_eq!(v["dirty_pages_per_s"], 1024);
    // The raw stream and the data plane each delivered the memory's size intact.
    for leg in ["stream", "data"] {
        assert_eq!(v[leg]["intact"], true, "{leg}: {}", v[leg]);
        assert_eq!(
            v[leg]["bytes_received"].as_u64().unwrap(),
            MEMORY_MIB << 20,
            "{leg}"
        );
        assert!(v[leg]["bytes_per_s"].as_f64().unwrap() > 0.0, "{leg}");
    }
    // On at least 2 data connections, over TLS.
    let data = &v["data"];
    let k: u32 = data["transport"]
        .as_str()
        .unwrap()
        .strip_prefix("drift data plane, ")
        .and_then(|t| t.strip_suffix(" connections"))
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("{data}"));
    assert!(k >= 2, "{data}");
    assert!(
        data["cipher"].as_str().unwrap().starts_with("TLS1.3"),
        "{data}"
    );

    check_run(&v["baseline"], "precopy", 0.0);
    check_run(&v["precopy"], "precopy", 4.0);
    check_run(&v["postcopy"], "postcopy", 4.0);
    check_run(&v["hybrid"], "hybrid", 4.0);
    // The idle baseline needs no more than one round after the first.
    assert!(
        v["baseline"]["rounds"].as_u64().unwrap() <= 1,
        "{}",
        v["baseline"]
    );
    // Post-copy sends each page once: no pre-copy rounds.
    assert_eq!(v["postcopy"]["rounds"], 0, "{}", v["postcopy"]);
    // The workload ran before the moves that had one.
    assert!(v["precopy"]["writes_before"].as_u64().unwrap() > 0);
    // Every migration's throughput is held against the stream's and the data plane's.
    for run in ["baseline", "precopy", "postcopy", "hybrid"] {
        let r = &v[run];
        let tput = r["throughput_bytes_per_s"].as_f64().unwrap();
        for (field, leg) in [
            ("throughput_vs_stream", "stream"),
            ("throughput_vs_data", "data"),
        ] {
            let ratio = r[field].as_f64().unwrap();
            assert!(ratio.is_finite() && ratio > 0.0, "{run} {field}: {ratio}");
            let expect = tput / v[leg]["bytes_per_s"].as_f64().unwrap();
            assert!(
                (ratio - expect).abs() <= expect * 1e-9,
                "{run} {field}: {ratio} vs {expect}"
            );
        }
    }
    let targets = &v["targets"];
    assert_eq!(targets["precopy_downtime_ms"].as_f64().unwrap(), 50.0);
    assert_eq!(targets["bytes_ratio"].as_f64().unwrap(), 1.3);
    assert_eq!(targets["postcopy_downtime_ms"].as_f64().unwrap(), 5.0);
    assert_eq!(targets["idle_vs_data"].as_f64().unwrap(), 0.75);

    // The VM that outruns its link, once per fallback.
    assert_eq!(v["outrun_memory_mib"], 16);
    let outrun = v["outrun"].as_array().unwrap();
    let by = |fallback: &str| {
        outrun
            .iter()
            .find(|r| r["fallback"].as_str().unwrap().starts_with(fallback))
            .unwrap_or_else(|| panic!("no {fallback} run in {outrun:?}"))
    };
    let abort = by("abort");
    assert_eq!(abort["outcome"], "resumed", "{abort}");
    assert_eq!(abort["verified_clean"], true, "home and clean: {abort}");
    let why = abort["detail"].as_str().unwrap();
    assert!(
        why.contains("not converging") && why.contains("dirtying") && why.contains("sending"),
        "{why}"
    );
    for fallback in ["throttle", "postcopy"] {
        let r = by(fallback);
        assert_eq!(r["outcome"], "committed", "{r}");
        assert_eq!(r["verified_clean"], true, "{r}");
        assert_eq!(r["running_on_target"], true, "{r}");
        println!(
            "outrun {fallback}: downtime {} ms (expected {} ms)",
            r["downtime_ms"], r["expected_downtime_ms"]
        );
    }
    // Throttled until the rest fit: never switched over on an expected downtime above the
    // 200 ms maximum (the measured downtime is a figure of this machine, printed above).
    let throttle = by("throttle");
    assert!(throttle["throttle_pct"].as_u64().unwrap() > 0, "{throttle}");
    let expected = throttle["expected_downtime_ms"].as_f64().unwrap();
    assert!(expected <= 200.0, "switched over expecting {expected} ms");
}
