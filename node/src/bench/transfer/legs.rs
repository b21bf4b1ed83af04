//! The legs' shared machinery and the byte-stream legs of `drift bench transfer`.
//!
//! [`Payload`] is the bytes every leg sends; [`run_leg`] runs a leg's sender on side `A` and
//! its receiver on side `B`, starts the clock and the CPU counts once both ends are connected,
//! and turns what each end reports into a [`Leg`]. The byte-stream legs (plain TCP, rustls, a
//! drift stream) write the payload with [`send`] and read, count and hash it with [`receive`];
//! the data-plane legs ([`super::data`]) bring their own sender and receiver.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use drift_protocol::{Hash, NodeId, SecretKey};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::{Leg, CHUNK, GIB, LEG_TIMEOUT, PROTOCOL, SETUP_TIMEOUT};
use crate::bench::{Ends, Pair, Side};
use crate::dataplane::tls;
use crate::hypervisor::guest::SplitMix;
use crate::mesh::peer_id;

/// The bytes a leg sends: chunk `i` is a fixed pseudo-random block whose first 8 bytes are
/// mixed with `i`, so no two chunks are alike and a reordering shows in the digest.
#[derive(Debug, Clone)]
pub(crate) struct Payload {
    pub(super) block: Vec<u8>,
    pub(super) head: u64,
    pub(super) bytes: u64,
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
    pub(super) fn fill(&self, i: u64, buf: &mut [u8]) -> usize {
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
pub(super) struct Digest(pub(super) Hash);

impl Digest {
    pub(super) fn push(&mut self, piece: &[u8]) {
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

/// What a sender did.
#[derive(Debug)]
pub(super) struct Sent {
    pub(super) bytes: u64,
    /// The TLS version and suite, for a TLS leg.
    pub(super) cipher: Option<String>,
}

#[derive(Debug)]
pub(super) struct Received {
    pub(super) bytes: u64,
    pub(super) digest: Hash,
    /// When the last expected byte arrived.
    pub(super) done_at: Instant,
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

/// Holds one end of a leg once it is connected, until both are and the clock starts.
#[derive(Debug)]
pub(super) struct Gate {
    ready: oneshot::Sender<()>,
    go: oneshot::Receiver<()>,
}

impl Gate {
    /// Says this end is connected and waits for the start.
    pub(super) async fn pass(self) -> Result<(), CalledOff> {
        let _ = self.ready.send(());
        self.go.await.map_err(|_| CalledOff)
    }
}

/// The other end of a leg failed before the start.
#[derive(Debug, thiserror::Error)]
#[error("the leg was called off")]
pub(super) struct CalledOff;

/// The leg's side of a [`Gate`].
#[derive(Debug)]
struct Start {
    ready: oneshot::Receiver<()>,
    go: oneshot::Sender<()>,
}

fn gate() -> (Gate, Start) {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel();
    (
        Gate {
            ready: ready_tx,
            go: go_rx,
        },
        Start {
            ready: ready_rx,
            go: go_tx,
        },
    )
}

/// Runs one leg: `sender` on side `A` and `receiver` on side `B`, each given a [`Gate`] to
/// pass once connected. The clock and the CPU counts start when both have passed it.
pub(super) async fn run_leg<SF, RF>(
    ends: &Ends,
    transport: &str,
    expected: Hash,
    sender: impl FnOnce(Gate) -> SF,
    receiver: impl FnOnce(Gate) -> RF,
) -> anyhow::Result<Leg>
where
    SF: std::future::Future<Output = anyhow::Result<Sent>> + Send + 'static,
    RF: std::future::Future<Output = anyhow::Result<Received>> + Send + 'static,
{
    let (gate_s, start_s) = gate();
    let (gate_r, start_r) = gate();
    let mut recv = ends.spawn(Side::B, receiver(gate_r));
    let mut send = ends.spawn(Side::A, sender(gate_s));
    let connected = tokio::time::timeout(
        SETUP_TIMEOUT,
        futures::future::try_join(start_s.ready, start_r.ready),
    )
    .await;
    if !matches!(connected, Ok(Ok(_))) {
        // An end failed before it was connected (its error says why), or hung: call the leg
        // off, give each end a moment to end with its error, then abort what is left.
        drop((start_s.go, start_r.go));
        let settle = Duration::from_secs(2);
        let s = tokio::time::timeout(settle, &mut send).await;
        let r = tokio::time::timeout(settle, &mut recv).await;
        let own = |e: &anyhow::Error| !e.is::<CalledOff>();
        let why = match (s, r) {
            (Ok(Ok(Err(e))), _) if own(&e) => e.context("sender"),
            (_, Ok(Ok(Err(e)))) if own(&e) => e.context("receiver"),
            _ => anyhow!("the ends were not connected within {SETUP_TIMEOUT:?}"),
        };
        return Err(why.context(format!("{transport}: connecting")));
    }
    let cpu_before = ends.cpu_ns();
    let start = Instant::now();
    let _ = start_s.go.send(());
    let _ = start_r.go.send(());
    let (s, r) = tokio::join!(
        tokio::time::timeout(LEG_TIMEOUT, &mut send),
        tokio::time::timeout(LEG_TIMEOUT, &mut recv)
    );
    // Either end failing usually fails the other too (its connection is gone): both say why.
    let (sent, got) = match (ended("sending", s), ended("receiving", r)) {
        (Ok(sent), Ok(got)) => (sent, got),
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => return Err(e.context(transport.to_string())),
        (Err(s), Err(r)) => bail!("{transport}: {s:#}; {r:#}"),
    };
    let cpu_after = ends.cpu_ns();
    let seconds = got.done_at.duration_since(start).as_secs_f64().max(1e-9);
    let rate = got.bytes as f64 / seconds;
    let gib = sent.bytes.max(1) as f64 / GIB;
    let cpu = |side: usize| {
        cpu_before
            .zip(cpu_after)
            .map(|(b, a)| a[side].saturating_sub(b[side]) as f64 / 1e9 / gib)
    };
    Ok(Leg {
        transport: transport.to_string(),
        cipher: sent.cipher,
        bytes_sent: sent.bytes,
        bytes_received: got.bytes,
        digest_sent: expected,
        digest_received: got.digest,
        intact: got.bytes == sent.bytes && got.digest == expected,
        seconds,
        bytes_per_s: rate,
        mib_per_s: rate / (1024.0 * 1024.0),
        cpu_send_s_per_gib: cpu(0),
        cpu_recv_s_per_gib: cpu(1),
    })
}

/// What one end of a leg came to.
fn ended<T>(
    what: &str,
    outcome: Result<Result<anyhow::Result<T>, tokio::task::JoinError>, tokio::time::error::Elapsed>,
) -> anyhow::Result<T> {
    match outcome {
        Ok(Ok(r)) => r.context(what.to_string()),
        Ok(Err(e)) => Err(anyhow!("{what}: the task failed: {e}")),
        Err(_) => Err(anyhow!("{what} took longer than {LEG_TIMEOUT:?}")),
    }
}

/// A bound loopback listener, to be registered with the receiving side's runtime.
fn loopback_listener() -> anyhow::Result<(std::net::TcpListener, std::net::SocketAddr)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Accepts one connection, without Nagle (as every drift transport).
async fn accept_one(listener: std::net::TcpListener) -> anyhow::Result<tokio::net::TcpStream> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let (tcp, _) = listener.accept().await.context("accepting")?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn connect_to(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The payload over plain TCP on loopback.
pub(super) async fn tcp_leg(
    ends: &Ends,
    payload: &Arc<Payload>,
    expected: Hash,
) -> anyhow::Result<Leg> {
    let (listener, addr) = loopback_listener()?;
    let total = payload.bytes;
    let payload = payload.clone();
    run_leg(
        ends,
        "tcp",
        expected,
        move |gate| async move {
            let mut tcp = connect_to(addr).await?;
            gate.pass().await?;
            let bytes = send(&mut tcp, &payload).await?;
            Ok(Sent {
                bytes,
                cipher: None,
            })
        },
        move |gate| async move {
            let tcp = accept_one(listener).await?;
            gate.pass().await?;
            receive(tcp, total).await
        },
    )
    .await
}

/// `TLS1.3 AES_256_GCM_SHA384`, say.
fn cipher_of(conn: &rustls::CommonState) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS1.3".to_string(),
        Some(v) => format!("{v:?}"),
        None => "TLS?".into(),
    };
    let suite = conn.negotiated_cipher_suite().map_or("?".to_string(), |s| {
        format!("{:?}", s.suite())
            .trim_start_matches("TLS13_")
            .to_string()
    });
    format!("{version} {suite}")
}

/// The payload over rustls on one TCP connection: TLS 1.3 with drift's raw-key configs (the
/// sender holds `keys[0]`, the receiver `keys[1]`, each pinning the other), written in 1 MiB
/// writes that rustls cuts into 16 KiB records, ended with a close_notify.
pub(super) async fn rustls_leg(
    ends: &Ends,
    keys: &[SecretKey; 2],
    payload: &Arc<Payload>,
    expected: Hash,
) -> anyhow::Result<Leg> {
    let (a, b) = (keys[0].public(), keys[1].public());
    let client = tls::client_config(&keys[0], b)?;
    let server = tls::server_config(&keys[1], Arc::new(move |id: &NodeId| *id == a))?;
    let (listener, addr) = loopback_listener()?;
    let total = payload.bytes;
    let payload = payload.clone();
    run_leg(
        ends,
        "rustls",
        expected,
        move |gate| async move {
            let tcp = connect_to(addr).await?;
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(tls::server_name(), tcp)
                .await
                .context("TLS handshake")?;
            let cipher = cipher_of(tls.get_ref().1);
            gate.pass().await?;
            let bytes = send(&mut tls, &payload).await?;
            Ok(Sent {
                bytes,
                cipher: Some(cipher),
            })
        },
        move |gate| async move {
            let tcp = accept_one(listener).await?;
            let tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .context("TLS handshake")?;
            gate.pass().await?;
            receive(tls, total).await
        },
    )
    .await
}

/// The payload over a drift stream from `pair.a` to `pair.b`, each on its side of
/// `pair.ends`. Accepts [`PROTOCOL`] on `b`, which can be done once per node.
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
    let mut control = pair.a.mesh.streams();
    let target = peer_id(&pair.b.state.me);
    let total = payload.bytes;
    let payload = Arc::new(payload.clone());
    run_leg(
        &pair.ends,
        transport,
        expected,
        move |gate| async move {
            let stream = tokio::time::timeout(
                Duration::from_secs(10),
                control.open_stream(target, PROTOCOL),
            )
            .await
            .map_err(|_| anyhow!("opening the stream timed out"))?
            .map_err(|e| anyhow!("opening the stream: {e}"))?;
            gate.pass().await?;
            let bytes = send(&mut stream.compat(), &payload).await?;
            Ok(Sent {
                bytes,
                cipher: None,
            })
        },
        move |gate| async move {
            // The stream may arrive with its first bytes: it is waited for on the clock.
            gate.pass().await?;
            let (_, stream) = incoming
                .next()
                .await
                .ok_or_else(|| anyhow!("the mesh stopped before the stream arrived"))?;
            receive(stream.compat(), total).await
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::EndRuntime;

    /// The payload from `a` to `b` over any byte stream, on the caller's runtime.
    async fn over<S>(a: S, b: S, payload: &Arc<Payload>, expected: Hash) -> anyhow::Result<Leg>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let total = payload.bytes;
        let payload = payload.clone();
        run_leg(
            &Ends::Shared,
            "duplex",
            expected,
            move |gate| async move {
                let mut a = a;
                gate.pass().await?;
                let bytes = send(&mut a, &payload).await?;
                Ok(Sent {
                    bytes,
                    cipher: None,
                })
            },
            move |gate| async move {
                gate.pass().await?;
                receive(b, total).await
            },
        )
        .await
    }

    #[tokio::test]
    async fn every_byte_is_counted_and_hashed_across_uneven_reads() {
        // Not a multiple of the chunk, so the last piece is short.
        let payload = Arc::new(Payload::new(3 * CHUNK as u64 + 12_345));
        let expected = payload.digest();
        let (a, b) = tokio::io::duplex(7_777);
        let leg = over(a, b, &payload, expected).await.unwrap();
        assert!(leg.intact, "{leg:?}");
        assert_eq!(leg.bytes_received, payload.bytes);
        assert_eq!(leg.bytes_sent, payload.bytes);
        assert_eq!(leg.cpu_send_s_per_gib, None, "one runtime: no CPU split");
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

    #[tokio::test]
    async fn an_end_that_cannot_connect_says_why_and_the_other_is_called_off() {
        let payload = Arc::new(Payload::new(CHUNK as u64));
        let e = run_leg(
            &Ends::Shared,
            "broken",
            payload.digest(),
            |gate| async move {
                drop(gate);
                Err::<Sent, _>(anyhow!("no route"))
            },
            |gate| async move {
                gate.pass().await?;
                bail!("the receiver must not start")
            },
        )
        .await
        .unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("no route") && text.contains("broken"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn rustls_runs_tls13_aes_256_gcm_with_node_keys_and_counts_each_side() {
        let keys = [
            SecretKey::from_bytes(&[5; 32]),
            SecretKey::from_bytes(&[6; 32]),
        ];
        let (a, b) = (
            EndRuntime::new("a", 1).unwrap(),
            EndRuntime::new("b", 1).unwrap(),
        );
        let ends = Ends::apart(&a, &b);
        let payload = Arc::new(Payload::new(4 * CHUNK as u64));
        let leg = rustls_leg(&ends, &keys, &payload, payload.digest())
            .await
            .unwrap();
        assert!(leg.intact, "{leg:?}");
        assert_eq!(leg.cipher.as_deref(), Some("TLS1.3 AES_256_GCM_SHA384"));
        assert!(leg.cpu_send_s_per_gib.unwrap() > 0.0, "{leg:?}");
        assert!(leg.cpu_recv_s_per_gib.unwrap() > 0.0, "{leg:?}");
    }
}
