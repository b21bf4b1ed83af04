//! Convergence control of pre-copy migrations (`drift_protocol::transfer::convergence`): every
//! fallback action, every trigger, a dirty set that stops shrinking, a rate that collapses
//! mid-migration, and properties that hold for any sequence of rounds.

use drift_protocol::transfer::convergence::{
    predict, Action, Convergence, Decision, Fallback, Limits, Prediction, RoundReport, Trigger,
};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn limits(fallback: &str) -> Limits {
    Limits {
        downtime_limit_ms: 50,
        max_downtime_ms: 200,
        progress_timeout_ms: 60_000,
        completion_timeout_per_gib_ms: 120_000,
        stall_rounds: 3,
        max_rounds: 50,
        fallback: fallback.parse().expect("fallback"),
        throttle_initial_pct: 20,
        throttle_step_pct: 10,
        throttle_max_pct: 50,
    }
}

/// A round `round` at `now_ms`, `dirty_mib` still dirty, the link at 100 MiB/s, the guest
/// dirtying 400 MiB/s.
fn round(round: u32, now_ms: u64, dirty_mib: u64) -> RoundReport {
    RoundReport {
        now_ms,
        round,
        dirty_bytes: dirty_mib * MIB,
        send_rate: 100.0 * MIB as f64,
        dirty_rate: 400.0 * MIB as f64,
        switchover_cost_ms: 10.0,
    }
}

/// Feeds rounds with a dirty set that never shrinks (100 MiB: 1 s of downtime) until a
/// decision other than another round, returning every decision.
fn run_stuck(c: &mut Convergence) -> Vec<Decision> {
    let mut out = Vec::new();
    for r in 1..=200u32 {
        let d = c.after_round(&round(r, u64::from(r) * 1000, 100));
        out.push(d);
        if !matches!(d, Decision::Round | Decision::Throttle { .. }) {
            break;
        }
    }
    out
}

#[test]
fn a_dirty_set_that_fits_the_limit_switches_over_at_once() {
    let mut c = Convergence::new(limits("abort"), GIB);
    // 4 MiB at 100 MiB/s = 40 ms, + 10 ms switchover cost = 50 ms: exactly the limit.
    match c.after_round(&round(1, 1000, 4)) {
        Decision::SwitchOver {
            expected_downtime_ms,
            over_target,
        } => {
            assert!((expected_downtime_ms - 50.0).abs() < 1e-9);
            assert!(!over_target);
        }
        other => panic!("expected a switchover, got {other:?}"),
    }
}

#[test]
fn a_shrinking_dirty_set_gets_more_rounds_without_any_action() {
    let mut c = Convergence::new(limits("abort"), GIB);
    for (i, dirty) in [800u64, 400, 200, 100, 50, 25, 12].into_iter().enumerate() {
        let d = c.after_round(&round(i as u32 + 1, (i as u64 + 1) * 1000, dirty));
        assert_eq!(d, Decision::Round, "round {} with {dirty} MiB dirty", i + 1);
    }
    assert!(matches!(
        c.after_round(&round(8, 8000, 4)),
        Decision::SwitchOver {
            over_target: false,
            ..
        }
    ));
    assert_eq!(c.throttle_pct(), 0);
    assert!(c.last_why().is_none());
}

#[test]
fn abort_ends_a_stuck_migration_after_the_stall_rounds_with_the_rates_named() {
    let mut c = Convergence::new(limits("abort"), GIB);
    let decisions = run_stuck(&mut c);
    // The first round sets the low; three more without a new low fire.
    assert_eq!(decisions.len(), 4, "{decisions:?}");
    let Decision::Abort { why } = decisions[3] else {
        panic!("expected abort, got {:?}", decisions[3]);
    };
    assert_eq!(why.trigger, Trigger::Stalled { rounds: 3 });
    let text = why.to_string();
    assert!(text.contains("dirtying 400 MiB/s"), "{text}");
    assert!(text.contains("sending 100 MiB/s"), "{text}");
    assert!(
        text.contains("expected downtime 1010 ms (more than the 200 ms maximum)"),
        "{text}"
    );
}

