//! `drift doctor [--config FILE]`: checks what a node needs before (or while) it runs, one
//! line per check, and exits 1 if any check failed.
//!
//! Offline checks read the configuration and the files it names: the key (present, parses,
//! not readable by others), the roster (signed by the configured admin, not expired, names
//! this node), the state directory, the listen addresses (free, or held by this node's own
//! running daemon), QEMU (its version, whether KVM is usable) and the image directories. If
//! a daemon answers on the admin socket, its view of this host's clock against its peers'
//! is checked too.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use drift_protocol::roster;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

use crate::config::Config;
use crate::control::{client, StatusView};
use crate::hypervisor::qemu::{self, Accel, QemuVersion, MULTIFD_MIN_VERSION};
use crate::identity::{read_key, read_signed_roster};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The node's config file.
    #[arg(long, short, default_value = "/etc/drift/drift.toml")]
    pub config: PathBuf,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

struct Report {
    lines: Vec<(Verdict, &'static str, String)>,
}

impl Report {
    fn add(&mut self, v: Verdict, what: &'static str, detail: impl Into<String>) {
        self.lines.push((v, what, detail.into()));
    }

    fn print(&self) -> bool {
        for (v, what, detail) in &self.lines {
            let tag = match v {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            println!("{tag}  {what:<10} {detail}");
        }
        let failed = self.lines.iter().filter(|l| l.0 == Verdict::Fail).count();
        let warned = self.lines.iter().filter(|l| l.0 == Verdict::Warn).count();
        println!(
            "{} checks: {failed} failed, {warned} warnings",
            self.lines.len()
        );
        failed == 0
    }
}

pub(super) fn doctor(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut r = Report { lines: Vec::new() };
    let config = match Config::load(&args.config) {
        Ok(c) => {
            r.add(Verdict::Ok, "config", args.config.display().to_string());
            c
        }
        Err(e) => {
            r.add(Verdict::Fail, "config", e.to_string());
            r.print();
            return Ok(ExitCode::FAILURE);
        }
    };
    let me = check_key(&mut r, &config.node.key);
    check_roster(&mut r, &config, me);
    let running = check_state_dir(&mut r, &config.node.state_dir);
    for addr in &config.node.listen {
        check_listen(&mut r, addr, running);
    }
    if config.data.enabled {
        let data = config.data.listen_addr(&config.node.listen);
        check_tcp(&mut r, "data", data, running);
    }
    if let Some(addr) = config.control.metrics_listen {
        check_tcp(&mut r, "metrics", addr, running);
    }
    check_qemu(&mut r, &config.qemu.image_dirs);
    check_clock(&mut r, &config.socket_path());
    Ok(if r.print() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check_key(r: &mut Report, path: &Path) -> Option<drift_protocol::NodeId> {
    match read_key(path) {
        Ok(key) => {
            let id = key.public();
            r.add(
                Verdict::Ok,
                "key",
                format!("{} (node {id}), readable by its owner only", path.display()),
            );
            Some(id)
        }
        Err(e) => {
            r.add(Verdict::Fail, "key", e.to_string());
            None
        }
    }
}

/// A roster that expires within this long is worth a warning.
const EXPIRY_WARNING_MS: u64 = 7 * 24 * 3600 * 1000;

fn check_roster(r: &mut Report, config: &Config, me: Option<drift_protocol::NodeId>) {
    let path = &config.node.roster;
    let signed = match read_signed_roster(path) {
        Ok(s) => s,
        Err(e) => return r.add(Verdict::Fail, "roster", e.to_string()),
    };
    let now = crate::clock::now();
    let trust = config.node.trust();
    let roster = match roster::verify(&signed, &trust, Some(now)) {
        Ok(roster) => roster,
        Err(e) => {
            return r.add(
                Verdict::Fail,
                "roster",
                format!(
                    "{}: {e} (the config trusts {trust}: {})",
                    path.display(),
                    trust
                        .keys
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        }
    };
    let left = roster.not_after.millis_since(now);
    let expiry = format!(
        "valid until {} (in {} days)",
        roster.not_after,
        left / 86_400_000
    );
    if left < EXPIRY_WARNING_MS {
        r.add(
            Verdict::Warn,
            "roster",
            format!("{expiry}: sign a new epoch soon"),
        );
    }
    r.add(
        Verdict::Ok,
        "roster",
        format!(
            "{}: cluster {}, epoch {}, {} members, signed by {trust}, {expiry}",
            path.display(),
            roster.cluster,
            roster.epoch,
            roster.members.len()
        ),
    );
    if let Some(me) = me {
        match roster.member(&me) {
            Some(m) => r.add(Verdict::Ok, "member", format!("this node is {:?}", m.name)),
            None if config.node.insecure_open => r.add(
                Verdict::Warn,
                "member",
                "this node is not in the roster (insecure_open: it runs anyway)",
            ),
            None => r.add(
                Verdict::Fail,
                "member",
                format!(
                    "this node ({me}) is not in roster epoch {}: the admin must add it",
                    roster.epoch
                ),
            ),
        }
    }
}

/// Checks the state directory; returns whether a daemon holds its lock (runs on it).
fn check_state_dir(r: &mut Report, dir: &Path) -> bool {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            let writable = nix::unistd::access(parent, nix::unistd::AccessFlags::W_OK).is_ok();
            r.add(
                if writable {
                    Verdict::Warn
                } else {
                    Verdict::Fail
                },
                "state",
                format!(
                    "{} does not exist yet{}",
                    dir.display(),
                    if writable {
                        " (created mode 0700 at start)"
                    } else {
                        "; its parent is not writable, so the node cannot create it"
                    }
                ),
            );
            return false;
        }
        Err(e) => {
            r.add(Verdict::Fail, "state", format!("{}: {e}", dir.display()));
            return false;
        }
    };
    if !meta.is_dir() {
        r.add(
            Verdict::Fail,
            "state",
            format!("{} is not a directory", dir.display()),
        );
        return false;
    }
    if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
        r.add(
            Verdict::Fail,
            "state",
            format!("{} is not writable by this user", dir.display()),
        );
        return false;
    }
    let mode = meta.permissions().mode() & 0o777;
    let running = is_locked(&dir.join("lock"));
    r.add(
        if mode & 0o077 == 0 {
            Verdict::Ok
        } else {
            Verdict::Warn
        },
        "state",
        format!(
            "{} (mode {mode:o}{}){}",
            dir.display(),
            if mode & 0o077 == 0 {
                ""
            } else {
                "; the node sets 0700 at start"
            },
            if running { "; a daemon runs on it" } else { "" }
        ),
    );
    running
}

/// Whether a daemon holds the state directory's lock.
fn is_locked(path: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else {
        return false;
    };
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
}

fn check_listen(r: &mut Report, addr: &Multiaddr, running: bool) {
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) => {
                if let Some(ip) = ip {
                    return check_tcp(r, "listen", SocketAddr::new(ip, port), running);
                }
            }
            Protocol::Udp(port) => {
                if let Some(ip) = ip {
                    let sa = SocketAddr::new(ip, port);
                    return match UdpSocket::bind(sa) {
                        Ok(_) => r.add(Verdict::Ok, "listen", format!("{addr}: free")),
                        Err(e) => in_use(r, "listen", addr.to_string(), e, running),
                    };
                }
            }
            _ => {}
        }
    }
    r.add(
        Verdict::Warn,
        "listen",
        format!("{addr}: not an IP address with a port; not checked"),
    );
}

