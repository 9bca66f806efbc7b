#!/usr/bin/env python3
"""Check the rendered Kubernetes manifests (kubectl kustomize deploy/overlays/*) for what
kubernetes-validate cannot see: the deployment conventions of docs/deploy.md, and the custom
resources (InferencePool of inference.networking.k8s.io/v1, the endpoint picker's config,
HTTPRoute) against each other and against the model-server pods.

Usage: check_deploy.py OVERLAY RENDERED.yaml   (OVERLAY: cpu, cuda or llm-d)
"""

from __future__ import annotations

import sys

import yaml

REQUIRED_SCORERS = {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"}
# The metrics the endpoint picker reads; spindle serves them under these names.
EPP_METRICS = {
    "--total-queued-requests-metric": "vllm:num_requests_waiting",
    "--kv-cache-usage-percentage-metric": "vllm:kv_cache_usage_perc",
}

failures: list[str] = []


def check(cond: bool, what: str) -> None:
    if not cond:
        failures.append(what)


def arg_value(args: list[str], flag: str, default: str | None = None) -> str | None:
    if flag in args:
        i = args.index(flag)
        return args[i + 1] if i + 1 < len(args) else None
    return default


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, name: str) -> dict | None:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    check(len(found) == 1, f"exactly one {kind}/{name} (found {len(found)})")
    return found[0] if found else None


def check_model_server(docs: list[dict], overlay: str) -> dict:
    dep = one(docs, "Deployment", "spindle")
    assert dep is not None
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"]["labels"]
    check(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the Deployment selects its pods")
    check(labels.get("llm-d.ai/inferenceServing") == "true", "pods carry llm-d.ai/inferenceServing=true")
    check("llm-d.ai/model" in labels, "pods carry llm-d.ai/model")
    c = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports.get("http") == 8000, "container port http is 8000")
    check("kv-events" in ports, "the KV-event port is declared")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe, {})
        check(p.get("httpGet", {}).get("path") == "/health", f"{probe} on /health")
    sp = c.get("startupProbe", {})
    check(sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3) >= 600, "the startup probe allows >= 10 min for model load")
    args = c.get("args", [])
    shutdown = float(arg_value(args, "--shutdown-timeout", "30") or 30)
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    check(bool(pre_stop), "a preStop hook delays SIGTERM until routers stopped sending")
    pause = pre_stop.get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(grace > shutdown + pause, f"terminationGracePeriodSeconds ({grace}) > --shutdown-timeout ({shutdown}) + preStop ({pause})")
    check(arg_value(args, "--data-dir") is not None, "batch jobs get a --data-dir")
    check(arg_value(args, "--kv-events-config") is not None, "KV events are published (--kv-events-config)")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    shm = volumes.get(mounts.get("/dev/shm", ""), {})
    check(shm.get("emptyDir", {}).get("medium") == "Memory", "/dev/shm is a memory emptyDir")
    cache = [v for v in volumes.values() if "persistentVolumeClaim" in v]
    check(len(cache) == 1, "a model-cache volume (PVC)")
    if cache:
        one(docs, "PersistentVolumeClaim", cache[0]["persistentVolumeClaim"]["claimName"])
    req = c.get("resources", {}).get("requests", {})
    check("cpu" in req and "memory" in req, "cpu and memory requests")
    if overlay == "cuda":
        check(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == "1", "one GPU per replica")
        check(c["image"].endswith(":cuda"), "the CUDA image")
    if overlay == "cpu":
        check(c["image"].endswith(":cpu"), "the CPU image")
    return dep