#[test]
fn throttle_steps_up_each_time_the_rounds_stall_then_takes_the_next_action() {
    let mut c = Convergence::new(limits("throttle,abort"), GIB);
    let decisions = run_stuck(&mut c);
    let steps: Vec<u8> = decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Throttle { pct, .. } => Some(*pct),
            _ => None,
        })
        .collect();
    assert_eq!(
        steps,
        vec![20, 30, 40, 50],
        "initial, then +10 up to the maximum"
    );
    assert!(matches!(decisions.last(), Some(Decision::Abort { .. })));
    // Every step waited for its own stall: 3 rounds after the previous one.
    let at: Vec<usize> = decisions
        .iter()
        .enumerate()
        .filter(|(_, d)| matches!(d, Decision::Throttle { .. }))
        .map(|(i, _)| i)
        .collect();
    assert!(at.windows(2).all(|w| w[1] - w[0] == 3), "{at:?}");
    let Some(Decision::Abort { why }) = decisions.last() else {
        unreachable!()
    };
    assert_eq!(why.throttle_pct, 50);
    assert!(why.to_string().contains("throttled 50 %"));
}

#[test]
fn a_throttle_that_works_lets_the_migration_converge_within_the_limit() {
    let mut c = Convergence::new(limits("throttle,abort"), GIB);
    let mut r = 0;
    let mut next = |dirty: u64, c: &mut Convergence| {
        r += 1;
        c.after_round(&round(r, u64::from(r) * 1000, dirty))
    };
    for _ in 0..3 {
        assert_eq!(next(100, &mut c), Decision::Round);
    }
    assert!(matches!(
        next(100, &mut c),
        Decision::Throttle { pct: 20, .. }
    ));
    // The throttled guest dirties less each round.
    assert_eq!(next(60, &mut c), Decision::Round);
    assert_eq!(next(20, &mut c), Decision::Round);
    assert!(matches!(
        next(3, &mut c),
        Decision::SwitchOver {
            over_target: false,
            ..
        }
    ));
}

#[test]
fn postcopy_comes_when_the_user_put_it_first_or_after_throttling() {
    let mut c = Convergence::new(limits("postcopy"), GIB);
    assert!(matches!(
        run_stuck(&mut c).last(),
        Some(Decision::PostCopy { .. })
    ));

    let mut c = Convergence::new(limits("throttle,postcopy"), GIB);
    let d = run_stuck(&mut c);
    assert!(d.iter().any(|d| matches!(d, Decision::Throttle { .. })));
    assert!(matches!(d.last(), Some(Decision::PostCopy { .. })));
    assert_eq!(c.throttle_pct(), 50);
}

#[test]
fn an_empty_fallback_aborts() {
    let mut c = Convergence::new(limits(""), GIB);
    assert!(matches!(
        run_stuck(&mut c).last(),
        Some(Decision::Abort { .. })
    ));
}

#[test]
fn a_trigger_within_the_ceiling_switches_over_above_the_target_instead_of_acting() {
    let mut c = Convergence::new(limits("abort"), GIB);
    // 15 MiB: 150 ms + 10 ms, above the 50 ms target, within the 200 ms ceiling.
    let mut last = Decision::Round;
    for r in 1..=4 {
        last = c.after_round(&round(r, u64::from(r) * 1000, 15));
    }
    match last {
        Decision::SwitchOver {
            expected_downtime_ms,
            over_target,
        } => {
            assert!(over_target);
            assert!(expected_downtime_ms <= 200.0);
        }
        other => panic!("expected a switchover within the ceiling, got {other:?}"),
    }
}

#[test]
fn the_progress_timeout_fires_on_slow_rounds_before_the_stall_count() {
    let mut l = limits("abort");
    l.progress_timeout_ms = 10_000;
    let mut c = Convergence::new(l, GIB);
    assert_eq!(c.after_round(&round(1, 1_000, 100)), Decision::Round);
    // One long round without a new low: 12 s after the low.
    match c.after_round(&round(2, 13_000, 100)) {
        Decision::Abort { why } => {
            assert_eq!(why.trigger, Trigger::ProgressTimeout { ms: 12_000 })
        }
        other => panic!("expected abort, got {other:?}"),
    }
}

#[test]
fn the_completion_timeout_skips_the_throttle_steps_left() {
    let mut c = Convergence::new(limits("throttle,postcopy"), 2 * GIB);
    // 120 s per GiB, 2 GiB: 240 s. Progress all along, but too slow.
    let mut dirty = 1000u64;
    let mut t = 0;
    let mut r = 0;
    let last = loop {
        r += 1;
        t += 30_000;
        dirty = dirty * 9 / 10;
        let d = c.after_round(&round(r, t, dirty));
        if d != Decision::Round {
            break d;
        }
    };
    match last {
        Decision::PostCopy { why } => {
            assert_eq!(why.trigger, Trigger::CompletionTimeout { ms: 240_000 });
            assert_eq!(why.throttle_pct, 0, "no throttle step once the time is up");
        }
        other => panic!("expected post-copy, got {other:?}"),
    }
}

