//! Whether this host's own clock is wrong, judged from its peers' signed load reports.
//!
//! Every report carries the time its host issued it. A report that arrives with an issue time
//! far from this host's clock is refused (too old, or from the future); when that happens to
//! one peer, the peer's clock is off, but when it happens to most peers alike, it is this
//! host's clock. [`SkewEstimate`] keeps the newest offset seen from each member (issue time
//! minus this host's time at receipt: positive when the peer is ahead), drops offsets older
//! than a window, and says this host's clock is off when most peers it heard from are off by
//! more than a tolerance in the same direction; the median of their offsets is by how much.
//!
//! Offsets come only from reports whose signature verified (a forger cannot move them), one
//! per member (a chatty member counts once), at most one per roster member (bounded).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{NodeId, Timestamp};

/// Offsets older than this are forgotten.
pub const WINDOW_MS: u64 = 5 * 60 * 1000;

/// What the estimate concludes about this host's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnClockOff {
    /// By how much this host's clock is ahead of its peers' (negative: behind), in ms: the
    /// median of the disagreeing peers' offsets, negated.
    pub ahead_ms: i64,
    /// Peers whose reports disagree with this host's clock in that direction...
    pub disagreeing: usize,
    /// ...of the peers heard from within the window.
    pub heard: usize,
}

impl OwnClockOff {
    /// A sentence for logs and `drift status`.
    pub fn describe(&self) -> String {
        let (dir, ms) = if self.ahead_ms >= 0 {
            ("ahead of", self.ahead_ms)
        } else {
            ("behind", -self.ahead_ms)
        };
        format!(
            "this host's clock is probably wrong: {:.1} s {dir} {} of the {} peers heard from \
             (their reports are refused as {}); fix its time (NTP)",
            ms as f64 / 1000.0,
            self.disagreeing,
            self.heard,
            if self.ahead_ms >= 0 {
                "too old"
            } else {
                "from the future"
            }
        )
    }
}

/// How far this host's clock may be from its peers' before it is said to be wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tolerance {
    /// This host ahead: peers' reports look this much older than they are.
    pub ahead_ms: u64,
    /// This host behind: peers' reports look this much from the future.
    pub behind_ms: u64,
}

impl Tolerance {
    /// Half the age at which reports are refused as too old (so the warning comes before
    /// the refusals), and the skew at which they are refused as from the future.
    pub fn for_freshness(f: &crate::report::Freshness) -> Self {
        Self {
            ahead_ms: f.max_age_ms / 2,
            behind_ms: f.max_skew_ms,
        }
    }
}

/// The newest offset of each peer.
#[derive(Debug, Clone, Default)]
pub struct SkewEstimate {
    /// Peer → (offset in ms, when this host saw it by its own clock).
    offsets: BTreeMap<NodeId, (i64, Timestamp)>,
}

impl SkewEstimate {
    /// A report of `peer` issued at `issued_at` (its signature verified) arrived at `now`.
    pub fn observe(&mut self, peer: NodeId, issued_at: Timestamp, now: Timestamp) {
        let offset = issued_at.0 as i64 - now.0 as i64;
        self.offsets.insert(peer, (offset, now));
    }

    /// Forgets peers that are no longer members (`keep` says who is).
    pub fn retain(&mut self, keep: impl Fn(&NodeId) -> bool) {
        self.offsets.retain(|id, _| keep(id));
    }

