//! The binary's basic contract: help, version, usage errors, keygen refusing to overwrite.

use std::process::Command;

fn drift() -> Command {
    Command::new(env!("CARGO_BIN_EXE_drift"))
}

#[test]
fn help_lists_commands_and_usage_errors_exit_2() {
    let out = drift().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["keygen", "id", "roster"] {
        assert!(help.contains(cmd), "help lacks {cmd}: {help}");
    }
    let out = drift().arg("no-such-command").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn keygen_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let first = drift()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(first.status.success());
    let again = drift()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = drift()
        .args(["keygen", "--force", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(forced.status.success());
    assert_ne!(first.stdout, forced.stdout, "--force must make a new key");
}

#[test]
fn completions_and_man_pages_describe_the_real_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = drift().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "completions {shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        for cmd in ["migrate", "migrations", "testnet"] {
            assert!(script.contains(cmd), "{shell} completion lacks {cmd}");
        }
    }
    let out = drift().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );

    let out = drift().arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH drift"),
        "{page}"
    );
    assert!(page.contains("migrate"), "the page lists the subcommands");

    let dir = tempfile::tempdir().unwrap();
    let out = drift()
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let migrate = std::fs::read_to_string(dir.path().join("drift-migrate.1")).unwrap();
    assert!(
        migrate.contains("bandwidth"),
        "drift-migrate.1 lacks its flags"
    );
    // Nested subcommands get pages of their own; hidden ones none.
    assert!(dir.path().join("drift-vm-create.1").exists());
    assert!(!dir.path().join("drift-vmm.1").exists());
}
