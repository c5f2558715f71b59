"""Bounded load test of the Serve policy endpoint on loopback (CPU), batched against unbatched.

For each model (tiny-1m, tiny-20m) it starts the app on local Ray twice in one run: with request
batching off (`serve.policy.max_batch_size=1`, one request per engine call, as before batching)
and with the defaults (up to 32 requests per engine batch, 5 ms wait). At concurrency 1, 8 and
32 it sends a fixed number of chat requests (capped in time) to 127.0.0.1 and reports
requests/s, p50/p99 latency and errors, then the batched/unbatched ratios. `--soak-s S` adds a
soak of the batched app at concurrency 32 for S seconds, sampling the policy replica's RSS.

`--baseline REV` adds "today's" server of the issue that asked for batching: the Serve app of
git revision REV (default 741a219, the last commit before issue 17), its tree exported to a
temporary folder and started in a subprocess with that tree first on PYTHONPATH (Ray's workers
inherit it), on the same policy directory, measured by this script's own load generator in the
same run. `unbatched` is today's code with batching off, which also has the rest of the
issue's work (the replica loop, access logs off), so it is the stricter of the two baselines.

Writes benchmarks/results/serve.json.
Usage: python benchmarks/bench_serve.py [--requests N] [--models tiny-1m,tiny-20m] [--soak-s 300]
       [--baseline 741a219 | --baseline none]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "serve.json"
LEVELS = (1, 8, 32)
BODY = {
    "model": "policy",
    "messages": [{"role": "user", "content": "How do I grow tomatoes?"}],
    "temperature": 0,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(url: str, concurrency: int, *, requests: int, cap_s: float, max_tokens: int) -> dict:
    """`requests` chat requests from `concurrency` threads, stopping at `cap_s`."""
    import httpx

    body = {**BODY, "max_tokens": max_tokens}
    deadline = time.monotonic() + cap_s
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=64)
    left = iter(range(requests))  # shared by the workers; next() on it is atomic in CPython
    with httpx.Client(base_url=url, timeout=60, limits=limits) as client:

        def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline and next(left, None) is not None:
                start = time.perf_counter()
                try:
                    ok = client.post("/v1/chat/completions", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "rps": round(len(latencies) / wall, 2),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
    }


def _soak(url: str, seconds: float, max_tokens: int) -> dict:
    """Concurrency 32 for `seconds`; the policy replica's RSS every 10 s (its pid from /health)."""
    import httpx
    import psutil

    pid = httpx.get(f"{url}/health", timeout=60).json()["policy"]["pid"]
    replica = psutil.Process(pid)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            try:
                samples.append((round(time.monotonic() - t0, 1), replica.memory_info().rss))
            except psutil.NoSuchProcess:  # the replica died: the soak failed (errors say why)
                samples.append((round(time.monotonic() - t0, 1), -1))
                return
            stop.wait(10)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    row = _load(url, 32, requests=10**9, cap_s=seconds, max_tokens=max_tokens)
    stop.set()
    sampler.join()
    alive = [(t, rss) for t, rss in samples if rss > 0]
    after_warmup = [rss for t, rss in alive if t >= 30] or [rss for _, rss in alive]
    return {
        **row,
        "seconds": seconds,
        "rss_mib": [(t, round(rss / 2**20, 1)) for t, rss in samples],
        "replica_died": len(alive) < len(samples),
        "rss_growth_after_30s": round(max(after_warmup) / min(after_warmup) - 1, 4),
    }


def _app(tmp: Path, policy: Path, batch: int | None):
    from cai_ray.config import load_config
    from cai_ray.serve.launch import serve_app

    policy_cfg = "{num_cpus: 0.5, max_ongoing_requests: 32, max_queued_requests: 128"
    policy_cfg += f", max_batch_size: {batch}}}" if batch else "}"
    cfg = load_config(
        None,
        [
            f"run_dir={tmp}",
            "engine.kind=hf",
            "engine.device=cpu",
            "engine.threads=1",
            f"serve.port={_free_port()}",
            "serve.auth_token_env=null",
            f"serve.policy={policy_cfg}",
            "serve.constitution={num_cpus: 0.1}",
            "serve.ingress={num_cpus: 0.1, max_ongoing_requests: 64}",
            "ray.num_cpus=4",
        ],
    )
    return serve_app(cfg, policy=policy)


# Started in a subprocess over the exported tree: the config keys of that revision.
_BASELINE_SERVER = """
import sys
from cai_ray.config import load_config
from cai_ray.serve.launch import serve_app
run_dir, policy, port = sys.argv[1:4]
cfg = load_config(None, [
    f"run_dir={run_dir}", "engine.kind=hf", "engine.device=cpu", "engine.threads=1",
    f"serve.port={port}", "serve.auth_token_env=null",
    "serve.policy={num_cpus: 0.5, max_ongoing_requests: 32, max_queued_requests: 128}",
    "serve.constitution={num_cpus: 0.1}",
    "serve.ingress={num_cpus: 0.1, max_ongoing_requests: 64}", "ray.num_cpus=4",
])
print("URL", serve_app(cfg, policy=policy), flush=True)
sys.stdin.read()  # serve until the benchmark closes stdin
"""