def check_llm_d(docs: list[dict], dep: dict) -> None:
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    http_port = next(p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"] if p["name"] == "http")
    pools = by_kind(docs, "InferencePool")
    check(len(pools) == 1, "one InferencePool")
    if not pools:
        return
    pool = pools[0]
    check(pool["apiVersion"] == "inference.networking.k8s.io/v1", "InferencePool is inference.networking.k8s.io/v1")
    spec = pool["spec"]
    check(set(spec) <= {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}, f"InferencePool spec fields are v1's: {sorted(spec)}")
    match = spec.get("selector", {}).get("matchLabels", {})
    check(bool(match) and match.items() <= pod_labels.items(), "the pool selects exactly the model-server pods' labels")
    ports = spec.get("targetPorts", [])
    check(1 <= len(ports) <= 8 and all(set(p) == {"number"} for p in ports), "targetPorts: 1..8 entries of {number}")
    check(bool(ports) and ports[0].get("number") == http_port, "targetPorts[0] is the server's port")
    ref = spec.get("endpointPickerRef", {})
    check(set(ref) <= {"group", "kind", "name", "port", "failureMode"}, "endpointPickerRef fields are v1's")
    check(ref.get("failureMode", "FailClose") in ("FailOpen", "FailClose"), "failureMode is FailOpen or FailClose")
    svc = one(docs, "Service", ref.get("name", ""))
    if svc:
        svc_ports = [p["port"] for p in svc["spec"]["ports"]]
        check(ref.get("port", {}).get("number") in svc_ports, "endpointPickerRef.port is a port of the EPP Service")
        epp = [d for d in by_kind(docs, "Deployment") if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        check(len(epp) == 1, "the EPP Service selects the EPP Deployment")
        if epp:
            args = epp[0]["spec"]["template"]["spec"]["containers"][0]["args"]
            check(arg_value(args, "--pool-name") == pool["metadata"]["name"], "the EPP picks for this pool (--pool-name)")
            for flag, metric in EPP_METRICS.items():
                check(arg_value(args, flag) == metric, f"EPP {flag} {metric}")
            config_path = arg_value(args, "--config-file", "")
            cms = [d for d in by_kind(docs, "ConfigMap") if config_path.rsplit("/", 1)[-1] in d.get("data", {})]
            check(len(cms) == 1, "the EPP config file comes from a ConfigMap")
            if cms:
                cfg = yaml.safe_load(cms[0]["data"][config_path.rsplit("/", 1)[-1]])
                check(cfg.get("apiVersion") == "inference.networking.x-k8s.io/v1alpha1" and cfg.get("kind") == "EndpointPickerConfig", "EndpointPickerConfig v1alpha1")
                plugins = {p.get("name", p["type"]): p for p in cfg.get("plugins", [])}
                check(REQUIRED_SCORERS <= {p["type"] for p in plugins.values()}, "queue, KV-utilisation and prefix-cache scorers")
                for prof in cfg.get("schedulingProfiles", []):
                    for ref_ in prof.get("plugins", []):
                        check(ref_["pluginRef"] in plugins, f"profile {prof['name']} refers to declared plugin {ref_['pluginRef']}")
                prefix = next((p for p in plugins.values() if p["type"] == "prefix-cache-scorer"), {})
                server_args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
                block = int(arg_value(server_args, "--block-size", "16") or 16)
                check(prefix.get("parameters", {}).get("blockSize") == block, "prefix-cache-scorer blockSize = spindle's --block-size")
    routes = by_kind(docs, "HTTPRoute")
    check(any(b.get("kind") == "InferencePool" and b.get("name") == pool["metadata"]["name"] for r in routes for rule in r["spec"]["rules"] for b in rule.get("backendRefs", [])), "an HTTPRoute sends traffic to the pool")


def main() -> None:
    overlay, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    check(len(names) == len(set(names)), "no duplicate resources")
    dep = check_model_server(docs, overlay)
    if overlay == "llm-d":
        check_llm_d(docs, dep)
    if failures:
        print(f"check_deploy {overlay}: {len(failures)} problem(s):")
        for f in failures:
            print(f"  - {f}")
        sys.exit(1)
    print(f"check_deploy {overlay}: {len(docs)} resources ok")


if __name__ == "__main__":
    main()
