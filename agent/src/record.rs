//! What capture sources hand to the pipeline.
use gpulse_proto::v1::RecordSource;

/// One kernel record, already timestamped in UTC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    /// Unix nanoseconds (UTC) when the kernel saw the record.
    pub unix_ns: i128,
    pub source: RecordSource,
    pub text: String,
    pub truncated: bool,
    /// Set for `nvidia:nvidia_dev_xid` records: code and device from the tracepoint fields.
    pub dev_xid: Option<DevXid>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevXid {
    pub code: u32,
    pub dev: String,
}

/// Something a source wants the stream to know besides records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceNote {
    /// Records were lost at `stage` (kernel ring, kmsg overwrite, ...).
    Lost {
        stage: gpulse_proto::v1::GapStage,
        missed: u64,
        detail: String,
    },
}

/// Items on the capture channel.
#[derive(Clone, Debug, PartialEq)]
pub enum Captured {
    Record(RawRecord),
    Note(SourceNote),
    /// The agent's own state changes (start, degraded source, stop).
    Status(gpulse_proto::v1::AgentStatus),
    /// A GPU process record (open of a GPU device node, exec, exit).
    Proc(crate::procs::ProcCapture),
    /// One NVML sample of one GPU.
    Sample {
        unix_ns: i128,
        /// Boxed: a sample is several times larger than the other variants.
        sample: Box<gpulse_proto::v1::GpuSample>,
    },
}

/// Registers an owned descriptor with the tokio reactor for readiness (read) notifications.
pub fn async_fd<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: every caller passes an object that owns its descriptor (OwnedFd, an aya map or
    // ring buffer) and returns the same fd for its whole life, which is what `register` needs.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(std::io::Error::from)
}
