//! Progress deadlines of an incoming migration: what a target holds a source to, so an
//! accepted migration cannot keep the target's slot, reservation, stream and memory without
//! moving the VM.
//!
//! Three rules, judged on the target's own clock (milliseconds passed in by the caller):
//!
//! - **gap**: no frame (or, for a tunnelled QEMU migration, no channel byte) for longer than
//!   [`ProgressLimits::frame_gap_ms`];
//! - **rate**: every window of [`ProgressLimits::window_ms`] must bring at least
//!   [`ProgressLimits::min_bytes_per_s`] × the window of memory (pages × page size, zero pages
//!   included; or channel bytes). Empty batches and bare round ends bring nothing;
//! - **overall**: the whole migration ends within [`ProgressLimits::overall_ms`] for its memory
//!   size: a base plus a time per GiB.
//!
//! Once the VM runs on the target (post-copy) only the gap rule holds: there the VM lives only
//! on the target and nothing is freed by giving up on it, so a slow source is waited for.
//!
//! An honest source exceeds the rate by orders of magnitude: it sends the whole memory in its
//! first round and every dirty page after, at the link's speed, and it has no reason to wait
//! between frames. A source capped below the target's minimum rate is stalled by design; the
//! target's operator sets the rate.

use std::fmt;

/// What a target holds every incoming migration to (`[admission]` in the node's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressLimits {
    /// Longest silence between two frames.
    pub frame_gap_ms: u64,
    /// The window progress is measured over.
    pub window_ms: u64,
    /// Memory every window must bring, per second of the window.
    pub min_bytes_per_s: u64,
    /// The overall deadline's base.
    pub deadline_base_ms: u64,
    /// The overall deadline's time per GiB of the VM's memory.
    pub deadline_per_gib_ms: u64,
}

impl Default for ProgressLimits {
    fn default() -> Self {
        Self {
            frame_gap_ms: 30_000,
            window_ms: 10_000,
            min_bytes_per_s: 1 << 20,
            deadline_base_ms: 120_000,
            deadline_per_gib_ms: 300_000,
        }
    }
}

impl ProgressLimits {
    /// The overall deadline of a VM with `memory_bytes` of memory.
    pub fn overall_ms(&self, memory_bytes: u64) -> u64 {
        let per_gib = u128::from(self.deadline_per_gib_ms) * u128::from(memory_bytes) / (1 << 30);
        self.deadline_base_ms
            .saturating_add(u64::try_from(per_gib).unwrap_or(u64::MAX))
    }

    /// Memory one window must bring.
    pub fn min_bytes_per_window(&self) -> u64 {
        let bytes = u128::from(self.min_bytes_per_s) * u128::from(self.window_ms) / 1000;
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }
}

/// Which rule a stalled migration broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// No frame for `silent_ms`.
    Gap { silent_ms: u64 },
    /// A window of `window_ms` brought `bytes`, under `min_bytes`.
    Rate {
        window_ms: u64,
        bytes: u64,
        min_bytes: u64,
    },
    /// Not done after `deadline_ms`.
    Overall { deadline_ms: u64 },
}

/// A stalled migration: the rule it broke and what it had done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    pub rule: Rule,
    /// Frames received.
    pub frames: u64,
    /// Pages received (counted again when sent again).
    pub pages: u64,
    /// Memory received: pages × page size, or channel bytes.
    pub bytes: u64,
    /// Since the guard started.
    pub elapsed_ms: u64,
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stalled: ")?;
        match self.rule {
            Rule::Gap { silent_ms } => write!(f, "no frame for {:.1} s", secs(silent_ms))?,
            Rule::Rate {
                window_ms,
                bytes,
                min_bytes,
            } => write!(
                f,
                "{bytes} bytes of memory in {:.1} s, at least {min_bytes} required",
                secs(window_ms)
            )?,
            Rule::Overall { deadline_ms } => {
                write!(f, "not done within {:.1} s", secs(deadline_ms))?
            }
        }
        write!(
            f,
            " ({} frames, {} pages, {} bytes in {:.1} s)",
            self.frames,
            self.pages,
            self.bytes,
            secs(self.elapsed_ms)
        )
    }
}

/// The progress of one incoming migration against its [`ProgressLimits`].
#[derive(Debug, Clone)]
pub struct ProgressGuard {
    limits: ProgressLimits,
    overall_ms: u64,
    started: u64,
    last_frame: u64,
    window_start: u64,
    window_bytes: u64,
    frames: u64,
    pages: u64,
    bytes: u64,
    /// The VM runs here: only the gap rule holds.
    running_here: bool,
    stalled: Option<Stall>,
}