fn check_tcp(r: &mut Report, what: &'static str, addr: SocketAddr, running: bool) {
    match TcpListener::bind(addr) {
        Ok(_) => r.add(Verdict::Ok, what, format!("{addr}: free")),
        Err(e) => in_use(r, what, addr.to_string(), e, running),
    }
}

fn in_use(r: &mut Report, what: &'static str, addr: String, e: std::io::Error, running: bool) {
    if e.kind() == std::io::ErrorKind::AddrInUse && running {
        r.add(
            Verdict::Ok,
            what,
            format!("{addr}: in use, by this node's running daemon"),
        );
    } else {
        r.add(Verdict::Fail, what, format!("{addr}: {e}"));
    }
}

fn check_qemu(r: &mut Report, image_dirs: &[PathBuf]) {
    let binary = qemu::binary();
    let banner = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    // Without image directories no QEMU VM arrives here; QEMU matters only for VMs started here.
    let needed = if image_dirs.is_empty() {
        Verdict::Warn
    } else {
        Verdict::Fail
    };
    match banner.as_deref().and_then(QemuVersion::parse) {
        Some(v) if v >= MULTIFD_MIN_VERSION => {
            r.add(Verdict::Ok, "qemu", format!("{} {v}", binary.display()))
        }
        Some(v) => r.add(
            needed,
            "qemu",
            format!(
                "{} {v}: multifd migration needs {MULTIFD_MIN_VERSION} or newer",
                binary.display()
            ),
        ),
        None => r.add(
            needed,
            "qemu",
            format!(
                "{} does not run (QEMU VMs unavailable; sandbox VMs work)",
                binary.display()
            ),
        ),
    }
    match Accel::detect() {
        Accel::Kvm => r.add(Verdict::Ok, "kvm", "/dev/kvm usable: guests run under KVM"),
        Accel::Tcg => r.add(
            Verdict::Warn,
            "kvm",
            "no usable /dev/kvm (absent, not read-write for this user, or PVM): guests run \
             under TCG, much slower",
        ),
    }
    for dir in image_dirs {
        match std::fs::read_dir(dir) {
            Ok(entries) => r.add(
                Verdict::Ok,
                "images",
                format!("{}: {} entries", dir.display(), entries.count()),
            ),
            Err(e) => r.add(Verdict::Fail, "images", format!("{}: {e}", dir.display())),
        }
    }
}

fn check_clock(r: &mut Report, socket: &Path) {
    let status = super::daemon_runtime().ok().and_then(|rt| {
        rt.block_on(client::get::<StatusView>(socket, "/v1/status"))
            .ok()
    });
    match status {
        None => r.add(
            Verdict::Warn,
            "clock",
            format!(
                "no daemon answers on {}: this host's clock is compared with its peers' \
                 only by a running node",
                socket.display()
            ),
        ),
        Some(s) => match s.clock_off {
            Some(off) => r.add(Verdict::Fail, "clock", off.describe()),
            None => r.add(
                Verdict::Ok,
                "clock",
                format!(
                    "agrees with the peers' reports ({} accepted, {} too old, {} from the future)",
                    s.reports_accepted,
                    s.reports_rejected.get("too_old").copied().unwrap_or(0),
                    s.reports_rejected.get("from_future").copied().unwrap_or(0)
                ),
            ),
        },
    }
}
