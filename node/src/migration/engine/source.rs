//! The source side of a sandbox transfer: rounds of pages from the VMM, the switchover, and
//! the wait for the target's commit.

use std::time::{Duration, Instant};

use drift_protocol::migration::Mode;
use drift_protocol::transfer::convergence::{Convergence, Decision, RoundReport};
use drift_protocol::transfer::sender::{Sender, SenderStep};
use drift_protocol::transfer::{
    Abort, AbortReason, Complete, DeviceState, Leaves, RoundEnd, StaleRanges, TransferFrame,
    MAX_PAGES_PER_BATCH, MAX_STALE_RANGES, PAGE_SIZE,
};
use drift_protocol::{Hash, Signed};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    expect_done, EngineError, Hooks, Point, Progress, SourceOutcome, SourceParams, SourceTransfer,
    VmmAccess,
};
use crate::hypervisor::vmm::{Request, Response};
use crate::migration::link::{Incoming, Link};
use crate::migration::recover::Reconnect;

mod postcopy;
use postcopy::Pending;

/// Dirty pages fetched per request.
const DIRTY_CHUNK: u32 = 65_536;
/// The most a bandwidth cap lets pass at once after a pause.
const CAP_BURST: Duration = Duration::from_millis(50);
/// How long the source waits for the target to apply a round.
const APPLIED_TIMEOUT: Duration = Duration::from_secs(30);

struct Source<'a, V, H, R> {
    vm: &'a V,
    hooks: &'a H,
    /// Post-copy: where a new link comes from when this one breaks.
    reconnect: &'a R,
    link: Link,
    sender: Sender,
    leaves: Leaves,
    params: SourceParams,
    progress: Progress,
    watch: &'a watch::Sender<Progress>,
    started: Instant,
    cancel: CancellationToken,
    /// Post-copy: from pause until the device state went out.
    switched_at: Option<Duration>,
    /// Pre-copy: the last pages' time at the rate measured when the VM paused.
    last_pages: Option<Duration>,
    /// Bandwidth cap: when the bytes sent so far are paid for.
    cap_free_at: Instant,
}

/// How waiting for the commit ended.
enum Waited {
    Outcome(SourceOutcome),
    /// The link broke before the answer came.
    Lost(String),
}

