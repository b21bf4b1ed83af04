//! QEMU migrations tunnelled through the mesh (the protocol: [`drift_protocol::tunnel`]).
//!
//! QEMU's migration stream is plain bytes on the wire unless every host has TLS certificates;
//! libvirt's tunnelled mode encrypts but funnels everything through one stream and can do
//! neither multifd nor post-copy. drift gives every connection QEMU opens a libp2p stream of
//! its own (Noise-encrypted, mutually authenticated, between exactly the two peers of the
//! accepted offer), both ways, so multifd channels stay parallel and post-copy's return path
//! works.
//!
//! - Source: QEMU migrates to a private `unix:` socket in the VM's directory; each connection
//!   it opens becomes channel `i` (in the order QEMU opened them) on a `/drift/tunnel/1`
//!   stream to the target. The capability `pause-before-switchover` stops QEMU after it paused
//!   the guest and before it sends the last pages: the node records the switchover durably
//!   there, then lets it go on (`migrate-continue`). After `completed` the source QEMU stays
//!   paused until the target's signed commit arrives; only then is it destroyed.
//! - Target: QEMU waits with `-incoming defer -S` on a `unix:` socket; channels are connected to
//!   it in index order (QEMU 7 takes the first connection as the main channel). When QEMU
//!   completes, the node compares its transcript root with the one the source signed, records
//!   the commit, and only then sends `cont`. In post-copy it resumes the guest as soon as QEMU
//!   enters `postcopy-active`, after recording that the VM runs here (from then on losing the
//!   source loses the VM, as the design says).
//!
//! Any failure before the switchover leaves the guest running on the source: QEMU resumes it
//! itself when a migration fails, and the engine sends `cont` if it finds it paused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drift_protocol::migration::Mode;
use drift_protocol::transfer::{Abort, AbortReason, Commit, Complete};
use drift_protocol::tunnel::{
    transcript_root, ChannelAnswer, ChannelDigest, ChannelOpen, TunnelControl, MAX_CHANNELS,
};
use drift_protocol::{Hash, MigrationId, NodeId, SecretKey, Signed};
use libp2p::StreamProtocol;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::engine::{EngineError, Hooks, Point, Progress, SourceOutcome, TargetOutcome};
use super::frames::{read_typed, write_typed};
use crate::hypervisor::qemu::{resume_here, QMP_TIMEOUT};
use crate::hypervisor::qmp::{MigrationInfo, Qmp, QmpError};
use crate::mesh::Client;

/// The stream protocol of tunnel channels.
pub const CHANNEL_PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/tunnel/1");
/// How often the engine asks QEMU how the migration goes.
const POLL: Duration = Duration::from_millis(50);
/// How often the target asks its QEMU whether it loaded everything, once the source completed
/// (both guests are paused then, so every millisecond is downtime).
const COMPLETION_POLL: Duration = Duration::from_millis(2);
/// Control frames are small.
const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// The longest a tunnelled migration may run before the switchover.
const MAX_BEFORE_SWITCHOVER: Duration = Duration::from_secs(600);
/// The longest the target waits for the source once QEMU runs the migration.
const TARGET_IDLE: Duration = Duration::from_secs(600);
/// How long to wait for the last bytes of every channel after QEMU completed.
const DRAIN: Duration = Duration::from_secs(30);
/// Copy buffer of one direction of one channel.
const PUMP_BUF: usize = 256 * 1024;
/// `max-bandwidth` when no cap is set: QEMU's own default (128 MiB/s) would cap every
/// migration.
const UNCAPPED_BYTES_PER_S: u64 = 64 << 30;

/// Settings of one tunnelled migration, the same on both sides (from the offer).
#[derive(Debug, Clone, Copy)]
pub struct QemuParams {
    pub mode: Mode,
    pub multifd_channels: u32,
    pub downtime_limit: Duration,
    pub bandwidth_cap: Option<u64>,
}

fn vmm(e: QmpError) -> EngineError {
    EngineError::Vmm(format!("QMP: {e}"))
}

