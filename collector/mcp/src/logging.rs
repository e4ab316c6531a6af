//! `logging/setLevel` and the log notifications tool calls send: a warning when an answer was
//! cut (a cap was hit), a notice when a call took long. Clients that never set a level get
//! warnings and worse.
//!
//! The 2026-07-28 protocol deprecates logging (SEP-2577) and rmcp marks it so; 2025-11-25
//! clients and the conformance suite still use it, so this server keeps it.
#![expect(
    deprecated,
    reason = "MCP logging, deprecated by SEP-2577, kept for 2025-11-25 clients"
)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use rmcp::{
    Peer, RoleServer,
    model::{CallToolResponse, LoggingLevel, LoggingMessageNotificationParam},
};
use serde_json::json;

/// A call slower than this is reported at `notice`.
pub const SLOW_CALL: Duration = Duration::from_secs(1);

fn rank(l: LoggingLevel) -> u8 {
    match l {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

/// The least severe level the client wants to hear (per session: each session has its own
/// server value).
#[derive(Clone)]
pub struct LogLevel(Arc<AtomicU8>);

impl Default for LogLevel {
    fn default() -> Self {
        Self(Arc::new(AtomicU8::new(rank(LoggingLevel::Warning))))
    }
}

impl LogLevel {
    pub fn set(&self, l: LoggingLevel) {
        self.0.store(rank(l), Ordering::Relaxed);
    }

    pub fn wants(&self, l: LoggingLevel) -> bool {
        rank(l) >= self.0.load(Ordering::Relaxed)
    }
}

/// What to tell the client about a finished call: (level, message).
pub fn about(
    tool: &str,
    took: Duration,
    result: &CallToolResponse,
) -> Vec<(LoggingLevel, serde_json::Value)> {
    let mut out = Vec::new();
    if let CallToolResponse::Complete(r) = result
        && let Some(s) = &r.structured_content
        && s.get("truncated").and_then(|t| t.as_bool()) == Some(true)
    {
        out.push((
            LoggingLevel::Warning,
            json!({
                "tool": tool,
                "message": "the answer was cut to stay within its bounds; its hints say how to narrow the call",
                "hints": s.get("hints"),
            }),
        ));
    }
    if took >= SLOW_CALL {
        out.push((
            LoggingLevel::Notice,
            json!({"tool": tool, "message": "slow call", "elapsed_ms": took.as_millis() as u64}),
        ));
    }
    out
}

/// Sends the notices the client's level lets through (a client that cannot take them, such as a
/// stateless request, just does not get them).
pub async fn send(
    peer: &Peer<RoleServer>,
    level: &LogLevel,
    notes: Vec<(LoggingLevel, serde_json::Value)>,
) {
    for (l, data) in notes {
        if level.wants(l) {
            let p = LoggingMessageNotificationParam::new(l, data).with_logger("gpulse");
            let _ = peer.notify_logging_message(p).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use rmcp::model::CallToolResult;

    use super::*;

    #[test]
    fn levels_filter_and_calls_are_judged() {
        let l = LogLevel::default();
        assert!(l.wants(LoggingLevel::Warning) && !l.wants(LoggingLevel::Notice));
        l.set(LoggingLevel::Debug);
        assert!(l.wants(LoggingLevel::Info));
        let cut = CallToolResponse::Complete(CallToolResult::structured(
            json!({"truncated": true, "hints": ["narrow it"]}),
        ));
        let notes = about("list_events", Duration::from_millis(1500), &cut);
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].0, LoggingLevel::Warning);
        assert_eq!(notes[1].1["elapsed_ms"], 1500);
        let fine =
            CallToolResponse::Complete(CallToolResult::structured(json!({"truncated": false})));
        assert!(about("list_events", Duration::from_millis(3), &fine).is_empty());
    }
}
