//! ListEvents merged across upstreams. Every collector lists events in one global order
//! (time in ms, agent id, seq: `gpulse_proto::listing`), so a page is the first `limit` events
//! of the upstreams' pages merged in that order, and the next page asks every upstream for what
//! follows the last event returned (`resume_after`). The gateway's page token is that position
//! with the pinned window: nothing is skipped or listed twice across pages, whichever upstream
//! expired data or dropped out in between (an upstream that was missing lists, once back, only
//! what follows the position). Two copies of one event (an agent that failed over resent what
//! the first shard had stored) have the same position and are listed once.
use gpulse_proto::{
    listing,
    v1::{Event, EventPosition, ListEventsRequest, ListEventsResponse, Order, TimeWindow},
};
use prost::Message;
use tonic::Status;

use super::merge;

/// What a gateway page token holds.
#[derive(Clone, PartialEq, prost::Message)]
struct Token {
    #[prost(string, tag = "1")]
    since: String,
    #[prost(string, tag = "2")]
    until: String,
    /// Fingerprint of the filter and order (and the upstreams asked).
    #[prost(uint64, tag = "3")]
    query: u64,
    #[prost(message, optional, tag = "4")]
    last: Option<EventPosition>,
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const TOKEN_PREFIX: &str = "g1.";
/// A token is a window, a fingerprint and one position (an agent id is at most 512 bytes).
const MAX_TOKEN: usize = 2048;

impl Token {
    fn encode(&self) -> String {
        let mut b = self.encode_to_vec();
        b.extend_from_slice(&(fnv(&b) as u32).to_be_bytes());
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!("{TOKEN_PREFIX}{hex}")
    }

    fn parse(s: &str) -> Result<Self, Status> {
        let bad = |why: &str| {
            Status::invalid_argument(format!(
                "page_token is not one this gateway issued for this query ({why}); start again without it"
            ))
        };
        let hex = s
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| bad("unknown format"))?;
        if !hex.is_ascii() || hex.len() % 2 != 0 || hex.len() < 8 || hex.len() > MAX_TOKEN * 2 {
            return Err(bad("wrong length"));
        }
        let b: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| bad("not hex"))?;
        let (body, check) = b.split_at(b.len() - 4);
        if (fnv(body) as u32).to_be_bytes() != check {
            return Err(bad("checksum"));
        }
        <Token as Message>::decode(body).map_err(|_| bad("does not decode"))
    }
}

/// The request each upstream gets, and what the merge needs to know about it.
pub struct Plan {
    pub upstream_req: ListEventsRequest,
    limit: usize,
    newest_first: bool,
    since: String,
    until: String,
    query: u64,
}

impl Plan {
    pub fn new(req: ListEventsRequest, upstreams: &[String]) -> Result<Self, Status> {
        let limit =
            gpulse_proto::answer::events_limit(req.limit).map_err(Status::invalid_argument)?;
        let newest_first = match Order::try_from(req.order) {
            Ok(Order::OldestFirst) => false,
            Ok(_) => true,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "order {} is out of range; 0 (newest first), 1 (newest first), 2 (oldest first)",
                    req.order
                )));
            }
        };
        let query = {
            let mut b = req.filter.clone().unwrap_or_default().encode_to_vec();
            b.push(u8::from(newest_first));
            for u in upstreams {
                b.extend_from_slice(u.as_bytes());
                b.push(0);
            }
            fnv(&b)
        };
        let (window, resume) = if req.page_token.is_empty() {
            (merge::pin_or_now(req.window)?, req.resume_after)
        } else {
            let t = Token::parse(&req.page_token)?;
            if t.query != query {
                return Err(Status::invalid_argument(
                    "page_token is not one this gateway issued for this query (the filter or order differs from the first page); start again without it",
                ));
            }
            // A higher gateway's position, when it gives one, is the newer word.
            let resume = req.resume_after.or(t.last);
            (
                TimeWindow {
                    since: t.since,
                    until: t.until,
                },
                resume,
            )
        };
        Ok(Self {
            upstream_req: ListEventsRequest {
                window: Some(window.clone()),
                filter: req.filter,
                limit,
                page_token: String::new(),
                order: req.order,
                resume_after: resume,
            },
            limit: limit as usize,
            newest_first,
            since: window.since,
            until: window.until,
            query,
        })
    }
}

