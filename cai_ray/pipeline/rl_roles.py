"""Stage 6 set-up: which model each RL role loads, whether the roles fit, and starting them.

The roles (DESIGN.md, stage 6): rollout workers (the policy, synced every step), reward workers
(the PM, direct RLAIF or a function), reference workers (the frozen SL-CAI policy), and learner
groups for the policy and, for PPO, the critic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.config import ModelConfig, RunConfig, WorkersConfig
from cai_ray.config.rl import RLTrainConfig, RLWorkersConfig
from cai_ray.data.shards import atomic_write_text
from cai_ray.errors import CaiRayError, ConfigError, DataError
from cai_ray.layout import PM_TRAIN, trained_model_dir
from cai_ray.pipeline.common import ModelRef, StageContext, check_pool_fits, policy_model


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
        pm = Path(s.reward.model) if s.reward.model else trained_model_dir(cfg.run_dir, PM_TRAIN)
        if not (pm / "config.json").is_file():
            raise DataError(
                "rl-train needs a preference model and there is none",
                where=str(pm),
                hint="run `cai-ray stage pm-train CONFIG` first, or set rl_train.reward.model",
            )
        reward = ctx.model(ModelConfig(path=str(pm)), head="classification")
    elif s.reward.kind == "rlaif":
        spec = ModelConfig(path=s.reward.model) if s.reward.model else cfg.models.feedback_model
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

    pools: dict[str, WorkersConfig] = {}
    for name, w in (("rollout", s.rollout), ("reward", s.reward_workers), ("ref", s.reference)):
        if w.size:
            pools[name] = w
    learners = [("policy", s.policy)] + ([("value", s.value)] if s.algorithm == "ppo" else [])
    for name, lc in learners:
        if lc.num_ranks:
            pools[f"{name} learner"] = WorkersConfig(
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


class RLRoles:
    """The actors of one rl-train run: policy (and critic) learner groups, rollout, reward and
    reference pools, and the weight sync from the policy group to the rollout workers."""

    def __init__(self, cfg: RunConfig, models: RoleModels, stage_dir: Path):
        self.cfg, self.s, self.models, self.dir = cfg, cfg.rl_train, models, Path(stage_dir)
        self.version, self.weights, self.sync_mode = 0, None, "object_store"
        self.rollout_engine: tuple[str, str] = ("", "")  # (kind, device) the workers report
        self.pools: list[Any] = []
        self.groups: list[Any] = []
        self.value: Any = None

    def start(self, resume_tag: str | None) -> None:
        """Start the learner groups (loading `resume_tag`), then the worker pools."""
        # Over 60 lines: one role per block, in start order; split, the order would hide.
        from actors.learner.rl import RLLearnerGroup
        from actors.rl_workers import ReferenceWorker, RewardWorker, RLRolloutWorker
        from actors.role_pool import RolePool
        from cai_ray.models import load_tokenizer
        from cai_ray.rl.objectives import PolicyObjective, ValueObjective

        s, cfg, m = self.s, self.cfg, self.models
        self.pad_id = int(load_tokenizer(m.policy.path).pad_token_id or 0)
        colocated = s.placement == "colocated"
        extra = {"CPU": s.rollout.num_cpus, "GPU": s.rollout.num_gpus} if colocated else None
        policy_obj = PolicyObjective(
            pad_id=self.pad_id,
            clip_eps=s.clip_eps,
            kl_estimator=s.kl_estimator,
            entropy_coef=s.entropy_coef,
            share_prefix=s.policy.share_prefix,
        )
        self.policy = RLLearnerGroup(
            learner_config(s, "policy"),
            policy_obj,
            m.policy.path,
            self.dir / "policy",
            extra_bundle=extra,
        )
        self.groups.append(self.policy)
        total = s.steps * s.updates_per_step()
        self.policy.start(total, resume_tag=resume_tag)
        self.value = None
        if s.algorithm == "ppo":
            vcfg = learner_config(s, "value")
            self.value = RLLearnerGroup(
                vcfg,
                ValueObjective(pad_id=self.pad_id, clip_eps=s.value_clip_eps),
                m.value_init,
                self.dir / "value",
            )
            self.groups.append(self.value)
            steps = s.epochs * s.samples_per_step // vcfg.global_batch
            self.value.start(s.steps * steps, resume_tag=resume_tag)

        def engine(w: RLWorkersConfig) -> Any:
            return w.engine or cfg.engine

        self.rollout = RolePool(
            "rollout",
            RLRolloutWorker,
            str(m.policy.path),
            engine(s.rollout).model_copy(update={"batch_size": s.rollout.batch_size}),
            fmt=m.policy.prompt_format(cfg.format),
            model_id=m.policy.id,
            scheduling=colocated_strategies(self.policy, s.rollout.size) if colocated else None,
            **worker_options(s.rollout, s),
        )
        self.rollout.on_restart = self._reload
        self.reward = RolePool(
            "reward_workers",
            RewardWorker,
            s.reward,
            model_path=str(m.reward.path) if m.reward else None,
            engine=engine(s.reward_workers),
            batch_size=s.reward_workers.batch_size,
            refusal_phrases=cfg.refusal_phrases,
            **worker_options(s.reward_workers, s),
        )
        self.reference = RolePool(
            "reference",
            ReferenceWorker,
            str(m.policy.path),
            engine(s.reference),
            batch_size=s.reference.batch_size,
            pad_id=self.pad_id,
            **worker_options(s.reference, s),
        )
        self.pools += [self.rollout, self.reward, self.reference]
        # Model loading is start-up, not a call: it gets the placement timeout, not the call's.
        wait = s.policy.placement_timeout_s + s.call_timeout_s
        pids = {p.name: p.ready(wait) for p in self.pools}
        # Which process holds which role: for `kill -9` drills and for reading worker logs.
        atomic_write_text(self.dir / "workers.json", json.dumps(pids, indent=1) + "\n")
        self._open_weight_sync()

    def _open_weight_sync(self) -> None:
        """Object store everywhere; NCCL from rank 0 into vLLM engines where both are on GPUs."""
        from actors.learner.weight_sync import resolve_weight_sync

        s = self.s
        engines = set(self.rollout.broadcast(lambda h, _: h.engine_info.remote()))
        kind, device = engines.pop() if len(engines) == 1 else ("mixed", "mixed")
        self.rollout_engine = (kind, device)
        self.sync_mode = resolve_weight_sync(
            s.weight_sync,
            rollout_engine=kind,
            rollout_device=device,
            policy_gpus=s.policy.gpus_per_rank,
            ranks=s.policy.num_ranks,
            colocated=s.placement == "colocated",
        )
        if self.sync_mode != "nccl":
            return
        tp = self.cfg.engine.vllm.tensor_parallel_size
        world = 1 + len(self.rollout) * tp
        addr, port = self.policy.weight_group_address()
        index = {id(h): i for i, h in enumerate(self.rollout.handles)}  # worker i: ranks 1 + i*tp..
        joins = self.rollout.submit_all(
            lambda h, _: h.join_weight_group.remote(addr, port, 1 + index[id(h)] * tp, world)
        )
        self.weight_meta = self.policy.open_weight_group(addr, port, world)
        joins.result()

    def sync_record(self) -> dict[str, str]:
        """For the manifest: how weights reached the rollout engines, and which engines."""
        kind, device = self.rollout_engine
        return {"mode": self.sync_mode, "rollout_engine": kind, "rollout_device": device}

    def _reload(self, handle: Any) -> None:
        """A restarted rollout worker holds the initial weights: give it the current ones."""
        if self.sync_mode == "nccl":
            raise CaiRayError(
                "a rollout worker restarted and cannot rejoin the NCCL weight group",
                where="rl_train.weight_sync",
                hint="rerun the same command: the run resumes from its last checkpoint",
            )
        if self.version:
            self.rollout._wait(
                handle.load_weights.remote(self.weights, version=self.version), what="weights"
            )

    def shutdown(self) -> None:
        """Stop every actor (safe to call twice)."""
        for part in [*self.pools, *self.groups]:
            part.shutdown()
        self.pools, self.groups = [], []

    def sync(self, version: int) -> None:
        """The policy's weights to every rollout worker, tagged with `version` (the step)."""
        self.version = version
        if self.sync_mode == "nccl":
            meta = self.weight_meta
            received = self.rollout.submit_all(
                lambda h, _: h.receive_weights.remote(meta, version=version)
            )
            self.policy.broadcast_weights()
            received.result()
            return
        self.weights = weights = self.policy.weights()
        self.rollout.broadcast(lambda h, _: h.load_weights.remote(weights, version=version))


def colocated_strategies(group: Any, n: int) -> list[Any]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return [
        PlacementGroupSchedulingStrategy(
            placement_group=group.placement_group, placement_group_bundle_index=i
        )
        for i in range(n)
    ]
