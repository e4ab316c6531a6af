//! Windowed queries over the store: `ListEvents` here (filtered, paged by opaque tokens that pin
//! the resolved window), `Trend` in `trend.rs` (a metric per GPU, node or fleet, from raw samples
//! or the rollup tier that fits the requested resolution), and the aggregations in `aggregate.rs`.
//! Pure functions of the store, so the state task runs them without I/O and tests and benchmarks
//! call them directly.
pub mod aggregate;
mod trend;

pub use trend::{choose_tier, trend, trend_column};

use std::collections::BTreeMap;

use gpulse_proto::{
    time as ptime,
    v1::{self, EventKind, ListEventsRequest, ListEventsResponse, Order, ResolvedWindow},
    window::{self, Window, WindowError},
};
use prost::Message;
use thiserror::Error;

use crate::store::{
    codec::CodecError,
    events::{self, EventStore, KeyAt, ListKey},
};
use gpulse_proto::answer;
use gpulse_proto::filter::{Filter, FilterError};

pub const DEFAULT_POINTS: u32 = 120;
pub const MAX_POINTS: u32 = 1000;
pub const DEFAULT_SERIES: u32 = 20;
pub const MAX_SERIES: u32 = 200;
const HOUR_NS: i128 = 3_600_000_000_000;

#[derive(Debug, Error)]
pub enum QueryError {
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("{field} {value} is out of range; {allowed}")]
    Range {
        field: &'static str,
        value: u64,
        allowed: &'static str,
    },
    #[error(
        "page_token is not one this collector issued for this query ({0}); start again without it"
    )]
    Token(&'static str),
    #[error("unknown metric {0:?}; known metrics: {1}")]
    Metric(String, String),
    #[error("stored samples could not be decoded: {0}")]
    Decode(#[from] CodecError),
}

fn to_ts(ns: i128) -> prost_types::Timestamp {
    ptime::from_unix_nanos(ns)
}

fn ms_ts(ms: i64) -> prost_types::Timestamp {
    ptime::from_unix_millis(ms)
}

fn resolved(w: &Window, oldest_ms: Option<i64>) -> ResolvedWindow {
    ResolvedWindow {
        start: Some(to_ts(w.start_ns)),
        end: Some(to_ts(w.end_ns)),
        defaulted: w.defaulted,
        oldest_data: oldest_ms.map(ms_ts),
        partial: oldest_ms.is_none_or(|o| o > w.start_ms()),
    }
}

fn rfc(ms: i64) -> String {
    ptime::rfc3339(&ms_ts(ms))
}

/// FNV-1a over bytes: a stable fingerprint of the query a token belongs to.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What a page token pins: where the last page stopped, the resolved window (so a relative
/// window does not slide between pages), the query's fingerprint, and the store's expiry count
/// when paging began.
#[derive(Debug, PartialEq, Eq)]
struct PageToken {
    /// The last event listed: (time in ms, agent id, cursor).
    key_ms: i64,
    key_agent: String,
    key_cursor: u64,
    /// Newest cursor when paging began: later arrivals are not part of this listing.
    ceiling: u64,
    start_ns: i64,
    end_ns: i64,
    query: u64,
    expired_at_start: u64,
}

/// Fixed fields of a token, before the agent id.
const TOKEN_FIXED: usize = 7 * 8;
/// Agent ids are bounded at ingest; a token never needs more.
const TOKEN_MAX_AGENT: usize = 512;

impl PageToken {
    fn encode(&self) -> String {
        let mut b = Vec::with_capacity(TOKEN_FIXED + self.key_agent.len() + 4);
        for v in [
            self.key_ms as u64,
            self.key_cursor,
            self.ceiling,
            self.start_ns as u64,
            self.end_ns as u64,
            self.query,
            self.expired_at_start,
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(self.key_agent.as_bytes());
        let check = fnv(&b) as u32;
        b.extend_from_slice(&check.to_be_bytes());
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!("e2.{hex}")
    }

    fn decode(s: &str) -> Result<Self, QueryError> {
        let hex = s
            .strip_prefix("e2.")
            .ok_or(QueryError::Token("unknown format"))?;
        if !hex.is_ascii()
            || hex.len() % 2 != 0
            || hex.len() < (TOKEN_FIXED + 4) * 2
            || hex.len() > (TOKEN_FIXED + TOKEN_MAX_AGENT + 4) * 2
        {
            return Err(QueryError::Token("wrong length"));
        }
        let b: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| QueryError::Token("not hex"))?;
        let (body, check) = b.split_at(b.len() - 4);
        if (fnv(body) as u32).to_be_bytes() != check {
            return Err(QueryError::Token("checksum"));
        }
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[i * 8..i * 8 + 8]);
            u64::from_be_bytes(a)
        };
        let key_agent = String::from_utf8(body[TOKEN_FIXED..].to_vec())
            .map_err(|_| QueryError::Token("agent id"))?;
        Ok(Self {
            key_ms: w(0) as i64,
            key_cursor: w(1),
            ceiling: w(2),
            start_ns: w(3) as i64,
            end_ns: w(4) as i64,
            query: w(5),
            expired_at_start: w(6),
            key_agent,
        })
    }

    fn key(&self) -> ListKey {
        ListKey {
            ms: self.key_ms,
            agent_id: self.key_agent.clone(),
            at: KeyAt::Cursor(self.key_cursor),
        }
    }
}

