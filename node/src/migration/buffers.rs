//! Page-data buffers reused from one batch to the next.
//!
//! A batch holds up to 1 MiB of pages. The allocator serves a buffer that large by mapping
//! fresh memory and unmaps it when it is freed, so a new buffer per batch costs the kernel a
//! page fault and a zeroed page for every 4 KiB of it: about a tenth of a migration's CPU.
//! Batches instead take their buffer from here (the source when it reads pages, a data
//! connection's reader when it reads a batch) and give it back once written (to the connection,
//! or into the VM). At most [`KEPT`] buffers are kept; any more are freed.

use std::sync::Mutex;

use drift_protocol::transfer::{MAX_PAGES_PER_BATCH, PAGE_SIZE};

/// Buffers kept at most (16 MiB of full batches).
pub const KEPT: usize = 16;
/// A full batch's data.
const BATCH: usize = MAX_PAGES_PER_BATCH * PAGE_SIZE;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A buffer for a batch's data: one given back earlier (contents unspecified), or a new one.
pub fn take() -> Vec<u8> {
    pool().pop().unwrap_or_default()
}

/// Gives a batch's buffer back for the next batch.
pub fn give(buffer: Vec<u8>) {
    if buffer.capacity() < BATCH || buffer.capacity() > 2 * BATCH {
        return;
    }
    let mut pool = pool();
    if pool.len() < KEPT {
        pool.push(buffer);
    }
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
        assert!(pool().len() <= KEPT);
        give(Vec::with_capacity(16));
        give(Vec::with_capacity(4 * BATCH));
        assert!(pool()
            .iter()
            .all(|b| b.capacity() >= BATCH && b.capacity() <= 2 * BATCH));
        let b = take();
        assert!(b.capacity() >= BATCH || b.capacity() == 0);
    }
}
