"""Stage 6, rl-train: RL-CAI, the policy trained against the preference model (paper sec. 4).

A single-controller loop (veRL's split: control flow here, computation in the roles). Each step:
1. take prompts from the stream (red-team and helpfulness, mixed);
2. the rollout workers sample `group_size` responses per prompt (each records its weight version);
3. at once: reward workers score them, reference workers give the SL-CAI log-probs, the policy
   learners the sampling-time log-probs, and for PPO the critic its values;
4. advantages on the driver (`cai_ray.rl.experience`): PPO with GAE and the KL penalty in the reward,
   or GRPO/RLOO group baselines with KL as a loss term;
5. the policy (and critic) learner groups update;
6. the new weights go to every rollout worker (versioned, through the object store).
Every `checkpoint_every` steps: both groups' DeepSpeed state plus the stream position and the
KL controller; a rerun resumes from there. `algorithm: dpo` trains offline instead: the runner
enters its own driver, `cai_ray.pipeline.rl_dpo`, for the same stage folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cai_ray.config import RunConfig
from cai_ray.data.shards import atomic_write_text, write_manifest
from cai_ray.engines.base import SamplingParams
from cai_ray.errors import CaiRayError, ConfigError
from cai_ray.layout import RL_TRAIN
from cai_ray.pipeline.common import StageContext, ensure_ray

STAGE = RL_TRAIN
SECTIONS = ("rl_train", "models", "data", "generation")  # the config stage 6 depends on (+ DPO)
log = logging.getLogger(__name__)
SCALARS = (
    "reward_mean", "score_mean", "kl", "kl_coef", "entropy", "response_len", "clip_fraction",
    "value_loss", "refusal_rate", "step_time_s",
)  # fmt: skip


def run(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) stage 6; returns its manifest."""
    if cfg.rl_train.algorithm == "dpo":  # a guard, not a branch: the runner enters rl_dpo
        raise ConfigError(
            "rl_train.algorithm=dpo trains offline: its driver is cai_ray.pipeline.rl_dpo",
            where="rl_train.algorithm",
            hint="run the stage through `cai-ray stage rl-train` or `cai-ray run`",
        )
    ctx = StageContext.open(cfg, STAGE, sections=SECTIONS)
    if ctx.finished is not None:
        return ctx.finished
    check_group_sampling(cfg)
    from actors.learner.group import RankDiedError

    ensure_ray(cfg.ray)
    restarts = 0
    while True:
        loop = RLLoop(cfg, ctx, learner_restarts=restarts)
        try:
            return loop.run(progress=progress)
        except RankDiedError as exc:
            # Every role restarts with the groups: the run resumes from its last checkpoint.
            restarts += 1
            if restarts > cfg.rl_train.policy.max_restarts:
                raise
            log.warning("%s; restarting rl-train from its last checkpoint", exc)
        finally:
            loop.shutdown()


def check_group_sampling(cfg: RunConfig) -> None:
    """Several samples per prompt must differ: at temperature 0 (greedy) they would be copies
    of one, with a group advantage of zero (vLLM refuses greedy n > 1 outright)."""
    s = cfg.rl_train
    if s.samples_per_prompt > 1 and (s.temperature or cfg.generation.temperature) == 0:
        raise ConfigError(
            f"temperature 0 is greedy: the {s.samples_per_prompt} samples per prompt "
            "(rl_train.group_size) would be one response copied",
            where="generation.temperature",
            hint="set rl_train.temperature (or generation.temperature) > 0",
        )


