//! drift-protocol must stay pure: no async runtime, no networking crate, no I/O. This test reads
//! the crate's manifest and sources and fails on anything that would break that. (`.ci/run`
//! also checks the resolved dependency tree with `cargo tree`.)

use std::fs;
use std::path::Path;

/// The only crates drift-protocol may depend on (normal dependencies).
const ALLOWED_DEPS: &[&str] = &[
    "serde",
    "serde_bytes",
    "postcard",
    "ed25519-dalek",
    "blake3",
    "thiserror",
    "zeroize",
    "rand_core",
    "bs58",
    "hex",
    // Pure block compression for packed pages (no I/O, no threads).
    "lz4_flex",
];

/// Paths whose use would mean I/O, a clock, threads or the environment.
const FORBIDDEN: &[&str] = &[
    "std::fs",
    "std::net",
    "std::io",
    "std::process",
    "std::thread",
    "std::env",
    "SystemTime",
    "Instant::now",
    "OsRng",
    "tokio",
    "libp2p",
    "println!",
    "eprintln!",
];

#[test]
fn manifest_lists_only_pure_dependencies() {
    let manifest = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .expect("read protocol/Cargo.toml");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("a [dependencies] section")
        .split("\n[")
        .next()
        .unwrap_or("");
    let mut seen = 0;
    for line in deps.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or("").trim();
        assert!(
            ALLOWED_DEPS.contains(&name),
            "drift-protocol depends on {name:?}, which is not on the list of pure dependencies"
        );
        seen += 1;
    }
    assert!(
        seen >= 5,
        "parsed only {seen} dependencies: manifest layout changed?"
    );
}

#[test]
fn sources_do_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = 0;
    // Every source file, in every module directory (bounded depth).
    let mut paths = Vec::new();
    let mut dirs = vec![(src, 0)];
    while let Some((dir, depth)) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read a source directory") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() && depth < 4 {
                dirs.push((path, depth + 1));
            } else {
                paths.push(path);
            }
        }
    }
    for path in paths {
        if path.extension().is_some_and(|e| e == "rs") {
            files += 1;
            let text = fs::read_to_string(&path).expect("read source");
            // Only code counts: strip line comments (docs may mention what is not done).
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for bad in FORBIDDEN {
                    assert!(
                        !code.contains(bad),
                        "{}:{}: uses {bad}, which is I/O or impure",
                        path.display(),
                        n + 1
                    );
                }
            }
        }
    }
    assert!(files >= 12, "found only {files} source files");
}
