//! Where a sandbox transfer's frames travel: the migration's own stream (one ordered byte
//! stream: the fallback), or the migration's data connections (several TLS connections, the
//! frames numbered across them; see [`drift_protocol::dataplane`]).
//!
//! Both ends see one ordered sequence of frames whichever way they travel:
//!
//! - [`Outbound`] sends. On data connections each frame goes, numbered, to the connection
//!   whose writer has the most room; every connection has its own writer task, so encryption
//!   runs on as many cores as there are connections. `send` returns once the frame is queued;
//!   [`Outbound::flush`] waits until everything queued is written.
//! - [`Inbound`] receives. Every connection has its own reader task that decodes each frame
//!   and checks page batches ([`PageBatch::into_checked`]: the blake3 pass), again one core
//!   per connection; then frames are put back in their numbered order before the engine sees
//!   them. A reader holds a frame numbered more than [`WINDOW`] ahead of the next one due
//!   until the gap closes, so out-of-order frames wait in a bounded buffer and a connection
//!   running ahead is slowed by TCP's own flow control.
//!
//! Every frame is bounded by the codec's limit before it is read; numbers that go back on a
//! connection, repeat across connections or a batch that fails its check end the transfer.

use std::collections::BTreeMap;

use drift_protocol::codec::MAX_FRAME_LEN;
use drift_protocol::dataplane::{pages_frame_parts, DataFrame};
use drift_protocol::transfer::{AbortReason, CheckedBatch, PageBatch, TransferFrame};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::frames::{read_data_frame, read_payload, write_bounded, write_parts_bounded};
use drift_protocol::codec::decode_payload;

/// Frames a reader may run ahead of the next frame due.
pub const WINDOW: u64 = 16;
/// Frames queued per connection writer.
const WRITE_QUEUE: usize = 2;

/// A frame as the engine takes it: page batches arrive checked.
#[derive(Debug)]
pub enum Incoming {
    Frame(TransferFrame),
    Pages(CheckedBatch),
}

/// A byte stream a link runs on.
pub trait LinkStream: AsyncRead + AsyncWrite + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + 'static> LinkStream for T {}

type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The frame of a [`DataFrame`] without copying the transfer frame: postcard encodes a struct
/// as its fields in order, so this encodes exactly as `DataFrame { seq, frame }`.
#[derive(Serialize)]
struct DataFrameRef<'a> {
    seq: u64,
    frame: &'a TransferFrame,
}

/// Room for a frame's encoding: its page data and a bound on the rest.
fn encoded_size_hint(frame: &TransferFrame) -> usize {
    match frame {
        // Per entry at most a 10-byte page number and its kind; the hash, the counts.
        TransferFrame::Pages(b) => b.data.len() + 11 * b.entries.len() + 128,
        _ => 256,
    }
}

enum WriterMsg {
    Frame(Vec<u8>),
    /// A `Pages` frame as its head, its batch (whose data is written from where it is) and
    /// the hash after the data.
    Pages {
        head: Vec<u8>,
        batch: PageBatch,
        tail: [u8; 32],
    },
    Flush(oneshot::Sender<std::io::Result<()>>),
}

/// The sending half of a link.
pub struct Outbound {
    kind: OutKind,
}

enum OutKind {
    Stream(BoxWrite),
    Data {
        writers: Vec<mpsc::Sender<WriterMsg>>,
        seq: u64,
        next: usize,
        _tasks: JoinSet<()>,
    },
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            OutKind::Stream(_) => f.write_str("Outbound(stream)"),
            OutKind::Data { writers, seq, .. } => f
                .debug_struct("Outbound")
                .field("connections", &writers.len())
                .field("seq", seq)
                .finish(),
        }
    }
}

fn broken() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "a data connection's writer stopped",
    )
}

