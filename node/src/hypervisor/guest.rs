//! The sandbox guest: memory of 4 KiB pages that a workload rewrites, in a form that can be
//! checked page by page.
//!
//! Every page the workload writes holds a header (`pfn`, `generation`, `checksum`) and a body
//! of pseudo-random bytes derived from the VM's seed, the page number and the generation. A
//! page verifies when it is all zero (never written) or when its header names its own page
//! number and its checksum matches the body. A page that moved to the wrong place, was cut,
//! mixed with another or altered by a single bit fails. Page 1 holds a canary string instead
//! (the workload never writes it), so tests can look for guest memory on the wire.

use drift_protocol::transfer::PAGE_SIZE;

use super::shared::{SharedError, SharedMemory};

/// The page holding the canary.
pub const CANARY_PFN: u64 = 1;
/// The canary text at the start of page 1, followed by the VM's seed in hex.
pub const CANARY: &[u8] = b"DRIFT-GUEST-CANARY:plaintext-guest-memory-must-never-cross-the-wire:";

const HEADER: usize = 24;

/// splitmix64: a tiny, fast, well-mixed generator for page bodies and page choice.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn checksum(body: &[u8]) -> u64 {
    body.chunks_exact(8)
        .fold(0xcbf2_9ce4_8422_2325u64, |acc, w| {
            (acc ^ u64::from_le_bytes(w.try_into().expect("chunk of 8")))
                .wrapping_mul(0x100_0000_01b3)
        })
}

/// Fills `page` as generation `gen` of page `pfn` of a VM seeded `seed`.
pub fn write_page(page: &mut [u8], seed: u64, pfn: u64, gen: u64) {
    write_page_mixed(page, seed, pfn, gen, 100);
}

/// What fills the part of a page body that is not random: memory of real guests holds text,
/// code and tables that compress, where random bytes do not.
const TEXT: &[u8] = b"drift sandbox guest page, generation and body follow; ";

/// [`write_page`] with only `random_pct` percent of the body random (from its start) and the
/// rest a repeated text, as memory that compresses.
pub fn write_page_mixed(page: &mut [u8], seed: u64, pfn: u64, gen: u64, random_pct: u8) {
    let mut rng = SplitMix(seed ^ pfn.rotate_left(17) ^ gen.rotate_left(41));
    let body = &mut page[HEADER..];
    let random = (body.len() * usize::from(random_pct.min(100)) / 100) & !7;
    let (noise, text) = body.split_at_mut(random);
    for w in noise.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    for (i, b) in text.iter_mut().enumerate() {
        *b = TEXT[(i + gen as usize) % TEXT.len()];
    }
    let sum = checksum(&page[HEADER..]);
    page[..8].copy_from_slice(&pfn.to_le_bytes());
    page[8..16].copy_from_slice(&gen.to_le_bytes());
    page[16..24].copy_from_slice(&sum.to_le_bytes());
}

/// The generation of a page (0 for a page never written).
pub fn generation(page: &[u8]) -> u64 {
    u64::from_le_bytes(page[8..16].try_into().expect("page header"))
}

/// Whether `page` is a valid page `pfn`.
pub fn verify_page(page: &[u8], pfn: u64) -> bool {
    if pfn == CANARY_PFN {
        return page.iter().all(|&b| b == 0) || page.starts_with(CANARY);
    }
    if page.iter().all(|&b| b == 0) {
        return true;
    }
    let header_pfn = u64::from_le_bytes(page[..8].try_into().expect("page header"));
    let sum = u64::from_le_bytes(page[16..24].try_into().expect("page header"));
    header_pfn == pfn && sum == checksum(&page[HEADER..])
}

/// The canary page of a VM seeded `seed`.
pub fn canary_page(seed: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    let text = format!("{}{seed:016x}", String::from_utf8_lossy(CANARY));
    page[..text.len()].copy_from_slice(text.as_bytes());
    page
}

/// A guest's memory, with the dirty log (pages the guest wrote since the log was last read)
/// and, for a post-copy target, the pages that have not arrived yet; all of it in memory the
/// VMM shares with its node ([`SharedMemory`]).
#[derive(Debug)]
pub struct Memory {
    shared: SharedMemory,
    seed: u64,
    /// Percent of each page body the workload writes random (see [`write_page_mixed`]).
    random_pct: u8,
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub pages: u64,
    pub written: u64,
    /// Up to 16 bad page numbers.
    pub bad: Vec<u64>,
    pub bad_count: u64,
    /// Pages that never arrived (post-copy whose source went away): the VM is incomplete.
    #[serde(default)]
    pub missing: u64,
}

impl Memory {
    /// Zeroed memory of `pages` pages.
    pub fn zeroed(pages: u64, seed: u64) -> Result<Self, SharedError> {
        Ok(Self {
            shared: SharedMemory::create(pages)?,
            seed,
            random_pct: 100,
        })
    }

    /// The workload writes pages only `pct` percent random from here on.
    pub fn set_random_pct(&mut self, pct: u8) {
        self.random_pct = pct.min(100);
    }

    /// New guest memory: zero, with the canary in page 1.
    pub fn boot(pages: u64, seed: u64) -> Result<Self, SharedError> {
        let m = Self::zeroed(pages, seed)?;
        if pages > CANARY_PFN {
            m.shared.write_page(CANARY_PFN, Some(&canary_page(seed)))?;
        }
        Ok(m)
    }

    /// A copy in memory of its own (for tests that damage one side).
    pub fn duplicate(&self) -> Result<Self, SharedError> {
        let copy = Self::zeroed(self.page_count(), self.seed)?;
        for pfn in 0..self.page_count() {
            copy.shared.write_page(pfn, Some(&self.page(pfn)[..]))?;
        }
        Ok(copy)
    }

