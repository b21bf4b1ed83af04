//! The data-plane legs of `drift bench transfer`: the payload as page batches
//! ([`PagePayload`]), sent and received through [`Link`] on data connections between two data
//! planes ([`Planes`]) of a pair of nodes, exactly as a sandbox migration moves its pages.
//! [`data_plane_leg`] is one such leg on planes of its own, for `drift bench migrate`'s
//! baseline.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use drift_protocol::transfer::{
    PageBatch, PageEntry, PageKind, TransferFrame, MAX_PAGES_PER_BATCH, PAGE_SIZE,
};
use drift_protocol::{Hash, MigrationId, NodeId, SecretKey};
use rand_core::OsRng;
use tokio_util::sync::CancellationToken;

use super::legs::{run_leg, Digest, Payload, Received, Sent};
use super::{Leg, CHUNK, SETUP_TIMEOUT};
use crate::bench::{Ends, Pair, Side};
use crate::dataplane::{self, DataConfig, DataPlane};
use crate::migration::buffers;
use crate::migration::link::{Inbound, Incoming, Link, Outbound};

/// The payload as page batches for the data-plane legs: chunk `i` is one batch of round 0
/// holding pages `256 i ..` (every page `Full`, numbered across the whole payload), whose
/// hashes are all computed up front. For each chunk the sender copies a full chunk's pages into
/// a batch buffer (as a migration source copies pages out of the guest) and patches in the
/// chunk's first 8 bytes, page numbers and precomputed hash: like the other legs' senders, it
/// copies and never hashes. Buffers go round [`crate::migration::buffers`], as a migration's do.
#[derive(Debug)]
pub(crate) struct PagePayload {
    /// A batch of a full chunk, patched per chunk by [`PagePayload::patch`].
    full: PageBatch,
    /// The hash of every full chunk's batch, in order.
    hashes: Vec<Hash>,
    /// The last chunk, if it holds fewer pages.
    tail: Option<TransferFrame>,
    head: u64,
    page_count: u64,
    bytes: u64,
}

impl PagePayload {
    /// `payload`'s batches; its size must be a whole number of pages.
    pub(crate) fn new(payload: &Payload) -> Self {
        let full_chunks = payload.bytes / CHUNK as u64;
        let mut full = Self::batch(0, payload.block.clone());
        let mut hashes = Vec::with_capacity(full_chunks as usize);
        for i in 0..full_chunks {
            Self::patch_pages(&mut full, payload.head, i);
            hashes.push(PageBatch::compute_hash(0, &full.entries, &full.data));
        }
        let tail = (!payload.bytes.is_multiple_of(CHUNK as u64)).then(|| {
            let mut data = payload.block.clone();
            let len = payload.fill(full_chunks, &mut data);
            data.truncate(len);
            let mut batch = Self::batch(full_chunks, data);
            batch.hash = PageBatch::compute_hash(0, &batch.entries, &batch.data);
            TransferFrame::Pages(batch)
        });
        Self {
            full,
            hashes,
            tail,
            head: payload.head,
            page_count: payload.bytes / PAGE_SIZE as u64,
            bytes: payload.bytes,
        }
    }

    /// The batch of chunk `i` holding `data` (whole pages), its hash not yet computed.
    fn batch(i: u64, data: Vec<u8>) -> PageBatch {
        let first = i * MAX_PAGES_PER_BATCH as u64;
        PageBatch {
            round: 0,
            entries: (0..(data.len() / PAGE_SIZE) as u64)
                .map(|j| PageEntry {
                    pfn: first + j,
                    kind: PageKind::Full,
                })
                .collect(),
            data,
            hash: Hash::ZERO,
        }
    }

    /// Makes `batch` (a full chunk's) hold chunk `i`'s bytes and page numbers.
    fn patch_pages(batch: &mut PageBatch, head: u64, i: u64) {
        batch.data[..8].copy_from_slice(&(head ^ i).to_le_bytes());
        let first = i * MAX_PAGES_PER_BATCH as u64;
        for (j, e) in batch.entries.iter_mut().enumerate() {
            e.pfn = first + j as u64;
        }
    }

    /// Makes `batch` (a full chunk's) chunk `i`'s batch, hash included.
    fn patch(&self, batch: &mut PageBatch, i: u64) {
        Self::patch_pages(batch, self.head, i);
        batch.hash = self.hashes[i as usize];
    }

    /// The hashes of every batch, in order, chained: what the receiver must arrive at.
    pub(crate) fn digest(&self) -> Hash {
        let mut d = Digest::default();
        for h in &self.hashes {
            d.push(&h.0);
        }
        if let Some(TransferFrame::Pages(tail)) = &self.tail {
            d.push(&tail.hash.0);
        }
        d.0
    }
}

