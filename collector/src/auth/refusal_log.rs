//! Which refusals reach the log. Every refusal is counted (`gpulse_auth_refused_total`); the log
//! says who was refused and why, without letting a flood fill it or silence it.
//!
//! The old rule, "once per identity and reason, for the first 4,096", let 4,096 junk tokens with
//! distinct key ids use up the set, after which no refusal was ever logged again (issue 27 #16).
//! Now each reason has its own budget of lines per minute, so junk of one reason never silences
//! another, and a flood silences its own reason for the rest of that minute only; what was left
//! out is said in the next line of that reason ("N more refused, not logged"). Within the budget a
//! caller is logged once per 10 minutes (an agent retrying with a revoked token every second
//! would otherwise spend the budget alone); the table of callers seen is bounded and forgets the
//! oldest first.
use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

/// Lines per reason per window.
pub const LINES_PER_WINDOW: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);
/// How long a caller already logged for a reason stays quiet.
pub const REPEAT_AFTER: Duration = Duration::from_secs(600);
/// Callers remembered for `REPEAT_AFTER` (oldest forgotten first).
pub const MAX_REMEMBERED: usize = 4096;

#[derive(Debug, Default)]
struct Budget {
    window_start: Option<Instant>,
    lines: u32,
    /// Refusals of this reason not logged since the last line (budget or repeat).
    unlogged: u64,
}

/// What to log for one refusal, if anything.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// Refusals of the same reason left out of the log before this one.
    pub unlogged_before: u64,
}

#[derive(Debug, Default)]
pub struct RefusalLog {
    budgets: HashMap<&'static str, Budget>,
    seen: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl RefusalLog {
    /// Whether to log the refusal of `who` for `reason` at `now`.
    pub fn admit(&mut self, reason: &'static str, who: &str, now: Instant) -> Option<Line> {
        let b = self.budgets.entry(reason).or_default();
        if b.window_start
            .is_none_or(|s| now.duration_since(s) >= WINDOW)
        {
            b.window_start = Some(now);
            b.lines = 0;
        }
        let key = format!("{reason}/{}", clip(who));
        let recent = self
            .seen
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < REPEAT_AFTER);
        if recent || b.lines >= LINES_PER_WINDOW {
            b.unlogged += 1;
            return None;
        }
        b.lines += 1;
        let line = Line {
            unlogged_before: std::mem::take(&mut b.unlogged),
        };
        self.remember(key, now);
        Some(line)
    }

    fn remember(&mut self, key: String, now: Instant) {
        self.seen.insert(key.clone(), now);
        self.order.push_back((key, now));
        while self.seen.len() > MAX_REMEMBERED || self.order.len() > 2 * MAX_REMEMBERED {
            let Some((k, t)) = self.order.pop_front() else {
                break;
            };
            // Only the entry's newest time removes it (an older queue entry is stale).
            if self.seen.get(&k) == Some(&t) {
                self.seen.remove(&k);
            }
        }
    }

    /// Callers remembered (bounded by `MAX_REMEMBERED`).
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}

/// A caller's description is partly the caller's own text (a token's key id): kept short.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn junk_cannot_silence_later_refusals() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        // 4,200 junk tokens with distinct key ids within one minute: 20 lines, the rest counted.
        let logged = (0..4200)
            .filter(|i| {
                log.admit("bad_token", &format!("unknown key id junk-{i}"), t0)
                    .is_some()
            })
            .count();
        assert_eq!(logged, LINES_PER_WINDOW as usize);
        // Another reason is not affected at all.
        assert_eq!(
            log.admit("other_node", "token on line 3", t0),
            Some(Line { unlogged_before: 0 })
        );
        // A minute later a real refusal is logged, saying how many were left out.
        let later = t0 + WINDOW;
        assert_eq!(
            log.admit("bad_token", "unknown or revoked bearer token", later),
            Some(Line {
                unlogged_before: 4200 - LINES_PER_WINDOW as u64
            })
        );
        assert!(log.remembered() <= MAX_REMEMBERED);
    }

    #[test]
    fn a_retrying_caller_is_logged_once_per_repeat_interval() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert!(log.admit("wrong_role", "token on line 2", t0).is_some());
        for s in 1..600 {
            let t = t0 + Duration::from_secs(s);
            assert!(log.admit("wrong_role", "token on line 2", t).is_none());
        }
        let again = log
            .admit("wrong_role", "token on line 2", t0 + REPEAT_AFTER)
            .unwrap();
        assert_eq!(again.unlogged_before, 599);
    }

    #[test]
    fn the_table_of_callers_stays_bounded() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..(3 * MAX_REMEMBERED as u64) {
            // A fresh window each time, so every caller is admitted and remembered.
            let t = t0 + WINDOW * (i as u32);
            assert!(log.admit("bad_token", &format!("kid {i}"), t).is_some());
            assert!(log.remembered() <= MAX_REMEMBERED);
        }
        assert!(log.order.len() <= 2 * MAX_REMEMBERED);
    }
}
