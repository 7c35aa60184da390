//! The reconnection schedule: a first wait, doubled after every failed attempt up to a cap,
//! and back to the first wait once the broker accepts a connection.

use std::time::Duration;

/// Waits between connection attempts: `initial`, then doubling, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A schedule starting at `initial` and doubling up to `max` (`max` below `initial`
    /// is raised to `initial`).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The wait before the next attempt; the one after it is doubled (up to the cap).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    /// A connection was accepted: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The first wait.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest wait.
    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn doubles_from_the_first_wait_up_to_the_cap_and_stays_there() {
        let mut b = Backoff::new(secs(1), secs(60));
        let waits: Vec<u64> = (0..9).map(|_| b.next_wait().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn the_regional_schedule_starts_at_half_a_second_and_caps_at_thirty() {
        let mut b = Backoff::new(Duration::from_millis(500), secs(30));
        let waits: Vec<u128> = (0..8).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    }

    #[test]
    fn an_accepted_connection_starts_the_schedule_again() {
        let mut b = Backoff::new(secs(1), secs(60));
        for _ in 0..5 {
            b.next_wait();
        }
        b.reset();
        assert_eq!(b.next_wait(), secs(1));
        assert_eq!(b.next_wait(), secs(2));
    }

    #[test]
    fn a_cap_below_the_first_wait_is_the_first_wait() {
        let mut b = Backoff::new(secs(5), secs(1));
        assert_eq!((b.next_wait(), b.next_wait()), (secs(5), secs(5)));
        assert_eq!((b.initial(), b.max()), (secs(5), secs(5)));
    }
}