/// Sets the capabilities (both sides) and parameters of a migration.
async fn configure(qmp: &Qmp, p: &QemuParams, source: bool) -> Result<(), EngineError> {
    let mut caps = vec![
        ("events", true),
        ("postcopy-ram", p.mode != Mode::PreCopy),
        ("multifd", p.multifd_channels > 0),
    ];
    if source {
        caps.push(("pause-before-switchover", true));
    }
    qmp.set_capabilities(&caps).await.map_err(vmm)?;
    let mut params = serde_json::Map::new();
    if p.multifd_channels > 0 {
        params.insert("multifd-channels".into(), json!(p.multifd_channels));
    }
    if source {
        params.insert(
            "downtime-limit".into(),
            json!(p.downtime_limit.as_millis().max(1) as u64),
        );
        params.insert(
            "max-bandwidth".into(),
            json!(p.bandwidth_cap.unwrap_or(UNCAPPED_BYTES_PER_S)),
        );
    }
    if !params.is_empty() {
        qmp.set_parameters(serde_json::Value::Object(params))
            .await
            .map_err(vmm)?;
    }
    Ok(())
}

/// Copies `from` into `to` until `from` ends, hashing every byte, then ends `to`'s writing
/// side.
async fn pump_hashed<R, W>(mut from: R, mut to: W) -> std::io::Result<(u64, Hash)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; PUMP_BUF];
    let mut hasher = blake3::Hasher::new();
    let mut bytes = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).await?;
        bytes += n as u64;
    }
    let _ = to.shutdown().await;
    Ok((bytes, Hash::from(hasher.finalize())))
}

/// Copies `from` into `to` until `from` ends, then ends `to`'s writing side.
async fn pump<R, W>(mut from: R, mut to: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if tokio::io::copy(&mut from, &mut to).await.is_ok() {
        let _ = to.shutdown().await;
    }
}

/// The channels of one migration as one side forwards them.
#[derive(Debug, Default)]
struct Transcript {
    /// Channels opened so far.
    opened: u32,
    /// Source-to-target directions that ended, with what went through them.
    digests: Vec<ChannelDigest>,
}

/// Shared between a migration's engine and its channel tasks.
#[derive(Debug)]
struct Channels {
    transcript: Mutex<Transcript>,
    /// Bumped on every change of the transcript.
    changed: watch::Sender<u64>,
}

impl Channels {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            transcript: Mutex::new(Transcript::default()),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Transcript> {
        self.transcript.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn finish(&self, digest: ChannelDigest) {
        self.lock().digests.push(digest);
        self.touch();
    }

    /// Waits until every opened channel's source-to-target direction ended; the digests.
    async fn drained(&self, within: Duration) -> Option<Vec<ChannelDigest>> {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                {
                    let t = self.lock();
                    if t.opened > 0 && t.digests.len() as u32 == t.opened {
                        return t.digests.clone();
                    }
                }
                if rx.changed().await.is_err() {
                    return Vec::new();
                }
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .ok()
            .filter(|d| !d.is_empty())
    }
}

/// Reads control frames into a small queue, so the engine can poll QEMU meanwhile.
fn spawn_control_reader<R>(mut rd: R) -> mpsc::Receiver<TunnelControl>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok(frame) = read_typed::<_, TunnelControl>(&mut rd, MAX_CONTROL_FRAME).await {
            if tx.send(frame).await.is_err() {
                break;
            }
        }
    });
    rx
}

fn progress_of(info: &MigrationInfo, started: Instant, phase: &str) -> Progress {
    Progress {
        phase: phase.to_string(),
        rounds: info.dirty_sync_count.min(u64::from(u32::MAX)) as u32,
        pages_sent: info.ram_transferred / 4096,
        // QEMU counts multifd bytes in `transferred` too.
        bytes_sent: info.ram_transferred,
        dirty_pages: info.ram_remaining / 4096,
        rate_bytes_per_s: info.ram_mbps * 1e6 / 8.0,
        expected_downtime_ms: info.expected_downtime_ms.unwrap_or(0) as f64,
        downtime_ms: info.downtime_ms.map(|d| d as f64),
        total_ms: info
            .total_time_ms
            .map(|t| t as f64)
            .or_else(|| Some(started.elapsed().as_secs_f64() * 1000.0)),
    }
}

/// The source side of one tunnelled migration.
#[derive(Debug)]
pub struct QemuSource {
    pub qmp: Arc<Qmp>,
    pub vm_dir: PathBuf,
    pub mesh: Client,
    pub id: MigrationId,
    pub offer: Hash,
    pub target: NodeId,
    pub key: SecretKey,
    pub params: QemuParams,
    pub commit_timeout: Duration,
}

/// Makes sure the source guest runs (after a failure before the switchover).
async fn ensure_running(qmp: &Qmp) -> Result<(), EngineError> {
    resume_here(qmp).await.map_err(vmm)
}

/// Cancels QEMU's migration and resumes the guest here.
async fn cancel_and_resume(qmp: &Qmp, reason: String) -> Result<SourceOutcome, EngineError> {
    ensure_running(qmp).await?;
    Ok(SourceOutcome::ResumedHere { reason })
}

