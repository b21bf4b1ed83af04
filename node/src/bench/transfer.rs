//! `drift bench transfer --bytes N`: the cost of drift's encrypted transport.
//!
//! The same `N` bytes go, in writes of one full page batch (1 MiB, as the migration engine
//! writes them), over:
//!
//! 1. plain TCP on 127.0.0.1 (the baseline: no encryption, no multiplexing);
//! 2. a drift stream between two in-process nodes over TCP + Noise + Yamux, opened with
//!    `mesh.streams()` on a protocol only the benchmark accepts (`/drift/bench/1`), exactly as
//!    a migration stream is;
//! 3. the same over QUIC, between two nodes that listen only on QUIC.
//!
//! The receiver counts the bytes and hashes them (blake3, chained over 1 MiB pieces) as they
//! arrive; a leg counts only if both the count and the digest match what was sent. The clock
//! runs from the first write to the last byte received. The receiver's hashing is part of every
//! leg alike; its own speed is reported next to the figures.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use drift_protocol::transfer::{MAX_PAGES_PER_BATCH, PAGE_SIZE};
use drift_protocol::Hash;
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, StreamProtocol};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::{start_pair, two_node_configs, wait_alive, Pair, TempDir};
use crate::daemon;
use crate::hypervisor::guest::SplitMix;
use crate::mesh::peer_id;

/// The benchmark's stream protocol; drift nodes outside a benchmark do not accept it.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/bench/1");
/// Bytes per write: one full batch of pages.
pub const CHUNK: usize = MAX_PAGES_PER_BATCH * PAGE_SIZE;
/// What the encrypted stream should reach, as a fraction of plain TCP.
pub const TARGET_RATIO: f64 = 0.8;
/// At most this many bytes per leg.
pub const MAX_BYTES: u64 = 64 << 30;
/// Any one leg gives up after this long.
const LEG_TIMEOUT: Duration = Duration::from_secs(900);
/// Starting and connecting a pair of nodes.
const PAIR_TIMEOUT: Duration = Duration::from_secs(60);

/// One transport's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    pub transport: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// blake3 chained over 1 MiB pieces of what was sent, and of what arrived.
    pub digest_sent: Hash,
    pub digest_received: Hash,
    /// The receiver got exactly the bytes sent.
    pub intact: bool,
    /// From the first write to the last byte received.
    pub seconds: f64,
    pub bytes_per_s: f64,
    pub mib_per_s: f64,
}

/// Figures of one transfer run.
#[derive(Debug, Clone, Serialize)]
pub struct TransferFigures {
    pub bytes: u64,
    pub write_bytes: usize,
    /// The receiver's hashing alone, on one core (part of every leg).
    pub hash_mib_per_s: f64,
    pub tcp: Leg,
    /// TCP + Noise + Yamux between two drift nodes.
    pub stream: Leg,
    /// stream / plain TCP.
    pub stream_ratio: f64,
    /// QUIC between two drift nodes, if it ran.
    pub quic: Option<Leg>,
    pub quic_ratio: Option<f64>,
    /// Why QUIC did not run, if it did not.
    pub quic_error: Option<String>,
    pub target_ratio: f64,
}

/// The bytes a leg sends: chunk `i` is a fixed pseudo-random block whose first 8 bytes are
/// mixed with `i`, so no two chunks are alike and a reordering shows in the digest.
#[derive(Debug)]
pub(crate) struct Payload {
    block: Vec<u8>,
    head: u64,
    bytes: u64,
}

impl Payload {
    pub(crate) fn new(bytes: u64) -> Self {
        let mut rng = SplitMix(0x0d21_f7b3_9c4e_a5d1);
        let mut block = vec![0u8; CHUNK];
        for w in block.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let head = u64::from_le_bytes(block[..8].try_into().unwrap_or_default());
        Self { block, head, bytes }
    }

    fn chunks(&self) -> u64 {
        self.bytes.div_ceil(CHUNK as u64)
    }

    /// Writes chunk `i` into `buf` (a copy of the block); returns its length.
    fn fill(&self, i: u64, buf: &mut [u8]) -> usize {
        buf[..8].copy_from_slice(&(self.head ^ i).to_le_bytes());
        let left = self.bytes - i * CHUNK as u64;
        (left.min(CHUNK as u64)) as usize
    }

    /// The digest the receiver must arrive at.
    pub(crate) fn digest(&self) -> Hash {
        let mut buf = self.block.clone();
        let mut d = Digest::default();
        for i in 0..self.chunks() {
            let len = self.fill(i, &mut buf);
            d.push(&buf[..len]);
        }
        d.0
    }
}

/// blake3 chained over pieces: `d' = H(d ‖ H(piece))`.
#[derive(Debug, Default)]
struct Digest(Hash);

