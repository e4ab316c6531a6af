//! Live subscribers: fan-out that never waits, lag notices, and bounded replay steps.
use std::sync::Arc;

use gpulse_proto::v1::{self, Lagged};
use tokio::sync::mpsc::{self, error::TrySendError};

use super::{ReplayFrom, ReplayStep, SubMsg, Subscription};
use gpulse_proto::filter::Filter;

use crate::{store::events::EventStore, telemetry::Metrics};

/// Records one replay step looks at, at most: a filter that matches little must not make one
/// step scan the whole store on the state task.
const REPLAY_SCAN: usize = 65_536;

struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<SubMsg>,
    /// Events not delivered since the last Lagged notice went out.
    missed: u64,
    last_cursor: u64,
}

impl Subscriber {
    /// Sends the pending lag notice, if any. False when the queue is still full (the notice
    /// stays pending) or the subscriber is gone.
    fn notify_lag(&mut self, metrics: &Metrics) -> bool {
        if self.missed == 0 {
            return true;
        }
        let lag = Lagged {
            missed: self.missed,
            resume_cursor: self.last_cursor,
        };
        match self.tx.try_send(SubMsg::Lagged(lag)) {
            Ok(()) => {
                metrics.subscriber_lag_notices.inc();
                self.missed = 0;
                true
            }
            Err(_) => false,
        }
    }

    /// Counts one event this subscriber could not take.
    fn miss(&mut self, metrics: &Metrics) {
        self.missed += 1;
        metrics.subscriber_dropped.inc();
    }
}

pub(super) struct Subscribers {
    list: Vec<Subscriber>,
    queue: usize,
    replay_chunk: usize,
    metrics: Metrics,
}

impl Subscribers {
    pub(super) fn new(queue: usize, replay_chunk: usize, metrics: Metrics) -> Self {
        Self {
            list: Vec::new(),
            queue: queue.max(1),
            replay_chunk: replay_chunk.max(1),
            metrics,
        }
    }

    /// Subscribers whose streams are still open (closed ones go at the next look).
    pub(super) fn live(&mut self) -> usize {
        self.list.retain(|s| !s.tx.is_closed());
        self.publish_count();
        self.list.len()
    }

    fn publish_count(&self) {
        self.metrics.subscribers.set(self.list.len() as i64);
    }

    /// Hands one event to every matching subscriber without ever waiting: a full queue counts
    /// a miss, reported to that subscriber as `Lagged` as soon as it has room again.
    pub(super) fn fan_out(&mut self, ev: &v1::Event) {
        if self.list.is_empty() {
            return;
        }
        let metrics = &self.metrics;
        // One copy shared by every subscriber that wants the event, made only if one does.
        let mut shared: Option<Arc<v1::Event>> = None;
        self.list.retain_mut(|s| {
            if s.tx.is_closed() {
                return false;
            }
            if !s.filter.matches(ev) {
                return true;
            }
            if !s.notify_lag(metrics) {
                s.miss(metrics);
                return !s.tx.is_closed();
            }
            let ev = shared.get_or_insert_with(|| Arc::new(ev.clone())).clone();
            let cursor = ev.cursor;
            match s.tx.try_send(SubMsg::Event(ev)) {
                Ok(()) => s.last_cursor = cursor,
                Err(TrySendError::Full(_)) => s.miss(metrics),
                Err(TrySendError::Closed(_)) => return false,
            }
            true
        });
        self.publish_count();
    }

    /// Sends pending Lagged notices even when no new event arrives to carry them.
    pub(super) fn flush_lag_notices(&mut self) {
        let metrics = &self.metrics;
        self.list.retain_mut(|s| {
            s.notify_lag(metrics);
            !s.tx.is_closed()
        });
        self.publish_count();
    }

    /// Registers a subscriber: the first replay step (when resuming `after` a cursor), then
    /// events live from the store's newest cursor on.
    pub(super) fn subscribe(
        &mut self,
        store: &EventStore,
        filter: Filter,
        after: Option<u64>,
    ) -> Subscription {
        let (tx, live) = mpsc::channel(self.queue);
        let last = store.next_cursor() - 1;
        let step = match after {
            Some(after) => self.replay_step(store, &filter, ReplayFrom { after, upto: last }),
            None => ReplayStep {
                events: Vec::new(),
                next: None,
            },
        };
        self.list.push(Subscriber {
            filter,
            tx,
            missed: 0,
            last_cursor: last,
        });
        self.publish_count();
        Subscription {
            replay: step.events,
            next: step.next,
            live,
        }
    }

    /// One bounded step of a replay: at most `replay_chunk` events and [`REPLAY_SCAN`] records
    /// looked at. Events that expired before the step could reach them are announced with
    /// `Lagged` (how many cursors are gone and where the replay goes on).
    pub(super) fn replay_step(
        &self,
        store: &EventStore,
        filter: &Filter,
        from: ReplayFrom,
    ) -> ReplayStep {
        let mut events = Vec::new();
        let mut after = from.after;
        let oldest = store.oldest_cursor().unwrap_or(store.next_cursor());
        if after + 1 < oldest && after < from.upto {
            events.push(SubMsg::Lagged(Lagged {
                missed: oldest.min(from.upto + 1) - after - 1,
                resume_cursor: oldest - 1,
            }));
            self.metrics.subscriber_lag_notices.inc();
            after = oldest - 1;
        }
        let scan = store.scan_after(after, from.upto, self.replay_chunk, REPLAY_SCAN, |e| {
            filter.matches(e)
        });
        events.extend(scan.events.into_iter().map(|e| SubMsg::Event(Arc::new(e))));
        let next = (!scan.done && scan.resume < from.upto).then_some(ReplayFrom {
            after: scan.resume,
            upto: from.upto,
        });
        ReplayStep { events, next }
    }

    pub(super) fn len(&self) -> usize {
        self.list.len()
    }
}