class _Baseline:
    """The Serve app of an older revision, in a subprocess; `url` once it is healthy."""

    def __init__(self, rev: str, tmp: Path, policy: Path):
        root = Path(__file__).resolve().parents[1]
        self.tree = tmp / f"tree-{rev}"
        self.tree.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", rev], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(self.tree)], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BASELINE_SERVER, str(tmp / f"run-{rev}"), str(policy),
             str(_free_port())],
            cwd=self.tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        self.url = None
        for line in self.proc.stdout:  # its logs go to stderr; the URL line to stdout
            if line.startswith("URL "):
                self.url = line.split()[1]
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.close()
            raise RuntimeError(f"the {rev} server did not start (exit {self.proc.poll()})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the server's stdin read returns; it exits with its Ray
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _measure(url: str, args) -> list[dict]:
    _load(url, 8, requests=16, cap_s=30, max_tokens=args.max_tokens)  # warm-up
    return [
        _load(url, c, requests=args.requests, cap_s=args.cap_s, max_tokens=args.max_tokens)
        for c in LEVELS
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--cap-s", type=float, default=60, help="time cap per level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--models", default="tiny-1m,tiny-20m")
    parser.add_argument("--soak-s", type=float, default=0, help="soak the batched app (0: none)")
    parser.add_argument(
        "--baseline", default="741a219", help="git revision of today's server ('none': skip)"
    )
    args = parser.parse_args()

    import ray

    from cai_ray.models import init_model
    from cai_ray.serve.launch import shutdown

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    results: dict[str, dict] = {}
    for model in args.models.split(","):
        policy = init_model(model, tmp / model)
        if args.baseline != "none":
            server = _Baseline(args.baseline, tmp / f"{model}-baseline", policy)
            try:
                results[f"{model}/{args.baseline}"] = {"levels": _measure(server.url, args)}
            finally:
                server.close()
        for name, batch in (("unbatched", 1), ("batched", None)):
            url = _app(tmp / f"{model}-{name}", policy, batch)
            try:
                entry = {"levels": _measure(url, args)}
                if args.soak_s and name == "batched" and model == args.models.split(",")[-1]:
                    entry["soak"] = _soak(url, args.soak_s, args.max_tokens)
                results[f"{model}/{name}"] = entry
            finally:
                shutdown()
                ray.shutdown()
    ratios = {}
    for model in args.models.split(","):
        plain, batched = results[f"{model}/unbatched"], results[f"{model}/batched"]
        for a, b in zip(plain["levels"], batched["levels"], strict=True):
            c = a["concurrency"]
            ratios[f"{model} c={c} req/s"] = round(b["rps"] / max(a["rps"], 1e-9), 2)
            ratios[f"{model} c={c} p50"] = round(b["p50_ms"] / max(a["p50_ms"], 1e-9), 2)
        old = results.get(f"{model}/{args.baseline}")
        for a, b in zip(
            old["levels"] if old else [], batched["levels"] if old else [], strict=True
        ):
            c = a["concurrency"]
            ratios[f"{model} c={c} req/s vs {args.baseline}"] = round(
                b["rps"] / max(a["rps"], 1e-9), 2
            )
            ratios[f"{model} c={c} p50 vs {args.baseline}"] = round(
                b["p50_ms"] / max(a["p50_ms"], 1e-9), 2
            )
    meta = {
        "baseline": args.baseline,
        "device": "cpu",
        "replicas": 1,
        "max_tokens": args.max_tokens,
        "engine_threads": 1,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    figures = [
        {
            "name": f"serve req/s at concurrency 32, {m} (batched / unbatched)",
            "value": ratios[f"{m} c=32 req/s"],
            "unit": "x",
        }
        for m in args.models.split(",")
    ]
    OUT.parent.mkdir(exist_ok=True)
    out = {"meta": meta, "results": results, "ratios": ratios, "figures": figures}
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print("| model | batching | concurrency | ok | errors | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for key, entry in results.items():
        model, name = key.split("/")
        for r in entry["levels"]:
            print(
                f"| {model} | {name} | {r['concurrency']} | {r['ok']} | {r['errors']} | "
                f"{r['rps']} | {r['p50_ms']} | {r['p99_ms']} |"
            )
    print(json.dumps(ratios, indent=1))
    for key, entry in results.items():
        if "soak" in entry:
            soak = {k: v for k, v in entry["soak"].items() if k != "rss_mib"}
            print(key, "soak:", soak)


if __name__ == "__main__":
    main()
