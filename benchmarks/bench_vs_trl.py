"""The learner group against TRL (a benchmark-only dependency, `pip install -e ".[bench]"`).

Same model (a preset), same rows, micro-batch, fp32 and threads on both sides, and activation
checkpointing off on both (TRL's configs turn it on by default; `--checkpointing` adds both
sides with it on), and TRL as a single process (refused if Accelerate sets it up as
distributed). Every side runs in this one process, alternating (cai-ray, TRL, cai-ray,
TRL, ...) so both see the same background load; the best
of the repeats is kept. (1) SFT tokens/s: LearnerGroup + SFTObjective in-process (`num_ranks: 0`)
vs TRL `SFTTrainer` on pre-tokenised rows with a completion mask (response-only loss). (2) PM
pairs/s: LearnerGroup + PreferenceObjective vs TRL `RewardTrainer` (sequence-classification head,
Bradley-Terry loss), on pairs whose two sides share their first `--pm-shared` (0.5) of tokens,
as a conversation with two answers does (cai-ray also with `share_prefix` off: separate rows),
and on pairs with independent sides (`pm-independent`). (3) RL samples/s: the real stage-6 loop (`rl_train`, GRPO, the local-tiny
roles as Ray actors, a rule reward) vs TRL `GRPOTrainer` on the prompts cai-ray sampled, same
group size, new tokens, reward function, beta, lr and one optimizer step per RL step, with
each step's time split (cai-ray: its metrics' generate / score / train / sync; TRL: its
`_generate`, the rest of `_generate_and_score_completions` (reward, reference log-probs) and the
update). The first `--warmup` (2) steps of each run are not timed: cai-ray from its metrics'
`step_time_s` (collate included), TRL from the wall time between step ends (data loading
included). Writes
benchmarks/results/bench_vs_trl.json.

`--varied`: SFT and PM on 800 rows of varied length (no RL row), 50 steps, each side as
it comes and with length-grouped batches (learner.group_by_length; TRL
train_sampling_strategy="group_by_length"), and TRL's padding-free SFT collator; tokens/s
counts each step's unpadded tokens on both sides. Writes bench_vs_trl-varied.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_vs_trl.py [--steps 16] [--repeats 2]
        [--only rl] [--rl-steps 8] [--varied]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_sl_train import synthetic_rows
from timing import write_results

from actors.learner.group import LearnerGroup
from actors.learner.metrics import read_metrics
from cai_ray.config import ModelConfig, load_config
from cai_ray.config.learner import LearnerConfig
from cai_ray.feedback.pm_objective import PreferenceObjective
from cai_ray.models import default_cache_dir, ensure_model
from cai_ray.sl.objective import SFTObjective

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_vs_trl.json"
RL_REWARD = "cai_ray.feedback.rule_rewards:length_target"
RL_TARGET_CHARS = 8
RL_SPLIT = ("time_generate_s", "time_score_s", "time_train_s", "time_sync_s")
# cai-ray's RL side for one machine: every role in the driver (no object-store weight sync, no
# Ray round trips), the step's 16 samples in one decode batch (local-tiny: 8), and the rollout engine's fp32 log-probs
# as the old policy's (one update per step: the policy that sampled is the one that trains).
RL_ONE_MACHINE = [
    "rl_train.rollout.size=0",
    "rl_train.reward_workers.size=0",
    "rl_train.reference.size=0",
    "rl_train.old_logprobs=rollout",
    "rl_train.rollout.batch_size=16",
]


def pair_rows(
    n: int, seq_len: int, vocab: int, varied: bool = False, shared: float = 0.5
) -> list[dict]:
    """Random preference pairs, A preferred: one conversation and two answers, as a PM's rows
    are (`pm_text`). Fixed: `seq_len` tokens per side, the first `shared` of them the common
    conversation. `varied`: a conversation of 1/8 to 1x `seq_len` tokens (times 2 * `shared`)
    and answers of 1/8 to 1x each. `shared=0`: independent sides (no common prefix)."""
    g = torch.Generator().manual_seed(1)

    def tokens(size: int) -> list[int]:
        return torch.randint(10, vocab, (size,), generator=g).tolist()

    def between(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    rows = []
    for i in range(n):
        if varied:
            prompt = tokens(int(between(seq_len // 8, seq_len) * 2 * shared))
            a, b = tokens(between(seq_len // 8, seq_len)), tokens(between(seq_len // 8, seq_len))
        else:
            prompt = tokens(int(seq_len * shared))
            a, b = tokens(seq_len - len(prompt)), tokens(seq_len - len(prompt))
        rows.append({"idx": i, "ids_a": prompt + a, "ids_b": prompt + b, "label": 1.0})
    return rows


def varied_rows(n: int, seq_len: int, vocab: int) -> list[dict]:
    """SFT rows of 1/8 to 2x `seq_len` tokens (uniform), the first 20-60% a prompt (no loss):
    the spread of real (prompt, revision) rows, where padding and batching start to matter."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        size = int(torch.randint(seq_len // 8, 2 * seq_len + 1, (1,), generator=g))
        ids = torch.randint(10, vocab, (size,), generator=g).tolist()
        cut = int(size * (0.2 + 0.4 * float(torch.rand(1, generator=g))))
        rows.append({"idx": i, "input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def cai_ray(
    model_dir: Path,
    rows: list[dict],
    objective,
    args,
    unit: str,
    ranks: int = 0,
    compile=False,
    group=False,
    checkpointing=False,
) -> float:
    config = LearnerConfig(
        num_ranks=ranks,
        compile=compile,
        gradient_checkpointing=checkpointing,
        group_by_length=group,
        micro_batch_size=args.micro_batch,
        max_steps=args.steps,
        lr=1e-4,
        max_seq_len=2 * args.seq_len,
        tensorboard=False,
        hf_checkpoints=False,
        shuffle=False,
        cpus_per_rank=args.threads,
    )
    out = Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    try:
        with LearnerGroup(config, objective, model_dir, out) as g:
            g.fit(rows, progress=False)
        steps = read_metrics(out)[args.warmup :]  # the first steps warm up
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seconds = sum(s["step_time_s"] for s in steps)
    if unit == "tokens":
        return sum(s["tokens"] for s in steps) / seconds
    return len(steps) * args.micro_batch / seconds  # pairs


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *_a, **_k):
            self.ends.append(time.perf_counter())

    return StepClock()


