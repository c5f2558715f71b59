"""Bounded load test of the Serve policy endpoint on loopback (tiny-1m, CPU).

Starts the app on local Ray, then for concurrency 1, 8 and 32 sends a fixed number of chat
requests (capped in time) to 127.0.0.1 and reports requests/s, p50/p99 latency and error counts.
Writes benchmarks/results/serve.json. Usage: python benchmarks/bench_serve.py [--requests N]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OUT = Path(__file__).parent / "results" / "serve.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _level(url: str, concurrency: int, requests: int, cap_s: float, max_tokens: int) -> dict:
    import httpx

    body = {
        "model": "policy",
        "messages": [{"role": "user", "content": "How do I grow tomatoes?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    deadline = time.monotonic() + cap_s
    latencies: list[float] = []
    errors = 0
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:

        def one(_i: int) -> None:
            nonlocal errors
            if time.monotonic() > deadline:  # the time cap: skip what is left
                return
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
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--cap-s", type=float, default=60, help="time cap per level")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    import ray

    from cai_ray.config import load_config
    from cai_ray.models import init_model
    from cai_ray.serve.launch import serve_app, shutdown

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    policy = init_model("tiny-1m", tmp / "policy")
    cfg = load_config(
        None,
        [
            f"run_dir={tmp}",
            "engine.kind=hf",
            "engine.device=cpu",
            "engine.threads=1",
            f"serve.port={_free_port()}",
            "serve.auth_token_env=null",
            "serve.policy={num_cpus: 0.5, max_ongoing_requests: 32, max_queued_requests: 64}",
            "serve.constitution={num_cpus: 0.1}",
            "serve.ingress={num_cpus: 0.1, max_ongoing_requests: 64}",
            "ray.num_cpus=4",
        ],
    )
    url = serve_app(cfg, policy=policy)
    try:
        rows = [_level(url, c, args.requests, args.cap_s, args.max_tokens) for c in (1, 8, 32)]
    finally:
        shutdown()
        ray.shutdown()
    OUT.parent.mkdir(exist_ok=True)
    meta = {"model": "tiny-1m", "device": "cpu", "replicas": 1, "max_tokens": args.max_tokens}
    figures = [
        {"name": f"serve req/s at concurrency {r['concurrency']} (1 replica)", "value": r["rps"],
         "unit": "req/s"}
        for r in rows
    ]  # fmt: skip
    OUT.write_text(json.dumps({"meta": meta, "levels": rows, "figures": figures}, indent=2) + "\n")
    print("| concurrency | ok | errors | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['ok']} | {r['errors']} | {r['rps']} | "
            f"{r['p50_ms']} | {r['p99_ms']} |"
        )


if __name__ == "__main__":
    main()
