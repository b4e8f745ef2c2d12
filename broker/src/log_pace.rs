//! A pace for log lines that clients can cause.

use std::sync::Mutex;

use tracing::{info, warn};

/// Logs one event at `$level` (`warn` or `info`) when `$loud`, and at
/// DEBUG otherwise: the two sides of a paced line ([`LogPace`]) written
/// once.
#[macro_export]
macro_rules! paced {
    ($loud:expr, $level:ident, $($event:tt)+) => {
        if $loud {
            ::tracing::$level!($($event)+)
        } else {
            ::tracing::debug!($($event)+)
        }
    };
}

/// Lines of one kind (refused requests, refused connections) logged at
/// WARN or INFO, at most [`LogPace::LOUD_PER_SEC`] a second; the rest at
/// DEBUG, and their number at WARN or INFO when the second is over. What
/// is refused is still answered and counted; a flood of it cannot fill the
/// log (one line per refused request was 14 bytes of log per byte sent).
#[derive(Debug)]
pub struct LogPace {
    second: std::time::Instant,
    loud: u32,
    quiet: u32,
}

impl LogPace {
    const LOUD_PER_SEC: u32 = 20;

    pub fn new(now: std::time::Instant) -> LogPace {
        LogPace {
            second: now,
            loud: 0,
            quiet: 0,
        }
    }

    /// Counts a refusal at `now`: whether to log it at WARN, and how many
    /// went to DEBUG in the second that ended before it.
    pub fn note(&mut self, now: std::time::Instant) -> (bool, u32) {
        let mut quieted = 0;
        if now.saturating_duration_since(self.second) >= std::time::Duration::from_secs(1) {
            quieted = std::mem::take(&mut self.quiet);
            self.second = now;
            self.loud = 0;
        }
        if self.loud < Self::LOUD_PER_SEC {
            self.loud += 1;
            (true, quieted)
        } else {
            self.quiet += 1;
            (false, quieted)
        }
    }

    /// [`LogPace::note`] now on `pace`; logs at `level` (WARN or INFO) how
    /// many `what` went to DEBUG in the second that ended, if any, and says
    /// whether to log this one at `level`.
    pub fn loud_in(pace: &Mutex<LogPace>, what: &str, level: tracing::Level) -> bool {
        pace.lock()
            .unwrap_or_else(|p| p.into_inner())
            .paced(what, level)
    }

    /// The same for a pace of its own, at WARN.
    pub fn loud(&mut self, what: &str) -> bool {
        self.paced(what, tracing::Level::WARN)
    }

    fn paced(&mut self, what: &str, level: tracing::Level) -> bool {
        let (loud, quieted) = self.note(std::time::Instant::now());
        if quieted > 0 {
            if level == tracing::Level::WARN {
                warn!(quieted, "{what} at debug level in the last second");
            } else {
                info!(quieted, "{what} at debug level in the last second");
            }
        }
        loud
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_past_twenty_a_second_are_logged_quietly_and_counted() {
        let t0 = std::time::Instant::now();
        let mut pace = LogPace::new(t0);
        let loud: Vec<bool> = (0..25).map(|_| pace.note(t0).0).collect();
        assert_eq!(loud.iter().filter(|l| **l).count(), 20);
        assert!(loud[..20].iter().all(|l| *l));
        // Within the same second, still quiet.
        assert_eq!(
            pace.note(t0 + std::time::Duration::from_millis(999)),
            (false, 0)
        );
        // The next second starts loud and reports the six kept quiet.
        assert_eq!(pace.note(t0 + std::time::Duration::from_secs(1)), (true, 6));
        assert_eq!(pace.note(t0 + std::time::Duration::from_secs(1)), (true, 0));
    }
}
