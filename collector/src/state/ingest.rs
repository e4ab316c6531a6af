//! Storing one batch: drop what was stored before, note where the agent's seqs jump, bound
//! clock skew, write the log, then make each event visible (store, counters, samples,
//! subscribers, node state) and ask for the sync that lets the agent's ack go out.
use std::sync::Arc;

use gpulse_proto::{
    names::ShortName,
    time as ptime,
    v1::{self, EventKind, GapStage, event::Payload},
};
use tracing::{debug, info, warn};

use super::{IngestOutcome, State, StoreError};
use crate::{
    batch::{IngestBatch, Wire},
    store::{
        events::Origin,
        wal::{BatchHeader, RotateError},
    },
    telemetry::Metrics,
};

/// A batch's events that were not stored before, in seq order.
struct Accepted {
    fresh: Vec<Wire>,
    duplicates: u64,
    /// The agent's highest seq once they are stored.
    through: u64,
}

/// A loss notice from the agent's own spool: it explains the seq jump it sits at.
fn is_spool_gap(ev: &v1::Event) -> bool {
    matches!(&ev.payload, Some(Payload::Gap(g)) if g.stage == GapStage::AgentSpool as i32)
}

/// The events after seq `through` (resends dropped), with a `Gap{COLLECTOR_SEQ}` notice where
/// the agent's sequence jumps without a spool notice of its own, except up to `delivered`: seqs
/// the agent says another collector acknowledged (it moved between shards).
fn accept(
    mut events: Vec<Wire>,
    mut through: u64,
    delivered: u64,
    agent_id: &str,
    received: prost_types::Timestamp,
    metrics: &Metrics,
) -> Accepted {
    // Where a jump starts to be a loss.
    let expect_after = |through: u64| through.max(delivered);
    // (position, first missing seq, last missing seq) where the agent's sequence jumped.
    let mut gaps: Vec<(usize, u64, u64)> = Vec::new();
    let first = events.first().map_or(0, |w| w.ev.seq);
    let contiguous = events
        .iter()
        .enumerate()
        .all(|(i, w)| w.ev.seq == first + i as u64);
    let mut duplicates = 0;
    let mut fresh = if contiguous {
        // The usual shape (validated batches are contiguous): drop the resent prefix and keep
        // the vector, so events are not moved one by one.
        let dup = (through + 1).saturating_sub(first).min(events.len() as u64) as usize;
        events.drain(..dup);
        duplicates = dup as u64;
        if let Some(w) = events.first()
            && w.ev.seq > expect_after(through) + 1
            && !is_spool_gap(&w.ev)
        {
            gaps.push((0, expect_after(through) + 1, w.ev.seq - 1));
        }
        if let Some(last) = events.last() {
            through = last.ev.seq;
        }
        events
    } else {
        let mut fresh = Vec::with_capacity(events.len());
        for w in events {
            if w.ev.seq <= through {
                duplicates += 1;
                continue;
            }
            if w.ev.seq > expect_after(through) + 1 && !is_spool_gap(&w.ev) {
                gaps.push((fresh.len(), expect_after(through) + 1, w.ev.seq - 1));
            }
            through = w.ev.seq;
            fresh.push(w);
        }
        fresh
    };
    for (k, (at, from, to)) in gaps.into_iter().enumerate() {
        let missed = to - from + 1;
        metrics.ingest_seq_gap_events.inc_by(missed);
        fresh.insert(at + k, Wire::encode(seq_gap(agent_id, from, to, received)));
    }
    Accepted {
        fresh,
        duplicates,
        through,
    }
}

fn seq_gap(agent_id: &str, from: u64, to: u64, received: prost_types::Timestamp) -> v1::Event {
    v1::Event {
        seq: 0,
        time: Some(received),
        kind: EventKind::Gap as i32,
        severity: v1::Severity::Warning as i32,
        payload: Some(Payload::Gap(v1::Gap {
            stage: GapStage::CollectorSeq as i32,
            missed: to - from + 1,
            detail: format!("agent {agent_id} skipped seqs {from}..={to}"),
        })),
        ..Default::default()
    }
}