impl Digest {
    fn push(&mut self, piece: &[u8]) {
        let mut both = [0u8; 64];
        both[..32].copy_from_slice(&self.0 .0);
        both[32..].copy_from_slice(&Hash::of(piece).0);
        self.0 = Hash::of(&both);
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, p: &Payload) -> std::io::Result<u64> {
    let mut buf = p.block.clone();
    let mut sent = 0u64;
    for i in 0..p.chunks() {
        let len = p.fill(i, &mut buf);
        w.write_all(&buf[..len]).await?;
        sent += len as u64;
    }
    w.flush().await?;
    w.shutdown().await?;
    Ok(sent)
}

#[derive(Debug)]
struct Received {
    bytes: u64,
    digest: Hash,
    /// When the last expected byte arrived.
    done_at: Instant,
}

/// Reads to the end of the stream, counting and hashing; refuses more than `expect` bytes.
async fn receive<R: AsyncRead + Unpin>(mut r: R, expect: u64) -> anyhow::Result<Received> {
    let mut buf = vec![0u8; CHUNK];
    let mut filled = 0usize;
    let mut total = 0u64;
    let mut digest = Digest::default();
    let mut done_at = None;
    loop {
        let n = r.read(&mut buf[filled..]).await.context("receiving")?;
        if n == 0 {
            break;
        }
        filled += n;
        total += n as u64;
        if total > expect {
            bail!("received more than the {expect} bytes sent");
        }
        if filled == CHUNK {
            digest.push(&buf);
            filled = 0;
        }
        if total == expect {
            done_at = Some(Instant::now());
        }
    }
    if filled > 0 {
        digest.push(&buf[..filled]);
    }
    Ok(Received {
        bytes: total,
        digest: digest.0,
        done_at: done_at.unwrap_or_else(Instant::now),
    })
}

/// Sends the payload on `writer` while a task receives it; `receiver` resolves to what arrived.
async fn measure<W: AsyncWrite + Unpin>(
    transport: &str,
    payload: &Payload,
    expected: Hash,
    mut writer: W,
    receiver: tokio::task::JoinHandle<anyhow::Result<Received>>,
    start: Instant,
) -> anyhow::Result<Leg> {
    let sent = tokio::time::timeout(LEG_TIMEOUT, send(&mut writer, payload))
        .await
        .map_err(|_| anyhow!("{transport}: sending took longer than {LEG_TIMEOUT:?}"))?
        .with_context(|| format!("{transport}: sending"))?;
    let got = tokio::time::timeout(LEG_TIMEOUT, receiver)
        .await
        .map_err(|_| anyhow!("{transport}: receiving took longer than {LEG_TIMEOUT:?}"))?
        .with_context(|| format!("{transport}: the receiver failed"))??;
    let seconds = got.done_at.duration_since(start).as_secs_f64().max(1e-9);
    let rate = got.bytes as f64 / seconds;
    Ok(Leg {
        transport: transport.to_string(),
        bytes_sent: sent,
        bytes_received: got.bytes,
        digest_sent: expected,
        digest_received: got.digest,
        intact: got.bytes == sent && got.digest == expected,
        seconds,
        bytes_per_s: rate,
        mib_per_s: rate / (1024.0 * 1024.0),
    })
}

/// The payload over plain TCP on loopback.
pub(crate) async fn tcp_leg(payload: &Payload, expected: Hash) -> anyhow::Result<Leg> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let client = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (server, _) = listener.accept().await.context("accepting")?;
    // As the mesh's TCP transport.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let total = payload.bytes;
    let receiver = tokio::spawn(receive(server, total));
    measure("tcp", payload, expected, client, receiver, Instant::now()).await
}

/// The payload over a drift stream from `pair.a` to `pair.b`. Accepts [`PROTOCOL`] on `b`,
/// which can be done once per node.
pub(crate) async fn stream_leg(
    pair: &Pair,
    transport: &str,
    payload: &Payload,
    expected: Hash,
) -> anyhow::Result<Leg> {
    let mut incoming = pair
        .b
        .mesh
        .streams()
        .accept(PROTOCOL)
        .map_err(|e| anyhow!("accepting {PROTOCOL}: {e}"))?;
    let total = payload.bytes;
    let receiver = tokio::spawn(async move {
        let (_, stream) = incoming
            .next()
            .await
            .ok_or_else(|| anyhow!("the mesh stopped before the stream arrived"))?;
        receive(stream.compat(), total).await
    });
    let target = peer_id(&pair.b.state.me);
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        pair.a.mesh.streams().open_stream(target, PROTOCOL),
    )
    .await
    .map_err(|_| anyhow!("{transport}: opening the stream timed out"))?
    .map_err(|e| anyhow!("{transport}: {e}"))?;
    measure(
        transport,
        payload,
        expected,
        stream.compat(),
        receiver,
        Instant::now(),
    )
    .await
}