    /// Whether this host's clock is off by the peers heard from within [`WINDOW_MS`] of
    /// `now`: more than half of them (and at least one) must be off in the same direction, by
    /// more than `tolerance.ahead_ms` for this host to be ahead (their reports look old; gossip
    /// delays add to that, so it is the wider one) or `tolerance.behind_ms` to be behind. With
    /// a single peer, its word is taken (two hosts cannot tell which clock is wrong; the
    /// message says how many peers disagree).
    pub fn verdict(&self, now: Timestamp, tolerance: Tolerance) -> Option<OwnClockOff> {
        let recent: Vec<i64> = self
            .offsets
            .values()
            .filter(|(_, seen)| now.millis_since(*seen) <= WINDOW_MS)
            .map(|(o, _)| *o)
            .collect();
        let heard = recent.len();
        // Peers ahead of this host mean this host is behind, and the other way round.
        let (a, b) = (tolerance.ahead_ms as i64, tolerance.behind_ms as i64);
        let mut behind: Vec<i64> = recent.iter().copied().filter(|o| *o > b).collect();
        let mut ahead: Vec<i64> = recent.iter().copied().filter(|o| *o < -a).collect();
        let side = if behind.len() * 2 > heard {
            &mut behind
        } else if ahead.len() * 2 > heard {
            &mut ahead
        } else {
            return None;
        };
        side.sort_unstable();
        let median = side[side.len() / 2];
        Some(OwnClockOff {
            ahead_ms: -median,
            disagreeing: side.len(),
            heard,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;

    fn peer(i: u8) -> NodeId {
        SecretKey::from_bytes(&[i; 32]).public()
    }

    const NOW: Timestamp = Timestamp(10_000_000);
    const TOL: Tolerance = Tolerance {
        ahead_ms: 15_000,
        behind_ms: 5_000,
    };

    #[test]
    fn gossip_delay_alone_is_not_a_wrong_clock() {
        let mut e = SkewEstimate::default();
        // Every report arrives 10 s late (a slow mesh): within the wider tolerance.
        for i in 1..=4u8 {
            e.observe(peer(i), Timestamp(NOW.0 - 10_000), NOW);
        }
        assert_eq!(e.verdict(NOW, TOL), None);
        // 10 s from the future cannot be a delay.
        let mut e = SkewEstimate::default();
        for i in 1..=4u8 {
            e.observe(peer(i), Timestamp(NOW.0 + 10_000), NOW);
        }
        assert_eq!(e.verdict(NOW, TOL).map(|v| v.ahead_ms), Some(-10_000));
    }

    #[test]
    fn a_host_ten_minutes_ahead_is_told_so() {
        let mut e = SkewEstimate::default();
        // Every peer's report looks ten minutes old, give or take the gossip delay.
        for i in 1..=4u8 {
            e.observe(peer(i), Timestamp(NOW.0 - 600_000 - i as u64 * 10), NOW);
        }
        let v = e.verdict(NOW, TOL).unwrap();
        assert!((600_000..=600_040).contains(&v.ahead_ms), "{v:?}");
        assert_eq!((v.disagreeing, v.heard), (4, 4));
        assert!(
            v.describe().contains("600.0 s ahead of 4 of the 4 peers"),
            "{}",
            v.describe()
        );
    }

    #[test]
    fn a_host_behind_is_told_so() {
        let mut e = SkewEstimate::default();
        for i in 1..=3u8 {
            e.observe(peer(i), Timestamp(NOW.0 + 90_000), NOW);
        }
        let v = e.verdict(NOW, TOL).unwrap();
        assert_eq!(v.ahead_ms, -90_000);
        assert!(v.describe().contains("behind"));
    }

    #[test]
    fn one_peer_off_among_many_is_the_peer_s_problem() {
        let mut e = SkewEstimate::default();
        e.observe(peer(1), Timestamp(NOW.0 - 600_000), NOW);
        for i in 2..=5u8 {
            e.observe(peer(i), Timestamp(NOW.0 - 200), NOW);
        }
        assert_eq!(e.verdict(NOW, TOL), None);
        // Half is not a majority either.
        let mut e = SkewEstimate::default();
        e.observe(peer(1), Timestamp(NOW.0 - 600_000), NOW);
        e.observe(peer(2), Timestamp(NOW.0 - 100), NOW);
        assert_eq!(e.verdict(NOW, TOL), None);
    }

    #[test]
    fn old_offsets_and_former_members_are_forgotten() {
        let mut e = SkewEstimate::default();
        let then = Timestamp(NOW.0 - WINDOW_MS - 1);
        for i in 1..=3u8 {
            e.observe(peer(i), Timestamp(then.0 - 600_000), then);
        }
        assert_eq!(
            e.verdict(NOW, TOL),
            None,
            "offsets older than the window count"
        );
        let mut e = SkewEstimate::default();
        for i in 1..=3u8 {
            e.observe(peer(i), Timestamp(NOW.0 - 600_000), NOW);
        }
        e.observe(peer(1), Timestamp(NOW.0), NOW);
        e.observe(peer(2), Timestamp(NOW.0), NOW);
        assert_eq!(
            e.verdict(NOW, TOL),
            None,
            "a peer's newest offset replaces its older one"
        );
        e.retain(|id| *id == peer(3));
        assert!(
            e.verdict(NOW, TOL).is_some(),
            "only the remaining member is heard"
        );
    }
}
