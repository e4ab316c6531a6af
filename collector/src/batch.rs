//! What `Ingest.Push` accepts: an agent's batch checked, its events decoded, and each event's
//! received bytes kept for the write-ahead log (see `gpulse_proto::raw`).
//!
//! A batch is all or nothing: one bad event rejects the batch with a message that names it, and
//! the agent keeps (and can inspect) what it sent.
use gpulse_proto::{
    bounds,
    names::ShortName,
    raw::RawBatch,
    v1::{self, Batch, EventKind},
};
use prost::{Message, bytes::Bytes};
use tonic::Status;

/// Most events one batch may carry.
pub const MAX_BATCH_EVENTS: usize = 10_000;
const MAX_ID_LEN: usize = 256;
/// Largest seq an agent may use (2^63 - 1): sums of seqs and counts stay far from wrapping, and
/// a seq fits the signed integers of every reader.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// One event as received: decoded, plus its encoding as the agent sent it (the collector's
/// envelope fields, node, agent id, cursor and received time, are set on the decoded event and
/// kept beside the bytes in the store, never encoded into them).
///
/// The event is boxed (a decoded event is several hundred bytes, and moving it from decoder to
/// batch to state cost more than decoding it) and, after ingest, given back to be decoded into
/// again (see `recycle`).
#[derive(Clone, Debug)]
pub struct Wire {
    pub ev: Box<v1::Event>,
    pub bytes: Bytes,
}

impl Wire {
    /// An event the collector made itself (or received decoded): encoded once here.
    pub fn encode(ev: v1::Event) -> Self {
        let bytes = Bytes::from(ev.encode_to_vec());
        Self {
            ev: Box::new(ev),
            bytes,
        }
    }
}

/// A checked batch, ready for the store.
#[derive(Clone, Debug)]
pub struct IngestBatch {
    pub agent_id: String,
    pub boot_id: String,
    pub node: String,
    pub first_seq: u64,
    pub events: Vec<Wire>,
    /// The agent's word that every seq up to this was acknowledged by a collector (maybe another
    /// shard): a jump up to it is a handover, not a loss.
    pub delivered_through: u64,
}

fn check_header(
    agent_id: &str,
    boot_id: &str,
    node: &str,
    first_seq: u64,
    events: usize,
    delivered_through: u64,
    stream_agent: Option<&str>,
) -> Result<(), Status> {
    if agent_id.is_empty() || agent_id.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "batch.agent_id must be 1..={MAX_ID_LEN} bytes"
        )));
    }
    if boot_id.len() > bounds::MAX_SHORT {
        return Err(Status::invalid_argument(format!(
            "batch.boot_id has {} bytes; at most {} are allowed",
            boot_id.len(),
            bounds::MAX_SHORT
        )));
    }
    if let Some(a) = stream_agent
        && a != agent_id
    {
        return Err(Status::invalid_argument(format!(
            "batch.agent_id changed within one stream ({a:?} -> {agent_id:?}); open a new stream per agent"
        )));
    }
    if let Err(e) = crate::labels::node(node) {
        return Err(Status::invalid_argument(format!("batch.node: {e}")));
    }
    if events > MAX_BATCH_EVENTS {
        return Err(Status::invalid_argument(format!(
            "batch has {events} events; at most {MAX_BATCH_EVENTS} are allowed"
        )));
    }
    if events > 0 && first_seq == 0 {
        return Err(Status::invalid_argument(
            "batch.first_seq must be >= 1 when the batch has events",
        ));
    }
    // Seqs are the agent's numbers: every sum the collector forms from them must not wrap
    // (issue 27 #14: first_seq 2^64-1 stored an event with seq 0).
    if first_seq
        .checked_add(events as u64)
        .is_none_or(|end| end > MAX_SEQ)
    {
        return Err(Status::invalid_argument(format!(
            "batch.first_seq {first_seq} + {events} events passes the largest seq ({MAX_SEQ})"
        )));
    }
    if delivered_through > MAX_SEQ {
        return Err(Status::invalid_argument(format!(
            "batch.delivered_through {delivered_through} passes the largest seq ({MAX_SEQ})"
        )));
    }
    Ok(())
}