impl Outbound {
    /// Sends on one ordered stream: each frame is written and flushed before `send` returns.
    pub fn stream<W: AsyncWrite + Send + Unpin + 'static>(w: W) -> Self {
        Self {
            kind: OutKind::Stream(Box::new(w)),
        }
    }

    /// Sends numbered frames over `conns` (at least one), each with its own writer task.
    pub fn data<W: AsyncWrite + Send + Unpin + 'static>(conns: Vec<W>) -> Self {
        let mut tasks = JoinSet::new();
        let writers = conns
            .into_iter()
            .map(|w| {
                let (tx, rx) = mpsc::channel(WRITE_QUEUE);
                tasks.spawn(write_loop(w, rx));
                tx
            })
            .collect();
        Self {
            kind: OutKind::Data {
                writers,
                seq: 0,
                next: 0,
                _tasks: tasks,
            },
        }
    }

    /// [`Outbound::send`] for a frame this half may keep: a page batch's data then goes to its
    /// connection from where it is, with no copy into an encoding of its own.
    pub async fn send_owned(&mut self, frame: TransferFrame) -> std::io::Result<usize> {
        let TransferFrame::Pages(batch) = frame else {
            return self.send(&frame).await;
        };
        let OutKind::Data {
            writers, seq, next, ..
        } = &mut self.kind
        else {
            return self.send(&TransferFrame::Pages(batch)).await;
        };
        *seq += 1;
        let (head, tail) = pages_frame_parts(*seq, &batch);
        let len = head.len() + batch.data.len() + tail.len();
        let pick = pick_writer(writers, next);
        writers[pick]
            .send(WriterMsg::Pages { head, batch, tail })
            .await
            .map_err(|_| broken())?;
        Ok(len)
    }

    /// Queues (data connections) or writes (a stream) one frame; the bytes it takes.
    pub async fn send(&mut self, frame: &TransferFrame) -> std::io::Result<usize> {
        match &mut self.kind {
            OutKind::Stream(w) => super::frames::write_frame(w, frame).await,
            OutKind::Data {
                writers, seq, next, ..
            } => {
                *seq += 1;
                // Sized up front: a page batch is encoded with one copy of its pages, never
                // grown (and copied again) on the way.
                let mut bytes = Vec::with_capacity(encoded_size_hint(frame));
                drift_protocol::codec::encode_frame_into(
                    &DataFrameRef { seq: *seq, frame },
                    &mut bytes,
                );
                let len = bytes.len();
                let pick = pick_writer(writers, next);
                writers[pick]
                    .send(WriterMsg::Frame(bytes))
                    .await
                    .map_err(|_| broken())?;
                Ok(len)
            }
        }
    }

    /// Waits until every frame sent so far is written out (flushed to the socket).
    pub async fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.kind {
            OutKind::Stream(w) => w.flush().await,
            OutKind::Data { writers, .. } => {
                let mut waits = Vec::with_capacity(writers.len());
                for w in writers.iter() {
                    let (tx, rx) = oneshot::channel();
                    w.send(WriterMsg::Flush(tx)).await.map_err(|_| broken())?;
                    waits.push(rx);
                }
                for rx in waits {
                    rx.await.map_err(|_| broken())??;
                }
                Ok(())
            }
        }
    }

    /// Flushes and ends the writing side of every connection.
    pub async fn shut_down(mut self) {
        let _ = self.flush().await;
        match self.kind {
            OutKind::Stream(mut w) => {
                let _ = w.shutdown().await;
            }
            OutKind::Data {
                writers,
                mut _tasks,
                ..
            } => {
                drop(writers);
                // Writers end their connections once their queue closes.
                let _ = tokio::time::timeout(super::frames::WRITE_STALL, async {
                    while _tasks.join_next().await.is_some() {}
                })
                .await;
            }
        }
    }
}

/// The writer with the most room; ties go round the connections.
fn pick_writer(writers: &[mpsc::Sender<WriterMsg>], next: &mut usize) -> usize {
    let n = writers.len();
    let pick = (0..n)
        .map(|i| (*next + i) % n)
        .max_by_key(|&i| (writers[i].capacity(), n - (i + n - *next) % n))
        .unwrap_or(0);
    *next = (pick + 1) % n;
    pick
}

