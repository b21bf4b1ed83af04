//! The wall clock, read in one place. drift-protocol never reads a clock; the node passes
//! `now` into it from here.

use std::time::{SystemTime, UNIX_EPOCH};

use drift_protocol::Timestamp;

/// Shifts this process's clock by this many milliseconds (signed): for tests of what drift
/// does on a host whose clock is wrong. Unset in production.
pub const SKEW_ENV: &str = "DRIFT_CLOCK_SKEW_MS";

fn skew_ms() -> i64 {
    static SKEW: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var(SKEW_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Timestamp(ms.saturating_add(skew_ms()).max(0) as u64)
}
