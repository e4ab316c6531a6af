//! Choosing and running the XID record source: eBPF when it can load, /dev/kmsg otherwise.
use std::{str::FromStr, sync::Arc};

use gpulse_proto::v1::{AgentState, AgentStatus};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{error, info, warn};

use crate::{
    ebpf::{self, EbpfOptions, EbpfSource},
    kmsg::{self, KmsgReader},
    record::Captured,
    stats::AgentStats,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceChoice {
    Auto,
    Ebpf,
    Kmsg,
}

impl FromStr for SourceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "ebpf" => Ok(Self::Ebpf),
            "kmsg" => Ok(Self::Kmsg),
            other => Err(format!(
                "unknown --xid-source {other:?} (expected auto, ebpf or kmsg)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("eBPF source requested but unavailable: {0}")]
    Ebpf(#[from] ebpf::EbpfError),
    #[error("/dev/kmsg source unavailable ({path}): {err}")]
    Kmsg { path: String, err: std::io::Error },
}

/// A running source and what the stream should be told about it.
pub struct RunningSource {
    /// "ebpf" or "kmsg".
    pub name: &'static str,
    /// Why this source was chosen (logged and sent as AgentStatus.detail).
    pub why: String,
    pub task: JoinHandle<()>,
}

/// Starts the chosen source. `auto` tries eBPF first and falls back to /dev/kmsg, saying why.
pub fn start(
    choice: SourceChoice,
    opts: &EbpfOptions,
    kmsg_path: &str,
    tx: mpsc::Sender<Captured>,
    stats: Arc<AgentStats>,
) -> Result<RunningSource, SourceError> {
    let ebpf_err = match choice {
        SourceChoice::Kmsg => None,
        SourceChoice::Ebpf | SourceChoice::Auto => match EbpfSource::load(opts) {
            Ok(src) => {
                let why = format!(
                    "eBPF programs attached to printk:console{}; GPU process events {}",
                    if src.nvidia_attached {
                        " and nvidia:nvidia_dev_xid"
                    } else {
                        " (nvidia:nvidia_dev_xid not present: driver not loaded or not the open driver)"
                    },
                    match &src.process_tracking {
                        Ok(()) => "on".to_string(),
                        Err(e) => format!("off ({e})"),
                    }
                );
                info!(source = "ebpf", why = %why, "XID source live");
                let kmsg_path = kmsg_path.to_string();
                let task = tokio::spawn(async move {
                    if let Err(e) = src.run(tx.clone(), stats.clone()).await {
                        // Partial failure: keep XIDs flowing through the kernel log instead.
                        error!(error = %e, "eBPF source failed; switching to /dev/kmsg");
                        fallback_after_failure(&kmsg_path, tx, stats, e.to_string()).await;
                    }
                });
                return Ok(RunningSource {
                    name: "ebpf",
                    why,
                    task,
                });
            }
            Err(e) if choice == SourceChoice::Ebpf => return Err(e.into()),
            Err(e) => Some(e),
        },
    };
    let reader = KmsgReader::open(kmsg_path).map_err(|err| SourceError::Kmsg {
        path: kmsg_path.to_string(),
        err,
    })?;
    let fell_back = ebpf_err.is_some();
    let why = match ebpf_err {
        None => "--xid-source kmsg".to_string(),
        Some(e) => {
            let hint = if ebpf::privileged() {
                ""
            } else {
                " (needs root or CAP_BPF + CAP_PERFMON)"
            };
            format!("eBPF unavailable: {e}{hint}; reading /dev/kmsg instead")
        }
    };
    if fell_back {
        warn!(source = "kmsg", why = %why, "XID source live (fallback)");
    } else {
        info!(source = "kmsg", why = %why, "XID source live");
    }
    let task = tokio::spawn(async move {
        if let Err(e) = kmsg::run(reader, tx, stats).await {
            error!(error = %e, "/dev/kmsg source failed; no XID source is live");
        }
    });
    Ok(RunningSource {
        name: "kmsg",
        why,
        task,
    })
}

async fn fallback_after_failure(
    kmsg_path: &str,
    tx: mpsc::Sender<Captured>,
    stats: Arc<AgentStats>,
    cause: String,
) {
    let status = |state: AgentState, detail: String, src: &str| {
        Captured::Status(AgentStatus {
            state: state as i32,
            xid_source: src.to_string(),
            detail,
            version: env!("CARGO_PKG_VERSION").to_string(),
            boot_id: String::new(),
        })
    };
    match KmsgReader::open(kmsg_path) {
        Ok(reader) => {
            let _ = tx
                .send(status(
                    AgentState::Degraded,
                    format!("eBPF source failed ({cause}); now reading /dev/kmsg"),
                    "kmsg",
                ))
                .await;
            if let Err(e) = kmsg::run(reader, tx, stats).await {
                error!(error = %e, "/dev/kmsg source failed; no XID source is live");
            }
        }
        Err(e) => {
            error!(error = %e, "/dev/kmsg unavailable too; no XID source is live");
            let _ = tx.send(status(AgentState::Degraded, format!("eBPF source failed ({cause}) and /dev/kmsg is unavailable ({e}): no XIDs are being captured"), "none")).await;
        }
    }
}
