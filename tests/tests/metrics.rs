//! `GET /metrics` on the admin socket and on `[control] metrics_listen`: after a migration
//! and a refused offer, the exposition parses as Prometheus text and its series say what
//! happened (by role, mode and outcome), what the table holds and what the transport carried.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::time::Duration;

use drift_node::control::client;
use drift_tests::{drift, drift_ok, Cluster};
use prometheus_parse::{Scrape, Value};

fn scrape(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels`; histograms give their count.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .find(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
}

fn metrics(c: &Cluster, i: usize) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(client::get_text(&c.nodes[i].node.socket, "/metrics"))
        .unwrap()
}

/// A plain HTTP/1.0 GET on a TCP address: the body.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: drift\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

#[test]
fn metrics_tell_migrations_refusals_hosts_and_bytes() {
    // Testnet labels: node-1 is in jurisdiction fr, node-2 in de.
    let mut c = Cluster::generate(2, Duration::from_millis(300));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let config = &c.nodes[0].node.config;
    let text = std::fs::read_to_string(config).unwrap();
    let text = text.replacen(
        "socket = \"drift.sock\"\n",
        &format!("socket = \"drift.sock\"\nmetrics_listen = \"{metrics_addr}\"\n"),
        1,
    );
    assert!(
        text.contains("metrics_listen"),
        "no [control] socket line to extend"
    );
    std::fs::write(config, text).unwrap();
    for n in &mut c.nodes {
        n.start();
    }
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let sock = |i: usize| c.nodes[i].node.socket.to_str().unwrap().to_string();

    drift_ok(&[
        "vm",
        "create",
        "m",
        "--memory-mib",
        "16",
        "--socket",
        &sock(0),
    ]);
    let out = drift_ok(&[
        "migrate",
        "m",
        "--to",
        "node-2",
        "--watch",
        "--socket",
        &sock(0),
    ]);
    assert!(out.contains("committed"), "{out}");
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
    let refused = drift(&["migrate", "fr-only", "--to", "node-2", "--socket", &sock(0)]);
    assert_eq!(refused.status.code(), Some(1));

    let source = metrics(&c, 0);
    let target = metrics(&c, 1);
    assert!(
        source.trim_end().ends_with("# EOF"),
        "not OpenMetrics: {source}"
    );
    let (s, t) = (scrape(&source), scrape(&target));

    let committed = [
        ("role", "source"),
        ("mode", "precopy"),
        ("outcome", "committed"),
    ];
    assert_eq!(
        value(&s, "drift_migrations_total", &committed),
        Some(1.0),
        "{source}"
    );
    assert_eq!(
        value(
            &s,
            "drift_migrations_total",
            &[("role", "source"), ("outcome", "refused")]
        ),
        Some(1.0),
        "{source}"
    );
    let arrived = [
        ("role", "target"),
        ("mode", "precopy"),
        ("outcome", "committed"),
    ];
    assert_eq!(
        value(&t, "drift_migrations_total", &arrived),
        Some(1.0),
        "{target}"
    );
    // One downtime and one duration observed, of sane size; the VM's memory went.
    let downtime = value(
        &s,
        "drift_migration_downtime_seconds_count",
        &[("mode", "precopy")],
    );
    assert_eq!(downtime, Some(1.0), "{source}");
    let sum = value(
        &s,
        "drift_migration_downtime_seconds_sum",
        &[("mode", "precopy")],
    )
    .unwrap();
    assert!(sum > 0.0 && sum < 10.0, "downtime {sum} s");
    let total = value(
        &s,
        "drift_migration_duration_seconds_sum",
        &[("mode", "precopy")],
    )
    .unwrap();
    assert!(total >= sum && total < 120.0, "duration {total} s");
    let sent = value(&s, "drift_migration_sent_bytes_total", &[]).unwrap();
    assert!(sent > 0.0, "{source}");
    // The refusal is counted on the target, by its reason.
    let offers: f64 = t
        .samples
        .iter()
        .filter(|x| x.metric == "drift_offers_refused_total")
        .map(|x| match x.value {
            Value::Counter(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(offers, 1.0, "{target}");

    for (m, text) in [(&s, &source), (&t, &target)] {
        assert_eq!(
            value(m, "drift_hosts", &[("state", "alive")]),
            Some(2.0),
            "{text}"
        );
        assert_eq!(value(m, "drift_roster_epoch", &[]), Some(1.0), "{text}");
        assert_eq!(value(m, "drift_peers", &[]), Some(1.0), "{text}");
        assert!(
            value(m, "drift_reports_accepted_total", &[]).unwrap() > 0.0,
            "{text}"
        );
        assert_eq!(
            value(
                m,
                "drift_reports_rejected_total",
                &[("reason", "bad_signature")]
            ),
            Some(0.0),
            "every rejection reason is listed, zeros included: {text}"
        );
        assert!(
            value(m, "drift_audit_records", &[]).unwrap() >= 2.0,
            "{text}"
        );
        // libp2p's transport counters come along.
        assert!(
            m.samples
                .iter()
                .any(|x| x.metric.starts_with("libp2p_bandwidth_bytes")),
            "{text}"
        );
    }
    assert_eq!(value(&s, "drift_vms", &[]), Some(1.0), "{source}");
    assert_eq!(value(&t, "drift_vms", &[]), Some(1.0), "{target}");

    // The same exposition on the TCP listener, and nothing else there.
    let over_tcp = scrape(&http_get(&metrics_addr, "/metrics"));
    assert_eq!(
        value(&over_tcp, "drift_migrations_total", &committed),
        Some(1.0)
    );
    let mut other = std::net::TcpStream::connect(&metrics_addr).unwrap();
    write!(other, "GET /v1/status HTTP/1.0\r\nHost: drift\r\n\r\n").unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 404") || answer.starts_with("HTTP/1.0 404"),
        "{answer}"
    );
}
