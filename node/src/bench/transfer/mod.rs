//! `drift bench transfer --bytes N`: the cost of drift's encrypted transports.
//!
//! The same `N` bytes go, in writes of one full page batch (1 MiB, as the migration engine
//! writes them), over:
//!
//! 1. **tcp**: plain TCP on 127.0.0.1 (the baseline: no encryption, no multiplexing);
//! 2. **rustls**: TLS 1.3 (AES-256-GCM, 16 KiB records) over one TCP connection, with drift's
//!    own raw-key TLS configurations ([`crate::dataplane::tls`]) and no drift code in between:
//!    the reference for TLS done right;
//! 3. **stream**: a drift stream between two in-process nodes over TCP + Noise + Yamux, opened
//!    with `mesh.streams()` on a protocol only the benchmark accepts (`/drift/bench/1`),
//!    exactly as a migration stream is;
//! 4. **data_1** and **data_k**: drift's data plane ([`crate::dataplane`]) between the same two
//!    nodes, on one and on `K` connections: TLS handshakes, signed bindings, then the bytes as
//!    numbered page-batch frames through [`Link`](crate::migration::link::Link), exactly as a
//!    sandbox migration sends them;
//! 5. **quic**: the drift stream over QUIC, between two nodes that listen only on QUIC.
//!
//! Every receiver checks every byte once: the byte-stream legs count the bytes and hash them
//! (blake3, chained over 1 MiB pieces) as they arrive; the data-plane legs' readers check each
//! batch's blake3 hash, as a migration target does, and the benchmark chains the checked
//! hashes. A leg counts only if both the count and the digest match what was sent. No sender
//! hashes while the clock runs: the data-plane legs' batch hashes are computed beforehand. The
//! clock runs from the moment both ends are connected to the last byte received.
//!
//! The sending side runs on one tokio runtime and the receiving side on another, two worker
//! threads each ([`END_WORKER_THREADS`]); each node of a pair runs on its side's runtime, with
//! every task it spawns. Each side's CPU time is the CPU time of its runtime's threads
//! (workers and blocking threads, from `/proc/self/task`) over the leg, reported per GiB moved.
//! The nodes' own background work (gossip, load reports) is in the node legs' figures; it is
//! small next to a GiB.
//!
//! This module owns the figures, the targets and the run of every leg in turn; the legs'
//! shared machinery and the byte-stream legs (1 to 3, 5) are in [`legs`], the data-plane legs
//! (4) in [`data`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use drift_protocol::dataplane::MAX_DATA_CONNECTIONS;
use drift_protocol::transfer::{MAX_PAGES_PER_BATCH, PAGE_SIZE};
use drift_protocol::{Hash, SecretKey};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, StreamProtocol};
use serde::Serialize;

use super::{start_pair_on, start_second, two_node_configs, EndRuntime, Ends, Pair, Side, TempDir};
use crate::daemon;
use crate::mesh::peer_id;

mod data;
mod legs;

use data::{data_leg, Planes};
pub(crate) use data::{data_plane_leg, PagePayload};
use legs::{rustls_leg, tcp_leg};
pub(crate) use legs::{stream_leg, Payload};

/// The benchmark's stream protocol; drift nodes outside a benchmark do not accept it.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/bench/1");
/// Bytes per write: one full batch of pages.
pub const CHUNK: usize = MAX_PAGES_PER_BATCH * PAGE_SIZE;
/// What the libp2p stream should reach, as a fraction of plain TCP.
pub const TARGET_RATIO: f64 = 0.8;
/// What the data plane on one connection should reach, as a fraction of rustls.
pub const TARGET_DATA_1_VS_RUSTLS: f64 = 0.9;
/// What the data plane on `K` connections should reach, as a fraction of plain TCP.
pub const TARGET_DATA_K_VS_TCP: f64 = 0.6;
/// What the data plane (on one and on `K` connections) should reach, as a multiple of the
/// libp2p stream.
pub const TARGET_DATA_VS_STREAM: f64 = 2.5;
/// At most this many bytes per leg.
pub const MAX_BYTES: u64 = 64 << 30;
/// Worker threads of each side's runtime.
pub const END_WORKER_THREADS: usize = 2;
/// Any one leg gives up after this long.
const LEG_TIMEOUT: Duration = Duration::from_secs(900);
/// Connecting a leg's two ends.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Starting and connecting a pair of nodes.
const PAIR_TIMEOUT: Duration = Duration::from_secs(60);
const GIB: f64 = (1u64 << 30) as f64;

