"""Stage 6 set-up: which model each RL role loads, whether the roles fit, and starting them.

The roles (DESIGN.md, stage 6): rollout workers (the policy, synced every step), reward workers
(the PM, direct RLAIF or a function), reference workers (the frozen SL-CAI policy), and learner
groups for the policy and, for PPO, the critic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.config import ModelConfig, PoolConfig, RunConfig
from cai_ray.errors import ConfigError, DataError
from cai_ray.pipeline.common import ModelRef, StageContext, check_pool_fits, policy_model
from cai_ray.rl_config import RLTrainConfig, RLWorkersConfig


@dataclass(frozen=True)
class RoleModels:
    policy: ModelRef
    reward: ModelRef | None  # None for a function reward
    value_init: Path | None  # None without a critic
    value_init_from: str


def role_models(cfg: RunConfig, ctx: StageContext) -> RoleModels:
    """The models of every role, checked before any actor starts."""
    s = cfg.rl_train
    policy = ctx.model(policy_model(cfg))
    reward: ModelRef | None = None
    if s.reward.kind == "pm":
        pm = Path(s.reward.model) if s.reward.model else Path(cfg.run_dir) / "pm-train" / "hf"
        if not (pm / "config.json").is_file():
            raise DataError(
                "rl-train needs a preference model and there is none",
                where=str(pm),
                hint="run `cai-ray stage pm-train CONFIG` first, or set rl_train.reward.model",
            )
        reward = ctx.model(ModelConfig(path=str(pm)), head="classification")
    elif s.reward.kind == "rlaif":
        spec = (
            ModelConfig(path=s.reward.model)
            if s.reward.model
            else cfg.models.feedback or cfg.models.helpful
        )
        reward = ctx.model(spec)
    value_init, source = None, "none"
    if s.algorithm == "ppo":
        value_init, source = _value_init(s, policy, reward)
    return RoleModels(policy, reward, value_init, source)


def _value_init(s: RLTrainConfig, policy: ModelRef, reward: ModelRef | None) -> tuple[Path, str]:
    pm_ok = (
        s.reward.kind == "pm" and reward is not None and same_tokenizer(policy.path, reward.path)
    )
    if s.value_init == "reward" and not pm_ok:
        raise ConfigError(
            "value_init=reward needs a PM that shares the policy's tokenizer (the critic reads "
            "the policy's tokens)",
            where="rl_train.value_init",
            hint="set value_init: policy (or auto)",
        )
    if s.value_init == "policy" or not pm_ok:
        return policy.path, "policy"
    return reward.path, "reward"  # type: ignore[union-attr]


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two model directories tokenise text identically (vocab and a probe text)."""
    from cai_ray.models import load_tokenizer

    ta, tb = load_tokenizer(a), load_tokenizer(b)
    probe = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix 500 g flour, 1 tsp salt (A) (B)"
    return len(ta) == len(tb) and ta(probe)["input_ids"] == tb(probe)["input_ids"]


def check_placement(s: RLTrainConfig, cluster: dict[str, float]) -> None:
    """Every role's actors must fit the cluster: a clear error before anything starts."""

    def pool(w: RLWorkersConfig) -> PoolConfig:
        return PoolConfig(size=w.size, num_cpus=w.num_cpus, num_gpus=w.num_gpus)

    pools: dict[str, PoolConfig] = {}
    for name, w in (("rollout", s.rollout), ("reward", s.reward_workers), ("ref", s.reference)):
        if w.size:
            pools[name] = pool(w)
    learners = [("policy", s.policy)] + ([("value", s.value)] if s.algorithm == "ppo" else [])
    for name, lc in learners:
        if lc.num_ranks:
            pools[f"{name} learner"] = PoolConfig(
                size=lc.num_ranks, num_cpus=lc.cpus_per_rank, num_gpus=lc.gpus_per_rank
            )
    check_pool_fits(pools, cluster)


def worker_options(w: RLWorkersConfig, s: RLTrainConfig) -> dict[str, Any]:
    """RolePool keyword arguments of one role's workers."""
    return dict(
        size=w.size,
        num_cpus=w.num_cpus,
        num_gpus=w.num_gpus,
        max_restarts=w.max_restarts,
        timeout_s=s.call_timeout_s,
    )


def learner_config(s: RLTrainConfig, role: str) -> Any:
    """The policy/value LearnerConfig with the loop's checkpoint settings."""
    base = s.policy if role == "policy" else s.value
    return base.model_copy(
        update={
            "keep_checkpoints": s.keep_checkpoints,
            "hf_checkpoints": False,
            "tensorboard": False,
        }
    )
