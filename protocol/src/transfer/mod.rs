//! The frames of a live-migration stream, and the memory root.
//!
//! A transfer runs on one libp2p stream (Noise-encrypted, mutually authenticated) between the
//! two parties of an accepted offer. Every frame is bounded by the codec's limit and checked
//! against the limits the target announced before any value from it is used.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source
//!     participant T as target
//!     S->>T: Start {id, offer hash, page size, page count}
//!     loop pre-copy rounds
//!         S->>T: Pages {round, entries, data, blake3}
//!         S->>T: RoundEnd {round, pages sent, dirty}
//!         T->>S: Applied {round}: every page of the round is in the VM
//!     end
//!     Note over S: pause VM (stop-and-copy)
//!     S->>T: Pages (last dirty pages)
//!     S->>T: DeviceState {bytes, blake3}
//!     S->>T: Complete (signed: root over all pages + device state)
//!     Note over T: recompute root, compare, record Commit durably, resume
//!     T->>S: Commit (signed)
//!     Note over S: destroy source copy
//! ```
//!
//! In post-copy the source sends `DeviceState` and `Complete` first; the target resumes and
//! sends `PageRequest`s for pages it lacks while the source pushes the rest.
//!
//! The root binds the target's memory to what the source had at switchover: each page's leaf
//! is its blake3 hash (zero pages have a fixed leaf), leaves hash in groups of 256, and the
//! root hashes the page count, page size, every group in page order and the device-state hash
//! (see [`Leaves`]). Both sides keep leaves and groups up to date as pages move, so the root at
//! the switchover costs little more than the last round's groups.

use serde::{Deserialize, Serialize};

use crate::ids::{Hash, MigrationId};
use crate::migration::Mode;
use crate::signed::{Signable, Signed};
use crate::time::Timestamp;

/// Page size of every drift memory transfer.
pub const PAGE_SIZE: usize = 4096;
/// At most this many pages in one batch (1 MiB of full pages).
pub const MAX_PAGES_PER_BATCH: usize = 256;
/// At most this many bytes of device state.
pub const MAX_DEVICE_STATE: usize = 1024 * 1024;
/// At most this many page numbers in one post-copy request.
pub const MAX_PAGE_REQUEST: usize = 256;

/// One frame of a transfer stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferFrame {
    Start(Start),
    Pages(PageBatch),
    RoundEnd(RoundEnd),
    DeviceState(DeviceState),
    Complete(Signed<Complete>),
    Commit(Signed<Commit>),
    Abort(Abort),
    PageRequest(PageRequest),
    /// Post-copy and hybrid: page ranges the target does not hold the switchover version of.
    /// Sent after the last pre-copy round and before `DeviceState`; may take several frames.
    Stale(StaleRanges),
    /// Target: every page of rounds up to `round` is in the incoming VM. The source waits for
    /// it before it decides on the switchover, so no earlier round's bytes are still on their
    /// way (and in the downtime) when it pauses the VM.
    Applied(Applied),
    /// Target, post-copy, on a recovered link: pages it still lacks (see [`recover`]).
    Missing(MissingRanges),
}

/// See [`TransferFrame::Missing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingRanges {
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_STALE_RANGES>")]
    pub ranges: Vec<(u64, u64)>,
    /// The last of them: every page the target lacks was named.
    pub done: bool,
}

/// See [`TransferFrame::Applied`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub round: u32,
}

/// At most this many ranges in one [`StaleRanges`] frame.
pub const MAX_STALE_RANGES: usize = 16 * 1024;

/// Pages `[start, start + len)` for each range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleRanges {
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_STALE_RANGES>")]
    pub ranges: Vec<(u64, u64)>,
}

/// Opens a transfer for an accepted offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    pub id: MigrationId,
    /// Hash of the accepted `Signed<MigrationOffer>`.
    pub offer: Hash,
    pub mode: Mode,
    pub page_size: u32,
    pub page_count: u64,
    /// 0: every frame after this one follows on this stream. Otherwise they follow on this
    /// many data connections, numbered (see [`crate::dataplane::DataFrame`]); at most what
    /// the target granted.
    pub data_connections: u32,
}

