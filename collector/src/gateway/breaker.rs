//! A circuit breaker per upstream: after `threshold` failures in a row the upstream is not asked
//! for `cooldown` (answers name it `circuit_open` at once instead of waiting out a deadline on
//! every request); then one request goes through as a probe (half-open): its success closes the
//! circuit, its failure opens it again for twice as long, up to `max_cooldown`.
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct BreakerConfig {
    pub threshold: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: 3,
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        cooldown: Duration,
    },
    /// A probe is out; others are refused until it ends.
    Probing {
        cooldown: Duration,
    },
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: State,
}

/// Whether a call may go ahead, and whether it is the half-open probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Call,
    Probe,
    Refuse,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: State::Closed { failures: 0 },
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed { .. } => Admit::Call,
            State::Open { until, cooldown } if now >= until => {
                self.state = State::Probing { cooldown };
                Admit::Probe
            }
            State::Open { .. } | State::Probing { .. } => Admit::Refuse,
        }
    }

    pub fn success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    /// A failed call (an unreachable, erroring or late upstream; not a refused argument).
    pub fn failure(&mut self, now: Instant) {
        self.state = match self.state {
            State::Closed { failures } if failures + 1 < self.cfg.threshold => State::Closed {
                failures: failures + 1,
            },
            State::Closed { .. } => State::Open {
                until: now + self.cfg.cooldown,
                cooldown: self.cfg.cooldown,
            },
            State::Probing { cooldown } | State::Open { cooldown, .. } => {
                let cooldown = (cooldown * 2).min(self.cfg.max_cooldown);
                State::Open {
                    until: now + cooldown,
                    cooldown,
                }
            }
        };
    }

    /// A probe that ended without an answer either way (its request was cancelled): the next
    /// request may probe again.
    pub fn probe_abandoned(&mut self, now: Instant) {
        if let State::Probing { cooldown } = self.state {
            self.state = State::Open {
                until: now,
                cooldown,
            };
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_cooldown_and_backs_off() {
        let cfg = BreakerConfig {
            threshold: 3,
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(5),
        };
        let mut b = Breaker::new(cfg);
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Admit::Call);
            b.failure(t0);
        }
        assert!(!b.is_open());
        b.success();
        for _ in 0..3 {
            assert_eq!(b.admit(t0), Admit::Call);
            b.failure(t0);
        }
        assert!(b.is_open());
        assert_eq!(b.admit(t0 + Duration::from_secs(1)), Admit::Refuse);
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(b.admit(t2), Admit::Probe);
        // One probe at a time.
        assert_eq!(b.admit(t2), Admit::Refuse);
        b.failure(t2);
        // Twice the cooldown now.
        assert_eq!(b.admit(t2 + Duration::from_secs(3)), Admit::Refuse);
        let t6 = t2 + Duration::from_secs(4);
        assert_eq!(b.admit(t6), Admit::Probe);
        b.failure(t6);
        // Capped at max_cooldown.
        assert_eq!(b.admit(t6 + Duration::from_secs(5)), Admit::Probe);
        b.success();
        assert!(!b.is_open());
        assert_eq!(b.admit(t6), Admit::Call);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let mut b = Breaker::new(BreakerConfig {
            threshold: 1,
            ..Default::default()
        });
        let t0 = Instant::now();
        b.failure(t0);
        let t = t0 + Duration::from_secs(3);
        assert_eq!(b.admit(t), Admit::Probe);
        b.probe_abandoned(t);
        assert_eq!(b.admit(t), Admit::Probe);
    }
}
