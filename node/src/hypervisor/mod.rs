//! Hypervisor backends, behind one registry of a node's VMs ([`Vms`]), which starts, lists,
//! resumes and destroys a VM with the backend its spec names:
//!
//! - **sandbox** (the default): synthetic VMs, each in its own `drift vmm` process (see
//!   [`vmm`]), with memory a workload keeps rewriting and a verifier that checks it page by page
//!   (see [`guest`]). It is the correctness oracle of migration and needs no setup. drift's own
//!   engine moves its memory ([`crate::migration::engine`], over [`vmm::Request`]).
//! - **qemu**: real VMs, one QEMU process each, driven over QMP (see [`qemu`], [`qmp`]). QEMU
//!   moves its own memory; drift tunnels QEMU's migration stream through the mesh
//!   ([`crate::migration::tunnel`]).
//!
//! Each VM lives in `<state_dir>/vms/<vm id>/`: `vm.toml` (its spec; a `[qemu]` table makes it
//! a QEMU VM) and the backend's files (`vmm.sock` and `vmm.log`, or `qmp.sock`, `serial.log`,
//! `qemu.pid` and `qemu.log`). The node finds its VMs by listing that directory, so VMs outlive
//! node restarts.

pub mod guest;
pub mod qemu;
pub mod qmp;
pub mod shared;
pub mod vmm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use drift_protocol::codec::{decode_payload, encode_frame, parse_header, HEADER_LEN};
use drift_protocol::migration::Placement;
use drift_protocol::VmId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::durable::{write_atomic, Overwrite};
use guest::VerifyReport;
use vmm::{Request, Response, VmmInfo, MAX_VMM_FRAME};

/// The spec file in a VM's directory.
pub const SPEC_FILE: &str = "vm.toml";
/// The VMM socket in a VM's directory.
pub const SOCKET_FILE: &str = "vmm.sock";
/// At most this many VMs per node.
pub const MAX_VMS: usize = 256;
/// Largest sandbox VM.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;

/// What a VM is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub id: VmId,
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// CPU demand, permille of the host's capacity.
    pub demand_permille: u32,
    /// Pages the workload rewrites per second.
    pub dirty_pages_per_s: u64,
    /// Percent of each page the workload writes random, the rest text that compresses
    /// (sandbox VMs; `None`: all of it random).
    #[serde(default)]
    pub page_random_pct: Option<u8>,
    #[serde(default)]
    pub placement: Placement,
    /// Seeds page contents (and the canary). At most `i64::MAX` (TOML integers are signed).
    pub seed: u64,
    /// Created empty and paused, to receive a migration.
    #[serde(default)]
    pub incoming: bool,
    /// A QEMU VM; `None` for a sandbox VM.
    #[serde(default)]
    pub qemu: Option<qemu::QemuSpec>,
}

impl VmSpec {
    /// The backend's name: `sandbox` or `qemu`.
    pub fn backend(&self) -> &'static str {
        if self.qemu.is_some() {
            "qemu"
        } else {
            "sandbox"
        }
    }
}

/// Whether the VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
    /// Waiting for a migration's memory.
    Incoming,
    /// The VMM is gone (crashed or killed).
    Lost,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Incoming => "incoming",
            RunState::Lost => "lost",
        })
    }
}

/// One VM as `drift vms` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    pub id: VmId,
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub demand_permille: u32,
    pub state: RunState,
    pub pid: Option<u32>,
    pub writes: u64,
    pub placement: Placement,
    /// `sandbox` or `qemu`.
    #[serde(default = "sandbox")]
    pub backend: String,
    /// QEMU VMs: `kvm` or `tcg`.
    #[serde(default)]
    pub accel: Option<String>,
    /// QEMU VMs: the newest heartbeat the guest printed on its serial console.
    #[serde(default)]
    pub heartbeat: Option<u64>,
}

fn sandbox() -> String {
    "sandbox".into()
}