/// One connection's writer: writes queued frames, flushing whenever the queue runs dry so a
/// lone small frame (a page request, a commit) never waits in a TLS buffer.
async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<WriterMsg>) {
    while let Some(msg) = rx.recv().await {
        match msg {
            WriterMsg::Frame(bytes) => {
                let queued = !rx.is_empty();
                if write_bounded(&mut w, &bytes, !queued).await.is_err() {
                    return;
                }
            }
            WriterMsg::Pages { head, batch, tail } => {
                let queued = !rx.is_empty();
                let parts: [&[u8]; 3] = [&head, &batch.data, &tail];
                let written = write_parts_bounded(&mut w, &parts, !queued).await;
                super::buffers::give(batch.data);
                if written.is_err() {
                    return;
                }
            }
            WriterMsg::Flush(done) => {
                let r = tokio::time::timeout(super::frames::WRITE_STALL, w.flush())
                    .await
                    .unwrap_or_else(|_| {
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "flush stalled",
                        ))
                    });
                let failed = r.is_err();
                let _ = done.send(r);
                if failed {
                    return;
                }
            }
        }
    }
    let _ = w.shutdown().await;
}

type Item = Result<(u64, Incoming), LinkError>;

/// Why a link's inbound side failed: what the peer did, as far as the bytes tell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The connection ended or broke: nothing says the peer misbehaved.
    #[error("{0}")]
    Gone(String),
    /// A frame that did not decode: too large, empty, another version, not a frame.
    #[error("{on}: malformed frame ({label}): {detail}")]
    Malformed {
        on: String,
        label: &'static str,
        detail: String,
    },
    /// A page batch that failed its check.
    #[error("{0}")]
    BadBatch(String),
    /// Frame numbers that repeat, go back, or leave a gap.
    #[error("{0}")]
    Order(String),
}

impl LinkError {
    /// A read error on `on`: the frame's fault if it did not decode, else the connection's.
    fn read(on: &str, e: std::io::Error) -> Self {
        match super::frames::decode_error(&e) {
            Some(d) => LinkError::Malformed {
                on: on.to_string(),
                label: d.label(),
                detail: d.to_string(),
            },
            None => LinkError::Gone(format!("{on}: {e}")),
        }
    }

    /// The reason code the peer is told before the link closes; `None` when the peer is gone.
    pub fn abort_reason(&self) -> Option<AbortReason> {
        match self {
            LinkError::Gone(_) => None,
            LinkError::Malformed { .. } => Some(AbortReason::Malformed),
            LinkError::BadBatch(_) => Some(AbortReason::BadBatch),
            LinkError::Order(_) => Some(AbortReason::Protocol),
        }
    }

    /// A stable label for the audit log.
    pub fn label(&self) -> &'static str {
        match self {
            LinkError::Gone(_) => "source_gone",
            LinkError::Malformed { label, .. } => label,
            LinkError::BadBatch(_) => "bad_batch",
            LinkError::Order(_) => "out_of_order",
        }
    }
}

/// The receiving half of a link: frames in the order they were sent.
#[derive(Debug)]
pub struct Inbound {
    rx: mpsc::Receiver<Item>,
    pending: BTreeMap<u64, Incoming>,
    /// The number of the next frame due.
    next: u64,
    /// The number of the last frame handed out (readers run at most [`WINDOW`] ahead).
    delivered: watch::Sender<u64>,
    _readers: JoinSet<()>,
}

impl Inbound {
    fn new(readers: JoinSet<()>, rx: mpsc::Receiver<Item>, delivered: watch::Sender<u64>) -> Self {
        Self {
            rx,
            pending: BTreeMap::new(),
            next: 1,
            delivered,
            _readers: readers,
        }
    }