/// Checks event `i` of a batch starting at `first`; fills in a seq or kind the agent left at
/// zero. Returns whether it changed the event (its received bytes then no longer match it).
///
/// An event without a payload this collector knows, but with fields it does not know (a newer
/// agent's payload), is accepted as `EVENT_KIND_UNKNOWN`: its bytes are kept as received so a
/// collector that knows the payload reads it after an upgrade. One with no payload at all is
/// refused. `encoded` is the event as received (None: it was decoded in-process).
fn check_event(
    i: usize,
    first: u64,
    ev: &mut v1::Event,
    encoded: Option<&[u8]>,
) -> Result<bool, Status> {
    let want = first + i as u64; // checked against MAX_SEQ in check_header
    let mut changed = false;
    if ev.seq == 0 {
        ev.seq = want;
        changed = true;
    } else if ev.seq != want {
        return Err(Status::invalid_argument(format!(
            "events[{i}].seq is {} but batch.first_seq {first} + {i} = {want}: seqs must be contiguous",
            ev.seq
        )));
    }
    let payload_kind = ev.payload_kind();
    if let Err(v) = bounds::check(ev) {
        return Err(Status::invalid_argument(format!(
            "events[{i}] (seq {want}) {v}"
        )));
    }
    if payload_kind == EventKind::Unspecified {
        // Read once here; the stored event is marked with what was read.
        let unknown = encoded
            .and_then(gpulse_proto::convert::unknown_event_fields)
            .unwrap_or_default();
        if unknown.is_empty() {
            return Err(Status::invalid_argument(format!(
                "events[{i}] (seq {want}) has no payload"
            )));
        }
        if unknown.len() > bounds::MAX_UNKNOWN_FIELDS {
            return Err(Status::invalid_argument(format!(
                "events[{i}] (seq {want}) carries more than {} unknown fields",
                bounds::MAX_UNKNOWN_FIELDS
            )));
        }
        check_severity(i, want, ev)?;
        gpulse_proto::convert::mark_unknown_fields(ev, unknown);
        // The received bytes stay authoritative (they hold the payload); a seq the agent left
        // at zero is appended to them (protobuf: the last value of a field wins).
        return Ok(false);
    }
    if ev.kind == EventKind::Unspecified as i32 {
        ev.kind = payload_kind as i32;
        changed = true;
    } else if ev.kind != payload_kind as i32 {
        return Err(Status::invalid_argument(format!(
            "events[{i}] (seq {want}) kind {} does not match its {} payload",
            ev.kind,
            payload_kind.short_name()
        )));
    }
    check_severity(i, want, ev)?;
    if let Some(p) = &ev.payload
        && let Err(e) = crate::labels::check_payload(p)
    {
        return Err(Status::invalid_argument(format!(
            "events[{i}] (seq {want}) {e}"
        )));
    }
    Ok(changed)
}

fn check_severity(i: usize, want: u64, ev: &v1::Event) -> Result<(), Status> {
    if v1::Severity::try_from(ev.severity).is_err() {
        return Err(Status::invalid_argument(format!(
            "events[{i}] (seq {want}) has unknown severity {}",
            ev.severity
        )));
    }
    Ok(())
}

