//! The real kube client (list + watch with a `spec.nodeName` field selector) against a local HTTP
//! server that serves realistic Pod list and watch JSON, feeding the pod cache that attributes
//! processes (through a fake /proc cgroup file) to pods.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use axum::{Router, body::Body, extract::Query, routing::get};
use gpulse_agent::pods::{self, Attributor, ContainerRef, PodCache};
use serde_json::json;

const ID1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const ID2: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const UID1: &str = "aaaaaaaa-1111-2222-3333-444444444444";
const UID2: &str = "bbbbbbbb-1111-2222-3333-444444444444";

fn pod(name: &str, uid: &str, container: &str, id: &str, rv: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "ml", "uid": uid, "resourceVersion": rv,
            "creationTimestamp": "2026-11-25T06:00:00Z", "labels": {"app": "trainer"}
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": container, "image": "nvcr.io/nvidia/pytorch:24.05-py3",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "containerStatuses": [{
                "name": container, "ready": true, "restartCount": 0, "started": true,
                "image": "nvcr.io/nvidia/pytorch:24.05-py3",
                "imageID": "nvcr.io/nvidia/pytorch@sha256:0123",
                "containerID": format!("containerd://{id}"),
                "state": {"running": {"startedAt": "2026-11-25T06:00:05Z"}}
            }]
        }
    })
}

async fn serve(seen: Arc<Mutex<Vec<HashMap<String, String>>>>) -> std::net::SocketAddr {
    let app = Router::new().route(
        "/api/v1/pods",
        get(move |Query(q): Query<HashMap<String, String>>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(q.clone());
                if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                    // A watch: a pod is added, later the first one is deleted; then the stream idles.
                    let added = json!({"type": "ADDED", "object": pod("late-pod", UID2, "worker", ID2, "11")});
                    let deleted = json!({"type": "DELETED", "object": pod("trainer-0", UID1, "trainer", ID1, "12")});
                    let stream = async_stream(vec![(Duration::from_millis(50), added), (Duration::from_millis(1500), deleted)]);
                    axum::response::Response::new(Body::from_stream(stream))
                } else {
                    let list = json!({
                        "apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": "10"},
                        "items": [pod("trainer-0", UID1, "trainer", ID1, "9")]
                    });
                    axum::response::Response::new(Body::from(list.to_string()))
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Newline-delimited watch events, each after a delay; then the connection stays open a while.
fn async_stream(
    events: Vec<(Duration, serde_json::Value)>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, Infallible>> {
    futures::stream::unfold((events.into_iter(), false), |(mut it, done)| async move {
        match it.next() {
            Some((d, ev)) => {
                tokio::time::sleep(d).await;
                Some((Ok(bytes::Bytes::from(format!("{ev}\n"))), (it, false)))
            }
            None if !done => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Some((Ok(bytes::Bytes::new()), (it, true)))
            }
            None => None,
        }
    })
}

async fn wait_for(what: &str, cache: &Arc<RwLock<PodCache>>, f: impl Fn(&PodCache) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f(&cache.read().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_client_lists_and_watches_this_nodes_pods() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = serve(seen.clone()).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let cache = Arc::new(RwLock::new(PodCache::new(100)));
    tokio::spawn(pods::watch(client, "node-a".into(), cache.clone()));

    let c1 = ContainerRef {
        runtime: "containerd",
        id: ID1.into(),
        pod_uid: None,
    };
    let c2 = ContainerRef {
        runtime: "containerd",
        id: ID2.into(),
        pod_uid: None,
    };
    wait_for("listed and watched pods", &cache, |c| {
        c.lookup(&c1).is_some() && c.lookup(&c2).is_some()
    })
    .await;
    let p = cache.read().unwrap().lookup(&c1).unwrap();
    assert_eq!(
        (
            p.namespace.as_str(),
            p.name.as_str(),
            p.uid.as_str(),
            p.container.as_str()
        ),
        ("ml", "trainer-0", UID1, "trainer")
    );

    // A process whose cgroup says it runs in the late pod's container.
    let proc_root = tempfile::tempdir().unwrap();
    let d = proc_root.path().join("4242");
    std::fs::create_dir_all(&d).unwrap();
    let uid_us = UID2.replace('-', "_");
    std::fs::write(
        d.join("cgroup"),
        format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_us}.slice/cri-containerd-{ID2}.scope\n"),
    )
    .unwrap();
    let a = Attributor::new(cache.clone()).with_proc_root(proc_root.path().to_path_buf());
    let p = a.pod_of(4242).unwrap();
    assert_eq!(
        (
            p.name.as_str(),
            p.container.as_str(),
            p.container_id.as_str()
        ),
        ("late-pod", "worker", ID2)
    );
    assert!(a.pod_of(999_999).is_none(), "no such process");

    // The watch's DELETED removes the first pod.
    wait_for("deletion", &cache, |c| c.lookup(&c1).is_none()).await;

    // Only this node's pods were asked for.
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|q| q.get("fieldSelector").map(String::as_str) == Some("spec.nodeName=node-a")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|q| q.get("watch").is_some()),
        "a watch followed the list: {seen:?}"
    );
}
