//! The transfer state machines, driven end to end over simulated memories: every mode moves
//! memory exactly, and every tampering, reordering or forgery ends the transfer before the VM
//! could run with memory the source did not have.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use drift_protocol::ids::{Hash, MigrationId};
use drift_protocol::migration::Mode;
use drift_protocol::transfer::receiver::{Accepted, Phase, ReceiveError, Receiver, Step};
use drift_protocol::transfer::recover::{
    check_recover_answer, validate_recover_request, RecoverAnswer, RecoverRefusal, RecoverRequest,
    Waiting,
};
use drift_protocol::transfer::sender::{SendError, Sender, SenderPhase, SenderStep};
use drift_protocol::transfer::{
    memory_root, page_leaf, Abort, AbortReason, Applied, Commit, Complete, DeviceState,
    MissingRanges, PageBatch, PageRequest, RoundEnd, StaleRanges, Start, TransferFrame,
    MAX_PAGES_PER_BATCH, PAGE_SIZE,
};
use drift_protocol::{SecretKey, Signed, Timestamp};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

const PAGES: u64 = 96;

struct World {
    source_key: SecretKey,
    target_key: SecretKey,
    accepted: Accepted,
    mem: Vec<Vec<u8>>,
    device: Vec<u8>,
}

fn page(pfn: u64, gen: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    p[..8].copy_from_slice(&pfn.to_le_bytes());
    p[8..16].copy_from_slice(&gen.to_le_bytes());
    p[16] = 0xAB;
    p
}

fn world(mode: Mode) -> World {
    let source_key = SecretKey::from_bytes(&[1; 32]);
    let target_key = SecretKey::from_bytes(&[2; 32]);
    // Every third page is zero.
    let mem = (0..PAGES)
        .map(|i| {
            if i % 3 == 0 {
                vec![0; PAGE_SIZE]
            } else {
                page(i, 1)
            }
        })
        .collect();
    World {
        accepted: Accepted {
            id: MigrationId::from_bytes([7; 16]),
            offer: Hash::of(b"offer"),
            source: source_key.public(),
            mode,
            page_count: PAGES,
            data_connections: 2,
        },
        source_key,
        target_key,
        mem,
        device: b"vcpu regs".to_vec(),
    }
}

impl World {
    fn start(&self) -> TransferFrame {
        TransferFrame::Start(Start {
            id: self.accepted.id,
            offer: self.accepted.offer,
            mode: self.accepted.mode,
            page_size: PAGE_SIZE as u32,
            page_count: PAGES,
            data_connections: 0,
        })
    }

    fn batches(&self, round: u32, pfns: &[u64]) -> Vec<TransferFrame> {
        pfns.chunks(MAX_PAGES_PER_BATCH)
            .map(|chunk| {
                TransferFrame::Pages(PageBatch::build(
                    round,
                    chunk.iter().map(|&p| (p, &self.mem[p as usize][..])),
                ))
            })
            .collect()
    }

    fn root(&self) -> Hash {
        let leaves: Vec<Hash> = self.mem.iter().map(|p| page_leaf(p)).collect();
        memory_root(&leaves, &Hash::of(&self.device))
    }

    fn complete(&self) -> TransferFrame {
        TransferFrame::Complete(Signed::sign(
            &Complete {
                id: self.accepted.id,
                offer: self.accepted.offer,
                root: self.root(),
                page_count: PAGES,
            },
            &self.source_key,
        ))
    }

    fn dirty(&mut self, pfns: &[u64], gen: u64) {
        for &p in pfns {
            self.mem[p as usize] = page(p, gen);
        }
    }
}

/// The target's memory and what it did.
struct Target {
    rx: Receiver,
    mem: Vec<Vec<u8>>,
    device: Option<Vec<u8>>,
    running: bool,
    verified: Option<Hash>,
}

impl Target {
    fn new(a: &Accepted) -> Self {
        Self {
            rx: Receiver::new(a.clone()),
            mem: vec![vec![0; PAGE_SIZE]; a.page_count as usize],
            device: None,
            running: false,
            verified: None,
        }
    }

    fn feed(&mut self, f: &TransferFrame) -> Result<(), ReceiveError> {
        match self.rx.on_frame(f)? {
            Step::Continue => {}
            Step::WritePages(w) => {
                for (pfn, data) in w {
                    self.mem[pfn as usize] =
                        data.map_or_else(|| vec![0; PAGE_SIZE], <[u8]>::to_vec);
                }
            }
            Step::LoadDevice(d) => self.device = Some(d.to_vec()),
            Step::LoadDeviceAndResume(d) => {
                self.device = Some(d.to_vec());
                self.running = true;
            }
            Step::Verified { root } => self.verified = Some(root),
            Step::Aborted(_) => {}
        }
        Ok(())
    }

    fn feed_all(&mut self, frames: &[TransferFrame]) -> Result<(), ReceiveError> {
        frames.iter().try_for_each(|f| self.feed(f))
    }
}

fn all() -> Vec<u64> {
    (0..PAGES).collect()
}