impl State {
    pub(super) fn ingest(&mut self, batch: IngestBatch) -> Result<IngestOutcome, StoreError> {
        if let Some(e) = &self.failed {
            return Err(StoreError::Failed(e.clone()));
        }
        let received = ptime::now();
        let entry = self
            .agents
            .entry(&batch.agent_id, &batch.node)
            .map_err(StoreError::Takeover)?;
        let origin = entry.origin(&batch.node);
        let known = entry.progress.through_seq;
        let first = batch.events.first().map_or(0, |w| w.ev.seq);
        // A known agent jumps from what it stored here; a new one from what it says another
        // collector acknowledged (else seq 0), so a made-up first seq cannot count a loss of
        // 2^63 events either.
        let from = if known > 0 {
            known
        } else {
            batch.delivered_through
        };
        if first > from.saturating_add(self.cfg.max_seq_jump) {
            self.metrics
                .ingest_takeover_refused
                .with_label_values(&["seq_jump"])
                .inc();
            return Err(StoreError::Takeover(format!(
                "agent {} jumps from seq {from} to {first}, further than any spool explains (--max-seq-jump {})",
                batch.agent_id, self.cfg.max_seq_jump
            )));
        }
        let Accepted {
            mut fresh,
            duplicates,
            through,
        } = accept(
            batch.events,
            known,
            batch.delivered_through,
            &batch.agent_id,
            received,
            &self.metrics,
        );
        self.duplicates += duplicates;
        self.metrics.ingest_duplicates.inc_by(duplicates);
        if fresh.is_empty() {
            // All resent. They may be written but not yet synced (an earlier stream's batch):
            // the answer waits for a sync like any other, never vouching for the page cache.
            let durable = (through > self.agents.durable_through(&batch.agent_id))
                .then(|| self.request_sync(origin, through));
            return Ok(IngestOutcome {
                through_seq: through,
                duplicates,
                stored: 0,
                durable,
            });
        }
        self.clamp_times(&mut fresh, received);
        // Judged before the write, so each verdict change is written with its evidence.
        let first_cursor = self.events.next_cursor();
        let verdicts = self.verdict.judge(
            &batch.node,
            fresh
                .iter()
                .enumerate()
                .map(|(i, w)| (&*w.ev, first_cursor + i as u64)),
        );
        // Agent events (and seq-gap notices); the verdicts are the collector's own.
        let received_events = fresh.len() as u64;
        fresh.extend(verdicts.into_iter().map(Wire::encode));
        // Cursors are assigned in order from the store's next one. Write, then make visible: a
        // failed write stores nothing (the agent keeps the events and resends). The log gets
        // the bytes as received plus one header with what the collector sets on every event.
        let header = BatchHeader {
            node: batch.node.clone(),
            agent_id: batch.agent_id.clone(),
            received: Some(received),
            first_cursor: self.events.next_cursor(),
        };
        if let Err(e) = self.write(&header, &fresh) {
            self.verdict.rollback();
            return Err(e);
        }
        self.verdict.commit();
        let stored = received_events;
        self.metrics.ingest_events.inc_by(received_events);
        self.store_all(fresh, &header, &origin);
        if let Some(e) = self.agents.map.get_mut(&batch.agent_id) {
            e.progress.through_seq = through;
            e.progress.last_seen = Some(received);
            e.progress.node.clone_from(&batch.node);
        }
        let durable = Some(self.request_sync(origin, through));
        self.count_evicted();
        self.rotate_if_due();
        self.truncate_wal();
        Ok(IngestOutcome {
            through_seq: through,
            duplicates,
            stored,
            durable,
        })
    }

    /// Appends the batch to the log; a failure is cut off the log and fails readiness until a
    /// write succeeds again.
    fn write(&mut self, header: &BatchHeader, fresh: &[Wire]) -> Result<(), StoreError> {
        if let Err(e) = self
            .wal
            .append_batch(header, fresh.iter().map(|w| w.bytes.as_ref()))
        {
            self.metrics.store_write_errors.inc();
            self.metrics.store_writable.set(0);
            if !self.health.is_write_failing() {
                warn!(error = %e, agent = %header.agent_id, "WAL append failed; batch cut off the log and not acknowledged (agents resend); /readyz fails until a write succeeds");
            }
            self.health.write_failed(&e.to_string());
            return Err(StoreError::Write(e.to_string()));
        }
        if self.health.is_write_failing() {
            info!("WAL writes succeed again");
            self.health.write_ok();
            self.metrics.store_writable.set(1);
        }
        Ok(())
    }