#[test]
fn small_vms_get_at_least_one_gib_worth_of_time() {
    let l = limits("abort");
    assert_eq!(l.completion_deadline_ms(64 * MIB), 120_000);
    assert_eq!(l.completion_deadline_ms(3 * GIB), 360_000);
}

#[test]
fn max_rounds_ends_a_migration_that_crawls_forward() {
    let mut l = limits("throttle,abort");
    l.max_rounds = 10;
    let mut c = Convergence::new(l, GIB);
    let mut dirty = 10_000u64;
    let last = (1..=20u32)
        .map(|r| {
            dirty = dirty * 9 / 10; // a new low every round: never stalled
            c.after_round(&round(r, u64::from(r) * 100, dirty))
        })
        .find(|d| *d != Decision::Round);
    match last {
        Some(Decision::Abort { why }) => assert_eq!(why.trigger, Trigger::MaxRounds { rounds: 10 }),
        other => panic!("expected abort at max rounds, got {other:?}"),
    }
}

#[test]
fn a_rate_that_collapses_mid_migration_never_switches_over_above_the_ceiling() {
    let mut c = Convergence::new(limits("throttle,abort"), GIB);
    // Converging at 100 MiB/s...
    for (r, dirty) in [(1, 400u64), (2, 200), (3, 100)] {
        assert_eq!(
            c.after_round(&round(r, u64::from(r) * 1000, dirty)),
            Decision::Round
        );
    }
    // ...then the link collapses to 1 MiB/s: 20 MiB would take 20 s.
    let mut decisions = Vec::new();
    for r in 4..=40u32 {
        let mut rep = round(r, u64::from(r) * 1000, 20);
        rep.send_rate = MIB as f64;
        let d = c.after_round(&rep);
        decisions.push(d);
        if !matches!(d, Decision::Round | Decision::Throttle { .. }) {
            break;
        }
    }
    assert!(
        !decisions
            .iter()
            .any(|d| matches!(d, Decision::SwitchOver { .. })),
        "{decisions:?}"
    );
    assert!(matches!(decisions.last(), Some(Decision::Abort { .. })));
}

#[test]
fn fallbacks_parse_and_refuse_what_cannot_run() {
    let f: Fallback = "throttle,postcopy,abort".parse().unwrap();
    assert_eq!(
        f.actions(),
        &[Action::Throttle, Action::PostCopy, Action::Abort]
    );
    assert_eq!(f.to_string(), "throttle,postcopy,abort");
    assert!(f.allows_postcopy() && f.allows_throttle());
    assert_eq!(Fallback::default().to_string(), "throttle,abort");
    assert!("abort,throttle"
        .parse::<Fallback>()
        .unwrap_err()
        .contains("after abort"));
    assert!("throttle,throttle"
        .parse::<Fallback>()
        .unwrap_err()
        .contains("twice"));
    assert!("slow".parse::<Fallback>().unwrap_err().contains("\"slow\""));
    // On the wire (and in config files) a fallback is its list, checked when decoded.
    let bytes = postcard::to_allocvec(&vec![Action::PostCopy, Action::Abort]).unwrap();
    let decoded: Fallback = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded.to_string(), "postcopy,abort");
    let bytes = postcard::to_allocvec(&vec![Action::Abort, Action::PostCopy]).unwrap();
    assert!(postcard::from_bytes::<Fallback>(&bytes).is_err());
}

#[test]
fn limits_that_contradict_each_other_are_refused_by_name() {
    let mut l = limits("abort");
    assert!(l.validate().is_ok());
    l.max_downtime_ms = 10;
    assert_eq!(l.validate().unwrap_err().field, "max_downtime");
    let mut l = limits("abort");
    l.stall_rounds = 0;
    assert_eq!(l.validate().unwrap_err().field, "stall_rounds");
    let mut l = limits("abort");
    l.max_rounds = 5000;
    assert_eq!(l.validate().unwrap_err().field, "max_rounds");
    let mut l = limits("abort");
    l.throttle_initial_pct = 60;
    assert_eq!(l.validate().unwrap_err().field, "throttle");
    assert!(Limits::default().validate().is_ok());
}

fn any_fallback() -> impl Strategy<Value = Fallback> {
    prop::sample::subsequence(
        vec![Action::Throttle, Action::PostCopy, Action::Abort],
        0..=3,
    )
    .prop_shuffle()
    .prop_filter_map("abort last", |v| Fallback::try_from(v).ok())
}