/// Sends every batch of `pages` on `out`, then flushes and shuts it down; the data bytes sent.
async fn send_pages(mut out: Outbound, pages: &PagePayload) -> anyhow::Result<u64> {
    let mut sent = 0u64;
    for i in 0..pages.hashes.len() as u64 {
        let mut data = buffers::take();
        data.clear();
        data.extend_from_slice(&pages.full.data);
        let mut batch = PageBatch {
            round: pages.full.round,
            entries: pages.full.entries.clone(),
            data,
            hash: pages.full.hash,
        };
        pages.patch(&mut batch, i);
        out.send_owned(TransferFrame::Pages(batch))
            .await
            .context("sending a batch")?;
        sent += CHUNK as u64;
    }
    if let Some(tail) = &pages.tail {
        out.send(tail).await.context("sending the last batch")?;
        if let TransferFrame::Pages(b) = tail {
            sent += b.data.len() as u64;
        }
    }
    out.flush().await.context("flushing")?;
    out.shut_down().await;
    Ok(sent)
}

/// Takes checked page batches until the link ends, counting their data bytes and chaining
/// their hashes; refuses more than `expect` bytes, and any other frame.
async fn receive_pages(inbound: &mut Inbound, expect: u64) -> anyhow::Result<Received> {
    let mut total = 0u64;
    let mut digest = Digest::default();
    let mut done_at = None;
    while let Some(item) = inbound.recv().await {
        match item.map_err(|e| anyhow!("receiving: {e}"))? {
            Incoming::Pages(checked) => {
                let batch = checked.into_batch();
                total += batch.data.len() as u64;
                digest.push(&batch.hash.0);
                buffers::give(batch.data);
            }
            Incoming::Frame(other) => bail!("a frame other than pages arrived: {other:?}"),
        }
        if total > expect {
            bail!("received more than the {expect} bytes sent");
        }
        if total == expect {
            done_at = Some(Instant::now());
        }
    }
    Ok(Received {
        bytes: total,
        digest: digest.0,
        done_at: done_at.unwrap_or_else(Instant::now),
    })
}

