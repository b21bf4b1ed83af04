//! The target side of a tunnelled QEMU migration: QEMU waits with `-incoming defer`, the
//! node connects each accepted channel to it, compares transcript roots, records the commit
//! and only then lets the guest run.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use drift_protocol::migration::Mode;
use drift_protocol::transfer::deadline::{ProgressGuard, ProgressLimits};
use drift_protocol::transfer::{Abort, AbortReason, Commit};
use drift_protocol::tunnel::{transcript_root, TunnelControl};
use drift_protocol::{Hash, MigrationId, NodeId, SecretKey, Signed};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use super::incoming::IncomingTunnel;
use super::{
    configure, spawn_control_reader, vmm, Channels, IncomingTunnels, QemuParams, COMPLETION_POLL,
    DRAIN, POLL,
};
use crate::dataplane::Expectation;
use crate::hypervisor::qemu::QMP_TIMEOUT;
use crate::hypervisor::qmp::{Qmp, QmpError};
use crate::migration::engine::{EngineError, Hooks, Point, TargetOutcome};
use crate::migration::frames::write_typed;
use crate::migration::recover::DoorBell;

/// How long a target whose control stream broke before post-copy waits for QEMU to say
/// whether it got to post-copy (a channel that broke in pre-copy fails QEMU's migration).
const CONTROL_LOST_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

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
    /// The data connections the decision announced (channels may also come as mesh streams).
    pub data: Option<Expectation>,
    /// Which channels were taken, whichever way they came.
    pub claims: Arc<AtomicU64>,
    /// What the source is held to until the guest runs here.
    pub progress: ProgressLimits,
    pub memory_bytes: u64,
    /// Post-copy: where a recovered stream arrives when a channel breaks.
    pub door: Option<DoorBell>,
}

/// Runs the target side on the accepted offer's `control` stream. The hook at
/// [`Point::Verified`] must make the commit durable; the guest resumes only after it
/// succeeded (post-copy: after [`Point::ResumingPostCopy`] succeeded).
pub async fn run_target_qemu<S, H>(
    mut t: QemuTarget,
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
            claimed: t.claims.clone(),
        },
    );
    // Channels bound on data connections go to QEMU like those that come as mesh streams.
    let bound = t.data.take().map(|mut expectation| {
        let (tunnels, id) = (t.tunnels.clone(), t.id);
        tokio::spawn(async move {
            let mut forwards = tokio::task::JoinSet::new();
            while let Some((channel, stream)) = expectation.bound.recv().await {
                let tunnels = tunnels.clone();
                forwards.spawn(async move {
                    if let Err(e) = tunnels.serve_bound(&id, channel, stream).await {
                        warn!(migration = %id.short(), channel, error = %e, "tunnel channel failed");
                    }
                });
            }
            while forwards.join_next().await.is_some() {}
        })
    });
    let outcome = drive_target(&mut t, hooks, rd, &mut wr, &channels, &sock).await;
    t.tunnels.remove(&t.id);
    if let Some(task) = bound {
        task.abort();
    }
    let ended = match &outcome {
        Ok(TargetOutcome::Aborted { reason } | TargetOutcome::Incomplete { reason }) => {
            Some((AbortReason::LocalError, reason))
        }
        Ok(TargetOutcome::Faulted { reason, code }) => Some((code.clone(), reason)),
        _ => None,
    };
    if let Some((code, reason)) = ended {
        let _ = write_typed(
            &mut wr,
            &TunnelControl::Abort(Abort {
                id: t.id,
                reason: code,
            }),
        )
        .await;
        info!(migration = %t.id.short(), %reason, "tunnelled migration ended here");
    }
    outcome
}

