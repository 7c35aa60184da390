//! The health check of a trial boot (`gatewayd update health-check`): the new firmware is
//! good when, within the bound, gatewayd is READY (`/healthz`), the spool opens and
//! verifies its index, and the fleet broker was reached in this boot. The probes are the
//! daemon's ([`HealthProbe`]); this module only runs them until all pass or time runs out.

use std::time::{Duration, Instant};

/// One check's answer: passed, or not (yet) with a reason for the log.
pub type Check = Result<(), NotYet>;

/// Why a check has not passed (for the log; no patient data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotYet(pub String);

impl From<&str> for NotYet {
    fn from(s: &str) -> NotYet {
        NotYet(s.to_owned())
    }
}

impl From<String> for NotYet {
    fn from(s: String) -> NotYet {
        NotYet(s)
    }
}

/// The daemon's checks (blocking).
pub trait HealthProbe {
    /// gatewayd answers READY.
    fn ready(&mut self) -> Check;
    /// The spool opens and its index verifies.
    fn spool(&mut self) -> Check;
    /// The fleet agent reached the broker in this boot.
    fn broker(&mut self) -> Check;
}

/// Which checks passed last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub healthy: bool,
    /// `(check, problem)` of the checks that had not passed at the end.
    pub failing: Vec<(&'static str, String)>,
    pub elapsed: Duration,
}

/// Runs the checks every `interval` until all pass once each (a passed check is not run
/// again) or `timeout` elapsed.
pub fn run(probe: &mut dyn HealthProbe, timeout: Duration, interval: Duration) -> HealthReport {
    let started = Instant::now();
    let mut passed = [false; 3];
    let mut failing = Vec::new();
    loop {
        failing.clear();
        for (i, name) in ["ready", "spool", "broker"].into_iter().enumerate() {
            if passed.get(i).copied().unwrap_or(false) {
                continue;
            }
            let result = match i {
                0 => probe.ready(),
                1 => probe.spool(),
                _ => probe.broker(),
            };
            match result {
                Ok(()) => {
                    if let Some(p) = passed.get_mut(i) {
                        *p = true;
                    }
                }
                Err(problem) => failing.push((name, problem.0)),
            }
        }
        if failing.is_empty() {
            return HealthReport {
                healthy: true,
                failing,
                elapsed: started.elapsed(),
            };
        }
        if started.elapsed() + interval > timeout {
            return HealthReport {
                healthy: false,
                failing,
                elapsed: started.elapsed(),
            };
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Probe {
        ready_after: u32,
        calls: u32,
        broker: bool,
    }

    impl HealthProbe for Probe {
        fn ready(&mut self) -> Check {
            self.calls += 1;
            if self.calls > self.ready_after {
                Ok(())
            } else {
                Err("starting".into())
            }
        }
        fn spool(&mut self) -> Check {
            Ok(())
        }
        fn broker(&mut self) -> Check {
            if self.broker {
                Ok(())
            } else {
                Err("not connected in this boot".into())
            }
        }
    }

    #[test]
    fn healthy_once_every_check_passed_within_the_bound() {
        let mut p = Probe {
            ready_after: 2,
            calls: 0,
            broker: true,
        };
        let r = run(&mut p, Duration::from_secs(5), Duration::from_millis(10));
        assert!(r.healthy, "{r:?}");
        assert_eq!(p.calls, 3);
    }

    #[test]
    fn a_check_that_never_passes_fails_at_the_bound_naming_it() {
        let mut p = Probe {
            ready_after: 0,
            calls: 0,
            broker: false,
        };
        let r = run(
            &mut p,
            Duration::from_millis(200),
            Duration::from_millis(20),
        );
        assert!(!r.healthy);
        assert_eq!(
            r.failing,
            vec![("broker", "not connected in this boot".to_owned())]
        );
        assert!(r.elapsed < Duration::from_secs(2));
    }
}
