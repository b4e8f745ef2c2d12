//! A pace for log lines that clients can cause.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
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
/// DEBUG, and their number at WARN or INFO once the second is over: when
/// the next line of the kind comes, or when [`every_second`] flushes the
/// pace, whichever is first. What is refused is still answered and
/// counted; a flood of it cannot fill the log (one line per refused
/// request was 14 bytes of log per byte sent).
#[derive(Debug)]
pub struct LogPace {
    /// What the lines are, as the count of the quiet ones names them
    /// ("refused requests logged").
    what: &'static str,
    /// WARN or INFO: the level of the loud lines and of the count.
    level: tracing::Level,
    second: Instant,
    loud: u32,
    quiet: u32,
}

impl LogPace {
    const LOUD_PER_SEC: u32 = 20;

    pub fn new(what: &'static str, level: tracing::Level) -> LogPace {
        LogPace {
            what,
            level,
            second: Instant::now(),
            loud: 0,
            quiet: 0,
        }
    }

    /// Counts a line at `now`: whether to log it loud, and how many went
    /// to DEBUG in the second that ended before it.
    fn note(&mut self, now: Instant) -> (bool, u32) {
        let quieted = self.overdue(now);
        if self.loud < Self::LOUD_PER_SEC {
            self.loud += 1;
            (true, quieted)
        } else {
            self.quiet += 1;
            (false, quieted)
        }
    }

    /// At `now`: if the second has ended, starts the next and takes how
    /// many lines went to DEBUG in it (each count is told once).
    fn overdue(&mut self, now: Instant) -> u32 {
        if now.saturating_duration_since(self.second) < Duration::from_secs(1) {
            return 0;
        }
        self.second = now;
        self.loud = 0;
        std::mem::take(&mut self.quiet)
    }

    /// Whether to log this line loud (at the pace's level) or at DEBUG;
    /// logs the count of the last second's quiet lines first, if any,
    /// after the lock is let go (a slow log writer does not hold up the
    /// pace's other users).
    pub fn loud_in(pace: &Mutex<LogPace>) -> bool {
        let mut locked = pace.lock().unwrap_or_else(|p| p.into_inner());
        let (loud, quieted) = locked.note(Instant::now());
        let (what, level) = (locked.what, locked.level);
        drop(locked);
        tell(what, level, quieted);
        loud
    }

    /// Logs the count of quiet lines of a second that has ended, if any,
    /// though no line of the kind came since; with `at_end`, of the second
    /// under way too (the program is stopping).
    pub fn flush_in(pace: &Mutex<LogPace>, at_end: bool) {
        let mut locked = pace.lock().unwrap_or_else(|p| p.into_inner());
        let quieted = match at_end {
            true => std::mem::take(&mut locked.quiet),
            false => locked.overdue(Instant::now()),
        };
        let (what, level) = (locked.what, locked.level);
        drop(locked);
        tell(what, level, quieted);
    }
}

/// Logs at `level` that `quieted` lines of `what` went to DEBUG, if any.
fn tell(what: &str, level: tracing::Level, quieted: u32) {
    if quieted == 0 {
        return;
    }
    if level == tracing::Level::WARN {
        warn!(quieted, "{what} at debug level in the last second");
    } else {
        info!(quieted, "{what} at debug level in the last second");
    }
}

/// Runs `flush` (a [`LogPace::flush_in`] of each pace it owns) every
/// second until `stop`: the count of a flood's last second is logged when
/// the flood ends. The owner flushes `at_end` once its tasks are done.
pub async fn every_second(flush: impl Fn(), stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_past_twenty_a_second_are_logged_quietly_and_counted() {
        let mut pace = LogPace::new("lines", tracing::Level::WARN);
        let t0 = pace.second;
        let loud: Vec<bool> = (0..25).map(|_| pace.note(t0).0).collect();
        assert_eq!(loud.iter().filter(|l| **l).count(), 20);
        assert!(loud[..20].iter().all(|l| *l));
        // Within the same second, still quiet.
        assert_eq!(pace.note(t0 + Duration::from_millis(999)), (false, 0));
        // The next second starts loud and reports the six kept quiet.
        assert_eq!(pace.note(t0 + Duration::from_secs(1)), (true, 6));
        assert_eq!(pace.note(t0 + Duration::from_secs(1)), (true, 0));
    }

    #[test]
    fn the_count_of_a_flood_s_last_second_is_told_with_no_line_after_it() {
        let mut pace = LogPace::new("lines", tracing::Level::WARN);
        let t0 = pace.second;
        for _ in 0..23 {
            pace.note(t0);
        }
        assert_eq!(pace.overdue(t0 + Duration::from_millis(999)), 0);
        assert_eq!(pace.overdue(t0 + Duration::from_secs(2)), 3);
        // Told once; the next line starts a new second, loud.
        assert_eq!(pace.overdue(t0 + Duration::from_secs(4)), 0);
        assert_eq!(pace.note(t0 + Duration::from_secs(4)), (true, 0));
    }
}