async fn drive_target<R, W, H>(
    t: &mut QemuTarget,
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
    if let Err(e) = configure(qmp, &t.params, None).await {
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
    let mut guard = ProgressGuard::new(t.progress, t.memory_bytes, 0);
    // Post-copy recovery: the control stream may be gone with the channels; the attempts so
    // far and the channel that carries the migration on.
    let mut control_lost: Option<Instant> = None;
    let mut attempt = 0u32;
    let mut recovered: Option<super::recover::Carrying> = None;
    // QEMU's last MIGRATION event, and whether its main loop stopped answering.
    let mut event_status: Option<String> = None;
    let mut blocked = false;
    // Post-copy: whether QEMU resumed the guest (its `RESUME` event: the device state is
    // loaded and a broken channel now pauses QEMU), and whether the source was told.
    let mut resumed = false;
    let mut told_running = false;
    let complete = loop {
        let ended = |running: bool, reason: String| {
            if running {
                Ok(TargetOutcome::Incomplete { reason })
            } else {
                Ok(TargetOutcome::Aborted { reason })
            }
        };
        tokio::select! {
            frame = inbox.recv(), if control_lost.is_none() => match frame {
                Some(TunnelControl::Complete(c)) => break Some(c),
                Some(TunnelControl::Abort(a)) => return ended(running, format!("the source aborted: {:?}", a.reason)),
                Some(other) => return ended(running, format!("unexpected control frame {other:?}")),
                // A migration that may be in post-copy: QEMU's own state says whether the guest
                // is the target's now (and the source recovers the link) or not.
                None if t.door.is_some() => control_lost = Some(Instant::now()),
                None => return ended(running, "the source went away".into()),
            },
            event = events.recv() => {
                if blocked && matches!(event, Err(broadcast::error::RecvError::Closed)) {
                    return ended(running, "QEMU's monitor closed".into());
                }
                if matches!(&event, Ok(e) if e.name == "RESUME") {
                    resumed = true;
                }
                if let Some(status) = migration_status(event) {
                    // A state change: the main loop may answer again.
                    blocked = false;
                    event_status = Some(status);
                }
            }
            _ = tokio::time::sleep(POLL) => {}
        }
        // A post-copy target whose guest waits on a page that cannot come blocks QEMU's main
        // loop, and with it every in-band command: its state then comes from its events until
        // the next one, and the recovery goes out of band.
        let info = if blocked {
            None
        } else {
            match qmp.query_migrate().await {
                Ok(i) => Some(i),
                Err(QmpError::Timeout { .. }) if running && t.door.is_some() => {
                    blocked = true;
                    None
                }
                Err(e) => return ended(running, format!("QEMU: {e}")),
            }
        };
        let status = match &info {
            Some(i) => i.status.clone(),
            None => event_status.clone(),
        };
        let error_desc = info.and_then(|i| i.error_desc);
        match status.as_deref() {
            // QEMU took the switchover (it pauses in post-copy when a channel broke right
            // after): the source can no longer run the guest, so it runs here; durable first.
            Some("postcopy-active" | "postcopy-paused")
                if !running && t.params.mode != Mode::PreCopy =>
            {
                hooks.at(Point::ResumingPostCopy).await?;
                qmp.cont().await.map_err(vmm)?;
                running = true;
                continue;
            }
            Some("failed") => {
                return ended(
                    running,
                    error_desc.unwrap_or_else(|| "QEMU's incoming migration failed".into()),
                )
            }
            Some("postcopy-paused") if running => {
                let Some(bell) = t.door.as_mut() else {
                    return ended(running, "post-copy paused: a channel broke".into());
                };
                attempt += 1;
                let id = t.id.short();
                match super::recover::recover_target(
                    qmp,
                    &mut events,
                    &t.vm_dir,
                    &id,
                    bell,
                    attempt,
                    channels.clone(),
                )
                .await
                {
                    Ok(Some(carrying)) => recovered = Some(carrying),
                    // QEMU went on by itself: nothing to recover.
                    Ok(None) => {}
                    Err(e) => {
                        return ended(running, format!("post-copy paused: a channel broke; {e}"))
                    }
                }
                event_status = None;
                blocked = false;
                // Progress is measured afresh from the recovery on.
                let now = started.elapsed().as_millis() as u64;
                guard = ProgressGuard::new(t.progress, t.memory_bytes, now);
            }
            // Recovered, or the control stream is gone: the guest has run here since the
            // switchover, and now every page arrived.
            Some("completed") if recovered.is_some() || control_lost.is_some() => break None,
            // The control stream is gone and QEMU never got to post-copy: nothing runs here.
            _ if !running && control_lost.is_some_and(|at| at.elapsed() > CONTROL_LOST_GRACE) => {
                return ended(running, "the source went away".into())
            }
            _ => {}
        }
        if running {
            guard.vm_runs_here();
            if resumed && !told_running && control_lost.is_none() {
                told_running = true;
                // Best effort: a control stream that broke shows in the next read.
                let _ = write_typed(wr, &TunnelControl::Running).await;
            }
        }
        let now = started.elapsed().as_millis() as u64;
        guard.on_total(
            now,
            channels.moved.load(std::sync::atomic::Ordering::Relaxed),
        );
        if let Err(stall) = guard.check(now) {
            if running {
                return Ok(TargetOutcome::Incomplete {
                    reason: format!("post-copy {stall}"),
                });
            }
            return Ok(TargetOutcome::Faulted {
                reason: stall.to_string(),
                code: AbortReason::Stalled,
            });
        }
    };
    let Some(complete) = complete else {
        return commit_recovered(t, hooks, wr, channels, attempt).await;
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

/// The state a `MIGRATION` event announces.
fn migration_status(
    event: Result<crate::hypervisor::qmp::QmpEvent, broadcast::error::RecvError>,
) -> Option<String> {
    let event = event.ok()?;
    (event.name == "MIGRATION")
        .then(|| event.data["status"].as_str().map(str::to_string))
        .flatten()
}

/// A post-copy migration that went on over a recovered stream (or lost its control stream)
/// and whose QEMU completed: the guest has run here since the switchover and now holds every
/// page. The commit is recorded with the transcript of what arrived; the source, which cannot
/// agree on a transcript cut by the break, learns the outcome by resolving.
async fn commit_recovered<W, H>(
    t: &QemuTarget,
    hooks: &H,
    wr: &mut W,
    channels: &Arc<Channels>,
    attempts: u32,
) -> Result<TargetOutcome, EngineError>
where
    W: AsyncWrite + Unpin,
    H: Hooks,
{
    let digests = channels.drained(DRAIN).await.unwrap_or_default();
    let root = transcript_root(&digests);
    hooks.at(Point::Verified(root)).await?;
    info!(migration = %t.id.short(), attempts, "post-copy completed over a recovered stream");
    let commit = Commit {
        id: t.id,
        root,
        committed_at: crate::clock::now(),
    };
    // Best effort: the control stream may be gone.
    if write_typed(wr, &TunnelControl::Commit(Signed::sign(&commit, &t.key)))
        .await
        .is_ok()
    {
        hooks.at(Point::CommitSent).await?;
    }
    Ok(TargetOutcome::Committed { root })
}
