//! Resources: the whole XID catalog, and two templates (one XID's entry, one metric's
//! definition) whose arguments `completion/complete` fills in.
use gpulse_proto::metric;
use rmcp::{
    ErrorData,
    model::{ReadResourceResult, Resource, ResourceContents, ResourceTemplate},
};
use serde_json::json;

use crate::{
    complete::{METRIC_TEMPLATE, XID_TEMPLATE},
    tools::xid_info,
};

pub const CATALOG_URI: &str = "telemetry://xid-catalog";

pub fn list() -> Vec<Resource> {
    vec![
        Resource::new(CATALOG_URI, "xid-catalog")
            .with_title("NVIDIA XID catalog")
            .with_description(format!(
                "Every XID code gpulse knows ({}): mnemonic, meaning, default severity, NVIDIA's actions",
                gpulse_xid::catalog::known_codes()
            ))
            .with_mime_type("application/json"),
    ]
}

pub fn templates() -> Vec<ResourceTemplate> {
    vec![
        ResourceTemplate::new(XID_TEMPLATE, "xid")
            .with_title("One XID code")
            .with_description("What an XID code means, its severity and NVIDIA's recommended action")
            .with_mime_type("application/json"),
        ResourceTemplate::new(METRIC_TEMPLATE, "metric")
            .with_title("One GPU metric")
            .with_description(
                "A GPU metric the collector keeps: unit, meaning, its Prometheus gauge (the names gpu_metric_trend takes)",
            )
            .with_mime_type("application/json"),
    ]
}

fn json_body(uri: &str, body: serde_json::Value) -> ReadResourceResult {
    ReadResourceResult::new(vec![
        ResourceContents::text(body.to_string(), uri).with_mime_type("application/json"),
    ])
}

fn not_found(uri: &str, why: &str) -> ErrorData {
    ErrorData::resource_not_found(
        format!(
            "no resource {uri} ({why}); the server has {CATALOG_URI}, {XID_TEMPLATE} and {METRIC_TEMPLATE}"
        ),
        None,
    )
}

/// Reads the catalog or one templated resource.
pub fn read(uri: &str) -> Result<ReadResourceResult, ErrorData> {
    if uri == CATALOG_URI {
        let all = serde_json::to_value(gpulse_xid::catalog::all())
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        return Ok(json_body(uri, all));
    }
    if let Some(code) = uri.strip_prefix("telemetry://xid/") {
        let code: u32 = code
            .parse()
            .map_err(|_| not_found(uri, "an XID code is a number"))?;
        let info = xid_info(code).map_err(|e| not_found(uri, &e))?;
        let body = serde_json::to_value(info)
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        return Ok(json_body(uri, body));
    }
    if let Some(name) = uri.strip_prefix("telemetry://metric/") {
        let (_, m) = metric::by_name(name).ok_or_else(|| not_found(uri, "unknown metric"))?;
        let body =
            json!({"name": m.name, "unit": m.unit, "help": m.help, "prometheus_gauge": m.prom});
        return Ok(json_body(uri, body));
    }
    Err(not_found(uri, "unknown URI"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &ReadResourceResult) -> String {
        match &r.contents[0] {
            ResourceContents::TextResourceContents { text, .. } => text.clone(),
            _ => String::new(),
        }
    }

    #[test]
    fn catalog_and_templates_read_and_refuse() {
        assert!(
            text(&read(CATALOG_URI).unwrap()).contains("ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS")
        );
        let x: serde_json::Value =
            serde_json::from_str(&text(&read("telemetry://xid/79").unwrap())).unwrap();
        assert_eq!(x["name"], "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS");
        let m: serde_json::Value =
            serde_json::from_str(&text(&read("telemetry://metric/power_w").unwrap())).unwrap();
        assert_eq!(m["unit"], "watts");
        assert_eq!(m["prometheus_gauge"], "gpulse_gpu_power_watts");
        for bad in [
            "telemetry://xid/abc",
            "telemetry://xid/999",
            "telemetry://metric/fan",
            "file:///etc/passwd",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        assert_eq!(templates().len(), 2);
    }
}
