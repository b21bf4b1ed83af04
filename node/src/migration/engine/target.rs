//! The target side of a sandbox transfer: every frame through the [`Receiver`], its steps
//! applied to the incoming VM, the commit made durable before the VM resumes.

use std::sync::Arc;
use std::time::Duration;

use drift_protocol::transfer::deadline::{ProgressGuard, ProgressLimits, Stall};
use drift_protocol::transfer::receiver::{Phase, Receiver, Step};
use drift_protocol::transfer::{
    Abort, AbortReason, Applied, Commit, MissingRanges, PageRequest, TransferFrame,
    MAX_PAGE_REQUEST, MAX_STALE_RANGES, PAGE_SIZE,
};
use drift_protocol::{MigrationId, SecretKey, Signed};
use tokio::sync::Mutex;

use super::{expect_done, EngineError, Hooks, Point, TargetOutcome, VmmAccess};
use crate::hypervisor::vmm::{Request, Response};
use crate::migration::link::{Incoming, Link, Outbound};
use crate::migration::recover::{DoorBell, RECOVER_TIMEOUT};

/// How the transfer ends when the source stops answering: a post-copy VM runs here already.
fn source_gone(receiver: &Receiver, why: &str) -> TargetOutcome {
    if receiver.phase() == Phase::PostCopy {
        TargetOutcome::Incomplete {
            reason: format!("the source went away during post-copy ({why})"),
        }
    } else {
        TargetOutcome::Aborted {
            reason: format!("the source went away ({why})"),
        }
    }
}

/// How the transfer ends when the source broke the progress deadlines.
fn stalled(receiver: &Receiver, stall: Stall) -> TargetOutcome {
    if receiver.phase() == Phase::PostCopy {
        TargetOutcome::Incomplete {
            reason: format!("post-copy {stall}"),
        }
    } else {
        TargetOutcome::Faulted {
            reason: stall.to_string(),
            code: AbortReason::Stalled,
        }
    }
}

/// Sends one frame and makes sure it is written.
async fn answer(out: &Mutex<Outbound>, frame: &TransferFrame) -> std::io::Result<()> {
    let mut out = out.lock().await;
    out.send(frame).await?;
    out.flush().await
}