class RLLoop:
    """The roles of one rl-train run and the step that drives them."""

    def __init__(self, cfg: RunConfig, ctx: StageContext, *, learner_restarts: int = 0):
        import ray

        from cai_ray.pipeline.rl_roles import check_placement, role_models

        self.cfg, self.ctx, self.s = cfg, ctx, cfg.rl_train
        self.dir = ctx.stage_dir
        self.models = role_models(cfg, ctx)
        check_placement(self.s, ray.cluster_resources())
        self.bad_batches = 0
        self.learner_restarts = learner_restarts
        self.roles: Any = None

    def shutdown(self) -> None:
        if self.roles is not None:
            self.roles.shutdown()

    # -- the loop ----------------------------------------------------------------------------

    def run(self, *, progress: bool) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from actors.learner.metrics import MetricsSink, read_metrics
        from cai_ray.pipeline.rl_checkpoint import RLCheckpoints

        s, t0 = self.s, time.perf_counter()
        ckpt = RLCheckpoints(self.dir, keep=s.keep_checkpoints)
        state = ckpt.latest()
        start = int(state["step"]) if state else 0
        self.stream = self._stream(state)
        from cai_ray.pipeline.rl_roles import RLRoles

        self.roles = RLRoles(self.cfg, self.models, self.dir)
        self.roles.start(state["tag"] if state else None)
        self.policy, self.value = self.roles.policy, self.roles.value
        self.rollout, self.reward, self.reference = (
            self.roles.rollout, self.roles.reward, self.roles.reference,
        )  # fmt: skip
        self.kl = self._kl_controller(state)
        self.bad_batches = int(state["bad_batches"]) if state else 0
        ckpt.drop_rollouts_after(start)
        if start:
            self.roles.sync(start)
        sink = MetricsSink(self.dir, s.policy, resume_step=start, scalars=SCALARS)
        bar = tqdm(total=s.steps, initial=start, disable=not progress, unit="step", desc=STAGE)
        step = start
        try:
            while step < s.steps:
                row = self._step(step + 1, ckpt)
                if row is None:
                    continue
                step += 1
                sink.log([row])
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.3f}")
                if step % s.checkpoint_every == 0 or step == s.steps:
                    if s.snapshots:  # kept for evaluation at several steps (stage 7)
                        self.policy.save_hf(ckpt.snapshot(step))
                    ckpt.save(step, self._state(step), self.roles.groups)
        finally:
            bar.close()
            sink.close()
        self.policy.save_hf(self.dir / "hf")
        return self._manifest(read_metrics(self.dir), time.perf_counter() - t0)

    def _step(self, step: int, ckpt: Any) -> dict[str, Any] | None:
        """One RL step; None when the reward failed and the batch was skipped."""
        # Over 60 lines: the step's six parts (module docstring) read best in one place.
        from cai_ray.feedback.rule_rewards import phrase_rate
        from cai_ray.rl import experience as xp

        s = self.s
        t0 = time.perf_counter()
        prompts = self.stream.take(s.prompts_per_step)
        samples = self._sample(prompts, step)
        t_gen = time.perf_counter()
        seqs = [smp.sequence() for smp in samples]
        items = [{"messages": smp.messages, "response": smp.response} for smp in samples]
        scores_p = self.reward.submit(lambda h, share: h.score.remote(share), items)
        ref_p = self.reference.submit(lambda h, share: h.logprobs.remote(share), seqs)
        if s.old_logprobs == "rollout":
            old = [smp.rollout_logprobs for smp in samples]
        else:
            old = self.policy.infer(seqs)
        values = self.value.infer(seqs) if self.value is not None else None
        ref = ref_p.result()
        try:
            scores = scores_p.result()
            xp.check_finite(scores, what="the reward")
        except Exception as exc:  # a failing or NaN reward skips the batch, up to a limit
            return self._bad_batch(step, exc)
        t_score = time.perf_counter()
        beta = self.kl.beta
        exp = xp.compute_advantages(
            scores=scores, old_logprobs=old, ref_logprobs=ref, values=values, s=self.s, beta=beta
        )
        kl_coef = beta if s.kl_mode == "loss" else 0.0
        policy_p = self.policy.submit_update(
            xp.policy_rows(samples, exp, old, ref, kl_coef=kl_coef), epochs=s.epochs, seed=step
        )
        value_p = None
        if self.value is not None:
            value_p = self.value.submit_update(
                xp.value_rows(samples, exp, values), epochs=s.epochs, seed=step
            )
        p_metrics = policy_p.result()
        v_metrics = value_p.result() if value_p is not None else []
        self.kl.update(exp.stats["kl"], len(samples))
        t_train = time.perf_counter()
        self.roles.sync(step)
        t_sync = time.perf_counter()
        if s.rollout_log:
            ckpt.write_rollouts(step, _rollout_rows(step, samples, scores, exp))
        responses = [smp.response for smp in samples]
        return {
            "step": step,
            "samples": len(samples),
            "prompts": self.stream.split(s.prompts_per_step),
            **exp.stats,
            "kl_coef": beta,
            "response_len": exp.stats["response_tokens"],
            "refusal_rate": phrase_rate(responses, self.cfg.refusal_phrases),
            "loss": xp.mean_of(p_metrics, "loss"),
            "policy_loss": xp.mean_of(p_metrics, "policy_loss"),
            "clip_fraction": xp.mean_of(p_metrics, "clip_fraction"),
            "approx_kl": xp.mean_of(p_metrics, "approx_kl"),
            "entropy": xp.mean_of(p_metrics, "entropy"),
            "grad_norm": xp.mean_of(p_metrics, "grad_norm"),
            "lr": p_metrics[-1]["lr"] if p_metrics else None,
            "value_loss": xp.mean_of(v_metrics, "loss"),
            "value_clip_fraction": xp.mean_of(v_metrics, "value_clip_fraction"),
            "weight_version": samples[0].weight_version,
            "time_generate_s": t_gen - t0,
            "time_score_s": t_score - t_gen,
            "time_train_s": t_train - t_score,
            "time_sync_s": t_sync - t_train,
            "step_time_s": t_sync - t0,
            "samples_per_s": len(samples) / max(t_sync - t0, 1e-9),
            "bad_batches": self.bad_batches,
        }

    def _sample(self, prompts: list[dict[str, Any]], step: int) -> list[Any]:
        from cai_ray.rl.experience import Sample

        s, g = self.s, self.cfg.generation
        params = SamplingParams.of(
            g,
            n=s.samples_per_prompt,
            seed=self.cfg.seed * 1_000_003 + step,  # a resumed step samples what it would have
            temperature=s.temperature or g.temperature,
            max_new_tokens=s.max_new_tokens or g.max_new_tokens,
            logprobs=s.old_logprobs == "rollout",
        )
        gens = self.rollout.map(
            lambda h, share: h.generate.remote(share, params), [p["messages"] for p in prompts]
        )
        return [
            Sample(
                prompt_id=p["prompt_id"],
                source=p["source"],
                group=i,
                index=j,
                messages=p["messages"],
                prompt_ids=out["prompt_ids"],
                response_ids=out["response_ids"],
                response=out["response"],
                finish_reason=out["finish_reason"],
                weight_version=out["weight_version"],
                rollout_logprobs=out["logprobs"],
            )
            for i, (p, outs) in enumerate(zip(prompts, gens, strict=True))
            for j, out in enumerate(outs)
        ]

    def _bad_batch(self, step: int, exc: BaseException) -> None:
        self.bad_batches += 1
        limit = self.s.reward.max_bad_batches
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if self.bad_batches > limit:
            raise CaiRayError(
                f"the reward failed on {self.bad_batches} batches (more than {limit}); "
                f"last: {reason}",
                where="rl_train.reward",
                hint="fix the reward model or function, or raise reward.max_bad_batches",
            ) from None
        log.warning("step %d: batch skipped, the reward failed (%s) [%d of %d allowed]",
                    step, reason, self.bad_batches, limit)  # fmt: skip
        return None

    # -- state -------------------------------------------------------------------------------

    def _kl_controller(self, state: dict[str, Any] | None) -> Any:
        from cai_ray.rl import algorithms

        k = self.s.kl
        kind = algorithms.pick(algorithms.KL_CONTROLLERS, k.controller, what="kl controller")
        ctl = kind.build(k.beta, target=k.target, horizon=k.horizon)
        if state is not None:
            ctl.load_state_dict(state["kl"])
        return ctl

    def _stream(self, state: dict[str, Any] | None) -> Any:
        from cai_ray.models import load_tokenizer
        from cai_ray.pipeline.rl_stream import PromptStream, SourceCursor, prompt_fits

        cfg, s = self.cfg, self.s
        fits = prompt_fits(
            load_tokenizer(self.models.policy.path),
            fmt=self.models.policy.prompt_format(cfg.format),
            budget=_max_context(self.models.policy.path)
            - (s.max_new_tokens or cfg.generation.max_new_tokens),
        )
        saved = state["stream"] if state else {}
        cursors = {
            name: SourceCursor(
                name,
                spec,
                turns=cfg.data.turns,
                limit=cfg.data.limit,
                fits=fits,
                timeout_s=cfg.ray.batch_timeout_s,
                **saved.get(name, {}),
            )
            for name, spec in (("red_team", cfg.data.red_team), ("helpful", cfg.data.helpful))
        }
        return PromptStream(cursors, helpful_fraction=s.helpful_fraction)

    def _state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "stream": self.stream.state(),
            "kl": self.kl.state_dict(),
            "bad_batches": self.bad_batches,
            "algorithm": self.s.algorithm,
            "samples_per_step": self.s.samples_per_step,
        }

    def _manifest(self, history: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        rejects = self.stream.rejects()
        atomic_write_text(
            self.dir / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects)
        )
        first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5) :]
        from cai_ray.data.shards import reject_counts
        from cai_ray.rl.experience import mean_of

        manifest = self.ctx.manifest(
            inputs={"red_team": self.cfg.data.red_team, "helpful": self.cfg.data.helpful},
            outputs={
                "hf_dir": str(self.dir / "hf"),
                "steps": len(history),
                "samples": sum(int(r["samples"]) for r in history),
                "reward_first": mean_of(first, "reward_mean"),
                "reward_last": mean_of(last, "reward_mean"),
                "kl_last": mean_of(last, "kl"),
                "bad_batches": self.bad_batches,
                "rollout_restarts": self.rollout.restarts,
                "learner_restarts": self.learner_restarts,
                "rejects": len(rejects),
                "reject_reasons": reject_counts(rejects),
            },
            algorithm=self.s.algorithm,
            weight_sync=self.roles.sync_record(),
            stream=self.stream.state(),
            models={
                "policy": self.models.policy.id,
                "reward": self.models.reward.id if self.models.reward else self.s.reward.function,
                "value_init": self.models.value_init_from,
            },
            timings={
                "total_s": round(seconds, 3),
                **{
                    k: round(sum(float(r[k]) for r in history), 3)
                    for k in ("time_generate_s", "time_score_s", "time_train_s", "time_sync_s")
                },
            },
        )
        return write_manifest(self.dir, manifest)


def _max_context(path: Path) -> int:
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings", 2048))


def _rollout_rows(step: int, samples: list[Any], scores: list[float], exp: Any) -> list[dict]:
    """One row per sample: the transparency record of what was sampled and how it scored."""
    return [
        {
            "step": step,
            "prompt_id": smp.prompt_id,
            "source": smp.source,
            "sample": smp.index,
            "messages": smp.messages,
            "response": smp.response,
            "score": float(score),
            "reward": float(reward),
            "kl": float(kl),
            "response_tokens": len(smp.response_ids),
            "prompt_ids": list(smp.prompt_ids),  # the exact tokens the policy read and wrote
            "response_ids": list(smp.response_ids),
            "finish_reason": smp.finish_reason,
            "weight_version": smp.weight_version,
        }
        for smp, score, reward, kl in zip(samples, scores, exp.rewards, exp.kl, strict=True)
    ]
