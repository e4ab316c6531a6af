//! What may become a store key or a Prometheus label value. Node names, GPU UUIDs, PCI addresses
//! and GPU model names arrive from agents; before they key node state and sample history or
//! label `/metrics` they are checked for format and length here, so junk from a broken or hostile
//! sender is refused (with the reason) instead of inflating `/metrics` or the store's tables.
use gpulse_proto::v1::{self, event::Payload};
use gpulse_xid::Bdf;

/// Longest node name: a DNS subdomain (Kubernetes node names are one).
pub const MAX_NODE: usize = 253;
/// Longest GPU UUID (`GPU-` + 36, MIG UUIDs somewhat longer).
pub const MAX_UUID: usize = 96;
/// Longest GPU model name (`NVIDIA H100 80GB HBM3` is 21).
pub const MAX_MODEL: usize = 128;

/// A node name: letters, digits, `.`, `-`, `_`, starting with a letter or digit.
pub fn node(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= MAX_NODE
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    ok.then_some(()).ok_or_else(|| {
        format!(
            "{:?} is not a node name (1-{MAX_NODE} letters, digits, '.', '-', '_')",
            clip(s)
        )
    })
}

/// A GPU UUID as NVML gives it (`GPU-...`, `MIG-...`), or empty.
pub fn uuid(s: &str) -> Result<(), String> {
    let ok = s.len() <= MAX_UUID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b));
    ok.then_some(()).ok_or_else(|| {
        format!(
            "{:?} is not a GPU UUID (at most {MAX_UUID} letters, digits, '-', '_', '.', '/', ':')",
            clip(s)
        )
    })
}

/// A PCI address (`dddd:bb:dd.f` in any of the driver's spellings), or empty.
pub fn pci(s: &str) -> Result<(), String> {
    if s.is_empty() || (s.len() <= 16 && Bdf::parse(s).is_ok()) {
        return Ok(());
    }
    Err(format!("{:?} is not a PCI address (dddd:bb:dd.f)", clip(s)))
}

/// The device as the kernel spelled it (`PCI:0000:3b:00`, or whatever a driver prints), or
/// empty. It keys a GPU's verdict when the address does not parse and labels
/// `gpulse_gpu_health_state`, so it is held to a label-safe token (issue 27 #8: 64 KiB values
/// grew `/metrics` to 94 MiB).
pub fn pci_raw(s: &str) -> Result<(), String> {
    let ok = s.len() <= gpulse_proto::bounds::MAX_SHORT
        && s.bytes().all(gpulse_proto::bounds::device_name_byte);
    ok.then_some(()).ok_or_else(|| {
        format!(
            "{:?} is not a device name (at most {} printable characters, no quotes, braces, '=' or ',')",
            clip(s),
            gpulse_proto::bounds::MAX_SHORT
        )
    })
}

/// A GPU model name: printable, no control characters, or empty.
pub fn model(s: &str) -> Result<(), String> {
    if s.len() <= MAX_MODEL && !s.chars().any(char::is_control) {
        return Ok(());
    }
    Err(format!(
        "{:?} is not a GPU model name (at most {MAX_MODEL} bytes, no control characters)",
        clip(s)
    ))
}

/// A bad value shown in an error, cut so the error stays short.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The label and key fields of an event's payload, checked; the error names the field.
pub fn check_payload(p: &Payload) -> Result<(), String> {
    let field = |name: &str, r: Result<(), String>| r.map_err(|e| format!("{name}: {e}"));
    match p {
        Payload::Xid(x) => {
            field("xid.gpu_uuid", uuid(&x.gpu_uuid))?;
            field("xid.pci", pci(&x.pci))?;
            field("xid.pci_raw", pci_raw(&x.pci_raw))
        }
        Payload::Sxid(x) => {
            field("sxid.pci", pci(&x.pci))?;
            field("sxid.pci_raw", pci_raw(&x.pci_raw))
        }
        Payload::DriverLog(d) => {
            field("driver_log.gpu_uuid", uuid(&d.gpu_uuid))?;
            field("driver_log.pci", pci(&d.pci))
        }
        Payload::GpuSample(g) => check_sample(g),
        // Verdicts are the collector's own: an agent's would be a forgery.
        Payload::GpuHealth(_) => {
            Err("gpu_health: written by the collector, never by an agent".into())
        }
        Payload::AgentStatus(_) | Payload::Gap(_) | Payload::GpuProcess(_) => Ok(()),
    }
}

fn check_sample(g: &v1::GpuSample) -> Result<(), String> {
    uuid(&g.uuid).map_err(|e| format!("gpu_sample.uuid: {e}"))?;
    pci(&g.pci).map_err(|e| format!("gpu_sample.pci: {e}"))?;
    model(&g.name).map_err(|e| format!("gpu_sample.name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_values_pass_and_junk_is_refused() {
        for n in ["gpu-node-1", "ip-10-0-1-7.ec2.internal", "dgx_a100_03", "n"] {
            assert!(node(n).is_ok(), "{n}");
        }
        for n in [
            "",
            "-lead",
            "has space",
            "näme",
            "a{b}",
            &"x".repeat(254),
            "a\"b",
        ] {
            assert!(node(n).is_err(), "{n:?}");
        }
        for u in [
            "",
            "GPU-0",
            "GPU-5bd0b7a4-4b1a-6e24-7c46-3a3cf1b8e9f7",
            "MIG-GPU-5bd0b7a4/1/0",
        ] {
            assert!(uuid(u).is_ok(), "{u}");
        }
        for u in ["GPU 0", "GPU-0\"}", &"a".repeat(97)] {
            assert!(uuid(u).is_err(), "{u:?}");
        }
        for p in [
            "",
            "0000:3b:00.0",
            "00000000:3B:00.0",
            "0000:3b:00",
            "3b:00.0",
        ] {
            assert!(pci(p).is_ok(), "{p}");
        }
        for p in [
            "junk",
            "0000:3b:00.9",
            "0000:zz:00.0",
            "0000:3b:00.0\n{evil=\"1\"}",
        ] {
            assert!(pci(p).is_err(), "{p:?}");
        }
        for r in ["", "PCI:0000:91:00", "PCI:...", "0000:3b:00.0"] {
            assert!(pci_raw(r).is_ok(), "{r}");
        }
        for r in ["PCI:0\"} 1", "a b", "x{y}", &"P".repeat(65), "\u{e9}"] {
            assert!(pci_raw(r).is_err(), "{r:?}");
        }
        assert!(model("NVIDIA H100 80GB HBM3").is_ok());
        assert!(model("bad\nmodel").is_err());
        let e = check_payload(&Payload::Xid(v1::Xid {
            pci: "nope".into(),
            ..Default::default()
        }))
        .unwrap_err();
        assert!(
            e.starts_with("xid.pci: \"nope\" is not a PCI address"),
            "{e}"
        );
    }
}