/// Runs the target side for an accepted offer over `link`. `receiver` has taken the transfer's
/// `Start` already. The hook at [`Point::Verified`] must make the commit durable; the VM is
/// resumed only after it succeeds. The source is held to `limits` from here on (see
/// [`drift_protocol::transfer::deadline`]); a frame that does not decode, or that breaks the
/// protocol, ends the transfer with an `Abort` naming why.
#[allow(clippy::too_many_arguments)]
pub async fn run_target<V: VmmAccess + Clone + 'static, H: Hooks>(
    vm: &V,
    hooks: &H,
    link: Link,
    mut receiver: Receiver,
    id: MigrationId,
    key: &SecretKey,
    limits: ProgressLimits,
    mut door: Option<DoorBell>,
) -> Result<TargetOutcome, EngineError> {
    let Link { out, mut inbound } = link;
    let out = Arc::new(Mutex::new(out));
    let mut faults: Option<tokio::task::JoinHandle<()>> = None;
    let requested = Requested::default();
    let started = tokio::time::Instant::now();
    let now_ms = || started.elapsed().as_millis() as u64;
    let memory = receiver.page_count().saturating_mul(PAGE_SIZE as u64);
    let mut guard = ProgressGuard::new(limits, memory, 0);
    let outcome = loop {
        let check_at = started + Duration::from_millis(guard.next_check_ms());
        let next = tokio::time::timeout_at(check_at, inbound.recv()).await;
        let broken = match &next {
            Ok(None) => Some("the link closed".to_string()),
            Ok(Some(Err(e))) if e.abort_reason().is_none() => Some(e.to_string()),
            _ => None,
        };
        if let Some(why) = broken {
            // Post-copy: the VM runs here and the source keeps serving its pages; wait for
            // the source to open a new link rather than lose the VM.
            let Some(bell) = door
                .as_mut()
                .filter(|_| receiver.phase() == Phase::PostCopy)
            else {
                break source_gone(&receiver, &why);
            };
            tracing::warn!(migration = %id.short(), %why, missing = receiver.missing_count(),
                "post-copy link broke: the VM runs here; waiting for the source to recover");
            let Some(stream) = bell.wait(RECOVER_TIMEOUT).await else {
                break source_gone(
                    &receiver,
                    &format!("{why}; no recovery within {RECOVER_TIMEOUT:?}"),
                );
            };
            let Link {
                out: new_out,
                inbound: new_in,
            } = Link::stream(stream, Some(receiver.page_count()));
            *out.lock().await = new_out;
            inbound = new_in;
            if let Err(e) = relinked(&receiver, &out, &requested).await {
                break source_gone(&receiver, &format!("the recovered link failed: {e}"));
            }
            guard.on_frame(now_ms(), 0, 0);
            if faults.as_ref().is_none_or(|f| f.is_finished()) && receiver.missing_count() > 0 {
                faults = Some(forward_faults(vm.clone(), out.clone(), requested.clone()));
            }
            tracing::info!(migration = %id.short(), missing = receiver.missing_count(),
                "post-copy goes on over a new link");
            continue;
        }
        let incoming = match next {
            Ok(Some(Ok(f))) => f,
            // A link that closed or failed was handled above.
            Ok(None) => continue,
            Ok(Some(Err(e))) => match e.abort_reason() {
                None => continue,
                Some(_) if receiver.phase() == Phase::PostCopy => {
                    break TargetOutcome::Incomplete {
                        reason: format!("source broke the protocol during post-copy: {e}"),
                    };
                }
                Some(code) => {
                    let abort = TransferFrame::Abort(Abort {
                        id,
                        reason: code.clone(),
                    });
                    let _ = answer(&out, &abort).await;
                    break TargetOutcome::Faulted {
                        reason: format!("{}: {e}", e.label()),
                        code,
                    };
                }
            },
            Err(_) => match guard.check(now_ms()) {
                Ok(()) => continue,
                Err(stall) => {
                    let abort = TransferFrame::Abort(Abort {
                        id,
                        reason: AbortReason::Stalled,
                    });
                    let _ = answer(&out, &abort).await;
                    break stalled(&receiver, stall);
                }
            },
        };
        let pages = match &incoming {
            Incoming::Pages(c) => c.batch().entries.len() as u64,
            Incoming::Frame(_) => 0,
        };
        guard.on_frame(now_ms(), pages, pages * PAGE_SIZE as u64);
        let running_here = receiver.phase() == Phase::PostCopy;
        if matches!(incoming, Incoming::Frame(TransferFrame::Complete(_))) {
            tracing::debug!(migration = %id.short(), "switchover: complete received");
            hooks.at(Point::CompleteReceived).await?;
        }
        let taken = match &incoming {
            Incoming::Frame(frame) => receiver.on_frame(frame),
            Incoming::Pages(checked) => receiver.on_checked(checked),
        };
        let step = match taken {
            Ok(step) => step,
            // Post-copy: the VM already runs here and nowhere else; a bad frame must not
            // make anyone discard it.
            Err(e) if running_here => {
                break TargetOutcome::Incomplete {
                    reason: format!("source broke the protocol during post-copy: {e}"),
                };
            }
            Err(e) => {
                let code = e.abort_reason();
                let abort = TransferFrame::Abort(Abort {
                    id,
                    reason: code.clone(),
                });
                let _ = answer(&out, &abort).await;
                break TargetOutcome::Faulted {
                    reason: format!("protocol: {e}"),
                    code,
                };
            }
        };
        match step {
            Step::Continue => match &incoming {
                Incoming::Frame(TransferFrame::Stale(st)) => {
                    expect_done(vm, Request::MarkMissing(st.ranges.clone())).await?;
                }
                Incoming::Frame(TransferFrame::RoundEnd(r)) => {
                    if r.round >= 1 {
                        hooks.at(Point::RoundReceived(r.round)).await?;
                    }
                    // Every page of the round is in the VM (written in frame order).
                    let applied = TransferFrame::Applied(Applied { round: r.round });
                    if let Err(e) = answer(&out, &applied).await {
                        break source_gone(&receiver, &format!("cannot acknowledge: {e}"));
                    }
                }
                _ => {}
            },
            Step::WritePages(writes) => {
                let whole = match &incoming {
                    Incoming::Pages(c) if c.batch().entries.len() == writes.len() => {
                        Some(c.batch())
                    }
                    _ => None,
                };
                if !writes.is_empty() {
                    vm.write_pages(&writes, whole).await?;
                }
            }
            Step::LoadDevice(d) => expect_done(vm, Request::LoadDevice(d.to_vec())).await?,
            Step::LoadDeviceAndResume(d) => {
                expect_done(vm, Request::LoadDevice(d.to_vec())).await?;
                hooks.at(Point::ResumingPostCopy).await?;
                expect_done(vm, Request::Resume).await?;
                guard.vm_runs_here();
                faults = Some(forward_faults(vm.clone(), out.clone(), requested.clone()));
            }
            Step::Verified { root } => {
                let verified_at = std::time::Instant::now();
                tracing::debug!(migration = %id.short(), "switchover: root verified");
                if let Some(f) = faults.take() {
                    f.abort();
                    let _ = f.await;
                }
                hooks.at(Point::Verified(root)).await?;
                tracing::debug!(migration = %id.short(), after_ms = verified_at.elapsed().as_secs_f64() * 1e3, "switchover: commit recorded");
                expect_done(vm, Request::Resume).await?;
                let commit = Signed::sign(
                    &Commit {
                        id,
                        root,
                        committed_at: crate::clock::now(),
                    },
                    key,
                );
                // The VM runs here now, whatever happens to the link: a lost commit is what
                // the source's resolve query is for.
                let sent = answer(&out, &TransferFrame::Commit(commit)).await;
                tracing::debug!(migration = %id.short(), after_ms = verified_at.elapsed().as_secs_f64() * 1e3, "switchover: resumed, commit sent");
                if sent.is_ok() {
                    let _ = hooks.at(Point::CommitSent).await;
                }
                break TargetOutcome::Committed { root };
            }
            Step::Aborted(reason) => {
                break TargetOutcome::Aborted {
                    reason: format!("source aborted: {reason:?}"),
                };
            }
        }
        // The batch's pages are in the VM: its buffer serves the next batch.
        if let Incoming::Pages(checked) = incoming {
            crate::migration::buffers::give(checked.into_batch().data);
        }
    };
    if let Some(f) = faults {
        f.abort();
        let _ = f.await;
    }
    // The fault forwarder is gone: the outbound half is ours alone again.
    if let Ok(out) = Arc::try_unwrap(out) {
        out.into_inner().shut_down().await;
    }
    Ok(outcome)
}

