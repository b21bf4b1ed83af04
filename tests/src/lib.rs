//! Shared harness of drift's integration tests: find the `drift` binary, run it, and wait for
//! conditions with deadlines instead of sleeps.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The `drift` binary of this build: `$DRIFT_BIN`, or `drift` next to the test's `deps/`
/// directory (where `cargo test --workspace` puts it, since drift-node has integration tests).
pub fn drift_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DRIFT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("drift");
    assert!(
        bin.exists(),
        "{} not found: build it with `cargo build -p drift-node` or set DRIFT_BIN",
        bin.display()
    );
    bin
}

/// Runs `drift ARGS` to completion.
pub fn drift(args: &[&str]) -> Output {
    Command::new(drift_bin())
        .args(args)
        .env("DRIFT_LOG", "warn")
        .output()
        .expect("spawn drift")
}

/// stdout of a run that must succeed.
pub fn drift_ok(args: &[&str]) -> String {
    let out = drift(args);
    assert!(
        out.status.success(),
        "drift {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Polls `cond` until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}