impl ProgressGuard {
    /// A guard for a VM of `memory_bytes`, started at `now_ms`.
    pub fn new(limits: ProgressLimits, memory_bytes: u64, now_ms: u64) -> Self {
        Self {
            limits,
            overall_ms: limits.overall_ms(memory_bytes),
            started: now_ms,
            last_frame: now_ms,
            window_start: now_ms,
            window_bytes: 0,
            frames: 0,
            pages: 0,
            bytes: 0,
            running_here: false,
            stalled: None,
        }
    }

    /// A frame arrived at `now_ms`, carrying `pages` pages that stand for `bytes` of memory.
    pub fn on_frame(&mut self, now_ms: u64, pages: u64, bytes: u64) {
        self.roll(now_ms);
        self.frames += 1;
        self.pages = self.pages.saturating_add(pages);
        self.bytes = self.bytes.saturating_add(bytes);
        self.window_bytes = self.window_bytes.saturating_add(bytes);
        self.last_frame = now_ms.max(self.last_frame);
    }

    /// `total` bytes have arrived by `now_ms` on a stream the guard only sees as a count (a
    /// QEMU migration's channels): progress if it grew.
    pub fn on_total(&mut self, now_ms: u64, total: u64) {
        if total > self.bytes {
            let new = total - self.bytes;
            self.on_frame(now_ms, new / 4096, new);
        } else {
            self.roll(now_ms);
        }
    }

    /// The VM runs here from now on (post-copy): only the gap rule holds.
    pub fn vm_runs_here(&mut self) {
        self.running_here = true;
    }

    /// Judges every window that ended by `now_ms`, keeping the first stall.
    fn roll(&mut self, now_ms: u64) {
        let window = self.limits.window_ms.max(1);
        let min = self.limits.min_bytes_per_window();
        while self.stalled.is_none() && now_ms >= self.window_start.saturating_add(window) {
            if !self.running_here && self.window_bytes < min {
                self.stalled = Some(self.stall(
                    now_ms,
                    Rule::Rate {
                        window_ms: window,
                        bytes: self.window_bytes,
                        min_bytes: min,
                    },
                ));
            }
            self.window_start += window;
            self.window_bytes = 0;
        }
    }

    fn stall(&self, now_ms: u64, rule: Rule) -> Stall {
        Stall {
            rule,
            frames: self.frames,
            pages: self.pages,
            bytes: self.bytes,
            elapsed_ms: now_ms.saturating_sub(self.started),
        }
    }

    /// Whether the migration is stalled at `now_ms`: the first rule it broke.
    pub fn check(&mut self, now_ms: u64) -> Result<(), Stall> {
        self.roll(now_ms);
        if let Some(s) = self.stalled {
            return Err(s);
        }
        let silent = now_ms.saturating_sub(self.last_frame);
        if silent >= self.limits.frame_gap_ms {
            return Err(self.stall(now_ms, Rule::Gap { silent_ms: silent }));
        }
        if !self.running_here && now_ms.saturating_sub(self.started) >= self.overall_ms {
            return Err(self.stall(
                now_ms,
                Rule::Overall {
                    deadline_ms: self.overall_ms,
                },
            ));
        }
        Ok(())
    }

    /// The next moment a rule can break if nothing arrives: when to call [`Self::check`].
    pub fn next_check_ms(&self) -> u64 {
        let gap = self.last_frame.saturating_add(self.limits.frame_gap_ms);
        if self.running_here {
            return gap;
        }
        let window = self
            .window_start
            .saturating_add(self.limits.window_ms.max(1));
        let overall = self.started.saturating_add(self.overall_ms);
        gap.min(window).min(overall)
    }

