"""`cai-ray run --preview`: a quick look at the foundations before the pipeline runs.

It exercises every foundation piece on the embedded sample data: build the tiny model, sample two
answers per red-team prompt, and label each pair with a feedback principle through
`score_options` (the multiple-choice prompt of paper section 4.1), then print a table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from cai_ray.config import RunConfig, resolve_path
from cai_ray.constitution import choose_principles, load_constitution
from cai_ray.data.sources import read_prompts
from cai_ray.engines import make_engine
from cai_ray.engines.base import SamplingParams, ScoreRequest
from cai_ray.feedback.prompts import OPTIONS, build_feedback_prompt, prob_first_preferred
from cai_ray.models import ensure_model, model_id


def run_preview(cfg: RunConfig, *, out: TextIO = sys.stdout) -> Path:
    """Generate and label on the sample prompts; returns the JSONL written in the run dir."""
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    stage_dir = run_dir / "preview"
    stage_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())

    constitution = load_constitution(resolve_path(cfg.constitution))
    constitution.require_feedback()
    print(f"constitution {constitution.name} ({constitution.short_hash})", file=out)
    model_dir = ensure_model(cfg.models.helpful, run_dir=run_dir)
    print(f"model {model_dir}", file=out)
    engine = make_engine(model_dir, cfg.engine)
    prompts = read_prompts(cfg.data.red_team, turns=cfg.data.turns, limit=cfg.data.limit)

    records = prompts.records
    texts = [r.conversation.render_transcript() for r in records]
    samples = engine.generate(texts, SamplingParams.of(cfg.generation, n=2, seed=cfg.seed))
    principles = [
        choose_principles(constitution.feedback_principles, seed=cfg.seed, key=r.prompt_id, k=1)[0]
        for r in records
    ]
    requests = [
        ScoreRequest(build_feedback_prompt(text, p.question, pair[0].text, pair[1].text), OPTIONS)
        for text, p, pair in zip(texts, principles, samples, strict=True)
    ]
    scores = engine.score_options(requests)

    path = stage_dir / "preview.jsonl"
    mid = model_id(model_dir)
    with path.open("w") as f:
        for rec, p, pair, score in zip(records, principles, samples, scores, strict=True):
            row = {
                "prompt_id": rec.prompt_id,
                "prompt": rec.conversation.last_user_message,
                "response_a": pair[0].text,
                "response_b": pair[1].text,
                "principle_id": p.id,
                "p_a": prob_first_preferred(*score.logprobs),
                "option_token_ids": score.option_token_ids,
                "model_id": mid,
                "constitution_hash": constitution.content_hash,
            }
            f.write(json.dumps(row) + "\n")
    _print_table(path, out)
    print(
        f"{len(records)} prompts ({len(prompts.rejects)} rejected), {2 * len(records)} answers, "
        f"{len(records)} labels in {time.perf_counter() - t0:.1f}s -> {path}",
        file=out,
    )
    engine.close()
    return path


def _print_table(path: Path, out: TextIO) -> None:
    def cut(text: str, n: int) -> str:
        text = " ".join(text.split())
        return text if len(text) <= n else text[: n - 1] + "…"

    print(f"{'prompt':<34} {'response A':<24} {'response B':<24} {'principle':<18} P(A)", file=out)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        print(
            f"{cut(r['prompt'], 34):<34} {cut(r['response_a'], 24):<24} "
            f"{cut(r['response_b'], 24):<24} {cut(r['principle_id'], 18):<18} {r['p_a']:.3f}",
            file=out,
        )