#[test]
fn precopy_moves_memory_exactly_and_commit_binds_the_root() {
    let mut w = world(Mode::PreCopy);
    let mut t = Target::new(&w.accepted);
    let mut tx = Sender::new(w.accepted.id, w.target_key.public(), Mode::PreCopy, PAGES);
    t.feed(&w.start()).unwrap();
    t.feed_all(&w.batches(0, &all())).unwrap();
    t.feed(&TransferFrame::RoundEnd(RoundEnd {
        round: 0,
        pages_sent: PAGES,
        dirty: 3,
    }))
    .unwrap();
    w.dirty(&[4, 5, 6], 2);
    t.feed_all(&w.batches(1, &[4, 5, 6])).unwrap();
    t.feed(&TransferFrame::RoundEnd(RoundEnd {
        round: 1,
        pages_sent: 3,
        dirty: 1,
    }))
    .unwrap();
    // Stop-and-copy: the VM is paused; the last dirty page, then the device state.
    w.dirty(&[5], 3);
    assert!(tx.may_resume_here());
    t.feed_all(&w.batches(2, &[5])).unwrap();
    t.feed(&TransferFrame::DeviceState(DeviceState::new(
        w.device.clone(),
    )))
    .unwrap();
    assert!(
        !t.running,
        "pre-copy must not resume before the root verifies"
    );
    let complete = w.complete();
    tx.complete_sent(w.root());
    assert!(
        !tx.may_resume_here(),
        "outcome unknown until the target answers"
    );
    t.feed(&complete).unwrap();
    assert_eq!(t.verified, Some(w.root()));
    assert_eq!(t.mem, w.mem);
    assert_eq!(t.device.as_deref(), Some(&w.device[..]));
    assert_eq!(t.rx.phase(), Phase::Verified);
    assert_eq!(t.rx.stats().rounds, 2);

    // A commit by someone else, or for another root, is refused; the real one is accepted.
    let commit = |root, key: &SecretKey| {
        TransferFrame::Commit(Signed::sign(
            &Commit {
                id: w.accepted.id,
                root,
                committed_at: Timestamp(1),
            },
            key,
        ))
    };
    assert!(matches!(
        tx.clone().on_frame(&commit(w.root(), &w.source_key)),
        Err(SendError::CommitSignature(_))
    ));
    assert!(matches!(
        tx.clone()
            .on_frame(&commit(Hash::of(b"other"), &w.target_key)),
        Err(SendError::CommitRoot { .. })
    ));
    let step = tx.on_frame(&commit(w.root(), &w.target_key)).unwrap();
    assert!(matches!(step, SenderStep::Committed(c) if c.root == w.root()));
    assert_eq!(tx.phase(), SenderPhase::Committed);
    assert!(!tx.may_resume_here());
}

