#!/usr/bin/env python3
"""spindle replicas behind vLLM's router (vllm-router from PyPI), on loopback.

Starts three `spindle serve` replicas publishing KV events (PYTHONHASHSEED=42), then for each
policy (round_robin, cache_aware, kv_aware) a router in front of them, and sends a workload of
requests sharing long prefixes (several groups, interleaved). Prefix locality is read from the
replicas' own counters (vllm:prefix_cache_hits_total / queries_total, deltas per run); the
reference is the same kind of workload sent to one replica directly. Last, a replica is
SIGKILLed while requests flow through the kv_aware router: only the requests in flight on it may
fail. Every run uses its own prefixes, so no run is helped by another's cache.

Usage: router_e2e.py --spindle BIN --router BIN --out DIR [--check]
With --check it asserts the outcome (the test command); it always writes results.json and
summary.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORDS = ("harbor lantern orchard meadow castle voyage signal thunder pencil mirror candle "
         "valley rocket island shadow button ladder circle forest market winter planet").split()


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception as e:  # connection refused / reset: no response at all
        return 0, str(e).encode()


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited during start-up")
        if http(url, timeout=2)[0] == 200:
            return
        time.sleep(0.3)
    sys.exit(f"{what} not healthy within {timeout}s")


def counters(base: str) -> tuple[float, float]:
    _, text = http(base + "/metrics")
    hits = queries = 0.0
    for line in text.decode().splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


class Replicas:
    def __init__(self, spindle: str, work: Path, n: int = 3):
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []
        self.events: list[str] = []
        for i in range(n):
            port, pub, replay = free_ports(3)
            cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub}",
                   "replay_endpoint": f"tcp://*:{replay}"}
            log = open(work / f"replica{i}.log", "w")
            p = subprocess.Popen(
                [spindle, "serve", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smol",
                 "--max-model-len", "2048", "--kv-cache-memory", "512MiB", "--data-dir", str(work / f"data{i}"),
                 "--kv-events-config", json.dumps(cfg)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "42", "NO_COLOR": "1"})
            self.procs.append(p)
            self.urls.append(f"http://127.0.0.1:{port}")
            self.events.append(f"tcp://127.0.0.1:{pub}")
        for i, (url, p) in enumerate(zip(self.urls, self.procs)):
            wait_healthy(url + "/health", p, f"replica {i}")

    def counters(self) -> list[tuple[float, float]]:
        return [counters(u) if p.poll() is None else (0.0, 0.0) for u, p in zip(self.urls, self.procs)]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


class Router:
    def __init__(self, router: str, policy: str, replicas: Replicas, work: Path):
        port, prom = free_ports(2)
        self.url = f"http://127.0.0.1:{port}"
        args = [router, "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(prom),
                "--policy", policy, "--worker-urls", *replicas.urls]
        if policy == "kv_aware":
            for url, ev in zip(replicas.urls, replicas.events):
                args += ["--kv-event-source", f"{url}={ev}"]
            args += ["--kv-event-block-size", "16", "--kv-event-model", "smol"]
        self.log = open(work / f"router-{policy}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONHASHSEED": "42", "RUST_LOG": "info"},
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while http(self.url + "/v1/models", timeout=2)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"router ({policy}) did not start; see {work}/router-{policy}.log")
            time.sleep(0.3)
        time.sleep(1.0)  # let the KV-event subscribers connect

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def workload(seed: int, groups: int = 5, per_group: int = 10, prefix_words: int = 160) -> list[str]:
    """Requests sharing long prefixes: `groups` prefixes, `per_group` suffixes each, in a
    shuffled order (so that no policy gets locality from the arrival pattern by accident)."""
    rng = random.Random(seed)
    prefixes = [f"[{seed}-{g}] " + " ".join(rng.choice(WORDS) for _ in range(prefix_words)) for g in range(groups)]
    out = []
    for r in range(per_group):
        for g in range(groups):
            out.append(f"{prefixes[g]} Question {r}: " + " ".join(rng.choice(WORDS) for _ in range(12)))
    rng.shuffle(out)
    return out


def send_all(base: str, prompts: list[str], concurrency: int = 2) -> list[int]:
    def one(p: str) -> int:
        return http(base + "/v1/completions", {"model": "smol", "prompt": p, "max_tokens": 4})[0]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def hit_rate(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> tuple[float, list[float]]:
    hits = [a[0] - b[0] for a, b in zip(after, before)]
    queries = [a[1] - b[1] for a, b in zip(after, before)]
    total = sum(hits) / max(sum(queries), 1.0)
    return total, queries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spindle", required=True)
    ap.add_argument("--router", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    replicas = Replicas(args.spindle, out)
    try:
        # Reference: the same kind of workload on one replica.
        before = replicas.counters()
        codes = send_all(replicas.urls[0], workload(seed=100))
        single, _ = hit_rate(before, replicas.counters())
        results["single_replica"] = {"hit_rate": single, "ok": codes.count(200), "requests": len(codes)}
        print(f"single replica: hit rate {single:.3f}", flush=True)

        for seed, policy in enumerate(["round_robin", "cache_aware", "kv_aware"], start=1):
            router = Router(args.router, policy, replicas, out)
            try:
                before = replicas.counters()
                codes = send_all(router.url, workload(seed=seed))
                rate, queries = hit_rate(before, replicas.counters())
            finally:
                router.stop()
            results[policy] = {"hit_rate": rate, "queries_per_replica": queries,
                               "ok": codes.count(200), "requests": len(codes)}
            print(f"{policy}: hit rate {rate:.3f}, prompt tokens per replica {queries}", flush=True)

        # A replica SIGKILLed under load through the kv_aware router.
        router = Router(args.router, "kv_aware", replicas, out)
        try:
            prompts = workload(seed=50, groups=6, per_group=10)
            statuses: list[int] = []
            lock = threading.Lock()

            def one(p: str) -> None:
                code = http(router.url + "/v1/completions", {"model": "smol", "prompt": p, "max_tokens": 16})[0]
                with lock:
                    statuses.append(code)

            killed_in_flight = None
            with ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(one, p) for p in prompts]
                while len(statuses) < len(prompts) // 3:
                    time.sleep(0.05)
                metrics = http(replicas.urls[2] + "/metrics")[1].decode()
                for line in metrics.splitlines():
                    if line.startswith("vllm:num_requests_running"):
                        killed_in_flight = int(float(line.rsplit(" ", 1)[1]))
                replicas.procs[2].send_signal(signal.SIGKILL)
                for f in futures:
                    f.result()
            failed = len([s for s in statuses if s != 200])
            results["replica_killed"] = {"requests": len(prompts), "ok": len(statuses) - failed, "failed": failed,
                                         "in_flight_on_killed_replica": killed_in_flight}
            print(f"replica killed under load: {failed} of {len(prompts)} failed "
                  f"({killed_in_flight} were running on it)", flush=True)
        finally:
            router.stop()
    finally:
        replicas.stop()

    (out / "results.json").write_text(json.dumps(results, indent=2))
    r = results
    summary = f"""| run | requests ok | aggregate prefix-cache hit rate |
