//! The source side of a tunnelled QEMU migration: QEMU migrates to a private socket, each of
//! its connections goes to the target as one channel, and the node drives QEMU through the
//! switchover and waits for the target's commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drift_protocol::dataplane::DataEndpoint;
use drift_protocol::migration::Mode;
use drift_protocol::transfer::convergence::{Convergence, Decision, Limits, RoundReport};
use drift_protocol::transfer::{Abort, AbortReason, Complete};
use drift_protocol::tunnel::{
    transcript_root, ChannelAnswer, ChannelDigest, ChannelOpen, TunnelControl, MAX_CHANNELS,
};
use drift_protocol::{Hash, MigrationId, NodeId, SecretKey, Signed};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    configure, progress_of, pump, pump_hashed, spawn_control_reader, vmm, ChannelStream, Channels,
    QemuParams, CHANNEL_PROTOCOL, DRAIN, MAX_BEFORE_SWITCHOVER, POLL,
};
use crate::dataplane::DataPlane;
use crate::hypervisor::qemu::{resume_here, QMP_TIMEOUT};
use crate::hypervisor::qmp::Qmp;
use crate::mesh::Client;
use crate::migration::engine::{EngineError, Hooks, Point, Progress, SourceOutcome};
use crate::migration::frames::{read_typed, write_typed};

