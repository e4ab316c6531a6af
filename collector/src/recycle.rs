//! Decoded events handed back after ingest and decoded into again, keeping their strings'
//! capacity.
//!
//! Ingest decodes every event (to validate it and to count, sample and fan it out) but keeps
//! none of them: the store holds their bytes. Decoding into a fresh event allocated each of its
//! strings (a GPU sample has seven), and freeing them again after ingest, which together were
//! the largest part of what ingest cost per event after protobuf parsing itself. Protobuf's
//! merge reuses a string's capacity and a oneof variant that is already there, so an event
//! decoded into a given-back one of the same payload kind allocates nothing.
//!
//! A given-back event is reset to the default in every field but keeps the capacity of its
//! strings and lists (by construction: whatever the reset does not name is `Default`), so what
//! is decoded into it is exactly what a fresh decode gives (tested). The pool is bounded per
//! kind; one lock per batch on each side.
use std::sync::Mutex;

use gpulse_proto::v1::{self, event::Payload};

use crate::store::events::KINDS;

/// Most spare events kept per payload kind (a few batches' worth; ~1 KiB each).
const MAX_SPARE: usize = 4096;

// Boxed on purpose: events move between batches, pool and decoder as pointers, not as
// ~700-byte values.
#[expect(
    clippy::vec_box,
    reason = "events move as pointers, not ~700-byte values"
)]
static SPARE: Mutex<[Vec<Box<v1::Event>>; KINDS]> = Mutex::new([const { Vec::new() }; KINDS]);

fn cleared(mut s: String) -> String {
    s.clear();
    s
}

fn cleared_list<T>(mut v: Vec<T>) -> Vec<T> {
    v.clear();
    v
}

/// Whether events of a payload kind are worth keeping: GPU samples, which arrive by the
/// thousand with seven strings each. (Keeping process events and log lines too showed no gain
/// on the events-only benchmark: their few short strings save about what resetting a
/// ~700-byte event costs.)
fn kept(kind: usize) -> bool {
    kind == v1::EventKind::GpuSample as usize
}

/// The payload with its strings emptied, for the kinds worth keeping. Others reset to none.
fn reset_payload(p: Option<Payload>) -> Option<Payload> {
    Some(match p? {
        Payload::GpuSample(g) => Payload::GpuSample(v1::GpuSample {
            uuid: cleared(g.uuid),
            pci: cleared(g.pci),
            name: cleared(g.name),
            driver_version: cleared(g.driver_version),
            cuda_driver_version: cleared(g.cuda_driver_version),
            throttle_reason_names: cleared_list(g.throttle_reason_names),
            processes: cleared_list(g.processes),
            errors: cleared_list(g.errors),
            ..Default::default()
        }),
        Payload::GpuProcess(p) => Payload::GpuProcess(v1::GpuProcess {
            comm: cleared(p.comm),
            exe: cleared(p.exe),
            device: cleared(p.device),
            devices: cleared_list(p.devices),
            ..Default::default()
        }),
        Payload::DriverLog(d) => Payload::DriverLog(v1::DriverLog {
            text: cleared(d.text),
            pci: cleared(d.pci),
            gpu_uuid: cleared(d.gpu_uuid),
            ..Default::default()
        }),
        _ => return None,
    })
}

/// `ev` as a default event that keeps its strings' capacity.
fn reset(ev: &mut v1::Event) {
    let taken = std::mem::take(ev);
    *ev = v1::Event {
        node: cleared(taken.node),
        agent_id: cleared(taken.agent_id),
        payload: reset_payload(taken.payload),
        ..Default::default()
    };
}

fn kind_of(ev: &v1::Event) -> usize {
    (ev.payload_kind() as usize).min(KINDS - 1)
}

/// Hands decoded events back for reuse (reset here, off the decoding side's path).
pub fn give_back(events: impl IntoIterator<Item = Box<v1::Event>>) {
    let mut local: [Vec<Box<v1::Event>>; KINDS] = Default::default();
    for mut ev in events {
        let k = kind_of(&ev);
        if !kept(k) {
            continue;
        }
        reset(&mut ev);
        if ev.payload.is_some() {
            local[k].push(ev);
        }
    }
    let Ok(mut spare) = SPARE.lock() else { return };
    for (k, mut evs) in local.into_iter().enumerate() {
        let room = MAX_SPARE.saturating_sub(spare[k].len());
        evs.truncate(room);
        spare[k].append(&mut evs);
    }
}

