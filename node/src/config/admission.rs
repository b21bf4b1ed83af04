//! `[admission]`: how many migrations a node takes and sends at once, each source's share of
//! the incoming slots, the deadlines every incoming migration is held to, and the back-off of
//! sources whose migrations stall or break the protocol.

use std::time::Duration;

use drift_protocol::transfer::deadline::ProgressLimits;
use serde::{Deserialize, Serialize};

/// Incoming migration streams a node serves at once (negotiating or transferring): the most
/// `max_incoming` may be.
pub const MAX_INCOMING_STREAMS: u32 = 8;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Admission limits and deadlines. Every field has a default; see `README.md` for a whole
/// example.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    /// Incoming migrations (accepted, not yet ended) at once.
    pub max_incoming: u32,
    /// Migrations this node sends at once.
    pub max_outgoing: u32,
    /// Incoming slots one source may hold at once, so one source cannot hold them all.
    pub per_source: u32,
    /// Offers judged per source per minute; more are refused unread.
    pub offers_per_source_per_minute: u32,
    /// How long an accepted offer's reservation waits for its transfer to start.
    #[serde(with = "humantime_serde")]
    pub reservation_ttl: Duration,
    /// How long a new migration stream may take to send its offer.
    #[serde(with = "humantime_serde")]
    pub negotiation_timeout: Duration,
    /// How long the source may take, after the decision, to start the transfer and open its
    /// data connections.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// Longest silence between two frames of a transfer.
    #[serde(with = "humantime_serde")]
    pub frame_gap: Duration,
    /// The window a transfer's progress is measured over.
    #[serde(with = "humantime_serde")]
    pub progress_window: Duration,
    /// Memory every window must bring, in KiB per second of the window.
    pub min_rate_kib_per_s: u64,
    /// The overall deadline of a transfer: this, plus `deadline_per_gib` per GiB of the VM.
    #[serde(with = "humantime_serde")]
    pub deadline_base: Duration,
    #[serde(with = "humantime_serde")]
    pub deadline_per_gib: Duration,
    /// Stalled or broken migrations from one source, within `strike_window`, that back it off.
    pub backoff_after: u32,
    #[serde(with = "humantime_serde")]
    pub strike_window: Duration,
    /// The first back-off; each further one doubles, up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        let progress = ProgressLimits::default();
        Self {
            max_incoming: 2,
            max_outgoing: 4,
            per_source: 1,
            offers_per_source_per_minute: 30,
            reservation_ttl: Duration::from_secs(30),
            negotiation_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(10),
            frame_gap: Duration::from_millis(progress.frame_gap_ms),
            progress_window: Duration::from_millis(progress.window_ms),
            min_rate_kib_per_s: progress.min_bytes_per_s / 1024,
            deadline_base: Duration::from_millis(progress.deadline_base_ms),
            deadline_per_gib: Duration::from_millis(progress.deadline_per_gib_ms),
            backoff_after: 2,
            strike_window: Duration::from_secs(600),
            backoff: Duration::from_secs(60),
            backoff_max: Duration::from_secs(3600),
        }
    }
}

impl AdmissionSection {
    /// The progress deadlines of every incoming transfer.
    pub fn progress(&self) -> ProgressLimits {
        ProgressLimits {
            frame_gap_ms: ms(self.frame_gap),
            window_ms: ms(self.progress_window),
            min_bytes_per_s: self.min_rate_kib_per_s.saturating_mul(1024),
            deadline_base_ms: ms(self.deadline_base),
            deadline_per_gib_ms: ms(self.deadline_per_gib),
        }
    }

    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
        let between = |key, d: Duration, lo: Duration, hi: Duration| {
            if d < lo || d > hi {
                Err((key, format!("must be between {lo:?} and {hi:?}")))
            } else {
                Ok(())
            }
        };
        if self.max_incoming == 0 || self.max_incoming > MAX_INCOMING_STREAMS {
            return Err((
                "admission.max_incoming",
                format!("must be between 1 and {MAX_INCOMING_STREAMS}"),
            ));
        }
        if self.max_outgoing == 0 || self.max_outgoing > 64 {
            return Err(("admission.max_outgoing", "must be between 1 and 64".into()));
        }
        if self.per_source == 0 || self.per_source > self.max_incoming {
            return Err((
                "admission.per_source",
                "must be between 1 and admission.max_incoming".into(),
            ));
        }
        if self.offers_per_source_per_minute == 0 || self.offers_per_source_per_minute > 6000 {
            return Err((
                "admission.offers_per_source_per_minute",
                "must be between 1 and 6000".into(),
            ));
        }
        let (s, h) = (Duration::from_millis(100), Duration::from_secs(3600));
        between("admission.reservation_ttl", self.reservation_ttl, s, h)?;
        between(
            "admission.negotiation_timeout",
            self.negotiation_timeout,
            s,
            h,
        )?;
        between("admission.start_timeout", self.start_timeout, s, h)?;
        between("admission.frame_gap", self.frame_gap, s, h)?;
        between("admission.progress_window", self.progress_window, s, h)?;
        between("admission.deadline_base", self.deadline_base, s, 24 * h)?;
        between(
            "admission.deadline_per_gib",
            self.deadline_per_gib,
            Duration::ZERO,
            24 * h,
        )?;
        between("admission.strike_window", self.strike_window, s, 24 * h)?;
        between("admission.backoff", self.backoff, Duration::ZERO, 24 * h)?;
        between(
            "admission.backoff_max",
            self.backoff_max,
            self.backoff,
            24 * h,
        )?;
        if self.start_timeout > self.reservation_ttl {
            return Err((
                "admission.start_timeout",
                "must be at most admission.reservation_ttl".into(),
            ));
        }
        if self.min_rate_kib_per_s > 1 << 30 {
            return Err((
                "admission.min_rate_kib_per_s",
                "must be at most 1073741824".into(),
            ));
        }
        if self.backoff_after == 0 || self.backoff_after > 1000 {
            return Err((
                "admission.backoff_after",
                "must be between 1 and 1000".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_todays_limits_and_validate() {
        let a = AdmissionSection::default();
        assert_eq!((a.max_incoming, a.max_outgoing, a.per_source), (2, 4, 1));
        assert_eq!(a.offers_per_source_per_minute, 30);
        assert_eq!(a.progress(), ProgressLimits::default());
        assert_eq!(a.validate(), Ok(()));
    }

    #[test]
    fn every_bad_value_names_its_key() {
        type Spoil = fn(&mut AdmissionSection);
        let cases: [(&str, Spoil); 7] = [
            ("admission.max_incoming", |a| a.max_incoming = 9),
            ("admission.per_source", |a| a.per_source = 3),
            ("admission.frame_gap", |a| a.frame_gap = Duration::ZERO),
            ("admission.backoff_max", |a| {
                a.backoff_max = Duration::from_secs(1)
            }),
            ("admission.backoff_after", |a| a.backoff_after = 0),
            ("admission.max_outgoing", |a| a.max_outgoing = 0),
            ("admission.start_timeout", |a| {
                a.start_timeout = Duration::from_secs(60)
            }),
        ];
        for (key, spoil) in cases {
            let mut a = AdmissionSection::default();
            spoil(&mut a);
            assert_eq!(a.validate().map_err(|(k, _)| k), Err(key));
        }
    }
}