/// How one page travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageKind {
    /// All zero bytes: no data follows.
    Zero,
    /// `PAGE_SIZE` bytes of data follow in the batch's data, in entry order.
    Full,
    /// The page's data follows as one LZ4 block of this many bytes (fewer than `PAGE_SIZE`),
    /// in entry order; it expands to exactly `PAGE_SIZE` bytes. A transport encoding only: the
    /// batch hash and the page's leaf are those of the page itself (see [`packed`]).
    Packed(u16),
}

/// One page of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageEntry {
    pub pfn: u64,
    pub kind: PageKind,
}

/// A batch of pages with their blake3 hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageBatch {
    pub round: u32,
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_PAGES_PER_BATCH>")]
    pub entries: Vec<PageEntry>,
    /// The data of the `Full` entries, concatenated in entry order.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// [`PageBatch::compute_hash`] of the above: over the round, the entries and each page's
    /// leaf, so checking a batch yields the leaves the memory root needs at no extra cost.
    pub hash: Hash,
}

impl std::fmt::Debug for PageBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBatch")
            .field("round", &self.round)
            .field("pages", &self.entries.len())
            .field("data_len", &self.data.len())
            .field("hash", &self.hash)
            .finish()
    }
}

/// What was wrong with a batch or a frame's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("batch of {0} pages exceeds {MAX_PAGES_PER_BATCH}")]
    TooManyPages(usize),
    #[error("page {pfn} is beyond the VM's {page_count} pages")]
    PageOutOfRange { pfn: u64, page_count: u64 },
    #[error("batch data is {got} bytes, its entries need {expected}")]
    DataLength { expected: usize, got: usize },
    #[error("batch hash does not match its contents")]
    BadHash,
    #[error("device state of {0} bytes exceeds {MAX_DEVICE_STATE}")]
    DeviceStateTooLarge(usize),
    #[error("device state hash does not match")]
    BadDeviceHash,
    #[error("page request of {0} pages exceeds {MAX_PAGE_REQUEST}")]
    RequestTooLarge(usize),
    #[error("packed page {pfn} does not expand to one page")]
    BadPacked { pfn: u64 },
    #[error("a batch with packed pages is taken only expanded (PageBatch::into_checked)")]
    Unexpanded,
}

/// Whether `page` is all zeros.
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut words = page.chunks_exact(8);
    let all_words_zero = words
        .by_ref()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("chunk of 8")) == 0);
    all_words_zero && words.remainder().iter().all(|&b| b == 0)
}