/// One transport's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    pub transport: String,
    /// The TLS version and cipher suite negotiated, for a TLS leg.
    pub cipher: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// What was sent, and what arrived: blake3 chained over 1 MiB pieces of the bytes, or,
    /// for the data-plane legs, over the page batches' hashes.
    pub digest_sent: Hash,
    pub digest_received: Hash,
    /// The receiver got exactly the bytes sent.
    pub intact: bool,
    /// From the moment both ends were connected to the last byte received.
    pub seconds: f64,
    pub bytes_per_s: f64,
    pub mib_per_s: f64,
    /// CPU time of the sending side's threads over the leg, per GiB sent; `None` when both
    /// sides ran on one runtime.
    pub cpu_send_s_per_gib: Option<f64>,
    /// The same for the receiving side.
    pub cpu_recv_s_per_gib: Option<f64>,
}

/// Figures of one transfer run.
#[derive(Debug, Clone, Serialize)]
pub struct TransferFigures {
    pub bytes: u64,
    pub write_bytes: usize,
    /// The receiver's hashing alone, on one core (part of every leg).
    pub hash_mib_per_s: f64,
    /// Connections of the `data_k` leg.
    pub connections: u32,
    /// Worker threads of each side's runtime.
    pub worker_threads_per_side: usize,
    pub tcp: Leg,
    /// rustls (TLS 1.3, AES-256-GCM) over one TCP connection, no drift code.
    pub rustls: Leg,
    /// TCP + Noise + Yamux between two drift nodes.
    pub stream: Leg,
    /// drift's data plane on one connection.
    pub data_1: Leg,
    /// drift's data plane on `connections` connections.
    pub data_k: Leg,
    /// QUIC between two drift nodes, if it ran.
    pub quic: Option<Leg>,
    /// Why QUIC did not run, if it did not.
    pub quic_error: Option<String>,
    /// stream / plain TCP.
    pub stream_ratio: f64,
    /// quic / plain TCP.
    pub quic_ratio: Option<f64>,
    /// rustls / plain TCP.
    pub rustls_ratio: f64,
    pub data_1_vs_rustls: f64,
    pub data_k_vs_tcp: f64,
    pub data_1_vs_stream: f64,
    pub data_k_vs_stream: f64,
    /// Target of `stream_ratio`.
    pub target_ratio: f64,
    pub target_data_1_vs_rustls: f64,
    pub target_data_k_vs_tcp: f64,
    /// Target of both `data_1_vs_stream` and `data_k_vs_stream`.
    pub target_data_vs_stream: f64,
}

/// Starts two nodes that listen only on QUIC, `b` dialing `a`, each on its side of `ends`.
async fn start_quic_pair(dir: &std::path::Path, ends: Ends) -> anyhow::Result<Pair> {
    let [mut ca, mut cb] = two_node_configs(dir, Duration::from_millis(500))?;
    let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse()?;
    ca.node.listen = vec![quic.clone()];
    ca.node.bootstrap = Vec::new();
    let a = ends
        .run(Side::A, move || daemon::start(ca))
        .await?
        .context("starting node-1 on QUIC")?;
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
            let _ = ends.run(Side::A, move || a.shutdown()).await;
            bail!("node-1 reported no QUIC listen address");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cb.node.listen = vec![quic];
    cb.node.bootstrap = vec![addr.with(Protocol::P2p(peer_id(&a.state.me)))];
    start_second(a, cb, ends, PAIR_TIMEOUT, "node-2 on QUIC").await
}

fn check_bytes(bytes: u64) -> anyhow::Result<()> {
    if bytes == 0 || bytes > MAX_BYTES {
        bail!("--bytes must be 1 to {} (64 GiB)", MAX_BYTES);
    }
    if !bytes.is_multiple_of(PAGE_SIZE as u64) {
        bail!("--bytes must be a whole number of {PAGE_SIZE}-byte pages (the data plane carries pages)");
    }
    Ok(())
}

/// The connections of the `data_k` leg: `requested`, or the data plane's default (the host's
/// parallelism, 1 to 8); at least 2, so it differs from the one-connection leg.
fn data_connections(requested: Option<u32>) -> anyhow::Result<u32> {
    let k = requested.unwrap_or_else(|| crate::config::DataSection::default().connections());
    if k == 0 || k > MAX_DATA_CONNECTIONS {
        bail!("--connections must be 1 to {MAX_DATA_CONNECTIONS}");
    }
    Ok(k.max(2))
}

