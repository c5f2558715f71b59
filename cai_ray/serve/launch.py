"""Start and stop the Serve application: `serve_app(cfg)` returns its base URL.

Model choice (the run's own outputs first): policy `rl-train/hf`, else `sl-train/hf`, else
`models.helpful`; PM `pm-train/hf`, else `serve.reward` (a trained PM: a value-head or
*ForSequenceClassification directory; a preset is a random classifier), else none (PM endpoints
answer 503); critique `serve.critique_path`, else `models.critique`, else the policy; feedback
`models.feedback`, else the critique model. `serve.policy_path` / `serve.reward_path` win.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.config import (
    DeploymentConfig,
    EngineConfig,
    ModelConfig,
    RunConfig,
    ServeConfig,
    resolve_path,
)
from cai_ray.errors import CaiRayError, ConfigError
from cai_ray.layout import PM_TRAIN, RL_TRAIN, SL_TRAIN, trained_model_dir

# Serve deployment name -> its section under `serve.` (the PM's is `reward_model`).
DEPLOYMENTS = {
    "ingress": "ingress",
    "policy": "policy",
    "reward": "reward_model",
    "constitution": "constitution",
}


@dataclass(frozen=True)
class ServePlan:
    """Resolved model directories and everything the deployments need."""

    policy: Path
    reward: Path | None
    critique: Path
    feedback: Path
    policy_id: str
    token_digest: str | None


def plan_serve(
    cfg: RunConfig, *, policy: str | Path | None = None, reward: str | Path | None = None
) -> ServePlan:
    """Pick the models to serve (see the module docstring); builds presets on first use."""
    from cai_ray.models import check_model_dir, ensure_model, model_id
    from cai_ray.serve.auth import load_token, token_digest

    sc, run = cfg.serve, Path(cfg.run_dir)

    def causal(explicit, fallbacks: list[Path], model: ModelConfig | None) -> Path | None:
        if explicit:
            return check_model_dir(resolve_path(explicit), head="causal")
        for candidate in fallbacks:
            if candidate.is_dir():
                return check_model_dir(candidate, head="causal")
        return ensure_model(model, run_dir=run) if model else None

    policy_dir = causal(
        policy or sc.policy_path,
        [trained_model_dir(run, RL_TRAIN), trained_model_dir(run, SL_TRAIN)],
        cfg.models.helpful,
    )
    assert policy_dir is not None
    critique_dir = causal(sc.critique_path, [], cfg.models.critique) or policy_dir
    feedback_dir = causal(None, [], cfg.models.feedback) or critique_dir
    reward_dir = None
    if reward or sc.reward_path:
        reward_dir = check_model_dir(resolve_path(reward or sc.reward_path), head="classification")
    elif trained_model_dir(run, PM_TRAIN).is_dir():
        reward_dir = check_model_dir(trained_model_dir(run, PM_TRAIN), head="classification")
    elif sc.reward is not None:
        reward_dir = ensure_model(sc.reward, run_dir=run, head="classification")
    digest = token_digest(load_token(env=sc.auth_token_env, file=sc.auth_token_file))
    return ServePlan(
        policy_dir, reward_dir, critique_dir, feedback_dir, model_id(policy_dir), digest
    )


# -- will it fit: what the deployments ask against what the cluster has ----------------------

_EPS = 1e-6  # Ray keeps resources to 4 decimals; 0.1 + 0.5 + 0.5 + 0.5 must not exceed 1.6


@dataclass(frozen=True)
class DeploymentAsk:
    """What one Serve deployment needs to start: `replicas` x `per_replica` resources."""

    name: str  # the Serve deployment
    key: str  # its config section, e.g. "serve.reward_model"
    replicas: int  # started at deploy: num_replicas, or autoscaling.min_replicas
    replicas_key: str  # the key that sets `replicas`
    per_replica: Mapping[str, float]  # {"CPU": 0.5, "GPU": 1, "<custom>": 1}, no zeros

    def total(self, resource: str) -> float:
        return self.replicas * self.per_replica.get(resource, 0.0)


def deployment_asks(sc: ServeConfig, *, reward: bool = True) -> list[DeploymentAsk]:
    """The deployments `cai-ray serve` starts (the PM's only with a `reward` model) and what
    each asks of the cluster."""
    asks = []
    for name, section in DEPLOYMENTS.items():
        if name == "reward" and not reward:
            continue
        d: DeploymentConfig = getattr(sc, section)
        per = {"CPU": d.num_cpus, "GPU": d.num_gpus, **d.resources}
        key = f"serve.{section}"
        auto = d.autoscaling
        asks.append(
            DeploymentAsk(
                name=name,
                key=key,
                replicas=auto.min_replicas if auto is not None else d.num_replicas,
                replicas_key=f"{key}.{'autoscaling.min_replicas' if auto else 'num_replicas'}",
                per_replica={r: float(v) for r, v in per.items() if v > 0},
            )
        )
    return asks


def _resource_key(ask: DeploymentAsk, resource: str) -> str:
    field = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(resource, f"resources.{resource}")
    return f"{ask.key}.{field}"


def _n(x: float) -> str:
    return f"{x:.4g}"


def check_fit(
    asks: Iterable[DeploymentAsk],
    cluster: Mapping[str, float],
    nodes: Iterable[Mapping[str, float]] | None = None,
) -> None:
    """A ConfigError naming each deployment, its ask, the cluster's total and the keys to
    change, unless every deployment's replicas fit `cluster` (ray.cluster_resources()) and each
    replica fits on one of `nodes` (the alive nodes' resources; None: not checked). Packing the
    replicas onto the nodes is left to Ray (a fragmented cluster ends at serve.deploy_timeout_s)."""
    asks = list(asks)
    nodes = list(nodes) if nodes is not None else None
    resources = sorted({r for a in asks for r in a.per_replica}, key=lambda r: (r != "CPU", r))
    problems: list[str] = []
    keys: list[str] = []
    for resource in resources:
        users = [a for a in asks if a.per_replica.get(resource, 0) > 0]
        have = float(cluster.get(resource, 0.0))
        want = sum(a.total(resource) for a in users)
        if want > have + _EPS:
            detail = ", ".join(
                f"{a.name} {a.replicas} x {_n(a.per_replica[resource])}" for a in users
            )
            problems.append(
                f"the deployments ask for {_n(want)} {resource} in all ({detail}), "
                f"the cluster has {_n(have)}"
            )
            for a in users:
                keys += [_resource_key(a, resource), a.replicas_key]
        if nodes:
            largest = max(float(n.get(resource, 0.0)) for n in nodes)
            for a in users:
                if a.per_replica[resource] > largest + _EPS:
                    problems.append(
                        f"{a.name} asks for {_n(a.per_replica[resource])} {resource} a replica, "
                        f"the largest node has {_n(largest)}"
                    )
                    keys.append(_resource_key(a, resource))
    if not problems:
        return
    change = ", ".join(dict.fromkeys(keys))
    raise ConfigError(
        "the Serve deployments do not fit the cluster: " + "; ".join(problems),
        where="serve",
        hint=f"lower {change} (fractions share a CPU or GPU, e.g. num_cpus: 0.5), or give the "
        "cluster more (ray.num_cpus on a local one); `ray status` shows what it has",
    )


def check_cluster_fit(sc: ServeConfig, *, reward: bool) -> None:
    """`check_fit` against the connected Ray cluster's total resources and its alive nodes."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    check_fit(deployment_asks(sc, reward=reward), ray.cluster_resources(), nodes or None)


def _options(d: DeploymentConfig, name: str) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}
    if d.resources:
        actor["resources"] = dict(d.resources)
    opts: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "ray_actor_options": actor,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "logging_config": {"enable_access_log": d.access_log},
    }
    if d.max_constructor_retry_count is not None:
        opts["max_constructor_retry_count"] = d.max_constructor_retry_count
    if d.autoscaling is not None:
        opts["autoscaling_config"] = d.autoscaling.model_dump()
    else:
        opts["num_replicas"] = d.num_replicas
    return opts


