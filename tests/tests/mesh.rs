//! A cluster of real `drift run` processes on loopback: convergence, a node killed and
//! restarted, graceful shutdown, and the one-command testnet.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use drift_node::table::Liveness;
use drift_tests::{drift, wait_until, Cluster};

const INTERVAL: Duration = Duration::from_millis(200);

#[test]
fn five_nodes_converge_then_mark_a_killed_node_suspect_then_gone_and_welcome_it_back() {
    let mut c = Cluster::start(5, INTERVAL);
    c.wait_converged(Duration::from_secs(60)).unwrap();

    // Every table holds every node with real figures.
    for i in 0..5 {
        let t = c.table(i).expect("table");
        assert_eq!(t.rows.len(), 5);
        assert!(t.rows.iter().all(|r| r.cpu.is_some() && r.seq.is_some()));
        assert_eq!(t.rows.iter().filter(|r| r.me).count(), 1);
    }

    // kill -9 node-5: the others see it suspect (after 5 intervals), then gone (15).
    let victim = c.nodes[4].node.id;
    c.nodes[4].kill9();
    let killed = Instant::now();
    let state_of = |c: &Cluster, i: usize| {
        c.table(i)
            .and_then(|t| t.rows.into_iter().find(|r| r.id == victim))
            .map(|r| r.state)
    };
    let suspect = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (0..4)
            .all(|i| state_of(&c, i) == Some(Liveness::Suspect))
            .then(Instant::now)
    })
    .expect("all four mark node-5 suspect");
    let gone = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (0..4)
            .all(|i| state_of(&c, i) == Some(Liveness::Gone))
            .then(Instant::now)
    })
    .expect("all four mark node-5 gone");
    let (to_suspect, to_gone) = (suspect - killed, gone - killed);
    println!("suspect after {to_suspect:?}, gone after {to_gone:?} (interval {INTERVAL:?})");
    // Documented: suspect once the newest report is 5 intervals old, gone at 15. The newest
    // report left up to one interval before the kill, and polling adds slack.
    assert!(to_suspect >= INTERVAL * 3 && to_suspect <= INTERVAL * 5 + Duration::from_secs(3));
    assert!(to_gone >= INTERVAL * 13 && to_gone <= INTERVAL * 15 + Duration::from_secs(3));
    // Still listed, marked, not dropped.
    assert_eq!(c.table(0).unwrap().rows.len(), 5);

    // Restart it: everyone sees it alive again, including its own fresh table.
    c.nodes[4].start();
    c.wait_converged(Duration::from_secs(30)).unwrap();

    // Graceful shutdown on SIGTERM: exit 0 and the socket is removed.
    let socket = c.nodes[0].node.socket.clone();
    assert!(
        c.nodes[0].terminate(Duration::from_secs(10)),
        "{}",
        c.nodes[0].log_tail()
    );
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn testnet_check_converges_and_exits_zero_and_the_dir_is_reusable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for run in 0..2 {
        let out = drift(&[
            "testnet",
            "--nodes",
            "5",
            "--dir",
            d,
            "--check",
            "--interval",
            "300ms",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {run}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("converged: 5 nodes"), "{stdout}");
        for n in 1..=5 {
            assert!(stdout.contains(&format!("node-{n}")), "{stdout}");
        }
        // Every child was stopped: no socket answers any more.
        for n in 1..=5 {
            let sock = dir.path().join(format!("node-{n}/drift.sock"));
            assert!(!sock.exists(), "node-{n} still has a socket after --check");
        }
    }
}

