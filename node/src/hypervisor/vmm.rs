//! `drift vmm`: the sandbox hypervisor, one process per VM.
//!
//! Like QEMU, the sandbox VM runs in its own process, so restarting (or killing) the node
//! daemon never kills a VM: the node re-attaches to every VMM it finds in its state directory.
//! The VMM owns the guest memory and the workload thread that dirties it; the node drives it
//! over a Unix socket in the VM's directory (`vmm.sock`, mode 0600) with one request and one
//! response per frame (drift's codec, postcard payloads).
//!
//! The VMM exits on `Destroy`, or when its directory disappears.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drift_protocol::codec::{decode_payload, encode_frame, parse_header, HEADER_LEN};
use serde::{Deserialize, Serialize};

use super::guest::{Memory, SplitMix, VerifyReport, CANARY_PFN};
use super::{RunState, VmSpec, SOCKET_FILE, SPEC_FILE};

/// Largest request or response frame on the VMM socket.
pub const MAX_VMM_FRAME: usize = 4 * 1024 * 1024;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;

/// A request from the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Info,
    Pause,
    Resume,
    Verify,
    Destroy,
}

/// What a VMM reports about its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmInfo {
    pub spec: VmSpec,
    pub state: RunState,
    pub pid: u32,
    /// Pages written by the workload since the VMM started.
    pub writes: u64,
    pub uptime_ms: u64,
}

/// The VMM's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Info(VmmInfo),
    Done,
    Verified(VerifyReport),
    Error(String),
}

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const INCOMING: u8 = 2;

struct Vmm {
    spec: VmSpec,
    memory: Mutex<Memory>,
    state: AtomicU8,
    writes: AtomicU64,
    started: Instant,
    stop: AtomicBool,
}

impl Vmm {
    fn run_state(&self) -> RunState {
        match self.state.load(Ordering::SeqCst) {
            RUNNING => RunState::Running,
            PAUSED => RunState::Paused,
            _ => RunState::Incoming,
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn info(&self) -> VmmInfo {
        VmmInfo {
            spec: self.spec.clone(),
            state: self.run_state(),
            pid: std::process::id(),
            writes: self.writes.load(Ordering::Relaxed),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    /// After this returns, the workload writes nothing until `resume`.
    fn pause(&self) {
        self.state.store(PAUSED, Ordering::SeqCst);
        // Wait out a batch of writes already under way.
        drop(self.memory());
    }

    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Info => Response::Info(self.info()),
            Request::Pause => {
                self.pause();
                Response::Done
            }
            Request::Resume => {
                self.state.store(RUNNING, Ordering::SeqCst);
                Response::Done
            }
            Request::Verify => Response::Verified(self.memory().verify()),
            Request::Destroy => {
                // Stopped by `serve` once the answer is out.
                self.pause();
                Response::Done
            }
        }
    }

    /// Rewrites `dirty_pages_per_s` pages a second, in steps of 10 ms, while running.
    fn workload(&self) {
        let mut rng = SplitMix(self.spec.seed ^ 0x5eed);
        let pages = self.memory().page_count();
        let tick = Duration::from_millis(10);
        let per_tick = self.spec.dirty_pages_per_s as f64 * tick.as_secs_f64();
        let mut owed = 0.0f64;
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(tick);
            if pages <= CANARY_PFN + 1 {
                continue;
            }
            owed += per_tick;
            let n = owed.floor() as u64;
            owed -= n as f64;
            let mut mem = self.memory();
            // Checked under the memory lock: a pause waits for this batch to end.
            if self.state.load(Ordering::SeqCst) != RUNNING {
                continue;
            }
            for _ in 0..n {
                let pfn = CANARY_PFN + 1 + rng.next_u64() % (pages - CANARY_PFN - 1);
                mem.touch(pfn);
            }
            drop(mem);
            self.writes.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Reads one frame from a blocking stream.
pub fn read_frame<T: serde::de::DeserializeOwned + Serialize>(
    stream: &mut impl Read,
) -> std::io::Result<T> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header)?;
    let len = parse_header(header, MAX_VMM_FRAME)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    decode_payload(&payload).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn serve(vmm: &Vmm, mut stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    while let Ok(req) = read_frame::<Request>(&mut stream) {
        let destroy = matches!(req, Request::Destroy);
        let resp = vmm.handle(req);
        let written = stream.write_all(&encode_frame(&resp));
        if destroy {
            vmm.stop.store(true, Ordering::SeqCst);
        }
        if written.is_err() || destroy {
            break;
        }
    }
}

/// The VMM process: boots (or, for an incoming VM, waits with zero memory), serves the socket,
/// and exits on `Destroy` or when `dir` is removed.
pub fn run(dir: &Path) -> anyhow::Result<()> {
    let spec: VmSpec = toml::from_str(&std::fs::read_to_string(dir.join(SPEC_FILE))?)?;
    let pages = spec.memory_mib * 256;
    let memory = if spec.incoming {
        Memory::zeroed(pages, spec.seed)
    } else {
        Memory::boot(pages, spec.seed)
    };
    let vmm = Arc::new(Vmm {
        state: AtomicU8::new(if spec.incoming { INCOMING } else { RUNNING }),
        spec,
        memory: Mutex::new(memory),
        writes: AtomicU64::new(0),
        started: Instant::now(),
        stop: AtomicBool::new(false),
    });
    let sock: PathBuf = dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;

    let workload = {
        let vmm = vmm.clone();
        std::thread::spawn(move || vmm.workload())
    };
    let active = Arc::new(AtomicU64::new(0));
    let mut last_dir_check = Instant::now();
    while !vmm.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if active.load(Ordering::SeqCst) as usize >= MAX_CONNECTIONS {
                    continue; // dropped: the node retries
                }
                let _ = stream.set_nonblocking(false);
                active.fetch_add(1, Ordering::SeqCst);
                let (vmm, active) = (vmm.clone(), active.clone());
                std::thread::spawn(move || {
                    serve(&vmm, stream);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
        if last_dir_check.elapsed() > Duration::from_secs(1) {
            last_dir_check = Instant::now();
            if !dir.join(SPEC_FILE).exists() {
                vmm.stop.store(true, Ordering::SeqCst);
            }
        }
    }
    let _ = workload.join();
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