/// A data plane for each node of a pair, each on its node's side, apart from the nodes' own:
/// the benchmark registers its own migrations on them.
#[derive(Debug)]
pub(super) struct Planes {
    a: Arc<DataPlane>,
    b: Arc<DataPlane>,
    a_id: NodeId,
    b_id: NodeId,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Planes {
    pub(super) async fn start(
        pair: &Pair,
        keys: &[SecretKey; 2],
        connections: u32,
    ) -> anyhow::Result<Self> {
        let cancel = CancellationToken::new();
        let start = |key: &SecretKey, state: &Arc<crate::state::NodeState>| {
            let config = DataConfig {
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: Vec::new(),
                connections,
            };
            let (key, state, cancel) = (key.clone(), state.clone(), cancel.clone());
            move || DataPlane::start(config, key, state, cancel)
        };
        let (a, task_a) = pair
            .ends
            .run(Side::A, start(&keys[0], &pair.a.state))
            .await?
            .context("node-1's data plane")?;
        let b = pair
            .ends
            .run(Side::B, start(&keys[1], &pair.b.state))
            .await
            .and_then(|r| r.map_err(anyhow::Error::from));
        let (b, task_b) = match b {
            Ok(b) => b,
            Err(e) => {
                cancel.cancel();
                let _ = task_a.await;
                return Err(e.context("node-2's data plane"));
            }
        };
        Ok(Self {
            a,
            b,
            a_id: keys[0].public(),
            b_id: keys[1].public(),
            cancel,
            tasks: vec![task_a, task_b],
        })
    }

    pub(super) async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The payload from `pair.a` to `pair.b` on `n` data connections, as a sandbox migration
/// sends its pages: each batch a numbered frame on the connection with the most room, every
/// connection with its own writer and reader task, every batch checked by its reader.
pub(super) async fn data_leg(
    ends: &Ends,
    planes: &Planes,
    pages: &Arc<PagePayload>,
    n: u32,
) -> anyhow::Result<Leg> {
    let id = MigrationId::random(&mut OsRng);
    let offer = Hash::of(b"drift bench transfer");
    let mut expectation = planes
        .b
        .expect(id, planes.a_id, offer, n, Arc::new(AtomicU64::new(0)));
    let endpoint = planes.b.endpoint(n);
    let (plane, target) = (planes.a.clone(), planes.b_id);
    let transport = if n == 1 {
        "drift data plane, 1 connection".to_string()
    } else {
        format!("drift data plane, {n} connections")
    };
    let (send_pages_of, receive_pages_of) = (pages.clone(), pages.clone());
    run_leg(
        ends,
        &transport,
        pages.digest(),
        move |gate| async move {
            let conns = plane
                .connect_all(target, &endpoint, &[], id, offer, n)
                .await
                .context("opening the data connections")?;
            let cipher = conns.first().map(dataplane::describe);
            let Link {
                out,
                inbound: _answers,
            } = Link::data_source(conns);
            gate.pass().await?;
            let bytes = send_pages(out, &send_pages_of).await?;
            Ok(Sent { bytes, cipher })
        },
        move |gate| async move {
            let conns = expectation
                .all(n, SETUP_TIMEOUT)
                .await
                .map_err(|e| anyhow!("waiting for the data connections: {e}"))?;
            let pages = receive_pages_of;
            let Link {
                out: _answers,
                mut inbound,
            } = Link::data_target(conns, pages.page_count);
            gate.pass().await?;
            receive_pages(&mut inbound, pages.bytes).await
        },
    )
    .await
}

/// The payload from `pair.a` to `pair.b` on `n` data connections, between two data planes
/// started for this leg alone (on each node's side of `pair.ends`) and stopped after it: the
/// data plane's own rate, for a benchmark that measures something else between the same nodes.
pub(crate) async fn data_plane_leg(
    pair: &Pair,
    keys: &[SecretKey; 2],
    pages: &Arc<PagePayload>,
    n: u32,
) -> anyhow::Result<Leg> {
    let planes = Planes::start(pair, keys, n).await?;
    let leg = data_leg(&pair.ends, &planes, pages, n).await;
    planes.stop().await;
    leg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_batches_hold_exactly_the_payload_and_check() {
        // Two full chunks and a short one.
        let payload = Payload::new(2 * CHUNK as u64 + 3 * PAGE_SIZE as u64);
        let pages = PagePayload::new(&payload);
        assert_eq!(pages.page_count, 2 * 256 + 3);
        let mut buf = payload.block.clone();
        let mut batch = pages.full.clone();
        for i in 0..2u64 {
            pages.patch(&mut batch, i);
            let len = payload.fill(i, &mut buf);
            let built = PageBatch::build(
                0,
                buf[..len]
                    .chunks_exact(PAGE_SIZE)
                    .enumerate()
                    .map(|(j, p)| (i * 256 + j as u64, p)),
            );
            assert_eq!(batch, built, "chunk {i}");
            batch.check(pages.page_count).unwrap();
        }
        let Some(TransferFrame::Pages(tail)) = &pages.tail else {
            panic!("a short last chunk")
        };
        assert_eq!(tail.entries.len(), 3);
        assert_eq!(tail.entries[2].pfn, pages.page_count - 1);
        tail.check(pages.page_count).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn page_batches_arrive_checked_and_in_order_over_several_connections() {
        let payload = Payload::new(5 * CHUNK as u64 + PAGE_SIZE as u64);
        let pages = PagePayload::new(&payload);
        let (mut near, mut far) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let (a, b) = tokio::io::duplex(1 << 20);
            near.push(a);
            far.push(b);
        }
        let out = Outbound::data(near);
        let mut inbound = Inbound::data(far, Some(pages.page_count));
        let (sent, got) = tokio::join!(
            send_pages(out, &pages),
            receive_pages(&mut inbound, pages.bytes)
        );
        let got = got.unwrap();
        assert_eq!(sent.unwrap(), payload.bytes);
        assert_eq!(got.bytes, payload.bytes);
        assert_eq!(got.digest, pages.digest());
    }

    #[tokio::test]
    async fn a_bad_batch_or_a_wrong_order_is_caught() {
        let payload = Payload::new(2 * CHUNK as u64);
        let pages = PagePayload::new(&payload);
        // A corrupted page fails its reader's check.
        let (a, b) = tokio::io::duplex(4 << 20);
        let mut out = Outbound::data(vec![a]);
        let mut inbound = Inbound::data(vec![b], Some(pages.page_count));
        let mut batch = pages.full.clone();
        pages.patch(&mut batch, 0);
        batch.data[4096 * 7 + 3] ^= 1;
        out.send(&TransferFrame::Pages(batch)).await.unwrap();
        out.shut_down().await;
        let e = receive_pages(&mut inbound, pages.bytes).await.unwrap_err();
        assert!(format!("{e:#}").contains("bad page batch"), "{e:#}");
        // Batches swapped: each checks, the digest does not.
        let (a, b) = tokio::io::duplex(4 << 20);
        let mut out = Outbound::data(vec![a]);
        let mut inbound = Inbound::data(vec![b], Some(pages.page_count));
        for i in [1u64, 0] {
            let mut batch = pages.full.clone();
            pages.patch(&mut batch, i);
            out.send(&TransferFrame::Pages(batch)).await.unwrap();
        }
        out.shut_down().await;
        let got = receive_pages(&mut inbound, pages.bytes).await.unwrap();
        assert_eq!(got.bytes, payload.bytes);
        assert_ne!(got.digest, pages.digest());
    }
}