    /// Frames, pages and bytes received so far.
    pub fn totals(&self) -> (u64, u64, u64) {
        (self.frames, self.pages, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn limits() -> ProgressLimits {
        ProgressLimits {
            frame_gap_ms: 5_000,
            window_ms: 2_000,
            min_bytes_per_s: MIB,
            deadline_base_ms: 10_000,
            deadline_per_gib_ms: 60_000,
        }
    }

    #[test]
    fn an_honest_transfer_is_never_stalled() {
        let mut g = ProgressGuard::new(limits(), 256 * MIB, 0);
        // 256 MiB at 64 MiB/s: a 1 MiB batch every ~16 ms, checked at every frame.
        for i in 0..256u64 {
            let now = i * 16;
            g.on_frame(now, 256, MIB);
            assert_eq!(g.check(now), Ok(()));
        }
        assert_eq!(g.totals(), (256, 256 * 256, 256 * MIB));
    }

    #[test]
    fn a_trickle_of_empty_batches_breaks_the_rate_within_one_window() {
        let mut g = ProgressGuard::new(limits(), 256 * MIB, 0);
        let mut stalled = None;
        for i in 1..=20u64 {
            let now = i * 500;
            g.on_frame(now, 0, 0);
            if let Err(s) = g.check(now) {
                stalled = Some((now, s));
                break;
            }
        }
        let (at, s) = stalled.expect("a trickle is stalled");
        assert_eq!(at, 2_000, "judged when the first window ends");
        assert_eq!(
            s.rule,
            Rule::Rate {
                window_ms: 2_000,
                bytes: 0,
                min_bytes: 2 * MIB
            }
        );
        assert_eq!((s.frames, s.pages, s.elapsed_ms), (3, 0, 2_000));
        assert!(
            s.to_string()
                .starts_with("stalled: 0 bytes of memory in 2.0 s"),
            "{s}"
        );
    }

    #[test]
    fn silence_breaks_the_gap_and_next_check_says_when() {
        let mut l = limits();
        l.window_ms = 60_000;
        let mut g = ProgressGuard::new(l, MIB, 0);
        g.on_frame(1_000, 256, MIB);
        assert_eq!(g.next_check_ms(), 6_000);
        assert_eq!(g.check(5_999), Ok(()));
        let s = g.check(6_000).unwrap_err();
        assert_eq!(s.rule, Rule::Gap { silent_ms: 5_000 });
        assert!(s.to_string().contains("no frame for 5.0 s"), "{s}");
    }

    #[test]
    fn the_overall_deadline_grows_with_memory() {
        let l = limits();
        assert_eq!(l.overall_ms(0), 10_000);
        assert_eq!(l.overall_ms(1 << 30), 70_000);
        assert_eq!(l.overall_ms(512 * MIB), 40_000);
        let longest = ProgressLimits {
            deadline_per_gib_ms: u64::MAX,
            ..l
        };
        assert_eq!(longest.overall_ms(u64::MAX), u64::MAX, "saturates");
        // Steady progress, but the same pages again and again: the overall deadline ends it.
        let mut g = ProgressGuard::new(l, 512 * MIB, 0);
        let mut now = 0;
        let s = loop {
            now += 100;
            g.on_frame(now, 256, MIB);
            if let Err(s) = g.check(now) {
                break s;
            }
        };
        assert_eq!(now, 40_000);
        assert_eq!(
            s.rule,
            Rule::Overall {
                deadline_ms: 40_000
            }
        );
    }

    #[test]
    fn once_the_vm_runs_here_only_silence_counts() {
        let mut g = ProgressGuard::new(limits(), MIB, 0);
        g.on_frame(100, 256, MIB);
        g.vm_runs_here();
        for now in (200..60_000).step_by(1_000) {
            g.on_frame(now, 0, 0);
            assert_eq!(g.check(now), Ok(()), "at {now}");
        }
        assert!(matches!(
            g.check(64_200),
            Err(Stall {
                rule: Rule::Gap { .. },
                ..
            })
        ));
    }

    #[test]
    fn channel_totals_count_only_what_grew() {
        let mut g = ProgressGuard::new(limits(), 64 * MIB, 0);
        g.on_total(500, 3 * MIB);
        g.on_total(900, 3 * MIB);
        assert_eq!(g.totals(), (1, 768, 3 * MIB));
        assert_eq!(g.check(1_999), Ok(()));
        // The next window brings nothing.
        g.on_total(3_000, 3 * MIB);
        assert!(matches!(
            g.check(4_000),
            Err(Stall {
                rule: Rule::Rate { bytes: 0, .. },
                ..
            })
        ));
    }

    #[test]
    fn a_late_check_judges_every_window_that_ended() {
        let mut g = ProgressGuard::new(limits(), 64 * MIB, 0);
        g.on_frame(100, 1024, 4 * MIB);
        // Nothing checked for 3 windows; the second one was empty.
        g.on_frame(5_500, 1024, 4 * MIB);
        let s = g.check(5_500).unwrap_err();
        assert_eq!(s.elapsed_ms, 5_500);
        assert!(matches!(s.rule, Rule::Rate { bytes: 0, .. }));
    }
}