/// The payload kind of an encoded event, from its top-level fields (its payload field number
/// less 9: xid = 10 is kind 1 ... gpu_sample = 16 is kind 7), without decoding it. None when the
/// bytes do not say (then the decode that follows reports why, if anything is wrong).
pub fn payload_kind(mut b: &[u8]) -> Option<usize> {
    use prost::encoding::decode_varint;
    while !b.is_empty() {
        let key = decode_varint(&mut b).ok()?;
        let field = key >> 3;
        if (10..=16).contains(&field) {
            return Some(field as usize - 9);
        }
        let skip = match key & 7 {
            0 => {
                decode_varint(&mut b).ok()?;
                0
            }
            1 => 8,
            2 => usize::try_from(decode_varint(&mut b).ok()?).ok()?,
            5 => 4,
            _ => return None,
        };
        b = b.get(skip..)?;
    }
    None
}

/// Spare events taken from the pool for one batch: one lock per kind the batch needs.
pub struct Spares {
    #[expect(
        clippy::vec_box,
        reason = "events move as pointers, not ~700-byte values"
    )]
    local: [Vec<Box<v1::Event>>; KINDS],
    /// Events still to be decoded in the batch (the most worth taking).
    wanted: usize,
}

impl Spares {
    pub fn for_batch(events: usize) -> Self {
        Self {
            local: Default::default(),
            wanted: events,
        }
    }