/// Upstream pages folded into the first `limit` events in listing order.
pub struct Merge {
    plan: Plan,
    /// In listing order (the request's direction), at most `limit + 1`.
    events: Vec<Event>,
    out: ListEventsResponse,
    /// Some upstream has more than its page held.
    upstream_more: bool,
    /// The earliest last event (in listing order) of the upstreams that have more: a page may
    /// end early by bytes, so an upstream's next unlisted event may come before another's
    /// listed ones, and the merged page stops here (else that event would be skipped).
    frontier: Option<Event>,
    pub duplicates: u64,
}

impl Merge {
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            events: Vec::new(),
            out: ListEventsResponse::default(),
            upstream_more: false,
            frontier: None,
            duplicates: 0,
        }
    }

    fn before(&self, a: &Event, b: &Event) -> std::cmp::Ordering {
        if self.plan.newest_first {
            listing::cmp(b, a)
        } else {
            listing::cmp(a, b)
        }
    }

    pub fn add(&mut self, upstream: &str, r: ListEventsResponse) {
        merge::window(&mut self.out.window, r.window);
        merge::hints(&mut self.out.hints, upstream, r.hints);
        self.out.total_matched += r.total_matched;
        self.out.expired_while_paging += r.expired_while_paging;
        if !r.next_page_token.is_empty() {
            self.upstream_more = true;
            if let Some(last) = r.events.last()
                && self
                    .frontier
                    .as_ref()
                    .is_none_or(|f| self.before(last, f).is_lt())
            {
                self.frontier = Some(last.clone());
            }
        }
        for e in r.events {
            match self.events.binary_search_by(|x| self.before(x, &e)) {
                // Seq 0: written by a collector (a verdict, a seq-gap notice), never resent by
                // an agent, so an equal position is another event, not a copy.
                Ok(i) if e.seq == 0 && i <= self.plan.limit => {
                    self.events.insert(i, e);
                    self.events.truncate(self.plan.limit + 1);
                }
                Ok(_) if e.seq == 0 => self.upstream_more = true,
                Ok(_) => self.duplicates += 1,
                Err(i) if i <= self.plan.limit => {
                    self.events.insert(i, e);
                    self.events.truncate(self.plan.limit + 1);
                }
                // Past what this page can hold: a later page asks for it again.
                Err(_) => self.upstream_more = true,
            }
        }
    }

    pub fn finish(mut self) -> ListEventsResponse {
        let mut more = self.upstream_more || self.events.len() > self.plan.limit;
        self.events.truncate(self.plan.limit);
        if let Some(f) = &self.frontier {
            let end = self
                .events
                .iter()
                .position(|e| self.before(f, e).is_lt())
                .unwrap_or(self.events.len());
            self.events.truncate(end);
        }
        let fit =
            gpulse_proto::bounds::fitting(&self.events, gpulse_proto::bounds::MAX_ANSWER_BYTES);
        if fit < self.events.len() {
            self.events.truncate(fit);
            more = true;
        }
        self.out.next_page_token = match (more, self.events.last()) {
            (true, Some(last)) => Token {
                since: self.plan.since.clone(),
                until: self.plan.until.clone(),
                query: self.plan.query,
                last: Some(listing::position(last)),
            }
            .encode(),
            _ => String::new(),
        };
        self.out.events = self.events;
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_proto::time::from_unix_millis;

    fn ev(ms: i64, agent: &str, seq: u64) -> Event {
        Event {
            time: Some(from_unix_millis(ms)),
            agent_id: agent.into(),
            seq,
            ..Default::default()
        }
    }

    /// One upstream's store: the page after `resume` in the plan's order, at most `cap` events
    /// (a collector's page ends early when its events are large).
    fn page(store: &[Event], req: &ListEventsRequest, cap: usize) -> ListEventsResponse {
        let newest = req.order != Order::OldestFirst as i32;
        let mut v: Vec<Event> = store
            .iter()
            .filter(|e| match &req.resume_after {
                None => true,
                Some(p) if newest => listing::cmp_position(e, p).is_lt(),
                Some(p) => listing::cmp_position(e, p).is_gt(),
            })
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            if newest {
                listing::cmp(b, a)
            } else {
                listing::cmp(a, b)
            }
        });
        let n = (req.limit as usize).min(cap);
        let more = v.len() > n;
        v.truncate(n);
        ListEventsResponse {
            total_matched: store.len() as u64,
            next_page_token: if more { "more".into() } else { String::new() },
            events: v,
            ..Default::default()
        }
    }

    fn list_all(
        stores: &mut [Vec<Event>],
        order: Order,
        limit: u32,
        expire_each_page: bool,
        first_cap: usize,
    ) -> Vec<(i64, u64)> {
        let names = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let mut got = Vec::new();
        let mut token = String::new();
        loop {
            let req = ListEventsRequest {
                limit,
                order: order as i32,
                page_token: token.clone(),
                window: Some(TimeWindow {
                    since: "2025-01-01T00:00:00Z".into(),
                    until: "2025-01-02T00:00:00Z".into(),
                }),
                ..Default::default()
            };
            let plan = Plan::new(req, &names).unwrap();
            let up = plan.upstream_req.clone();
            let mut m = Merge::new(plan);
            for (i, s) in stores.iter().enumerate() {
                let cap = if i == 0 { first_cap } else { usize::MAX };
                m.add(&names[i], page(s, &up, cap));
            }
            let r = m.finish();
            got.extend(r.events.iter().map(|e| {
                (
                    e.time
                        .as_ref()
                        .map(gpulse_proto::time::to_unix_millis)
                        .unwrap_or(0),
                    e.seq,
                )
            }));
            if r.next_page_token.is_empty() {
                return got;
            }
            token = r.next_page_token;
            if expire_each_page {
                // Each store loses its oldest event between pages.
                for s in stores.iter_mut() {
                    if let Some(i) = (0..s.len()).min_by(|x, y| listing::cmp(&s[*x], &s[*y])) {
                        s.remove(i);
                    }
                }
            }
        }
    }

    #[test]
    fn pages_across_upstreams_skip_nothing_and_repeat_nothing() {
        let base = 1_735_700_000_000;
        let mut stores: Vec<Vec<Event>> = (0..3)
            .map(|u| {
                (0..50u64)
                    .map(|i| ev(base + (i as i64 * 7 + u * 3) % 200, &format!("n{u}/x"), i))
                    .collect()
            })
            .collect();
        // One event held by two shards (an agent that failed over resent it).
        let dup = stores[0][10].clone();
        stores[1].push(dup);
        for order in [Order::NewestFirst, Order::OldestFirst] {
            // The first shard's pages end early (by bytes) in the second round.
            for first_cap in [usize::MAX, 2] {
                let got = list_all(&mut stores.clone(), order, 7, false, first_cap);
                assert_eq!(got.len(), 150, "{order:?} {first_cap}");
                let mut seen = std::collections::HashSet::new();
                for g in &got {
                    assert!(seen.insert(*g), "listed twice: {g:?}");
                }
            }
            let got = list_all(&mut stores.clone(), order, 7, false, usize::MAX);
            assert_eq!(got.len(), 150, "{order:?}");
            let mut sorted = got.clone();
            sorted.sort();
            if order == Order::NewestFirst {
                sorted.reverse();
            }
            let times: Vec<i64> = got.iter().map(|g| g.0).collect();
            let sorted_times: Vec<i64> = sorted.iter().map(|g| g.0).collect();
            assert_eq!(times, sorted_times, "merged by time");
        }
    }

    #[test]
    fn expiry_between_pages_skips_nothing_still_retained() {
        let base = 1_735_700_000_000;
        let stores: Vec<Vec<Event>> = (0..3)
            .map(|u| {
                (0..40u64)
                    .map(|i| ev(base + i as i64 * 10 + u, &format!("n{u}/x"), i))
                    .collect()
            })
            .collect();
        let got = list_all(
            &mut stores.clone(),
            Order::NewestFirst,
            10,
            true,
            usize::MAX,
        );
        let mut seen = std::collections::HashSet::new();
        for g in &got {
            assert!(seen.insert(*g), "listed twice: {g:?}");
        }
        // Newest first: what expired is the oldest; everything listed is in order.
        assert!(got.windows(2).all(|w| w[0].0 >= w[1].0));
        // 120 events, at most one per store per page expired before it was reached.
        assert!(got.len() >= 120 - 3 * 12, "{}", got.len());
    }

    #[test]
    fn tokens_are_checked() {
        let t = Token {
            since: "a".into(),
            until: "b".into(),
            query: 9,
            last: None,
        }
        .encode();
        assert_eq!(Token::parse(&t).unwrap().query, 9);
        let mut bad = t.clone().into_bytes();
        let i = bad.len() - 1;
        bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
        assert!(Token::parse(std::str::from_utf8(&bad).unwrap()).is_err());
        assert!(Token::parse("e2.00").is_err());
        let other = Plan::new(
            ListEventsRequest {
                page_token: t,
                order: 2,
                ..Default::default()
            },
            &["a".into()],
        );
        assert!(other.is_err());
    }
}