impl PageBatch {
    /// Builds a batch from `(pfn, page)` pairs, marking zero pages and computing the hash.
    /// Callers keep batches within [`MAX_PAGES_PER_BATCH`].
    pub fn build<'a>(round: u32, pages: impl IntoIterator<Item = (u64, &'a [u8])>) -> Self {
        let mut entries = Vec::new();
        let mut data = Vec::new();
        for (pfn, page) in pages {
            if is_zero_page(page) {
                entries.push(PageEntry {
                    pfn,
                    kind: PageKind::Zero,
                });
            } else {
                entries.push(PageEntry {
                    pfn,
                    kind: PageKind::Full,
                });
                data.extend_from_slice(page);
            }
        }
        let hash = Self::compute_hash(round, &entries, &data);
        Self {
            round,
            entries,
            data,
            hash,
        }
    }

    /// Builds a batch of pages `pfns` whose contents `fill(pfn, page)` writes straight into the
    /// batch's data (no intermediate copy), marking zero pages; with each entry's leaf. Callers
    /// keep batches within [`MAX_PAGES_PER_BATCH`].
    pub fn build_with(
        round: u32,
        pfns: &[u64],
        fill: impl FnMut(u64, &mut [u8]),
    ) -> (Self, Vec<Hash>) {
        Self::build_into(round, pfns, Vec::new(), fill)
    }

    /// [`PageBatch::build_with`] into `data`, a buffer of an earlier batch (its contents are
    /// overwritten; a buffer as long as the batch needs is used without being cleared).
    pub fn build_into(
        round: u32,
        pfns: &[u64],
        mut data: Vec<u8>,
        mut fill: impl FnMut(u64, &mut [u8]),
    ) -> (Self, Vec<Hash>) {
        // Zero pages are written over and cut off at the end; nothing needs clearing first.
        data.resize(pfns.len() * PAGE_SIZE, 0);
        let mut entries = Vec::with_capacity(pfns.len());
        let mut used = 0;
        for &pfn in pfns {
            let page = &mut data[used..used + PAGE_SIZE];
            fill(pfn, page);
            let kind = if is_zero_page(page) {
                PageKind::Zero
            } else {
                used += PAGE_SIZE;
                PageKind::Full
            };
            entries.push(PageEntry { pfn, kind });
        }
        data.truncate(used);
        let (hash, leaves) = Self::hash_and_leaves(round, &entries, &data);
        (
            Self {
                round,
                entries,
                data,
                hash,
            },
            leaves,
        )
    }

    /// The hash of a batch: blake3 over the round, and for every entry its page number, kind
    /// and leaf ([`page_leaf`] of its data, [`zero_leaf`] for a zero page). `data` must hold
    /// the full pages in entry order (see [`PageBatch::check`] for the length rule).
    pub fn compute_hash(round: u32, entries: &[PageEntry], data: &[u8]) -> Hash {
        Self::hash_and_leaves(round, entries, data).0
    }

    fn hash_and_leaves(round: u32, entries: &[PageEntry], data: &[u8]) -> (Hash, Vec<Hash>) {
        let mut h = blake3::Hasher::new();
        h.update(b"drift/page-batch/v2");
        h.update(&round.to_le_bytes());
        h.update(&(entries.len() as u64).to_le_bytes());
        let mut pages = data.chunks_exact(PAGE_SIZE);
        let mut leaves = Vec::with_capacity(entries.len());
        for e in entries {
            let leaf = match e.kind {
                PageKind::Zero => zero_leaf(),
                PageKind::Full => pages.next().map(page_leaf).unwrap_or(Hash::ZERO),
                // Never hashed packed: batches are hashed before packing and after expanding.
                PageKind::Packed(_) => Hash::ZERO,
            };
            h.update(&e.pfn.to_le_bytes());
            h.update(&[!matches!(e.kind, PageKind::Zero) as u8]);
            h.update(&leaf.0);
            leaves.push(leaf);
        }
        (h.finalize().into(), leaves)
    }

    /// Checks every count, page number and length against the VM's `page_count`, and the hash.
    pub fn check(&self, page_count: u64) -> Result<(), FrameError> {
        self.checked_leaves(page_count).map(|_| ())
    }

    /// [`PageBatch::check`], keeping the result: the only way to make a [`CheckedBatch`].
    /// Packed pages are expanded first: a checked batch holds only zero and full pages.
    pub fn into_checked(self, page_count: u64) -> Result<CheckedBatch, FrameError> {
        let batch = if self.is_packed() {
            self.expand()?
        } else {
            self
        };
        let leaves = batch.checked_leaves(page_count)?;
        Ok(CheckedBatch {
            batch,
            leaves,
            page_count,
        })
    }

    /// [`PageBatch::check`], returning each entry's leaf for the memory root.
    pub fn checked_leaves(&self, page_count: u64) -> Result<Vec<Hash>, FrameError> {
        if self.entries.len() > MAX_PAGES_PER_BATCH {
            return Err(FrameError::TooManyPages(self.entries.len()));
        }
        if self.is_packed() {
            return Err(FrameError::Unexpanded);
        }
        let mut full = 0usize;
        for e in &self.entries {
            if e.pfn >= page_count {
                return Err(FrameError::PageOutOfRange {
                    pfn: e.pfn,
                    page_count,
                });
            }
            full += matches!(e.kind, PageKind::Full) as usize;
        }
        if self.data.len() != full * PAGE_SIZE {
            return Err(FrameError::DataLength {
                expected: full * PAGE_SIZE,
                got: self.data.len(),
            });
        }
        let (hash, leaves) = Self::hash_and_leaves(self.round, &self.entries, &self.data);
        if hash != self.hash {
            return Err(FrameError::BadHash);
        }
        Ok(leaves)
    }

    /// The pages in order: `(pfn, Some(data))` or `(pfn, None)` for a zero page. Only
    /// meaningful after [`PageBatch::check`] (which a packed batch does not pass).
    pub fn pages(&self) -> impl Iterator<Item = (u64, Option<&[u8]>)> + '_ {
        let mut chunks = self.data.chunks_exact(PAGE_SIZE);
        self.entries.iter().map(move |e| match e.kind {
            PageKind::Zero => (e.pfn, None),
            // A packed batch never passes its check; expanded, it holds no packed page.
            PageKind::Full | PageKind::Packed(_) => (e.pfn, chunks.next()),
        })
    }
}

