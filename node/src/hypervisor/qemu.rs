//! The `qemu` backend: real VMs, one `qemu-system-x86_64` process each, driven over QMP.
//!
//! A QEMU VM lives in the same kind of directory as a sandbox VM (`<state_dir>/vms/<id>/`):
//! `vm.toml` (its spec, with a `[qemu]` table), `qmp.sock` (QEMU's control socket),
//! `serial.log` (the guest's serial console), `qemu.pid` and `qemu.log`. QEMU runs daemonized
//! in its own session, so, like a sandbox VMM (and like QEMU under libvirt), it outlives a
//! restart or a crash of its node; the node finds it again by its directory.
//!
//! The node holds one QMP connection per VM ([`QemuVms::qmp`]) and shares it: status queries,
//! `drift vms` and the migration engine all use it at once (QMP answers carry the id of their
//! command). Acceleration is KVM when `/dev/kvm` opens read-write, TCG otherwise; the node says
//! which when it starts a VM, and `drift vms --json` shows it. The guest CPU model is the fixed
//! `qemu64`, so a VM migrates between any two hosts that run it (a host-passthrough CPU would
//! tie it to one processor model).
//!
//! An incoming VM (the target of a migration) starts with `-incoming defer -S`: QEMU waits for
//! `migrate-incoming`, and after the migration the guest stays paused until the node, having
//! durably recorded the commit, sends `cont`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drift_protocol::migration::QemuVm;
use serde::{Deserialize, Serialize};

use super::qmp::{Qmp, QmpError};
use super::{HypervisorError, RunState, VmSpec};

/// QEMU's control socket in a VM's directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// The guest's serial console, as a file.
pub const SERIAL_LOG: &str = "serial.log";
const PID_FILE: &str = "qemu.pid";
const QEMU_LOG: &str = "qemu.log";
/// The QEMU binary, unless `DRIFT_QEMU` names another.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";
/// How long a QMP command may take before it counts as failed.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most multifd channels a VM may ask for.
pub const MAX_MULTIFD_CHANNELS: u32 = drift_protocol::migration::MAX_MULTIFD_CHANNELS;
/// Most extra QEMU arguments.
const MAX_EXTRA_ARGS: usize = 64;
/// The serial log's tail read for the heartbeat.
const SERIAL_TAIL: u64 = 4096;

/// What a QEMU VM is, beyond memory and vCPUs (in [`VmSpec`]). Paths must name the same
/// files on every host the VM may move to (as for libvirt: shared or identical images).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuSpec {
    /// The guest kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The initial ramdisk (`-initrd`).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (`-append`).
    #[serde(default)]
    pub append: String,
    /// A raw disk image (`-drive file=...,format=raw,if=virtio`).
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// More QEMU arguments, appended as given.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Migrate over this many parallel channels (multifd); 0 is one stream.
    #[serde(default)]
    pub multifd_channels: u32,
}

impl QemuSpec {
    /// Checks what can be checked without QEMU.
    pub fn validate(&self) -> Result<(), HypervisorError> {
        let invalid = |m: String| Err(HypervisorError::Invalid(m));
        if !self.kernel.is_absolute() {
            return invalid(format!(
                "qemu.kernel {}: must be an absolute path",
                self.kernel.display()
            ));
        }
        for (key, p) in [("initrd", &self.initrd), ("disk", &self.disk)] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return invalid(format!(
                        "qemu.{key} {}: must be an absolute path",
                        p.display()
                    ));
                }
            }
        }
        if self.multifd_channels > MAX_MULTIFD_CHANNELS {
            return invalid(format!(
                "qemu.multifd_channels must be at most {MAX_MULTIFD_CHANNELS}"
            ));
        }
        if self.extra_args.len() > MAX_EXTRA_ARGS {
            return invalid(format!(
                "qemu.extra_args: at most {MAX_EXTRA_ARGS} arguments"
            ));
        }
        if self.append.len() > 4096 {
            return invalid("qemu.append: at most 4096 bytes".into());
        }
        Ok(())
    }
}

impl QemuSpec {
    /// The spec as an offer carries it.
    pub fn to_wire(&self) -> QemuVm {
        let text = |p: &Path| p.display().to_string();
        QemuVm {
            kernel: text(&self.kernel),
            initrd: self.initrd.as_deref().map(text),
            append: self.append.clone(),
            disk: self.disk.as_deref().map(text),
            extra_args: self.extra_args.clone(),
            multifd_channels: self.multifd_channels,
        }
    }