/// Runs the source side on the accepted offer's `control` stream. The hooks are the same as
/// the sandbox engine's: [`Point::Pausing`] (or [`Point::HandingOver`] in post-copy) must make
/// the switchover durable before QEMU sends the last pages.
pub async fn run_source_qemu<S, H>(
    src: QemuSource,
    hooks: &H,
    control: S,
    watch: &watch::Sender<Progress>,
    cancel: CancellationToken,
) -> Result<SourceOutcome, EngineError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    H: Hooks,
{
    let qmp = src.qmp.clone();
    let (rd, mut wr) = tokio::io::split(control);
    let mut inbox = spawn_control_reader(rd);
    match tokio::time::timeout(Duration::from_secs(30), inbox.recv()).await {
        Ok(Some(TunnelControl::Ready)) => {}
        Ok(Some(TunnelControl::Abort(a))) => {
            return Ok(SourceOutcome::ResumedHere {
                reason: format!("the target could not prepare: {:?}", a.reason),
            })
        }
        Ok(Some(other)) => {
            return Err(EngineError::Protocol(format!(
                "expected Ready, got {other:?}"
            )))
        }
        Ok(None) | Err(_) => {
            return Ok(SourceOutcome::ResumedHere {
                reason: "the target did not get ready".into(),
            })
        }
    }
    configure(&qmp, &src.params, true).await?;
    let sock = src.vm_dir.join(format!("mig-{}.sock", src.id.short()));
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    let channels = Channels::new();
    let acceptor = tokio::spawn(accept_source_channels(
        listener,
        src.mesh.clone(),
        src.target,
        src.id,
        1 + src.params.multifd_channels,
        channels.clone(),
    ));
    let _stop_acceptor = AbortOnDrop(acceptor);
    let outcome = drive_source(
        &src, hooks, &mut wr, &mut inbox, &channels, watch, cancel, &sock,
    )
    .await;
    let _ = std::fs::remove_file(&sock);
    if let Ok(SourceOutcome::ResumedHere { .. }) | Err(_) = &outcome {
        // The guest runs here (or the engine failed): the target must not wait for more.
        let _ = write_typed(
            &mut wr,
            &TunnelControl::Abort(Abort {
                id: src.id,
                reason: AbortReason::LocalError,
            }),
        )
        .await;
    }
    let _ = wr.shutdown().await;
    outcome
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive_source<W, H>(
    src: &QemuSource,
    hooks: &H,
    wr: &mut W,
    inbox: &mut mpsc::Receiver<TunnelControl>,
    channels: &Arc<Channels>,
    watch: &watch::Sender<Progress>,
    cancel: CancellationToken,
    sock: &Path,
) -> Result<SourceOutcome, EngineError>
where
    W: AsyncWrite + Unpin,
    H: Hooks,
{
    let qmp = &src.qmp;
    let mode = src.params.mode;
    // QEMU pauses the guest on its own when it converges, so the switchover is recorded up
    // front: from here a crash leaves the VM to the resolver, which resumes it here unless the
    // target committed. Recording it here keeps the disk writes out of the downtime.
    let postcopy = mode != Mode::PreCopy;
    let recorded = match hooks.at(Point::Pausing).await {
        Ok(()) if postcopy => hooks.at(Point::HandingOver).await,
        other => other,
    };
    if let Err(e) = recorded {
        return Ok(SourceOutcome::ResumedHere {
            reason: format!("cannot record the switchover: {e}"),
        });
    }
    let mut events = qmp.events();
    qmp.execute(
        "migrate",
        Some(json!({ "uri": format!("unix:{}", sock.display()) })),
        QMP_TIMEOUT,
    )
    .await
    .map_err(vmm)?;
    let started = Instant::now();
    let mut postcopy_requested = false;
    if mode == Mode::PostCopy {
        qmp.execute("migrate-start-postcopy", None, QMP_TIMEOUT)
            .await
            .map_err(vmm)?;
        postcopy_requested = true;
    }
    let mut switched = false;
    let mut handed_over = false;
    let mut rounds_seen = 0u64;
    let info = loop {
        tokio::select! {
            _ = cancel.cancelled(), if !switched => {
                let _ = write_typed(wr, &TunnelControl::Abort(Abort { id: src.id, reason: AbortReason::Cancelled })).await;
                return cancel_and_resume(qmp, "cancelled".into()).await;
            }
            frame = inbox.recv() => {
                let reason = match frame {
                    Some(TunnelControl::Abort(a)) => format!("the target aborted: {:?}", a.reason),
                    Some(other) => format!("unexpected control frame {other:?}"),
                    None => "the target went away".into(),
                };
                if handed_over {
                    return Ok(SourceOutcome::Unknown { reason });
                }
                // Before `Complete` the target never resumes a pre-copy VM: resuming here is
                // safe even after the switchover began.
                return cancel_and_resume(qmp, reason).await;
            }
            // A MIGRATION event (or the poll interval) is the cue to look.
            _ = events.recv() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
        let info = qmp.query_migrate().await.map_err(vmm)?;
        let status = info.status.clone().unwrap_or_default();
        let _ = watch.send(progress_of(&info, started, &status));
        while rounds_seen < info.dirty_sync_count {
            rounds_seen += 1;
            if rounds_seen >= 2 {
                hooks.at(Point::RoundSent((rounds_seen - 1) as u32)).await?;
            }
        }
        if mode == Mode::Hybrid && !postcopy_requested && info.dirty_sync_count >= 2 {
            qmp.execute("migrate-start-postcopy", None, QMP_TIMEOUT)
                .await
                .map_err(vmm)?;
            postcopy_requested = true;
        }
        match status.as_str() {
            "pre-switchover" if !switched => {
                switched = true;
                handed_over = postcopy_requested;
                hooks.at(Point::Paused).await?;
                qmp.execute(
                    "migrate-continue",
                    Some(json!({ "state": "pre-switchover" })),
                    QMP_TIMEOUT,
                )
                .await
                .map_err(vmm)?;
            }
            "postcopy-active" => {}
            "postcopy-paused" => {
                return Ok(SourceOutcome::Unknown {
                    reason: "post-copy stalled: the tunnel broke".into(),
                });
            }
            "completed" => break info,
            "failed" | "cancelled" => {
                let reason = info
                    .error_desc
                    .clone()
                    .unwrap_or_else(|| format!("QEMU's migration {status}"));
                if handed_over {
                    return Ok(SourceOutcome::Unknown { reason });
                }
                ensure_running(qmp).await?;
                return Ok(SourceOutcome::ResumedHere { reason });
            }
            _ => {}
        }
        if !switched && started.elapsed() > MAX_BEFORE_SWITCHOVER {
            return cancel_and_resume(qmp, "no switchover in time".into()).await;
        }
    };
    // QEMU completed: the guest is paused here. It resumes here only if the target says it
    // never ran; it is destroyed only on the target's signed commit.
    let completed_at = Instant::now();
    let mut progress = progress_of(&info, started, "completed");
    if handed_over {
        hooks.at(Point::Pushing).await?;
    }
    let Some(digests) = channels.drained(DRAIN).await else {
        let reason = "a channel did not end after QEMU completed".to_string();
        if handed_over {
            return Ok(SourceOutcome::Unknown { reason });
        }
        ensure_running(qmp).await?;
        return Ok(SourceOutcome::ResumedHere { reason });
    };
    let root = transcript_root(&digests);
    let bytes: u64 = digests.iter().map(|d| d.bytes).sum();
    let complete = Complete {
        id: src.id,
        offer: src.offer,
        root,
        page_count: bytes,
    };
    if let Err(e) = write_typed(
        wr,
        &TunnelControl::Complete(Signed::sign(&complete, &src.key)),
    )
    .await
    {
        // It may have arrived: never resume on a guess.
        return Ok(SourceOutcome::Unknown {
            reason: format!("sending Complete: {e}"),
        });
    }
    hooks.at(Point::CompleteSent(root)).await?;
    progress.bytes_sent = progress.bytes_sent.max(bytes);
    let _ = watch.send(progress.clone());
    let answer = tokio::time::timeout(src.commit_timeout, inbox.recv()).await;
    match answer {
        Ok(Some(TunnelControl::Commit(signed))) => {
            let commit = signed
                .verify_by(&src.target)
                .map_err(|e| EngineError::Protocol(format!("commit: {e}")))?;
            if commit.id != src.id || commit.root != root {
                return Err(EngineError::Protocol(
                    "the commit is for another migration or root".into(),
                ));
            }
            hooks.at(Point::CommitReceived).await?;
            // Pre-copy: the guest was paused from QEMU's stop (its own downtime figure ends
            // when the last bytes left) until the target resumed it, just before it committed.
            if !handed_over {
                progress.downtime_ms = progress
                    .downtime_ms
                    .map(|d| d + completed_at.elapsed().as_secs_f64() * 1e3);
            }
            progress.phase = "committed".into();
            progress.total_ms = Some(started.elapsed().as_secs_f64() * 1e3);
            let _ = watch.send(progress.clone());
            Ok(SourceOutcome::Committed { commit, progress })
        }
        Ok(Some(TunnelControl::Abort(a))) if !handed_over => {
            warn!(reason = ?a.reason, "the target refused the completed migration; resuming here");
            ensure_running(qmp).await?;
            Ok(SourceOutcome::ResumedHere {
                reason: format!("the target refused: {:?}", a.reason),
            })
        }
        Ok(other) => Ok(SourceOutcome::Unknown {
            reason: format!("no commit: {other:?}"),
        }),
        Err(_) => Ok(SourceOutcome::Unknown {
            reason: "no commit in time".into(),
        }),
    }
}

/// Accepts QEMU's connections on the source and tunnels each as the next channel. Channels
/// open one at a time, in QEMU's order: each stream is opened and answered before the next.
async fn accept_source_channels(
    listener: UnixListener,
    mesh: Client,
    target: NodeId,
    id: MigrationId,
    max: u32,
    channels: Arc<Channels>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            break;
        };
        let channel = {
            let mut t = channels.lock();
            if t.opened >= max {
                warn!(migration = %id.short(), "QEMU opened more channels than agreed; refused");
                continue;
            }
            t.opened += 1;
            t.opened - 1
        };
        channels.touch();
        // On failure `conn` is dropped: QEMU sees its connection end and fails the migration.
        let stream = match open_channel(&mesh, target, id, channel).await {
            Ok(s) => s,
            Err(e) => {
                warn!(migration = %id.short(), channel, error = %e, "cannot open a tunnel channel");
                continue;
            }
        };
        let channels = channels.clone();
        tasks.spawn(async move {
            if let Err(e) = source_channel(conn, stream, channel, &channels).await {
                warn!(migration = %id.short(), channel, error = %e, "tunnel channel failed");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

// Channels are claimed as bits of a u64.
const _: () = assert!(MAX_CHANNELS <= 64);

/// Attempts at opening one channel stream: a stream the target dropped unanswered (it arrived
/// while the target's acceptor was busy) is opened again.
const CHANNEL_OPEN_ATTEMPTS: u32 = 5;

/// Opens channel `channel` of migration `id` to `target` and waits for its answer.
async fn open_channel(
    mesh: &Client,
    target: NodeId,
    id: MigrationId,
    channel: u32,
) -> std::io::Result<tokio_util::compat::Compat<libp2p::Stream>> {
    let until = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    for attempt in 0..CHANNEL_OPEN_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut stream = match mesh.open_stream(&target, CHANNEL_PROTOCOL, left).await {
            Ok(s) => s,
            Err(e) => {
                last = Some(std::io::Error::other(format!("opening a channel: {e}")));
                continue;
            }
        };
        let answered = async {
            write_typed(&mut stream, &ChannelOpen { id, channel }).await?;
            read_typed::<_, ChannelAnswer>(&mut stream, 64).await
        };
        match tokio::time::timeout(Duration::from_secs(5), answered).await {
            Ok(Ok(ChannelAnswer::Accepted)) => return Ok(stream),
            Ok(Ok(refused)) => {
                return Err(std::io::Error::other(format!(
                    "the target refused channel {channel}: {refused:?}"
                )))
            }
            // Dropped unanswered: open it again.
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer to a channel",
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no time left to open a channel",
        )
    }))
}

async fn source_channel<S>(
    conn: UnixStream,
    stream: S,
    channel: u32,
    channels: &Channels,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (from_qemu, to_qemu) = conn.into_split();
    let (from_peer, to_peer) = tokio::io::split(stream);
    let back = tokio::spawn(pump(from_peer, to_qemu));
    let (bytes, hash) = pump_hashed(from_qemu, to_peer).await?;
    channels.finish(ChannelDigest {
        channel,
        bytes,
        hash,
    });
    let _ = back.await;
    Ok(())
}

/// Incoming tunnelled migrations of this node, for the channel acceptor.
#[derive(Debug, Default)]
pub struct IncomingTunnels {
    open: Mutex<BTreeMap<MigrationId, IncomingTunnel>>,
}

#[derive(Debug, Clone)]
struct IncomingTunnel {
    source: NodeId,
    socket: PathBuf,
    max: u32,
    channels: Arc<Channels>,
    /// Channels connected to QEMU so far: channel `i` connects once this reads `i`.
    connected: watch::Sender<u32>,
    /// Channels answered so far (bit `i` for channel `i`): each is taken once.
    claimed: Arc<AtomicU64>,
}

/// Why a channel stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChannelRefusal {
    #[error("no tunnelled migration {0} from this peer")]
    Unknown(String),
    #[error("channel {0} is beyond the agreed channels")]
    TooMany(u32),
    #[error("channel {0} was opened twice")]
    Twice(u32),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ChannelRefusal {
    /// What the opener is told.
    fn answer(&self) -> ChannelAnswer {
        match self {
            ChannelRefusal::Unknown(_) => ChannelAnswer::UnknownMigration,
            ChannelRefusal::TooMany(_) => ChannelAnswer::BeyondAgreed,
            ChannelRefusal::Twice(_) => ChannelAnswer::AlreadyOpen,
            ChannelRefusal::Io(_) => ChannelAnswer::Invalid,
        }
    }
}

impl IncomingTunnels {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<MigrationId, IncomingTunnel>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, id: MigrationId, t: IncomingTunnel) {
        self.lock().insert(id, t);
    }

    fn remove(&self, id: &MigrationId) {
        self.lock().remove(id);
    }

    /// The tunnel a channel opened by `from` belongs to, its index claimed.
    fn claim(&self, from: NodeId, open: &ChannelOpen) -> Result<IncomingTunnel, ChannelRefusal> {
        let tunnel = self
            .lock()
            .get(&open.id)
            .filter(|t| t.source == from)
            .cloned()
            .ok_or_else(|| ChannelRefusal::Unknown(open.id.short()))?;
        if open.channel >= tunnel.max || open.channel >= MAX_CHANNELS {
            return Err(ChannelRefusal::TooMany(open.channel));
        }
        let bit = 1u64 << open.channel;
        if tunnel.claimed.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Err(ChannelRefusal::Twice(open.channel));
        }
        Ok(tunnel)
    }

    /// Serves one channel stream from `from`: checks it belongs to an accepted migration from
    /// that peer, connects it to the waiting QEMU in index order, and forwards both ways.
    pub async fn serve<S>(&self, from: NodeId, mut stream: S) -> Result<(), ChannelRefusal>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let open = tokio::time::timeout(
            Duration::from_secs(10),
            read_typed::<_, ChannelOpen>(&mut stream, 1024),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no channel header"))??;
        let tunnel = match self.claim(from, &open) {
            Ok(t) => t,
            Err(refusal) => {
                let _ = write_typed(&mut stream, &refusal.answer()).await;
                let _ = stream.shutdown().await;
                return Err(refusal);
            }
        };
        write_typed(&mut stream, &ChannelAnswer::Accepted).await?;
        // In index order: QEMU takes the first connection as its main channel.
        let mut turn = tunnel.connected.subscribe();
        tokio::time::timeout(
            Duration::from_secs(30),
            turn.wait_for(|n| *n == open.channel),
        )
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "waiting for earlier channels")
        })?
        .map_err(|_| std::io::Error::other("migration ended"))?;
        let conn = connect_when_listening(&tunnel.socket).await?;
        {
            let mut t = tunnel.channels.lock();
            t.opened += 1;
        }
        tunnel.channels.touch();
        tunnel.connected.send_modify(|n| *n += 1);
        let (from_qemu, to_qemu) = conn.into_split();
        let (from_peer, to_peer) = tokio::io::split(stream);
        let back = tokio::spawn(pump(from_qemu, to_peer));
        let (bytes, hash) = pump_hashed(from_peer, to_qemu).await?;
        tunnel.channels.finish(ChannelDigest {
            channel: open.channel,
            bytes,
            hash,
        });
        let _ = back.await;
        Ok(())
    }
}

