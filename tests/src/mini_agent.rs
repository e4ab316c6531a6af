//! An agent reduced to its delivery rule, for fault tests and the soak harness: every attempt
//! opens a stream, resumes after what the collector says it has, and sends the rest; only an
//! ack removes events from its spool.
use std::collections::BTreeMap;

use gpulse_proto::v1::{self, Batch, event::Payload, ingest_client::IngestClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub struct MiniAgent {
    pub url: String,
    pub id: String,
    pub node: String,
    /// seq -> event, unacknowledged.
    pub spool: BTreeMap<u64, v1::Event>,
    pub next_seq: u64,
    /// Messages (XID message or log text) of acknowledged events, in seq order.
    pub acked: Vec<String>,
    /// Highest seq acknowledged.
    pub acked_through: u64,
}

impl MiniAgent {
    pub fn new(url: String, id: &str) -> Self {
        Self::on_node(url, id, "node-full")
    }

    pub fn on_node(url: String, id: &str, node: &str) -> Self {
        Self {
            url,
            id: id.into(),
            node: node.into(),
            spool: BTreeMap::new(),
            next_seq: 1,
            acked: Vec::new(),
            acked_through: 0,
        }
    }

    pub fn add(&mut self, ev: v1::Event) {
        self.spool.insert(self.next_seq, ev);
        self.next_seq += 1;
    }

    pub fn batch(&self, first_seq: u64, events: Vec<v1::Event>) -> Batch {
        Batch {
            agent_id: self.id.clone(),
            node: self.node.clone(),
            boot_id: "b".into(),
            first_seq,
            events,
            delivered_through: 0,
        }
    }

    /// One delivery attempt; Err carries the collector's status.
    pub async fn attempt(&mut self) -> Result<(), tonic::Status> {
        let mut client = IngestClient::connect(self.url.clone())
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4);
        tx.send(self.batch(0, Vec::new())).await.ok();
        let mut acks = client.push(ReceiverStream::new(rx)).await?.into_inner();
        let hello = acks
            .message()
            .await?
            .ok_or_else(|| tonic::Status::unavailable("no hello"))?;
        self.ack(hello.through_seq);
        let Some((&first, _)) = self.spool.first_key_value() else {
            return Ok(());
        };
        // At most 1000 per attempt (a long outage must not make one huge batch).
        let events: Vec<v1::Event> = self.spool.values().take(1000).cloned().collect();
        let last = first + events.len() as u64 - 1;
        tx.send(self.batch(first, events)).await.ok();
        let ack = acks
            .message()
            .await?
            .ok_or_else(|| tonic::Status::unavailable("stream ended"))?;
        if ack.through_seq > last {
            return Err(tonic::Status::internal(format!(
                "ack {} beyond the last seq sent {last}",
                ack.through_seq
            )));
        }
        self.ack(ack.through_seq);
        Ok(())
    }

    fn ack(&mut self, through: u64) {
        self.acked_through = self.acked_through.max(through);
        while let Some(e) = self.spool.first_entry() {
            if *e.key() > through {
                break;
            }
            match e.remove().payload {
                Some(Payload::Xid(x)) => self.acked.push(x.message),
                Some(Payload::DriverLog(d)) => self.acked.push(d.text),
                _ => {}
            }
        }
    }
}