def _batching(d: DeploymentConfig) -> dict[str, Any]:
    return {"max_batch_size": d.max_batch_size, "batch_wait_s": d.batch_wait_s}


def _batch_engine(engine: EngineConfig, d: DeploymentConfig) -> EngineConfig:
    """The engine of a batching deployment: a full batch of one-prompt requests in one forward
    pass (the HF engine's `batch_size` counts sequences; vLLM schedules its own)."""
    return engine.model_copy(update={"batch_size": max(engine.batch_size, d.max_batch_size)})


def build_app(cfg: RunConfig, plan: ServePlan):
    """The bound Serve application (ingress + model deployments)."""
    from cai_ray.data.conversation import PromptFormat
    from cai_ray.serve.app import (
        ConstitutionDeployment,
        Ingress,
        PolicyDeployment,
        RewardDeployment,
    )

    sc = cfg.serve
    # The served checkpoints were trained from the helpful/base model: they read its template.
    source = cfg.models.base_model
    critic = cfg.models.critique_model
    policy = PolicyDeployment.options(**_options(sc.policy, "policy")).bind(
        str(plan.policy),
        _batch_engine(cfg.engine, sc.policy),
        batching=_batching(sc.policy),
        fmt=PromptFormat(cfg.format, dict(source.chat_template_kwargs)),
        max_prompt_tokens=sc.max_prompt_tokens,
        name=sc.policy_name,
    )
    reward = None
    if plan.reward is not None:
        reward = RewardDeployment.options(**_options(sc.reward_model, "reward")).bind(
            str(plan.reward),
            _batch_engine(cfg.engine, sc.reward_model),
            batching=_batching(sc.reward_model),
            fmt=cfg.format,
            name=sc.reward_name,
        )
    constitution = ConstitutionDeployment.options(**_options(sc.constitution, "constitution")).bind(
        str(plan.critique),
        str(plan.feedback),
        _batch_engine(cfg.engine, sc.constitution),
        batching=_batching(sc.constitution),
        constitution=str(resolve_path(cfg.constitution)),
        fmt=PromptFormat(cfg.format, dict(critic.chat_template_kwargs)),
        seed=cfg.seed,
    )
    settings = {
        "policy_names": [sc.policy_name, plan.policy_id],
        "reward_name": sc.reward_name,
        "token_digest": plan.token_digest,
        "max_body_bytes": sc.max_body_bytes,
        "max_tokens_limit": sc.max_tokens_limit,
        "default_max_tokens": min(cfg.generation.max_new_tokens, sc.max_tokens_limit),
        "max_n": sc.max_n,
        "max_batch": sc.max_batch,
        "max_rounds": sc.max_rounds,
        "timeout_s": sc.request_timeout_s,
    }
    return Ingress.options(**_options(sc.ingress, "ingress")).bind(
        policy, reward, constitution, settings
    )


