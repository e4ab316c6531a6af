"""Validate deploy/: Kubernetes manifests against the official schemas (kubernetes-validate,
strict), the PrometheusRule against the promtool-tested rule file, the security posture the docs
promise, and the Grafana dashboard's shape.

Usage: validate.py REPO_ROOT [KUBECTL]   (KUBECTL renders the kustomizations when given)
       validate.py REPO_ROOT --write-prometheusrule   (regenerate it from the rule file)
"""

import json
import os
import subprocess
import sys

import kubernetes_validate
import yaml

ROOT = sys.argv[1]
KUBECTL = sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].startswith("--") else None
K8S_VERSIONS = ["1.29.0", "1.32.0"]
DEPLOY = os.path.join(ROOT, "deploy")
failures = []


# Node labels that mark a GPU node; the agent must be scheduled on a node with either.
GPU_NODE_LABELS = {
    "nvidia.com/gpu.present": "true",  # NVIDIA GPU feature discovery
    "feature.node.kubernetes.io/pci-10de.present": "true",  # node feature discovery, PCI vendor
}


def node_matches(pod, labels):
    """Whether the pod's nodeSelector and required node affinity admit a node with `labels`
    (the Kubernetes semantics: nodeSelector ANDed with the affinity; terms ORed; expressions
    of a term ANDed)."""
    for k, v in pod.get("nodeSelector", {}).items():
        if labels.get(k) != v:
            return False
    req = (
        pod.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution")
    )
    if not req:
        return True
    for term in req.get("nodeSelectorTerms", []):
        ok = True
        for e in term.get("matchExpressions", []):
            have = labels.get(e["key"])
            op = e["operator"]
            if op == "In":
                ok &= have in e.get("values", [])
            elif op == "NotIn":
                ok &= have not in e.get("values", [])
            elif op == "Exists":
                ok &= have is not None
            elif op == "DoesNotExist":
                ok &= have is None
            else:
                ok = False
        if ok and term.get("matchExpressions"):
            return True
    return False


def check_gpu_node_selection(pod, fail):
    for k, v in GPU_NODE_LABELS.items():
        if not node_matches(pod, {k: v, "kubernetes.io/os": "linux"}):
            fail(f"agent is not scheduled on a GPU node labelled only {k}={v}")
    if node_matches(pod, {"kubernetes.io/os": "linux"}):
        fail("agent is not restricted to GPU nodes")


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg, file=sys.stderr)


