//! `gpulse`: the human's window onto a gpulse collector. A pure client of the Telemetry API
//! (gpulse-proto) plus the MCP crate for `gpulse mcp --stdio`.
//!
//! stdout carries only results (events, JSON lines, tables); diagnostics go to stderr. Each
//! command renders through a pure function of the answer (tested against expected output in
//! `tests/expected/`).
pub mod args;
pub mod events;
pub mod health;
pub mod mcp;
pub mod nodes;
pub mod status;
pub mod tail;
pub mod trend;
pub mod xid;

use gpulse_proto::{time::rfc3339, v1::ResolvedWindow};

/// "window <start> .. <end>", with the data's start when it begins later than the window.
pub fn window_line(w: Option<&ResolvedWindow>) -> String {
    let Some(w) = w else {
        return String::new();
    };
    let t = |x: &Option<prost_types::Timestamp>| x.as_ref().map(rfc3339).unwrap_or_default();
    let mut s = format!("window {} .. {}", t(&w.start), t(&w.end));
    if w.partial {
        s.push_str(&format!(
            " (partial: data from {})",
            w.oldest_data
                .as_ref()
                .map(rfc3339)
                .unwrap_or_else(|| "nothing stored".into())
        ));
    }
    s
}
