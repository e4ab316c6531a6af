//! `Ingest.Push` with encoded events: a [`RawBatch`] is a `Batch` whose events are left as the
//! bytes the agent encoded them into. Agents send it (their spool keeps events encoded), and
//! the collector receives it.
//!
//! The collector decodes every event anyway (to validate, store and fan it out), but writes the
//! received bytes to its write-ahead log as they came instead of encoding each event again, and
//! decodes them from one contiguous slice (protobuf's fast path) instead of through the
//! transport's chunked buffer. On the wire a `RawBatch` *is* a `Batch`: same field numbers,
//! and an embedded message is length-delimited exactly like `bytes`. Tests below hold the two
//! definitions together.
//!
//! [`ingest_server`] is the generated server for route `/gpulse.v1.Ingest/Push` taking
//! `RawBatch`; agents call the same route with a plain tonic client and `RawBatch`.

/// `gpulse.v1.Batch` with `repeated bytes events = 5` in place of `repeated Event events = 5`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawBatch {
    #[prost(string, tag = "1")]
    pub agent_id: String,
    #[prost(string, tag = "2")]
    pub boot_id: String,
    #[prost(string, tag = "3")]
    pub node: String,
    #[prost(uint64, tag = "4")]
    pub first_seq: u64,
    /// Each an encoded `gpulse.v1.Event`, sharing the received buffer (no copy).
    #[prost(bytes = "bytes", repeated, tag = "5")]
    pub events: Vec<prost::bytes::Bytes>,
    #[prost(uint64, tag = "6")]
    pub delivered_through: u64,
}

include!("generated/gpulse.v1.Ingest.raw.rs");

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use prost::Message;
    use prost_types::{FileDescriptorSet, field_descriptor_proto::Type};

    use super::RawBatch;
    use crate::v1::{self, Batch, event::Payload};

    fn batch() -> Batch {
        Batch {
            agent_id: "node-a/1234".into(),
            boot_id: "0f1e".into(),
            node: "node-a".into(),
            first_seq: 41,
            events: (41..44)
                .map(|seq| v1::Event {
                    seq,
                    node: "node-a".into(),
                    kind: v1::EventKind::Xid as i32,
                    payload: Some(Payload::Xid(v1::Xid {
                        code: 79,
                        pci: "0000:3b:00.0".into(),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            delivered_through: 40,
        }
    }

    #[test]
    fn a_batch_on_the_wire_reads_as_a_raw_batch_and_back() {
        let b = batch();
        let raw = RawBatch::decode(b.encode_to_vec().as_slice()).unwrap();
        assert_eq!(raw.agent_id, b.agent_id);
        assert_eq!(raw.boot_id, b.boot_id);
        assert_eq!(raw.node, b.node);
        assert_eq!(raw.first_seq, b.first_seq);
        assert_eq!(raw.delivered_through, b.delivered_through);
        assert_eq!(raw.events.len(), b.events.len());
        for (bytes, ev) in raw.events.iter().zip(&b.events) {
            assert_eq!(bytes.as_ref(), ev.encode_to_vec().as_slice());
        }
        assert_eq!(raw.encode_to_vec(), b.encode_to_vec());
        assert_eq!(Batch::decode(raw.encode_to_vec().as_slice()).unwrap(), b);
    }

    /// If someone adds, renumbers or retypes a `Batch` field, `RawBatch` must follow.
    #[test]
    fn raw_batch_mirrors_every_batch_field() {
        let set = FileDescriptorSet::decode(v1::FILE_DESCRIPTOR_SET).unwrap();
        let batch = set
            .file
            .iter()
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "Batch")
            .unwrap();
        let fields: Vec<(String, i32, Type)> = batch
            .field
            .iter()
            .map(|f| (f.name().to_string(), f.number(), f.r#type()))
            .collect();
        assert_eq!(
            fields,
            vec![
                ("agent_id".to_string(), 1, Type::String),
                ("boot_id".to_string(), 2, Type::String),
                ("node".to_string(), 3, Type::String),
                ("first_seq".to_string(), 4, Type::Uint64),
                ("events".to_string(), 5, Type::Message),
                ("delivered_through".to_string(), 6, Type::Uint64),
            ]
        );
        assert!(batch.field[4].label() == prost_types::field_descriptor_proto::Label::Repeated);
    }
}
