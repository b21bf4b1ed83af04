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

use drift_protocol::transfer::{PageBatch, MAX_PAGES_PER_BATCH};
use drift_protocol::Hash;

use super::guest::{Memory, SplitMix, VerifyReport, CANARY_PFN};
use super::shared::SharedError;
use super::{RunState, VmSpec, SOCKET_FILE, SPEC_FILE};

/// Largest request or response frame on the VMM socket.
pub const MAX_VMM_FRAME: usize = 4 * 1024 * 1024;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;

/// At most this many page numbers in one answer.
pub const MAX_PFNS: usize = 65_536;
/// At most this many faults queued (a post-copy guest waits on one page at a time).
const MAX_FAULTS: usize = 1024;

/// A request from the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Info,
    Pause,
    Resume,
    Verify,
    Destroy,
    /// Start (or restart) the dirty log, empty.
    DirtyLogStart,
    /// Take up to `max` pages out of the dirty log.
    DirtyFetch {
        max: u32,
    },
    /// Read pages into a batch (at most `MAX_PAGES_PER_BATCH`), with each page's leaf.
    ReadBatch {
        round: u32,
        pfns: Vec<u64>,
    },
    /// Store a batch that arrived by migration (checked again here).
    WriteBatch(PageBatch),
    /// The device state (vCPU and workload state).
    DeviceState,
    /// Load a device state; the VM stays paused until `Resume`.
    LoadDevice(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Post-copy target: pages that have not arrived yet.
    MarkMissing(Vec<(u64, u64)>),
    /// Post-copy target: pages the guest is waiting for.
    Faults {
        max: u32,
    },
    /// Up to `max` page numbers from `from` on whose pages are not all zero.
    NonZero {
        from: u64,
        max: u32,
    },
    /// The guest memory and its bitmaps: answered with [`Response::Shared`] and the two memfds
    /// as `SCM_RIGHTS` (see [`super::shared`]).
    Share,
    /// Slow the workload down by `pct` percent (at most 99) while a migration converges, as
    /// QEMU's auto-converge throttles vCPUs. Not part of the device state: a VM that moved
    /// runs at full speed on its new host, and `Resume` ends the throttle at home.
    Throttle {
        pct: u8,
    },
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
    Pfns {
        pfns: Vec<u64>,
        remaining: u64,
    },
    Batch {
        batch: PageBatch,
        leaves: Vec<Hash>,
    },
    Device(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The memfds of a memory of `pages` pages come with this answer.
    Shared {
        pages: u64,
    },
}

/// The sandbox's device state: what the workload (the "vCPU") needs to carry on exactly where
/// it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Device {
    writes: u64,
    rng: u64,
    /// The workload's rate (pages per second) travels with the guest.
    rate: u64,
}

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const INCOMING: u8 = 2;

/// One sandbox VM: its memory, its workload and its state. Driven by [`Vmm::handle`].
#[derive(Debug)]
pub struct Vmm {
    spec: VmSpec,
    memory: Mutex<Memory>,
    state: AtomicU8,
    writes: AtomicU64,
    rng: AtomicU64,
    rate: AtomicU64,
    /// Percent of the workload's speed taken away while a migration converges.
    throttle: AtomicU8,
    faults: Mutex<std::collections::VecDeque<u64>>,
    started: Instant,
    stop: AtomicBool,
}

impl Vmm {
    /// A VM from its spec: booted (canary in place, running) or, if `spec.incoming`, empty and
    /// waiting for a migration.
    pub fn new(spec: VmSpec) -> Result<Arc<Self>, SharedError> {
        let pages = spec.memory_mib * 256;
        let mut memory = if spec.incoming {
            Memory::zeroed(pages, spec.seed)?
        } else {
            Memory::boot(pages, spec.seed)?
        };
        memory.set_random_pct(spec.page_random_pct.unwrap_or(100));
        Ok(Arc::new(Self {
            state: AtomicU8::new(if spec.incoming { INCOMING } else { RUNNING }),
            rng: AtomicU64::new(spec.seed ^ 0x5eed),
            rate: AtomicU64::new(spec.dirty_pages_per_s),
            throttle: AtomicU8::new(0),
            spec,
            memory: Mutex::new(memory),
            writes: AtomicU64::new(0),
            faults: Mutex::new(std::collections::VecDeque::new()),
            started: Instant::now(),
            stop: AtomicBool::new(false),
        }))
    }

