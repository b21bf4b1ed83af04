//! Witnessed audit heads with real nodes: peers countersign and keep each other's audit heads,
//! so a node that rewrites its own log (consistently re-signed with its own key) and restarts,
//! or shows two histories to two peers, is caught by `drift audit verify --witnesses`; and
//! forged heads are refused, counted by reason and never countersigned.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::Duration;

use drift_node::audit::{read_log, AuditLog, HEAD_FILE, LOG_FILE};
use drift_node::config::Config;
use drift_node::daemon;
use drift_node::identity::read_key;
use drift_node::mesh::Topic;
use drift_protocol::codec::encode_frame;
use drift_protocol::witness::{AuditHead, WitnessBook};
use drift_protocol::{AuditEvent, Hash, NodeId, SecretKey, Signed, Timestamp};
use drift_tests::{drift, drift_ok, set_bootstrap, wait_until, Cluster};

const INTERVAL: Duration = Duration::from_millis(250);

/// Heads checked every 300 ms instead of 10 s.
fn fast_heads(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let text = text.replace("[gossip]\n", "[gossip]\naudit_head_interval = \"300ms\"\n");
    std::fs::write(config, text).unwrap();
}

fn cluster(n: usize) -> Cluster {
    let c = Cluster::generate(n, INTERVAL);
    for node in &c.nodes {
        fast_heads(&node.node.config);
    }
    c
}

/// The witnessed heads a running node holds.
fn book_of(socket: &Path) -> Option<WitnessBook> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bytes = rt
        .block_on(drift_node::control::client::get_bytes(
            socket,
            "/v1/audit/witnessed",
        ))
        .ok()?;
    drift_protocol::codec::FrameDecoder::new(64 << 20)
        .decode_exact(&bytes)
        .ok()
}

/// The seqs of `node`'s heads `socket`'s node witnessed.
fn witnessed_seqs(socket: &Path, node: &NodeId) -> Vec<u64> {
    book_of(socket)
        .map(|b| {
            b.of(node)
                .iter()
                .map(|w| w.head.decode_unverified().unwrap().seq)
                .collect()
        })
        .unwrap_or_default()
}

/// `drift audit verify --config CONFIG --witnesses S ...`.
fn verify_against(config: &str, sources: &[&Path]) -> std::process::Output {
    let mut args = vec!["audit", "verify", "--config", config];
    for s in sources {
        args.push("--witnesses");
        args.push(s.to_str().unwrap());
    }
    drift(&args)
}

/// Replaces a stopped node's audit log by a different history of `len` records, consistently
/// signed with its own key and anchored, as a thief of its key would.
fn rewrite_log(state_dir: &Path, key: &SecretKey, len: u64) {
    std::fs::remove_file(state_dir.join(LOG_FILE)).unwrap();
    std::fs::remove_file(state_dir.join(HEAD_FILE)).unwrap();
    let mut log = AuditLog::open(state_dir, key.clone()).unwrap();
    for i in 0..len {
        log.append(AuditEvent::RosterAdopted {
            epoch: 1,
            hash: Hash::of(format!("another history {i}").as_bytes()),
        })
        .unwrap();
    }
}

#[test]
fn a_node_that_rewrites_its_log_and_restarts_is_caught_by_its_witnesses() {
    let mut c = cluster(3);
    for n in &mut c.nodes {
        n.start();
    }
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let victim = c.nodes[2].node.id;
    let socks: Vec<std::path::PathBuf> = c.nodes.iter().map(|n| n.node.socket.clone()).collect();
    let sock = |i: usize| socks[i].clone();
    let config = c.nodes[2].node.config.to_str().unwrap().to_string();
    for i in 0..2 {
        wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
            (!witnessed_seqs(&sock(i), &victim).is_empty()).then_some(())
        })
        .unwrap_or_else(|| panic!("node-{} witnesses node-3's head", i + 1));
    }
    let out = verify_against(&config, &[&sock(0), &sock(1)]);
    let ok = String::from_utf8_lossy(&out.stdout);
    assert!(ok.contains("witnessed by 2 peer(s)"), "{out:?}");

    // node-3 stops, rewrites its whole history under its own key, and comes back.
    assert!(c.nodes[2].terminate(Duration::from_secs(10)));
    let key = read_key(&c.nodes[2].node.dir.join("node.key")).unwrap();
    let len = read_log(&c.nodes[2].state_dir().join(LOG_FILE))
        .unwrap()
        .records
        .len() as u64;
    rewrite_log(&c.nodes[2].state_dir(), &key, len);
    c.nodes[2].start();
    c.wait_converged(Duration::from_secs(60)).unwrap();
    // On its own, the rewritten log verifies: signatures, chain and anchor agree.
    let alone = drift_ok(&["audit", "verify", "--config", &config]);
    assert!(alone.starts_with("ok: "), "{alone}");
    // Against its witnesses it does not, and the first contradicted head is named.
    let out = verify_against(&config, &[&sock(0), &sock(1)]);
    assert_eq!(out.status.code(), Some(1), "a rewritten log passed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("contradicts what its peers witnessed") && err.contains("was rewritten"),
        "{err}"
    );
    // The witnesses kept the old heads although node-3 now publishes new ones.
    wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        (witnessed_seqs(&sock(0), &victim).len() >= 2).then_some(())
    })
    .expect("node-1 keeps old and new heads of node-3");
}