    /// Makes the written events visible: each gets the batch's envelope and its cursor (the
    /// same the log header implies), goes into the store, the counters, the sample history,
    /// to subscribers and into its node's state.
    fn store_all(&mut self, fresh: Vec<Wire>, header: &BatchHeader, origin: &Arc<Origin>) {
        let mut wire_bytes = 0;
        let mut done = Vec::with_capacity(fresh.len());
        for (i, Wire { mut ev, bytes }) in fresh.into_iter().enumerate() {
            wire_bytes += bytes.len() as u64;
            // The batch envelope is authoritative for who sent it. Agents put their own node
            // and id on every event, so nothing is allocated here.
            let e = &mut *ev;
            if e.node != header.node {
                e.node.clone_from(&header.node);
            }
            if e.agent_id != header.agent_id {
                e.agent_id.clone_from(&header.agent_id);
            }
            e.received = header.received;
            e.cursor = header.first_cursor + i as u64;
            self.events.push(&ev, &bytes, origin);
            drop(bytes);
            self.counters.count(&self.metrics, &ev);
            self.count_agent_drops(&ev);
            self.series.add_event(&ev);
            self.subscribers.fan_out(&ev);
            done.extend(self.nodes.note(ev));
        }
        crate::recycle::give_back(done);
        self.metrics.ingest_bytes.inc_by(wire_bytes);
    }

    /// Losses an agent reports (its own gap notices) per node and stage.
    fn count_agent_drops(&self, ev: &v1::Event) {
        if let Some(Payload::Gap(g)) = &ev.payload
            && g.stage != GapStage::CollectorSeq as i32
        {
            self.metrics
                .agent_reported_drops
                .with_label_values(&[ev.node.as_str(), GapStage::name_of(g.stage)])
                .inc_by(g.missed);
        }
    }

    /// Starts a new log segment when the current one is full. The checkpoint copies every
    /// agent's progress: it is built only then.
    fn rotate_if_due(&mut self) {
        if !self.wal.needs_rotation() {
            return;
        }
        let checkpoint = self.checkpoint();
        match self
            .wal
            .maybe_rotate(self.events.next_cursor(), &checkpoint)
        {
            Ok(_) => {}
            Err(RotateError::Sync(e)) => self.fail(e.to_string()),
            Err(e @ RotateError::Write(_)) => {
                self.metrics.store_write_errors.inc();
                warn!(error = %e, "WAL rotation failed; continuing in the current segment");
            }
        }
    }

    /// Replaces event times more than `--max-clock-skew` after `received` by `received`,
    /// keeping the agent's in `reported_time`. Such an event is encoded again (rare) so the log
    /// and the store keep the corrected time. Times in the past are kept: an agent delivering
    /// its spool after an outage, or the kernel log's backlog, legitimately sends old events.
    fn clamp_times(&self, fresh: &mut [Wire], received: prost_types::Timestamp) {
        let skew = self.cfg.max_clock_skew.as_nanos() as i128;
        let now = ptime::to_unix_nanos(&received);
        let mut clamped = 0;
        for w in fresh.iter_mut() {
            let Some(t) = w.ev.time else { continue };
            if ptime::to_unix_nanos(&t) - now <= skew {
                continue;
            }
            w.ev.reported_time = Some(t);
            w.ev.time = Some(received);
            w.bytes = prost::bytes::Bytes::from(prost::Message::encode_to_vec(&*w.ev));
            clamped += 1;
        }
        if clamped > 0 {
            self.metrics.ingest_clock_clamped.inc_by(clamped);
            debug!(
                clamped,
                "event times beyond --max-clock-skew replaced by the received time"
            );
        }
    }
}