/// A page batch that passed [`PageBatch::check`] against a VM of `page_count` pages, with each
/// entry's leaf. Checking is the costly part of taking a batch (one blake3 pass over its
/// data), so a node checks batches as they arrive, on as many cores as it has connections,
/// and hands the state machine only checked ones.
#[derive(Debug, Clone)]
pub struct CheckedBatch {
    batch: PageBatch,
    leaves: Vec<Hash>,
    page_count: u64,
}

impl CheckedBatch {
    /// The batch.
    pub fn batch(&self) -> &PageBatch {
        &self.batch
    }

    /// Each entry's leaf, in entry order.
    pub fn leaves(&self) -> &[Hash] {
        &self.leaves
    }

    /// The page count the batch was checked against.
    pub fn page_count(&self) -> u64 {
        self.page_count
    }

    /// The batch, its check forgotten (to reuse its buffer).
    pub fn into_batch(self) -> PageBatch {
        self.batch
    }
}

/// The end of one pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundEnd {
    pub round: u32,
    pub pages_sent: u64,
    /// Pages dirtied during the round (what the next round will send).
    pub dirty: u64,
}

/// The VM's device state (vCPU registers, device counters), sent once, at switchover.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    pub hash: Hash,
}

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceState")
            .field("len", &self.bytes.len())
            .field("hash", &self.hash)
            .finish()
    }
}

impl DeviceState {
    /// Wraps device state bytes with their hash.
    pub fn new(bytes: Vec<u8>) -> Self {
        let hash = Hash::of(&bytes);
        Self { bytes, hash }
    }

    /// Checks the size bound and the hash.
    pub fn check(&self) -> Result<(), FrameError> {
        if self.bytes.len() > MAX_DEVICE_STATE {
            return Err(FrameError::DeviceStateTooLarge(self.bytes.len()));
        }
        if Hash::of(&self.bytes) != self.hash {
            return Err(FrameError::BadDeviceHash);
        }
        Ok(())
    }
}

/// The source's signed statement of what the target must now hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    pub id: MigrationId,
    pub offer: Hash,
    /// [`memory_root`] over all pages and the device state.
    pub root: Hash,
    pub page_count: u64,
}

impl Signable for Complete {
    const DOMAIN: &'static str = "drift/transfer-complete/v1";
}

/// The target's signed statement that it verified the root and now owns the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub id: MigrationId,
    pub root: Hash,
    pub committed_at: Timestamp,
}

impl Signable for Commit {
    const DOMAIN: &'static str = "drift/transfer-commit/v1";
}

/// Why a transfer was abandoned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// An operator cancelled it.
    Cancelled,
    /// The sender hit a local error.
    LocalError,
    /// A batch failed its checks.
    BadBatch,
    /// The root or its signature did not verify.
    BadRoot,
    /// A frame broke the protocol (wrong order, wrong ids, out-of-range values).
    Protocol,
    /// A step took too long.
    Timeout,
    /// A party was removed from the roster.
    Revoked,
    /// A frame did not decode (too large, empty, another version, not a frame).
    Malformed,
    /// The migration broke the target's progress deadlines
    /// (see [`deadline`](crate::transfer::deadline)).
    Stalled,
    /// The source gave up: the guest dirties memory faster than the link carries it and the
    /// user's fallback ended in abort (see [`convergence`](crate::transfer::convergence)).
    NotConverging,
}

/// Ends a transfer before switchover; the VM stays on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    pub id: MigrationId,
    pub reason: AbortReason,
}

/// Post-copy: pages the target needs now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRequest {
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_PAGE_REQUEST>")]
    pub pfns: Vec<u64>,
}

impl PageRequest {
    /// Checks the count and every page number.
    pub fn check(&self, page_count: u64) -> Result<(), FrameError> {
        if self.pfns.len() > MAX_PAGE_REQUEST {
            return Err(FrameError::RequestTooLarge(self.pfns.len()));
        }
        if let Some(&pfn) = self.pfns.iter().find(|&&p| p >= page_count) {
            return Err(FrameError::PageOutOfRange { pfn, page_count });
        }
        Ok(())
    }
}