/// The legs between the two nodes of `pair`: the libp2p stream, then the data plane on one
/// connection and on `k`.
async fn node_legs(
    pair: &Pair,
    keys: &[SecretKey; 2],
    payload: &Payload,
    expected: Hash,
    pages: &Arc<PagePayload>,
    k: u32,
) -> anyhow::Result<(Leg, Leg, Leg)> {
    let stream = stream_leg(pair, "libp2p tcp+noise+yamux", payload, expected).await?;
    let planes = Planes::start(pair, keys, k).await?;
    let data_1 = data_leg(&pair.ends, &planes, pages, 1).await;
    let data_k = match &data_1 {
        Ok(_) => data_leg(&pair.ends, &planes, pages, k).await,
        Err(_) => Err(anyhow!("not run")),
    };
    planes.stop().await;
    Ok((stream, data_1?, data_k?))
}

/// Runs the transfer benchmark: plain TCP, rustls, a drift stream over TCP, drift's data plane
/// on one and on `connections` connections (see [`data_connections`]), then (if `quic`) a drift
/// stream over QUIC.
pub async fn transfer(
    bytes: u64,
    quic: bool,
    connections: Option<u32>,
) -> anyhow::Result<TransferFigures> {
    check_bytes(bytes)?;
    let k = data_connections(connections)?;
    let payload = Arc::new(Payload::new(bytes));
    let hashed = Instant::now();
    let expected = payload.digest();
    let hash_mib_per_s = bytes as f64 / hashed.elapsed().as_secs_f64().max(1e-9) / 1048576.0;
    let pages = Arc::new(PagePayload::new(&payload));

    let dir = TempDir::new("transfer")?;
    let configs = two_node_configs(dir.path(), Duration::from_millis(500))?;
    let keys = [
        crate::identity::read_key(&configs[0].node.key)?,
        crate::identity::read_key(&configs[1].node.key)?,
    ];
    let sender = EndRuntime::new("send", END_WORKER_THREADS)?;
    let receiver = EndRuntime::new("recv", END_WORKER_THREADS)?;
    let ends = Ends::apart(&sender, &receiver);

    let tcp = tcp_leg(&ends, &payload, expected).await?;
    let rustls = rustls_leg(&ends, &keys, &payload, expected).await?;

    let pair = start_pair_on(configs, PAIR_TIMEOUT, ends.clone()).await?;
    let legs = node_legs(&pair, &keys, &payload, expected, &pages, k).await;
    pair.shutdown().await;
    let (stream, data_1, data_k) = legs?;

    let (quic, quic_error) = if quic {
        match start_quic_pair(dir.path(), ends.clone()).await {
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
    drop((sender, receiver));
    let ratio = |x: &Leg, y: &Leg| x.bytes_per_s / y.bytes_per_s.max(1e-9);
    Ok(TransferFigures {
        bytes,
        write_bytes: CHUNK,
        hash_mib_per_s,
        connections: k,
        worker_threads_per_side: END_WORKER_THREADS,
        stream_ratio: ratio(&stream, &tcp),
        quic_ratio: quic.as_ref().map(|q| ratio(q, &tcp)),
        rustls_ratio: ratio(&rustls, &tcp),
        data_1_vs_rustls: ratio(&data_1, &rustls),
        data_k_vs_tcp: ratio(&data_k, &tcp),
        data_1_vs_stream: ratio(&data_1, &stream),
        data_k_vs_stream: ratio(&data_k, &stream),
        target_ratio: TARGET_RATIO,
        target_data_1_vs_rustls: TARGET_DATA_1_VS_RUSTLS,
        target_data_k_vs_tcp: TARGET_DATA_K_VS_TCP,
        target_data_vs_stream: TARGET_DATA_VS_STREAM,
        tcp,
        rustls,
        stream,
        data_1,
        data_k,
        quic,
        quic_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_out_of_range_are_refused() {
        assert!(check_bytes(0).is_err());
        assert!(check_bytes(MAX_BYTES + 1).is_err());
        assert!(check_bytes(100).is_err(), "not whole pages");
        assert!(check_bytes(4096).is_ok());
        assert!(check_bytes(MAX_BYTES).is_ok());
    }

    #[test]
    fn the_many_connection_leg_has_at_least_two() {
        assert_eq!(data_connections(Some(1)).unwrap(), 2);
        assert_eq!(data_connections(Some(4)).unwrap(), 4);
        assert!((2..=8).contains(&data_connections(None).unwrap()));
        assert!(data_connections(Some(0)).is_err());
        assert!(data_connections(Some(MAX_DATA_CONNECTIONS + 1)).is_err());
    }
}
