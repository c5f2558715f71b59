"""Before/after ratios of the tuning choices, each pair measured in this one run.

- padding, generation: `HFEngine.generate` over prompts of mixed length, longest first in
  batches (the engine) vs batches in arrival order (what the engine did not do).
- padding, SFT: the learner group in-process on rows with the lengths of real SL-CAI examples,
  padded micro-batches vs packed rows (`learner.packing`); real (unpadded) tokens/s.
- threads: two Ray actors decoding at once on this machine (a rollout and a critique pool of
  one each), `threads` torch threads each: the machine's cores each vs one each.
- per-item `ray.get`: 64 PM scores from a Ray actor, one call per item vs one call for all.
- tokenisation: the share of a critique-round `generate` call spent tokenising its prompts
  (the engine tokenises each prompt once per call; a critique round re-tokenises the whole
  conversation).

Ratios > 1 mean the "after" (what cai-ray does) is faster. Writes benchmarks/results/tuning.json.

    .venv/bin/python benchmarks/bench_tuning.py [--preset tiny-20m]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from timing import best_of, write_results

from cai_ray.config import ModelConfig
from cai_ray.engines.base import SamplingParams
from cai_ray.engines.hf import HFEngine
from cai_ray.models import default_cache_dir, ensure_model

RESULTS = Path(__file__).resolve().parent / "results" / "tuning.json"
TEXT = "how do I make the best bread at home with little time and no special tools"
WORDS = TEXT.split()


def mixed_prompts(n: int, seed: int = 0) -> list[str]:
    """Human turns of 4 to 160 words, in random order (as a prompt stream arrives)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 160)))
        prompts.append(f"\n\nHuman: {words}?\n\nAssistant:")
    return prompts


def padding_generate(model_dir: Path, repeats: int) -> dict:
    engine = HFEngine(model_dir, threads=os.cpu_count() or 1, batch_size=8)
    prompts = mixed_prompts(32)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16, stop=())

    def arrival_order():  # one call per batch of 8: no sorting across the stream
        return [
            g
            for i in range(0, len(prompts), 8)
            for g in engine.generate(prompts[i : i + 8], greedy)
        ]

    timed = best_of(
        {"before": arrival_order, "after": lambda: engine.generate(prompts, greedy)}, repeats
    )
    same = [g[0].token_ids for g in timed["before"][1]] == [
        g[0].token_ids for g in timed["after"][1]
    ]
    return _pair("padding: generate, longest-first batches vs arrival order", timed, same=same)  # fmt: skip


def sft_rows(model_dir: Path, n: int) -> list[dict]:
    """Rows shaped like SL-CAI examples: a prompt of 10-170 tokens, a response of 8-120."""
    from cai_ray.models import load_tokenizer
    from cai_ray.sl.sft_data import build_sft_examples

    tok = load_tokenizer(model_dir)
    rng = random.Random(1)
    items = []
    for i, prompt in enumerate(mixed_prompts(n, seed=2)):
        response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 100)))
        items.append((f"p{i}", prompt, " " + response))
    rows, _ = build_sft_examples(tok, items, max_seq_len=512)
    return rows


