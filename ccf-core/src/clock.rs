//! Wall-clock time as the protocol counts it: milliseconds since the Unix epoch. Expiries that
//! must survive a restart (stored contexts, tokens) are absolute times in this unit; a validity
//! handed to a peer is a remaining duration, so clocks need not agree across domains.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
