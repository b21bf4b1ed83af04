//! k-of-n admins with real nodes: an epoch names three admins of which two must sign the next
//! one. An epoch signed by one of them is refused by every node; one signed by two (each
//! signing on their own, in any order) is adopted everywhere by gossip; an admin that epoch
//! removed can no longer sign; and a node restarted after it starts at the adopted epoch.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use drift_tests::{drift, drift_ok, wait_until, Cluster};

#[test]
fn an_epoch_needs_the_threshold_of_the_previous_epochs_admins_on_every_node() {
    let mut c = Cluster::start(3, Duration::from_millis(250));
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let dir = c.path();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let sock = |i: usize| c.nodes[i].node.socket.to_str().unwrap().to_string();
    let admins: Vec<String> = ["a1", "a2", "a3", "a4"]
        .iter()
        .map(|n| {
            drift_ok(&["keygen", "--out", &p(&format!("{n}.key"))])
                .trim()
                .to_string()
        })
        .collect();
    let epoch_on = |c: &Cluster, i: usize| c.status(i).map(|s| s.roster_epoch);

    // Epoch 2, signed by the testnet's single admin, hands the cluster to a1, a2, a3: 2 of 3.
    let mut draft = std::fs::read_to_string(p("roster.toml")).unwrap();
    draft = draft.replacen(
        "cluster = ",
        &format!(
            "admins = [\"{}\", \"{}\", \"{}\"]\nthreshold = 2\ncluster = ",
            admins[0], admins[1], admins[2]
        ),
        1,
    );
    std::fs::write(p("roster.toml"), &draft).unwrap();
    let signed = drift(&[
        "roster",
        "sign",
        &p("roster.toml"),
        "--admin-key",
        &p("admin.key"),
        "--out",
        &p("e2"),
        "--prev",
        &p("roster"),
    ]);
    assert!(signed.status.success(), "{signed:?}");
    let shown = drift_ok(&["roster", "show", &p("e2")]);
    assert!(shown.contains("needs 2 of 3 admins"), "{shown}");
    drift_ok(&["roster", "push", &p("e2"), "--socket", &sock(0)]);
    for i in 0..3 {
        wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
            (epoch_on(&c, i)? == 2).then_some(())
        })
        .unwrap_or_else(|| panic!("node-{} adopts epoch 2", i + 1));
    }

    // Epoch 3 removes a3 and adds a4 (2 of a1, a2, a4). Signed by a1 alone: k - 1.
    let draft = draft.replace(&admins[2], &admins[3]);
    std::fs::write(p("roster.toml"), &draft).unwrap();
    drift_ok(&[
        "roster",
        "sign",
        &p("roster.toml"),
        "--admin-key",
        &p("a1.key"),
        "--out",
        &p("e3"),
        "--prev",
        &p("e2"),
    ]);
    let anchor = drift_ok(&["id", &p("admin.key")]).trim().to_string();
    let verify = |file: &str| {
        drift(&[
            "roster",
            "verify",
            &p(file),
            "--admin",
            &anchor,
            "--prev",
            &p("e2"),
        ])
    };
    let out = verify("e3");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("signed by 1 of the 3") && err.contains("2 needed"),
        "{err}"
    );
    // The testnet's own admin (who signed epoch 2) no longer counts either.
    let mut by_old = std::fs::read(p("e3")).unwrap();
    std::fs::write(p("e3.old"), &by_old).unwrap();
    drift_ok(&[
        "roster",
        "sign",
        &p("e3.old"),
        "--admin-key",
        &p("admin.key"),
    ]);
    // Refused by every node it is pushed to; none moves.
    for file in ["e3", "e3.old"] {
        for i in 0..3 {
            let out = drift(&["roster", "push", &p(file), "--socket", &sock(i)]);
            assert_eq!(out.status.code(), Some(1), "node-{} took {file}", i + 1);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("needed"), "{err}");
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..3 {
        assert_eq!(epoch_on(&c, i), Some(2), "node-{}", i + 1);
    }

    // a3, still an admin of epoch 2, adds the second signature on its own machine (a copy of
    // the file): adopted, and spread to every node by gossip.
    by_old = std::fs::read(p("e3")).unwrap();
    std::fs::write(p("e3.a3"), &by_old).unwrap();
    drift_ok(&["roster", "sign", &p("e3.a3"), "--admin-key", &p("a3.key")]);
    let ok = verify("e3.a3");
    assert!(ok.status.success(), "{ok:?}");
    let ok = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.contains("(2 of 3 admins needed: met)"), "{ok}");
    drift_ok(&["roster", "push", &p("e3.a3"), "--socket", &sock(1)]);
    for i in 0..3 {
        wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
            (epoch_on(&c, i)? == 3).then_some(())
        })
        .unwrap_or_else(|| panic!("node-{} adopts epoch 3", i + 1));
    }

    // Epoch 4: a3, removed by epoch 3, can no longer sign it with a1 (made here, as the CLI
    // refuses to make it).
    let e3 = drift_node::identity::read_signed_roster(&dir.join("e3.a3")).unwrap();
    let key = |n: &str| drift_node::identity::read_key(&dir.join(format!("{n}.key"))).unwrap();
    let now = drift_protocol::Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    );
    let e4 = drift_node::identity::read_draft(&dir.join("roster.toml"))
        .unwrap()
        .to_roster(4, Some(e3.hash()), now, now.plus_millis(86_400_000))
        .unwrap();
    let mut e4 = drift_protocol::roster::Endorsed::sign(&e4, &key("a3"));
    e4.endorse(&key("a1")).unwrap();
    drift_node::identity::write_signed_roster(
        &dir.join("e4"),
        &e4,
        drift_node::durable::Overwrite::Refuse,
    )
    .unwrap();
    let out = drift(&["roster", "push", &p("e4"), "--socket", &sock(2)]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an epoch signed by a removed admin"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("signed by 1 of the 3"));
    let out = drift(&[
        "roster",
        "sign",
        &p("roster.toml"),
        "--admin-key",
        &p("a3.key"),
        "--out",
        &p("e4.again"),
        "--prev",
        &p("e3.a3"),
    ]);
    assert!(!out.status.success(), "the CLI refuses a removed admin too");
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not sign"));

    // A restarted node starts at epoch 3 (walked from its configured epoch 1 through the
    // epochs it saved), not at its configured roster.
    assert!(c.nodes[2].terminate(Duration::from_secs(10)));
    c.nodes[2].start();
    wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        epoch_on(&c, 2)
    })
    .expect("node-3 answers after its restart");
    assert_eq!(epoch_on(&c, 2), Some(3), "{}", c.nodes[2].log_tail());
    assert!(
        c.nodes[2]
            .log_tail_lines(200)
            .contains("using the roster adopted before restart"),
        "{}",
        c.nodes[2].log_tail()
    );
}