    /// The spec an offer carries (checked again by [`QemuSpec::validate`] before use).
    pub fn from_wire(q: &QemuVm) -> Self {
        Self {
            kernel: q.kernel.clone().into(),
            initrd: q.initrd.clone().map(PathBuf::from),
            append: q.append.clone(),
            disk: q.disk.clone().map(PathBuf::from),
            extra_args: q.extra_args.clone(),
            multifd_channels: q.multifd_channels,
        }
    }
}

impl QemuSpec {
    /// Whether a target may start this spec from an offer: no extra arguments, and every file
    /// inside one of `dirs` (after resolving links and `..`). The error says what is wrong.
    pub fn check_incoming(&self, dirs: &[PathBuf]) -> Result<(), String> {
        if dirs.is_empty() {
            return Err(
                "this node takes no QEMU VM by migration (qemu.image_dirs is empty)".into(),
            );
        }
        if !self.extra_args.is_empty() {
            return Err("an offer may not carry extra QEMU arguments".into());
        }
        let allowed: Vec<PathBuf> = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
        for p in std::iter::once(&self.kernel)
            .chain(&self.initrd)
            .chain(&self.disk)
        {
            let real = p
                .canonicalize()
                .map_err(|e| format!("{}: {e}", p.display()))?;
            if !allowed.iter().any(|d| real.starts_with(d)) {
                return Err(format!("{} is not inside qemu.image_dirs", p.display()));
            }
        }
        Ok(())
    }
}

/// A QEMU version (`qemu-system-x86_64 --version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// The oldest QEMU drift migrates over multifd channels. QEMU 7.2 (Debian 12's) loses pages:
/// guests migrated over 4 channels with a bandwidth cap crashed on the target in 5 of 12
/// runs of QEMU alone, with or without `pause-before-switchover`; 10.0 (Debian 12's
/// backports) ran them all. Versions in between are not checked.
pub const MULTIFD_MIN_VERSION: QemuVersion = QemuVersion {
    major: 10,
    minor: 0,
    micro: 0,
};

impl QemuVersion {
    /// From QEMU's banner: `QEMU emulator version 10.0.2 (Debian ...)`.
    pub fn parse(banner: &str) -> Option<Self> {
        let rest = banner.split("version ").nth(1)?;
        let number: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
        Some(Self {
            major: parts.next()??,
            minor: parts.next().flatten().unwrap_or(0),
            micro: parts.next().flatten().unwrap_or(0),
        })
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// How QEMU runs guests on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` opens read-write and is a full KVM, TCG otherwise;
    /// `DRIFT_QEMU_ACCEL=tcg|kvm` overrides. A `/dev/kvm` served by PVM (`kvm_pvm`, the
    /// paravirtualized KVM of some nested cloud machines) runs only kernels built for it: a
    /// stock guest hangs there, so it counts as no KVM.
    pub fn detect() -> Self {
        match std::env::var("DRIFT_QEMU_ACCEL").ok().as_deref() {
            Some("tcg") => return Accel::Tcg,
            Some("kvm") => return Accel::Kvm,
            _ => {}
        }
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        if kvm && !pvm {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest unix socket path the kernel takes (`sun_path` holds 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Checks that a unix socket path fits, naming it when it does not.
pub fn socket_path_fits(path: &Path) -> std::io::Result<()> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is {len} bytes, over the {MAX_SOCKET_PATH} a unix socket takes: \
                 use a shorter state_dir",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The QEMU binary to run.
pub fn binary() -> PathBuf {
    std::env::var_os("DRIFT_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY))
}

/// The command line of a VM's QEMU (without the binary).
pub fn command_line(spec: &VmSpec, q: &QemuSpec, dir: &Path, accel: Accel) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("drift-{},process=drift-{}", spec.name, spec.name),
        "-machine".into(),
        "pc".into(),
        "-accel".into(),
        accel.as_str().into(),
        "-cpu".into(),
        "qemu64".into(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-smp".into(),
        spec.vcpus.max(1).to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-nic".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", path(SERIAL_LOG)),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path(QMP_SOCKET)),
        "-pidfile".into(),
        path(PID_FILE),
        "-daemonize".into(),
        "-kernel".into(),
        q.kernel.display().to_string(),
    ];
    if let Some(initrd) = &q.initrd {
        args.push("-initrd".into());
        args.push(initrd.display().to_string());
    }
    if !q.append.is_empty() {
        args.push("-append".into());
        args.push(q.append.clone());
    }
    if let Some(disk) = &q.disk {
        args.push("-drive".into());
        args.push(format!("file={},format=raw,if=virtio", disk.display()));
    }
    if spec.incoming {
        args.extend(["-incoming".into(), "defer".into(), "-S".into()]);
    }
    args.extend(q.extra_args.iter().cloned());
    args
}

/// The longest migration socket name the tunnel uses in a VM's directory.
fn tunnel_socket_example() -> &'static str {
    "mig-00000000.sock"
}

/// CPU time of a QEMU process at one instant.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    ticks: u64,
    at: Instant,
}

/// The QEMU VMs of one node: processes, their QMP connections and their CPU use.
#[derive(Debug)]
pub struct QemuVms {
    accel: Accel,
    /// The QEMU binary's version, asked once, when first needed.
    version: tokio::sync::OnceCell<Option<QemuVersion>>,
    qmp: tokio::sync::Mutex<BTreeMap<PathBuf, Arc<Qmp>>>,
    cpu: Mutex<BTreeMap<u32, (CpuSample, u32)>>,
}

impl Default for QemuVms {
    fn default() -> Self {
        Self::new(Accel::detect())
    }
}

impl QemuVms {
    /// QEMU VMs run with this acceleration.
    pub fn new(accel: Accel) -> Self {
        Self {
            accel,
            version: tokio::sync::OnceCell::new(),
            qmp: tokio::sync::Mutex::new(BTreeMap::new()),
            cpu: Mutex::new(BTreeMap::new()),
        }
    }