/// `n` in `1..=max`, or `default` for 0.
pub(crate) fn bounded(
    field: &'static str,
    n: u32,
    default: u32,
    max: u32,
    allowed: &'static str,
) -> Result<u32, QueryError> {
    match n {
        0 => Ok(default),
        n if n <= max => Ok(n),
        n => Err(QueryError::Range {
            field,
            value: u64::from(n),
            allowed,
        }),
    }
}

/// A wire enum value this build knows.
pub(crate) fn wire_value<T: TryFrom<i32>>(
    field: &'static str,
    v: i32,
    allowed: &'static str,
) -> Result<T, QueryError> {
    T::try_from(v).map_err(|_| QueryError::Range {
        field,
        value: v as u64,
        allowed,
    })
}

/// A wire enum value, `default` when unspecified.
pub(crate) fn wire_enum<T: TryFrom<i32> + PartialEq + Default>(
    field: &'static str,
    v: i32,
    default: T,
    allowed: &'static str,
) -> Result<T, QueryError> {
    let t: T = wire_value(field, v, allowed)?;
    Ok(if t == T::default() { default } else { t })
}

/// `ListEvents`: events whose time lies in the window, newest first unless asked otherwise.
pub fn list_events(
    store: &EventStore,
    req: ListEventsRequest,
    now_ns: i128,
) -> Result<ListEventsResponse, QueryError> {
    let limit = bounded(
        "limit",
        req.limit,
        answer::EVENTS_DEFAULT_LIMIT,
        answer::EVENTS_MAX_LIMIT,
        answer::EVENTS_LIMIT_ACCEPTED,
    )?;
    let order = match Order::try_from(req.order) {
        Ok(Order::OldestFirst) => events::Order::OldestFirst,
        Ok(_) => events::Order::NewestFirst,
        Err(_) => {
            return Err(QueryError::Range {
                field: "order",
                value: req.order as u64,
                allowed: "0 (newest first), 1 (newest first), 2 (oldest first)",
            });
        }
    };
    let fingerprint = {
        let mut b = req.filter.clone().unwrap_or_default().encode_to_vec();
        b.push(matches!(order, events::Order::OldestFirst) as u8);
        fnv(&b)
    };
    let filter = Filter::from_wire(req.filter)?;
    let tw = req.window.unwrap_or_default();
    let expired_now = store.expired_total();
    let (w, key, ceiling, expired_at_start) = if req.page_token.is_empty() {
        let w = window::resolve(&tw.since, &tw.until, now_ns, HOUR_NS)?;
        (w, None, store.next_cursor() - 1, expired_now)
    } else {
        let t = PageToken::decode(&req.page_token)?;
        if t.query != fingerprint {
            return Err(QueryError::Token(
                "the filter or order differs from the first page",
            ));
        }
        let w = Window {
            start_ns: i128::from(t.start_ns),
            end_ns: i128::from(t.end_ns),
            defaulted: tw.since.is_empty(),
        };
        (w, Some(t.key()), t.ceiling, t.expired_at_start)
    };
    // A gateway continuing a merged listing names the last event it returned (by seq: cursors
    // are this collector's own); it overrides where the token stopped.
    let key = match req.resume_after {
        Some(p) => Some(ListKey {
            ms: p.time_ms,
            agent_id: p.agent_id,
            at: KeyAt::Seq(p.seq),
        }),
        None => key,
    };
    let lanes = filter.lanes();
    let mut page = store.window(
        w.start_ms(),
        w.end_ms(),
        &lanes,
        order,
        key.as_ref(),
        limit as usize,
        |e| e.cursor() <= ceiling && filter.matches(e),
    );
    // An event too large for any answer (stored before event bounds) is listed as its
    // envelope; the page then ends early rather than outgrow the encode limit, its token
    // continuing after the last event it holds.
    let mut oversized = 0;
    for e in &mut page.events {
        if let Some(env) = gpulse_proto::bounds::envelope_if_oversized(e) {
            *e = env;
            oversized += 1;
        }
    }
    let fit = gpulse_proto::bounds::fitting(&page.events, gpulse_proto::bounds::MAX_ANSWER_BYTES);
    let cut = page.events.len() - fit;
    if cut > 0 {
        page.events.truncate(fit);
        page.more = true;
    }
    let (window, mut hints) = window_notes(store, &w, &lanes, page.total_matched);
    if cut > 0 {
        hints.push(format!(
            "page ends after {fit} events to stay within {} MiB; next_page_token continues",
            gpulse_proto::bounds::MAX_ANSWER_BYTES >> 20
        ));
    }
    if oversized > 0 {
        hints.push(format!(
            "{oversized} events larger than an answer holds (stored before event size bounds) are listed without their payload"
        ));
    }
    let expired_while_paging = expired_now.saturating_sub(expired_at_start);
    if expired_while_paging > 0 {
        hints.push(format!(
            "{expired_while_paging} events (any kind) expired from the store since paging began; \
             pages skip nothing still retained"
        ));
    }
    let next_page_token = match (page.more, page.events.last()) {
        (true, Some(last)) => PageToken {
            key_ms: events::event_ms(last),
            key_agent: last.agent_id.clone(),
            key_cursor: last.cursor,
            ceiling,
            start_ns: w.start_ns as i64,
            end_ns: w.end_ns as i64,
            query: fingerprint,
            expired_at_start,
        }
        .encode(),
        _ => String::new(),
    };
    Ok(ListEventsResponse {
        window: Some(window),
        events: page.events,
        next_page_token,
        total_matched: page.total_matched,
        expired_while_paging,
        hints,
        partial: Default::default(),
        upstreams: Default::default(),
    })
}