proptest! {
    /// Whatever the rounds look like: no switchover above the ceiling, the throttle never
    /// goes down or past its maximum, post-copy only when allowed, and the migration ends by
    /// `max_rounds`.
    #[test]
    fn no_sequence_of_rounds_breaks_the_ceiling_or_runs_forever(
        fallback in any_fallback(),
        rounds in prop::collection::vec((0u64..4096, 1u64..2048, 0u64..20_000), 1..120),
        max_downtime in 50u64..2000,
    ) {
        let mut l = limits("abort");
        l.fallback = fallback.clone();
        l.max_downtime_ms = max_downtime;
        l.max_rounds = 40;
        let mut c = Convergence::new(l, GIB);
        let (mut t, mut throttle, mut ended) = (0u64, 0u8, false);
        for (i, (dirty_mib, rate_mib, dt)) in rounds.into_iter().enumerate() {
            t += dt;
            let rep = RoundReport {
                now_ms: t,
                round: i as u32 + 1,
                dirty_bytes: dirty_mib * MIB,
                send_rate: (rate_mib * MIB) as f64,
                dirty_rate: 0.0,
                switchover_cost_ms: 5.0,
            };
            match c.after_round(&rep) {
                Decision::Round => {}
                Decision::Throttle { pct, .. } => {
                    prop_assert!(fallback.allows_throttle());
                    prop_assert!(pct > throttle && pct <= 50);
                    throttle = pct;
                }
                Decision::SwitchOver { expected_downtime_ms, over_target } => {
                    prop_assert!(expected_downtime_ms <= max_downtime as f64);
                    prop_assert_eq!(over_target, expected_downtime_ms > 50.0);
                    ended = true;
                }
                Decision::PostCopy { why } => {
                    prop_assert!(fallback.allows_postcopy());
                    prop_assert!(why.expected_downtime_ms > max_downtime as f64);
                    ended = true;
                }
                Decision::Abort { why } => {
                    prop_assert!(why.expected_downtime_ms > max_downtime as f64);
                    ended = true;
                }
            }
            if ended {
                break;
            }
            prop_assert!(i + 1 < 40, "round {} did not end the migration", i + 1);
        }
    }
}

#[test]
fn predictions_follow_the_same_decisions_as_the_migration() {
    const GIB_F: f64 = GIB as f64;
    let l = |f: &str| Limits {
        max_downtime_ms: 500,
        throttle_max_pct: 99,
        ..limits(f)
    };
    let mib_s = |m: f64| m * MIB as f64;
    // A quiet guest on a fast link: pre-copy, no throttle, within the limit.
    match predict(GIB, mib_s(16.0), mib_s(400.0), 10.0, &l("throttle,abort")) {
        Prediction::SwitchOver {
            throttle_pct,
            over_target,
            downtime_ms,
            total_ms,
            ..
        } => {
            assert_eq!(throttle_pct, 0);
            assert!(!over_target && downtime_ms <= 50);
            // At least the first round: a GiB at 400 MiB/s.
            assert!(total_ms >= 2_560, "{total_ms}");
        }
        other => panic!("{other:?}"),
    }
    // A 256 MiB guest dirtying twice the link: throttled into converging, or aborted, or
    // post-copy.
    let hot = |f: &str| predict(256 * MIB, mib_s(200.0), mib_s(100.0), 10.0, &l(f));
    match hot("throttle,abort") {
        Prediction::SwitchOver { throttle_pct, .. } => assert!(throttle_pct >= 50),
        other => panic!("throttling should converge: {other:?}"),
    }
    assert!(matches!(hot("abort"), Prediction::Abort { .. }));
    assert!(!hot("abort").moves());
    assert!(matches!(hot("postcopy"), Prediction::PostCopy { .. }));
    assert!(hot("postcopy").to_string().contains("post-copy"));
    // Garbage in (no link at all) still ends.
    assert!(!predict(GIB, GIB_F, 0.0, 0.0, &l("throttle,abort")).moves());
    // A GiB guest dirtying twice the link: every round is the whole memory (10 s), so the
    // throttle steps (a stalled round count each) outlast the completion timeout.
    match predict(GIB, mib_s(200.0), mib_s(100.0), 10.0, &l("throttle,abort")) {
        Prediction::Abort { rounds, total_ms } => {
            assert!(total_ms >= 120_000, "{total_ms}");
            assert!(rounds >= 10, "{rounds}");
        }
        other => panic!("expected the completion timeout to end it: {other:?}"),
    }
}