impl<V: VmmAccess, H: Hooks, R: Reconnect> Source<'_, V, H, R> {
    async fn send(&mut self, frame: TransferFrame) -> Result<(), EngineError> {
        let n = self.link.out.send_owned(frame).await?;
        self.progress.bytes_sent += n as u64;
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        self.progress.rate_bytes_per_s = self.progress.bytes_sent as f64 / elapsed;
        if let Some(cap) = self.params.bandwidth_cap {
            // A cap on the rate at any moment, not on the average: time spent waiting (for an
            // acknowledgement, say) earns at most `CAP_BURST` of credit.
            let now = Instant::now();
            let from = self
                .cap_free_at
                .max(now - CAP_BURST.min(now - self.started));
            self.cap_free_at = from + Duration::from_secs_f64(n as f64 / cap.max(1) as f64);
            if self.cap_free_at > now {
                tokio::time::sleep(self.cap_free_at - now).await;
            }
        }
        Ok(())
    }

    async fn send_pages(&mut self, round: u32, pfns: &[u64]) -> Result<(), EngineError> {
        let mut scratch = Vec::new();
        for chunk in pfns.chunks(MAX_PAGES_PER_BATCH) {
            // A cancel counts only before switchover; after it, the pages must go.
            if self.cancel.is_cancelled() && self.sender.may_resume_here() {
                return Err(EngineError::Cancelled);
            }
            let (mut batch, leaves) = self.vm.read_batch(round, chunk).await?;
            for (e, l) in batch.entries.iter().zip(leaves) {
                self.leaves.set(e.pfn, l);
            }
            if self.params.compress {
                batch.pack(&mut scratch);
            }
            self.progress.pages_sent += batch.entries.len() as u64;
            self.send(TransferFrame::Pages(batch)).await?;
            let _ = self.watch.send(self.progress.clone());
        }
        Ok(())
    }

    async fn dirty(&mut self) -> Result<Vec<u64>, EngineError> {
        let mut all = Vec::new();
        loop {
            let (pfns, remaining) = self.vm.take_dirty(DIRTY_CHUNK).await?;
            all.extend(pfns);
            if remaining == 0 || all.len() as u64 >= self.sender_pages() {
                all.sort_unstable();
                all.dedup();
                return Ok(all);
            }
        }
    }

    /// Names `pages` (sorted, each once) to the target as stale, in runs.
    async fn name_stale(&mut self, pages: &[u64]) -> Result<(), EngineError> {
        for chunk in runs(pages).chunks(MAX_STALE_RANGES) {
            let ranges = chunk.to_vec();
            self.send(TransferFrame::Stale(StaleRanges { ranges }))
                .await?;
        }
        Ok(())
    }

    /// Every page number whose page is not all zero (in chunks). Node-side, it also maps the
    /// VM's memory where the VMM shares it, before the pause rather than in it.
    async fn nonzero(&mut self, page_count: u64) -> Result<Vec<u64>, EngineError> {
        let mut nonzero = Vec::new();
        let mut from = 0;
        loop {
            let pfns = self.vm.nonzero(from, DIRTY_CHUNK).await?;
            let Some(&last) = pfns.last() else {
                return Ok(nonzero);
            };
            if last < from || last >= page_count {
                return Err(EngineError::Vmm(format!(
                    "non-zero page {last} out of order or beyond the VM's {page_count} pages"
                )));
            }
            from = last + 1;
            nonzero.extend(pfns);
        }
    }

    /// Waits until the target applied round `round` (its `Applied`). `Some(outcome)`: the
    /// target gave up meanwhile, or the wait timed out; the VM runs here.
    async fn await_applied(&mut self, round: u32) -> Result<Option<SourceOutcome>, EngineError> {
        let deadline = tokio::time::Instant::now() + APPLIED_TIMEOUT;
        let cancel = self.cancel.clone();
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout_at(deadline, self.link.inbound.recv()) => next,
                _ = cancel.cancelled() => return Err(EngineError::Cancelled),
            };
            let frame = match next {
                Err(_) => {
                    return Err(EngineError::Protocol(format!(
                        "the target did not apply round {round} within {APPLIED_TIMEOUT:?}"
                    )))
                }
                Ok(None) => {
                    return Err(EngineError::Protocol(
                        "the target closed the link during the rounds".into(),
                    ))
                }
                Ok(Some(Err(e))) => return Err(EngineError::Protocol(e.to_string())),
                Ok(Some(Ok(Incoming::Frame(f)))) => f,
                Ok(Some(Ok(Incoming::Pages(_)))) => {
                    return Err(EngineError::Protocol("the target sent pages".into()))
                }
            };
            match self.sender.on_frame(&frame) {
                Ok(SenderStep::Applied(r)) if r >= round => return Ok(None),
                Ok(
                    SenderStep::Applied(_) | SenderStep::ServePages(_) | SenderStep::Missing { .. },
                ) => {}
                Ok(SenderStep::TargetAborted { reason, .. }) => {
                    // Still copying: the VM never stopped running here (throttled, perhaps).
                    return self
                        .resume_here(format!("target aborted: {reason:?}"))
                        .await
                        .map(Some);
                }
                Ok(SenderStep::Committed(_)) => {
                    return Err(EngineError::Protocol("commit before complete".into()))
                }
                Err(e) => return Err(EngineError::Protocol(e.to_string())),
            }
        }
    }

    /// What the last round showed: the rate the link carried it at (from its start to the
    /// target's acknowledgement, so a switchover of the same size takes about as long) and
    /// how fast the guest dirtied memory since the dirty log was last read.
    fn round_report(
        &mut self,
        round: u32,
        dirty: &[u64],
        (started, bytes_before): (Instant, u64),
        fetched_at: &mut Instant,
    ) -> RoundReport {
        let dirty_bytes = dirty.len() as u64 * PAGE_SIZE as u64;
        let sent = self.progress.bytes_sent.saturating_sub(bytes_before) as f64;
        let send_rate = sent / started.elapsed().as_secs_f64().max(1e-4);
        let dirty_rate = dirty_bytes as f64 / fetched_at.elapsed().as_secs_f64().max(1e-4);
        *fetched_at = Instant::now();
        RoundReport {
            now_ms: self.started.elapsed().as_millis() as u64,
            round,
            dirty_bytes,
            send_rate,
            dirty_rate,
            switchover_cost_ms: self.params.switchover_cost.as_secs_f64() * 1e3,
        }
    }

    /// Publishes a round's figures: the expected downtime, the rates, whether and why the
    /// migration is not converging, and the time to converge while the link outruns the guest.
    fn show_round(&mut self, r: &RoundReport, c: &Convergence) {
        let p = &mut self.progress;
        p.rounds = r.round;
        p.dirty_pages = r.dirty_bytes / PAGE_SIZE as u64;
        p.expected_downtime_ms = r.expected_downtime_ms();
        p.dirty_rate_bytes_per_s = r.dirty_rate;
        p.not_converging = c.last_why().map(|w| w.to_string());
        p.eta_ms = (r.send_rate > r.dirty_rate)
            .then(|| r.dirty_bytes as f64 / (r.send_rate - r.dirty_rate) * 1e3);
        let _ = self.watch.send(self.progress.clone());
    }

    fn sender_pages(&self) -> u64 {
        self.leaves.len()
    }

    /// A frame from the target, if one is waiting.
    fn poll_target(&mut self) -> Result<Option<SenderStep>, EngineError> {
        match self.link.inbound.try_recv() {
            Some(Ok(Incoming::Frame(f))) => self
                .sender
                .on_frame(&f)
                .map(Some)
                .map_err(|e| EngineError::Protocol(e.to_string())),
            Some(Ok(Incoming::Pages(_))) => {
                Err(EngineError::Protocol("the target sent pages".into()))
            }
            Some(Err(e)) => Err(EngineError::Protocol(e.to_string())),
            None => Ok(None),
        }
    }

    async fn resume_here(&mut self, reason: String) -> Result<SourceOutcome, EngineError> {
        expect_done(self.vm, Request::Resume).await?;
        Ok(SourceOutcome::ResumedHere { reason })
    }

    async fn wait_commit(&mut self, paused_at: Instant) -> Result<Waited, EngineError> {
        let deadline = tokio::time::Instant::now() + self.params.commit_timeout;
        let unknown = |reason: String| Ok(Waited::Outcome(SourceOutcome::Unknown { reason }));
        loop {
            let frame = tokio::time::timeout_at(deadline, self.link.inbound.recv()).await;
            let frame = match frame {
                Err(_) => return unknown("no commit before the timeout".into()),
                Ok(None) => return Ok(Waited::Lost("stream closed before the commit".into())),
                Ok(Some(Err(e))) => {
                    return Ok(Waited::Lost(format!(
                        "stream failed before the commit: {e}"
                    )))
                }
                Ok(Some(Ok(Incoming::Frame(f)))) => f,
                Ok(Some(Ok(Incoming::Pages(_)))) => {
                    return Err(EngineError::Protocol("the target sent pages".into()))
                }
            };
            match self.sender.on_frame(&frame) {
                Ok(SenderStep::Committed(commit)) => {
                    self.hooks.at(Point::CommitReceived).await?;
                    let downtime = self.switched_at.unwrap_or_else(|| paused_at.elapsed());
                    self.progress.phase = "committed".into();
                    self.progress.downtime_ms = Some(downtime.as_secs_f64() * 1e3);
                    self.progress.switchover_cost_ms = self
                        .last_pages
                        .map(|moving| downtime.saturating_sub(moving).as_secs_f64() * 1e3);
                    self.progress.total_ms = Some(self.started.elapsed().as_secs_f64() * 1e3);
                    let _ = self.watch.send(self.progress.clone());
                    return Ok(Waited::Outcome(SourceOutcome::Committed {
                        commit,
                        progress: Box::new(self.progress.clone()),
                    }));
                }
                Ok(SenderStep::TargetAborted {
                    reason,
                    resume_here: true,
                }) => {
                    return self
                        .resume_here(format!("target aborted: {reason:?}"))
                        .await
                        .map(Waited::Outcome)
                }
                Ok(SenderStep::TargetAborted { reason, .. }) => {
                    return unknown(format!("target aborted after switchover: {reason:?}"))
                }
                Ok(
                    SenderStep::ServePages(_) | SenderStep::Applied(_) | SenderStep::Missing { .. },
                ) => {}
                Err(e) => return Err(EngineError::Protocol(e.to_string())),
            }
        }
    }
}

