//! Packed pages: a page batch's data compressed page by page, where it pays.
//!
//! A migration may ask for it (`compress`): the source packs each batch before it goes out,
//! each full page as one LZ4 block ([`PageKind::Packed`]) when that saves at least an eighth of
//! the page, and as it is otherwise; zero pages are markers already. Packing is a transport
//! encoding only: the batch hash covers every page's number, whether it is zero, and the blake3
//! leaf of its *expanded* contents, so the hash is computed before packing and checked after
//! expanding, and a packed page that expands to anything but the page the source read fails the
//! batch like any altered byte. The target expands a batch ([`PageBatch::expand`], done by
//! [`PageBatch::into_checked`]) before anything else reads it: what the state machine and the
//! VM see is the same with or without packing.
//!
//! LZ4 (the block format, through `lz4_flex`, pure Rust) because a migration is bound by the
//! link and the cores at once: it compresses at several hundred MB/s a core and expands at
//! GB/s, and gives up quickly on pages of random bytes. Pages are packed one by one, so a
//! page's block is bounded by the page (an expansion never writes past its 4 KiB) and a batch
//! can mix packed and full pages.

use super::{FrameError, PageBatch, PageEntry, PageKind, MAX_PAGES_PER_BATCH, PAGE_SIZE};

/// A page is sent packed only when its block is at most this long (7/8 of a page).
pub const PACK_WORTH: usize = PAGE_SIZE - PAGE_SIZE / 8;

