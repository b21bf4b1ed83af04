//! Page-data buffers reused from one batch to the next.
//!
//! A batch holds up to 1 MiB of pages. The allocator serves a buffer that large by mapping
//! fresh memory and unmaps it when it is freed, so a new buffer per batch costs the kernel a
//! page fault and a zeroed page for every 4 KiB of it: about a tenth of a migration's CPU.
//! Batches instead take their buffer from here (the source when it reads pages, a data
//! connection's reader when it reads a batch) and give it back once written (to the connection,
//! or into the VM). At most [`KEPT`] buffers are kept; any more are freed. Once no batch took
//! or gave back a buffer for [`IDLE`], [`trim_idle`] frees the kept ones too: between
//! migrations a node holds none (otherwise up to 16 MiB for good after its first migration).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use drift_protocol::transfer::{MAX_PAGES_PER_BATCH, PAGE_SIZE};

/// Buffers kept at most (16 MiB of full batches).
pub const KEPT: usize = 16;
/// Kept buffers are freed once no batch used the pool for this long.
pub const IDLE: Duration = Duration::from_secs(30);
/// A full batch's data.
const BATCH: usize = MAX_PAGES_PER_BATCH * PAGE_SIZE;

struct Pool {
    kept: Vec<Vec<u8>>,
    /// When a batch last took or gave back a buffer.
    used: Option<Instant>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    kept: Vec::new(),
    used: None,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A buffer for a batch's data: one given back earlier (contents unspecified), or a new one.
pub fn take() -> Vec<u8> {
    let mut pool = pool();
    pool.used = Some(Instant::now());
    pool.kept.pop().unwrap_or_default()
}

/// Gives a batch's buffer back for the next batch.
pub fn give(buffer: Vec<u8>) {
    if buffer.capacity() < BATCH || buffer.capacity() > 2 * BATCH {
        return;
    }
    let mut pool = pool();
    pool.used = Some(Instant::now());
    if pool.kept.len() < KEPT {
        pool.kept.push(buffer);
    }
}

/// Frees the kept buffers if no batch took or gave one back for `idle`; returns how many.
pub fn trim_idle(idle: Duration) -> usize {
    let freed = {
        let mut pool = pool();
        if pool.used.is_none_or(|t| t.elapsed() < idle) {
            return 0;
        }
        std::mem::take(&mut pool.kept)
    };
    freed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_batch_buffers_come_back_and_the_pool_stays_bounded() {
        for _ in 0..KEPT + 5 {
            give(Vec::with_capacity(BATCH));
        }
        // Other tests may take buffers meanwhile; never more than KEPT are kept.
        assert!(pool().kept.len() <= KEPT);
        give(Vec::with_capacity(16));
        give(Vec::with_capacity(4 * BATCH));
        assert!(pool()
            .kept
            .iter()
            .all(|b| b.capacity() >= BATCH && b.capacity() <= 2 * BATCH));
        let b = take();
        assert!(b.capacity() >= BATCH || b.capacity() == 0);
    }

    #[test]
    fn kept_buffers_are_freed_only_once_the_pool_is_idle() {
        give(Vec::with_capacity(BATCH));
        assert_eq!(trim_idle(Duration::from_secs(3600)), 0);
        trim_idle(Duration::ZERO);
        // Other tests may give buffers back meanwhile; the pool still stays bounded.
        assert!(pool().kept.len() <= KEPT);
    }
}