/// Starts two nodes that listen only on QUIC, `b` dialing `a`.
async fn start_quic_pair(dir: &std::path::Path) -> anyhow::Result<Pair> {
    let [mut ca, mut cb] = two_node_configs(dir, Duration::from_millis(500))?;
    let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse()?;
    ca.node.listen = vec![quic.clone()];
    ca.node.bootstrap = Vec::new();
    let a = daemon::start(ca).await.context("starting node-1 on QUIC")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        let addrs = a.mesh.listen_addrs().await.unwrap_or_default();
        if let Some(addr) = addrs
            .into_iter()
            .find(|m| m.iter().any(|p| matches!(p, Protocol::QuicV1)))
        {
            break addr;
        }
        if Instant::now() > deadline {
            a.shutdown().await;
            bail!("node-1 reported no QUIC listen address");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cb.node.listen = vec![quic];
    cb.node.bootstrap = vec![addr.with(Protocol::P2p(peer_id(&a.state.me)))];
    let b = match daemon::start(cb).await {
        Ok(b) => b,
        Err(e) => {
            a.shutdown().await;
            return Err(anyhow::Error::new(e).context("starting node-2 on QUIC"));
        }
    };
    let pair = Pair { a, b };
    if let Err(e) = wait_alive(&pair, PAIR_TIMEOUT).await {
        pair.shutdown().await;
        return Err(e);
    }
    Ok(pair)
}

fn check_bytes(bytes: u64) -> anyhow::Result<()> {
    if bytes == 0 || bytes > MAX_BYTES {
        bail!("--bytes must be 1 to {} (64 GiB)", MAX_BYTES);
    }
    Ok(())
}

/// Runs the transfer benchmark: plain TCP, then a drift stream over TCP, then (if `quic`) over
/// QUIC.
pub async fn transfer(bytes: u64, quic: bool) -> anyhow::Result<TransferFigures> {
    check_bytes(bytes)?;
    let payload = Payload::new(bytes);
    let hashed = Instant::now();
    let expected = payload.digest();
    let hash_mib_per_s = bytes as f64 / hashed.elapsed().as_secs_f64().max(1e-9) / 1048576.0;

    let tcp = tcp_leg(&payload, expected).await?;

    let dir = TempDir::new("transfer")?;
    let configs = two_node_configs(dir.path(), Duration::from_millis(500))?;
    let pair = start_pair(configs, PAIR_TIMEOUT).await?;
    let stream = stream_leg(&pair, "libp2p tcp+noise+yamux", &payload, expected).await;
    pair.shutdown().await;
    let stream = stream?;

    let (quic, quic_error) = if quic {
        match start_quic_pair(dir.path()).await {
            Ok(pair) => {
                let leg = stream_leg(&pair, "libp2p quic", &payload, expected).await;
                pair.shutdown().await;
                match leg {
                    Ok(leg) => (Some(leg), None),
                    Err(e) => (None, Some(format!("{e:#}"))),
                }
            }
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    } else {
        (None, Some("not requested".into()))
    };
    let ratio = |leg: &Leg| leg.bytes_per_s / tcp.bytes_per_s.max(1e-9);
    Ok(TransferFigures {
        bytes,
        write_bytes: CHUNK,
        hash_mib_per_s,
        stream_ratio: ratio(&stream),
        quic_ratio: quic.as_ref().map(ratio),
        tcp,
        stream,
        quic,
        quic_error,
        target_ratio: TARGET_RATIO,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_byte_is_counted_and_hashed_across_uneven_reads() {
        // Not a multiple of the chunk, so the last piece is short.
        let payload = Payload::new(3 * CHUNK as u64 + 12_345);
        let expected = payload.digest();
        let (a, b) = tokio::io::duplex(7_777);
        let receiver = tokio::spawn(receive(b, payload.bytes));
        let leg = measure("duplex", &payload, expected, a, receiver, Instant::now())
            .await
            .unwrap();
        assert!(leg.intact, "{leg:?}");
        assert_eq!(leg.bytes_received, payload.bytes);
        assert_eq!(leg.bytes_sent, payload.bytes);
    }

    #[tokio::test]
    async fn a_changed_byte_changes_the_digest() {
        let payload = Payload::new(2 * CHUNK as u64);
        let expected = payload.digest();
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let receiver = tokio::spawn(receive(b, payload.bytes));
        let mut buf = payload.block.clone();
        for i in 0..payload.chunks() {
            let len = payload.fill(i, &mut buf);
            if i == 1 {
                buf[100] ^= 1;
            }
            a.write_all(&buf[..len]).await.unwrap();
        }
        drop(a);
        let got = receiver.await.unwrap().unwrap();
        assert_eq!(got.bytes, payload.bytes);
        assert_ne!(got.digest, expected);
    }

    #[tokio::test]
    async fn more_bytes_than_announced_are_refused() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let receiver = tokio::spawn(receive(b, 10));
        a.write_all(&[0u8; 11]).await.unwrap();
        drop(a);
        let e = receiver.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        assert!(check_bytes(0).is_err());
        assert!(check_bytes(MAX_BYTES + 1).is_err());
        assert!(check_bytes(1).is_ok());
    }
}