# What every TRL side shares: clipping, a constant LR, fp32 on CPU, no logging, saving or workers.
# TRL's configs turn activation checkpointing on by default (an extra forward per step); the
# learner's default is off, so each TRL side sets it to what its cai-ray side runs with.
TRL_COMMON = dict(
    max_grad_norm=1.0,
    lr_scheduler_type="constant",
    logging_strategy="no",
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    bf16=False,
    fp16=False,
    dataloader_num_workers=0,
    disable_tqdm=True,
    seed=0,
)


def _train(trainer) -> None:
    """`trainer.train()`, refusing to time a TRL that Accelerate set up as distributed (DDP:
    a gloo all-reduce and an unused-parameter search per step, which a plain run does not pay),
    as it was while the in-process learner left its RANK/WORLD_SIZE/... behind."""
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type != DistributedType.NO:
        raise RuntimeError(
            f"TRL would run as {trainer.accelerator.distributed_type} (a DDP-wrapped model): "
            "its side must run as a single process: unset RANK, WORLD_SIZE, LOCAL_RANK"
        )
    trainer.train()


def _trl_args(cls, out: str, args, compile=False, group=False, checkpointing=False):
    return cls(
        torch_compile=compile,
        gradient_checkpointing=checkpointing,
        train_sampling_strategy="group_by_length" if group else "random",
        output_dir=out,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=1e-4,
        **TRL_COMMON,
        max_length=2 * args.seq_len,
        dataset_num_proc=None,
    )


def _counting(collator, counts: list[int], key: str):
    """`collator`, recording each batch's unpadded tokens (the rows' `key` lengths) in order."""

    def collate(examples):
        counts.append(sum(len(e[key]) for e in examples))
        return collator(examples)

    return collate


