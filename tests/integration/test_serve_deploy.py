"""`cai-ray serve` never hangs (issue 17): deployments that cannot fit the cluster fail before any
replica starts; a replica that cannot load its model, or one that is never scheduled, fails the
deploy within `serve.deploy_timeout_s`, naming the deployment, and the app is torn down.

Real Ray and Serve on the session's local 4-CPU cluster (tests/integration/conftest.py)."""

from __future__ import annotations

import shutil
import socket
import time

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _stop_serve_after():
    """Serve started here (its proxy on this module's port) stops before the next module's."""
    yield
    from cai_ray.serve.launch import shutdown

    shutdown()


def _replica_actors(app: str, *, alive_only: bool = False) -> list[dict]:
    """Every Serve replica actor of `app` the cluster ever created (GCS actor table)."""
    from ray._private import state

    actors = state.actors().values()
    mine = [a for a in actors if a.get("Name", "").startswith(f"SERVE_REPLICA::{app}#")]
    return [a for a in mine if a["State"] != "DEAD"] if alive_only else mine


def _settings(run_dir, app: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        "engine.kind=hf",
        "engine.device=cpu",
        "engine.threads=1",
        f"serve.port={_free_port()}",
        f"serve.app_name={app}",
        "serve.auth_token_env=null",
    ]


def _assert_torn_down(app: str, deadline_s: float = 30) -> None:
    from ray import serve

    assert app not in serve.status().applications
    end = time.monotonic() + deadline_s
    while _replica_actors(app, alive_only=True) and time.monotonic() < end:
        time.sleep(0.5)
    assert not _replica_actors(app, alive_only=True)


def test_over_asking_config_fails_before_any_replica_starts(
    ray_cluster, tiny_model_dir, tmp_path, capsys
):
    from cai_ray.cli import main

    app = "fit-check"
    argv = ["serve", "--policy", str(tiny_model_dir)]
    for item in [
        *_settings(tmp_path / "run", app),
        "serve.policy.num_cpus=3",
        "serve.constitution={num_replicas: 2, num_cpus: 1}",
        "serve.deploy_timeout_s=600",  # the fit check answers long before this
    ]:
        argv += ["--set", item]
    start = time.monotonic()
    assert main(argv) == 2
    took = time.monotonic() - start
    err = capsys.readouterr().err
    print(f"took {took:.1f} s: {err}")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert "do not fit the cluster" in line and "5.1 CPU in all" in line
    assert "policy 1 x 3" in line and "constitution 2 x 1" in line and "ingress 1 x 0.1" in line
    assert "reward" not in line  # no PM to serve: its deployment asks nothing
    assert "the cluster has 4" in line
    for key in ("serve.policy.num_cpus", "serve.constitution.num_replicas"):
        assert key in err
    assert took < 30, took
    assert _replica_actors(app) == []  # none created, not even one that died


def test_unschedulable_replica_times_out_with_its_deployment_named(
    ray_cluster, tiny_model_dir, tmp_path
):
    """With the fit check off (a cluster that would autoscale), a replica no node can take waits
    to be scheduled until serve.deploy_timeout_s, then the deploy fails and is torn down."""
    from cai_ray.config import load_config
    from cai_ray.errors import CaiRayError
    from cai_ray.serve.launch import serve_app

    app = "never-scheduled"
    cfg = load_config(
        None,
        [
            *_settings(tmp_path / "run", app),
            "serve.fit_check=false",
            "serve.deploy_timeout_s=8",
            "serve.policy={num_cpus: 0.25, resources: {no_such_accelerator: 1}}",
            "serve.constitution={num_cpus: 0.25}",
            "serve.ingress={num_cpus: 0.1}",
        ],
    )
    start = time.monotonic()
    with pytest.raises(CaiRayError) as info:
        serve_app(cfg, policy=tiny_model_dir)
    took = time.monotonic() - start
    message = info.value.message
    print(f"took {took:.1f} s: {info.value}")
    assert "not healthy after 8 s (serve.deploy_timeout_s)" in message
    assert "policy (serve.policy)" in message
    assert "a replica asks 0.25 CPU + 1 no_such_accelerator" in message
    assert "free now:" in message and "0 of 0 no_such_accelerator" in message
    assert 8 <= took < 8 + 70, took  # the timeout, then Serve's bounded delete
    _assert_torn_down(app)


def test_broken_model_fails_the_deploy_naming_the_deployment(ray_cluster, tiny_model_dir, tmp_path):
    """A policy directory that passes the driver's checks (config, weights and tokenizer files)
    but whose weights are garbage: the replica cannot load it, Serve gives up after one start,
    and the error names the policy deployment and the loader's own error."""
    from cai_ray.config import load_config
    from cai_ray.errors import CaiRayError
    from cai_ray.serve.launch import serve_app

    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken-policy")
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"\xff" * 64)
    app = "broken-model"
    cfg = load_config(
        None,
        [
            *_settings(tmp_path / "run", app),
            "serve.deploy_timeout_s=120",
            f"serve.critique_path={tiny_model_dir}",  # only the policy is broken
            "serve.policy={num_cpus: 0.25, max_constructor_retry_count: 1}",
            "serve.constitution={num_cpus: 0.25}",
            "serve.ingress={num_cpus: 0.1}",
        ],
    )
    start = time.monotonic()
    with pytest.raises(CaiRayError) as info:
        serve_app(cfg, policy=broken)
    took = time.monotonic() - start
    message = info.value.message
    print(f"took {took:.1f} s: {info.value}")
    assert message.startswith("the Serve app failed to start: policy (serve.policy): "), message
    assert "Error" in message and "constitution" not in message
    assert "\n" not in message
    assert took < 120, took  # failed, not timed out
    _assert_torn_down(app)
