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

/// An error and its causes on one line, each distinct cause once: transport errors nest
/// wrappers that repeat their source's words ("tcp connect error: tcp connect error: ..."),
/// and a cause that already says its source makes that source redundant.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || parts.iter().any(|p| p.contains(text)) {
            continue;
        }
        // A cause that restates the previous one and adds to it replaces it.
        if let Some(last) = parts.last_mut()
            && text.contains(last.as_str())
        {
            *last = text.to_string();
            continue;
        }
        parts.push(text.to_string());
    }
    parts.join(": ")
}

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

#[cfg(test)]
mod tests {
    use super::error_line;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn each_distinct_cause_is_said_once() {
        // hyper's shape: two layers both saying "tcp connect error".
        let e = E(
            "transport error",
            Some(Box::new(E(
                "tcp connect error",
                Some(Box::new(E(
                    "tcp connect error",
                    Some(Box::new(E("Connection refused (os error 111)", None))),
                ))),
            ))),
        );
        let e = anyhow::Error::new(e).context("connecting to http://127.0.0.1:1");
        assert_eq!(
            error_line(&e),
            "connecting to http://127.0.0.1:1: transport error: tcp connect error: Connection refused (os error 111)"
        );
    }

    #[test]
    fn a_cause_that_restates_its_source_is_not_followed_by_it() {
        let e = E(
            "reading /x: No such file",
            Some(Box::new(E("No such file", None))),
        );
        assert_eq!(
            error_line(&anyhow::Error::new(e)),
            "reading /x: No such file"
        );
        let e = E("bad", Some(Box::new(E("bad: really", None))));
        assert_eq!(error_line(&anyhow::Error::new(e)), "bad: really");
    }
}
