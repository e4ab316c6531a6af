//! The one order events are listed in, on every collector and gateway: (time in ms, agent id,
//! seq). Each event has one place in it whichever shard stored it, so a gateway merges shards'
//! pages by it, resumes every shard after the last event it returned
//! (`ListEventsRequest.resume_after`), and drops the second copy of an event two shards hold
//! (an agent that failed over resends what the first shard may have stored) as the neighbour
//! with the same position.
use std::cmp::Ordering;

use crate::{
    time,
    v1::{Event, EventPosition},
};

/// An event's time in ms since the epoch as listings order it: its `time`, else `received`.
pub fn event_ms(ev: &Event) -> i64 {
    ev.time
        .as_ref()
        .or(ev.received.as_ref())
        .map_or(0, time::to_unix_millis)
}

/// Where `ev` stands in a listing.
pub fn position(ev: &Event) -> EventPosition {
    EventPosition {
        time_ms: event_ms(ev),
        agent_id: ev.agent_id.clone(),
        seq: ev.seq,
    }
}

/// Listing order of two events (oldest first).
pub fn cmp(a: &Event, b: &Event) -> Ordering {
    (event_ms(a), a.agent_id.as_str(), a.seq).cmp(&(event_ms(b), b.agent_id.as_str(), b.seq))
}

/// Listing order of an event against a position (oldest first).
pub fn cmp_position(a: &Event, p: &EventPosition) -> Ordering {
    (event_ms(a), a.agent_id.as_str(), a.seq).cmp(&(p.time_ms, p.agent_id.as_str(), p.seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ms: i64, agent: &str, seq: u64) -> Event {
        Event {
            time: Some(time::from_unix_millis(ms)),
            agent_id: agent.into(),
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn time_then_agent_then_seq() {
        let mut v = [ev(2, "a", 1), ev(1, "b", 9), ev(1, "a", 5), ev(1, "a", 2)];
        v.sort_by(cmp);
        let got: Vec<_> = v
            .iter()
            .map(|e| (event_ms(e), e.agent_id.as_str(), e.seq))
            .collect();
        assert_eq!(got, [(1, "a", 2), (1, "a", 5), (1, "b", 9), (2, "a", 1)]);
        assert_eq!(cmp_position(&v[1], &position(&v[1])), Ordering::Equal);
        assert_eq!(cmp_position(&v[0], &position(&v[1])), Ordering::Less);
    }

    #[test]
    fn received_stands_in_for_a_missing_time() {
        let mut e = ev(0, "a", 1);
        e.time = None;
        e.received = Some(time::from_unix_millis(77));
        assert_eq!(event_ms(&e), 77);
        e.received = None;
        assert_eq!(event_ms(&e), 0);
    }
}
