//! The key and roster tools, used as an operator would: keys, a draft, two signed epochs, and
//! every way a roster file can be wrong.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;

use drift_tests::{drift, drift_ok};

#[test]
fn operator_builds_verifies_and_rotates_a_roster() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let admin_id = drift_ok(&["keygen", "--out", &p("admin.key")])
        .trim()
        .to_string();
    assert_eq!(drift_ok(&["id", &p("admin.key")]).trim(), admin_id);
    let mut ids = Vec::new();
    for n in ["a", "b", "c"] {
        ids.push(
            drift_ok(&["keygen", "--out", &p(&format!("{n}.key"))])
                .trim()
                .to_string(),
        );
    }
    drift_ok(&[
        "roster",
        "init",
        "--cluster",
        "lab",
        "--out",
        &p("roster.toml"),
    ]);
    for (n, id) in ["a", "b", "c"].iter().zip(&ids) {
        drift_ok(&[
            "roster",
            "add",
            &p("roster.toml"),
            "--name",
            n,
            "--id",
            id,
            "--label",
            "jurisdiction=de",
            "--cpus",
            "8",
            "--mem-mib",
            "16384",
        ]);
    }
    drift_ok(&[
        "roster",
        "sign",
        &p("roster.toml"),
        "--admin-key",
        &p("admin.key"),
        "--out",
        &p("e1.roster"),
    ]);
    let ok = drift_ok(&["roster", "verify", &p("e1.roster"), "--admin", &admin_id]);
    assert!(ok.contains("epoch 1 with 3 members"), "{ok}");

    let json = drift_ok(&["roster", "show", &p("e1.roster"), "--json"]);
    assert!(
        json.contains(&ids[2]) && json.contains("\"epoch\": 1"),
        "{json}"
    );

    // Revoke c in epoch 2, linked to epoch 1.
    drift_ok(&["roster", "remove", &p("roster.toml"), "c"]);
    drift_ok(&[
        "roster",
        "sign",
        &p("roster.toml"),
        "--admin-key",
        &p("admin.key"),
        "--out",
        &p("e2.roster"),
        "--prev",
        &p("e1.roster"),
    ]);
    let ok = drift_ok(&[
        "roster",
        "verify",
        &p("e2.roster"),
        "--admin",
        &admin_id,
        "--prev",
        &p("e1.roster"),
    ]);
    assert!(ok.contains("epoch 2 with 2 members"), "{ok}");
    let shown = drift_ok(&["roster", "show", &p("e2.roster")]);
    assert!(!shown.contains(&ids[2]) && shown.contains(&ids[0]));

    // Wrong admin.
    let out = drift(&["roster", "verify", &p("e2.roster"), "--admin", &ids[0]]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 needed"));

    // Any flipped byte of the signed file is caught.
    let good = fs::read(p("e2.roster")).unwrap();
    for i in (0..good.len()).step_by(7) {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        fs::write(p("tampered.roster"), &bad).unwrap();
        let out = drift(&[
            "roster",
            "verify",
            &p("tampered.roster"),
            "--admin",
            &admin_id,
        ]);
        assert!(!out.status.success(), "flip at byte {i} went unnoticed");
    }

    // A chain link to the wrong predecessor.
    let out = drift(&[
        "roster",
        "verify",
        &p("e2.roster"),
        "--admin",
        &admin_id,
        "--prev",
        &p("e2.roster"),
    ]);
    assert!(!out.status.success());

    // Keys must be private; refusal names the fix.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p("admin.key"), fs::Permissions::from_mode(0o640)).unwrap();
    let out = drift(&["id", &p("admin.key")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));

    // Missing files are named.
    let out = drift(&["roster", "show", &p("missing.roster")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.roster"));
    let out = drift(&[
        "audit",
        "verify",
        "--file",
        &p("missing.log"),
        "--node",
        &admin_id,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no audit log at"),
        "{out:?}"
    );
}