/// What packing one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Full pages looked at.
    pub pages: u64,
    /// Of them, sent packed.
    pub packed: u64,
    /// Data bytes before and after.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl PageBatch {
    /// Whether any page of the batch travels packed.
    pub fn is_packed(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.kind, PageKind::Packed(_)))
    }

    /// Packs every full page whose LZ4 block saves at least an eighth of it. The hash stays
    /// (it is over the pages themselves). `scratch` is a buffer kept between calls.
    pub fn pack(&mut self, scratch: &mut Vec<u8>) -> PackStats {
        let mut stats = PackStats {
            bytes_in: self.data.len() as u64,
            ..PackStats::default()
        };
        scratch.clear();
        let mut block = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)];
        let mut pages = self.data.chunks_exact(PAGE_SIZE);
        for e in &mut self.entries {
            if !matches!(e.kind, PageKind::Full) {
                continue;
            }
            let Some(page) = pages.next() else { break };
            stats.pages += 1;
            match lz4_flex::block::compress_into(page, &mut block) {
                Ok(n) if n > 0 && n <= PACK_WORTH => {
                    e.kind = PageKind::Packed(n as u16);
                    scratch.extend_from_slice(&block[..n]);
                    stats.packed += 1;
                }
                _ => scratch.extend_from_slice(page),
            }
        }
        if stats.packed > 0 {
            std::mem::swap(&mut self.data, scratch);
        }
        stats.bytes_out = self.data.len() as u64;
        stats
    }

    /// The batch with every packed page expanded into a full page (the hash is kept, to be
    /// checked next). Errors: a length that does not fit the data, or a block that does not
    /// expand to exactly one page.
    pub fn expand(self) -> Result<PageBatch, FrameError> {
        if self.entries.len() > MAX_PAGES_PER_BATCH {
            return Err(FrameError::TooManyPages(self.entries.len()));
        }
        let mut expected = 0usize;
        let mut full = 0usize;
        for e in &self.entries {
            match e.kind {
                PageKind::Zero => {}
                PageKind::Full => {
                    expected += PAGE_SIZE;
                    full += 1;
                }
                PageKind::Packed(n) => {
                    if n == 0 || n as usize >= PAGE_SIZE {
                        return Err(FrameError::BadPacked { pfn: e.pfn });
                    }
                    expected += n as usize;
                    full += 1;
                }
            }
        }
        if self.data.len() != expected {
            return Err(FrameError::DataLength {
                expected,
                got: self.data.len(),
            });
        }
        let mut data = vec![0u8; full * PAGE_SIZE];
        let mut entries = Vec::with_capacity(self.entries.len());
        let (mut from, mut to) = (0usize, 0usize);
        for e in &self.entries {
            let kind = match e.kind {
                PageKind::Zero => PageKind::Zero,
                PageKind::Full => {
                    data[to..to + PAGE_SIZE].copy_from_slice(&self.data[from..from + PAGE_SIZE]);
                    from += PAGE_SIZE;
                    to += PAGE_SIZE;
                    PageKind::Full
                }
                PageKind::Packed(n) => {
                    let block = &self.data[from..from + n as usize];
                    let out = &mut data[to..to + PAGE_SIZE];
                    match lz4_flex::block::decompress_into(block, out) {
                        Ok(PAGE_SIZE) => {}
                        _ => return Err(FrameError::BadPacked { pfn: e.pfn }),
                    }
                    from += n as usize;
                    to += PAGE_SIZE;
                    PageKind::Full
                }
            };
            entries.push(PageEntry { pfn: e.pfn, kind });
        }
        Ok(PageBatch {
            round: self.round,
            entries,
            data,
            hash: self.hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Hash;

    /// A page of `random` pseudo-random bytes, then a repeated text.
    fn page(seed: u64, random: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut p: Vec<u8> = (0..random)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let text = b"drift moves virtual machines; ";
        while p.len() < PAGE_SIZE {
            p.push(text[p.len() % text.len()]);
        }
        p
    }

    fn batch(pages: &[Vec<u8>]) -> PageBatch {
        PageBatch::build(
            3,
            pages
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64 * 3, p.as_slice())),
        )
    }

    #[test]
    fn packing_saves_bytes_where_it_pays_and_expands_to_the_same_batch() {
        let pages = vec![
            page(1, PAGE_SIZE), // random: stays full
            page(2, 512),       // mostly text: packed
            vec![0; PAGE_SIZE], // zero: a marker already
            page(3, 0),         // all text: packed small
        ];
        let plain = batch(&pages);
        let mut packed = plain.clone();
        let stats = packed.pack(&mut Vec::new());
        assert_eq!((stats.pages, stats.packed), (3, 2));
        assert!(stats.bytes_out < stats.bytes_in / 2, "{stats:?}");
        assert_eq!(packed.data.len() as u64, stats.bytes_out);
        assert!(packed.is_packed());
        assert_eq!(packed.hash, plain.hash);
        // Taken only expanded, and then it is the batch that was packed.
        assert_eq!(packed.check(64), Err(FrameError::Unexpanded));
        let checked = packed.clone().into_checked(64).unwrap();
        assert_eq!(checked.batch(), &plain);
        assert_eq!(checked.leaves(), plain.checked_leaves(64).unwrap());
    }

    #[test]
    fn a_batch_of_random_pages_is_left_as_it_was() {
        let plain = batch(&[page(7, PAGE_SIZE), page(8, PAGE_SIZE)]);
        let mut same = plain.clone();
        let stats = same.pack(&mut Vec::new());
        assert_eq!(stats.packed, 0);
        assert_eq!(same, plain);
    }

    #[test]
    fn an_altered_packed_page_fails_its_batch() {
        let mut packed = batch(&[page(2, 256), page(4, 0)]);
        packed.pack(&mut Vec::new());
        // A literal byte inside the first block: it still expands, to another page.
        let mut altered = packed.clone();
        altered.data[20] ^= 1;
        match altered.into_checked(64) {
            Err(FrameError::BadHash | FrameError::BadPacked { .. }) => {}
            other => panic!("an altered packed page was taken: {other:?}"),
        }
        // Lengths that do not fit the data.
        let mut short = packed.clone();
        short.data.pop();
        assert!(matches!(
            short.into_checked(64),
            Err(FrameError::DataLength { .. })
        ));
        let mut zero_len = packed.clone();
        zero_len.entries[0].kind = PageKind::Packed(0);
        assert_eq!(
            zero_len.into_checked(64).unwrap_err(),
            FrameError::BadPacked { pfn: 0 }
        );
        let mut too_long = packed;
        too_long.entries[1].kind = PageKind::Packed(PAGE_SIZE as u16);
        assert_eq!(
            too_long.into_checked(64).unwrap_err(),
            FrameError::BadPacked { pfn: 3 }
        );
    }

    #[test]
    fn a_block_that_expands_short_or_long_is_refused() {
        // A valid LZ4 block of half a page claimed as a page.
        let half = lz4_flex::block::compress(&page(5, 0)[..PAGE_SIZE / 2]);
        let b = PageBatch {
            round: 0,
            entries: vec![PageEntry {
                pfn: 9,
                kind: PageKind::Packed(half.len() as u16),
            }],
            data: half,
            hash: Hash::ZERO,
        };
        assert_eq!(b.expand().unwrap_err(), FrameError::BadPacked { pfn: 9 });
        // Garbage where a block should be.
        let b = PageBatch {
            round: 0,
            entries: vec![PageEntry {
                pfn: 2,
                kind: PageKind::Packed(64),
            }],
            data: vec![0xff; 64],
            hash: Hash::ZERO,
        };
        assert_eq!(b.expand().unwrap_err(), FrameError::BadPacked { pfn: 2 });
    }
}
