//! A sandbox guest's memory, shared between its VMM and its node.
//!
//! The VMM keeps the guest's pages in a memfd and two bitmaps in a second one: the dirty log
//! (a bit per page the guest wrote since the bit was taken) and the missing set (a bit per page
//! that has not arrived yet, on a post-copy target). It hands both to its node over the VMM
//! socket (`SCM_RIGHTS`), so the node reads and writes pages and takes dirty bits directly: no
//! page crosses the socket, as no page crosses QEMU's when libvirt migrates.
//!
//! The memory is mapped with rust-vmm's `vm-memory`, whose volatile slices make a mapping that
//! another process writes at the same time sound to access from Rust, at memcpy speed, and
//! whose atomic references give the bitmaps' atomics with bounds and alignment checked: drift
//! needs no `unsafe` of its own for any of it. Both memfds are sealed against resizing before
//! they are shared, so neither side can pull a mapped page out from under the other.
//!
//! Orderings: the guest writes a page, then sets its dirty bit (`Release`); the node takes a
//! word of bits (`AcqRel` swap), then reads those pages. A page the guest rewrites while the
//! node reads it is torn in the copy, but its bit is set again after the write, so the next
//! round sends it again; the last round runs with the guest paused. A post-copy target writes a
//! page, then clears its missing bit (`Release`); the guest touches a page only after it saw the
//! bit clear (`Acquire`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drift_protocol::codec::{decode_payload, encode_frame, parse_header, HEADER_LEN};
use drift_protocol::transfer::PAGE_SIZE;
use rustix::fs::{MemfdFlags, SealFlags};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

use super::vmm::{Request, Response};

/// Why shared memory could not be made or mapped.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("memfd: {0}")]
    Io(#[from] std::io::Error),
    #[error("memfd: {0}")]
    Os(#[from] rustix::io::Errno),
    #[error("mapping: {0}")]
    Map(String),
    #[error("shared memory of {got} bytes, expected {expected}")]
    Size { expected: u64, got: u64 },
    #[error("shared memory is not sealed against resizing")]
    NotSealed,
    #[error("page {pfn} is beyond the memory's {pages} pages")]
    OutOfRange { pfn: u64, pages: u64 },
}

/// Bytes of bitmap words for `pages` pages: the dirty log, then the missing set.
fn meta_len(pages: u64) -> u64 {
    2 * pages.div_ceil(64) * 8
}

/// The guest memory and bitmaps of one sandbox VM, mapped in this process.
#[derive(Debug)]
pub struct SharedMemory {
    pages: u64,
    words: usize,
    guest: MmapRegion,
    meta: MmapRegion,
    /// The memfds, kept to pass them on.
    files: [File; 2],
}

fn memfd(name: &str, len: u64) -> Result<File, SharedError> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let file = File::from(fd);
    file.set_len(len)?;
    rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(file)
}

fn map(file: &File, len: u64) -> Result<MmapRegion, SharedError> {
    let got = file.metadata()?.len();
    if got != len {
        return Err(SharedError::Size { expected: len, got });
    }
    let seals = rustix::fs::fcntl_get_seals(file)?;
    if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
        return Err(SharedError::NotSealed);
    }
    let len = usize::try_from(len).map_err(|_| SharedError::Map("too large".into()))?;
    MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), len)
        .map_err(|e| SharedError::Map(e.to_string()))
}

impl SharedMemory {
    /// New, zeroed memory of `pages` pages (the VMM's side).
    pub fn create(pages: u64) -> Result<Self, SharedError> {
        let guest = memfd("drift-guest", pages * PAGE_SIZE as u64)?;
        let meta = memfd("drift-guest-log", meta_len(pages))?;
        Self::from_files(guest, meta, pages)
    }

    /// Maps memory another process created (the node's side), checking its sizes and seals.
    pub fn from_fds(guest: OwnedFd, meta: OwnedFd, pages: u64) -> Result<Self, SharedError> {
        Self::from_files(File::from(guest), File::from(meta), pages)
    }

    fn from_files(guest: File, meta: File, pages: u64) -> Result<Self, SharedError> {
        let g = map(&guest, pages * PAGE_SIZE as u64)?;
        let m = map(&meta, meta_len(pages))?;
        Ok(Self {
            pages,
            words: pages.div_ceil(64) as usize,
            guest: g,
            meta: m,
            files: [guest, meta],
        })
    }

    /// The memfds to pass to another process: guest pages, then bitmaps.
    pub fn fds(&self) -> [BorrowedFd<'_>; 2] {
        [self.files[0].as_fd(), self.files[1].as_fd()]
    }