    /// Frames of one ordered stream (numbered here as they arrive). With `page_count`, page
    /// batches are checked against it as they arrive.
    pub fn stream<R: AsyncRead + Send + Unpin + 'static>(r: R, page_count: Option<u64>) -> Self {
        let (tx, rx) = mpsc::channel(2);
        let delivered = watch::channel(0).0;
        let mut readers = JoinSet::new();
        readers.spawn(read_stream(r, page_count, tx));
        Self::new(readers, rx, delivered)
    }

    /// Numbered frames from `conns`, put back in order.
    pub fn data<R: AsyncRead + Send + Unpin + 'static>(
        conns: Vec<R>,
        page_count: Option<u64>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(WINDOW as usize + conns.len());
        let delivered = watch::channel(0).0;
        let mut readers = JoinSet::new();
        for (i, r) in conns.into_iter().enumerate() {
            readers.spawn(read_numbered(
                r,
                i,
                page_count,
                tx.clone(),
                delivered.subscribe(),
            ));
        }
        Self::new(readers, rx, delivered)
    }

    fn take_due(&mut self) -> Option<Incoming> {
        let item = self.pending.remove(&self.next)?;
        self.delivered.send_replace(self.next);
        self.next += 1;
        Some(item)
    }

    fn file(&mut self, seq: u64, item: Incoming) -> Result<(), LinkError> {
        if seq < self.next || self.pending.contains_key(&seq) {
            return Err(LinkError::Order(format!("frame {seq} arrived twice")));
        }
        self.pending.insert(seq, item);
        Ok(())
    }

    /// The next frame; `None` once every connection ended with no frame missing.
    pub async fn recv(&mut self) -> Option<Result<Incoming, LinkError>> {
        loop {
            if let Some(item) = self.take_due() {
                return Some(Ok(item));
            }
            match self.rx.recv().await {
                Some(Ok((seq, item))) => {
                    if let Err(e) = self.file(seq, item) {
                        return Some(Err(e));
                    }
                }
                Some(Err(e)) => return Some(Err(e)),
                None if self.pending.is_empty() => return None,
                None => {
                    return Some(Err(LinkError::Gone(format!(
                        "the connections ended with frame {} missing",
                        self.next
                    ))));
                }
            }
        }
    }

    /// The next frame if it is here already.
    pub fn try_recv(&mut self) -> Option<Result<Incoming, LinkError>> {
        loop {
            if let Some(item) = self.take_due() {
                return Some(Ok(item));
            }
            match self.rx.try_recv() {
                Ok(Ok((seq, item))) => {
                    if let Err(e) = self.file(seq, item) {
                        return Some(Err(e));
                    }
                }
                Ok(Err(e)) => return Some(Err(e)),
                Err(_) => return None,
            }
        }
    }
}

fn incoming(
    frame: TransferFrame,
    page_count: Option<u64>,
    on: &str,
) -> Result<Incoming, LinkError> {
    match (frame, page_count) {
        (TransferFrame::Pages(batch), Some(pages)) => batch
            .into_checked(pages)
            .map(Incoming::Pages)
            .map_err(|e| LinkError::BadBatch(format!("{on}: bad page batch: {e}"))),
        (frame, _) => Ok(Incoming::Frame(frame)),
    }
}

async fn read_stream<R: AsyncRead + Unpin>(
    mut r: R,
    page_count: Option<u64>,
    tx: mpsc::Sender<Item>,
) {
    let mut seq = 0u64;
    let mut buf = Vec::new();
    loop {
        let item = match read_payload(&mut r, MAX_FRAME_LEN, &mut buf).await {
            Ok(Some(payload)) => match decode_payload::<TransferFrame>(payload) {
                Ok(frame) => {
                    seq += 1;
                    incoming(frame, page_count, "stream").map(|f| (seq, f))
                }
                Err(e) => Err(LinkError::Malformed {
                    on: "stream".into(),
                    label: e.label(),
                    detail: e.to_string(),
                }),
            },
            Ok(None) => return,
            Err(e) => Err(LinkError::read("stream", e)),
        };
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            return;
        }
    }
}

async fn read_numbered<R: AsyncRead + Unpin>(
    mut r: R,
    conn: usize,
    page_count: Option<u64>,
    tx: mpsc::Sender<Item>,
    mut delivered: watch::Receiver<u64>,
) {
    let mut last = 0u64;
    let mut scratch = Vec::new();
    let on = format!("data connection {conn}");
    loop {
        let item = match read_data_frame(&mut r, &mut scratch).await {
            Ok(None) => return,
            Err(e) => Err(LinkError::read(&on, e)),
            Ok(Some(DataFrame { seq, .. })) if seq <= last => Err(LinkError::Order(format!(
                "data connection {conn}: frame {seq} after frame {last}"
            ))),
            Ok(Some(DataFrame { seq, frame })) => {
                last = seq;
                incoming(frame, page_count, &on).map(|f| (seq, f))
            }
        };
        if let Ok((seq, _)) = &item {
            let seq = *seq;
            // Hold a frame too far ahead until the frames before it were taken.
            if delivered
                .wait_for(|d| seq <= d.saturating_add(WINDOW))
                .await
                .is_err()
            {
                return;
            }
        }
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            return;
        }
    }
}