/// Runs the source side over `link`, on which the transfer's `Start` already went out. The VM
/// must be running; on return the caller acts on the outcome.
#[allow(clippy::too_many_arguments)]
pub async fn run_source<V: VmmAccess, H: Hooks, R: Reconnect>(
    vm: &V,
    hooks: &H,
    reconnect: &R,
    link: Link,
    t: SourceTransfer,
    params: SourceParams,
    watch: &watch::Sender<Progress>,
    cancel: CancellationToken,
) -> Result<SourceOutcome, EngineError> {
    let fallback = params.limits.fallback.to_string();
    let mut s = Source {
        vm,
        hooks,
        reconnect,
        link,
        sender: Sender::new(t.id, t.target, params.wire_mode(), t.page_count),
        leaves: Leaves::new(t.page_count),
        params,
        progress: Progress {
            phase: "copying".into(),
            transport: t.transport.clone(),
            fallback,
            ..Default::default()
        },
        watch,
        started: Instant::now(),
        cancel,
        switched_at: None,
        last_pages: None,
        cap_free_at: Instant::now(),
    };
    let result = source_loop(&mut s, &t).await;
    let outcome = match result {
        Ok(outcome) => Ok(outcome),
        // Before switchover any failure leaves the VM on the source.
        Err(e) if s.sender.may_resume_here() => {
            let reason = match e {
                EngineError::Cancelled => AbortReason::Cancelled,
                _ => AbortReason::LocalError,
            };
            let abort = TransferFrame::Abort(Abort { id: t.id, reason });
            if s.link.out.send(&abort).await.is_ok() {
                let _ = s.link.out.flush().await;
            }
            s.sender.abandon();
            s.resume_here(format!("stopped before switchover: {e}"))
                .await
        }
        Err(e) => Ok(SourceOutcome::Unknown {
            reason: format!("failed after switchover: {e}"),
        }),
    };
    s.link.out.shut_down().await;
    outcome
}