    /// An empty event to decode `bytes` into: a given-back one of the same payload kind when
    /// there is one, else a new one.
    pub fn take(&mut self, bytes: &[u8]) -> Box<v1::Event> {
        self.wanted = self.wanted.saturating_sub(1);
        let Some(k) = payload_kind(bytes).filter(|k| kept(*k)) else {
            return Box::default();
        };
        if self.local[k].is_empty()
            && let Ok(mut spare) = SPARE.lock()
        {
            let n = spare[k].len().min(self.wanted + 1);
            let from = spare[k].len() - n;
            self.local[k].extend(spare[k].drain(from..));
        }
        self.local[k].pop().unwrap_or_default()
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        // Whatever the batch did not use goes back (a rejected batch, fewer of a kind).
        let left: Vec<Box<v1::Event>> = self.local.iter_mut().flat_map(std::mem::take).collect();
        if !left.is_empty() {
            give_back(left);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn sample(full: bool) -> v1::Event {
        v1::Event {
            seq: 1,
            node: "node-with-a-long-name".into(),
            agent_id: "node/agent".into(),
            kind: v1::EventKind::GpuSample as i32,
            payload: Some(Payload::GpuSample(if full {
                v1::GpuSample {
                    index: 3,
                    uuid: "GPU-0000".into(),
                    pci: "0000:3b:00.0".into(),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    gpu_util_pct: Some(97),
                    mem_used_bytes: Some(1 << 36),
                    throttle_reason_names: vec!["sw_power_cap".into()],
                    processes: vec![v1::GpuProcessMemory {
                        pid: 7,
                        used_memory_bytes: Some(5),
                        ..Default::default()
                    }],
                    errors: vec![v1::FieldError {
                        field: "ecc".into(),
                        error: "not supported".into(),
                    }],
                    ..Default::default()
                }
            } else {
                v1::GpuSample {
                    index: 1,
                    ..Default::default()
                }
            })),
            ..Default::default()
        }
    }

    fn others() -> Vec<v1::Event> {
        vec![
            v1::Event {
                kind: v1::EventKind::GpuProcess as i32,
                payload: Some(Payload::GpuProcess(v1::GpuProcess {
                    pid: 9,
                    comm: "python3".into(),
                    exe: "/usr/bin/python3".into(),
                    devices: vec!["/dev/nvidia0".into()],
                    pod: Some(v1::PodRef {
                        name: "train-0".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            },
            v1::Event {
                kind: v1::EventKind::GpuProcess as i32,
                payload: Some(Payload::GpuProcess(v1::GpuProcess::default())),
                ..Default::default()
            },
            v1::Event {
                kind: v1::EventKind::DriverLog as i32,
                payload: Some(Payload::DriverLog(v1::DriverLog {
                    text: "NVRM: something".into(),
                    pci: "0000:3b:00.0".into(),
                    ..Default::default()
                })),
                ..Default::default()
            },
            v1::Event {
                kind: v1::EventKind::Xid as i32,
                payload: Some(Payload::Xid(v1::Xid {
                    code: 79,
                    ..Default::default()
                })),
                ..Default::default()
            },
            v1::Event::default(),
        ]
    }

    /// Whatever order events of whatever shapes come in, decoding into given-back events gives
    /// exactly what a fresh decode gives: nothing of an earlier event survives the reset.
    #[test]
    fn reused_events_decode_exactly_like_fresh_ones() {
        let mut seq = vec![sample(true), sample(false), sample(true)];
        seq.extend(others());
        seq.extend(others().into_iter().rev());
        seq.push(sample(false));
        let encoded: Vec<Vec<u8>> = seq.iter().map(Message::encode_to_vec).collect();
        for round in 0..3 {
            let mut spares = Spares::for_batch(encoded.len());
            let mut decoded = Vec::new();
            for (i, b) in encoded.iter().enumerate() {
                let mut ev = spares.take(b);
                ev.merge(b.as_slice()).unwrap();
                assert_eq!(*ev, seq[i], "round {round}, event {i}");
                decoded.push(ev);
            }
            drop(spares);
            give_back(decoded);
        }
    }

    /// Damaged and arbitrary bytes: a decode into a given-back event succeeds exactly when a
    /// fresh decode does, with the same result, and reading the payload kind never panics.
    #[test]
    fn mutated_bytes_decode_alike_fresh_or_reused() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seeds: Vec<Vec<u8>> = others().iter().map(Message::encode_to_vec).collect();
        seeds.push(sample(true).encode_to_vec());
        seeds.push(sample(false).encode_to_vec());
        let mut recycled = 0;
        for i in 0..20_000 {
            let mut b = seeds[i % seeds.len()].clone();
            for _ in 0..1 + next() % 3 {
                if b.is_empty() {
                    break;
                }
                let at = (next() as usize) % b.len();
                match next() % 3 {
                    0 => b[at] ^= 1 << (next() % 8),
                    1 => b.truncate(at),
                    _ => b.insert(at, next() as u8),
                }
            }
            let _ = payload_kind(&b);
            let fresh = v1::Event::decode(b.as_slice());
            let mut spares = Spares::for_batch(1);
            let mut ev = spares.take(&b);
            recycled += usize::from(ev.payload.is_some());
            let reused = ev.merge(b.as_slice()).map(|()| (*ev).clone());
            match (fresh, reused) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "case {i}");
                    give_back([ev]);
                }
                (Err(_), Err(_)) => {}
                (a, b) => panic!("case {i}: fresh {a:?} vs reused {b:?}"),
            }
        }
        assert!(recycled > 100, "given-back events were used ({recycled})");
    }

    #[test]
    fn reset_keeps_capacity_and_nothing_else() {
        let mut ev = sample(true);
        let cap = ev.node.capacity();
        reset(&mut ev);
        assert_eq!(ev.node.capacity(), cap);
        let Some(Payload::GpuSample(g)) = &ev.payload else {
            panic!("variant kept")
        };
        assert!(g.name.capacity() > 0);
        assert_eq!(*g, v1::GpuSample::default());
        ev.payload = None;
        assert_eq!(ev, v1::Event::default());
    }

    #[test]
    fn payload_kind_reads_the_oneof_field() {
        for ev in others().into_iter().chain([sample(true)]) {
            let want = ev.payload.as_ref().map(|_| ev.payload_kind() as usize);
            assert_eq!(payload_kind(&ev.encode_to_vec()), want);
        }
        assert_eq!(payload_kind(&[0xff]), None, "truncated varint");
        assert_eq!(payload_kind(&[0x0a, 0x05, 1]), None, "length past the end");
    }
}
