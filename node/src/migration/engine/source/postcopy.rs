//! Post-copy on the source: once the target runs the VM, serving the pages it asks for first
//! and pushing the rest, each page once, and replacing a broken link with a new one over
//! which the target names what it still lacks.

use std::time::{Duration, Instant};

use drift_protocol::transfer::sender::SenderStep;
use drift_protocol::transfer::MAX_PAGES_PER_BATCH;
use tracing::{info, warn};

use super::{Source, APPLIED_TIMEOUT};
use crate::migration::engine::{EngineError, Hooks, Point, SourceOutcome, VmmAccess};
use crate::migration::link::Incoming;
use crate::migration::recover::{Reconnect, RECOVER_TIMEOUT};

impl<V: VmmAccess, H: Hooks, R: Reconnect> Source<'_, V, H, R> {
    /// Post-copy: serves the target's requests first and pushes the rest, each page once,
    /// until none is pending. `Some(outcome)`: the target gave up meanwhile.
    pub(super) async fn push(
        &mut self,
        pending: &mut Pending,
        round: u32,
        pushed: &mut bool,
    ) -> Result<Option<SourceOutcome>, EngineError> {
        while !pending.is_empty() {
            let mut urgent = Vec::new();
            while let Some(step) = self.poll_target()? {
                match step {
                    SenderStep::ServePages(pfns) => {
                        urgent.extend(pfns.into_iter().filter(|&p| pending.contains(p)))
                    }
                    SenderStep::TargetAborted { reason, .. } => {
                        return Ok(Some(SourceOutcome::Unknown {
                            reason: format!("target aborted after switchover: {reason:?}"),
                        }))
                    }
                    SenderStep::Committed(_) => {
                        return Err(EngineError::Protocol("commit before complete".into()))
                    }
                    SenderStep::Applied(_) | SenderStep::Missing { .. } => {}
                }
            }
            let batch: Vec<u64> = if urgent.is_empty() {
                pending.lowest(MAX_PAGES_PER_BATCH)
            } else {
                urgent.sort_unstable();
                urgent.dedup();
                urgent
            };
            for &p in &batch {
                pending.remove(p);
            }
            self.send_pages(round, &batch).await?;
            if !*pushed {
                *pushed = true;
                self.link.out.flush().await?;
                self.hooks.at(Point::Pushing).await?;
            }
        }
        Ok(None)
    }

    /// Post-copy: a new link in place of the broken one, and the pages the target still
    /// lacks. Tries for [`RECOVER_TIMEOUT`]; an error means the outcome must be resolved.
    pub(super) async fn relink(
        &mut self,
        attempt: &mut u32,
        why: &str,
    ) -> Result<Vec<u64>, EngineError> {
        warn!(
            why,
            "post-copy link broke: the VM runs on the target; opening a new link"
        );
        self.progress.phase = "recovering".into();
        let _ = self.watch.send(self.progress.clone());
        let deadline = Instant::now() + RECOVER_TIMEOUT;
        let mut delay = Duration::from_millis(250);
        let link = loop {
            *attempt += 1;
            match self.reconnect.reconnect(*attempt).await {
                Ok(link) => break link,
                Err(e) if Instant::now() + delay > deadline => {
                    return Err(EngineError::Protocol(format!(
                        "no new link within {RECOVER_TIMEOUT:?}: {e}"
                    )))
                }
                Err(e) => {
                    tracing::debug!(attempt = *attempt, error = %e, "recovery attempt failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        self.link = link;
        self.sender.relinked();
        // The target names every page it lacks, then asks again for those its guest waits on.
        let mut missing = Vec::new();
        loop {
            let next = tokio::time::timeout(APPLIED_TIMEOUT, self.link.inbound.recv()).await;
            let frame = match next {
                Ok(Some(Ok(Incoming::Frame(f)))) => f,
                other => {
                    return Err(EngineError::Protocol(format!(
                        "the recovered link gave no missing pages: {other:?}"
                    )))
                }
            };
            match self.sender.on_frame(&frame) {
                Ok(SenderStep::Missing { ranges, done }) => {
                    for (start, len) in ranges {
                        missing.extend(start..start + len);
                    }
                    if done {
                        break;
                    }
                }
                Ok(SenderStep::Applied(_) | SenderStep::ServePages(_)) => {}
                Ok(other) => {
                    return Err(EngineError::Protocol(format!(
                        "unexpected {other:?} on the recovered link"
                    )))
                }
                Err(e) => return Err(EngineError::Protocol(e.to_string())),
            }
        }
        info!(
            attempt = *attempt,
            missing = missing.len(),
            "post-copy goes on over a new link"
        );
        self.progress.phase = "post-copy".into();
        let _ = self.watch.send(self.progress.clone());
        Ok(missing)
    }
}

/// Post-copy: the pages the target still lacks, as a bitmap (a 1 GiB VM's 262,144 pages
/// cost 32 KiB), handed out lowest first.
pub(super) struct Pending {
    words: Vec<u64>,
    left: usize,
    /// No page below word `cursor` is pending.
    cursor: usize,
}

impl Pending {
    pub(super) fn new(page_count: u64, pages: &[u64]) -> Self {
        let mut words = vec![0u64; page_count.div_ceil(64) as usize];
        let mut left = 0;
        for &p in pages {
            if let Some(w) = words.get_mut((p / 64) as usize) {
                let bit = 1 << (p % 64);
                left += usize::from(*w & bit == 0);
                *w |= bit;
            }
        }
        Self {
            words,
            left,
            cursor: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.left == 0
    }

    fn contains(&self, p: u64) -> bool {
        self.words
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    fn remove(&mut self, p: u64) {
        if let Some(w) = self.words.get_mut((p / 64) as usize) {
            let bit = 1 << (p % 64);
            if *w & bit != 0 {
                *w &= !bit;
                self.left -= 1;
            }
        }
    }

    /// Up to `max` pending pages, lowest first (still pending until removed).
    fn lowest(&mut self, max: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(max);
        while self.cursor < self.words.len() && self.words[self.cursor] == 0 {
            self.cursor += 1;
        }
        for (w, &word) in self.words.iter().enumerate().skip(self.cursor) {
            let mut bits = word;
            while bits != 0 && out.len() < max {
                out.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
            if out.len() == max {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Pending;

    #[test]
    fn pending_pages_go_lowest_first_and_each_once() {
        let mut p = Pending::new(200, &[150, 3, 64, 3, 199]);
        assert!(p.contains(64) && !p.contains(65) && !p.contains(10_000));
        assert_eq!(p.lowest(2), vec![3, 64]);
        p.remove(3);
        p.remove(64);
        p.remove(64);
        assert_eq!(p.lowest(10), vec![150, 199]);
        p.remove(199);
        p.remove(150);
        assert!(p.is_empty());
        assert_eq!(p.lowest(10), Vec::<u64>::new());
    }
}
