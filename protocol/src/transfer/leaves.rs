//! The leaves of a VM's memory and its root, kept so that the root at the switchover costs in
//! proportion to the pages that changed since the last refresh, not to the memory.
//!
//! ```text
//! leaf(p)   = blake3(page p)                  (zero_leaf() for an all-zero page)
//! group(i)  = blake3(leaf(256 i) || .. || leaf(256 i + 255))     (the last group may be short)
//! root      = blake3("drift/memory-root/v2" || pages (u64 LE) || PAGE_SIZE (u64 LE)
//!                    || group(0) || .. || group(n) || device-state hash)
//! ```
//!
//! Both sides keep every page's newest leaf as pages move ([`Leaves::set`]) and recompute the
//! groups that changed between rounds, while the VM still runs ([`Leaves::refresh`]); the root
//! then hashes only the last round's groups and one 32-byte value per 256 pages. A 1 GiB VM
//! has 262,144 leaves: hashing all of them again while it is paused would cost milliseconds on
//! each side, growing with the memory.

use crate::ids::Hash;

use super::{zero_leaf, PAGE_SIZE};

/// Leaves per group.
pub const LEAF_GROUP: usize = 256;

fn group_hash(leaves: &[Hash]) -> Hash {
    let mut bytes = [0u8; LEAF_GROUP * 32];
    for (slot, leaf) in bytes.chunks_exact_mut(32).zip(leaves) {
        slot.copy_from_slice(&leaf.0);
    }
    Hash::of(&bytes[..leaves.len() * 32])
}

fn fold(page_count: u64, groups: &[Hash], device: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"drift/memory-root/v2");
    h.update(&page_count.to_le_bytes());
    h.update(&(PAGE_SIZE as u64).to_le_bytes());
    let mut piece = [0u8; LEAF_GROUP * 32];
    for chunk in groups.chunks(LEAF_GROUP) {
        for (slot, g) in piece.chunks_exact_mut(32).zip(chunk) {
            slot.copy_from_slice(&g.0);
        }
        h.update(&piece[..chunk.len() * 32]);
    }
    h.update(&device.0);
    h.finalize().into()
}

/// The root over every page's leaf, in page order, and the device state's hash (the
/// definition; [`Leaves`] keeps the same root up to date).
pub fn memory_root(leaves: &[Hash], device: &Hash) -> Hash {
    let groups: Vec<Hash> = leaves.chunks(LEAF_GROUP).map(group_hash).collect();
    fold(leaves.len() as u64, &groups, device)
}

/// Every page's leaf and the group hashes, with the groups changed since the last refresh.
#[derive(Debug, Clone)]
pub struct Leaves {
    leaves: Vec<Hash>,
    groups: Vec<Hash>,
    /// Bit `i`: group `i` changed since it was last hashed.
    stale: Vec<u64>,
}

impl Leaves {
    /// The leaves of an all-zero memory of `page_count` pages. Sizes its tables by the page
    /// count (32 bytes a page): callers bound it first.
    pub fn new(page_count: u64) -> Self {
        let leaves = vec![zero_leaf(); page_count as usize];
        let full = group_hash(&[zero_leaf(); LEAF_GROUP]);
        let mut groups = vec![full; leaves.len().div_ceil(LEAF_GROUP)];
        if let (Some(last), Some(tail)) = (groups.last_mut(), leaves.chunks(LEAF_GROUP).last()) {
            *last = group_hash(tail);
        }
        let stale = vec![0u64; groups.len().div_ceil(64)];
        Self {
            leaves,
            groups,
            stale,
        }
    }

    /// Pages.
    pub fn len(&self) -> u64 {
        self.leaves.len() as u64
    }

    /// Whether there are no pages.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// The leaf of page `pfn` (`pfn` must be within the memory).
    pub fn get(&self, pfn: u64) -> Hash {
        self.leaves[pfn as usize]
    }

    /// Page `pfn` now has `leaf` (`pfn` must be within the memory: callers check page numbers
    /// against the memory before anything else).
    pub fn set(&mut self, pfn: u64, leaf: Hash) {
        let p = pfn as usize;
        if self.leaves[p] != leaf {
            self.leaves[p] = leaf;
            let g = p / LEAF_GROUP;
            self.stale[g / 64] |= 1 << (g % 64);
        }
    }

    /// Hashes the groups that changed since the last refresh.
    pub fn refresh(&mut self) {
        for w in 0..self.stale.len() {
            let mut bits = std::mem::take(&mut self.stale[w]);
            while bits != 0 {
                let g = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let end = ((g + 1) * LEAF_GROUP).min(self.leaves.len());
                self.groups[g] = group_hash(&self.leaves[g * LEAF_GROUP..end]);
            }
        }
    }

    /// The memory root with the device state `device` ([`memory_root`] of these leaves).
    pub fn root(&mut self, device: &Hash) -> Hash {
        self.refresh();
        fold(self.leaves.len() as u64, &self.groups, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_leaves_give_the_root_of_all_leaves_whenever_they_are_refreshed() {
        for pages in [0u64, 1, 255, 256, 257, 1000, 70_000] {
            let mut kept = Leaves::new(pages);
            let mut all = vec![zero_leaf(); pages as usize];
            let dev = Hash::of(b"regs");
            assert_eq!(kept.root(&dev), memory_root(&all, &dev), "{pages} pages");
            for (i, pfn) in (0..pages).step_by(97).enumerate() {
                let leaf = Hash::of(&pfn.to_le_bytes());
                kept.set(pfn, leaf);
                all[pfn as usize] = leaf;
                if i % 5 == 0 {
                    kept.refresh();
                }
            }
            assert_eq!(kept.root(&dev), memory_root(&all, &dev), "{pages} pages");
            assert_ne!(kept.root(&Hash::of(b"other")), memory_root(&all, &dev));
        }
    }

    #[test]
    fn every_leaf_and_its_place_count() {
        let mut leaves: Vec<Hash> = (0..600u32).map(|i| Hash::of(&i.to_le_bytes())).collect();
        let dev = Hash::of(b"d");
        let root = memory_root(&leaves, &dev);
        leaves.swap(10, 300);
        assert_ne!(memory_root(&leaves, &dev), root);
        leaves.swap(10, 300);
        leaves.pop();
        assert_ne!(memory_root(&leaves, &dev), root);
    }
}
