//! QEMU migrations tunnelled between nodes (the protocol: [`drift_protocol::tunnel`]).
//!
//! QEMU's migration stream is plain bytes on the wire unless every host has TLS certificates;
//! libvirt's tunnelled mode encrypts but funnels everything through one stream and can do
//! neither multifd nor post-copy. drift gives every connection QEMU opens a connection of its
//! own between exactly the two peers of the accepted offer, encrypted and mutually
//! authenticated, both ways, so multifd channels stay parallel and post-copy's return path
//! works: a data connection (TLS 1.3, bound to the offer; see [`crate::dataplane`]), or, where
//! none can be made, a `/drift/tunnel/1` stream on the mesh (Noise).
//!
//! - Source ([`source`]): QEMU migrates to a private `unix:` socket in the VM's directory; each
//!   connection it opens becomes channel `i` (in the order QEMU opened them), carried on data
//!   connection `i` (or a mesh stream) to the target. The capability `pause-before-switchover` stops QEMU after it paused
//!   the guest and before it sends the last pages: the node records the switchover durably
//!   there, then lets it go on (`migrate-continue`). After `completed` the source QEMU stays
//!   paused until the target's signed commit arrives; only then is it destroyed.
//! - Target ([`target`]): QEMU waits with `-incoming defer -S` on a `unix:` socket; channels are connected to
//!   it in index order (QEMU 7 takes the first connection as the main channel). When QEMU
//!   completes, the node compares its transcript root with the one the source signed, records
//!   the commit, and only then sends `cont`. In post-copy it resumes the guest as soon as QEMU
//!   enters `postcopy-active`, after recording that the VM runs here (from then on losing the
//!   source loses the VM, as the design says).
//!
//! Any failure before the switchover leaves the guest running on the source: QEMU resumes it
//! itself when a migration fails, and the engine sends `cont` if it finds it paused.

mod incoming;
mod recover;
pub mod source;
pub mod target;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drift_protocol::migration::Mode;
use drift_protocol::transfer::convergence::Limits;
use drift_protocol::tunnel::{ChannelDigest, TunnelControl};
use drift_protocol::Hash;
use libp2p::StreamProtocol;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::engine::{EngineError, Progress};
use super::frames::read_typed;
use crate::hypervisor::qmp::{MigrationInfo, Qmp, QmpError};

pub use incoming::{ChannelRefusal, IncomingTunnels};
pub use source::{run_source_qemu, QemuSource};
pub use target::{run_target_qemu, QemuTarget};

/// A connection one channel travels on: a data connection or a mesh stream.
pub trait ChannelStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ChannelStream for T {}

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

/// Sets the capabilities (both sides) and parameters of a migration. On the source, a
/// fallback that may throttle turns on QEMU's auto-converge with drift's first step as both
/// its first step and its ceiling: QEMU throttles on its own when the guest outruns the link,
/// and drift raises the ceiling step by step as its convergence control decides.
async fn configure(qmp: &Qmp, p: &QemuParams, source: Option<&Limits>) -> Result<(), EngineError> {
    let throttle = source.filter(|l| l.fallback.allows_throttle());
    let mut caps = vec![
        ("events", true),
        ("postcopy-ram", p.mode != Mode::PreCopy),
        ("multifd", p.multifd_channels > 0),
    ];
    if source.is_some() {
        caps.push(("pause-before-switchover", true));
        caps.push(("auto-converge", throttle.is_some()));
    }
    qmp.set_capabilities(&caps).await.map_err(vmm)?;
    let mut params = serde_json::Map::new();
    if p.multifd_channels > 0 {
        params.insert("multifd-channels".into(), json!(p.multifd_channels));
    }
    if let Some(l) = throttle {
        params.insert("cpu-throttle-initial".into(), json!(l.throttle_initial_pct));
        params.insert("cpu-throttle-increment".into(), json!(l.throttle_step_pct));
        params.insert("max-cpu-throttle".into(), json!(l.throttle_initial_pct));
    }
    if source.is_some() {
        params.insert(
            "downtime-limit".into(),
            json!(p.downtime_limit.as_millis().max(1) as u64),
        );
        params.insert(
            "max-bandwidth".into(),
            json!(p.bandwidth_cap.unwrap_or(UNCAPPED_BYTES_PER_S)),
        );
        // Post-copy's background push has a cap of its own (0: none).
        params.insert(
            "max-postcopy-bandwidth".into(),
            json!(p.bandwidth_cap.unwrap_or(0)),
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
async fn pump_hashed<R, W>(
    mut from: R,
    mut to: W,
    moved: &std::sync::atomic::AtomicU64,
) -> std::io::Result<(u64, Hash)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use futures::FutureExt;
    let mut buf = vec![0u8; PUMP_BUF];
    let mut hasher = blake3::Hasher::new();
    let mut bytes = 0u64;
    let mut ended = false;
    while !ended {
        let mut filled = from.read(&mut buf).await?;
        if filled == 0 {
            break;
        }
        // A TLS connection hands out one 16 KiB record a read: take every one that is already
        // here, so hashing and the write to QEMU run on large pieces.
        while filled < buf.len() {
            match from.read(&mut buf[filled..]).now_or_never() {
                Some(Ok(0)) => {
                    ended = true;
                    break;
                }
                Some(Ok(n)) => filled += n,
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        hasher.update(&buf[..filled]);
        to.write_all(&buf[..filled]).await?;
        // Flushed before waiting for more: a TLS stream takes the bytes and may keep their
        // records when the socket is full, to send with the next write. QEMU waits for an
        // answer after its last bytes (post-copy's end, for one): kept back, they would
        // never leave, and both QEMUs would wait for ever.
        to.flush().await?;
        bytes += filled as u64;
        moved.fetch_add(filled as u64, std::sync::atomic::Ordering::Relaxed);
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
    /// What carries the channels, for the progress.
    transport: String,
    /// Channels opened so far.
    opened: u32,
    /// Source-to-target directions that ended, with what went through them.
    digests: Vec<ChannelDigest>,
}

/// Shared between a migration's engine and its channel tasks.
#[derive(Debug)]
struct Channels {
    transcript: Mutex<Transcript>,
    /// Bytes forwarded from the source to the target so far, on every channel: the
    /// target's measure of progress.
    moved: std::sync::atomic::AtomicU64,
    /// Bumped on every change of the transcript.
    changed: watch::Sender<u64>,
}

impl Channels {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            transcript: Mutex::new(Transcript::default()),
            moved: std::sync::atomic::AtomicU64::new(0),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Transcript> {
        self.transcript.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_transport(&self, transport: String) {
        self.lock().transport = transport;
    }

    fn transport(&self) -> String {
        self.lock().transport.clone()
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

fn progress_of(info: &MigrationInfo, started: Instant, phase: &str, transport: &str) -> Progress {
    Progress {
        phase: phase.to_string(),
        transport: transport.to_string(),
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
        dirty_rate_bytes_per_s: info.dirty_pages_rate as f64 * 4096.0,
        throttle_pct: info.cpu_throttle_pct.min(99) as u8,
        ..Progress::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
        let moved = std::sync::atomic::AtomicU64::new(0);
        let (bytes, hash) = pump_hashed(b, c, &moved).await.unwrap();
        assert_eq!(moved.into_inner(), bytes);
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