/// The leaf of one page in the memory root: its blake3 hash (an all-zero page hashes to
/// [`zero_leaf`] like any other).
pub fn page_leaf(page: &[u8]) -> Hash {
    if is_zero_page(page) {
        zero_leaf()
    } else {
        Hash::of(page)
    }
}

/// The leaf of an all-zero page (computed once).
pub fn zero_leaf() -> Hash {
    static ZERO: std::sync::OnceLock<Hash> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| Hash::of(&[0u8; PAGE_SIZE]))
}

pub mod convergence;
pub mod deadline;
mod leaves;
pub mod packed;
pub mod receiver;
pub mod recover;
pub mod sender;

pub use leaves::{memory_root, Leaves, LEAF_GROUP};

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    #[test]
    fn batch_marks_zero_pages_and_checks() {
        let (a, z, b) = (page(1), page(0), page(2));
        let batch = PageBatch::build(3, [(0, &a[..]), (5, &z[..]), (9, &b[..])]);
        assert_eq!(batch.data.len(), 2 * PAGE_SIZE);
        assert_eq!(batch.check(10), Ok(()));
        let pages: Vec<_> = batch.pages().collect();
        assert_eq!(pages[0], (0, Some(&a[..])));
        assert_eq!(pages[1], (5, None));
        assert_eq!(pages[2], (9, Some(&b[..])));
        assert_eq!(
            batch.check(9),
            Err(FrameError::PageOutOfRange {
                pfn: 9,
                page_count: 9
            })
        );
        let mut flipped = batch.clone();
        flipped.data[100] ^= 1;
        assert_eq!(flipped.check(10), Err(FrameError::BadHash));
        let mut short = batch.clone();
        short.data.truncate(PAGE_SIZE);
        assert!(matches!(
            short.check(10),
            Err(FrameError::DataLength { .. })
        ));
        let mut moved = batch;
        moved.entries[0].pfn = 1;
        assert_eq!(moved.check(10), Err(FrameError::BadHash));
    }

    #[test]
    fn a_batch_filled_in_place_equals_one_built_from_pages() {
        let pages = [page(1), page(0), page(3), page(0)];
        let pfns = [4u64, 9, 2, 7];
        let from_pages =
            PageBatch::build(2, pfns.iter().copied().zip(pages.iter().map(|p| &p[..])));
        let (filled, leaves) = PageBatch::build_with(2, &pfns, |pfn, out| {
            let i = pfns.iter().position(|&p| p == pfn).unwrap_or(0);
            out.copy_from_slice(&pages[i]);
        });
        assert_eq!(filled, from_pages);
        assert_eq!(leaves, from_pages.checked_leaves(10).unwrap());
        assert_eq!(filled.data.len(), 2 * PAGE_SIZE);
    }

    #[test]
    fn root_depends_on_every_leaf_and_device_state() {
        let leaves = vec![
            page_leaf(&page(1)),
            page_leaf(&page(0)),
            page_leaf(&page(3)),
        ];
        let dev = Hash::of(b"regs");
        let root = memory_root(&leaves, &dev);
        assert_eq!(leaves[1], zero_leaf());
        let mut other = leaves.clone();
        other.swap(0, 2);
        assert_ne!(memory_root(&other, &dev), root);
        assert_ne!(memory_root(&leaves, &Hash::of(b"regs!")), root);
        assert_ne!(memory_root(&leaves[..2], &dev), root);
    }

    #[test]
    fn device_state_and_requests_are_bounded() {
        let d = DeviceState::new(vec![1, 2, 3]);
        assert_eq!(d.check(), Ok(()));
        let mut bad = d.clone();
        bad.bytes[0] = 9;
        assert_eq!(bad.check(), Err(FrameError::BadDeviceHash));
        assert_eq!(
            DeviceState::new(vec![0; MAX_DEVICE_STATE + 1]).check(),
            Err(FrameError::DeviceStateTooLarge(MAX_DEVICE_STATE + 1))
        );
        let req = PageRequest {
            pfns: vec![1, 2, 99],
        };
        assert_eq!(
            req.check(50),
            Err(FrameError::PageOutOfRange {
                pfn: 99,
                page_count: 50
            })
        );
        let big = PageRequest {
            pfns: vec![0; MAX_PAGE_REQUEST + 1],
        };
        assert!(matches!(big.check(10), Err(FrameError::RequestTooLarge(_))));
    }
}
