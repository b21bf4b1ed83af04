//! Post-copy recovery of a tunnelled QEMU migration (see [`crate::migration::recover`]): when
//! a channel breaks during post-copy, both QEMUs pause in `postcopy-paused` (the guest runs
//! on the target and waits on the pages it lacks). The source node opens a new stream to the
//! target (`/drift/recover/1`, signed and bound to the offer as for a sandbox VM), the target's
//! QEMU listens again (`migrate-recover`), the source's QEMU resumes onto it (`migrate` with
//! `resume`), and drift carries QEMU's recovery channel on the new stream: QEMU's own
//! handshake sends the bitmap of pages the target received and the source sends the rest.
//!
//! A recovered migration's transcript covers bytes lost in the break, so its roots cannot
//! agree: the target commits once its QEMU completed (the guest has been running there since
//! the switchover) and the source learns the outcome by resolving, as after any broken link.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use tracing::{info, warn};

use super::source::QemuSource;
use super::{Channels, PUMP_BUF};
use crate::hypervisor::qemu::QMP_TIMEOUT;
use crate::hypervisor::qmp::{Qmp, QmpEvent};
use crate::migration::recover::{self, DoorBell, RECOVER_TIMEOUT};

/// How long QEMU has to connect to, or listen on, the recovery socket.
const QEMU_CONNECT: Duration = Duration::from_secs(30);

/// Carries a recovery channel while it lives; stops it when dropped.
pub(super) struct Carrying(tokio::task::JoinHandle<()>);

impl Drop for Carrying {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Copies both ways between `a` and `b` until either ends, counting the bytes that come
/// from `a` into the channels' progress.
async fn carry<A, B>(a: A, b: B, channels: Arc<Channels>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let forward = async {
        let mut buf = vec![0u8; PUMP_BUF];
        loop {
            match ar.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Flushed at once: see `pump_hashed`.
                    if bw.write_all(&buf[..n]).await.is_err() || bw.flush().await.is_err() {
                        break;
                    }
                    channels.moved.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        let _ = bw.shutdown().await;
    };
    let back = async {
        let _ = tokio::io::copy(&mut br, &mut aw).await;
        let _ = aw.shutdown().await;
    };
    tokio::join!(forward, back);
}

/// The socket of a recovery attempt in the VM's directory: no longer than the tunnel's own
/// (`hypervisor::qemu` checks that one fits a unix socket path); removed once connected.
fn socket_path(vm_dir: &Path, id: &str, attempt: u32) -> PathBuf {
    vm_dir.join(format!("r{}-{id}.sock", attempt % 10))
}

/// Source: QEMU paused its post-copy migration; opens a new stream to the target and has
/// QEMU resume onto it. Tries for [`RECOVER_TIMEOUT`].
pub(super) async fn resume_source(
    src: &QemuSource,
    attempt: &mut u32,
    channels: Arc<Channels>,
) -> Result<Carrying, String> {
    warn!(migration = %src.id.short(), "post-copy channel broke: the guest runs on the target; opening a new stream");
    let deadline = Instant::now() + RECOVER_TIMEOUT;
    let mut delay = Duration::from_millis(250);
    let stream = loop {
        *attempt += 1;
        match recover::open(&src.mesh, &src.key, src.target, src.id, src.offer, *attempt).await {
            Ok(s) => break s,
            Err(e) if Instant::now() + delay > deadline => {
                return Err(format!("no new stream within {RECOVER_TIMEOUT:?}: {e}"))
            }
            Err(e) => {
                tracing::debug!(attempt = *attempt, error = %e, "recovery attempt failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    let sock = socket_path(&src.vm_dir, &src.id.short(), *attempt);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    src.qmp
        .execute(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", sock.display()), "resume": true })),
            QMP_TIMEOUT,
        )
        .await
        .map_err(|e| format!("migrate resume: {e}"))?;
    let conn = tokio::time::timeout(QEMU_CONNECT, listener.accept()).await;
    let _ = std::fs::remove_file(&sock);
    let (conn, _) = conn
        .map_err(|_| "QEMU did not connect to resume".to_string())?
        .map_err(|e| e.to_string())?;
    info!(migration = %src.id.short(), attempt = *attempt, "post-copy goes on over a new stream");
    Ok(Carrying(tokio::spawn(carry(conn, stream, channels))))
}

/// Target: QEMU paused the post-copy migration (the guest runs here); waits for the source's
/// new stream, has QEMU listen for the recovery (`migrate-recover`, out of band: the main loop
/// may be blocked on a missing page) and connects it. `Ok(None)`: QEMU announced it went on
/// (active or completed) before a new stream came, so there is nothing to recover.
pub(super) async fn recover_target(
    qmp: &Qmp,
    events: &mut broadcast::Receiver<QmpEvent>,
    vm_dir: &Path,
    id: &str,
    bell: &mut DoorBell,
    attempt: u32,
    channels: Arc<Channels>,
) -> Result<Option<Carrying>, String> {
    warn!(
        migration = id,
        "post-copy channel broke: the guest runs here; waiting for the source to recover"
    );
    let stream = {
        let wait = bell.wait(RECOVER_TIMEOUT);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                link = &mut wait => match link {
                    Some(s) => break s,
                    None => return Err(format!("no recovery within {RECOVER_TIMEOUT:?}")),
                },
                event = events.recv() => match event {
                    Ok(e) if e.name == "MIGRATION"
                        && matches!(e.data["status"].as_str(), Some("postcopy-active" | "completed")) =>
                    {
                        return Ok(None)
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err("QEMU's monitor closed".into())
                    }
                    _ => {}
                },
            }
        }
    };
    let sock = socket_path(vm_dir, id, attempt);
    let _ = std::fs::remove_file(&sock);
    qmp.execute_oob(
        "migrate-recover",
        Some(json!({ "uri": format!("unix:{}", sock.display()) })),
        QMP_TIMEOUT,
    )
    .await
    .map_err(|e| format!("migrate-recover: {e}"))?;
    let until = Instant::now() + QEMU_CONNECT;
    let conn = loop {
        match UnixStream::connect(&sock).await {
            Ok(c) => break c,
            Err(e) if Instant::now() >= until => {
                return Err(format!("QEMU does not listen on {}: {e}", sock.display()))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let _ = std::fs::remove_file(&sock);
    info!(migration = id, "post-copy goes on over a new stream");
    Ok(Some(Carrying(tokio::spawn(carry(stream, conn, channels)))))
}
