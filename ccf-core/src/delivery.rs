//! At-least-once delivery of revocation notices, as the CCF's and the gateway's outboxes share
//! it: the notice id every hop keeps (`NoticeId`, 32 lowercase hex digits chosen by the home
//! CCF) and the retry schedule (`Backoff`: exponential with jitter, bounded), so that both hops
//! retry the same way (docs/PROTOCOL.md 6.8).

use std::time::Duration;

/// Why a notice id was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("must be 32 lowercase hex digits, got {len} characters")]
pub struct NoticeIdError {
    /// Characters received (the id itself is not echoed: a peer chose it).
    pub len: usize,
}

/// Identifies one revocation notice end to end (`RevocationNotice.notice_id`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NoticeId(String);

impl NoticeId {
    /// Validates a received id.
    pub fn new(s: &str) -> Result<Self, NoticeIdError> {
        if s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(s.to_string()))
        } else {
            Err(NoticeIdError { len: s.len() })
        }
    }

    /// A fresh random id (128 bits: two notices never share one by chance).
    pub fn random() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()))
    }

    /// The id as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NoticeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The retry schedule of an outbox: after the n-th failed attempt, wait a random time in
/// `[d/2, d]` with `d = min(max, initial * 2^n)`. The jitter keeps many outboxes that failed
/// together (a partner went down) from retrying in lockstep; the cap keeps a partner that comes
/// back from waiting longer than `max` for what is queued for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Upper bound of the first wait.
    pub initial: Duration,
    /// Upper bound of every wait.
    pub max: Duration,
}

impl Backoff {
    /// The bound `d` after `attempts` failed attempts (1 = the first failure).
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        self.initial
            .saturating_mul(1u32 << doublings)
            .min(self.max)
            .max(Duration::from_millis(1))
    }

    /// How long to wait after `attempts` failed attempts: uniform in `[d/2, d]`.
    pub fn delay(&self, attempts: u32) -> Duration {
        let d = self.ceiling(attempts);
        let half = d / 2;
        let span = u64::try_from((d - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::random_range(0..=span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notice_ids_are_32_lowercase_hex() {
        assert!(NoticeId::new(&"0a".repeat(16)).is_ok());
        for bad in [
            "",
            "0A0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",
            &"0".repeat(31),
            &"g".repeat(32),
        ] {
            assert!(NoticeId::new(bad).is_err(), "{bad:?}");
        }
        let (a, b) = (NoticeId::random(), NoticeId::random());
        assert!(NoticeId::new(a.as_str()).is_ok());
        assert_ne!(a, b);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_within_bounds() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1500),
        };
        let ceilings: Vec<u128> = (1..=6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1500, 1500]);
        assert_eq!(b.ceiling(u32::MAX).as_millis(), 1500, "no overflow");
        let mut seen = std::collections::BTreeSet::new();
        for n in 1..=8 {
            let d = b.ceiling(n);
            for _ in 0..200 {
                let got = b.delay(n);
                assert!(
                    got >= d / 2 && got <= d,
                    "attempt {n}: {got:?} outside [d/2, {d:?}]"
                );
                seen.insert(got.as_millis());
            }
        }
        // Jitter: the waits are spread, not one value per attempt.
        assert!(seen.len() > 50, "only {} distinct waits", seen.len());
    }
}
