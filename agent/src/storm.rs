//! XID storm control: a GPU that prints the same XID hundreds of thousands of times must not
//! become as many events. Per GPU and code, the first [`VERBATIM`] records of each second pass
//! as they are; past that the records are counted, and one event per second stands for them
//! (`Xid.storm`: how many, first and last time, total so far), plus a last one when a second
//! passes without a record ("XID 95 x 812,344 in 60 s"). Counters downstream add `storm.count`,
//! so they stay exact; other codes and other GPUs are never held back.
use std::collections::HashMap;

use gpulse_proto::{
    time::from_unix_nanos,
    v1::{self, event::Payload},
};

/// Records of one code on one GPU passed verbatim per second.
pub const VERBATIM: u32 = 10;
const SECOND: i128 = 1_000_000_000;
/// A storm is over after this long without a record.
const QUIET: i128 = 2 * SECOND;
/// GPU x code pairs tracked at most (the least recently seen idle one makes room).
const MAX_KEYS: usize = 1024;

type Key = (String, u32);

struct Track {
    /// Start of the current one-second window and records in it.
    window: i128,
    in_window: u32,
    last_seen: i128,
    storm: Option<Storm>,
}

struct Storm {
    started: i128,
    total: u64,
    /// Records since the last summary, the first and last of them.
    pending: u64,
    first: i128,
    last: i128,
    /// The latest record (what the summary says besides the counts).
    latest: Box<v1::Event>,
    last_summary: i128,
}

#[derive(Default)]
pub struct StormControl {
    tracks: HashMap<Key, Track>,
    /// Records coalesced into storm summaries (not sent on their own).
    pub coalesced: u64,
    /// Storms seen.
    pub storms: u64,
}

fn key_of(ev: &v1::Event) -> Option<Key> {
    match &ev.payload {
        Some(Payload::Xid(x)) => {
            let pci = if x.pci.is_empty() { &x.pci_raw } else { &x.pci };
            Some((pci.clone(), x.code))
        }
        _ => None,
    }
}

impl StormControl {
    /// One decoded event at kernel time `t`: returned when it goes out as it is, `None` when a
    /// storm summary will stand for it.
    pub fn admit(&mut self, ev: v1::Event, t: i128) -> Option<v1::Event> {
        let Some(key) = key_of(&ev) else {
            return Some(ev);
        };
        if !self.tracks.contains_key(&key) && self.tracks.len() >= MAX_KEYS {
            self.evict();
        }
        let tr = self.tracks.entry(key).or_insert(Track {
            window: t,
            in_window: 0,
            last_seen: t,
            storm: None,
        });
        if t - tr.window >= SECOND || t < tr.window {
            tr.window = t;
            tr.in_window = 0;
        }
        tr.in_window += 1;
        tr.last_seen = tr.last_seen.max(t);
        if tr.storm.is_none() && tr.in_window <= VERBATIM {
            return Some(ev);
        }
        self.coalesced += 1;
        match &mut tr.storm {
            None => {
                self.storms += 1;
                tr.storm = Some(Storm {
                    started: t,
                    total: 1,
                    pending: 1,
                    first: t,
                    last: t,
                    latest: Box::new(ev),
                    last_summary: t,
                });
            }
            Some(s) => {
                s.total += 1;
                if s.pending == 0 {
                    s.first = t;
                }
                s.pending += 1;
                s.last = s.last.max(t);
                *s.latest = ev;
            }
        }
        None
    }

    /// Summaries due at `now`: one per storm per second with records pending, and the last of
    /// each storm that went quiet.
    pub fn tick(&mut self, now: i128) -> Vec<v1::Event> {
        let mut out = Vec::new();
        self.tracks.retain(|_, tr| {
            let quiet = now - tr.last_seen >= QUIET;
            if let Some(s) = &mut tr.storm {
                if s.pending > 0 && (quiet || now - s.last_summary >= SECOND) {
                    out.push(summary(s, quiet));
                    s.pending = 0;
                    s.last_summary = now;
                } else if quiet {
                    // Nothing pending: the last summary said it all; say that it ended.
                    out.push(summary(s, true));
                }
            }
            if quiet {
                tr.storm = None;
            }
            // Idle tracks without a storm go; a storm is kept until it is said to be over.
            !(quiet && now - tr.last_seen >= 10 * SECOND)
        });
        out
    }