    /// The shared memory underneath.
    pub fn shared(&self) -> &SharedMemory {
        &self.shared
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.shared.page_count()
    }

    /// The VM's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A copy of one page.
    pub fn page(&self, pfn: u64) -> Box<[u8; PAGE_SIZE]> {
        self.shared.page_copy(pfn)
    }

    /// Overwrites one page (tests damage memory with it).
    pub fn set_page(&self, pfn: u64, data: &[u8]) -> Result<(), SharedError> {
        self.shared.write_page(pfn, Some(data))
    }

    /// The workload's write: read the page's generation, write the next one. Returns `false`
    /// (and writes nothing) when the page has not arrived yet: the guest must wait for it.
    pub fn touch(&mut self, pfn: u64) -> bool {
        if self.shared.is_missing(pfn) {
            return false;
        }
        let mut page = self.page(pfn);
        let gen = generation(&page[..]) + 1;
        write_page_mixed(&mut page[..], self.seed, pfn, gen, self.random_pct);
        if self.shared.write_page(pfn, Some(&page[..])).is_ok() {
            self.shared.mark_dirty(pfn);
        }
        true
    }

    /// Starts (or restarts) the dirty log, empty.
    pub fn start_dirty_log(&mut self) {
        self.shared.clear_dirty();
    }

    /// Takes up to `max` dirty pages out of the log; with the number still left.
    pub fn take_dirty(&mut self, max: usize) -> (Vec<u64>, u64) {
        self.shared.take_dirty(max)
    }

    /// Post-copy target: these pages have not arrived; the guest waits on them.
    pub fn mark_missing(&mut self, ranges: &[(u64, u64)]) {
        for &(start, len) in ranges {
            self.shared
                .mark_missing_range(start, start.saturating_add(len));
        }
    }

    /// How many pages have not arrived.
    pub fn missing_count(&self) -> u64 {
        self.shared.missing_count()
    }

    /// Stores a page that arrived by migration (`None`: a zero page). Not a guest write: the
    /// dirty log does not see it.
    pub fn store(&mut self, pfn: u64, data: Option<&[u8]>) -> Result<(), SharedError> {
        self.shared.write_page(pfn, data)?;
        self.shared.clear_missing(pfn);
        Ok(())
    }

    /// Up to `max` page numbers from `from` on whose pages are not all zero.
    pub fn nonzero(&self, from: u64, max: usize) -> Vec<u64> {
        let mut page = [0u8; PAGE_SIZE];
        (from..self.page_count())
            .filter(|&p| {
                self.shared.read_page(p, &mut page).is_ok()
                    && !drift_protocol::transfer::is_zero_page(&page)
            })
            .take(max)
            .collect()
    }

    /// Checks every page.
    pub fn verify(&self) -> VerifyReport {
        let mut r = VerifyReport {
            pages: self.page_count(),
            missing: self.missing_count(),
            ..Default::default()
        };
        let mut page = [0u8; PAGE_SIZE];
        for pfn in 0..self.page_count() {
            if self.shared.read_page(pfn, &mut page).is_err() || !verify_page(&page, pfn) {
                r.bad_count += 1;
                if r.bad.len() < 16 {
                    r.bad.push(pfn);
                }
            } else if pfn != CANARY_PFN && page.iter().any(|&b| b != 0) {
                r.written += 1;
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_log_missing_pages_and_stores() {
        let mut m = Memory::boot(300, 7).unwrap();
        m.touch(5);
        m.start_dirty_log();
        assert_eq!(m.take_dirty(10), (vec![], 0));
        for p in [200, 3, 3, 64, 299] {
            assert!(m.touch(p));
        }
        assert_eq!(m.take_dirty(2), (vec![3, 64], 2));
        assert_eq!(m.take_dirty(10), (vec![200, 299], 0));
        assert_eq!(m.nonzero(0, 10), vec![1, 3, 5, 64, 200, 299]);
        assert_eq!(m.nonzero(100, 1), vec![200]);

        let mut t = Memory::zeroed(300, 7).unwrap();
        t.mark_missing(&[(3, 2), (298, 10)]);
        assert_eq!(t.missing_count(), 4);
        assert!(!t.touch(4), "a missing page must not be written");
        let page = m.page(3);
        t.store(3, Some(&page[..])).unwrap();
        t.store(4, None).unwrap();
        assert!(t.touch(4));
        assert_eq!(t.missing_count(), 2);
        assert_eq!(t.page(3), m.page(3));
    }

    #[test]
    fn written_pages_verify_and_any_damage_is_caught() {
        let mut m = Memory::boot(8, 42).unwrap();
        for pfn in [0, 2, 3, 3, 3, 7] {
            m.touch(pfn);
        }
        assert_eq!(generation(&m.page(3)[..]), 3);
        let r = m.verify();
        assert_eq!((r.bad_count, r.written), (0, 4));
        assert!(m.page(CANARY_PFN).starts_with(CANARY));

        // A flipped bit, a page in the wrong place, a torn page.
        let flipped = m.duplicate().unwrap();
        let mut p2 = m.page(2);
        p2[1000] ^= 1;
        flipped.set_page(2, &p2[..]).unwrap();
        assert_eq!(flipped.verify().bad, vec![2]);
        let moved = m.duplicate().unwrap();
        moved.set_page(7, &m.page(3)[..]).unwrap();
        assert_eq!(moved.verify().bad, vec![7]);
        let torn = m.duplicate().unwrap();
        let mut p2 = m.page(2);
        p2[2048..].copy_from_slice(&m.page(0)[2048..]);
        torn.set_page(2, &p2[..]).unwrap();
        assert_eq!(torn.verify().bad, vec![2]);
    }
}
