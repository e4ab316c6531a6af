//! The in-memory event ring: bounded by bytes, oldest expired first, indexed by cursor.
//!
//! Cursors increase with every stored event and only the oldest events are ever removed, so the
//! slots are sorted by cursor and resuming after a cursor is a binary search. (Cursors are
//! contiguous in normal operation; after a damaged log tail they skip the range that may have been
//! handed out before the crash, so no cursor is ever reused.)
use std::{collections::VecDeque, sync::Arc};

use gpulse_proto::v1::{self, EventKind};
use prost::Message;

/// Fixed per-event overhead counted against the budget (Arc, deque slot, bookkeeping), so the
/// budget bounds real memory, not just payload bytes.
pub const EVENT_OVERHEAD_BYTES: usize = 96;

/// Number of EventKind values (index = kind as usize).
pub const KINDS: usize = 8;

#[derive(Debug)]
struct Slot {
    event: Arc<v1::Event>,
    size: usize,
    kind: usize,
}

#[derive(Debug)]
pub struct EventRing {
    slots: VecDeque<Slot>,
    bytes: usize,
    budget: usize,
    bytes_by_kind: [usize; KINDS],
    events_by_kind: [u64; KINDS],
    expired_by_kind: [u64; KINDS],
    next_cursor: u64,
}

fn kind_index(ev: &v1::Event) -> usize {
    let k = ev.kind as usize;
    if k < KINDS { k } else { 0 }
}

impl EventRing {
    /// An empty ring holding at most `budget` bytes; cursors start at `next_cursor` (>= 1).
    pub fn new(budget: usize, next_cursor: u64) -> Self {
        Self {
            slots: VecDeque::new(),
            bytes: 0,
            budget,
            bytes_by_kind: [0; KINDS],
            events_by_kind: [0; KINDS],
            expired_by_kind: [0; KINDS],
            next_cursor: next_cursor.max(1),
        }
    }

    /// The cursor the next stored event gets.
    pub fn next_cursor(&self) -> u64 {
        self.next_cursor
    }

    /// Stores `ev` with the next cursor (overwriting whatever cursor it carried). Returns the
    /// stored event and how many old events were expired to make room.
    pub fn push(&mut self, mut ev: v1::Event) -> (Arc<v1::Event>, u64) {
        ev.cursor = self.next_cursor;
        self.next_cursor += 1;
        self.insert(ev)
    }

    /// Re-inserts an event read back from the write-ahead log, keeping its cursor. Events must
    /// come in increasing cursor order; a jump (events lost to a damaged log segment) is allowed.
    pub fn restore(&mut self, ev: v1::Event) -> Option<(Arc<v1::Event>, u64)> {
        if ev.cursor < self.next_cursor {
            return None;
        }
        self.next_cursor = ev.cursor + 1;
        Some(self.insert(ev))
    }

    /// Never hand out cursors below `next` (they may have been issued before a crash).
    pub fn skip_to(&mut self, next: u64) {
        self.next_cursor = self.next_cursor.max(next);
    }

    fn insert(&mut self, ev: v1::Event) -> (Arc<v1::Event>, u64) {
        let size = ev.encoded_len() + EVENT_OVERHEAD_BYTES;
        let kind = kind_index(&ev);
        let ev = Arc::new(ev);
        self.slots.push_back(Slot {
            event: ev.clone(),
            size,
            kind,
        });
        self.bytes += size;
        self.bytes_by_kind[kind] += size;
        self.events_by_kind[kind] += 1;
        let mut expired = 0;
        while self.bytes > self.budget && self.slots.len() > 1 {
            if let Some(old) = self.slots.pop_front() {
                self.bytes -= old.size;
                self.bytes_by_kind[old.kind] -= old.size;
                self.events_by_kind[old.kind] -= 1;
                self.expired_by_kind[old.kind] += 1;
                expired += 1;
            }
        }
        (ev, expired)
    }

    pub fn oldest_cursor(&self) -> Option<u64> {
        self.slots.front().map(|s| s.event.cursor)
    }

    pub fn last_cursor(&self) -> Option<u64> {
        self.slots.back().map(|s| s.event.cursor)
    }

    pub fn oldest(&self) -> Option<&Arc<v1::Event>> {
        self.slots.front().map(|s| &s.event)
    }