    /// Starts the workload thread; it ends when the VM is destroyed ([`Vmm::shut_down`]).
    pub fn start_workload(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        let vmm = self.clone();
        std::thread::spawn(move || vmm.workload())
    }

    /// Stops the workload for good.
    pub fn shut_down(&self) {
        self.pause();
        self.stop.store(true, Ordering::SeqCst);
    }

    fn run_state(&self) -> RunState {
        match self.state.load(Ordering::SeqCst) {
            RUNNING => RunState::Running,
            PAUSED => RunState::Paused,
            _ => RunState::Incoming,
        }
    }

    pub(crate) fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The migration throttle now applied, percent.
    #[cfg(test)]
    pub(crate) fn throttle_pct(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    pub(crate) fn info(&self) -> VmmInfo {
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

    fn page_count(&self) -> u64 {
        self.spec.memory_mib * 256
    }

    /// Answers one request.
    pub fn handle(&self, req: Request) -> Response {
        let pages = self.page_count();
        let bad = |m: String| Response::Error(m);
        match req {
            Request::DirtyLogStart => {
                self.memory().start_dirty_log();
                Response::Done
            }
            Request::DirtyFetch { max } => {
                let (pfns, remaining) = self.memory().take_dirty((max as usize).min(MAX_PFNS));
                Response::Pfns { pfns, remaining }
            }
            Request::ReadBatch { round, pfns } => {
                if pfns.len() > MAX_PAGES_PER_BATCH {
                    return bad(format!("batch of {} pages", pfns.len()));
                }
                if let Some(p) = pfns.iter().find(|&&p| p >= pages) {
                    return bad(format!("page {p} beyond {pages}"));
                }
                let mem = self.memory();
                // Every page number was checked against the memory above.
                let (batch, leaves) = PageBatch::build_with(round, &pfns, |pfn, out| {
                    let _ = mem.shared().read_page(pfn, out);
                });
                Response::Batch { batch, leaves }
            }
            Request::WriteBatch(batch) => {
                if let Err(e) = batch.check(pages) {
                    return bad(e.to_string());
                }
                let mut mem = self.memory();
                for (pfn, data) in batch.pages() {
                    if let Err(e) = mem.store(pfn, data) {
                        return bad(e.to_string());
                    }
                }
                Response::Done
            }
            Request::DeviceState => {
                let d = Device {
                    writes: self.writes.load(Ordering::SeqCst),
                    rng: self.rng.load(Ordering::SeqCst),
                    rate: self.rate.load(Ordering::SeqCst),
                };
                Response::Device(drift_protocol::codec::encode_payload(&d))
            }
            Request::LoadDevice(bytes) => match decode_payload::<Device>(&bytes) {
                Ok(d) => {
                    self.writes.store(d.writes, Ordering::SeqCst);
                    self.rng.store(d.rng, Ordering::SeqCst);
                    self.rate.store(d.rate, Ordering::SeqCst);
                    if self.state.load(Ordering::SeqCst) == INCOMING {
                        self.state.store(PAUSED, Ordering::SeqCst);
                    }
                    Response::Done
                }
                Err(e) => bad(format!("device state: {e}")),
            },
            Request::MarkMissing(ranges) => {
                if ranges.len() > drift_protocol::transfer::MAX_STALE_RANGES {
                    return bad(format!("{} ranges", ranges.len()));
                }
                self.memory().mark_missing(&ranges);
                Response::Done
            }
            Request::Faults { max } => {
                // Lock order everywhere: memory, then faults.
                let mem = self.memory();
                let mut q = self.faults.lock().unwrap_or_else(|p| p.into_inner());
                let n = (max as usize).min(q.len());
                Response::Pfns {
                    pfns: q.drain(..n).collect(),
                    remaining: mem.missing_count(),
                }
            }
            Request::NonZero { from, max } => Response::Pfns {
                pfns: self.memory().nonzero(from, (max as usize).min(MAX_PFNS)),
                remaining: 0,
            },
            Request::Info => Response::Info(self.info()),
            Request::Pause => {
                self.pause();
                Response::Done
            }
            Request::Resume => {
                self.throttle.store(0, Ordering::SeqCst);
                self.state.store(RUNNING, Ordering::SeqCst);
                Response::Done
            }
            Request::Throttle { pct } => {
                self.throttle.store(pct.min(99), Ordering::SeqCst);
                Response::Done
            }
            Request::Verify => Response::Verified(self.memory().verify()),
            Request::Destroy => {
                // Stopped by `serve` once the answer is out.
                self.pause();
                Response::Done
            }
            // `serve` sends the memfds with the answer.
            Request::Share => Response::Shared { pages },
        }
    }

    /// Rewrites `dirty_pages_per_s` pages a second, in steps of 10 ms, while running. The
    /// page sequence comes from the device state's generator, so a migrated VM carries on
    /// with the very next page. A page that has not arrived (post-copy) stalls the guest until
    /// it does, as a vCPU faulting on it would.
    fn workload(&self) {
        let pages = self.page_count();
        let tick = Duration::from_millis(10);
        let mut owed = 0.0f64;
        let mut blocked_on: Option<u64> = None;
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(if blocked_on.is_some() {
                Duration::from_millis(1)
            } else {
                tick
            });
            if pages <= CANARY_PFN + 1 {
                continue;
            }
            let mut mem = self.memory();
            // Checked under the memory lock: a pause waits for this batch to end.
            if self.state.load(Ordering::SeqCst) != RUNNING {
                continue;
            }
            if blocked_on.is_none() {
                let speed = f64::from(100 - self.throttle.load(Ordering::SeqCst).min(99)) / 100.0;
                owed += self.rate.load(Ordering::SeqCst) as f64 * speed * tick.as_secs_f64();
            }
            let mut rng = SplitMix(self.rng.load(Ordering::SeqCst));
            let mut written = 0;
            while owed >= 1.0 {
                let pfn = blocked_on
                    .take()
                    .unwrap_or_else(|| CANARY_PFN + 1 + rng.next_u64() % (pages - CANARY_PFN - 1));
                if !mem.touch(pfn) {
                    blocked_on = Some(pfn);
                    let mut q = self.faults.lock().unwrap_or_else(|p| p.into_inner());
                    if q.len() < MAX_FAULTS && !q.contains(&pfn) {
                        q.push_back(pfn);
                    }
                    break;
                }
                owed -= 1.0;
                written += 1;
            }
            self.rng.store(rng.0, Ordering::SeqCst);
            // Counted before the lock goes: once `pause` holds the lock, the count (which the
            // device state carries) includes every batch written.
            self.writes.fetch_add(written, Ordering::SeqCst);
            drop(mem);
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
        let share = matches!(req, Request::Share);
        let resp = vmm.handle(req);
        let frame = encode_frame(&resp);
        let written = if share {
            super::shared::send_with_fds(&stream, &vmm.memory().shared().fds(), &frame)
        } else {
            stream.write_all(&frame)
        };
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
    let vmm = Vmm::new(spec)?;
    let sock: PathBuf = dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let workload = vmm.start_workload();
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

#[cfg(test)]
mod tests {
    //! Two VMMs in one process, joined by drift's transfer state machines: the data path of a
    //! live migration without the network.

    use super::*;
    use drift_protocol::migration::{Mode, Placement};
    use drift_protocol::transfer::receiver::{Accepted, Receiver, Step};
    use drift_protocol::transfer::sender::{Sender, SenderStep};
    use drift_protocol::transfer::{
        memory_root, zero_leaf, Commit, Complete, DeviceState, RoundEnd, StaleRanges, Start,
        TransferFrame, PAGE_SIZE,
    };
    use drift_protocol::{MigrationId, SecretKey, Signed, Timestamp, VmId};

    fn spec(incoming: bool, dirty_pages_per_s: u64) -> VmSpec {
        VmSpec {
            id: VmId::from_bytes([4; 16]),
            name: "vm".into(),
            memory_mib: 8,
            vcpus: 1,
            demand_permille: 100,
            dirty_pages_per_s,
            page_random_pct: None,
            placement: Placement::default(),
            seed: 77,
            incoming,
            qemu: None,
        }
    }

    struct Link {
        src: Arc<Vmm>,
        dst: Arc<Vmm>,
        rx: Receiver,
        tx: Sender,
        leaves: Vec<Hash>,
        key: SecretKey,
        target_key: SecretKey,
        accepted: Accepted,
    }

    impl Link {
        fn new(mode: Mode) -> Self {
            let src = Vmm::new(spec(false, 20_000)).unwrap();
            let dst = Vmm::new(spec(true, 20_000)).unwrap();
            let key = SecretKey::from_bytes(&[1; 32]);
            let target_key = SecretKey::from_bytes(&[2; 32]);
            let pages = src.page_count();
            let accepted = Accepted {
                id: MigrationId::from_bytes([9; 16]),
                offer: Hash::of(b"offer"),
                source: key.public(),
                mode,
                page_count: pages,
                data_connections: 0,
            };
            Self {
                rx: Receiver::new(accepted.clone()),
                tx: Sender::new(accepted.id, target_key.public(), mode, pages),
                leaves: vec![zero_leaf(); pages as usize],
                src,
                dst,
                key,
                target_key,
                accepted,
            }
        }

        /// Delivers a frame to the target and applies what it says to the target VMM.
        fn deliver(&mut self, f: &TransferFrame) -> Option<Hash> {
            match self.rx.on_frame(f).unwrap() {
                Step::WritePages(w) => {
                    if !w.is_empty() {
                        let TransferFrame::Pages(b) = f else {
                            unreachable!()
                        };
                        // Only the pages the machine accepted: rebuild the batch from them.
                        let rebuilt = PageBatch::build(
                            b.round,
                            w.iter()
                                .map(|(p, d)| (*p, d.unwrap_or(&[0u8; PAGE_SIZE][..]))),
                        );
                        assert!(matches!(
                            self.dst.handle(Request::WriteBatch(rebuilt)),
                            Response::Done
                        ));
                    }
                    None
                }
                Step::LoadDevice(d) => {
                    assert!(matches!(
                        self.dst.handle(Request::LoadDevice(d.to_vec())),
                        Response::Done
                    ));
                    None
                }
                Step::LoadDeviceAndResume(d) => {
                    assert!(matches!(
                        self.dst.handle(Request::LoadDevice(d.to_vec())),
                        Response::Done
                    ));
                    assert!(matches!(self.dst.handle(Request::Resume), Response::Done));
                    None
                }
                Step::Verified { root } => Some(root),
                Step::Continue | Step::Aborted(_) => None,
            }
        }

        fn send_pages(&mut self, round: u32, pfns: &[u64]) {
            for chunk in pfns.chunks(MAX_PAGES_PER_BATCH) {
                let Response::Batch { batch, leaves } = self.src.handle(Request::ReadBatch {
                    round,
                    pfns: chunk.to_vec(),
                }) else {
                    panic!("read failed")
                };
                for (e, l) in batch.entries.iter().zip(leaves) {
                    self.leaves[e.pfn as usize] = l;
                }
                self.deliver(&TransferFrame::Pages(batch));
            }
        }

        fn dirty(&self) -> Vec<u64> {
            let mut all = Vec::new();
            loop {
                let Response::Pfns { pfns, remaining } =
                    self.src.handle(Request::DirtyFetch { max: 1000 })
                else {
                    panic!()
                };
                all.extend(pfns);
                if remaining == 0 {
                    return all;
                }
            }
        }

        fn device(&self) -> Vec<u8> {
            let Response::Device(d) = self.src.handle(Request::DeviceState) else {
                panic!()
            };
            d
        }

        fn complete(&mut self, device: &[u8]) -> Hash {
            let root = memory_root(&self.leaves, &Hash::of(device));
            self.tx.complete_sent(root);
            let frame = TransferFrame::Complete(Signed::sign(
                &Complete {
                    id: self.accepted.id,
                    offer: self.accepted.offer,
                    root,
                    page_count: self.accepted.page_count,
                },
                &self.key,
            ));
            let verified = self.deliver(&frame).expect("target verifies the root");
            assert_eq!(verified, root);
            let commit = Signed::sign(
                &Commit {
                    id: self.accepted.id,
                    root,
                    committed_at: Timestamp(1),
                },
                &self.target_key,
            );
            assert!(matches!(
                self.tx.on_frame(&TransferFrame::Commit(commit)).unwrap(),
                SenderStep::Committed(_)
            ));
            root
        }

        fn memories_equal(&self) -> bool {
            let a = self.src.memory();
            let b = self.dst.memory();
            (0..a.page_count()).all(|p| a.page(p) == b.page(p))
        }
    }

    fn start(l: &mut Link) {
        let s = Start {
            id: l.accepted.id,
            offer: l.accepted.offer,
            mode: l.accepted.mode,
            page_size: PAGE_SIZE as u32,
            page_count: l.accepted.page_count,
            data_connections: 0,
        };
        l.deliver(&TransferFrame::Start(s));
    }

    #[test]
    fn precopy_moves_a_running_vm_exactly() {
        let mut l = Link::new(Mode::PreCopy);
        let workload = l.src.start_workload();
        std::thread::sleep(Duration::from_millis(50));
        start(&mut l);
        assert!(matches!(
            l.src.handle(Request::DirtyLogStart),
            Response::Done
        ));
        let all: Vec<u64> = (0..l.accepted.page_count).collect();
        l.send_pages(0, &all);
        l.deliver(&TransferFrame::RoundEnd(RoundEnd {
            round: 0,
            pages_sent: 0,
            dirty: 0,
        }));
        let mut round = 1;
        for _ in 0..3 {
            // Bounded wait: on a loaded machine the workload thread may be slow to run.
            let mut d = Vec::new();
            for _ in 0..200 {
                std::thread::sleep(Duration::from_millis(20));
                d = l.dirty();
                if !d.is_empty() {
                    break;
                }
            }
            assert!(!d.is_empty(), "the workload keeps dirtying pages");
            l.send_pages(round, &d);
            l.deliver(&TransferFrame::RoundEnd(RoundEnd {
                round,
                pages_sent: 0,
                dirty: 0,
            }));
            round += 1;
        }
        // Stop-and-copy.
        assert!(matches!(l.src.handle(Request::Pause), Response::Done));
        let d = l.dirty();
        l.send_pages(round, &d);
        let device = l.device();
        l.deliver(&TransferFrame::DeviceState(DeviceState::new(
            device.clone(),
        )));
        l.complete(&device);
        assert!(l.memories_equal());
        let Response::Verified(r) = l.dst.handle(Request::Verify) else {
            panic!()
        };
        assert_eq!(r.bad_count, 0);
        assert!(r.written > 0);

        // The target carries on from the source's device state.
        let before = l.src.info().writes;
        assert_eq!(l.dst.info().writes, before);
        assert!(matches!(l.dst.handle(Request::Resume), Response::Done));
        let dst_workload = l.dst.start_workload();
        let carried_on = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            l.dst.info().writes > before
        });
        assert!(carried_on, "the target's workload never wrote");
        let Response::Verified(r) = l.dst.handle(Request::Verify) else {
            panic!()
        };
        assert_eq!(r.bad_count, 0);
        l.src.shut_down();
        l.dst.shut_down();
        workload.join().unwrap();
        dst_workload.join().unwrap();
    }

    #[test]
    fn postcopy_resumes_at_once_and_the_guest_waits_for_missing_pages() {
        let mut l = Link::new(Mode::PostCopy);
        let workload = l.src.start_workload();
        std::thread::sleep(Duration::from_millis(50));
        start(&mut l);
        // Switchover at once: pause, mark every non-zero page stale, hand over the device.
        assert!(matches!(l.src.handle(Request::Pause), Response::Done));
        let Response::Pfns { pfns: stale, .. } = l.src.handle(Request::NonZero {
            from: 0,
            max: u32::MAX,
        }) else {
            panic!()
        };
        let frame = TransferFrame::Stale(StaleRanges {
            ranges: stale.iter().map(|&p| (p, 1)).collect(),
        });
        assert!(matches!(
            l.dst.handle(Request::MarkMissing(
                stale.iter().map(|&p| (p, 1)).collect()
            )),
            Response::Done
        ));
        l.deliver(&frame);
        let device = l.device();
        l.tx.switched();
        assert!(!l.tx.may_resume_here());
        let dst_workload = l.dst.start_workload();
        l.deliver(&TransferFrame::DeviceState(DeviceState::new(
            device.clone(),
        )));
        assert_eq!(l.dst.info().state, RunState::Running);

        // The guest faults on pages it needs; they are served first, then the rest is pushed.
        let mut served = 0;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(2));
            let Response::Pfns { pfns, .. } = l.dst.handle(Request::Faults { max: 64 }) else {
                panic!()
            };
            if !pfns.is_empty() {
                served += pfns.len();
                l.send_pages(1, &pfns);
            }
        }
        assert!(
            served > 0,
            "a running post-copy guest faults on missing pages"
        );
        l.send_pages(1, &stale);
        assert_eq!(l.rx.missing_count(), 0);
        l.complete(&device);
        let Response::Verified(r) = l.dst.handle(Request::Verify) else {
            panic!()
        };
        assert_eq!(r.bad_count, 0);
        assert!(
            l.dst.info().writes > l.src.info().writes,
            "the guest ran on the target"
        );
        l.src.shut_down();
        l.dst.shut_down();
        workload.join().unwrap();
        dst_workload.join().unwrap();
    }
}