def padding_sft(model_dir: Path) -> dict:
    from actors.learner.group import LearnerGroup
    from actors.learner.metrics import read_metrics
    from cai_ray.config.learner import LearnerConfig
    from cai_ray.sl.objective import SFTObjective
    from cai_ray.sl.sft_data import pack_examples

    rows = sft_rows(model_dir, 96)
    real = sum(len(r["input_ids"]) for r in rows)
    out = {}
    for name, packing in (("before", False), ("after", True)):
        data = pack_examples(rows, max_seq_len=512) if packing else rows
        micro = 4 if not packing else 1
        config = LearnerConfig(
            num_ranks=0, micro_batch_size=micro, lr=1e-4, tensorboard=False,
            hf_checkpoints=False, shuffle=False, packing=packing, cpus_per_rank=os.cpu_count() or 1,
        )  # fmt: skip
        tmp = Path(tempfile.mkdtemp(prefix="bench-tuning-"))
        try:
            t0 = time.perf_counter()
            with LearnerGroup(config, SFTObjective(), model_dir, tmp) as g:
                g.fit(data, progress=False)
            steps = read_metrics(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        seconds = sum(s["step_time_s"] for s in steps)
        width = _padded_tokens(data, micro)
        out[name] = {
            "rows": len(data),
            "steps": len(steps),
            "seconds": round(seconds, 3),
            "wall_s": round(time.perf_counter() - t0, 3),
            "real_tokens_per_s": round(real / seconds, 1),
            "padding_fraction": round(1 - real / width, 3),
        }
    ratio = out["before"]["seconds"] / out["after"]["seconds"]
    return {"name": "padding: SFT, packed rows vs padded micro-batches", **out, "ratio": round(ratio, 3)}  # fmt: skip


def _padded_tokens(rows: list[dict], micro: int) -> int:
    total = 0
    for i in range(0, len(rows), micro):
        chunk = rows[i : i + micro]
        total += len(chunk) * max(len(r["input_ids"]) for r in chunk)
    return total


def threads_concurrent(model_dir: Path) -> dict:
    import ray

    cores = os.cpu_count() or 1

    @ray.remote(num_cpus=cores / 2)
    class Decoder:
        def __init__(self, threads: int):
            self.engine = HFEngine(model_dir, threads=threads, batch_size=8)
            self.prompts = mixed_prompts(8, seed=3)

        def run(self, start: float) -> float:
            while time.time() < start:
                time.sleep(0.01)
            greedy = SamplingParams(temperature=0.0, max_new_tokens=32, stop=())
            t0 = time.perf_counter()
            for _ in range(3):
                self.engine.generate(self.prompts, greedy)
            return time.perf_counter() - t0

    out = {}
    for name, threads in (("before", cores), ("after", max(1, cores // 2))):
        actors = [Decoder.remote(threads) for _ in range(2)]
        start = time.time() + 2.0
        seconds = max(ray.get([a.run.remote(start) for a in actors], timeout=600))
        out[name] = {"threads_per_actor": threads, "seconds": round(seconds, 3)}
        for a in actors:
            ray.kill(a)
    ratio = out["before"]["seconds"] / out["after"]["seconds"]
    return {"name": "threads: 2 concurrent decoders, threads = cores each vs cores / 2", **out, "ratio": round(ratio, 3)}  # fmt: skip


def per_item_get(model_dir: Path, repeats: int) -> dict:
    import ray

    @ray.remote(num_cpus=0)
    class Scorer:
        def __init__(self):
            self.engine = HFEngine(model_dir, threads=os.cpu_count() or 1, batch_size=8)
            self.params = SamplingParams(temperature=0.0, max_new_tokens=1, stop=())

        def score(self, prompts: list[str]) -> list[int]:
            return [g[0].prompt_tokens for g in self.engine.generate(prompts, self.params)]

    actor = Scorer.remote()
    prompts = mixed_prompts(64, seed=4)
    timed = best_of(
        {
            "before": lambda: [ray.get(actor.score.remote([p]), timeout=600)[0] for p in prompts],
            "after": lambda: ray.get(actor.score.remote(prompts), timeout=600),
        },
        repeats,
    )
    ray.kill(actor)
    return _pair("per-item ray.get: 64 one-token calls vs one call of 64", timed)


def tokenisation_share(model_dir: Path) -> dict:
    engine = HFEngine(model_dir, threads=os.cpu_count() or 1, batch_size=8)
    # a round-4 critique prompt: the conversation so far with three critiques and revisions
    convo = mixed_prompts(1, seed=5)[0] + " " + " ".join(WORDS * 20)
    prompts = [convo + f" {i}" for i in range(8)]
    sampled = SamplingParams(temperature=1.0, max_new_tokens=32, seed=0)
    timed = best_of({"generate": lambda: engine.generate(prompts, sampled),
                     "tokenise": lambda: [engine._encode(p) for p in prompts]}, 3)  # fmt: skip
    share = timed["tokenise"][0] / timed["generate"][0]
    return {
        "name": "tokenisation share of a critique-round generate call",
        "prompt_tokens": len(engine._encode(prompts[0])),
        "generate_s": round(timed["generate"][0], 4),
        "tokenise_s": round(timed["tokenise"][0], 5),
        "share": round(share, 4),
    }


def _pair(name: str, timed: dict, **extra) -> dict:
    before, after = timed["before"][0], timed["after"][0]
    return {"name": name, "before_s": round(before, 4), "after_s": round(after, 4),
            "ratio": round(before / after, 3), **extra}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-20m")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    model_dir = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    results = [padding_generate(model_dir, args.repeats), padding_sft(model_dir),
               tokenisation_share(model_dir)]  # fmt: skip
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        results += [threads_concurrent(model_dir), per_item_get(model_dir, args.repeats)]
    finally:
        ray.shutdown()
    report = {
        "preset": args.preset,
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "results": results,
        "figures": [
            {"name": r["name"], "value": r.get("ratio", r.get("share")),
             "unit": "ratio" if "ratio" in r else "share"}
            for r in results
        ],
    }  # fmt: skip
    write_results(RESULTS, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