#[test]
fn a_history_forked_between_two_peers_is_caught() {
    let mut c = cluster(3);
    let dir = c.path();
    let victim = c.nodes[2].node.id;
    let sock = |c: &Cluster, i: usize| c.nodes[i].node.socket.clone();
    let config = c.nodes[2].node.config.to_str().unwrap().to_string();
    let key = read_key(&c.nodes[2].node.dir.join("node.key")).unwrap();

    // History A, shown to node-1 only (node-2 is down).
    c.nodes[0].start();
    c.nodes[2].start();
    c.wait_converged_subset(&[0, 2], 2, Duration::from_secs(60))
        .unwrap();
    let seen_a = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let s = witnessed_seqs(&sock(&c, 0), &victim);
        (!s.is_empty()).then_some(s)
    })
    .expect("node-1 witnesses node-3");
    // node-1's heads, exported before it goes away.
    let export = dir.join("node-1.witnessed");
    drift_ok(&[
        "audit",
        "witnessed",
        "--socket",
        sock(&c, 0).to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    let listed = drift_ok(&[
        "audit",
        "witnessed",
        "--socket",
        sock(&c, 0).to_str().unwrap(),
    ]);
    assert!(listed.contains(&victim.short()), "{listed}");
    assert!(c.nodes[0].terminate(Duration::from_secs(10)));
    assert!(c.nodes[2].terminate(Duration::from_secs(10)));

    // History B, as long as A or longer, shown to node-2 only.
    let a_len = read_log(&c.nodes[2].state_dir().join(LOG_FILE))
        .unwrap()
        .records
        .len() as u64;
    rewrite_log(&c.nodes[2].state_dir(), &key, a_len);
    c.nodes[1].start();
    c.nodes[2].start();
    c.wait_converged_subset(&[1, 2], 2, Duration::from_secs(60))
        .unwrap();
    wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        (!witnessed_seqs(&sock(&c, 1), &victim).is_empty()).then_some(())
    })
    .expect("node-2 witnesses node-3");

    // Either peer alone agrees with one history; together they expose the fork.
    let s2 = sock(&c, 1);
    let out = verify_against(&config, &[&s2]);
    assert!(out.status.success(), "{out:?}");
    let out = verify_against(&config, &[&export, &s2]);
    assert_eq!(out.status.code(), Some(1), "a forked history passed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("contradicts what its peers witnessed")
            && err.contains(&c.nodes[0].node.id.to_string()),
        "node-1's head {seen_a:?} is not named: {err}"
    );
}

#[test]
fn forged_heads_are_refused_counted_and_never_countersigned() {
    // X = node-1; node-2 never runs (the victim); node-3..5 are adversaries in this process,
    // connected only to X, each sending one kind of forged head (a refused message costs its
    // sender its gossip score, so one case per adversary).
    let mut c = cluster(5);
    let x_addr = format!("tcp/{}/", c.nodes[0].node.port);
    for n in &c.nodes[2..] {
        let text = std::fs::read_to_string(&n.node.config).unwrap();
        let kept: Vec<String> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("\"/ip4/") && l.contains(&x_addr))
            .map(|l| l.trim().trim_end_matches(',').trim_matches('"').to_string())
            .collect();
        set_bootstrap(&n.node.config, &kept);
    }
    c.nodes[0].start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut adversaries = Vec::new();
    for n in &c.nodes[2..] {
        let config = Config::load(&n.node.config).unwrap();
        let key = read_key(&config.node.key).unwrap();
        adversaries.push((key, rt.block_on(daemon::start(config)).unwrap()));
    }
    let x = c.nodes[0].node.socket.clone();
    // X witnesses each adversary's honest heads: the topic's mesh is up.
    for (key, _) in &adversaries {
        wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            (!witnessed_seqs(&x, &key.public()).is_empty()).then_some(())
        })
        .expect("X witnesses an adversary's honest head");
    }
    let victim = c.nodes[1].node.id;
    let head = |node: NodeId| AuditHead {
        node,
        seq: 1_000,
        hash: Hash::of(b"forged"),
        at: Timestamp(0),
    };
    let outsider = SecretKey::generate(&mut rand_core::OsRng);
    let victim_sig = Signed::sign(&head(victim), &adversaries[2].0);
    let (bytes, _, sig) = victim_sig.into_parts();
    let cases = [
        // An adversary signs a head that names the victim.
        (
            "signer_not_node",
            0,
            encode_frame(&Signed::sign(&head(victim), &adversaries[0].0)),
        ),
        // A key outside the roster signs its own head.
        (
            "not_a_member",
            1,
            encode_frame(&Signed::sign(&head(outsider.public()), &outsider)),
        ),
        // The victim's name and id as signer, with a signature that is not the victim's.
        (
            "bad_signature",
            2,
            encode_frame(&Signed::<AuditHead>::from_parts(bytes, victim, sig)),
        ),
    ];
    for (label, who, frame) in &cases {
        let sent = rt
            .block_on(
                adversaries[*who]
                    .1
                    .mesh
                    .publish(Topic::AuditHeads, frame.clone()),
            )
            .unwrap();
        assert_eq!(sent, Ok(()), "adversary could not publish {label}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let m = drift_ok(&["metrics", "--socket", x.to_str().unwrap()]);
        cases
            .iter()
            .all(|(label, _, _)| {
                m.contains(&format!(
                    "drift_audit_heads_rejected_total{{reason=\"{label}\"}} 1"
                ))
            })
            .then_some(m)
    });
    assert!(
        metrics.is_some(),
        "X did not count every forged head: {}",
        drift_ok(&["metrics", "--socket", x.to_str().unwrap()])
    );
    let book = book_of(&x).unwrap();
    assert!(book.of(&victim).is_empty(), "X countersigned a forged head");
    assert!(book.of(&outsider.public()).is_empty());
    assert!(book.conflicts.is_empty());
    for (_, node) in adversaries {
        rt.block_on(node.shutdown());
    }
}