/// Where the target takes this migration's data connections.
#[derive(Debug, Clone)]
pub struct DataRoute {
    pub plane: Arc<DataPlane>,
    pub endpoint: DataEndpoint,
    /// The target's addresses as the mesh reaches it.
    pub via: Vec<std::net::IpAddr>,
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
    /// The convergence control of the migration (QEMU's own rounds drive it).
    pub limits: Limits,
    pub commit_timeout: Duration,
    /// Channels go on data connections, or (`None`, or when they cannot be made) on mesh
    /// streams.
    pub data: Option<DataRoute>,
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
    configure(&qmp, &src.params, Some(&src.limits)).await?;
    let sock = src.vm_dir.join(format!("mig-{}.sock", src.id.short()));
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    let channels = Channels::new();
    let opener = ChannelOpener {
        mesh: src.mesh.clone(),
        target: src.target,
        id: src.id,
        offer: src.offer,
        data: src.data.clone(),
    };
    let acceptor = tokio::spawn(accept_source_channels(
        listener,
        opener,
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

/// Tunnel bytes that cross after the target said its guest runs ([`TunnelControl::Running`])
/// before the source counts the post-copy as pushing pages ([`Point::Pushing`]).
const PUSHING_AFTER: u64 = 1 << 20;

/// Waits (at most `limit`) until the tunnel carried its first bytes to the target.
async fn wait_for_tunnel(channels: &Channels, limit: Duration) {
    let until = Instant::now() + limit;
    while channels.moved.load(std::sync::atomic::Ordering::Relaxed) == 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
        // Not before the tunnel carries bytes to the target: a switchover whose device state
        // is still queued on this side would leave the guest paused here with nowhere to run.
        wait_for_tunnel(channels, Duration::from_secs(30)).await;
        qmp.execute("migrate-start-postcopy", None, QMP_TIMEOUT)
            .await
            .map_err(vmm)?;
        postcopy_requested = true;
    }
    let mut switched = false;
    let mut handed_over = false;
    let mut pushing = false;
    // The target said its guest runs (post-copy): a break from here on is recoverable.
    let mut target_runs = false;
    // Tunnel bytes when the target's guest was first known to run.
    let mut switched_at: Option<u64> = None;
    let mut rounds_seen = 0u64;
    // Post-copy recovery: the attempts so far and the channel that carries it on.
    let mut attempt = 0u32;
    let mut recovered: Option<super::recover::Carrying> = None;
    let mut control_lost = false;
    // Convergence control on QEMU's rounds (its dirty-bitmap syncs); none in post-copy. Made
    // at the first round's end, when QEMU has told the guest's memory size.
    let mut convergence: Option<Convergence> = None;
    let mut not_converging: Option<String> = None;
    let info = loop {
        tokio::select! {
            _ = cancel.cancelled(), if !switched => {
                let _ = write_typed(wr, &TunnelControl::Abort(Abort { id: src.id, reason: AbortReason::Cancelled })).await;
                return cancel_and_resume(qmp, "cancelled".into()).await;
            }
            frame = inbox.recv(), if !control_lost => {
                let reason = match frame {
                    Some(TunnelControl::Running) if handed_over => {
                        target_runs = true;
                        continue;
                    }
                    Some(TunnelControl::Abort(a)) => format!("the target aborted: {:?}", a.reason),
                    Some(other) => format!("unexpected control frame {other:?}"),
                    // In post-copy the guest is the target's: QEMU's own state says whether
                    // its channels broke too (it pauses, and drift recovers the link) or it
                    // completes; the target waits for a recovery as long.
                    None if handed_over => {
                        control_lost = true;
                        continue;
                    }
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
        let mut shown = progress_of(&info, started, &status, &channels.transport());
        shown.fallback = src.limits.fallback.to_string();
        shown.not_converging = not_converging.clone();
        let _ = watch.send(shown);
        let new_round = rounds_seen < info.dirty_sync_count;
        while rounds_seen < info.dirty_sync_count {
            rounds_seen += 1;
            if rounds_seen >= 2 {
                hooks.at(Point::RoundSent((rounds_seen - 1) as u32)).await?;
            }
        }
        // A round ended (QEMU synced its dirty bitmap): what remains is the dirty set.
        let deciding = new_round
            && rounds_seen >= 2
            && status == "active"
            && !postcopy_requested
            && mode != Mode::PostCopy;
        if deciding {
            let c = convergence
                .get_or_insert_with(|| Convergence::new(src.limits.clone(), info.ram_total));
            let report = RoundReport {
                now_ms: started.elapsed().as_millis() as u64,
                round: (rounds_seen - 1) as u32,
                dirty_bytes: info.ram_remaining,
                send_rate: info.ram_mbps * 1e6 / 8.0,
                dirty_rate: info.dirty_pages_rate as f64 * 4096.0,
                switchover_cost_ms: 0.0,
            };
            match c.after_round(&report) {
                // QEMU switches over on its own once the rest fits its downtime limit.
                Decision::Round
                | Decision::SwitchOver {
                    over_target: false, ..
                } => {}
                Decision::SwitchOver {
                    over_target: true,
                    expected_downtime_ms,
                } => {
                    warn!(migration = %src.id.short(), expected_ms = expected_downtime_ms,
                        "not converging: letting QEMU switch over within the maximum downtime");
                    qmp.set_parameters(
                        json!({ "downtime-limit": c.limits().max_downtime_ms.max(1) }),
                    )
                    .await
                    .map_err(vmm)?;
                }
                Decision::Throttle { pct, why } => {
                    info!(migration = %src.id.short(), %why, pct, "raising QEMU's throttle ceiling");
                    not_converging = Some(why.to_string());
                    qmp.set_parameters(json!({ "max-cpu-throttle": pct }))
                        .await
                        .map_err(vmm)?;
                }
                Decision::PostCopy { why } if mode != Mode::PreCopy => {
                    info!(migration = %src.id.short(), %why, "switching to post-copy");
                    not_converging = Some(why.to_string());
                    qmp.execute("migrate-start-postcopy", None, QMP_TIMEOUT)
                        .await
                        .map_err(vmm)?;
                    postcopy_requested = true;
                }
                Decision::PostCopy { why } | Decision::Abort { why } => {
                    let reason = why.to_string();
                    warn!(migration = %src.id.short(), %reason, "aborting: the guest stays here");
                    let _ = write_typed(
                        wr,
                        &TunnelControl::Abort(Abort {
                            id: src.id,
                            reason: AbortReason::NotConverging,
                        }),
                    )
                    .await;
                    return cancel_and_resume(qmp, reason).await;
                }
            }
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
            // Pages are being pushed once the target said its guest runs (its QEMU loaded the
            // device state) and bytes crossed since.
            "postcopy-active" if handed_over && target_runs && !pushing => {
                let moved = channels.moved.load(std::sync::atomic::Ordering::Relaxed);
                let at = *switched_at.get_or_insert(moved);
                if moved >= at + PUSHING_AFTER {
                    pushing = true;
                    hooks.at(Point::Pushing).await?;
                }
            }
            "postcopy-active" => {}
            "postcopy-paused" if handed_over => {
                match super::recover::resume_source(src, &mut attempt, channels.clone()).await {
                    Ok(carrying) => recovered = Some(carrying),
                    Err(e) => {
                        return Ok(SourceOutcome::Unknown {
                            reason: format!("post-copy stalled: the tunnel broke; {e}"),
                        })
                    }
                }
            }
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
    let mut progress = progress_of(&info, started, "completed", &channels.transport());
    progress.fallback = src.limits.fallback.to_string();
    progress.not_converging = not_converging;
    if recovered.is_some() || control_lost {
        // The transcripts cannot agree after a break (see `recover`), and with no control
        // stream nothing carries `Complete`: the target commits on its own once its QEMU
        // completed, and the resolver learns it.
        let _ = watch.send(progress);
        return Ok(SourceOutcome::Unknown {
            reason: format!(
                "post-copy completed after {attempt} recovery attempt(s){}; asking the target",
                if control_lost {
                    ", its control stream lost"
                } else {
                    ""
                }
            ),
        });
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
            Ok(SourceOutcome::Committed {
                commit,
                progress: Box::new(progress),
            })
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
    mut opener: ChannelOpener,
    max: u32,
    channels: Arc<Channels>,
) {
    let id = opener.id;
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
        let stream = match opener.open(channel, &channels).await {
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

/// Opens a migration's channels: on data connections while they can be made, else (from the
/// first that cannot, for the rest of the migration) on mesh streams.
struct ChannelOpener {
    mesh: Client,
    target: NodeId,
    id: MigrationId,
    offer: Hash,
    data: Option<DataRoute>,
}

impl ChannelOpener {
    async fn open(
        &mut self,
        channel: u32,
        channels: &Channels,
    ) -> std::io::Result<Box<dyn ChannelStream>> {
        if let Some(route) = &self.data {
            let opened = route
                .plane
                .connect(
                    self.target,
                    &route.endpoint,
                    &route.via,
                    self.id,
                    self.offer,
                    channel,
                )
                .await;
            match opened {
                Ok(s) => {
                    if channel == 0 {
                        channels.set_transport(format!(
                            "data: {} × {}",
                            route.endpoint.connections,
                            crate::dataplane::describe(&s)
                        ));
                    }
                    return Ok(Box::new(s));
                }
                Err(e) if channel == 0 => {
                    warn!(migration = %self.id.short(), error = %e, "no data connection: channels move on mesh streams");
                    channels.set_transport(format!("mesh streams (no data connection: {e})"));
                    self.data = None;
                }
                // The target binds channels in order; a later one failing fails the migration.
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        if channel == 0 {
            channels.set_transport("mesh streams (data plane off)".into());
        }
        let s = open_channel(&self.mesh, self.target, self.id, channel).await?;
        Ok(Box::new(s))
    }
}

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

async fn source_channel(
    conn: UnixStream,
    stream: Box<dyn ChannelStream>,
    channel: u32,
    channels: &Channels,
) -> std::io::Result<()> {
    let (from_qemu, to_qemu) = conn.into_split();
    let (from_peer, to_peer) = tokio::io::split(stream);
    let back = tokio::spawn(pump(from_peer, to_qemu));
    let (bytes, hash) = pump_hashed(from_qemu, to_peer, &channels.moved).await?;
    channels.finish(ChannelDigest {
        channel,
        bytes,
        hash,
    });
    let _ = back.await;
    Ok(())
}