/// Connects to QEMU's incoming socket, waiting (bounded) for it to listen.
async fn connect_when_listening(path: &Path) -> std::io::Result<UnixStream> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The target side of one tunnelled migration.
#[derive(Debug)]
pub struct QemuTarget {
    pub qmp: Arc<Qmp>,
    pub vm_dir: PathBuf,
    pub id: MigrationId,
    pub offer: Hash,
    pub source: NodeId,
    pub key: SecretKey,
    pub params: QemuParams,
    pub tunnels: Arc<IncomingTunnels>,
}

/// Runs the target side on the accepted offer's `control` stream. The hook at
/// [`Point::Verified`] must make the commit durable; the guest resumes only after it
/// succeeded (post-copy: after [`Point::ResumingPostCopy`] succeeded).
pub async fn run_target_qemu<S, H>(
    t: QemuTarget,
    hooks: &H,
    control: S,
) -> Result<TargetOutcome, EngineError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    H: Hooks,
{
    let sock = t.vm_dir.join("incoming.sock");
    let _ = std::fs::remove_file(&sock);
    let (rd, mut wr) = tokio::io::split(control);
    let channels = Channels::new();
    t.tunnels.register(
        t.id,
        IncomingTunnel {
            source: t.source,
            socket: sock.clone(),
            max: 1 + t.params.multifd_channels,
            channels: channels.clone(),
            connected: watch::channel(0).0,
            claimed: Arc::new(AtomicU64::new(0)),
        },
    );
    let outcome = drive_target(&t, hooks, rd, &mut wr, &channels, &sock).await;
    t.tunnels.remove(&t.id);
    if let Ok(TargetOutcome::Aborted { reason } | TargetOutcome::Incomplete { reason }) = &outcome {
        let _ = write_typed(
            &mut wr,
            &TunnelControl::Abort(Abort {
                id: t.id,
                reason: AbortReason::LocalError,
            }),
        )
        .await;
        info!(migration = %t.id.short(), %reason, "tunnelled migration ended here");
    }
    outcome
}