/// Both halves of a transfer's link.
#[derive(Debug)]
pub struct Link {
    pub out: Outbound,
    pub inbound: Inbound,
}

impl Link {
    /// The migration's own stream (the fallback). With `page_count`, incoming page batches are
    /// checked as they arrive.
    pub fn stream<S: LinkStream>(stream: S, page_count: Option<u64>) -> Self {
        let (r, w) = tokio::io::split(stream);
        Self {
            out: Outbound::stream(w),
            inbound: Inbound::stream(r, page_count),
        }
    }

    /// The source's side of data connections: frames go out on all of them, the target's
    /// answers come back on the first.
    pub fn data_source<S: LinkStream>(conns: Vec<S>) -> Self {
        let mut writes = Vec::with_capacity(conns.len());
        let mut first_read = None;
        for c in conns {
            let (r, w) = tokio::io::split(c);
            first_read.get_or_insert(r);
            writes.push(w);
        }
        Self {
            out: Outbound::data(writes),
            inbound: Inbound::data(first_read.into_iter().collect(), None),
        }
    }

    /// The target's side of data connections: frames come in on all of them (page batches
    /// checked against `page_count` as they arrive), answers go back on the first.
    pub fn data_target<S: LinkStream>(conns: Vec<S>, page_count: u64) -> Self {
        let mut reads = Vec::with_capacity(conns.len());
        let mut first_write = None;
        for c in conns {
            let (r, w) = tokio::io::split(c);
            first_write.get_or_insert(w);
            reads.push(r);
        }
        Self {
            out: Outbound::data(first_write.into_iter().collect()),
            inbound: Inbound::data(reads, Some(page_count)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use drift_protocol::transfer::{PageBatch, RoundEnd, PAGE_SIZE};

    fn round_end(round: u32) -> TransferFrame {
        TransferFrame::RoundEnd(RoundEnd {
            round,
            pages_sent: u64::from(round),
            dirty: 0,
        })
    }

    fn round_of(i: &Incoming) -> u32 {
        match i {
            Incoming::Frame(TransferFrame::RoundEnd(r)) => r.round,
            Incoming::Pages(b) => b.batch().round,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_over_several_connections_arrive_in_the_order_sent() {
        let mut near = Vec::new();
        let mut far = Vec::new();
        for _ in 0..3 {
            let (a, b) = tokio::io::duplex(1 << 20);
            near.push(a);
            far.push(b);
        }
        let mut out = Outbound::data(near);
        let mut inbound = Inbound::data(far, Some(64));
        let page = vec![7u8; PAGE_SIZE];
        let sender = tokio::spawn(async move {
            for i in 0..200u32 {
                let frame = if i % 3 == 0 {
                    TransferFrame::Pages(PageBatch::build(i, [(u64::from(i % 64), &page[..])]))
                } else {
                    round_end(i)
                };
                out.send(&frame).await.unwrap();
            }
            out.flush().await.unwrap();
            out.shut_down().await;
        });
        for i in 0..200u32 {
            let got = inbound.recv().await.unwrap().unwrap();
            assert_eq!(round_of(&got), i);
            assert_eq!(matches!(got, Incoming::Pages(_)), i % 3 == 0);
        }
        sender.await.unwrap();
        assert!(
            inbound.recv().await.is_none(),
            "a clean end after the last frame"
        );
    }

    /// Writes raw numbered frames on one connection.
    async fn numbered(w: &mut tokio::io::DuplexStream, seq: u64, frame: TransferFrame) {
        let bytes = drift_protocol::codec::encode_frame(&DataFrame { seq, frame });
        w.write_all(&bytes).await.unwrap();
    }

    #[tokio::test]
    async fn numbers_that_repeat_or_go_back_end_the_transfer() {
        // Repeated across two connections.
        let (mut a0, b0) = tokio::io::duplex(1 << 16);
        let (mut a1, b1) = tokio::io::duplex(1 << 16);
        let mut inbound = Inbound::data(vec![b0, b1], None);
        numbered(&mut a0, 2, round_end(0)).await;
        numbered(&mut a1, 2, round_end(0)).await;
        numbered(&mut a0, 1, round_end(0)).await;
        let e = inbound.recv().await.unwrap().unwrap_err();
        assert!(matches!(e, LinkError::Order(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("twice") || e.contains("after frame"), "{e}");

        // Going back on one connection.
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut inbound = Inbound::data(vec![b], None);
        numbered(&mut a, 3, round_end(0)).await;
        numbered(&mut a, 2, round_end(0)).await;
        let e = inbound.recv().await.unwrap().unwrap_err();
        assert_eq!(e.abort_reason(), Some(AbortReason::Protocol));
        assert!(e.to_string().contains("after frame 3"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_frame_is_an_error_and_a_bad_batch_is_caught_by_its_reader() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut inbound = Inbound::data(vec![b], None);
        numbered(&mut a, 2, round_end(1)).await;
        drop(a);
        let e = inbound.recv().await.unwrap().unwrap_err();
        assert_eq!(e.abort_reason(), None, "a cut is not the peer's fault: {e}");
        assert!(e.to_string().contains("frame 1 missing"), "{e}");

        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut inbound = Inbound::data(vec![b], Some(8));
        let page = vec![1u8; PAGE_SIZE];
        let mut batch = PageBatch::build(0, [(3, &page[..])]);
        batch.data[9] ^= 1;
        numbered(&mut a, 1, TransferFrame::Pages(batch)).await;
        let e = inbound.recv().await.unwrap().unwrap_err();
        assert_eq!(e.label(), "bad_batch");
        assert!(e.to_string().contains("bad page batch"), "{e}");
    }

    #[tokio::test]
    async fn frames_that_do_not_decode_are_named_for_what_they_were() {
        let too_large = (MAX_FRAME_LEN as u32 + 1).to_be_bytes().to_vec();
        let mut bad_version = 2u32.to_be_bytes().to_vec();
        bad_version.extend([0xee, 0]);
        let mut undecodable = 3u32.to_be_bytes().to_vec();
        undecodable.extend([drift_protocol::PROTOCOL_VERSION, 0xff, 0xff]);
        let cases: [(&str, Vec<u8>); 4] = [
            // The length alone is judged: no version byte follows, and none is waited for.
            ("empty", vec![0, 0, 0, 0]),
            ("too_large", too_large),
            ("bad_version", bad_version),
            ("undecodable", undecodable),
        ];
        for (label, bytes) in cases {
            for on_data in [false, true] {
                let (mut a, b) = tokio::io::duplex(1 << 16);
                let mut inbound = if on_data {
                    Inbound::data(vec![b], Some(8))
                } else {
                    Inbound::stream(b, Some(8))
                };
                a.write_all(&bytes).await.unwrap();
                let e = tokio::time::timeout(std::time::Duration::from_secs(5), inbound.recv())
                    .await
                    .expect("refused at once, with the stream still open")
                    .unwrap()
                    .unwrap_err();
                assert_eq!(e.label(), label, "{e}");
                assert_eq!(e.abort_reason(), Some(AbortReason::Malformed));
                drop(a);
            }
        }
    }

    #[tokio::test]
    async fn a_connection_far_ahead_waits_and_buffers_stay_bounded() {
        let (mut a0, b0) = tokio::io::duplex(1 << 20);
        let (mut a1, b1) = tokio::io::duplex(1 << 20);
        let mut inbound = Inbound::data(vec![b0, b1], None);
        // Connection 1 runs far ahead; frame 1 comes last on connection 0.
        for seq in 2..=(WINDOW + 40) {
            numbered(&mut a1, seq, round_end(seq as u32)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(inbound.try_recv().is_none(), "frame 1 has not arrived");
        assert!(
            inbound.pending.len() as u64 <= WINDOW,
            "{} frames buffered",
            inbound.pending.len()
        );
        numbered(&mut a0, 1, round_end(1)).await;
        for seq in 1..=(WINDOW + 40) {
            let got = inbound.recv().await.unwrap().unwrap();
            assert_eq!(u64::from(round_of(&got)), seq);
        }
    }
}