def trl_sft(
    model_dir: Path,
    rows: list[dict],
    args,
    compile=False,
    group=False,
    padding_free=False,
    checkpointing=False,
) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list(
        [
            {"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]}
            for r in rows
        ]
    )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="bench-trl-sft-")
    try:
        cfg = _trl_args(SFTConfig, out, args, compile, group, checkpointing)
        cfg.completion_only_loss = True
        cfg.packing = False
        cfg.padding_free = padding_free
        if padding_free:  # TRL: padding-free without packing does not cut; the rows fit
            cfg.max_length = None
        clock = _step_clock()
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                             callbacks=[clock])  # fmt: skip
        counts: list[int] = []
        trainer.data_collator = _counting(trainer.data_collator, counts, "input_ids")
        _train(trainer)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # tokens as the learner counts them: every unpadded token of the step's rows (prompt
    # included); step i trains on the i-th collated batch, the warm-up steps not timed
    steps, w = len(clock.ends), args.warmup
    return sum(counts[w:steps]) / (clock.ends[-1] - clock.ends[w - 1])


def trl_pm(
    model_dir: Path, rows: list[dict], args, compile=False, group=False, checkpointing=False
) -> float:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    data = Dataset.from_list(
        [{"chosen_ids": r["ids_a"], "rejected_ids": r["ids_b"],
          "length": max(len(r["ids_a"]), len(r["ids_b"]))} for r in rows]
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tok.pad_token_id
    out = tempfile.mkdtemp(prefix="bench-trl-pm-")
    try:
        cfg = _trl_args(RewardConfig, out, args, compile, group, checkpointing)
        cfg.length_column_name = "length"  # what group_by_length sorts by
        cfg.remove_unused_columns = not group  # else the sampler never sees that column
        clock = _step_clock()
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                                callbacks=[clock])  # fmt: skip
        _train(trainer)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    w = args.warmup
    return args.micro_batch * (len(clock.ends) - w) / (clock.ends[-1] - clock.ends[w - 1])


def rl_sets(model_dir: Path, run_dir: Path, args, extra: list[str]) -> list[str]:
    """cai-ray's side of the RL row: configs/local-tiny.yaml with GRPO and the bench's sizes."""
    samples = args.rl_prompts * args.rl_group
    return [
        f"run_dir={run_dir}",
        f"models.helpful={{path: {model_dir}}}",
        f"engine.threads={args.threads}",
        f"generation.max_new_tokens={args.rl_tokens}",
        "rl_train.algorithm=grpo",
        f"rl_train.group_size={args.rl_group}",
        f"rl_train.prompts_per_step={args.rl_prompts}",
        f"rl_train.steps={args.rl_steps}",
        f"rl_train.checkpoint_every={args.rl_steps}",
        "rl_train.snapshots=false",
        "rl_train.reward.kind=function",
        f"rl_train.reward.function={RL_REWARD}",
        f"rl_train.reward.kwargs={{target_chars: {RL_TARGET_CHARS}}}",
        f"rl_train.kl.beta={args.rl_beta}",
        f"rl_train.policy={{micro_batch_size: {samples}, lr: 1.0e-5, "
        f"cpus_per_rank: {args.threads}}}",
        *extra,
        *args.rl_set,
    ]


def cai_ray_rl(model_dir: Path, args, prompts: list[str], extra: list[str]) -> dict:
    """One rl_train run; fills `prompts` (rendered as the policy read them) for TRL's side."""
    from cai_ray.data.conversation import PromptFormat
    from cai_ray.pipeline import rl_train
    from cai_ray.pipeline.rl_checkpoint import read_rollouts

    run_dir = Path(tempfile.mkdtemp(prefix="bench-vs-trl-rl-"))
    try:
        rl_train.run(load_config(ROOT / "configs/local-tiny.yaml", rl_sets(model_dir, run_dir, args, extra)),
                     progress=False)  # fmt: skip
        rows = read_metrics(run_dir / "rl-train")[args.warmup :]  # start-up, warm-up
        if not prompts:
            fmt = PromptFormat.of("transcript").load(model_dir)
            rollouts = read_rollouts(run_dir / "rl-train")
            first = rollouts[rollouts["sample"] == 0].sort_values(["step"], kind="stable")
            prompts += [fmt.render_messages(list(m)) for m in first["messages"]]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    seconds = sum(r["step_time_s"] for r in rows)
    return {
        "value": sum(r["samples"] for r in rows) / seconds,
        "split": {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in RL_SPLIT},
        "step_s": round(seconds / len(rows), 4),
        "response_tokens": round(sum(r["response_len"] for r in rows) / len(rows), 2),
    }


def rl_reward(prompts, completions, **_):
    """The rule reward of cai-ray's side, on the response as cai-ray's reward worker reads it."""
    from cai_ray.feedback.rule_rewards import length_target

    return length_target(prompts, [c.strip() for c in completions], target_chars=RL_TARGET_CHARS)


