//! Two in-process VMMs joined by the engine over in-memory pipes: every mode, over one stream
//! and over several numbered connections, and what a man in the middle achieves.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use drift_protocol::migration::{Mode, Placement};
use drift_protocol::transfer::convergence::Limits;
use drift_protocol::transfer::receiver::{Accepted, Receiver};
use drift_protocol::transfer::{Complete, Start, TransferFrame, PAGE_SIZE};
use drift_protocol::{Hash, MigrationId, SecretKey, Signed, VmId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::hypervisor::vmm::{Request, Response, Vmm};
use crate::hypervisor::{RunState, VmSpec};
use crate::migration::frames::{read_frame, write_frame};
use crate::migration::link::Link;
use crate::migration::recover::NoReconnect;

fn spec(incoming: bool, dirty: u64) -> VmSpec {
    VmSpec {
        id: VmId::from_bytes([4; 16]),
        name: "vm".into(),
        memory_mib: 16,
        vcpus: 1,
        demand_permille: 100,
        dirty_pages_per_s: dirty,
        page_random_pct: None,
        placement: Placement::default(),
        seed: 99,
        incoming,
        qemu: None,
    }
}

/// Keeps the root the target verified, as the node's durable record would.
struct RecordCommit(Arc<std::sync::Mutex<Option<Hash>>>);

impl Hooks for RecordCommit {
    async fn at(&self, point: Point) -> std::io::Result<()> {
        if let Point::Verified(root) = point {
            *self.0.lock().unwrap() = Some(root);
        }
        Ok(())
    }
}

struct Run {
    source: SourceOutcome,
    target: TargetOutcome,
    src: Arc<Vmm>,
    dst: Arc<Vmm>,
    committed: Option<Hash>,
    /// The source VM's state when the engine returned.
    src_state: RunState,
    src_clean: bool,
}

/// What a man in the middle does to the source-to-target direction.
#[derive(Clone, Copy)]
enum Tamper {
    /// Flips one bit of the byte at this offset of the stream.
    FlipByte(usize),
    /// Rewrites the source's `Complete` frame, passing every other frame on unchanged.
    Complete(fn(Signed<Complete>) -> Signed<Complete>),
}

/// Migrates a running VM between two in-process VMMs over an in-memory pipe (`conns` = 0)
/// or over `conns` numbered connections; `tamper` may rewrite what the target receives on
/// the pipe.
async fn migrate(mode: Mode, dirty: u64, tamper: Option<Tamper>, conns: usize) -> Run {
    migrate_with(params(mode), dirty, tamper, conns, None).await
}

/// The source's parameters of [`migrate`]: small VMs on an in-memory pipe converge at once; a
/// stuck one switches over (as it did before convergence control) so every such test ends in
/// a move.
fn params(mode: Mode) -> SourceParams {
    let limits = Limits {
        max_rounds: 8,
        max_downtime_ms: 10_000,
        ..Limits::default()
    };
    SourceParams {
        commit_timeout: Duration::from_secs(10),
        ..SourceParams::new(mode, limits)
    }
}

/// [`migrate`] with the source's parameters given; with `fill`, every page of the source
/// (but the canary) is written first, that percent of each random, and the workload writes
/// its pages the same way.
async fn migrate_with(
    params: SourceParams,
    dirty: u64,
    tamper: Option<Tamper>,
    conns: usize,
    fill: Option<u8>,
) -> Run {
    let mode = params.wire_mode();
    let src = Vmm::new(VmSpec {
        page_random_pct: fill,
        ..spec(false, dirty)
    })
    .unwrap();
    if let Some(pct) = fill {
        fill_pages(&src, pct);
    }
    let dst = Vmm::new(spec(true, dirty)).unwrap();
    let w1 = src.start_workload();
    let w2 = dst.start_workload();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let skey = SecretKey::from_bytes(&[1; 32]);
    let tkey = SecretKey::from_bytes(&[2; 32]);
    let id = MigrationId::from_bytes([7; 16]);
    let offer = Hash::of(b"offer");
    let pages = 16 * 256;
    let (a, b) = tokio::io::duplex(1 << 20);
    // A man in the middle on the source-to-target direction.
    let (b, target_side) = match tamper {
        None => (b, None),
        Some(tamper) => {
            let (mitm_in, mitm_out) = tokio::io::duplex(1 << 20);
            let handle = tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut from_src_r, mut from_src_w) = tokio::io::split(b);
                let (mut to_dst_r, mut to_dst_w) = tokio::io::split(mitm_in);
                let up = async {
                    match tamper {
                        Tamper::FlipByte(at) => {
                            let mut seen = 0usize;
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = from_src_r.read(&mut buf).await.unwrap_or(0);
                                if n == 0 {
                                    break;
                                }
                                if at >= seen && at < seen + n {
                                    buf[at - seen] ^= 0x20;
                                }
                                seen += n;
                                if to_dst_w.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Tamper::Complete(rewrite) => {
                            while let Ok(Some(frame)) = read_frame(&mut from_src_r).await {
                                let frame = match frame {
                                    TransferFrame::Complete(c) => {
                                        TransferFrame::Complete(rewrite(c))
                                    }
                                    other => other,
                                };
                                if write_frame(&mut to_dst_w, &frame).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to_dst_w.shutdown().await;
                };
                let down = tokio::io::copy(&mut to_dst_r, &mut from_src_w);
                let _ = tokio::join!(up, down);
            });
            (mitm_out, Some(handle))
        }
    };
    let accepted = Accepted {
        id,
        offer,
        source: skey.public(),
        mode,
        page_count: pages,
        data_connections: conns as u32,
    };
    let mut receiver = Receiver::new(accepted);
    receiver
        .on_frame(&TransferFrame::Start(Start {
            id,
            offer,
            mode,
            page_size: PAGE_SIZE as u32,
            page_count: pages,
            data_connections: conns as u32,
        }))
        .unwrap();
    let (source_link, target_link) = if conns == 0 {
        (Link::stream(a, None), Link::stream(b, Some(pages)))
    } else {
        let (mut near, mut far) = (Vec::new(), Vec::new());
        for _ in 0..conns {
            let (x, y) = tokio::io::duplex(1 << 20);
            near.push(x);
            far.push(y);
        }
        (Link::data_source(near), Link::data_target(far, pages))
    };
    let committed = Arc::new(std::sync::Mutex::new(None));
    let target = {
        let dst = dst.clone();
        let committed = committed.clone();
        tokio::spawn(async move {
            let hooks = RecordCommit(committed);
            run_target(
                &dst,
                &hooks,
                target_link,
                receiver,
                id,
                &tkey,
                Default::default(),
                None,
            )
            .await
            .unwrap()
        })
    };
    let (watch_tx, _watch_rx) = watch::channel(Progress::default());
    let source = run_source(
        &src,
        &NoHooks,
        &NoReconnect,
        source_link,
        SourceTransfer {
            transport: "test".into(),
            id,
            offer,
            page_count: pages,
            key: skey.clone(),
            target: SecretKey::from_bytes(&[2; 32]).public(),
        },
        params,
        &watch_tx,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let target = target.await.unwrap();
    if let Some(h) = target_side {
        h.abort();
    }
    let committed = *committed.lock().unwrap();
    let src_state = src.info().state;
    let src_clean = verified_clean(&src);
    src.shut_down();
    dst.shut_down();
    let _ = tokio::task::spawn_blocking(move || {
        w1.join().ok();
        w2.join().ok();
    })
    .await;
    Run {
        source,
        target,
        src,
        dst,
        committed,
        src_state,
        src_clean,
    }
}

/// Writes every page but the canary as the guest would, `random_pct` percent random.
fn fill_pages(vm: &Vmm, random_pct: u8) {
    use crate::hypervisor::guest::{write_page_mixed, CANARY_PFN};
    use drift_protocol::transfer::{PageBatch, MAX_PAGES_PER_BATCH};
    let pfns: Vec<u64> = (0..16 * 256).filter(|&p| p != CANARY_PFN).collect();
    let mut buf = vec![0u8; MAX_PAGES_PER_BATCH * PAGE_SIZE];
    for chunk in pfns.chunks(MAX_PAGES_PER_BATCH) {
        for (page, &pfn) in buf.chunks_exact_mut(PAGE_SIZE).zip(chunk) {
            write_page_mixed(page, 99, pfn, 1, random_pct);
        }
        let batch = PageBatch::build(0, chunk.iter().copied().zip(buf.chunks_exact(PAGE_SIZE)));
        assert!(matches!(
            vm.handle(Request::WriteBatch(batch)),
            Response::Done
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_pages_move_fewer_bytes_and_the_vm_verifies() {
    for (mode, conns) in [(Mode::PreCopy, 0), (Mode::PreCopy, 2), (Mode::PostCopy, 2)] {
        let mut sent = Vec::new();
        for compress in [false, true] {
            let params = SourceParams {
                compress,
                ..params(mode)
            };
            let r = migrate_with(params, 2_000, None, conns, Some(25)).await;
            let SourceOutcome::Committed { progress, .. } = &r.source else {
                panic!("{mode}, compress {compress}: {:?}", r.source);
            };
            assert!(verified_clean(&r.dst), "{mode}, compress {compress}");
            sent.push(progress.bytes_sent);
        }
        // A quarter of each page random: LZ4 takes well over half of it away.
        let memory = 16u64 << 20;
        assert!(sent[0] >= memory, "{mode}: plain sent {}", sent[0]);
        assert!(
            sent[1] * 2 < sent[0],
            "{mode} on {conns} connections: packed sent {} bytes, plain {}",
            sent[1],
            sent[0]
        );
    }
}

fn verified_clean(vm: &Vmm) -> bool {
    matches!(vm.handle(Request::Verify), Response::Verified(r) if r.bad_count == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_moves_a_running_vm_and_commits() {
    for (mode, conns) in [
        (Mode::PreCopy, 0),
        (Mode::PostCopy, 0),
        (Mode::Hybrid, 0),
        (Mode::PreCopy, 3),
        (Mode::PostCopy, 2),
        (Mode::Hybrid, 2),
    ] {
        let r = migrate(mode, 4_000, None, conns).await;
        let SourceOutcome::Committed { commit, progress } = &r.source else {
            panic!("{mode}: {:?}", r.source);
        };
        assert_eq!(r.target, TargetOutcome::Committed { root: commit.root });
        assert_eq!(
            r.committed,
            Some(commit.root),
            "{mode}: commit recorded first"
        );
        assert!(verified_clean(&r.dst), "{mode}");
        assert!(progress.downtime_ms.is_some() && progress.pages_sent > 0);
        // A pre-copy switchover (hybrid's too, once its rounds converged) reports what it
        // cost besides its last pages.
        assert_eq!(
            progress.switchover_cost_ms.is_some(),
            mode != Mode::PostCopy,
            "{mode}"
        );
        // The guest carried on from the source's device state.
        assert!(r.dst.info().writes >= r.src.info().writes, "{mode}");
        // The source stayed paused from switchover on: its copy is the one handed over.
        assert_eq!(r.src_state, RunState::Paused, "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_transit_aborts_and_the_vm_runs_on_the_source() {
    // Byte 200_000 falls inside the first round's page data.
    let r = migrate(Mode::PreCopy, 2_000, Some(Tamper::FlipByte(200_000)), 0).await;
    assert_refused_and_home(&r);
}

/// The target refused, and blames the source: nothing committed, nothing runs there, the VM
/// runs on the source and verifies clean.
fn assert_refused_and_home(r: &Run) {
    assert!(
        matches!(&r.source, SourceOutcome::ResumedHere { .. }),
        "{:?}",
        r.source
    );
    assert!(
        matches!(&r.target, TargetOutcome::Faulted { .. }),
        "{:?}",
        r.target
    );
    assert_eq!(r.committed, None);
    assert_ne!(r.dst.info().state, RunState::Running);
    assert_eq!(r.src_state, RunState::Running);
    assert!(r.src_clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_root_signed_by_the_source_aborts_and_the_vm_runs_on_the_source() {
    // The source's own key signs a root that is not the memory's: the pages verified batch
    // by batch, but the whole does not match.
    fn wrong_root(c: Signed<Complete>) -> Signed<Complete> {
        let mut complete = c.verify().unwrap();
        complete.root = Hash::of(b"not the memory");
        Signed::sign(&complete, &SecretKey::from_bytes(&[1; 32]))
    }
    // Pre-copy: the target verifies before the VM ever runs there. (In post-copy the VM
    // already runs on the target when `Complete` arrives; there a bad root makes the
    // migration incomplete, see the receiver's tests.)
    let r = migrate(Mode::PreCopy, 2_000, Some(Tamper::Complete(wrong_root)), 0).await;
    assert_refused_and_home(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_forged_by_a_third_key_aborts_and_the_vm_runs_on_the_source() {
    // The right root, signed by a key that is not the offer's source.
    fn forged(c: Signed<Complete>) -> Signed<Complete> {
        Signed::sign(&c.verify().unwrap(), &SecretKey::from_bytes(&[3; 32]))
    }
    let r = migrate(Mode::PreCopy, 2_000, Some(Tamper::Complete(forged)), 0).await;
    assert_refused_and_home(&r);
}

/// A VM that dirties 8,000 pages (31 MiB) a second behind a link capped at 8 MiB/s: it
/// cannot converge on its own, even slowed to half its speed by a busy machine.
async fn outrun(fallback: &str) -> (Run, Limits) {
    let limits = Limits {
        max_downtime_ms: 200,
        stall_rounds: 1,
        fallback: fallback.parse().unwrap(),
        throttle_initial_pct: 50,
        throttle_step_pct: 20,
        throttle_max_pct: 99,
        ..Limits::default()
    };
    let params = SourceParams {
        bandwidth_cap: Some(8 << 20),
        commit_timeout: Duration::from_secs(10),
        ..SourceParams::new(Mode::PreCopy, limits.clone())
    };
    (migrate_with(params, 8_000, None, 0, None).await, limits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_outruns_the_link_is_aborted_and_keeps_running_clean_at_home() {
    let (r, _) = outrun("abort").await;
    let SourceOutcome::ResumedHere { reason } = &r.source else {
        panic!("expected the VM home, got {:?}", r.source);
    };
    assert!(reason.contains("not converging"), "{reason}");
    assert!(
        reason.contains("dirtying") && reason.contains("sending"),
        "{reason}"
    );
    assert!(
        matches!(&r.target, TargetOutcome::Aborted { .. }),
        "{:?}",
        r.target
    );
    assert_eq!(r.src_state, RunState::Running, "never paused");
    assert!(r.src_clean);
    assert_eq!(r.committed, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_lets_a_vm_that_outruns_the_link_converge_within_its_ceiling() {
    let (r, limits) = outrun("throttle,abort").await;
    let SourceOutcome::Committed { progress, .. } = &r.source else {
        panic!("expected a commit, got {:?}", r.source);
    };
    assert!(progress.throttle_pct >= 50, "{progress:?}");
    let downtime = progress.downtime_ms.unwrap();
    assert!(
        downtime <= limits.max_downtime_ms as f64,
        "downtime {downtime} ms above the {} ms ceiling",
        limits.max_downtime_ms
    );
    assert!(verified_clean(&r.dst));
    // The throttle stays behind: the VM runs at full speed on its new host.
    assert_eq!(r.dst.throttle_pct(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_outruns_the_link_switches_to_postcopy_when_the_fallback_says_so() {
    let (r, _) = outrun("postcopy").await;
    let SourceOutcome::Committed { progress, commit } = &r.source else {
        panic!("expected a commit, got {:?}", r.source);
    };
    assert_eq!(r.target, TargetOutcome::Committed { root: commit.root });
    assert!(progress.not_converging.is_some(), "{progress:?}");
    // A post-copy ending: the target resumed before every page arrived.
    assert_eq!(progress.switchover_cost_ms, None);
    assert_eq!(progress.throttle_pct, 0);
    assert!(verified_clean(&r.dst));
}

/// Cuts the pipe between the engines the first time the source pushes a post-copy batch.
struct CutAtPush(Arc<tokio::sync::Notify>);

impl Hooks for CutAtPush {
    async fn at(&self, point: Point) -> std::io::Result<()> {
        if point == Point::Pushing {
            self.0.notify_one();
        }
        Ok(())
    }
}

/// The source's way to a new link in tests: a request through the target's door, signed as
/// the node would, and a fresh in-memory pipe.
struct PipeReconnect {
    door: crate::migration::recover::Door,
    key: SecretKey,
    target: drift_protocol::NodeId,
    id: MigrationId,
    offer: Hash,
    attempts: std::sync::atomic::AtomicU32,
}

impl crate::migration::recover::Reconnect for PipeReconnect {
    async fn reconnect(&self, attempt: u32) -> Result<Link, String> {
        use drift_protocol::transfer::recover::RecoverRequest;
        self.attempts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let request = Signed::sign(
            &RecoverRequest {
                id: self.id,
                offer: self.offer,
                source: self.key.public(),
                target: self.target,
                attempt,
                issued_at: crate::clock::now(),
            },
            &self.key,
        );
        let (_, to_target) = self
            .door
            .admit(
                &request,
                &self.key.public(),
                &self.target,
                crate::clock::now(),
            )
            .map_err(|e| e.to_string())?;
        let (a, b) = tokio::io::duplex(1 << 20);
        to_target
            .send(Box::new(b))
            .await
            .map_err(|e| e.to_string())?;
        Ok(Link::stream(a, None))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postcopy_link_cut_mid_transfer_recovers_over_a_new_link_and_the_vm_verifies() {
    let src = Vmm::new(spec(false, 4_000)).unwrap();
    let dst = Vmm::new(spec(true, 4_000)).unwrap();
    let w1 = src.start_workload();
    let w2 = dst.start_workload();
    // Most pages written: post-copy has most of the memory still to push when the cut comes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let skey = SecretKey::from_bytes(&[1; 32]);
    let tkey = SecretKey::from_bytes(&[2; 32]);
    let id = MigrationId::from_bytes([7; 16]);
    let offer = Hash::of(b"offer");
    let pages = 16 * 256;
    // Source end, target end, and a proxy between them that the source's hook cuts.
    let (near, near_far) = tokio::io::duplex(1 << 16);
    let (far, far_near) = tokio::io::duplex(1 << 16);
    let cut = Arc::new(tokio::sync::Notify::new());
    let proxy = {
        let cut = cut.clone();
        tokio::spawn(async move {
            let (mut x, mut y) = (near_far, far_near);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut x, &mut y) => {}
                _ = cut.notified() => {}
            }
        })
    };
    let accepted = Accepted {
        id,
        offer,
        source: skey.public(),
        mode: Mode::PostCopy,
        page_count: pages,
        data_connections: 0,
    };
    let mut receiver = Receiver::new(accepted);
    receiver
        .on_frame(&TransferFrame::Start(Start {
            id,
            offer,
            mode: Mode::PostCopy,
            page_size: PAGE_SIZE as u32,
            page_count: pages,
            data_connections: 0,
        }))
        .unwrap();
    let (door, bell) = crate::migration::recover::Door::new(id, offer, skey.public());
    let committed = Arc::new(std::sync::Mutex::new(None));
    let target = {
        let (dst, committed) = (dst.clone(), committed.clone());
        let link = Link::stream(far, Some(pages));
        tokio::spawn(async move {
            let hooks = RecordCommit(committed);
            run_target(
                &dst,
                &hooks,
                link,
                receiver,
                id,
                &tkey,
                Default::default(),
                Some(bell),
            )
            .await
            .unwrap()
        })
    };
    let reconnect = PipeReconnect {
        door,
        key: skey.clone(),
        target: SecretKey::from_bytes(&[2; 32]).public(),
        id,
        offer,
        attempts: Default::default(),
    };
    let (watch_tx, _watch_rx) = watch::channel(Progress::default());
    let source = run_source(
        &src,
        &CutAtPush(cut),
        &reconnect,
        Link::stream(near, None),
        SourceTransfer {
            transport: "test".into(),
            id,
            offer,
            page_count: pages,
            key: skey.clone(),
            target: reconnect.target,
        },
        SourceParams {
            commit_timeout: Duration::from_secs(10),
            ..SourceParams::new(Mode::PostCopy, Limits::default())
        },
        &watch_tx,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let target = target.await.unwrap();
    proxy.abort();
    let SourceOutcome::Committed { commit, .. } = &source else {
        panic!("expected a commit after recovery, got {source:?}");
    };
    assert_eq!(target, TargetOutcome::Committed { root: commit.root });
    assert_eq!(*committed.lock().unwrap(), Some(commit.root));
    assert!(
        reconnect.attempts.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the cut was recovered from"
    );
    assert!(verified_clean(&dst), "the VM verifies clean on the target");
    src.shut_down();
    dst.shut_down();
    let _ = tokio::task::spawn_blocking(move || {
        w1.join().ok();
        w2.join().ok();
    })
    .await;
}