/// What went wrong with a VM.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("no VM named or numbered {0:?} on this node")]
    NoSuchVm(String),
    #[error("a VM named {0:?} already exists on this node")]
    NameTaken(String),
    #[error("invalid VM: {0}")]
    Invalid(String),
    #[error("this node already runs {MAX_VMS} VMs")]
    TooMany,
    #[error("VMM of {vm}: {message}")]
    Vmm { vm: String, message: String },
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The VMs of one node, of either backend.
#[derive(Debug)]
pub struct Vms {
    dir: PathBuf,
    exe: PathBuf,
    known: Mutex<BTreeMap<VmId, VmSpec>>,
    qemu: qemu::QemuVms,
}

pub(crate) async fn call(sock: &Path, req: &Request) -> std::io::Result<Response> {
    let mut stream = connect(sock).await?;
    exchange(&mut stream, req).await
}

/// Connects to a VMM socket (bounded wait).
pub(crate) async fn connect(sock: &Path) -> std::io::Result<UnixStream> {
    tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(sock))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// One request and its answer on an open VMM connection (bounded wait).
pub(crate) async fn exchange(stream: &mut UnixStream, req: &Request) -> std::io::Result<Response> {
    let exchange = async {
        stream.write_all(&encode_frame(req)).await?;
        let mut header = [0u8; HEADER_LEN];
        stream.read_exact(&mut header).await?;
        let len = parse_header(header, MAX_VMM_FRAME)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await?;
        decode_payload::<Response>(&payload)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "VMM did not answer"))?
}

impl Vms {
    /// The VMs of a node, living in `dir`; `exe` is the `drift` binary that runs `drift vmm`
    /// for sandbox VMs.
    pub fn new(dir: PathBuf, exe: PathBuf) -> Self {
        // Absolute: QEMU runs daemonized in `/`, and gets paths inside this directory.
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        Self {
            dir,
            exe,
            known: Mutex::new(BTreeMap::new()),
            qemu: qemu::QemuVms::default(),
        }
    }

    /// The QEMU VMs of this node.
    pub fn qemu(&self) -> &qemu::QemuVms {
        &self.qemu
    }