impl IngestBatch {
    /// Decodes and checks a batch as it came off the wire. `stream_agent` is the agent id the
    /// stream started with (one stream carries one agent).
    pub fn from_raw(raw: RawBatch, stream_agent: Option<&str>) -> Result<Self, Status> {
        check_header(
            &raw.agent_id,
            &raw.boot_id,
            &raw.node,
            raw.first_seq,
            raw.events.len(),
            raw.delivered_through,
            stream_agent,
        )?;
        let mut events = Vec::with_capacity(raw.events.len());
        let mut spares = crate::recycle::Spares::for_batch(raw.events.len());
        for (i, mut bytes) in raw.events.into_iter().enumerate() {
            // Refused before it is decoded: the bound is on what was sent.
            if bytes.len() > bounds::MAX_EVENT_BYTES {
                return Err(Status::invalid_argument(format!(
                    "events[{i}] (seq {}) is {} bytes; at most {} are allowed",
                    raw.first_seq + i as u64,
                    bytes.len(),
                    bounds::MAX_EVENT_BYTES
                )));
            }
            // An empty event, given back by an earlier batch when one of this payload kind is
            // spare: decoding into it reuses its strings.
            let mut ev = spares.take(&bytes);
            let slot = &mut *ev;
            // From one contiguous slice: prost's fast path.
            slot.merge(bytes.as_ref()).map_err(|e| {
                Status::invalid_argument(format!(
                    "events[{i}] (seq {}) is not a valid gpulse.v1.Event: {e}",
                    raw.first_seq + i as u64
                ))
            })?;
            let seq_was_zero = slot.seq == 0;
            if check_event(i, raw.first_seq, slot, Some(bytes.as_ref()))? {
                bytes = Bytes::from(slot.encode_to_vec());
            } else if seq_was_zero {
                // An unknown event whose seq was filled in: re-encoding would lose its payload.
                let mut b = bytes.to_vec();
                prost::encoding::uint64::encode(1, &slot.seq, &mut b);
                bytes = Bytes::from(b);
            }
            events.push(Wire { ev, bytes });
        }
        Ok(Self {
            agent_id: raw.agent_id,
            boot_id: raw.boot_id,
            node: raw.node,
            first_seq: raw.first_seq,
            events,
            delivered_through: raw.delivered_through,
        })
    }