|---|---|---|
| one replica, no router | {r['single_replica']['ok']}/{r['single_replica']['requests']} | {r['single_replica']['hit_rate']:.3f} |
| 3 replicas, round_robin | {r['round_robin']['ok']}/{r['round_robin']['requests']} | {r['round_robin']['hit_rate']:.3f} |
| 3 replicas, cache_aware | {r['cache_aware']['ok']}/{r['cache_aware']['requests']} | {r['cache_aware']['hit_rate']:.3f} |
| 3 replicas, kv_aware (KV events) | {r['kv_aware']['ok']}/{r['kv_aware']['requests']} | {r['kv_aware']['hit_rate']:.3f} |

Replica SIGKILLed under load (kv_aware): {r['replica_killed']['failed']} of {r['replica_killed']['requests']} requests failed; {r['replica_killed']['in_flight_on_killed_replica']} were running on it.
"""
    (out / "summary.md").write_text(summary)
    print(summary)
    if args.check:
        problems = []
        for run in ("single_replica", "round_robin", "cache_aware", "kv_aware"):
            if r[run]["ok"] != r[run]["requests"]:
                problems.append(f"{run}: {r[run]['requests'] - r[run]['ok']} requests failed")
        single, rr, kv = (r[k]["hit_rate"] for k in ("single_replica", "round_robin", "kv_aware"))
        # Close to one replica's (the ceiling), and recovering at least half of what spreading
        # the prefixes over three caches costs round_robin.
        if kv < 0.85 * single:
            problems.append(f"kv_aware's hit rate {kv:.3f} is not close to one replica's {single:.3f}")
        if single - rr < 0.05:
            problems.append(f"the workload does not separate the policies (one replica {single:.3f}, round_robin {rr:.3f})")
        elif kv - rr < 0.5 * (single - rr):
            problems.append(f"kv_aware ({kv:.3f}) recovers less than half of round_robin's loss ({rr:.3f} vs {single:.3f})")
        allowed = max(r["replica_killed"]["in_flight_on_killed_replica"] or 0, 1)
        if r["replica_killed"]["failed"] > allowed:
            problems.append(f"{r['replica_killed']['failed']} requests lost when a replica died (at most {allowed} were on it)")
        if problems:
            sys.exit("router e2e failed:\n  " + "\n  ".join(problems))
        print("router e2e: ok")


if __name__ == "__main__":
    main()