async fn source_loop<V: VmmAccess, H: Hooks, R: Reconnect>(
    s: &mut Source<'_, V, H, R>,
    t: &SourceTransfer,
) -> Result<SourceOutcome, EngineError> {
    expect_done(s.vm, Request::DirtyLogStart).await?;
    let mut round = 0u32;
    let mut carry: Vec<u64> = Vec::new();
    // Post-copy ending: asked for, or the convergence control's fallback.
    let mut post_copy = s.params.mode == Mode::PostCopy;
    if s.params.mode != Mode::PostCopy {
        // The round being sent: when it started and the bytes sent before it.
        let mut round_start = (Instant::now(), s.progress.bytes_sent);
        let all: Vec<u64> = (0..t.page_count).collect();
        s.send_pages(0, &all).await?;
        s.send(TransferFrame::RoundEnd(RoundEnd {
            round: 0,
            pages_sent: t.page_count,
            dirty: 0,
        }))
        .await?;
        round = 1;
        let memory_bytes = t.page_count * PAGE_SIZE as u64;
        let mut convergence = Convergence::new(s.params.limits.clone(), memory_bytes);
        let mut fetched_at = s.started;
        loop {
            // Everything sent is in the target's VM before the next decision: what is still
            // dirty is then all that the switchover would have to move.
            if let Some(outcome) = s.await_applied(round - 1).await? {
                return Ok(outcome);
            }
            // The root at the switchover then hashes only the last round's groups.
            s.leaves.refresh();
            if s.cancel.is_cancelled() {
                let _ = s
                    .send(TransferFrame::Abort(Abort {
                        id: t.id,
                        reason: AbortReason::Cancelled,
                    }))
                    .await;
                let _ = s.link.out.flush().await;
                s.sender.abandon();
                return s.resume_here("cancelled".into()).await;
            }
            let dirty = s.dirty().await?;
            let report = s.round_report(round, &dirty, round_start, &mut fetched_at);
            let decision = convergence.after_round(&report);
            s.show_round(&report, &convergence);
            match decision {
                Decision::Round => {}
                Decision::SwitchOver {
                    expected_downtime_ms,
                    over_target,
                } => {
                    if over_target {
                        warn!(migration = %t.id.short(), expected_ms = expected_downtime_ms,
                            limit_ms = s.params.limits.downtime_limit_ms,
                            why = %convergence.last_why().map(|w| w.to_string()).unwrap_or_default(),
                            "switching over above the downtime limit, within the maximum");
                    }
                    carry = dirty;
                    break;
                }
                Decision::Throttle { pct, why } => {
                    info!(migration = %t.id.short(), %why, pct, "throttling the guest");
                    expect_done(s.vm, Request::Throttle { pct }).await?;
                    s.progress.throttle_pct = pct;
                }
                Decision::PostCopy { why } if s.params.wire_mode() != Mode::PreCopy => {
                    info!(migration = %t.id.short(), %why, "switching to post-copy");
                    carry = dirty;
                    post_copy = true;
                    break;
                }
                Decision::PostCopy { why } | Decision::Abort { why } => {
                    let reason = why.to_string();
                    warn!(migration = %t.id.short(), %reason, "aborting: the VM stays here");
                    let _ = s
                        .send(TransferFrame::Abort(Abort {
                            id: t.id,
                            reason: AbortReason::NotConverging,
                        }))
                        .await;
                    let _ = s.link.out.flush().await;
                    s.sender.abandon();
                    return s.resume_here(reason).await;
                }
            }
            round_start = (Instant::now(), s.progress.bytes_sent);
            s.send_pages(round, &dirty).await?;
            s.send(TransferFrame::RoundEnd(RoundEnd {
                round,
                pages_sent: dirty.len() as u64,
                dirty: 0,
            }))
            .await?;
            s.hooks.at(Point::RoundSent(round)).await?;
            round += 1;
        }
    }

    // Post-copy: the pages the target will lack are every non-zero page; found and named to
    // the target while the VM still runs, so neither the scan nor the naming is downtime
    // (pages it writes from here on are in the dirty log, taken after the pause, and only
    // those not named already are named then). Nothing else precedes them: pure post-copy
    // sends no round.
    let nonzero = if s.params.mode == Mode::PostCopy {
        let nonzero = s.nonzero(t.page_count).await?;
        s.name_stale(&nonzero).await?;
        nonzero
    } else {
        Vec::new()
    };

    // Switchover: the VM stops here. A post-copy ending records the handover now, before the
    // pause, so the durable write is not part of the downtime (after a crash the outcome is
    // resolved with the target either way).
    s.progress.phase = "switchover".into();
    s.hooks.at(Point::Pausing).await?;
    if post_copy {
        s.hooks.at(Point::HandingOver).await?;
    }
    expect_done(s.vm, Request::Pause).await?;
    let paused_at = Instant::now();
    tracing::debug!(migration = %t.id.short(), "switchover: paused");
    s.hooks.at(Point::Paused).await?;
    let mut last = union(&carry, &s.dirty().await?);
    let device = match s.vm.call(Request::DeviceState).await? {
        Response::Device(d) => d,
        other => return Err(EngineError::Vmm(format!("unexpected {other:?}"))),
    };
    let device_hash = Hash::of(&device);
    tracing::debug!(migration = %t.id.short(), last = last.len(), at_ms = paused_at.elapsed().as_secs_f64() * 1e3, "switchover: last pages and device state read");

    if !post_copy {
        let rate = s.progress.rate_bytes_per_s.max(1.0);
        s.last_pages = Some(Duration::from_secs_f64(
            last.len() as f64 * PAGE_SIZE as f64 / rate,
        ));
        s.send_pages(round, &last).await?;
        s.send(TransferFrame::DeviceState(DeviceState::new(device)))
            .await?;
        return match complete(s, t, device_hash, paused_at).await? {
            Waited::Outcome(outcome) => Ok(outcome),
            Waited::Lost(reason) => Ok(SourceOutcome::Unknown { reason }),
        };
    }

    // Post-copy (or pre-copy that fell back to it): the target lacks every page not yet sent.
    // Pure post-copy named the non-zero pages before the pause: only the others go now.
    if s.params.mode == Mode::PostCopy {
        last = difference(&last, &nonzero);
    }
    s.name_stale(&last).await?;
    tracing::debug!(migration = %t.id.short(), stale = last.len() + nonzero.len(), at_ms = paused_at.elapsed().as_secs_f64() * 1e3, "switchover: stale pages named");
    s.sender.switched();
    s.send(TransferFrame::DeviceState(DeviceState::new(device)))
        .await?;
    // The target resumes on this frame, once it is written: the VM's downtime ends about here.
    s.link.out.flush().await?;
    s.switched_at = Some(paused_at.elapsed());
    tracing::debug!(migration = %t.id.short(), at_ms = paused_at.elapsed().as_secs_f64() * 1e3, "switchover: device state sent; the target resumes");
    let stale = if s.params.mode == Mode::PostCopy {
        union(&last, &nonzero)
    } else {
        last
    };
    s.progress.phase = "post-copy".into();
    // Serve requests first, push the rest; each page goes once. A broken link is replaced
    // (the VM runs on the target and lives only there and here) and the push goes on with
    // what the target says it lacks.
    let mut pending = Pending::new(t.page_count, &stale);
    let mut pushed = false;
    let mut attempt = 0u32;
    loop {
        let broke = match s.push(&mut pending, round, &mut pushed).await {
            Ok(Some(outcome)) => return Ok(outcome),
            Ok(None) => match complete(s, t, device_hash, paused_at).await {
                Ok(Waited::Outcome(outcome)) => return Ok(outcome),
                Ok(Waited::Lost(why)) => why,
                Err(e @ (EngineError::Io(_) | EngineError::Protocol(_))) => e.to_string(),
                Err(e) => return Err(e),
            },
            Err(e @ (EngineError::Io(_) | EngineError::Protocol(_))) => e.to_string(),
            Err(e) => return Err(e),
        };
        let missing = match s.relink(&mut attempt, &broke).await {
            Ok(missing) => missing,
            Err(e) => {
                return Ok(SourceOutcome::Unknown {
                    reason: format!(
                        "post-copy link broke ({broke}) and could not be recovered: {e}"
                    ),
                })
            }
        };
        pending = Pending::new(t.page_count, &missing);
    }
}

