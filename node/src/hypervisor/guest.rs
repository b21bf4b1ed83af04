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
    let mut rng = SplitMix(seed ^ pfn.rotate_left(17) ^ gen.rotate_left(41));
    for w in page[HEADER..].chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
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

/// A guest's memory.
#[derive(Debug, Clone)]
pub struct Memory {
    bytes: Vec<u8>,
    seed: u64,
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub pages: u64,
    pub written: u64,
    /// Up to 16 bad page numbers.
    pub bad: Vec<u64>,
    pub bad_count: u64,
}

impl Memory {
    /// Zeroed memory of `pages` pages.
    pub fn zeroed(pages: u64, seed: u64) -> Self {
        Self {
            bytes: vec![0; pages as usize * PAGE_SIZE],
            seed,
        }
    }

    /// New guest memory: zero, with the canary in page 1.
    pub fn boot(pages: u64, seed: u64) -> Self {
        let mut m = Self::zeroed(pages, seed);
        if pages > CANARY_PFN {
            m.page_mut(CANARY_PFN).copy_from_slice(&canary_page(seed));
        }
        m
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        (self.bytes.len() / PAGE_SIZE) as u64
    }

    /// The VM's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// One page.
    pub fn page(&self, pfn: u64) -> &[u8] {
        let at = pfn as usize * PAGE_SIZE;
        &self.bytes[at..at + PAGE_SIZE]
    }

    /// One page, writable.
    pub fn page_mut(&mut self, pfn: u64) -> &mut [u8] {
        let at = pfn as usize * PAGE_SIZE;
        &mut self.bytes[at..at + PAGE_SIZE]
    }

    /// The workload's write: read the page's generation, write the next one.
    pub fn touch(&mut self, pfn: u64) {
        let seed = self.seed;
        let page = self.page_mut(pfn);
        let gen = generation(page) + 1;
        write_page(page, seed, pfn, gen);
    }

    /// Checks every page.
    pub fn verify(&self) -> VerifyReport {
        let mut r = VerifyReport {
            pages: self.page_count(),
            ..Default::default()
        };
        for pfn in 0..self.page_count() {
            let page = self.page(pfn);
            if !verify_page(page, pfn) {
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
    fn written_pages_verify_and_any_damage_is_caught() {
        let mut m = Memory::boot(8, 42);
        for pfn in [0, 2, 3, 3, 3, 7] {
            m.touch(pfn);
        }
        assert_eq!(generation(m.page(3)), 3);
        let r = m.verify();
        assert_eq!((r.bad_count, r.written), (0, 4));
        assert!(m.page(CANARY_PFN).starts_with(CANARY));

        // A flipped bit, a page in the wrong place, a torn page.
        let mut flipped = m.clone();
        flipped.page_mut(2)[1000] ^= 1;
        assert_eq!(flipped.verify().bad, vec![2]);
        let mut moved = m.clone();
        let p3 = moved.page(3).to_vec();
        moved.page_mut(7).copy_from_slice(&p3);
        assert_eq!(moved.verify().bad, vec![7]);
        let mut torn = m.clone();
        let p0 = torn.page(0).to_vec();
        torn.page_mut(2)[2048..].copy_from_slice(&p0[2048..]);
        assert_eq!(torn.verify().bad, vec![2]);
    }
}