def serve_app(
    cfg: RunConfig,
    *,
    policy: str | Path | None = None,
    reward: str | Path | None = None,
    plan: ServePlan | None = None,
) -> str:
    """Deploy the app on Ray Serve (joining or starting Ray per `cfg.ray`); returns its URL once
    every replica is healthy. Fails before deploying when the deployments cannot fit the cluster
    (`serve.fit_check`), and after `serve.deploy_timeout_s` or a replica that cannot start, with
    the app torn down."""
    from ray import serve

    from cai_ray.pipeline.common import ensure_ray

    plan = plan or plan_serve(cfg, policy=policy, reward=reward)
    ensure_ray(cfg.ray)
    sc = cfg.serve
    if sc.fit_check:
        check_cluster_fit(sc, reward=plan.reward is not None)
    deadline = time.monotonic() + sc.deploy_timeout_s
    serve.start(
        http_options={
            "host": sc.host,
            "port": sc.port,
            # Serve's own backstop behind the ingress's per-request timeout.
            "request_timeout_s": sc.request_timeout_s + 10,
        }
    )
    try:
        _deploy(build_app(cfg, plan), sc, deadline)
    except BaseException:
        _delete_app(sc.app_name)
        raise
    return f"http://{sc.host}:{sc.port}{sc.route_prefix.rstrip('/')}"