    /// The acceleration VMs started here use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The version of the QEMU binary this node runs (`None`: it could not be run).
    pub async fn version(&self) -> Option<QemuVersion> {
        *self
            .version
            .get_or_init(|| async {
                let out = tokio::process::Command::new(binary())
                    .arg("--version")
                    .output()
                    .await
                    .ok()?;
                QemuVersion::parse(&String::from_utf8_lossy(&out.stdout))
            })
            .await
    }

    /// Whether this node's QEMU may migrate over `channels` multifd channels, and if not,
    /// why.
    pub async fn check_multifd(&self, channels: u32) -> Result<(), String> {
        if channels == 0 {
            return Ok(());
        }
        match self.version().await {
            Some(v) if v >= MULTIFD_MIN_VERSION => Ok(()),
            Some(v) => Err(format!(
                "multifd needs QEMU {MULTIFD_MIN_VERSION} or newer and this host runs {v}: \
                 QEMU 7.2 corrupts guests migrated over multifd channels"
            )),
            None => Err(format!("cannot run {} --version", binary().display())),
        }
    }

    /// Starts a VM's QEMU in `dir` (which holds its spec) and waits until QMP answers.
    pub async fn start(
        &self,
        spec: &VmSpec,
        q: &QemuSpec,
        dir: &Path,
    ) -> Result<(), HypervisorError> {
        q.validate()?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| HypervisorError::Io {
                path,
                cause: source,
            }
        };
        socket_path_fits(&dir.join(QMP_SOCKET)).map_err(io(dir))?;
        socket_path_fits(&dir.join(tunnel_socket_example())).map_err(io(dir))?;
        let _ = std::fs::remove_file(dir.join(QMP_SOCKET));
        let _ = std::fs::remove_file(dir.join(PID_FILE));
        let log = std::fs::File::create(dir.join(QEMU_LOG)).map_err(io(dir))?;
        let args = command_line(spec, q, dir, self.accel);
        tracing::info!(vm = %spec.name, accel = %self.accel, incoming = spec.incoming, "starting QEMU");
        let bin = binary();
        // `-daemonize`: the command returns once the guest is set up, and the VM runs on in
        // its own session, outliving the node.
        let status = tokio::process::Command::new(&bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io(dir))?)
            .stderr(log)
            .process_group(0)
            .status();
        let status = tokio::time::timeout(Duration::from_secs(30), status)
            .await
            .map_err(|_| HypervisorError::Vmm {
                vm: spec.name.clone(),
                message: "QEMU did not start within 30s".into(),
            })?
            .map_err(io(&bin))?;
        if !status.success() {
            let log = std::fs::read_to_string(dir.join(QEMU_LOG)).unwrap_or_default();
            return Err(HypervisorError::Vmm {
                vm: spec.name.clone(),
                message: format!("QEMU exited with {status}: {}", log.trim()),
            });
        }
        self.qmp(dir).await.map_err(|e| HypervisorError::Vmm {
            vm: spec.name.clone(),
            message: format!("QMP: {e}"),
        })?;
        Ok(())
    }

    /// The VM's QMP connection (made on first use, made again after it closed).
    pub async fn qmp(&self, dir: &Path) -> Result<Arc<Qmp>, QmpError> {
        let mut conns = self.qmp.lock().await;
        if let Some(q) = conns.get(dir) {
            if !q.is_closed() {
                return Ok(q.clone());
            }
        }
        let q = Arc::new(Qmp::connect(&dir.join(QMP_SOCKET), Duration::from_secs(5)).await?);
        conns.insert(dir.to_owned(), q.clone());
        Ok(q)
    }

    /// Forgets a VM's connection (it was destroyed).
    async fn forget(&self, dir: &Path) {
        self.qmp.lock().await.remove(dir);
    }

    /// The VM's state as QEMU reports it (`lost` when QMP does not answer).
    pub async fn state(&self, dir: &Path) -> RunState {
        let Ok(qmp) = self.qmp(dir).await else {
            return RunState::Lost;
        };
        match qmp.query_status().await {
            Ok(s) => run_state(&s.status, s.running),
            Err(_) => RunState::Lost,
        }
    }

    /// The QEMU process's id, when it runs.
    pub fn pid(&self, dir: &Path) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(dir.join(PID_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// CPU used by the VM's QEMU since the previous call, permille of this host's capacity
    /// (all its cores); `None` on the first call for a process or when it does not run.
    pub fn cpu_permille(&self, dir: &Path) -> Option<u32> {
        let pid = self.pid(dir)?;
        let ticks = process_ticks(pid)?;
        let now = CpuSample {
            ticks,
            at: Instant::now(),
        };
        let mut cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        let previous = cpu.get(&pid).copied();
        let permille = match previous {
            Some((before, last)) => {
                let secs = now.at.duration_since(before.at).as_secs_f64();
                if secs < 0.2 {
                    // Too short to measure: keep the last figure.
                    return Some(last);
                }
                let cores = std::thread::available_parallelism()
                    .map(|n| n.get() as f64)
                    .unwrap_or(1.0);
                let used = now.ticks.saturating_sub(before.ticks) as f64 / clock_ticks();
                ((used / secs / cores) * 1000.0).round().clamp(0.0, 1000.0) as u32
            }
            None => {
                cpu.insert(pid, (now, 0));
                return None;
            }
        };
        cpu.insert(pid, (now, permille));
        Some(permille)
    }

    /// The guest's newest heartbeat on its serial console (`drift-heartbeat N`), if any.
    pub fn heartbeat(&self, dir: &Path) -> Option<u64> {
        last_heartbeat(&dir.join(SERIAL_LOG))
    }

    /// Stops the VM's QEMU: `quit` over QMP, then SIGKILL if it is still there.
    pub async fn stop(&self, dir: &Path) {
        let pid = self.pid(dir);
        if let Ok(qmp) = self.qmp(dir).await {
            let _ = qmp.quit().await;
        }
        self.forget(dir).await;
        if let Some(pid) = pid {
            self.cpu
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pid);
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Resumes a paused guest here, cancelling first any migration it is sending.
    pub async fn resume(&self, dir: &Path) -> Result<(), QmpError> {
        let qmp = self.qmp(dir).await?;
        resume_here(&qmp).await
    }
}

/// Cancels the outgoing migration QEMU may be running (also one held at
/// `pre-switchover`) and makes sure the guest runs.
pub async fn resume_here(qmp: &Qmp) -> Result<(), QmpError> {
    let outgoing = |status: Option<&str>| {
        matches!(
            status,
            Some("setup" | "active" | "pre-switchover" | "device" | "cancelling")
        )
    };
    if outgoing(qmp.query_migrate().await?.status.as_deref()) {
        qmp.execute("migrate_cancel", None, QMP_TIMEOUT).await?;
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until && outgoing(qmp.query_migrate().await?.status.as_deref()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if !qmp.query_status().await?.running {
        qmp.cont().await?;
    }
    Ok(())
}

/// QEMU's run state in drift's terms.
pub fn run_state(status: &str, running: bool) -> RunState {
    if running {
        return RunState::Running;
    }
    match status {
        "inmigrate" | "prelaunch" => RunState::Incoming,
        _ => RunState::Paused,
    }
}

/// Clock ticks per second of `/proc` CPU figures.
pub(crate) fn clock_ticks() -> f64 {
    // USER_HZ: 100 on every Linux architecture drift runs on.
    100.0
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; 12 and 13 counting from the state field.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The last `drift-heartbeat N` in the tail of a serial log.
pub fn last_heartbeat(path: &Path) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(SERIAL_TAIL)))
        .ok()?;
    let mut tail = Vec::with_capacity(SERIAL_TAIL as usize);
    f.take(SERIAL_TAIL).read_to_end(&mut tail).ok()?;
    parse_heartbeats(&String::from_utf8_lossy(&tail))
        .last()
        .copied()
}

/// Every `drift-heartbeat N` of a serial console's text, in order.
pub fn parse_heartbeats(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            let rest = l
                .trim_start_matches('\r')
                .split("drift-heartbeat ")
                .nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests;