#[test]
fn cli_reads_a_running_node_and_explains_a_missing_one() {
    let c = Cluster::start(2, INTERVAL);
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let sock = c.nodes[0].node.socket.to_str().unwrap().to_string();
    let out = drift(&["table", "--socket", &sock]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    let header = text.lines().next().unwrap();
    for col in [
        "NAME", "ID", "STATE", "AGE", "CPU", "MEM", "POWER", "VMS", "LABELS",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert_eq!(text.lines().count(), 3, "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&drift(&["table", "--json", "--socket", &sock]).stdout).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["rows"].as_array().unwrap().len(), 2);
    for key in [
        "name",
        "id",
        "state",
        "age_ms",
        "cpu",
        "mem_used_mib",
        "power_watts",
        "vms",
        "labels",
    ] {
        assert!(json["rows"][0].get(key).is_some(), "row lacks {key}");
    }
    let peers = String::from_utf8_lossy(&drift(&["peers", "--socket", &sock]).stdout).to_string();
    assert!(peers.contains("node-2"), "{peers}");
    let status = String::from_utf8_lossy(&drift(&["status", "--socket", &sock]).stdout).to_string();
    assert!(status.contains("2 alive"), "{status}");

    let out = drift(&["status", "--socket", "/nonexistent/drift.sock"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `drift run` running?"));

    // A second node on the same state directory is refused before it touches anything, and
    // the running node's audit log stays intact.
    let config = c.nodes[0].node.config.to_str().unwrap().to_string();
    let second = drift(&["run", "--config", &config]);
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another drift node is running"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(drift(&["audit", "verify", "--config", &config])
        .status
        .success());
    assert!(drift(&["status", "--socket", &sock]).status.success());
}

/// A host whose clock runs ten minutes ahead refuses every peer's report as too old and is
/// refused by all: it says in its log and in `drift status` that its own clock is wrong and by
/// how much, while the hosts with good clocks (one bad peer among two) blame no one's clock.
#[test]
fn a_host_whose_clock_is_ten_minutes_ahead_says_so() {
    let mut c = Cluster::generate(3, INTERVAL);
    c.nodes[0].start_with_env(&[(drift_node::clock::SKEW_ENV, "600000")]);
    c.nodes[1].start();
    c.nodes[2].start();
    c.wait_converged_subset(&[1, 2], 2, Duration::from_secs(60))
        .unwrap();
    let off = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        // Judged every few seconds: once both peers were heard.
        c.status(0)
            .and_then(|s| s.clock_off)
            .filter(|o| o.heard == 2)
    })
    .expect("the skewed host never said its clock is off");
    assert!(
        (590_000..=610_000).contains(&off.ahead_ms),
        "ahead by {} ms",
        off.ahead_ms
    );
    assert_eq!((off.disagreeing, off.heard), (2, 2));
    let status = drift(&[
        "status",
        "--socket",
        c.nodes[0].node.socket.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("clock is probably wrong") && text.contains("ahead of 2 of the 2 peers"),
        "{text}"
    );
    let log = std::fs::read_to_string(c.nodes[0].node.dir.join("drift.log")).unwrap();
    assert!(log.contains("clock is probably wrong"), "not in the log");
    let (ok, text) = doctor(&c, 0);
    assert!(!ok, "{text}");
    assert_eq!(verdicts(&text, "clock"), ["FAIL"], "{text}");
    for i in [1, 2] {
        let s = c.status(i).unwrap();
        assert_eq!(
            s.clock_off,
            None,
            "node-{} blames its own good clock",
            i + 1
        );
        assert!(s.reports_rejected["too_old"] + s.reports_rejected["from_future"] > 0);
    }
}

/// The verdicts (`ok`, `warn`, `FAIL`) `drift doctor` printed for the check `what`.
fn verdicts<'a>(text: &'a str, what: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let tag = words.next()?;
            (words.next() == Some(what)).then_some(tag)
        })
        .collect()
}

fn doctor(c: &Cluster, i: usize) -> (bool, String) {
    let config = c.nodes[i].node.config.to_str().unwrap();
    let out = drift(&["doctor", "--config", config]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `drift doctor` on a node before it runs, while it runs, and with a key others can read.
#[test]
fn doctor_checks_a_node_before_and_while_it_runs() {
    let mut c = Cluster::generate(2, INTERVAL);
    let (ok, text) = doctor(&c, 0);
    assert!(ok, "{text}");
    for what in ["config", "key", "member"] {
        assert_eq!(verdicts(&text, what), ["ok"], "{what}: {text}");
    }
    assert!(verdicts(&text, "roster").contains(&"ok"), "{text}");
    assert!(!verdicts(&text, "listen").is_empty(), "{text}");
    assert!(
        verdicts(&text, "listen").iter().all(|v| *v == "ok"),
        "{text}"
    );
    assert_eq!(verdicts(&text, "clock"), ["warn"], "no daemon yet: {text}");

    for n in &mut c.nodes {
        n.start();
    }
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let (ok, text) = doctor(&c, 0);
    assert!(ok, "{text}");
    assert!(
        text.contains("in use, by this node's running daemon"),
        "{text}"
    );
    assert_eq!(verdicts(&text, "clock"), ["ok"], "{text}");

    let key = c.nodes[0].node.dir.join("node.key");
    assert!(
        key.exists(),
        "the generated key is not where the test expects it"
    );
    let mode = |m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(m)).unwrap();
    };
    mode(0o644);
    let (ok, text) = doctor(&c, 0);
    mode(0o600);
    assert!(!ok, "a key readable by others passed: {text}");
    assert_eq!(verdicts(&text, "key"), ["FAIL"], "{text}");
}