    /// Pages of memory.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    fn page(&self, pfn: u64) -> Result<VolatileSlice<'_>, SharedError> {
        let out_of_range = SharedError::OutOfRange {
            pfn,
            pages: self.pages,
        };
        if pfn >= self.pages {
            return Err(out_of_range);
        }
        self.guest
            .get_slice(pfn as usize * PAGE_SIZE, PAGE_SIZE)
            .map_err(|_| out_of_range)
    }

    /// Copies page `pfn` into `out` (at least `PAGE_SIZE` bytes).
    pub fn read_page(&self, pfn: u64, out: &mut [u8]) -> Result<(), SharedError> {
        self.page(pfn)?.copy_to(&mut out[..PAGE_SIZE]);
        Ok(())
    }

    /// Page `pfn` as an array (zeros beyond the memory).
    pub fn page_copy(&self, pfn: u64) -> Box<[u8; PAGE_SIZE]> {
        let mut out = Box::new([0u8; PAGE_SIZE]);
        let _ = self.read_page(pfn, &mut out[..]);
        out
    }

    /// Writes page `pfn` (`PAGE_SIZE` bytes; `None`: zeros).
    pub fn write_page(&self, pfn: u64, data: Option<&[u8]>) -> Result<(), SharedError> {
        static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        self.page(pfn)?
            .copy_from(&data.unwrap_or(&ZERO)[..PAGE_SIZE]);
        Ok(())
    }

    /// A bitmap word; `None` beyond the memory.
    fn word(&self, bitmap: usize, w: usize) -> Option<&AtomicU64> {
        if w >= self.words {
            return None;
        }
        self.meta
            .get_atomic_ref::<AtomicU64>((bitmap * self.words + w) * 8)
            .ok()
    }

    fn bit(pfn: u64) -> (usize, u64) {
        ((pfn / 64) as usize, 1u64 << (pfn % 64))
    }

    /// The guest wrote page `pfn` (ignored beyond the memory).
    pub fn mark_dirty(&self, pfn: u64) {
        let (w, bit) = Self::bit(pfn);
        if let Some(word) = self.word(0, w) {
            word.fetch_or(bit, Ordering::Release);
        }
    }

    /// Empties the dirty log.
    pub fn clear_dirty(&self) {
        for word in (0..self.words).filter_map(|w| self.word(0, w)) {
            word.store(0, Ordering::Release);
        }
    }

    /// Takes up to `max` dirty pages (lowest first), with how many are still dirty.
    pub fn take_dirty(&self, max: usize) -> (Vec<u64>, u64) {
        let mut out = Vec::new();
        let mut left = 0u64;
        for w in 0..self.words {
            let Some(word) = self.word(0, w) else { break };
            if out.len() >= max {
                left += u64::from(word.load(Ordering::Acquire).count_ones());
                continue;
            }
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                if out.len() >= max {
                    // Put back what does not fit.
                    word.fetch_or(bits, Ordering::AcqRel);
                    left += u64::from(bits.count_ones());
                    break;
                }
                out.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        (out, left)
    }

    /// Post-copy target: page `pfn` has not arrived (ignored beyond the memory).
    pub fn mark_missing(&self, pfn: u64) {
        let (w, bit) = Self::bit(pfn);
        if let Some(word) = self.word(1, w) {
            word.fetch_or(bit, Ordering::Release);
        }
    }

    /// Post-copy target: pages `start..end` have not arrived (a word at a time; clipped to
    /// the memory).
    pub fn mark_missing_range(&self, start: u64, end: u64) {
        let end = end.min(self.pages);
        let mut p = start;
        while p < end {
            let (w, first) = Self::bit(p);
            let n = (64 - p % 64).min(end - p);
            let bits = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) * first
            };
            if let Some(word) = self.word(1, w) {
                word.fetch_or(bits, Ordering::Release);
            }
            p += n;
        }
    }

    /// Page `pfn` arrived (written before this).
    pub fn clear_missing(&self, pfn: u64) {
        let (w, bit) = Self::bit(pfn);
        if let Some(word) = self.word(1, w) {
            word.fetch_and(!bit, Ordering::Release);
        }
    }

    /// Whether page `pfn` has not arrived.
    pub fn is_missing(&self, pfn: u64) -> bool {
        let (w, bit) = Self::bit(pfn);
        self.word(1, w)
            .is_some_and(|word| word.load(Ordering::Acquire) & bit != 0)
    }

    /// How many pages have not arrived.
    pub fn missing_count(&self) -> u64 {
        (0..self.words)
            .filter_map(|w| self.word(1, w))
            .map(|word| u64::from(word.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

/// Writes `frame` on `stream` with `fds` attached (`SCM_RIGHTS`) to its first byte.
pub fn send_with_fds(
    stream: &UnixStream,
    fds: &[BorrowedFd<'_>],
    frame: &[u8],
) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let Some((first, rest)) = frame.split_first() else {
        return Ok(());
    };
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if fds.len() > 2 || !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("no room for the file descriptors"));
    }
    let sent = sendmsg(
        stream,
        &[std::io::IoSlice::new(std::slice::from_ref(first))],
        &mut ancillary,
        SendFlags::empty(),
    )?;
    if sent != 1 {
        return Err(std::io::Error::other("the message did not start"));
    }
    (&*stream).write_all(rest)
}

/// Asks the VMM at `socket` for its guest memory and maps it (blocking: run it off the async
/// workers).
pub fn request(socket: &Path) -> Result<SharedMemory, SharedError> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&encode_frame(&Request::Share))?;
    let mut header = [0u8; HEADER_LEN];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        &stream,
        &mut [std::io::IoSliceMut::new(&mut header[..1])],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if got.bytes != 1 {
        return Err(SharedError::Map("the VMM closed the connection".into()));
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    stream.read_exact(&mut header[1..])?;
    let len = parse_header(header, 64).map_err(|e| SharedError::Map(e.to_string()))?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    let pages = match decode_payload::<Response>(&payload) {
        Ok(Response::Shared { pages }) => pages,
        Ok(other) => return Err(SharedError::Map(format!("the VMM answered {other:?}"))),
        Err(e) => return Err(SharedError::Map(e.to_string())),
    };
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next(), fds.next()) {
        (Some(guest), Some(meta), None) => SharedMemory::from_fds(guest, meta, pages),
        _ => Err(SharedError::Map("the VMM sent no memory".into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn two_mappings_see_the_same_pages_and_bits() {
        let vmm = SharedMemory::create(200).unwrap();
        let [g, m] = vmm.fds();
        let node = SharedMemory::from_fds(
            g.try_clone_to_owned().unwrap(),
            m.try_clone_to_owned().unwrap(),
            200,
        )
        .unwrap();
        let page = vec![0xabu8; PAGE_SIZE];
        vmm.write_page(7, Some(&page)).unwrap();
        vmm.mark_dirty(7);
        vmm.mark_dirty(130);
        vmm.mark_dirty(199);
        assert_eq!(&node.page_copy(7)[..], &page[..]);
        assert_eq!(node.take_dirty(2), (vec![7, 130], 1));
        assert_eq!(node.take_dirty(10), (vec![199], 0));
        assert_eq!(vmm.take_dirty(10), (vec![], 0));

        node.mark_missing(64);
        assert!(vmm.is_missing(64));
        assert_eq!(vmm.missing_count(), 1);
        node.mark_missing_range(60, 140);
        assert_eq!(vmm.missing_count(), 80);
        assert!(vmm.is_missing(60) && vmm.is_missing(139) && !vmm.is_missing(140));
        node.mark_missing_range(190, 1000);
        assert_eq!(vmm.missing_count(), 90);
        for p in (60..140).chain(190..200).filter(|&p| p != 64) {
            node.clear_missing(p);
        }
        node.write_page(64, None).unwrap();
        assert!(matches!(
            node.write_page(200, None),
            Err(SharedError::OutOfRange {
                pfn: 200,
                pages: 200
            })
        ));
        node.clear_missing(64);
        assert!(!vmm.is_missing(64));
        assert_eq!(vmm.page_copy(64)[..], [0u8; PAGE_SIZE][..]);
    }

    #[test]
    fn memory_of_another_size_or_unsealed_is_refused() {
        let vmm = SharedMemory::create(64).unwrap();
        let [g, m] = vmm.fds();
        let wrong = SharedMemory::from_fds(
            g.try_clone_to_owned().unwrap(),
            m.try_clone_to_owned().unwrap(),
            65,
        );
        assert!(matches!(wrong, Err(SharedError::Size { .. })), "{wrong:?}");
        let plain = rustix::fs::memfd_create("plain", MemfdFlags::CLOEXEC).unwrap();
        let plain = File::from(plain);
        plain.set_len(64 * PAGE_SIZE as u64).unwrap();
        let unsealed = SharedMemory::from_fds(plain.into(), m.try_clone_to_owned().unwrap(), 64);
        assert!(
            matches!(unsealed, Err(SharedError::NotSealed)),
            "{unsealed:?}"
        );
    }
}
