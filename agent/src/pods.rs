//! Pod attribution: pid -> `/proc/<pid>/cgroup` -> container id -> pod, from a cache of the pods
//! on this node that the kube client lists and watches (`spec.nodeName` field selector).
//!
//! Without Kubernetes (no kubeconfig, not in a cluster) attribution is off and the agent says so
//! once. The cache is bounded; containers over the bound are counted and left unattributed.
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use futures::StreamExt;
use gpulse_proto::v1::PodRef;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::watcher::{self, Event},
};
use tracing::{info, warn};

/// A container found in a cgroup path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRef {
    /// `containerd`, `cri-o`, `docker`, or `unknown` (cgroupfs layouts do not say).
    pub runtime: &'static str,
    pub id: String,
    /// The pod UID when the path names one (`pod<uid>` / `...-pod<uid_with_underscores>.slice`).
    pub pod_uid: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses the text of `/proc/<pid>/cgroup` (cgroup v2 `0::/path` or v1 `N:ctrl:/path` lines;
/// systemd and cgroupfs drivers; containerd, CRI-O and Docker).
pub fn parse_cgroup(text: &str) -> Option<ContainerRef> {
    let mut paths: Vec<&str> = text
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .collect();
    // Prefer the unified (v2) line, then any path that looks like a container.
    paths.sort_by_key(|p| !text.lines().any(|l| l.starts_with("0::") && l.ends_with(p)));
    for path in paths {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let pod_uid = segs.iter().find_map(|s| pod_uid_of(s));
        let Some(last) = segs.last() else { continue };
        let name = last.strip_suffix(".scope").unwrap_or(last);
        let found = [
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("docker-", "docker"),
        ]
        .iter()
        .find_map(|(prefix, rt)| {
            name.strip_prefix(prefix)
                .filter(|id| is_container_id(id))
                .map(|id| (*rt, id))
        })
        .or_else(|| {
            is_container_id(name).then(|| {
                let rt = if segs.contains(&"docker") {
                    "docker"
                } else {
                    "unknown"
                };
                (rt, name)
            })
        });
        if let Some((runtime, id)) = found {
            return Some(ContainerRef {
                runtime,
                id: id.to_string(),
                pod_uid,
            });
        }
    }
    None
}

fn pod_uid_of(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".slice").unwrap_or(seg);
    let at = seg.rfind("pod")?;
    let uid = &seg[at + 3..];
    let uid = uid.replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

/// `containerd://<id>` -> `<id>`.
fn strip_runtime(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, i)| i)
}

#[derive(Debug, Default)]
pub struct PodCache {
    by_container: HashMap<String, PodRef>,
    /// Pod UID -> (namespace, name), for containers not yet in the pod's status.
    by_uid: HashMap<String, (String, String)>,
    max_containers: usize,
    pub over_limit: u64,
}

impl PodCache {
    pub fn new(max_containers: usize) -> Self {
        Self {
            max_containers,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.by_container.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_container.is_empty()
    }

    /// Adds or refreshes a pod's containers.
    pub fn apply(&mut self, pod: &Pod) {
        let (Some(ns), Some(name), Some(uid)) = (
            &pod.metadata.namespace,
            &pod.metadata.name,
            &pod.metadata.uid,
        ) else {
            return;
        };
        self.delete(pod);
        self.by_uid.insert(uid.clone(), (ns.clone(), name.clone()));
        let statuses = pod.status.iter().flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        });
        for cs in statuses {
            let Some(cid) = &cs.container_id else {
                continue;
            };
            if self.by_container.len() >= self.max_containers {
                self.over_limit += 1;
                continue;
            }
            let id = strip_runtime(cid).to_string();
            self.by_container.insert(
                id.clone(),
                PodRef {
                    namespace: ns.clone(),
                    name: name.clone(),
                    uid: uid.clone(),
                    container: cs.name.clone(),
                    container_id: id,
                },
            );
        }
    }

    pub fn delete(&mut self, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            self.by_container.retain(|_, p| p.uid != *uid);
            self.by_uid.remove(uid);
        }
    }

    pub fn clear(&mut self) {
        self.by_container.clear();
        self.by_uid.clear();
    }

    /// The pod of a container, by id, or by the pod UID in its cgroup path.
    pub fn lookup(&self, c: &ContainerRef) -> Option<PodRef> {
        if let Some(p) = self.by_container.get(&c.id) {
            return Some(p.clone());
        }
        let uid = c.pod_uid.as_ref()?;
        let (ns, name) = self.by_uid.get(uid)?;
        Some(PodRef {
            namespace: ns.clone(),
            name: name.clone(),
            uid: uid.clone(),
            container: String::new(),
            container_id: c.id.clone(),
        })
    }
}

