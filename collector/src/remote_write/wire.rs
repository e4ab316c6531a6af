//! Prometheus remote-write 1.0: the protobuf messages (prometheus/prompb types.proto and
//! remote.proto, the fields 1.0 senders fill) and the snappy block framing the receivers expect.
use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// Sorted by name; `__name__` is the metric name.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Oldest first.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("snappy: {0}")]
    Snappy(#[from] snap::Error),
    #[error("protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// The body of one POST: the request, protobuf-encoded, snappy block-compressed.
pub fn encode(req: &WriteRequest) -> Result<Vec<u8>, WireError> {
    Ok(snap::raw::Encoder::new().compress_vec(&req.encode_to_vec())?)
}

/// The request in a body (what a receiver does; for tests and for checking queued files).
pub fn decode(body: &[u8]) -> Result<WriteRequest, WireError> {
    let raw = snap::raw::Decoder::new().decompress_vec(body)?;
    Ok(WriteRequest::decode(raw.as_slice())?)
}

/// A series: the metric name and labels (sorted, as receivers require), no samples yet.
pub fn series(name: &str, labels: &[(&str, &str)]) -> TimeSeries {
    let mut l: Vec<Label> = labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(n, v)| Label {
            name: (*n).to_string(),
            value: (*v).to_string(),
        })
        .collect();
    l.push(Label {
        name: "__name__".into(),
        value: name.to_string(),
    });
    l.sort();
    TimeSeries {
        labels: l,
        samples: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_sorts_labels() {
        let mut s = series("m", &[("node", "n1"), ("cluster", "c"), ("empty", "")]);
        s.samples.push(Sample {
            value: 1.5,
            timestamp: 60_000,
        });
        let names: Vec<&str> = s.labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["__name__", "cluster", "node"]);
        let req = WriteRequest {
            timeseries: vec![s],
        };
        let body = encode(&req).unwrap();
        assert_eq!(decode(&body).unwrap(), req);
        assert!(decode(b"not snappy").is_err());
    }
}
