//! The target's register of tunnelled migrations arriving here: which channels each may open,
//! and the forwarding of every accepted channel to the waiting QEMU, in index order, from a
//! mesh stream (claimed here) or a data connection (claimed by the data plane, in the same
//! claim bits).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drift_protocol::tunnel::{ChannelAnswer, ChannelDigest, ChannelOpen, MAX_CHANNELS};
use drift_protocol::{MigrationId, NodeId};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::{pump, pump_hashed, Channels};
use crate::migration::frames::{read_typed, write_typed};

/// Incoming tunnelled migrations of this node, for the channel acceptor.
#[derive(Debug, Default)]
pub struct IncomingTunnels {
    open: Mutex<BTreeMap<MigrationId, IncomingTunnel>>,
}

#[derive(Debug, Clone)]
pub(super) struct IncomingTunnel {
    pub(super) source: NodeId,
    pub(super) socket: PathBuf,
    pub(super) max: u32,
    pub(super) channels: Arc<Channels>,
    /// Channels connected to QEMU so far: channel `i` connects once this reads `i`.
    pub(super) connected: watch::Sender<u32>,
    /// Channels answered so far (bit `i` for channel `i`): each is taken once, whichever way
    /// it arrives.
    pub(super) claimed: Arc<AtomicU64>,
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

    pub(super) fn register(&self, id: MigrationId, t: IncomingTunnel) {
        self.lock().insert(id, t);
    }

    pub(super) fn remove(&self, id: &MigrationId) {
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
        forward(&tunnel, open.channel, stream).await
    }

    /// Forwards channel `channel` of migration `id`, which arrived on a data connection (the
    /// data plane checked and claimed it), to the waiting QEMU.
    pub async fn serve_bound<S>(
        &self,
        id: &MigrationId,
        channel: u32,
        stream: S,
    ) -> Result<(), ChannelRefusal>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tunnel = self
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| ChannelRefusal::Unknown(id.short()))?;
        forward(&tunnel, channel, stream).await
    }
}

/// Connects an accepted channel to QEMU in index order and forwards both ways.
async fn forward<S>(tunnel: &IncomingTunnel, channel: u32, stream: S) -> Result<(), ChannelRefusal>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // In index order: QEMU takes the first connection as its main channel.
    let mut turn = tunnel.connected.subscribe();
    tokio::time::timeout(Duration::from_secs(30), turn.wait_for(|n| *n == channel))
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
    let (bytes, hash) = pump_hashed(from_peer, to_qemu, &tunnel.channels.moved).await?;
    tunnel.channels.finish(ChannelDigest {
        channel,
        bytes,
        hash,
    });
    let _ = back.await;
    Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use drift_protocol::SecretKey;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

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
}
