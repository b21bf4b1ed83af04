//! The wall clock, read in one place. drift-protocol never reads a clock; the node passes
//! `now` into it from here.

use std::time::{SystemTime, UNIX_EPOCH};

use drift_protocol::Timestamp;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now() -> Timestamp {
    Timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}
