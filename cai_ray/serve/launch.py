"""Start and stop the Serve application: `serve_app(cfg)` returns its base URL.

Model choice (the run's own outputs first): policy `rl-train/hf`, else `sl-train/hf`, else
`models.helpful`; PM `pm-train/hf`, else `serve.reward` (a trained PM: a value-head or
*ForSequenceClassification directory; a preset is a random classifier), else none (PM endpoints
answer 503); critique `serve.critique_path`, else `models.critique`, else the policy; feedback
`models.feedback`, else the critique model. `serve.policy_path` / `serve.reward_path` win.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.config import DeploymentConfig, ModelConfig, RunConfig, resolve_path
from cai_ray.errors import CaiRayError


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
        [run / "rl-train" / "hf", run / "sl-train" / "hf"],
        cfg.models.helpful,
    )
    assert policy_dir is not None
    critique_dir = causal(sc.critique_path, [], cfg.models.critique) or policy_dir
    feedback_dir = causal(None, [], cfg.models.feedback) or critique_dir
    reward_dir = None
    if reward or sc.reward_path:
        reward_dir = check_model_dir(resolve_path(reward or sc.reward_path), head="classification")
    elif (run / "pm-train" / "hf").is_dir():
        reward_dir = check_model_dir(run / "pm-train" / "hf", head="classification")
    elif sc.reward is not None:
        reward_dir = ensure_model(sc.reward, run_dir=run, head="classification")
    digest = token_digest(load_token(env=sc.auth_token_env, file=sc.auth_token_file))
    return ServePlan(
        policy_dir, reward_dir, critique_dir, feedback_dir, model_id(policy_dir), digest
    )


def _options(d: DeploymentConfig, name: str) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
    }
    if d.autoscaling is not None:
        opts["autoscaling_config"] = d.autoscaling.model_dump()
    else:
        opts["num_replicas"] = d.num_replicas
    return opts


def build_app(cfg: RunConfig, plan: ServePlan):
    """The bound Serve application (ingress + model deployments)."""
    from cai_ray.conversation import PromptFormat
    from cai_ray.serve.app import (
        ConstitutionDeployment,
        Ingress,
        PolicyDeployment,
        RewardDeployment,
    )

    sc = cfg.serve
    # The served checkpoints were trained from the helpful/base model: they read its template.
    source = cfg.models.base or cfg.models.helpful
    critic = cfg.models.critique or cfg.models.helpful
    policy = PolicyDeployment.options(**_options(sc.policy, "policy")).bind(
        str(plan.policy),
        cfg.engine,
        fmt=PromptFormat(cfg.format, dict(source.chat_template_kwargs)),
        max_prompt_tokens=sc.max_prompt_tokens,
        name=sc.policy_name,
    )
    reward = None
    if plan.reward is not None:
        reward = RewardDeployment.options(**_options(sc.reward_model, "reward")).bind(
            str(plan.reward), cfg.engine, fmt=cfg.format, name=sc.reward_name
        )
    constitution = ConstitutionDeployment.options(**_options(sc.constitution, "constitution")).bind(
        str(plan.critique),
        str(plan.feedback),
        cfg.engine,
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
    """Deploy the app on Ray Serve (joining or starting Ray per `cfg.ray`); returns its URL."""
    from ray import serve

    from cai_ray.pipeline.common import ensure_ray

    plan = plan or plan_serve(cfg, policy=policy, reward=reward)
    ensure_ray(cfg.ray)
    sc = cfg.serve
    serve.start(
        http_options={
            "host": sc.host,
            "port": sc.port,
            # Serve's own backstop behind the ingress's per-request timeout.
            "request_timeout_s": sc.request_timeout_s + 10,
        }
    )
    try:
        serve.run(build_app(cfg, plan), name=sc.app_name, route_prefix=sc.route_prefix)
    except Exception as exc:
        from cai_ray.serve.app import _as_api_error

        err = _as_api_error(exc)
        if err.status != 503:
            raise CaiRayError(f"the Serve app failed to start: {err.message}") from None
        raise CaiRayError(
            f"the Serve app failed to start: {exc}",
            hint="check the model paths and `ray status`; replica logs are under /tmp/ray",
        ) from None
    return f"http://{sc.host}:{sc.port}{sc.route_prefix.rstrip('/')}"


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