/// Page numbers lately asked of the source (at most [`MAX_PAGE_REQUEST`]): after a recovered
/// link, those still missing are asked again, since the guest waits on them.
#[derive(Debug, Clone, Default)]
struct Requested(Arc<std::sync::Mutex<std::collections::VecDeque<u64>>>);

impl Requested {
    fn note(&self, pfns: &[u64]) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for &p in pfns {
            if q.len() == MAX_PAGE_REQUEST {
                q.pop_front();
            }
            q.push_back(p);
        }
    }

    fn still_missing(&self, receiver: &Receiver) -> Vec<u64> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<u64> = q
            .iter()
            .copied()
            .filter(|&p| receiver.is_missing(p))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// On a recovered link: names every page still missing (the last frame `done`), then asks
/// again for the pages the guest waits on.
async fn relinked(
    receiver: &Receiver,
    out: &Mutex<Outbound>,
    requested: &Requested,
) -> std::io::Result<()> {
    let ranges = receiver.missing_ranges();
    let chunks: Vec<&[(u64, u64)]> = if ranges.is_empty() {
        vec![&[]]
    } else {
        ranges.chunks(MAX_STALE_RANGES).collect()
    };
    let last = chunks.len() - 1;
    let mut o = out.lock().await;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let frame = TransferFrame::Missing(MissingRanges {
            ranges: chunk.to_vec(),
            done: i == last,
        });
        o.send(&frame).await?;
    }
    let again = requested.still_missing(receiver);
    if !again.is_empty() {
        o.send(&TransferFrame::PageRequest(PageRequest { pfns: again }))
            .await?;
    }
    o.flush().await
}

/// Post-copy: forwards the guest's page faults to the source as page requests.
fn forward_faults<V: VmmAccess + 'static>(
    vm: V,
    out: Arc<Mutex<Outbound>>,
    requested: Requested,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let Ok(Response::Pfns { pfns, remaining }) = vm
                .call(Request::Faults {
                    max: MAX_PAGE_REQUEST as u32,
                })
                .await
            else {
                return;
            };
            if !pfns.is_empty() {
                requested.note(&pfns);
                let req = TransferFrame::PageRequest(PageRequest { pfns });
                if answer(&out, &req).await.is_err() {
                    return;
                }
            }
            if remaining == 0 {
                return;
            }
        }
    })
}
