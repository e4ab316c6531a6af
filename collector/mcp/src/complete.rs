//! Argument completion (`completion/complete`) for the prompts and the resource templates: node
//! names for `triage_node`, window forms for every `since`, XID codes and metric names for the
//! templates. Ranked (prefix matches first, then the rest that contain the typed text) and bounded
//! to the protocol's 100 values, with the total and `hasMore` when there were more. A reference
//! or argument this server has no values for gets an empty list, not an error: the spec's
//! conformance suite asks for that, and a client typing into a field is better served by no
//! suggestions than by a failure.
use gpulse_proto::metric;
use gpulse_xid::catalog;
use rmcp::{
    ErrorData,
    model::{ArgumentInfo, CompletionInfo, Reference},
};

use crate::source::Source;

/// The resource templates: one XID's catalog entry, one metric's definition.
pub const XID_TEMPLATE: &str = "telemetry://xid/{code}";
pub const METRIC_TEMPLATE: &str = "telemetry://metric/{name}";

/// Window forms offered for `since` (any duration, `now-<duration>` or RFC 3339 is accepted).
const WINDOWS: [&str; 8] = ["5m", "15m", "1h", "6h", "24h", "7d", "now-1h", "now-24h"];

/// `candidates` that start with `typed` (case-insensitive), then those that merely contain it,
/// each group in the given order; at most [`CompletionInfo::MAX_VALUES`].
pub fn rank(typed: &str, candidates: impl IntoIterator<Item = String>) -> CompletionInfo {
    let t = typed.to_ascii_lowercase();
    let (mut prefix, mut within) = (Vec::new(), Vec::new());
    for c in candidates {
        let l = c.to_ascii_lowercase();
        if l.starts_with(&t) {
            prefix.push(c);
        } else if l.contains(&t) {
            within.push(c);
        }
    }
    prefix.extend(within);
    let total = prefix.len();
    prefix.truncate(CompletionInfo::MAX_VALUES);
    let more = total > prefix.len();
    // Never more than MAX_VALUES here, so this cannot fail.
    CompletionInfo::with_pagination(prefix, Some(total as u32), more).unwrap_or_default()
}

/// Completions for one argument of a prompt or resource template.
pub async fn complete(
    source: &Source,
    r: &Reference,
    arg: &ArgumentInfo,
) -> Result<CompletionInfo, ErrorData> {
    let typed = arg.value.as_str();
    match (r, arg.name.as_str()) {
        (Reference::Prompt(p), "node") if p.name == "triage_node" => {
            let nodes = source
                .nodes(None)
                .await
                .map_err(|e| ErrorData::internal_error(e, None))?;
            let mut names: Vec<String> = nodes.nodes.into_iter().map(|n| n.node).collect();
            names.sort();
            Ok(rank(typed, names))
        }
        (Reference::Prompt(p), "since")
            if p.name == "triage_node" || p.name == "fleet_health_report" =>
        {
            Ok(rank(typed, WINDOWS.iter().map(|w| w.to_string())))
        }
        (Reference::Resource(t), "code") if t.uri == XID_TEMPLATE => Ok(rank(
            typed,
            catalog::all().iter().map(|i| i.code.to_string()),
        )),
        (Reference::Resource(t), "name") if t.uri == METRIC_TEMPLATE => Ok(rank(
            typed,
            metric::METRICS.iter().map(|m| m.name.to_string()),
        )),
        _ => Ok(rank(typed, Vec::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_rank_first_and_the_list_is_bounded() {
        let c = rank(
            "gpu-1",
            ["gpu-10", "a-gpu-1", "gpu-1", "cpu-1"].map(String::from),
        );
        assert_eq!(c.values, vec!["gpu-10", "gpu-1", "a-gpu-1"]);
        assert_eq!((c.total, c.has_more), (Some(3), Some(false)));
        let many = rank("", (0..250).map(|i| i.to_string()));
        assert_eq!(many.values.len(), CompletionInfo::MAX_VALUES);
        assert_eq!((many.total, many.has_more), (Some(250), Some(true)));
        let codes = rank("7", catalog::all().iter().map(|i| i.code.to_string()));
        assert_eq!(codes.values[0], "7");
        assert!(codes.values.contains(&"79".to_string()));
        assert!(codes.values.iter().all(|v| v.contains('7')));
    }
}