    /// Makes room: the least recently seen track without a storm (a storm's records must be
    /// said); failing that, the least recently seen.
    fn evict(&mut self) {
        let victim = self
            .tracks
            .iter()
            .min_by_key(|(_, t)| (t.storm.is_some(), t.last_seen))
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            self.tracks.remove(&k);
        }
    }

    pub fn active(&self) -> usize {
        self.tracks.values().filter(|t| t.storm.is_some()).count()
    }
}

fn summary(s: &Storm, ended: bool) -> v1::Event {
    let mut ev = (*s.latest).clone();
    ev.time = Some(from_unix_nanos(s.last));
    if let Some(Payload::Xid(x)) = &mut ev.payload {
        x.storm = Some(v1::XidStorm {
            count: s.pending,
            first: (s.pending > 0).then(|| from_unix_nanos(s.first)),
            // The storm's last record, also on the event that only says it ended.
            last: (s.pending > 0 || ended).then(|| from_unix_nanos(s.last)),
            total: s.total,
            started: Some(from_unix_nanos(s.started)),
            ended,
        });
    }
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i128 = 1_764_000_000 * SECOND;

    fn xid(code: u32, pci: &str) -> v1::Event {
        v1::Event {
            payload: Some(Payload::Xid(v1::Xid {
                code,
                pci: pci.into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn storm_of(ev: &v1::Event) -> v1::XidStorm {
        match &ev.payload {
            Some(Payload::Xid(x)) => x.storm.unwrap(),
            _ => panic!(),
        }
    }

    #[test]
    fn a_storm_is_coalesced_exactly_and_other_codes_pass() {
        let mut s = StormControl::default();
        let mut passed = 0u64;
        let mut summaries = Vec::new();
        // 10,000 records of XID 95 over 2.5 s; an XID 79 on another GPU in the middle.
        for i in 0..10_000i128 {
            let t = T + i * (SECOND / 4000);
            passed += u64::from(s.admit(xid(95, "0000:3b:00.0"), t).is_some());
            if i == 5000 {
                assert!(
                    s.admit(xid(79, "0000:86:00.0"), t).is_some(),
                    "another GPU's XID is never held"
                );
                assert!(
                    s.admit(xid(13, "0000:3b:00.0"), t).is_some(),
                    "another code on the storming GPU neither"
                );
            }
            if i % 400 == 0 {
                summaries.extend(s.tick(t));
            }
        }
        summaries.extend(s.tick(T + 10 * SECOND));
        assert_eq!(passed, u64::from(VERBATIM), "the first records verbatim");
        let counted: u64 = summaries.iter().map(|e| storm_of(e).count).sum();
        assert_eq!(passed + counted, 10_000, "exact");
        assert!(
            summaries.len() <= 5,
            "about one per second: {}",
            summaries.len()
        );
        let last = storm_of(summaries.last().unwrap());
        assert!(last.ended);
        assert_eq!(last.total, 10_000 - u64::from(VERBATIM));
        assert_eq!(s.active(), 0);
        assert_eq!(s.storms, 1);
    }

    #[test]
    fn a_steady_trickle_is_no_storm() {
        let mut s = StormControl::default();
        for i in 0..100i128 {
            assert!(
                s.admit(xid(13, "0000:3b:00.0"), T + i * SECOND / 3)
                    .is_some()
            );
        }
        assert!(s.tick(T + 100 * SECOND).is_empty());
        assert_eq!(s.coalesced, 0);
    }

    #[test]
    fn tracked_pairs_are_bounded() {
        let mut s = StormControl::default();
        for i in 0..5000u32 {
            s.admit(xid(i, "0000:3b:00.0"), T);
        }
        assert!(s.tracks.len() <= MAX_KEYS);
    }
}