    /// Events with cursor > `after`, oldest first, that satisfy `keep`, at most `limit`.
    pub fn after(
        &self,
        after: u64,
        limit: usize,
        mut keep: impl FnMut(&v1::Event) -> bool,
    ) -> Vec<Arc<v1::Event>> {
        let start = self.slots.partition_point(|s| s.event.cursor <= after);
        self.slots
            .iter()
            .skip(start)
            .filter(|s| keep(&s.event))
            .take(limit)
            .map(|s| s.event.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn budget(&self) -> usize {
        self.budget
    }
    pub fn bytes_by_kind(&self, kind: EventKind) -> usize {
        self.bytes_by_kind[kind as usize]
    }
    pub fn events_by_kind(&self, kind: EventKind) -> u64 {
        self.events_by_kind[kind as usize]
    }
    pub fn expired_by_kind(&self, kind: EventKind) -> u64 {
        self.expired_by_kind[kind as usize]
    }
    pub fn expired_total(&self) -> u64 {
        self.expired_by_kind.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_proto::v1::event::Payload;

    fn ev(i: u64, kind: EventKind) -> v1::Event {
        v1::Event {
            seq: i,
            kind: kind as i32,
            payload: Some(match kind {
                EventKind::Xid => Payload::Xid(v1::Xid {
                    code: 79,
                    message: format!("m{i}"),
                    ..Default::default()
                }),
                _ => Payload::DriverLog(v1::DriverLog {
                    text: format!("log line {i}"),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn cursors_are_contiguous_and_resumable() {
        let mut r = EventRing::new(1 << 20, 1);
        for i in 0..100 {
            r.push(ev(
                i,
                if i % 3 == 0 {
                    EventKind::Xid
                } else {
                    EventKind::DriverLog
                },
            ));
        }
        assert_eq!((r.oldest_cursor(), r.last_cursor()), (Some(1), Some(100)));
        let got: Vec<u64> = r
            .after(90, 100, |_| true)
            .iter()
            .map(|e| e.cursor)
            .collect();
        assert_eq!(got, (91..=100).collect::<Vec<_>>());
        let xids = r.after(0, 5, |e| e.kind == EventKind::Xid as i32);
        assert_eq!(
            xids.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![1, 4, 7, 10, 13]
        );
        assert!(r.after(100, 10, |_| true).is_empty());
        assert_eq!(r.events_by_kind(EventKind::Xid), 34);
    }

    #[test]
    fn byte_budget_expires_oldest_first() {
        let mut r = EventRing::new(10_000, 1);
        let mut expired = 0;
        for i in 0..1000 {
            expired += r.push(ev(i, EventKind::DriverLog)).1;
        }
        assert!(r.bytes() <= 10_000);
        assert_eq!(r.last_cursor(), Some(1000));
        assert_eq!(r.oldest_cursor().unwrap() as usize, 1000 - r.len() + 1);
        assert_eq!(expired, r.expired_total());
        assert_eq!(expired as usize + r.len(), 1000);
        // Resuming from an expired cursor starts at the oldest retained event.
        let first = r.after(3, 1, |_| true);
        assert_eq!(first[0].cursor, r.oldest_cursor().unwrap());
        let sum: usize = [EventKind::DriverLog, EventKind::Xid]
            .iter()
            .map(|k| r.bytes_by_kind(*k))
            .sum();
        assert_eq!(sum, r.bytes());
    }

    #[test]
    fn restore_keeps_cursors_and_rejects_old_ones() {
        let mut r = EventRing::new(1 << 20, 1);
        let mut e = ev(1, EventKind::Xid);
        e.cursor = 5;
        assert!(r.restore(e.clone()).is_some());
        assert!(r.restore(e).is_none(), "duplicate cursor");
        let mut e = ev(2, EventKind::Xid);
        e.cursor = 9;
        r.restore(e);
        assert_eq!((r.oldest_cursor(), r.last_cursor()), (Some(5), Some(9)));
        assert_eq!(r.push(ev(3, EventKind::Xid)).0.cursor, 10);
        // Resuming inside the hole starts at the next existing cursor.
        assert_eq!(
            r.after(6, 10, |_| true)
                .iter()
                .map(|e| e.cursor)
                .collect::<Vec<_>>(),
            vec![9, 10]
        );
        r.skip_to(20);
        assert_eq!(r.push(ev(4, EventKind::Xid)).0.cursor, 20);
        r.skip_to(3);
        assert_eq!(r.next_cursor(), 21, "never backwards");
    }
}