def docs_of(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def render(kdir):
    """The kustomization rendered by kubectl, or its resources read directly."""
    if KUBECTL:
        out = subprocess.run([KUBECTL, "kustomize", kdir], check=True, capture_output=True, text=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    k = docs_of(os.path.join(kdir, "kustomization.yaml"))[0]
    docs = []
    for r in k.get("resources", []):
        p = os.path.join(kdir, r)
        if os.path.isdir(p):
            docs += render(p)
        else:
            docs += docs_of(p)
    return docs


def check_crd(d):
    kind = d["kind"]
    spec = d.get("spec", {})
    if kind == "ServiceMonitor":
        if not spec.get("selector") or not spec.get("endpoints"):
            fail("ServiceMonitor needs selector and endpoints")
        for e in spec.get("endpoints", []):
            if e.get("path") != "/metrics" or not e.get("port"):
                fail(f"ServiceMonitor endpoint {e}")
    elif kind == "PrometheusRule":
        groups = spec.get("groups") or []
        if not groups:
            fail("PrometheusRule has no groups")
        source = docs_of(os.path.join(DEPLOY, "prometheus", "gpulse-rules.yaml"))[0]
        if spec != source:
            fail("PrometheusRule spec differs from deploy/prometheus/gpulse-rules.yaml (regenerate it)")
    elif kind == "Issuer":
        if len([k for k in ("selfSigned", "ca") if k in spec]) != 1:
            fail(f"Issuer {d['metadata']['name']} needs exactly one of selfSigned, ca")
    elif kind == "Certificate":
        if not spec.get("secretName") or not spec.get("issuerRef", {}).get("name"):
            fail(f"Certificate {d['metadata']['name']} needs secretName and issuerRef")
        if not spec.get("isCA") and not spec.get("dnsNames"):
            fail(f"Certificate {d['metadata']['name']} needs dnsNames")
    else:
        fail(f"unknown custom kind {kind}")


def check_posture(docs):
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    ds = by.get(("DaemonSet", "gpulse-agent"))
    if not ds:
        return fail("no agent DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = pod["containers"][0]
    sc = c.get("securityContext", {})
    if sc.get("privileged"):
        fail("agent must not be privileged")
    caps = sc.get("capabilities", {})
    if sorted(caps.get("add", [])) != ["BPF", "PERFMON", "SYSLOG"] or caps.get("drop") != ["ALL"]:
        fail(f"agent capabilities {caps}")
    if not pod.get("hostPID"):
        fail("agent needs hostPID")
    if sc.get("allowPrivilegeEscalation") is not False or not sc.get("readOnlyRootFilesystem"):
        fail("agent securityContext")
    for p in ("livenessProbe", "readinessProbe", "startupProbe"):
        if p not in c:
            fail(f"agent lacks {p}")
    if "limits" not in c.get("resources", {}):
        fail("agent lacks resource limits")
    check_gpu_node_selection(pod, fail)
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    for m in ("/sys/kernel/tracing", "/sys/fs/cgroup"):
        if m not in mounts:
            fail(f"agent does not mount {m}")
    sts = by.get(("StatefulSet", "gpulse-collector"))
    if not sts:
        return fail("no collector StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        fail("collector must run as non-root")
    if not sts["spec"].get("volumeClaimTemplates"):
        fail("collector has no volume for --data-dir")
    args = " ".join(pod["containers"][0]["args"])
    if "--data-dir=/var/lib/gpulse" not in args:
        fail("collector --data-dir")
    check_trust(by, ds, sts)
    check_fleet(by, ds, sts)
    role = by.get(("ClusterRole", "gpulse-agent-read-pods"))
    if not role or role["rules"] != [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]:
        fail(f"agent RBAC must be read-only on pods: {role and role['rules']}")
    for kind in ("NetworkPolicy", "Service", "ServiceMonitor", "PrometheusRule", "Namespace"):
        if not any(k == kind for k, _ in by):
            fail(f"no {kind}")


def check_trust(by, ds, sts):
    """What docs/security.md promises of the manifests: TLS, authenticated agents bound to their
    node, no unauthenticated listener, and a narrowed NetworkPolicy."""
    agent = ds["spec"]["template"]["spec"]
    args = agent["containers"][0]["args"]
    if not any(a.startswith("--collector=https://") for a in args):
        fail("agent must reach the collector over https://")
    if not any(a.startswith("--token-file=") for a in args) or not any(a.startswith("--ca-file=") for a in args):
        fail("agent needs --token-file and --ca-file")
    tokens = [
        src["serviceAccountToken"]
        for v in agent.get("volumes", [])
        for src in v.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in src
    ]
    if not tokens or tokens[0].get("audience") != "gpulse" or tokens[0].get("expirationSeconds", 0) > 3600:
        fail(f"agent needs a projected token with audience gpulse expiring within 1h: {tokens}")
    cargs = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    for flag in ("--tls-cert=", "--tls-key=", "--auth-jwks="):
        if not any(a.startswith(flag) for a in cargs):
            fail(f"collector lacks {flag}")
    if any("allow-unauthenticated" in a for a in cargs):
        fail("collector must not allow unauthenticated calls")
    np = by.get(("NetworkPolicy", "gpulse-collector"))
    for rule in (np or {}).get("spec", {}).get("ingress", []):
        for peer in rule.get("from", [{}]):
            if peer.get("namespaceSelector") == {} and not peer.get("podSelector"):
                fail("collector NetworkPolicy admits every namespace")
    cert = by.get(("Certificate", "gpulse-collector"))
    if cert and cert["spec"]["secretName"] != "gpulse-collector-tls":
        fail("the collector's Certificate must write the Secret the StatefulSet mounts")


def check_fleet(by, ds, sts):
    """Sharded collectors behind a gateway (docs/scale.md): agents find every shard through the
    headless Service, the gateway asks each replica by its own name, both stay available."""
    replicas = sts["spec"].get("replicas", 1)
    if replicas < 2:
        fail("the collector StatefulSet should run shards (replicas >= 2)")
    headless = by.get(("Service", sts["spec"]["serviceName"]))
    if not headless or headless["spec"].get("clusterIP") != "None":
        fail("the StatefulSet's serviceName must be a headless Service")
    host = f"{sts['spec']['serviceName']}.{sts['metadata']['namespace']}.svc"
    aargs = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    if f"--collector=https://{host}:7700" not in aargs or "--shard-discovery=dns" not in aargs:
        fail(f"agents must discover shards through {host} (--shard-discovery=dns): {aargs}")
    gw = by.get(("Deployment", "gpulse-gateway"))
    if not gw:
        return fail("no gateway Deployment")
    if gw["spec"].get("replicas", 1) < 2:
        fail("the gateway should run 2 replicas")
    pdb = by.get(("PodDisruptionBudget", "gpulse-gateway"))
    if not pdb or pdb["spec"]["selector"]["matchLabels"] != gw["spec"]["selector"]["matchLabels"]:
        fail("the gateway needs a PodDisruptionBudget selecting it")
    gargs = gw["spec"]["template"]["spec"]["containers"][0]["args"]
    if gargs[0] != "gateway":
        fail("the gateway runs `gpulse-collector gateway`")
    ups = [a.split("=", 1)[1] for a in gargs if a.startswith("--upstream=")]
    want = [
        f"{sts['metadata']['name']}-{i}=https://{sts['metadata']['name']}-{i}.{host}:7700"
        for i in range(replicas)
    ]
    if ups != want:
        fail(f"gateway upstreams {ups} must be the StatefulSet's {replicas} replicas {want}")
    for flag in ("--tls-cert=", "--ca-file=", "--token-file=", "--auth-tokens="):
        if not any(a.startswith(flag) for a in gargs):
            fail(f"gateway lacks {flag}")
    cargs = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    if "--auth-reader-service-account=gpulse:gpulse-gateway" not in cargs:
        fail("the collectors must accept the gateway's service account as a reader")
    cert = by.get(("Certificate", "gpulse-collector"))
    if cert:
        names = cert["spec"]["dnsNames"]
        for n in (host, f"*.{host}", "gpulse-gateway.gpulse.svc"):
            if n not in names:
                fail(f"the certificate lacks {n}")


def check_image_version():
    """The base runs the image `cargo xtask image` builds: gpulse/gpulse at the workspace version."""
    import re
    with open(os.path.join(ROOT, "Cargo.toml")) as f:
        m = re.search(r'\[workspace\.package\][^\[]*?\nversion = "([^"]+)"', f.read())
    version = m.group(1) if m else None
    k = docs_of(os.path.join(DEPLOY, "kubernetes", "base", "kustomization.yaml"))[0]
    tags = {i["name"]: i.get("newTag") for i in k.get("images", [])}
    if tags.get("gpulse/gpulse") != version:
        fail(f"kustomize base image tag {tags.get('gpulse/gpulse')} is not the workspace version {version}")


def check_dashboard():
    path = os.path.join(DEPLOY, "grafana", "gpulse-dashboard.json")
    with open(path) as f:
        d = json.load(f)
    panels = d.get("panels", [])
    if len(panels) < 6:
        fail("dashboard has too few panels")
    exprs = []
    for p in panels:
        for t in p.get("targets", []):
            if "gpulse_" not in t.get("expr", ""):
                fail(f"panel {p.get('title')} target without a gpulse metric: {t}")
            exprs.append(t.get("expr", ""))
    check_metric_names(exprs, "dashboard")


HEADER = """# Generated from deploy/prometheus/gpulse-rules.yaml (the promtool-tested source) by
# `tests/deploy/validate.py . --write-prometheusrule`; the test command checks they match.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: gpulse
  namespace: gpulse
  labels: {app.kubernetes.io/name: gpulse-collector, app.kubernetes.io/part-of: gpulse}
spec:
"""


def write_prometheusrule():
    with open(os.path.join(DEPLOY, "prometheus", "gpulse-rules.yaml")) as f:
        body = [l for l in f.read().splitlines() if not l.startswith("#")]
    text = HEADER + "\n".join("  " + l if l.strip() else l for l in body) + "\n"
    with open(os.path.join(DEPLOY, "kubernetes", "base", "prometheusrule.yaml"), "w") as f:
        f.write(text)


def known_metrics():
    """Every gpulse_* metric name the collector's source declares (its own families, and the
    GPU gauges named in the contract's metric catalog)."""
    import re
    names = set()
    for src in (os.path.join(ROOT, "collector", "src"), os.path.join(ROOT, "proto", "src")):
        for dirpath, _, files in os.walk(src):
            for fn in files:
                if fn.endswith(".rs"):
                    with open(os.path.join(dirpath, fn)) as f:
                        names |= set(re.findall(r'"(gpulse_[a-z0-9_]+)"', f.read()))
    return names


def check_metric_names(exprs, where):
    import re
    known = known_metrics()
    for e in exprs:
        for m in re.findall(r"gpulse_[a-z0-9_]+", e):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            if m not in known and base not in known:
                fail(f"{where}: {m} is not a metric the collector exports")


def main():
    if "--write-prometheusrule" in sys.argv:
        write_prometheusrule()
        return
    rules = docs_of(os.path.join(DEPLOY, "prometheus", "gpulse-rules.yaml"))[0]
    check_metric_names([r["expr"] for g in rules["groups"] for r in g["rules"]], "alert rules")
    total = 0
    for kdir in ("kubernetes/base", "kubernetes/overlays/example"):
        docs = render(os.path.join(DEPLOY, kdir))
        for d in docs:
            total += 1
            if d["apiVersion"].startswith(("monitoring.coreos.com/", "cert-manager.io/")):
                check_crd(d)
                continue
            for v in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(d, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    fail(f"{kdir} {d['kind']}/{d['metadata']['name']} (k8s {v}): {e.message} at {list(e.path)}")
                except Exception as e:  # noqa: BLE001 - any schema problem is a failure
                    fail(f"{kdir} {d['kind']}/{d['metadata']['name']} (k8s {v}): {e}")
        check_posture(docs)
    check_dashboard()
    check_image_version()
    print(json.dumps({"documents": total, "kubernetes_versions": K8S_VERSIONS, "failures": len(failures)}))
    sys.exit(1 if failures else 0)


main()