async fn drive_target<R, W, H>(
    t: &QemuTarget,
    hooks: &H,
    rd: R,
    wr: &mut W,
    channels: &Arc<Channels>,
    sock: &Path,
) -> Result<TargetOutcome, EngineError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
    H: Hooks,
{
    let qmp = &t.qmp;
    let aborted = |reason: String| Ok(TargetOutcome::Aborted { reason });
    if let Err(e) = configure(qmp, &t.params, false).await {
        return aborted(format!("cannot prepare QEMU: {e}"));
    }
    if let Err(e) = qmp
        .execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", sock.display()) })),
            QMP_TIMEOUT,
        )
        .await
    {
        return aborted(format!("migrate-incoming: {e}"));
    }
    let mut events = qmp.events();
    write_typed(wr, &TunnelControl::Ready).await?;
    let mut inbox = spawn_control_reader(rd);
    let mut running = false;
    let started = Instant::now();
    let complete = loop {
        let ended = |running: bool, reason: String| {
            if running {
                Ok(TargetOutcome::Incomplete { reason })
            } else {
                Ok(TargetOutcome::Aborted { reason })
            }
        };
        tokio::select! {
            frame = inbox.recv() => match frame {
                Some(TunnelControl::Complete(c)) => break c,
                Some(TunnelControl::Abort(a)) => return ended(running, format!("the source aborted: {:?}", a.reason)),
                Some(other) => return ended(running, format!("unexpected control frame {other:?}")),
                None => return ended(running, "the source went away".into()),
            },
            _ = events.recv() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
        let info = match qmp.query_migrate().await {
            Ok(i) => i,
            Err(e) => return ended(running, format!("QEMU: {e}")),
        };
        match info.status.as_deref() {
            Some("postcopy-active") if !running && t.params.mode != Mode::PreCopy => {
                // From here the guest runs here: durable first.
                hooks.at(Point::ResumingPostCopy).await?;
                qmp.cont().await.map_err(vmm)?;
                running = true;
            }
            Some("failed") => {
                return ended(
                    running,
                    info.error_desc
                        .unwrap_or_else(|| "QEMU's incoming migration failed".into()),
                )
            }
            _ => {}
        }
        if started.elapsed() > TARGET_IDLE {
            return ended(running, "the migration took too long".into());
        }
    };
    hooks.at(Point::CompleteReceived).await?;
    let refuse = |running: bool, reason: String| {
        if running {
            Ok(TargetOutcome::Incomplete { reason })
        } else {
            Ok(TargetOutcome::Aborted { reason })
        }
    };
    let complete = match complete.verify_by(&t.source) {
        Ok(c) if c.id == t.id && c.offer == t.offer => c,
        Ok(_) => return refuse(running, "Complete for another migration".into()),
        Err(e) => return refuse(running, format!("Complete not signed by the source: {e}")),
    };
    // QEMU must have loaded everything, and every channel must have ended.
    let until = Instant::now() + DRAIN;
    loop {
        let status = qmp.query_migrate().await.map_err(vmm)?.status;
        match status.as_deref() {
            Some("completed") => break,
            Some("failed") => return refuse(running, "QEMU's incoming migration failed".into()),
            _ if Instant::now() >= until => {
                return refuse(
                    running,
                    "QEMU did not complete the incoming migration".into(),
                )
            }
            // The guest is paused on both sides here: look often.
            _ => tokio::time::sleep(COMPLETION_POLL).await,
        }
    }
    let Some(digests) = channels.drained(DRAIN).await else {
        return refuse(running, "a channel did not end".into());
    };
    let root = transcript_root(&digests);
    if root != complete.root {
        return refuse(
            running,
            format!(
                "transcript root {} is not the source's {}",
                root.short(),
                complete.root.short()
            ),
        );
    }
    // Durable before the guest runs here.
    hooks.at(Point::Verified(root)).await?;
    if !running {
        if let Err(e) = qmp.cont().await {
            // Committed: the record says the VM is here; a restart resumes it.
            warn!(error = %e, "could not resume the arrived VM");
        }
    }
    let commit = Commit {
        id: t.id,
        root,
        committed_at: crate::clock::now(),
    };
    write_typed(wr, &TunnelControl::Commit(Signed::sign(&commit, &t.key))).await?;
    hooks.at(Point::CommitSent).await?;
    Ok(TargetOutcome::Committed { root })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Opens a channel on `tunnels` as `from` would, over an in-memory stream; the answer.
    async fn open_on(
        tunnels: &Arc<IncomingTunnels>,
        from: NodeId,
        id: MigrationId,
        channel: u32,
    ) -> (ChannelAnswer, tokio::io::DuplexStream) {
        let (mut near, far) = tokio::io::duplex(64 * 1024);
        let t = tunnels.clone();
        tokio::spawn(async move {
            let _ = t.serve(from, far).await;
        });
        write_typed(&mut near, &ChannelOpen { id, channel })
            .await
            .unwrap();
        let answer = read_typed::<_, ChannelAnswer>(&mut near, 64).await.unwrap();
        (answer, near)
    }

    #[tokio::test]
    async fn channels_are_answered_once_each_and_only_for_their_migration_and_source() {
        use rand_core::OsRng;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("incoming.sock");
        let qemu = UnixListener::bind(&sock).unwrap();
        let source = SecretKey::generate(&mut OsRng).public();
        let stranger = SecretKey::generate(&mut OsRng).public();
        let id = MigrationId::random(&mut OsRng);
        let tunnels = Arc::new(IncomingTunnels::default());
        tunnels.register(
            id,
            IncomingTunnel {
                source,
                socket: sock.clone(),
                max: 2,
                channels: Channels::new(),
                connected: watch::channel(0).0,
                claimed: Arc::new(AtomicU64::new(0)),
            },
        );
        let other = MigrationId::random(&mut OsRng);
        assert_eq!(
            open_on(&tunnels, source, other, 0).await.0,
            ChannelAnswer::UnknownMigration
        );
        assert_eq!(
            open_on(&tunnels, stranger, id, 0).await.0,
            ChannelAnswer::UnknownMigration,
            "another peer may not join the migration"
        );
        assert_eq!(
            open_on(&tunnels, source, id, 2).await.0,
            ChannelAnswer::BeyondAgreed
        );
        let (answer, mut main) = open_on(&tunnels, source, id, 0).await;
        assert_eq!(answer, ChannelAnswer::Accepted);
        assert_eq!(
            open_on(&tunnels, source, id, 0).await.0,
            ChannelAnswer::AlreadyOpen
        );
        // The accepted channel reaches "QEMU", byte for byte.
        let (mut conn, _) = qemu.accept().await.unwrap();
        main.write_all(b"QEVM").await.unwrap();
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"QEVM");
    }

    #[tokio::test]
    async fn pumps_hash_exactly_what_they_forward() {
        let (mut a, b) = tokio::io::duplex(1024);
        let (c, mut d) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
        });
        let (bytes, hash) = pump_hashed(b, c).await.unwrap();
        writer.await.unwrap();
        let mut got = Vec::new();
        d.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        assert_eq!(bytes, data.len() as u64);
        assert_eq!(hash, Hash::of(&data));
    }

    #[tokio::test]
    async fn the_transcript_is_ready_only_when_every_opened_channel_ended() {
        let c = Channels::new();
        assert!(
            c.drained(Duration::from_millis(20)).await.is_none(),
            "nothing opened yet"
        );
        c.lock().opened = 2;
        c.touch();
        c.finish(ChannelDigest {
            channel: 1,
            bytes: 3,
            hash: Hash::of(b"abc"),
        });
        assert!(
            c.drained(Duration::from_millis(20)).await.is_none(),
            "one still open"
        );
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.drained(Duration::from_secs(5)).await });
        c.finish(ChannelDigest {
            channel: 0,
            bytes: 1,
            hash: Hash::of(b"x"),
        });
        let digests = waiter.await.unwrap().unwrap();
        assert_eq!(digests.len(), 2);
        assert_eq!(c.lock().opened, 2);
    }
}
