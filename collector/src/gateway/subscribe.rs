//! Subscribe merged live from every upstream. One task per upstream holds its stream, forwards
//! what arrives into one bounded channel (a slow client slows the tasks, and each upstream then
//! reports its own lag), and when the stream ends announces it in the merged stream, reconnects
//! with back-off and resumes after the last cursor it forwarded. Every message out carries the
//! resume token: each upstream's position after it, so a client that reconnects (to this or
//! another gateway replica) misses nothing and sees nothing twice. Two copies of one event
//! (a failed-over agent's resend held by two shards) are forwarded once.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use gpulse_proto::{
    api::SubscribeStream,
    v1::{
        SubscribeRequest, SubscribeResponse, UpstreamState, UpstreamStatus, subscribe_response::Msg,
    },
};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use super::{metrics::GatewayMetrics, upstream::Upstream};
use crate::shutdown::Shutdown;

/// Messages waiting between the upstream tasks and the client.
const MERGE_QUEUE: usize = 1024;
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where one upstream's stream stands: a collector's cursor or a gateway's token.
#[derive(Clone, PartialEq, prost::Message)]
struct Position {
    #[prost(string, tag = "1")]
    upstream: String,
    #[prost(oneof = "At", tags = "2, 3")]
    at: Option<At>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum At {
    #[prost(uint64, tag = "2")]
    Cursor(u64),
    #[prost(string, tag = "3")]
    Token(String),
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResumeToken {
    #[prost(message, repeated, tag = "1")]
    positions: Vec<Position>,
}

const PREFIX: &str = "s1.";
const MAX_TOKEN: usize = 64 << 10;

fn encode(positions: &[Option<At>], names: &[String]) -> String {
    let t = ResumeToken {
        positions: names
            .iter()
            .zip(positions)
            .filter_map(|(n, at)| {
                at.clone().map(|at| Position {
                    upstream: n.clone(),
                    at: Some(at),
                })
            })
            .collect(),
    };
    let hex: String = t
        .encode_to_vec()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    format!("{PREFIX}{hex}")
}

fn decode(s: &str, names: &[String]) -> Result<Vec<Option<At>>, Status> {
    let bad = |why: &str| {
        Status::invalid_argument(format!("resume_token is not one this gateway sent ({why})"))
    };
    let hex = s
        .strip_prefix(PREFIX)
        .ok_or_else(|| bad("unknown format"))?;
    if !hex.is_ascii() || hex.len() % 2 != 0 || hex.len() > MAX_TOKEN * 2 {
        return Err(bad("wrong length"));
    }
    let b: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad("not hex"))?;
    let t = ResumeToken::decode(b.as_slice()).map_err(|_| bad("does not decode"))?;
    // Upstreams the token does not name (added since) start live; names it has that this
    // gateway no longer has are ignored.
    Ok(names
        .iter()
        .map(|n| {
            t.positions
                .iter()
                .find(|p| p.upstream == *n)
                .and_then(|p| p.at.clone())
        })
        .collect())
}

/// Forgets which events were forwarded, per agent, beyond a window of recent seqs.
struct Seen {
    agents: HashMap<String, (u64, u128)>,
    order: VecDeque<String>,
}

/// Agents remembered for de-duplication (the oldest is forgotten past it).
const SEEN_AGENTS: usize = 65_536;

impl Seen {
    fn new() -> Self {
        Self {
            agents: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// False when (agent, seq) was forwarded already (within the last 128 seqs of that agent).
    fn first_time(&mut self, agent: &str, seq: u64) -> bool {
        let Some((max, bits)) = self.agents.get_mut(agent) else {
            if self.order.len() >= SEEN_AGENTS
                && let Some(old) = self.order.pop_front()
            {
                self.agents.remove(&old);
            }
            self.agents.insert(agent.to_string(), (seq, 1));
            self.order.push_back(agent.to_string());
            return true;
        };
        if seq > *max {
            let shift = seq - *max;
            *bits = if shift >= 128 { 0 } else { *bits << shift };
            *bits |= 1;
            *max = seq;
            return true;
        }
        let back = *max - seq;
        if back >= 128 {
            // Older than the window: cannot tell, so it goes out (a rare duplicate beats a loss).
            return true;
        }
        let bit = 1u128 << back;
        let first = *bits & bit == 0;
        *bits |= bit;
        first
    }
}

/// What an upstream task sends the merging side.
enum Feed {
    Msg(Box<SubscribeResponse>),
    Down(String),
    Up,
}

pub async fn subscribe(
    route: super::Route,
    req: SubscribeRequest,
    metrics: GatewayMetrics,
    stop: Shutdown,
) -> Result<SubscribeStream, Status> {
    gpulse_proto::filter::Filter::from_wire(req.filter.clone())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let names: Vec<String> = route.iter().map(|(u, _)| u.name.clone()).collect();
    let mut positions: Vec<Option<At>> = if !req.resume_token.is_empty() {
        decode(&req.resume_token, &names)?
    } else {
        match req.after_cursor {
            None => vec![None; route.len()],
            // "Everything retained" means the same on every upstream.
            Some(0) => vec![Some(At::Cursor(0)); route.len()],
            Some(c) => {
                return Err(Status::invalid_argument(format!(
                    "after_cursor {c} names one collector's position; through a gateway resume with resume_token (0 replays everything retained)"
                )));
            }
        }
    };
    let (tx, mut rx) = mpsc::channel::<(usize, Feed)>(MERGE_QUEUE);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (up, inner)) in route.iter().enumerate() {
        tasks.spawn(follow(
            i,
            up.clone(),
            inner.clone(),
            req.filter.clone(),
            positions[i].clone(),
            tx.clone(),
            metrics.clone(),
        ));
    }
    drop(tx);
    metrics.subscribers.inc();
    let gauge = Gauge(metrics.subscribers.clone());
    let mut seen = Seen::new();
    let mut stop = stop;
    let stream = async_stream(move |out| async move {
        let _tasks = tasks;
        let _gauge = gauge;
        loop {
            let (i, feed) = tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => break,
                },
                () = stop.wait() => break,
            };
            let msg = match feed {
                Feed::Msg(m) => {
                    let Some(msg) =
                        merge_msg(&names[i], *m, &mut positions[i], &mut seen, &metrics)
                    else {
                        continue;
                    };
                    msg
                }
                Feed::Down(reason) => Msg::Upstream(UpstreamStatus {
                    name: names[i].clone(),
                    state: UpstreamState::Error as i32,
                    reason,
                    elapsed_ms: 0,
                }),
                Feed::Up => Msg::Upstream(UpstreamStatus {
                    name: names[i].clone(),
                    state: UpstreamState::Ok as i32,
                    reason: String::new(),
                    elapsed_ms: 0,
                }),
            };
            let resp = SubscribeResponse {
                msg: Some(msg),
                resume_token: encode(&positions, &names),
            };
            if out.send(Ok(resp)).await.is_err() {
                return;
            }
        }
        let _ = out
            .send(Err(Status::unavailable(
                "the gateway is stopping; reconnect and resume with the last resume_token",
            )))
            .await;
    });
    Ok(stream)
}