/// The pages of sorted list `a` that are not in sorted list `b`, sorted. `a` is the short
/// one (the pages dirtied since the scan, against every non-zero page): one search in `b`
/// per page of `a`.
fn difference(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter()
        .copied()
        .filter(|p| b.binary_search(p).is_err())
        .collect()
}

/// The union of two sorted lists of page numbers, sorted, each page once.
fn union(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x <= y => {
                i += 1;
                j += usize::from(x == y);
                x
            }
            (_, Some(&y)) => {
                j += 1;
                y
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (None, None) => break,
        };
        out.push(next);
    }
    out
}

/// Sorted page numbers as runs of consecutive pages `(start, len)`.
fn runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in sorted {
        match out.last_mut() {
            Some((start, len)) if *start + *len == p => *len += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

async fn complete<V: VmmAccess, H: Hooks, R: Reconnect>(
    s: &mut Source<'_, V, H, R>,
    t: &SourceTransfer,
    device_hash: Hash,
    paused_at: Instant,
) -> Result<Waited, EngineError> {
    let root = s.leaves.root(&device_hash);
    s.sender.complete_sent(root);
    s.send(TransferFrame::Complete(Signed::sign(
        &Complete {
            id: t.id,
            offer: t.offer,
            root,
            page_count: t.page_count,
        },
        &t.key,
    )))
    .await?;
    // `Complete` is out only once it is written, whichever connection carries it.
    s.link.out.flush().await?;
    tracing::debug!(migration = %t.id.short(), at_ms = paused_at.elapsed().as_secs_f64() * 1e3, "switchover: complete sent");
    s.hooks.at(Point::CompleteSent(root)).await?;
    s.progress.phase = "awaiting commit".into();
    let _ = s.watch.send(s.progress.clone());
    s.wait_commit(paused_at).await
}

#[cfg(test)]
mod tests {
    use super::{difference, runs, union};

    #[test]
    fn a_sorted_difference_keeps_only_pages_not_named_before() {
        assert_eq!(difference(&[1, 2, 5, 9, 10], &[0, 2, 3, 9]), vec![1, 5, 10]);
        assert_eq!(difference(&[], &[1]), Vec::<u64>::new());
        assert_eq!(difference(&[4, 7], &[]), vec![4, 7]);
    }

    #[test]
    fn sorted_page_lists_merge_once_each() {
        assert_eq!(union(&[1, 4, 9], &[2, 4, 10, 11]), vec![1, 2, 4, 9, 10, 11]);
        assert_eq!(union(&[], &[3]), vec![3]);
        assert_eq!(union(&[5], &[]), vec![5]);
    }

    #[test]
    fn consecutive_pages_travel_as_one_range() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[4]), vec![(4, 1)]);
        assert_eq!(
            runs(&[0, 1, 2, 3, 7, 9, 10, 11]),
            vec![(0, 4), (7, 1), (9, 3)]
        );
    }
}