def trl_grpo(model_dir: Path, args, prompts: list[str], checkpointing=False) -> dict:
    """TRL GRPOTrainer on the same prompts, in order; its step split from wrapped methods."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="bench-trl-grpo-")
    samples = args.rl_prompts * args.rl_group
    try:
        cfg = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=samples,
            gradient_accumulation_steps=1,
            num_generations=args.rl_group,
            max_completion_length=args.rl_tokens,
            temperature=1.0,
            top_p=1.0,
            beta=args.rl_beta,
            max_steps=args.rl_steps,
            learning_rate=1e-5,
            shuffle_dataset=False,
            gradient_checkpointing=checkpointing,
            **TRL_COMMON,
        )
        clock = _step_clock()
        trainer = GRPOTrainer(model=model, reward_funcs=rl_reward, args=cfg,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                              processing_class=tok, callbacks=[clock])  # fmt: skip
        spans: dict[str, list[float]] = {"generate": [], "generate_and_score": []}
        for name, key in (("_generate", "generate"), ("_generate_and_score_completions",
                                                       "generate_and_score")):  # fmt: skip
            inner = getattr(trainer, name)

            def timed(*a, _inner=inner, _key=key, **k):
                t0 = time.perf_counter()
                try:
                    return _inner(*a, **k)
                finally:
                    spans[_key].append(time.perf_counter() - t0)

            setattr(trainer, name, timed)
        _train(trainer)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    w = args.warmup
    steps = len(clock.ends) - w  # the first steps warm up
    seconds = clock.ends[-1] - clock.ends[w - 1]
    gen = sum(spans["generate"][w:]) / steps
    gen_score = sum(spans["generate_and_score"][w:]) / steps
    return {
        "value": samples * steps / seconds,
        "split": {
            "time_generate_s": round(gen, 4),
            "time_score_s": round(gen_score - gen, 4),  # reward + reference log-probs
            "time_train_s": round(seconds / steps - gen_score, 4),  # the update, the loop
        },
        "step_s": round(seconds / steps, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-20m")
    parser.add_argument("--seq-len", type=int, default=256, help="SFT tokens per row")
    parser.add_argument("--pm-seq-len", type=int, default=128, help="PM tokens per side")
    parser.add_argument("--pm-shared", type=float, default=0.5,
                        help="fraction of a PM side that is the pair's common conversation "
                        "(0: independent sides; else also a pm-independent row)")  # fmt: skip
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="16; --varied: 50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2,
                        help="steps not timed on every side (a fresh process's first two are "
                        "slow: kernel and allocator warm-up; a Ray actor's more than the "
                        "driver's)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["sft", "pm", "pm-independent", "rl"], default=None)
    parser.add_argument("--rl-steps", type=int, default=8, help="RL steps per run (1st untimed)")
    parser.add_argument("--rl-prompts", type=int, default=4, help="prompts per RL step")
    parser.add_argument("--rl-group", type=int, default=4, help="samples per prompt")
    parser.add_argument("--rl-tokens", type=int, default=16, help="new tokens per sample")
    parser.add_argument("--rl-beta", type=float, default=0.001, help="KL coefficient (loss)")
    parser.add_argument("--rl-set", action="append", default=[],
                        help="a further --set for cai-ray's rl_train (repeatable)")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/bench_vs_trl*.json"
    )
    parser.add_argument(
        "--varied",
        action="store_true",
        help="SFT and PM on rows of varied length (SFT 1/8-2x --seq-len, PM sides 1/4-2x "
        "--pm-seq-len), each side also with length-grouped batches (learner.group_by_length / "
        "TRL train_sampling_strategy=group_by_length) and TRL padding-free SFT; no RL row",
    )
    parser.add_argument(
        "--actor",
        action="store_true",
        help="also SFT, PM and the RL step's policy on 1 rank as a Ray actor (one more side)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also both sides with torch.compile (learner.compile / TRL torch_compile)",
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="also both sides with activation checkpointing (learner.gradient_checkpointing / "
        "TRL's own default, gradient_checkpointing=True; the plain sides run without)",
    )
    args = parser.parse_args()
    try:
        import trl
    except ImportError:  # a benchmark-only peer: run_all goes on without it
        print("bench_vs_trl left out: TRL is not installed (`make install-bench`)")
        return

    torch.set_num_threads(args.threads)
    model_dir = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    meta = json.loads((model_dir / "config.json").read_text())
    vocab, pad = meta["vocab_size"], meta.get("pad_token_id") or 0
    args.steps = args.steps or (50 if args.varied else 16)
    n = args.steps * args.micro_batch
    if args.varied:
        # 800 rows: HF's length grouping then sorts its full window (50 batches = the 50 timed
        # steps; fewer rows shrink it); cai-ray's window is 64 global batches, steps shuffled
        n = max(n, 800)
    if args.varied:
        sft_rows = varied_rows(n, args.seq_len, vocab)
    else:
        sft_rows = synthetic_rows(n, args.seq_len, vocab)
    pm = pair_rows(n, args.pm_seq_len, vocab, varied=args.varied, shared=args.pm_shared)
    independent = pair_rows(n, args.pm_seq_len, vocab, varied=args.varied, shared=0.0)
    pm_args = argparse.Namespace(**{**vars(args), "seq_len": args.pm_seq_len})
    sides = {
        "sft": {
            "cai-ray": lambda: cai_ray(model_dir, sft_rows, SFTObjective(), args, "tokens"),
            "trl": lambda: trl_sft(model_dir, sft_rows, args),
        },
        "pm": {
            "cai-ray": lambda: cai_ray(model_dir, pm, PreferenceObjective(pad_id=pad), pm_args,
                                       "pairs"),
            "trl": lambda: trl_pm(model_dir, pm, pm_args),
            "cai-ray separate rows": lambda: cai_ray(
                model_dir, pm, PreferenceObjective(pad_id=pad, share_prefix=False), pm_args,
                "pairs"),
        },
        "pm-independent": {  # sides with no common prefix: what sharing cannot help
            "cai-ray": lambda: cai_ray(model_dir, independent, PreferenceObjective(pad_id=pad),
                                       pm_args, "pairs"),
            "trl": lambda: trl_pm(model_dir, independent, pm_args),
        },
    }  # fmt: skip
    if not args.pm_shared:
        del sides["pm-independent"]
    if args.varied:
        sides["sft"]["cai-ray grouped"] = lambda: cai_ray(
            model_dir, sft_rows, SFTObjective(), args, "tokens", group=True
        )
        sides["sft"]["trl grouped"] = lambda: trl_sft(model_dir, sft_rows, args, group=True)
        sides["sft"]["trl padding-free"] = lambda: trl_sft(
            model_dir, sft_rows, args, padding_free=True
        )
        sides["pm"]["cai-ray grouped"] = lambda: cai_ray(
            model_dir, pm, PreferenceObjective(pad_id=pad), pm_args, "pairs", group=True
        )
        sides["pm"]["trl grouped"] = lambda: trl_pm(model_dir, pm, pm_args, group=True)
    rl_prompts: list[str] = []  # filled by cai-ray's first RL run, then TRL's dataset
    sides["rl"] = {
        "cai-ray": lambda: cai_ray_rl(model_dir, args, rl_prompts, RL_ONE_MACHINE),
        "trl": lambda: trl_grpo(model_dir, args, rl_prompts),
        "cai-ray local-tiny roles": lambda: cai_ray_rl(model_dir, args, rl_prompts, []),
    }
    if args.varied:
        del sides["rl"]
    if args.actor or (args.only in (None, "rl") and "rl" in sides):
        import ray

        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    if args.actor and "rl" in sides:  # the one-machine roles, the policy learner as an actor
        sides["rl"]["cai-ray 1 rank (actor)"] = lambda: cai_ray_rl(
            model_dir, args, rl_prompts, [*RL_ONE_MACHINE, "rl_train.policy.num_ranks=1"]
        )
    if args.actor:
        sides["sft"]["cai-ray 1 rank (actor)"] = lambda: cai_ray(
            model_dir, sft_rows, SFTObjective(), args, "tokens", ranks=1
        )
        sides["pm"]["cai-ray 1 rank (actor)"] = lambda: cai_ray(
            model_dir, pm, PreferenceObjective(pad_id=pad), pm_args, "pairs", ranks=1
        )
    if args.compile:
        sides["sft"]["cai-ray compiled"] = lambda: cai_ray(
            model_dir, sft_rows, SFTObjective(), args, "tokens", compile=True
        )
        sides["sft"]["trl compiled"] = lambda: trl_sft(model_dir, sft_rows, args, compile=True)
        sides["pm"]["cai-ray compiled"] = lambda: cai_ray(
            model_dir, pm, PreferenceObjective(pad_id=pad), pm_args, "pairs", compile=True
        )
        sides["pm"]["trl compiled"] = lambda: trl_pm(model_dir, pm, pm_args, compile=True)
    if args.checkpointing:
        sides["sft"]["cai-ray checkpointing"] = lambda: cai_ray(
            model_dir, sft_rows, SFTObjective(), args, "tokens", checkpointing=True
        )
        sides["sft"]["trl checkpointing"] = lambda: trl_sft(
            model_dir, sft_rows, args, checkpointing=True
        )
        sides["pm"]["cai-ray checkpointing"] = lambda: cai_ray(
            model_dir, pm, PreferenceObjective(pad_id=pad), pm_args, "pairs", checkpointing=True
        )
        sides["pm"]["trl checkpointing"] = lambda: trl_pm(
            model_dir, pm, pm_args, checkpointing=True
        )
        if "rl" in sides:
            sides["rl"]["cai-ray checkpointing"] = lambda: cai_ray_rl(
                model_dir, args, rl_prompts,
                [*RL_ONE_MACHINE, "rl_train.policy.gradient_checkpointing=true"],
            )  # fmt: skip
            sides["rl"]["trl checkpointing"] = lambda: trl_grpo(
                model_dir, args, rl_prompts, checkpointing=True
            )
    loads = [os.getloadavg()[0]]
    runs: dict[str, dict[str, list[float]]] = {}
    splits: dict[str, dict[str, list[dict]]] = {}
    for task, fns in sides.items():
        if args.only and task != args.only:
            continue
        runs[task] = {name: [] for name in fns}
        for rep in range(args.repeats):  # A B A B ...
            for name, fn in fns.items():
                value = fn()
                if isinstance(value, dict):  # the RL row: samples/s and the step's split
                    splits.setdefault(task, {}).setdefault(name, []).append(value)
                    value = value["value"]
                runs[task][name].append(value)
                loads.append(os.getloadavg()[0])
                print(json.dumps({"task": task, "side": name, "repeat": rep, "value": value,
                                  "split": splits.get(task, {}).get(name, [None])[-1]}))  # fmt: skip
    unit = {"sft": "tokens/s", "pm": "pairs/s", "pm-independent": "pairs/s", "rl": "samples/s"}
    table = [
        {
            "task": task,
            "unit": unit[task],
            "cai_ray": round(max(v["cai-ray"]), 2),
            "trl": round(max(v["trl"]), 2),
            "ratio_cai_ray_over_trl": round(max(v["cai-ray"]) / max(v["trl"]), 3),
            **{
                f"ratio_{k.replace(' ', '_')}_over_trl": round(max(x) / max(v["trl"]), 3)
                for k, x in v.items()
                if k not in ("cai-ray", "trl")
            },
            "all_runs": v,
            **({"splits": splits[task]} if task in splits else {}),
        }
        for task, v in runs.items()
    ]
    report = {
        "preset": args.preset,
        "rows": "varied length" if args.varied else "fixed length",
        "sft_tokens_per_row": args.seq_len,
        "pm_tokens_per_side": args.pm_seq_len,
        "pm_shared_fraction": args.pm_shared,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "rl": {"steps": args.rl_steps, "prompts_per_step": args.rl_prompts, "group": args.rl_group,
               "new_tokens": args.rl_tokens, "beta": args.rl_beta, "reward": RL_REWARD,
               "target_chars": RL_TARGET_CHARS, "cai_ray_sets": RL_ONE_MACHINE + args.rl_set},
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "dtype": "float32",
        "peer": f"trl {trl.__version__}",
        "trl": trl.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_average_1m": loads,
        "results": table,
        "figures": [
            {"name": f"{r['task']} {r['unit']} cai-ray / TRL", "value": r["ratio_cai_ray_over_trl"],
             "unit": "ratio"}
            for r in table
        ],
    }  # fmt: skip
    out = args.out or (RESULTS.with_stem(f"{RESULTS.stem}-varied") if args.varied else RESULTS)
    write_results(out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