/// One upstream message as it goes out, with that upstream's position moved past it; None for
/// a second copy of an event.
fn merge_msg(
    name: &str,
    m: SubscribeResponse,
    position: &mut Option<At>,
    seen: &mut Seen,
    metrics: &GatewayMetrics,
) -> Option<Msg> {
    let nested = !m.resume_token.is_empty();
    if nested {
        *position = Some(At::Token(m.resume_token));
    }
    match m.msg? {
        Msg::Event(e) => {
            if !nested {
                *position = Some(At::Cursor(e.cursor));
            }
            // Seq 0 is a collector's own event (a verdict, a seq-gap notice): no agent resends
            // it, so it is never a copy.
            if e.seq != 0 && !seen.first_time(&e.agent_id, e.seq) {
                metrics.duplicates_dropped.inc();
                return None;
            }
            Some(Msg::Event(e))
        }
        Msg::Lagged(l) => {
            if !nested {
                *position = Some(At::Cursor(l.resume_cursor));
            }
            Some(Msg::Lagged(l))
        }
        Msg::Upstream(mut u) => {
            u.name = format!("{name}/{}", u.name);
            Some(Msg::Upstream(u))
        }
    }
}

struct Gauge(prometheus::IntGauge);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Follows one upstream for as long as the merged stream lives.
async fn follow(
    i: usize,
    up: Arc<Upstream>,
    inner: Vec<String>,
    filter: Option<gpulse_proto::v1::EventFilter>,
    mut at: Option<At>,
    tx: mpsc::Sender<(usize, Feed)>,
    metrics: GatewayMetrics,
) {
    let mut backoff = BACKOFF_START;
    let mut down = false;
    loop {
        if at.is_none() {
            at = live_position(&up).await;
        }
        let req = SubscribeRequest {
            filter: filter.clone(),
            after_cursor: match &at {
                Some(At::Cursor(c)) => Some(*c),
                _ => None,
            },
            resume_token: match &at {
                Some(At::Token(t)) => t.clone(),
                _ => String::new(),
            },
        };
        let why = match up.api.subscribe(super::selecting(req, &inner)).await {
            Ok(stream) => {
                if down && tx.send((i, Feed::Up)).await.is_err() {
                    return;
                }
                down = false;
                let mut stream = stream.into_inner();
                loop {
                    match stream.next().await {
                        Some(Ok(m)) => {
                            backoff = BACKOFF_START;
                            track(&mut at, &m);
                            if tx.send((i, Feed::Msg(Box::new(m)))).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(s)) => break format!("{:?}: {}", s.code(), s.message()),
                        None => break "the stream ended".to_string(),
                    }
                }
            }
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                // Will not get better: say so once and leave this upstream out.
                let _ = tx.send((i, Feed::Down(s.message().to_string()))).await;
                return;
            }
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        if !down {
            down = true;
            if tx.send((i, Feed::Down(why))).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        metrics
            .subscribe_reconnects
            .with_label_values(&[&up.name])
            .inc();
    }
}

/// A live-only stream from a collector starts after its newest cursor instead of "live", so
/// that after an outage it resumes from there and misses nothing the collector stored. (A
/// gateway upstream is followed live until its first message gives a token.)
async fn live_position(up: &Upstream) -> Option<At> {
    let st = tokio::time::timeout(
        Duration::from_secs(2),
        up.api.status(tonic::Request::new(Default::default())),
    )
    .await
    .ok()?
    .ok()?
    .into_inner();
    st.upstreams
        .is_empty()
        .then_some(At::Cursor(st.last_cursor))
}

/// The position after `m` from this upstream (what a reconnect resumes after).
fn track(at: &mut Option<At>, m: &SubscribeResponse) {
    if !m.resume_token.is_empty() {
        *at = Some(At::Token(m.resume_token.clone()));
        return;
    }
    match &m.msg {
        Some(Msg::Event(e)) => *at = Some(At::Cursor(e.cursor)),
        Some(Msg::Lagged(l)) => *at = Some(At::Cursor(l.resume_cursor)),
        _ => {}
    }
}

/// A stream fed by `f` through a channel of one (the producer waits for the consumer).
fn async_stream<F, Fut>(f: F) -> SubscribeStream
where
    F: FnOnce(mpsc::Sender<Result<SubscribeResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roundtrip_by_name() {
        let names = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let t = encode(
            &[Some(At::Cursor(5)), None, Some(At::Token("s1.x".into()))],
            &names,
        );
        let back = decode(&t, &names).unwrap();
        assert_eq!(
            back,
            vec![Some(At::Cursor(5)), None, Some(At::Token("s1.x".into()))]
        );
        // Reordered or changed upstreams: matched by name.
        let other = vec!["c".to_string(), "d".to_string()];
        assert_eq!(
            decode(&t, &other).unwrap(),
            vec![Some(At::Token("s1.x".into())), None]
        );
        assert!(decode("s1.zz", &names).is_err());
        assert!(decode("e2.00", &names).is_err());
    }

    #[test]
    fn seen_drops_second_copies_within_the_window() {
        let mut s = Seen::new();
        assert!(s.first_time("a", 10));
        assert!(s.first_time("a", 12));
        assert!(!s.first_time("a", 10));
        assert!(s.first_time("a", 11), "an older seq not seen yet goes out");
        assert!(!s.first_time("a", 11));
        assert!(s.first_time("b", 10));
        assert!(s.first_time("a", 500));
        assert!(s.first_time("a", 12), "beyond the window: let through");
    }
}