    fn known(&self) -> std::sync::MutexGuard<'_, BTreeMap<VmId, VmSpec>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// Reads the specs of every VM directory (after a restart).
    pub fn scan(&self) {
        let mut found = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten().take(MAX_VMS) {
                let spec = std::fs::read_to_string(e.path().join(SPEC_FILE))
                    .ok()
                    .and_then(|t| toml::from_str::<VmSpec>(&t).ok());
                if let Some(spec) = spec {
                    found.insert(spec.id, spec);
                }
            }
        }
        *self.known() = found;
    }

    /// The directory of a VM.
    pub fn dir_of(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id)
    }

    /// The specs of every VM here.
    pub fn specs(&self) -> Vec<VmSpec> {
        self.known().values().cloned().collect()
    }

    /// An incoming VM's migration committed: it is this node's VM now (durably recorded in
    /// its spec, written atomically).
    pub fn mark_arrived(&self, id: &VmId) -> std::io::Result<()> {
        let mut known = self.known();
        let Some(spec) = known.get_mut(id) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such VM",
            ));
        };
        spec.incoming = false;
        let text = toml::to_string(&*spec)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        write_atomic(
            &self.vm_dir(id).join(SPEC_FILE),
            text.as_bytes(),
            0o600,
            Overwrite::Replace,
        )
    }

    /// VM count and total demand (permille) of the VMs this node holds.
    pub fn summary(&self) -> (u32, u32) {
        let specs = self.specs();
        let demand = specs
            .iter()
            .map(|s| match &s.qemu {
                // A QEMU VM's demand is what its process uses, measured between two reports.
                Some(_) => self
                    .qemu
                    .cpu_permille(&self.vm_dir(&s.id))
                    .unwrap_or(s.demand_permille),
                None => s.demand_permille,
            })
            .sum();
        (specs.len() as u32, demand)
    }

    /// Finds a VM by name or id.
    pub fn find(&self, name_or_id: &str) -> Result<VmSpec, HypervisorError> {
        let known = self.known();
        known
            .values()
            .find(|s| s.name == name_or_id || s.id.to_string() == name_or_id)
            .cloned()
            .ok_or_else(|| HypervisorError::NoSuchVm(name_or_id.to_string()))
    }

    async fn ask(&self, spec: &VmSpec, req: Request) -> Result<Response, HypervisorError> {
        let sock = self.vm_dir(&spec.id).join(SOCKET_FILE);
        match call(&sock, &req).await {
            Ok(Response::Error(message)) => Err(HypervisorError::Vmm {
                vm: spec.name.clone(),
                message,
            }),
            Ok(r) => Ok(r),
            Err(e) => Err(HypervisorError::Vmm {
                vm: spec.name.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// Starts a VM's VMM process and waits until it answers.
    pub async fn create(&self, spec: VmSpec) -> Result<VmView, HypervisorError> {
        if !drift_protocol::roster::valid_name(&spec.name) {
            return Err(HypervisorError::Invalid(format!(
                "name {:?}: use 1 to 64 of [A-Za-z0-9._-]",
                spec.name
            )));
        }
        if spec.memory_mib == 0 || spec.memory_mib > MAX_MEMORY_MIB {
            return Err(HypervisorError::Invalid(format!(
                "memory_mib must be 1 to {MAX_MEMORY_MIB}"
            )));
        }
        {
            let known = self.known();
            if known.len() >= MAX_VMS {
                return Err(HypervisorError::TooMany);
            }
            if known.values().any(|s| s.name == spec.name) {
                return Err(HypervisorError::NameTaken(spec.name));
            }
        }
        if let Some(q) = &spec.qemu {
            q.validate()?;
        }
        let text = toml::to_string(&spec).map_err(|e| HypervisorError::Invalid(e.to_string()))?;
        let dir = self.vm_dir(&spec.id);
        if let Some(q) = &spec.qemu {
            let started = match self.write_dir(&dir, &text) {
                Ok(()) => self.qemu.start(&spec, q, &dir).await,
                Err(e) => Err(e),
            };
            if let Err(e) = started {
                self.qemu.stop(&dir).await;
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            self.known().insert(spec.id, spec.clone());
            return Ok(self.view_of(&spec).await);
        }
        let started = self.spawn(&dir, &text);
        if let Err(e) = started {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.known().insert(spec.id, spec.clone());
        for _ in 0..200 {
            if let Ok(Response::Info(info)) = self.ask(&spec, Request::Info).await {
                return Ok(view(info));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.known().remove(&spec.id);
        let _ = std::fs::remove_dir_all(&dir);
        Err(HypervisorError::Vmm {
            vm: spec.name,
            message: "did not start within 5s (see its vmm.log)".into(),
        })
    }

    /// Writes the VM's directory with its spec.
    fn write_dir(&self, dir: &Path, spec_text: &str) -> Result<(), HypervisorError> {
        let io = |source| HypervisorError::Io {
            path: dir.to_owned(),
            cause: source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        write_atomic(
            &dir.join(SPEC_FILE),
            spec_text.as_bytes(),
            0o600,
            Overwrite::Replace,
        )
        .map_err(io)
    }

    /// Writes the VM's directory and starts its VMM.
    fn spawn(&self, dir: &Path, spec_text: &str) -> Result<(), HypervisorError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| HypervisorError::Io {
                path,
                cause: source,
            }
        };
        self.write_dir(dir, spec_text)?;
        let log = std::fs::File::create(dir.join("vmm.log")).map_err(io(dir))?;
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("vmm")
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io(dir))?)
            .stderr(log)
            // Its own process group: signals meant for the node never reach the VM.
            .process_group(0)
            .spawn()
            .map_err(io(&self.exe))?;
        // Reap the process when it ends, so a destroyed VM leaves no zombie.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }

    /// Every VM, with its live state (`lost` when its VMM does not answer).
    pub async fn list(&self) -> Vec<VmView> {
        let specs: Vec<VmSpec> = self.known().values().cloned().collect();
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            out.push(self.view_of(&spec).await);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One VM with its live state.
    async fn view_of(&self, spec: &VmSpec) -> VmView {
        let dir = self.vm_dir(&spec.id);
        let mut v = VmView {
            id: spec.id,
            name: spec.name.clone(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            demand_permille: spec.demand_permille,
            state: RunState::Lost,
            pid: None,
            writes: 0,
            placement: spec.placement.clone(),
            backend: spec.backend().into(),
            accel: None,
            heartbeat: None,
        };
        if spec.qemu.is_some() {
            v.state = self.qemu.state(&dir).await;
            v.pid = self.qemu.pid(&dir);
            v.accel = Some(self.qemu.accel().to_string());
            v.heartbeat = self.qemu.heartbeat(&dir);
            return v;
        }
        match self.ask(spec, Request::Info).await {
            Ok(Response::Info(info)) => view(info),
            _ => v,
        }
    }

    /// Resumes a paused VM.
    pub async fn resume(&self, id: &VmId) -> Result<(), HypervisorError> {
        let spec = self.find(&id.to_string())?;
        if spec.qemu.is_some() {
            return self
                .qemu
                .resume(&self.vm_dir(id))
                .await
                .map_err(|e| HypervisorError::Vmm {
                    vm: spec.name.clone(),
                    message: e.to_string(),
                });
        }
        match self.ask(&spec, Request::Resume).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(&spec, other)),
        }
    }

    /// Checks the VM's memory page by page.
    pub async fn verify(&self, name_or_id: &str) -> Result<VerifyReport, HypervisorError> {
        let spec = self.find(name_or_id)?;
        if spec.qemu.is_some() {
            return Err(HypervisorError::Invalid(format!(
                "{} is a QEMU VM: only sandbox VMs verify their memory page by page",
                spec.name
            )));
        }
        match self.ask(&spec, Request::Verify).await? {
            Response::Verified(r) => Ok(r),
            other => Err(unexpected(&spec, other)),
        }
    }

    /// Stops the VM's VMM and removes its directory.
    pub async fn destroy(&self, name_or_id: &str) -> Result<(), HypervisorError> {
        let spec = self.find(name_or_id)?;
        let dir = self.vm_dir(&spec.id);
        if spec.qemu.is_some() {
            self.qemu.stop(&dir).await;
        } else {
            // A VMM that is already gone is destroyed too; removing the directory stops any
            // VMM that did not answer.
            let _ = self.ask(&spec, Request::Destroy).await;
        }
        match std::fs::remove_dir_all(&dir) {
            // Destroyed twice at once (say, by an operator and by a finished migration): gone
            // is gone.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(HypervisorError::Io {
                    path: dir,
                    cause: e,
                })
            }
            _ => {}
        }
        self.known().remove(&spec.id);
        Ok(())
    }
}

fn unexpected(spec: &VmSpec, r: Response) -> HypervisorError {
    HypervisorError::Vmm {
        vm: spec.name.clone(),
        message: format!("unexpected answer {r:?}"),
    }
}

fn view(info: VmmInfo) -> VmView {
    VmView {
        id: info.spec.id,
        name: info.spec.name,
        memory_mib: info.spec.memory_mib,
        vcpus: info.spec.vcpus,
        demand_permille: info.spec.demand_permille,
        state: info.state,
        pid: Some(info.pid),
        writes: info.writes,
        placement: info.spec.placement,
        backend: sandbox(),
        accel: None,
        heartbeat: None,
    }
}