/// Batches a node checked as they arrived ([`PageBatch::into_checked`]) move memory exactly as
/// the same `Pages` frames do; a batch checked against another memory size is refused.
#[test]
fn checked_batches_move_memory_as_pages_frames_do() {
    let w = world(Mode::PreCopy);
    let mut by_frames = Target::new(&w.accepted);
    let mut by_checked = Target::new(&w.accepted);
    by_frames.feed(&w.start()).unwrap();
    by_checked.feed(&w.start()).unwrap();
    for frame in w.batches(0, &all()) {
        by_frames.feed(&frame).unwrap();
        let TransferFrame::Pages(batch) = frame else {
            unreachable!()
        };
        let checked = batch.into_checked(PAGES).unwrap();
        match by_checked.rx.on_checked(&checked).unwrap() {
            Step::WritePages(writes) => {
                for (pfn, data) in writes {
                    by_checked.mem[pfn as usize] =
                        data.map_or_else(|| vec![0; PAGE_SIZE], <[u8]>::to_vec);
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(by_checked.mem, by_frames.mem);
    assert_eq!(by_checked.rx.stats(), by_frames.rx.stats());

    // Checked against a larger memory: its page numbers were never checked against this one.
    let TransferFrame::Pages(batch) = &w.batches(1, &[3])[0] else {
        unreachable!()
    };
    let elsewhere = batch.clone().into_checked(PAGES + 1).unwrap();
    assert!(by_checked.rx.clone().on_checked(&elsewhere).is_err());
    // Out of order: a checked batch before the transfer started is refused too.
    let mut fresh = Receiver::new(w.accepted.clone());
    let checked = batch.clone().into_checked(PAGES).unwrap();
    assert!(matches!(
        fresh.on_checked(&checked),
        Err(ReceiveError::OutOfOrder { .. })
    ));
    assert_eq!(fresh.phase(), Phase::Aborted);
}

/// The target's acknowledgement of a round reaches the source while it copies (and may cross
/// the switchover), never once the transfer is over.
#[test]
fn the_source_takes_round_acknowledgements_until_the_transfer_ends() {
    let w = world(Mode::PreCopy);
    let applied = |round| TransferFrame::Applied(Applied { round });
    let mut tx = Sender::new(w.accepted.id, w.target_key.public(), Mode::PreCopy, PAGES);
    assert_eq!(tx.on_frame(&applied(0)), Ok(SenderStep::Applied(0)));
    assert_eq!(tx.on_frame(&applied(3)), Ok(SenderStep::Applied(3)));
    tx.complete_sent(w.root());
    assert_eq!(tx.on_frame(&applied(4)), Ok(SenderStep::Applied(4)));
    tx.abandon();
    let mut done = Sender::new(w.accepted.id, w.target_key.public(), Mode::PreCopy, PAGES);
    done.abandon();
    assert!(matches!(
        done.on_frame(&applied(0)),
        Err(SendError::OutOfOrder { .. })
    ));
}

/// `Start` may name no more data connections than the target granted.
#[test]
fn start_names_at_most_the_granted_data_connections() {
    let w = world(Mode::PreCopy);
    for (n, ok) in [(0, true), (2, true), (3, false)] {
        let mut rx = Receiver::new(w.accepted.clone());
        let start = TransferFrame::Start(Start {
            id: w.accepted.id,
            offer: w.accepted.offer,
            mode: w.accepted.mode,
            page_size: PAGE_SIZE as u32,
            page_count: PAGES,
            data_connections: n,
        });
        assert_eq!(rx.on_frame(&start).is_ok(), ok, "{n} connections");
    }
}

#[test]
fn a_round_carries_every_page_at_most_once_and_empty_batches_are_bounded() {
    let w = world(Mode::PreCopy);
    // The whole memory twice in one round.
    let mut t = Target::new(&w.accepted);
    t.feed(&w.start()).unwrap();
    t.feed_all(&w.batches(0, &all())).unwrap();
    let again = w.batches(0, &all());
    let e = t.feed_all(&again).unwrap_err();
    assert!(
        matches!(e, ReceiveError::RoundTooLarge { round: 0, .. }),
        "{e}"
    );
    assert_eq!(e.abort_reason(), AbortReason::Protocol);
    // A new round may carry every page again.
    let mut t = Target::new(&w.accepted);
    t.feed(&w.start()).unwrap();
    t.feed_all(&w.batches(0, &all())).unwrap();
    t.feed(&TransferFrame::RoundEnd(RoundEnd {
        round: 0,
        pages_sent: PAGES,
        dirty: PAGES,
    }))
    .unwrap();
    t.feed_all(&w.batches(1, &all())).unwrap();
    // Empty batches: at most one more than the VM has pages.
    let mut t = Target::new(&w.accepted);
    t.feed(&w.start()).unwrap();
    let empty = TransferFrame::Pages(PageBatch::build(0, std::iter::empty::<(u64, &[u8])>()));
    for _ in 0..=PAGES {
        t.feed(&empty).unwrap();
    }
    assert!(matches!(
        t.feed(&empty),
        Err(ReceiveError::RoundTooLarge { batches, .. }) if batches == PAGES + 2
    ));
}

#[test]
fn postcopy_resumes_at_once_applies_only_missing_pages_and_verifies_the_switchover_memory() {
    let w = world(Mode::PostCopy);
    let mut t = Target::new(&w.accepted);
    let mut tx = Sender::new(w.accepted.id, w.target_key.public(), Mode::PostCopy, PAGES);
    t.feed(&w.start()).unwrap();
    // Every non-zero page is stale (the target starts all zero).
    let nonzero: Vec<u64> = all().into_iter().filter(|p| p % 3 != 0).collect();
    let ranges = nonzero.iter().map(|&p| (p, 1)).collect();
    t.feed(&TransferFrame::Stale(StaleRanges { ranges }))
        .unwrap();
    tx.switched();
    assert!(!tx.may_resume_here());
    t.feed(&TransferFrame::DeviceState(DeviceState::new(
        w.device.clone(),
    )))
    .unwrap();
    assert!(t.running, "post-copy resumes at switchover");
    assert_eq!(t.rx.missing_count(), nonzero.len() as u64);
    assert!(t.rx.is_missing(1) && !t.rx.is_missing(0));

    // The VM faults on page 7: the target asks, the source serves it first.
    let step = tx
        .on_frame(&TransferFrame::PageRequest(PageRequest { pfns: vec![7] }))
        .unwrap();
    assert_eq!(step, SenderStep::ServePages(vec![7]));
    t.feed_all(&w.batches(3, &[7])).unwrap();
    // The VM now writes page 7 and page 0 (present) locally.
    t.mem[7] = page(7, 99);
    t.mem[0] = page(0, 99);
    // The background push sends everything, page 7 again included: the duplicate is ignored.
    t.feed_all(&w.batches(3, &nonzero)).unwrap();
    assert_eq!(
        t.mem[7],
        page(7, 99),
        "a duplicate page undid the VM's own write"
    );
    assert_eq!(t.rx.missing_count(), 0);
    t.feed(&w.complete()).unwrap();
    assert_eq!(t.verified, Some(w.root()));
    // Apart from the VM's own writes, the target holds exactly the switchover memory.
    for (i, (a, b)) in t.mem.iter().zip(&w.mem).enumerate() {
        if i != 0 && i != 7 {
            assert_eq!(a, b, "page {i}");
        }
    }
}

#[test]
fn hybrid_marks_redirtied_pages_missing() {
    let mut w = world(Mode::Hybrid);
    let mut t = Target::new(&w.accepted);
    t.feed(&w.start()).unwrap();
    t.feed_all(&w.batches(0, &all())).unwrap();
    t.feed(&TransferFrame::RoundEnd(RoundEnd {
        round: 0,
        pages_sent: PAGES,
        dirty: 2,
    }))
    .unwrap();
    w.dirty(&[10, 11], 5);
    t.feed(&TransferFrame::Stale(StaleRanges {
        ranges: vec![(10, 2)],
    }))
    .unwrap();
    t.feed(&TransferFrame::DeviceState(DeviceState::new(
        w.device.clone(),
    )))
    .unwrap();
    assert!(t.running);
    assert_eq!(t.rx.missing_count(), 2);
    // Complete before the missing pages arrive is refused.
    let mut early = Target::new(&w.accepted);
    early.feed(&w.start()).unwrap();
    early
        .feed(&TransferFrame::Stale(StaleRanges {
            ranges: vec![(10, 2)],
        }))
        .unwrap();
    early
        .feed(&TransferFrame::DeviceState(DeviceState::new(
            w.device.clone(),
        )))
        .unwrap();
    assert!(matches!(
        early.feed(&w.complete()),
        Err(ReceiveError::PagesMissing(2))
    ));
    t.feed_all(&w.batches(1, &[10, 11])).unwrap();
    t.feed(&w.complete()).unwrap();
    assert_eq!(t.mem, w.mem);
}

#[test]
fn hybrid_rounds_that_converge_end_as_precopy_with_no_postcopy_window() {
    let w = world(Mode::Hybrid);
    let mut t = Target::new(&w.accepted);
    t.feed(&w.start()).unwrap();
    t.feed_all(&w.batches(0, &all())).unwrap();
    t.feed(&TransferFrame::RoundEnd(RoundEnd {
        round: 0,
        pages_sent: PAGES,
        dirty: 0,
    }))
    .unwrap();
    // Nothing named stale: the device state is a pre-copy ending.
    t.feed(&TransferFrame::DeviceState(DeviceState::new(
        w.device.clone(),
    )))
    .unwrap();
    assert!(!t.running, "the VM must wait for the verified root");
    assert_eq!(t.rx.phase(), Phase::AwaitComplete);
    t.feed(&w.complete()).unwrap();
    assert_eq!(t.verified, Some(w.root()));
    // Pre-copy still refuses stale ranges: it never agreed to post-copy.
    let p = world(Mode::PreCopy);
    let mut strict = Target::new(&p.accepted);
    strict.feed(&p.start()).unwrap();
    assert!(matches!(
        strict.feed(&TransferFrame::Stale(StaleRanges {
            ranges: vec![(1, 1)]
        })),
        Err(ReceiveError::OutOfOrder { .. })
    ));
}

#[test]
fn after_a_recovered_link_the_target_names_what_it_lacks_and_the_source_takes_only_that() {
    let w = world(Mode::PostCopy);
    let mut t = Target::new(&w.accepted);
    let mut tx = Sender::new(w.accepted.id, w.target_key.public(), Mode::PostCopy, PAGES);
    t.feed(&w.start()).unwrap();
    t.feed(&TransferFrame::Stale(StaleRanges {
        ranges: vec![(0, PAGES)],
    }))
    .unwrap();
    tx.switched();
    t.feed(&TransferFrame::DeviceState(DeviceState::new(
        w.device.clone(),
    )))
    .unwrap();
    // Pages 0..40 and 50 arrived before the link broke.
    let arrived: Vec<u64> = (0..40).chain([50]).collect();
    t.feed_all(&w.batches(0, &arrived)).unwrap();
    let missing = t.rx.missing_ranges();
    assert_eq!(missing, vec![(40, 10), (51, PAGES - 51)]);
    assert_eq!(
        missing.iter().map(|r| r.1).sum::<u64>(),
        t.rx.missing_count()
    );
    let step = tx
        .on_frame(&TransferFrame::Missing(MissingRanges {
            ranges: missing.clone(),
            done: true,
        }))
        .unwrap();
    assert_eq!(
        step,
        SenderStep::Missing {
            ranges: missing,
            done: true
        }
    );
    // A range beyond the VM is refused.
    assert!(matches!(
        tx.on_frame(&TransferFrame::Missing(MissingRanges {
            ranges: vec![(PAGES - 1, 2)],
            done: true,
        })),
        Err(SendError::BadRange { .. })
    ));
    // The rest arrives, the root verifies.
    let rest: Vec<u64> = (40..50).chain(51..PAGES).collect();
    t.feed_all(&w.batches(0, &rest)).unwrap();
    t.feed(&w.complete()).unwrap();
    assert_eq!(t.verified, Some(w.root()));
    // Before the switchover a Missing frame is out of order.
    let mut early = Sender::new(w.accepted.id, w.target_key.public(), Mode::PostCopy, PAGES);
    assert!(matches!(
        early.on_frame(&TransferFrame::Missing(MissingRanges {
            ranges: vec![],
            done: true
        })),
        Err(SendError::OutOfOrder { .. })
    ));
}

#[test]
fn a_recovery_is_taken_only_from_the_source_for_its_waiting_migration_and_never_twice() {
    let w = world(Mode::PostCopy);
    let me = w.target_key.public();
    let source = w.source_key.public();
    let now = Timestamp(1_000_000);
    let waiting = Waiting {
        id: w.accepted.id,
        offer: w.accepted.offer,
        source,
        last_attempt: 1,
    };
    let request = |attempt: u32, issued_at: Timestamp| RecoverRequest {
        id: w.accepted.id,
        offer: w.accepted.offer,
        source,
        target: me,
        attempt,
        issued_at,
    };
    let check = |req: &RecoverRequest,
                 key: &SecretKey,
                 peer: &drift_protocol::NodeId,
                 waiting: Option<&Waiting>| {
        validate_recover_request(
            &Signed::sign(req, key),
            peer,
            &me,
            waiting,
            now,
            30_000,
            5_000,
        )
    };
    let good = request(2, now);
    assert_eq!(
        check(&good, &w.source_key, &source, Some(&waiting)),
        Ok(good.clone())
    );
    // Signed by another key, or arriving from another peer.
    let other = SecretKey::from_bytes(&[9; 32]);
    let other_id = other.public();
    assert_eq!(
        check(&good, &other, &source, Some(&waiting)),
        Err(RecoverRefusal::BadSignature)
    );
    assert_eq!(
        check(&good, &w.source_key, &other_id, Some(&waiting)),
        Err(RecoverRefusal::BadSignature)
    );
    // For another node.
    let elsewhere = RecoverRequest {
        target: other_id,
        ..good.clone()
    };
    assert_eq!(
        check(&elsewhere, &w.source_key, &source, Some(&waiting)),
        Err(RecoverRefusal::NotForMe)
    );
    // Nothing waits, or something else does.
    assert_eq!(
        check(&good, &w.source_key, &source, None),
        Err(RecoverRefusal::NotWaiting)
    );
    let another = Waiting {
        id: MigrationId::from_bytes([8; 16]),
        ..waiting.clone()
    };
    assert_eq!(
        check(&good, &w.source_key, &source, Some(&another)),
        Err(RecoverRefusal::NotWaiting)
    );
    let wrong_offer = RecoverRequest {
        offer: Hash::of(b"another offer"),
        ..good.clone()
    };
    assert_eq!(
        check(&wrong_offer, &w.source_key, &source, Some(&waiting)),
        Err(RecoverRefusal::WrongOffer)
    );
    // A replayed (or older) attempt, and stale or future requests.
    assert_eq!(
        check(&request(1, now), &w.source_key, &source, Some(&waiting)),
        Err(RecoverRefusal::Replayed)
    );
    assert_eq!(
        check(
            &request(3, Timestamp(now.0 - 31_000)),
            &w.source_key,
            &source,
            Some(&waiting)
        ),
        Err(RecoverRefusal::Expired)
    );
    assert_eq!(
        check(
            &request(3, Timestamp(now.0 + 6_000)),
            &w.source_key,
            &source,
            Some(&waiting)
        ),
        Err(RecoverRefusal::Expired)
    );
    // The answer must come from the target, for this very request.
    let signed = Signed::sign(&good, &w.source_key);
    let answer = |refusal, request| RecoverAnswer {
        id: good.id,
        request,
        target: me,
        refusal,
    };
    let ok = Signed::sign(&answer(None, signed.hash()), &w.target_key);
    assert_eq!(check_recover_answer(&ok, &signed, &good), Ok(None));
    let no = Signed::sign(
        &answer(Some(RecoverRefusal::NotWaiting), signed.hash()),
        &w.target_key,
    );
    assert_eq!(
        check_recover_answer(&no, &signed, &good),
        Ok(Some(RecoverRefusal::NotWaiting))
    );
    let forged = Signed::sign(&answer(None, signed.hash()), &other);
    assert!(check_recover_answer(&forged, &signed, &good).is_err());
    let for_another = Signed::sign(&answer(None, Hash::of(b"other request")), &w.target_key);
    assert!(check_recover_answer(&for_another, &signed, &good).is_err());
}

/// A pre-copy transfer up to (not including) `Complete`.
fn precopy_frames(w: &World) -> Vec<TransferFrame> {
    let mut f = vec![w.start()];
    f.extend(w.batches(0, &all()));
    f.push(TransferFrame::DeviceState(DeviceState::new(
        w.device.clone(),
    )));
    f
}

#[test]
fn tampering_forgery_and_disorder_abort_before_anything_runs() {
    let w = world(Mode::PreCopy);
    let good = precopy_frames(&w);

    // A flipped bit in page data (hash not fixed up): the batch is refused.
    let mut t = Target::new(&w.accepted);
    let mut frames = good.clone();
    if let TransferFrame::Pages(b) = &mut frames[1] {
        b.data[100] ^= 1;
    }
    let err = t.feed_all(&frames).unwrap_err();
    assert_eq!(err.abort_reason(), AbortReason::BadBatch);
    assert_eq!(t.rx.phase(), Phase::Aborted);
    assert!(!t.running && t.verified.is_none());

    // A malicious source that re-hashes its altered batch: caught by the signed root.
    let mut t = Target::new(&w.accepted);
    let mut frames = good.clone();
    if let TransferFrame::Pages(b) = &mut frames[1] {
        b.data[100] ^= 1;
        b.hash = PageBatch::compute_hash(b.round, &b.entries, &b.data);
    }
    t.feed_all(&frames).unwrap();
    let err = t.feed(&w.complete()).unwrap_err();
    assert!(matches!(err, ReceiveError::BadRoot { .. }));
    assert_eq!(err.abort_reason(), AbortReason::BadRoot);
    assert!(t.verified.is_none());

    // A Complete signed by anyone but the source.
    let mut t = Target::new(&w.accepted);
    t.feed_all(&good).unwrap();
    let forged = TransferFrame::Complete(Signed::sign(
        &Complete {
            id: w.accepted.id,
            offer: w.accepted.offer,
            root: w.root(),
            page_count: PAGES,
        },
        &w.target_key,
    ));
    assert!(matches!(
        t.feed(&forged),
        Err(ReceiveError::CompleteSignature(_))
    ));

    // Out of order: Complete before the device state, pages before Start, a wrong round.
    let mut t = Target::new(&w.accepted);
    t.feed(&w.start()).unwrap();
    assert!(matches!(
        t.feed(&w.complete()),
        Err(ReceiveError::OutOfOrder { .. })
    ));
    let mut t = Target::new(&w.accepted);
    assert!(matches!(
        t.feed(&w.batches(0, &[1])[0]),
        Err(ReceiveError::OutOfOrder { .. })
    ));
    let mut t = Target::new(&w.accepted);
    t.feed(&w.start()).unwrap();
    assert!(matches!(
        t.feed(&w.batches(4, &[1])[0]),
        Err(ReceiveError::WrongRound {
            expected: 0,
            got: 4
        })
    ));

    // A Start that does not match the accepted offer.
    for bad in [
        Start {
            id: MigrationId::from_bytes([9; 16]),
            offer: w.accepted.offer,
            mode: Mode::PreCopy,
            page_size: 4096,
            page_count: PAGES,
            data_connections: 0,
        },
        Start {
            id: w.accepted.id,
            offer: Hash::of(b"x"),
            mode: Mode::PreCopy,
            page_size: 4096,
            page_count: PAGES,
            data_connections: 0,
        },
        Start {
            id: w.accepted.id,
            offer: w.accepted.offer,
            mode: Mode::PostCopy,
            page_size: 4096,
            page_count: PAGES,
            data_connections: 0,
        },
        Start {
            id: w.accepted.id,
            offer: w.accepted.offer,
            mode: Mode::PreCopy,
            page_size: 512,
            page_count: PAGES,
            data_connections: 0,
        },
        Start {
            id: w.accepted.id,
            offer: w.accepted.offer,
            mode: Mode::PreCopy,
            page_size: 4096,
            page_count: PAGES * 1000,
            data_connections: 0,
        },
    ] {
        let mut t = Target::new(&w.accepted);
        assert!(t.feed(&TransferFrame::Start(bad)).is_err());
    }

    // Stale ranges in pre-copy, ranges beyond memory, frames only the target sends.
    let mut t = Target::new(&w.accepted);
    t.feed(&w.start()).unwrap();
    assert!(t
        .feed(&TransferFrame::Stale(StaleRanges {
            ranges: vec![(0, 1)]
        }))
        .is_err());
    let wp = world(Mode::PostCopy);
    let mut t = Target::new(&wp.accepted);
    t.feed(&wp.start()).unwrap();
    assert!(matches!(
        t.feed(&TransferFrame::Stale(StaleRanges {
            ranges: vec![(PAGES - 1, 2)]
        })),
        Err(ReceiveError::BadRange { .. })
    ));
    let mut t = Target::new(&wp.accepted);
    t.feed(&wp.start()).unwrap();
    assert!(matches!(
        t.feed(&TransferFrame::Stale(StaleRanges {
            ranges: vec![(u64::MAX, 2)]
        })),
        Err(ReceiveError::BadRange { .. })
    ));
    // Ranges that together name more pages than the VM has: refused, so a malicious source
    // cannot make the target loop over its memory again and again.
    let mut t = Target::new(&wp.accepted);
    t.feed(&wp.start()).unwrap();
    t.feed(&TransferFrame::Stale(StaleRanges {
        ranges: vec![(0, PAGES)],
    }))
    .unwrap();
    assert!(matches!(
        t.feed(&TransferFrame::Stale(StaleRanges {
            ranges: vec![(0, 1)]
        })),
        Err(ReceiveError::BadRange { .. })
    ));
    let mut t = Target::new(&w.accepted);
    t.feed(&w.start()).unwrap();
    assert!(t
        .feed(&TransferFrame::PageRequest(PageRequest { pfns: vec![1] }))
        .is_err());

    // The source's Abort ends it cleanly; an Abort for another migration does not.
    let mut t = Target::new(&w.accepted);
    t.feed_all(&good[..2]).unwrap();
    assert!(t
        .feed(&TransferFrame::Abort(Abort {
            id: MigrationId::from_bytes([3; 16]),
            reason: AbortReason::Cancelled
        }))
        .is_err());
    let mut t = Target::new(&w.accepted);
    t.feed_all(&good[..2]).unwrap();
    t.feed(&TransferFrame::Abort(Abort {
        id: w.accepted.id,
        reason: AbortReason::Cancelled,
    }))
    .unwrap();
    assert_eq!(t.rx.phase(), Phase::Aborted);
}

#[test]
fn the_source_resumes_only_when_the_target_cannot_be_running_the_vm() {
    let w = world(Mode::PreCopy);
    let abort = TransferFrame::Abort(Abort {
        id: w.accepted.id,
        reason: AbortReason::BadRoot,
    });

    // Pre-copy: the target refuses the root after Complete: the source resumes.
    let mut tx = Sender::new(w.accepted.id, w.target_key.public(), Mode::PreCopy, PAGES);
    tx.complete_sent(w.root());
    assert!(!tx.may_resume_here());
    assert_eq!(
        tx.on_frame(&abort).unwrap(),
        SenderStep::TargetAborted {
            reason: AbortReason::BadRoot,
            resume_here: true
        }
    );
    assert!(tx.may_resume_here());

    // Post-copy: after switchover the VM is the target's, whatever happens.
    let mut tx = Sender::new(w.accepted.id, w.target_key.public(), Mode::PostCopy, PAGES);
    tx.switched();
    assert!(!tx.abandon());
    assert_eq!(
        tx.on_frame(&abort).unwrap(),
        SenderStep::TargetAborted {
            reason: AbortReason::BadRoot,
            resume_here: false
        }
    );
    assert!(!tx.may_resume_here());

    // A local cancel before switchover resumes; page requests before switchover are refused.
    let mut tx = Sender::new(w.accepted.id, w.target_key.public(), Mode::PostCopy, PAGES);
    assert!(tx
        .on_frame(&TransferFrame::PageRequest(PageRequest { pfns: vec![1] }))
        .is_err());
    let mut tx = Sender::new(w.accepted.id, w.target_key.public(), Mode::PreCopy, PAGES);
    assert!(tx.abandon());
    // Requests for pages beyond memory are refused.
    let mut tx = Sender::new(w.accepted.id, w.target_key.public(), Mode::PostCopy, PAGES);
    tx.switched();
    assert!(tx
        .on_frame(&TransferFrame::PageRequest(PageRequest {
            pfns: vec![PAGES]
        }))
        .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any mode, any dirtying pattern: the target ends with the source's switchover memory;
    /// and one corrupted byte anywhere in the page data never ends in a verified transfer.
    #[test]
    fn any_dirtying_pattern_moves_memory_exactly(
        mode in prop_oneof![Just(Mode::PreCopy), Just(Mode::PostCopy), Just(Mode::Hybrid)],
        rounds in proptest::collection::vec(proptest::collection::vec(0..PAGES, 0..20), 0..4),
        corrupt in proptest::option::of((0usize..64, 0usize..PAGE_SIZE)),
    ) {
        let mut w = world(mode);
        let mut frames = vec![w.start()];
        let mut round = 0u32;
        let mut stale: Vec<u64> = Vec::new();
        if mode != Mode::PostCopy {
            frames.extend(w.batches(0, &all()));
            frames.push(TransferFrame::RoundEnd(RoundEnd { round: 0, pages_sent: PAGES, dirty: 0 }));
            round = 1;
            for (gen, dirty) in rounds.iter().enumerate() {
                w.dirty(dirty, gen as u64 + 10);
                let mut d = dirty.clone();
                d.sort_unstable();
                d.dedup();
                if mode == Mode::Hybrid && gen + 1 == rounds.len() {
                    stale = d;
                } else {
                    frames.extend(w.batches(round, &d));
                    frames.push(TransferFrame::RoundEnd(RoundEnd { round, pages_sent: d.len() as u64, dirty: 0 }));
                    round += 1;
                }
            }
        } else {
            stale = all().into_iter().filter(|p| w.mem[*p as usize].iter().any(|b| *b != 0)).collect();
        }
        if mode != Mode::PreCopy {
            frames.push(TransferFrame::Stale(StaleRanges { ranges: stale.iter().map(|&p| (p, 1)).collect() }));
        }
        frames.push(TransferFrame::DeviceState(DeviceState::new(w.device.clone())));
        if mode != Mode::PreCopy {
            frames.extend(w.batches(round, &stale));
        }
        frames.push(w.complete());

        let mut corrupted = false;
        if let Some((which, at)) = corrupt {
            let batches: Vec<usize> = frames.iter().enumerate()
                .filter(|(_, f)| matches!(f, TransferFrame::Pages(b) if !b.data.is_empty()))
                .map(|(i, _)| i).collect();
            if !batches.is_empty() {
                if let TransferFrame::Pages(b) = &mut frames[batches[which % batches.len()]] {
                    let at = at % b.data.len();
                    b.data[at] ^= 0x40;
                    corrupted = true;
                }
            }
        }
        let mut t = Target::new(&w.accepted);
        let result = t.feed_all(&frames);
        if corrupted {
            prop_assert!(result.is_err());
            prop_assert!(t.verified.is_none());
        } else {
            prop_assert!(result.is_ok(), "{:?}", result);
            prop_assert_eq!(t.verified, Some(w.root()));
            prop_assert!(t.mem == w.mem);
        }
    }
}

/// Any frame with any values, in any order.
fn any_frame(w: &World) -> impl Strategy<Value = TransferFrame> {
    let id = w.accepted.id;
    let offer = w.accepted.offer;
    let complete = w.complete();
    let key = SecretKey::from_bytes(&[2; 32]);
    prop_oneof![
        (
            any::<bool>(),
            0u64..PAGES * 2,
            prop_oneof![
                Just(Mode::PreCopy),
                Just(Mode::PostCopy),
                Just(Mode::Hybrid)
            ]
        )
            .prop_map(move |(same, pc, mode)| TransferFrame::Start(Start {
                id: if same {
                    id
                } else {
                    MigrationId::from_bytes([0; 16])
                },
                offer,
                mode,
                page_size: 4096,
                page_count: if same { PAGES } else { pc },
                data_connections: if same { 2 } else { 3 },
            })),
        (
            0u32..4,
            proptest::collection::vec((0u64..PAGES + 3, any::<u8>()), 0..8)
        )
            .prop_map(|(round, pages)| {
                let data: Vec<Vec<u8>> = pages.iter().map(|(_, b)| vec![*b; PAGE_SIZE]).collect();
                TransferFrame::Pages(PageBatch::build(
                    round,
                    pages.iter().zip(&data).map(|((p, _), d)| (*p, &d[..])),
                ))
            }),
        (0u32..4).prop_map(|round| TransferFrame::RoundEnd(RoundEnd {
            round,
            pages_sent: 0,
            dirty: 0
        })),
        proptest::collection::vec((any::<u64>(), 0u64..PAGES), 0..4)
            .prop_map(|ranges| TransferFrame::Stale(StaleRanges { ranges })),
        proptest::collection::vec(any::<u8>(), 0..32)
            .prop_map(|b| TransferFrame::DeviceState(DeviceState::new(b))),
        Just(complete),
        any::<bool>().prop_map(move |same| TransferFrame::Abort(Abort {
            id: if same {
                id
            } else {
                MigrationId::from_bytes([5; 16])
            },
            reason: AbortReason::Protocol,
        })),
        proptest::collection::vec(0u64..PAGES * 2, 0..4)
            .prop_map(|pfns| TransferFrame::PageRequest(PageRequest { pfns })),
        any::<u64>().prop_map(move |r| TransferFrame::Commit(Signed::sign(
            &Commit {
                id,
                root: Hash::of(&r.to_le_bytes()),
                committed_at: Timestamp(r)
            },
            &key,
        ))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The machines never panic on any sequence of frames, stop taking frames once they end,
    /// and the target never verifies unless its memory is exactly the source's.
    #[test]
    fn machines_survive_any_frame_sequence(
        mode in prop_oneof![Just(Mode::PreCopy), Just(Mode::PostCopy), Just(Mode::Hybrid)],
        seed in any::<u64>(),
    ) {
        let w = world(mode);
        let mut runner = proptest::test_runner::TestRunner::new_with_rng(
            ProptestConfig::default(),
            proptest::test_runner::TestRng::from_seed(
                proptest::test_runner::RngAlgorithm::ChaCha,
                &[&seed.to_le_bytes()[..], &[0u8; 24]].concat(),
            ),
        );
        let strategy = proptest::collection::vec(any_frame(&w), 0..24);
        let frames = strategy.new_tree(&mut runner).unwrap().current();
        let mut t = Target::new(&w.accepted);
        let mut tx = Sender::new(w.accepted.id, w.target_key.public(), mode, PAGES);
        for f in &frames {
            let before = t.rx.phase();
            let r = t.feed(f);
            if matches!(before, Phase::Aborted | Phase::Verified) {
                prop_assert!(r.is_err(), "a finished transfer took {:?}", f);
            }
            let _ = tx.on_frame(f);
        }
        if t.verified.is_some() {
            prop_assert!(t.mem == w.mem);
        }
    }
}

/// A post-copy target with many pages, a few hundred stale, fed full batches: every batch
/// takes its pages off the missing set (a regression test for the bit set's bookkeeping).
#[test]
fn large_postcopy_bookkeeping() {
    let pages = 81_920u64;
    let key = SecretKey::from_bytes(&[1; 32]);
    let accepted = Accepted {
        id: MigrationId::from_bytes([1; 16]),
        offer: Hash::of(b"offer"),
        source: key.public(),
        mode: Mode::PostCopy,
        page_count: pages,
        data_connections: 0,
    };
    let mut rx = Receiver::new(accepted.clone());
    rx.on_frame(&TransferFrame::Start(Start {
        id: accepted.id,
        offer: accepted.offer,
        mode: Mode::PostCopy,
        page_size: PAGE_SIZE as u32,
        page_count: pages,
        data_connections: 0,
    }))
    .unwrap();
    let stale: Vec<u64> = (0..800).map(|i| 1 + i * 97).collect();
    rx.on_frame(&TransferFrame::Stale(StaleRanges {
        ranges: stale.iter().map(|&p| (p, 1)).collect(),
    }))
    .unwrap();
    rx.on_frame(&TransferFrame::DeviceState(DeviceState::new(vec![1])))
        .unwrap();
    assert_eq!(rx.missing_count(), 800);
    let data = vec![7u8; PAGE_SIZE];
    let mut left = 800;
    for chunk in stale.chunks(MAX_PAGES_PER_BATCH) {
        let frame =
            TransferFrame::Pages(PageBatch::build(0, chunk.iter().map(|&p| (p, &data[..]))));
        let Step::WritePages(w) = rx.on_frame(&frame).unwrap() else {
            panic!("pages expected")
        };
        assert_eq!(w.len(), chunk.len());
        left -= chunk.len() as u64;
        assert_eq!(rx.missing_count(), left);
        assert!(chunk.iter().all(|&p| !rx.is_missing(p)));
    }
}