/// The resolved window of an event query over `lanes` (all when empty) and what to tell the
/// caller about it: the window reaching past the oldest retained event, nothing matching.
pub(crate) fn window_notes(
    store: &EventStore,
    w: &Window,
    lanes: &[EventKind],
    total_matched: u64,
) -> (ResolvedWindow, Vec<String>) {
    let oldest = if lanes.is_empty() {
        store.oldest_ms(None)
    } else {
        lanes.iter().filter_map(|k| store.oldest_ms(Some(*k))).min()
    };
    let window = resolved(w, oldest);
    let mut hints = Vec::new();
    if window.partial {
        hints.push(match oldest {
            Some(o) => format!(
                "the window starts before the oldest retained event of these kinds ({})",
                rfc(o)
            ),
            None => "the collector holds no events of these kinds".to_string(),
        });
    }
    if total_matched == 0 && oldest.is_some() {
        hints.push("no stored event in the window matches the filter".to_string());
    }
    (window, hints)
}

/// XIDs per node in a window: (all, error or fatal).
pub fn xid_counts(store: &EventStore, start_ms: i64, end_ms: i64) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    store.scan(start_ms, end_ms, &[EventKind::Xid], |e| {
        let c = match out.get_mut(e.node()) {
            Some(c) => c,
            None => out.entry(e.node().to_string()).or_default(),
        };
        c.0 += 1;
        if e.severity() >= v1::Severity::Error as i32 {
            c.1 += 1;
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roundtrip_and_reject_tampering() {
        let t = PageToken {
            key_ms: 1_764_000_000_123,
            key_agent: "node-a/1a2b".into(),
            key_cursor: 42,
            ceiling: 99,
            start_ns: -5,
            end_ns: 1_764_000_000_000_000_000,
            query: 7,
            expired_at_start: 3,
        };
        let s = t.encode();
        assert_eq!(PageToken::decode(&s).unwrap(), t);
        let mut bad = s.clone().into_bytes();
        bad[10] = if bad[10] == b'0' { b'1' } else { b'0' };
        assert!(PageToken::decode(std::str::from_utf8(&bad).unwrap()).is_err());
        assert!(PageToken::decode("e2.zz").is_err());
        assert!(PageToken::decode(&s.replacen("e2.", "e1.", 1)).is_err());
        assert!(PageToken::decode("").is_err());
    }
}
