"""`cai-ray serve`: publish a run's policy, PM and constitution on Ray Serve."""

from __future__ import annotations

import argparse

from cai_ray.cli.options import add_set_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the policy, PM and constitution over HTTP (Ray Serve)")
    p.add_argument("config", nargs="?", default="configs/local-tiny.yaml")
    add_set_option(p)
    p.add_argument("--policy", help="an HF causal LM directory to serve as the policy")
    p.add_argument("--reward", help="a PM directory to serve (pm-train/hf, a sequence classifier)")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    p.add_argument(
        "--detach",
        action="store_true",
        help="return once deployed (needs ray.address: a cluster that outlives this process)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from cai_ray.config import load_config, resolve_path

    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"serve.host={args.host}")
    if args.port:
        overrides.append(f"serve.port={args.port}")
    cfg = load_config(resolve_path(args.config), overrides)
    return serve_and_wait(cfg, policy=args.policy, reward=args.reward, detach=args.detach)


def serve_and_wait(cfg, *, policy=None, reward=None, detach: bool = False) -> int:
    """Deploy the Serve app for `cfg`, print its endpoints and block until Ctrl-C."""
    import time

    from cai_ray.serve.launch import describe, plan_serve, serve_app, shutdown

    plan = plan_serve(cfg, policy=policy, reward=reward)
    url = serve_app(cfg, plan=plan)
    print(describe(url, plan), flush=True)
    if detach:
        return 0
    try:
        while True:  # the Serve app lives in Ray; this process only keeps it attached
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
        shutdown()
    return 0
