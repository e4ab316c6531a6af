//! `list_gpu_processes`: GPU processes of a window, from the collector's Processes.
use gpulse_proto::v1::{self, ProcessState, ProcessesRequest};
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{fit, limit, offset_cursor, one, opt, pod_name, stamp, ts, tw, window_of, wire};
use crate::{
    GpulseMcp,
    types::Clusters,
    types::{ListProcesses, ListProcessesArgs, ProcessRow, Sources},
};

pub(crate) fn process_row(p: &v1::ProcessInfo) -> ProcessRow {
    ProcessRow {
        node: p.node.clone(),
        pid: p.pid,
        name: p.name.clone(),
        exe: opt(&p.exe),
        devices: p.devices.clone(),
        started: ts(&p.started),
        ended: ts(&p.ended),
        running: p.running,
        pod: pod_name(&p.pod),
        gpu_mem_bytes: None,
    }
}

/// The device node a `gpu` argument names: an index is `/dev/nvidia<index>`.
fn device_of(gpu: &str) -> String {
    let gpu = gpu.to_ascii_lowercase();
    if !gpu.is_empty() && gpu.chars().all(|c| c.is_ascii_digit()) {
        format!("/dev/nvidia{gpu}")
    } else {
        gpu
    }
}

#[tool_router(router = processes_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// GPU processes seen in a window (from the kernel: opens of GPU devices, exec, exit), with
    /// their pod, devices, start and end. `state` picks running, exited or all.
    #[tool(name = "list_gpu_processes", title = "List GPU processes")]
    async fn list_gpu_processes(
        &self,
        Parameters(a): Parameters<ListProcessesArgs>,
    ) -> Result<Json<ListProcesses>, String> {
        let src = self.source.scoped(&a.clusters()).await?;
        let limit = limit(a.limit, 50, 500)?;
        let offset = offset_cursor(&a.cursor)?;
        let (w, defaulted) = tw(&a.since, "", "1h");
        let r = src
            .processes(ProcessesRequest {
                window: Some(w),
                nodes: one(&a.node),
                state: wire::<ProcessState>(a.state) as i32,
                device: device_of(&a.gpu),
                offset: u32::try_from(offset).unwrap_or(u32::MAX),
                limit,
            })
            .await?;
        let total = r.total_matched as usize;
        let mut hints = r.hints.clone();
        if total == 0 {
            hints.push("no GPU process in this window matched; process events need the agent's eBPF source".to_string());
        }
        if a.gpu.to_ascii_lowercase().starts_with("gpu-") {
            hints.push("processes are tracked by the device node they open (/dev/nvidiaN); pass the GPU index".to_string());
        }
        let page: Vec<ProcessRow> = r.processes.iter().map(process_row).collect();
        let next = super::next_offset(offset, page.len(), total);
        let mut out = ListProcesses {
            window: window_of(&r.window, defaulted),
            truncated: next.is_some() || r.truncated,
            processes: page,
            total_matched: total as u32,
            next_cursor: next,
            hints,
            sources: Default::default(),
        };
        if fit(
            &mut out,
            |o| o.processes.len(),
            |o, n| o.processes.truncate(n),
        )
        .is_some()
        {
            out.truncated = true;
            out.next_cursor = Some(format!("o1.{}", offset + out.processes.len()));
        }
        stamp(
            Sources::of(&r.upstreams, r.partial),
            &mut out.sources,
            &mut out.hints,
        );
        Ok(Json(out))
    }
}

#[cfg(test)]
mod tests {
    use gpulse_proto::v1::{PodRef, ProcessInfo, ProcessesResponse};
    use serde_json::json;

    use super::*;
    use crate::tools::testing::{Answers, Session, at, window};

    #[test]
    fn an_index_names_its_device_node() {
        assert_eq!(device_of("3"), "/dev/nvidia3");
        assert_eq!(device_of("/dev/NVIDIA1"), "/dev/nvidia1");
        assert_eq!(device_of(""), "");
    }

    #[tokio::test]
    async fn maps_filters_pages_and_rows() {
        let s = Session::new(Answers {
            processes: ProcessesResponse {
                window: window(),
                processes: vec![ProcessInfo {
                    node: "gpu-1".into(),
                    pid: 42,
                    name: "python3".into(),
                    devices: vec!["/dev/nvidia0".into()],
                    started: at(10),
                    ended: at(20),
                    pod: Some(PodRef {
                        namespace: "ml".into(),
                        name: "trainer-0".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                total_matched: 3,
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let v = s
            .ok(
                "list_gpu_processes",
                json!({"node": "gpu-1", "gpu": "0", "state": "exited", "limit": 1, "cursor": "o1.1"}),
            )
            .await;
        let asked = &s.fake.asked("Processes")[0];
        for want in [
            "device: \"/dev/nvidia0\"",
            "state: Exited",
            "offset: 1",
            "limit: 1",
            "nodes: [\"gpu-1\"]",
        ] {
            assert!(asked.contains(want), "{want} in {asked}");
        }
        assert_eq!(v["processes"][0]["pod"], "ml/trainer-0");
        assert!(!v["processes"][0]["ended"].is_null());
        assert_eq!(v["next_cursor"], "o1.2");
        assert_eq!(v["total_matched"], 3);
        let v = s.ok("list_gpu_processes", json!({"gpu": "GPU-abc"})).await;
        assert!(v["hints"].to_string().contains("pass the GPU index"));
        assert!(
            s.fake.asked("Processes")[1].contains("state: Unspecified"),
            "all by default"
        );
    }
}