def _deploy(app, sc: ServeConfig, deadline: float) -> None:
    """Submit the app without Serve's wait (which has no end), then poll its status until it is
    RUNNING; a CaiRayError when it fails or the deadline passes."""
    from ray import serve

    try:
        serve.run_many(
            [serve.RunTarget(app, name=sc.app_name, route_prefix=sc.route_prefix)],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
    except Exception as exc:
        from cai_ray.serve.app import _as_api_error

        err = _as_api_error(exc)
        if err.status != 503:
            raise CaiRayError(f"the Serve app failed to start: {err.message}") from None
        raise CaiRayError(
            f"the Serve app failed to start: {exc}",
            hint="check the model paths and `ray status`; replica logs are under /tmp/ray",
        ) from None
    status = None
    while True:
        status = serve.status().applications.get(sc.app_name)
        state = _value(status.status) if status is not None else "NOT_STARTED"
        if state == "RUNNING":
            break
        if state == "DEPLOY_FAILED":
            raise _failed(status)
        if time.monotonic() >= deadline:
            asks = {a.name: a for a in deployment_asks(sc)}
            asked = {r for a in asks.values() for r in a.per_replica}
            raise _timed_out(status, sc.deploy_timeout_s, _free_resources(asked), asks)
        time.sleep(0.5)
    _wait_for_proxies()


def _wait_for_proxies() -> None:
    """Serve's own last step of `serve.run`: the HTTP proxies route to the app (at most 60 s)."""
    try:
        from ray.serve.context import _get_global_client

        _get_global_client().wait_for_proxies_serving(wait_for_applications_running=True)
    except (ImportError, AttributeError):  # a Serve without it: /health answers a moment later
        pass
    except TimeoutError as exc:
        raise CaiRayError(f"the Serve HTTP proxy did not come up: {exc}") from None


def _value(state: Any) -> str:
    return str(getattr(state, "value", state))


def _reason(message: str) -> str:
    """The replica's own error out of a Serve status message (often a whole traceback): the last
    `SomeError: text` line, else the message's first line."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", ln)]
    text = errors[-1] if errors else (lines[0] if lines else "no reason given")
    return text if len(text) <= 400 else text[:400] + "..."


def _section(name: str) -> str:
    return f"serve.{DEPLOYMENTS.get(name, name)}"


def _failed(status) -> CaiRayError:
    """A DEPLOY_FAILED app: each failed deployment with its replica's error."""
    failed = [
        f"{name} ({_section(name)}): {_reason(d.message)}"
        for name, d in status.deployments.items()
        if _value(d.status) in ("DEPLOY_FAILED", "UNHEALTHY")
    ]
    detail = "; ".join(failed) or _reason(status.message)
    return CaiRayError(
        f"the Serve app failed to start: {detail}",
        hint="check the deployment's model path (serve.policy_path, serve.reward_path, "
        "models.*); replica logs are under /tmp/ray/session_latest/logs/serve",
    )


def _free_resources(asked: Iterable[str] = ()) -> str:
    """`free now: 0.9 of 2 CPU, ...` for the cluster's CPUs, GPUs, custom resources and any
    resource the deployments ask for (`0 of 0 accel` where the cluster has none)."""
    import ray

    try:
        total, free = ray.cluster_resources(), ray.available_resources()
    except Exception:
        return ""
    skip = ("memory", "object_store_memory", "node:", "accelerator_type:")
    shown = {r for r in total if not r.startswith(skip)} | set(asked)
    order = sorted(shown, key=lambda r: (r != "CPU", r != "GPU", r))
    return "free now: " + ", ".join(
        f"{_n(free.get(r, 0.0))} of {_n(total.get(r, 0.0))} {r}" for r in order
    )


def _timed_out(
    status, timeout_s: float, free: str = "", asks: Mapping[str, DeploymentAsk] | None = None
) -> CaiRayError:
    """The deadline passed: each deployment not yet healthy, what a replica of it asks for, and
    what Serve says it waits for."""
    waiting = []
    for name, d in (status.deployments if status is not None else {}).items():
        if _value(d.status) == "HEALTHY":
            continue
        replicas = ", ".join(f"{n} {_value(s)}" for s, n in (d.replica_states or {}).items())
        state = _value(d.status) + (f" [replicas: {replicas}]" if replicas else "")
        ask = (asks or {}).get(name)
        if ask is not None and ask.per_replica:
            state += ", a replica asks " + " + ".join(
                f"{_n(v)} {r}" for r, v in ask.per_replica.items()
            )
        why = _reason(d.message) if d.message else "still starting"
        waiting.append(f"{name} ({_section(name)}) {state}: {why}")
    detail = "; ".join(waiting) or "the app was never created"
    return CaiRayError(
        f"the Serve app was not healthy after {_n(timeout_s)} s (serve.deploy_timeout_s): "
        f"{detail}" + (f" ({free})" if free else ""),
        hint="raise serve.deploy_timeout_s for a slow model load, or lower the deployments' "
        "num_cpus / num_gpus if replicas wait to be scheduled (`ray status`)",
    )


def _delete_app(name: str) -> None:
    """Tear down a failed deploy: its replicas stop (Serve waits at most 60 s)."""
    from ray import serve

    with contextlib.suppress(Exception):  # the deploy's own error is the one to report
        serve.delete(name)


def describe(url: str, plan: ServePlan) -> str:
    """The endpoints, for the CLI to print."""
    lines = [f"serving on {url}", f"  policy: {plan.policy}"]
    lines.append(f"  reward: {plan.reward or 'none (PM endpoints answer 503)'}")
    lines.append(f"  auth:   {'bearer token' if plan.token_digest else 'off'}")
    for route in ENDPOINTS:
        lines.append(f"  {route}")
    return "\n".join(lines)


ENDPOINTS = (
    "GET  /v1/models",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/score",
    "POST /v1/compare",
    "POST /v1/critique",
    "POST /v1/label",
    "GET  /health",
    "GET  /ready",
)


def shutdown() -> None:
    """Stop Serve (every app and the HTTP proxy); Ray itself keeps running."""
    from ray import serve

    serve.shutdown()