/// Shared attribution state: the cache plus where /proc is.
#[derive(Clone)]
pub struct Attributor {
    cache: Arc<RwLock<PodCache>>,
    proc_root: std::path::PathBuf,
}

impl Attributor {
    pub fn new(cache: Arc<RwLock<PodCache>>) -> Self {
        Self {
            cache,
            proc_root: "/proc".into(),
        }
    }

    pub fn with_proc_root(mut self, root: std::path::PathBuf) -> Self {
        self.proc_root = root;
        self
    }

    /// The pod `pid` runs in, now. `None` for host processes, gone processes or unknown pods.
    pub fn pod_of(&self, pid: u32) -> Option<PodRef> {
        let text =
            std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        let c = parse_cgroup(&text)?;
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache.lookup(&c)
    }
}

/// Lists and watches this node's pods into `cache` until the stream ends (it retries with
/// backoff on errors, so in practice until the agent stops).
pub async fn watch(client: Client, node: String, cache: Arc<RwLock<PodCache>>) {
    let api: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher::watcher(api, cfg).boxed();
    let mut warned = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                warned = false;
                let mut c = cache.write().unwrap_or_else(|e| e.into_inner());
                match ev {
                    Event::Init => c.clear(),
                    Event::InitApply(p) | Event::Apply(p) => c.apply(&p),
                    Event::Delete(p) => c.delete(&p),
                    Event::InitDone => {
                        info!(node = %node, containers = c.len(), "pod cache synced")
                    }
                }
            }
            Err(e) => {
                if !warned {
                    warn!(error = %e, "watching pods failed; attribution uses the last known pods while retrying");
                    warned = true;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c7e9a4b2d8f6e0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b7";

    #[test]
    fn parses_every_runtime_and_driver() {
        let uid = "8f7e6d5c-4b3a-2918-0716-253443526170";
        let uid_us = uid.replace('-', "_");
        for (text, runtime, pod) in [
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_us}.slice/cri-containerd-{ID}.scope\n"
                ),
                "containerd",
                true,
            ),
            (
                format!("0::/kubepods.slice/kubepods-pod{uid_us}.slice/crio-{ID}.scope\n"),
                "cri-o",
                true,
            ),
            (
                format!(
                    "12:memory:/kubepods/burstable/pod{uid}/{ID}\n11:cpu,cpuacct:/kubepods/burstable/pod{uid}/{ID}\n"
                ),
                "unknown",
                true,
            ),
            (
                format!("0::/system.slice/docker-{ID}.scope\n"),
                "docker",
                false,
            ),
            (format!("4:devices:/docker/{ID}\n"), "docker", false),
        ] {
            let c = parse_cgroup(&text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!((c.runtime, c.id.as_str()), (runtime, ID), "{text}");
            assert_eq!(c.pod_uid.as_deref(), pod.then_some(uid), "{text}");
        }
        assert_eq!(
            parse_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"),
            None
        );
        assert_eq!(parse_cgroup(""), None);
        assert_eq!(parse_cgroup("garbage"), None);
    }

    fn pod(name: &str, uid: &str, containers: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ml", "uid": uid},
            "status": {"containerStatuses": containers.iter().map(|(n, id)| serde_json::json!({
                "name": n, "containerID": format!("containerd://{id}"), "image": "x", "imageID": "y",
                "ready": true, "restartCount": 0
            })).collect::<Vec<_>>()}
        }))
        .unwrap()
    }

    #[test]
    fn cache_applies_deletes_and_bounds() {
        let mut c = PodCache::new(2);
        let uid = "8f7e6d5c-4b3a-2918-0716-253443526170";
        c.apply(&pod("trainer-0", uid, &[("trainer", ID)]));
        let r = ContainerRef {
            runtime: "containerd",
            id: ID.into(),
            pod_uid: None,
        };
        let p = c.lookup(&r).unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.container.as_str()),
            ("ml", "trainer-0", "trainer")
        );
        // Unknown container id, but the cgroup path names the pod.
        let other = ContainerRef {
            runtime: "containerd",
            id: "f".repeat(64),
            pod_uid: Some(uid.into()),
        };
        assert_eq!(c.lookup(&other).unwrap().name, "trainer-0");
        c.apply(&pod(
            "big",
            "00000000-0000-0000-0000-000000000001",
            &[("a", &"a".repeat(64)), ("b", &"b".repeat(64))],
        ));
        assert_eq!(c.len(), 2);
        assert_eq!(c.over_limit, 1);
        c.delete(&pod("trainer-0", uid, &[]));
        assert!(c.lookup(&r).is_none());
    }
}