    /// Checks a decoded batch (in-process callers) and encodes its events once.
    pub fn from_batch(batch: Batch, stream_agent: Option<&str>) -> Result<Self, Status> {
        check_header(
            &batch.agent_id,
            &batch.boot_id,
            &batch.node,
            batch.first_seq,
            batch.events.len(),
            batch.delivered_through,
            stream_agent,
        )?;
        let mut events = Vec::with_capacity(batch.events.len());
        for (i, mut ev) in batch.events.into_iter().enumerate() {
            let len = ev.encoded_len();
            if len > bounds::MAX_EVENT_BYTES {
                return Err(Status::invalid_argument(format!(
                    "events[{i}] (seq {}) is {len} bytes; at most {} are allowed",
                    batch.first_seq + i as u64,
                    bounds::MAX_EVENT_BYTES
                )));
            }
            check_event(i, batch.first_seq, &mut ev, None)?;
            events.push(Wire::encode(ev));
        }
        Ok(Self {
            agent_id: batch.agent_id,
            boot_id: batch.boot_id,
            node: batch.node,
            first_seq: batch.first_seq,
            events,
            delivered_through: batch.delivered_through,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_proto::v1::event::Payload;

    fn batch(events: Vec<v1::Event>) -> Batch {
        Batch {
            agent_id: "n/a".into(),
            node: "n".into(),
            first_seq: 1,
            events,
            ..Default::default()
        }
    }

    fn log_ev(seq: u64) -> v1::Event {
        v1::Event {
            seq,
            payload: Some(Payload::DriverLog(v1::DriverLog::default())),
            ..Default::default()
        }
    }

    fn raw(b: &Batch) -> RawBatch {
        RawBatch::decode(b.encode_to_vec().as_slice()).unwrap()
    }

    #[test]
    fn validation_accepts_and_fills() {
        for via_raw in [false, true] {
            let b = batch(vec![log_ev(0), log_ev(0)]);
            let got = if via_raw {
                IngestBatch::from_raw(raw(&b), None).unwrap()
            } else {
                IngestBatch::from_batch(b, None).unwrap()
            };
            assert_eq!(got.events[1].ev.seq, 2);
            assert_eq!(got.events[0].ev.kind, EventKind::DriverLog as i32);
            // The filled-in event is what its bytes say.
            for w in &got.events {
                assert_eq!(v1::Event::decode(w.bytes.as_ref()).unwrap(), *w.ev);
            }
        }
    }

    #[test]
    fn received_bytes_are_kept_as_sent() {
        let mut ev = log_ev(1);
        ev.kind = EventKind::DriverLog as i32;
        ev.node = "n".into();
        let sent = ev.encode_to_vec();
        let got = IngestBatch::from_raw(raw(&batch(vec![ev.clone()])), None).unwrap();
        assert_eq!(got.events[0].bytes.as_ref(), sent.as_slice());
        assert_eq!(*got.events[0].ev, ev);
    }

    #[test]
    fn validation_rejects_with_clear_messages() {
        let cases: Vec<(Batch, &str)> = vec![
            (
                Batch {
                    agent_id: String::new(),
                    ..batch(vec![])
                },
                "agent_id",
            ),
            (
                Batch {
                    node: String::new(),
                    ..batch(vec![])
                },
                "node",
            ),
            (
                Batch {
                    node: "victim node\"} 1".into(),
                    ..batch(vec![])
                },
                "is not a node name",
            ),
            (
                batch(vec![v1::Event {
                    seq: 1,
                    payload: Some(v1::event::Payload::Xid(v1::Xid {
                        code: 79,
                        pci: "0000:3b:00.0\"} 1\ngpulse_evil 1".into(),
                        ..Default::default()
                    })),
                    ..Default::default()
                }]),
                "events[0] (seq 1) xid.pci:",
            ),
            (
                batch(vec![v1::Event {
                    seq: 1,
                    payload: Some(v1::event::Payload::GpuSample(v1::GpuSample {
                        uuid: "GPU 0 with spaces".into(),
                        ..Default::default()
                    })),
                    ..Default::default()
                }]),
                "gpu_sample.uuid:",
            ),
            (batch(vec![log_ev(1), log_ev(3)]), "contiguous"),
            (
                Batch {
                    first_seq: 0,
                    ..batch(vec![log_ev(0)])
                },
                "first_seq",
            ),
            (batch(vec![v1::Event::default()]), "no payload"),
            (
                batch(vec![v1::Event {
                    kind: EventKind::Xid as i32,
                    ..log_ev(1)
                }]),
                "does not match",
            ),
            (
                batch(vec![v1::Event {
                    severity: 77,
                    ..log_ev(1)
                }]),
                "severity",
            ),
            (
                batch(
                    (0..MAX_BATCH_EVENTS as u64 + 1)
                        .map(|_| log_ev(0))
                        .collect(),
                ),
                "at most",
            ),
        ];
        for (b, want) in cases {
            for err in [
                IngestBatch::from_raw(raw(&b), None).unwrap_err(),
                IngestBatch::from_batch(b, None).unwrap_err(),
            ] {
                assert_eq!(err.code(), tonic::Code::InvalidArgument);
                assert!(
                    err.message().contains(want),
                    "{} should mention {want}",
                    err.message()
                );
            }
        }
        assert!(
            IngestBatch::from_batch(batch(vec![]), Some("other"))
                .unwrap_err()
                .message()
                .contains("changed")
        );
    }

    #[test]
    fn an_undecodable_event_rejects_the_batch_and_names_it() {
        let mut r = raw(&batch(vec![log_ev(1), log_ev(2)]));
        r.events[1] = Bytes::from_static(&[0x0a, 0x05, 0x01]); // field 1 claims 5 bytes, has 1
        let err = IngestBatch::from_raw(r, None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("events[1] (seq 2)"),
            "{}",
            err.message()
        );
    }
}
