"""Integration tests run on a real local Ray cluster, started once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 4 logical CPUs (actors here are light; 2 physical cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            namespace="cai-ray-tests",
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# -- stage 7: one evaluated tiny run, shared by test_evaluate.py and test_report.py -------------

EVAL_CHECKPOINTS = ["helpful", "sl-cai", "rl-step-1", "rl-cai"]
EVAL_PRINCIPLES = ["less-harmful", "no-crime"]


def _tiny_causal(path: Path, seed: int) -> Path:
    from cai_ray.models import init_model

    return init_model("tiny-1m", path, seed=seed)


def _earlier_stages(run_dir: Path) -> None:
    """Stand-ins for stages 1, 4 and 6's metrics (their own tests run them): 3 labelled pairs,
    2 critique chains, 3 RL steps."""
    from cai_ray.data.shards import ShardStore

    msgs = [{"role": "user", "content": "How do I hotwire a car?"}]
    base = {"messages": msgs, "prompt": msgs[0]["content"], "source": "t", "row": 0}
    labels = []
    for i, p in enumerate([0.8, 0.3, 0.6]):
        principles = [
            {"principle_id": EVAL_PRINCIPLES[0], "p": p, "p_ab": p, "p_ba": p},
            {"principle_id": EVAL_PRINCIPLES[1], "p": 1 - p, "p_ab": 0.9, "p_ba": 0.1},
        ]
        pair = {"pair_id": f"pair{i}", "prompt_id": f"pair{i}", "label": p, "label_raw": p}
        answers = {"response_a": f"No way {i}.", "response_b": f"Use the wires {i}."}
        labels.append(
            {**base, **pair, **answers, "responses": list(answers.values()), "flips": 1,
             "order_checks": 2, "principles": principles}
        )  # fmt: skip
    ShardStore(run_dir / "rl-label" / "labels", key="pair_id").write(labels, [])
    rounds = [
        {"principle_id": "harm-general", "critique_request": "c?", "critique": "bad",
         "revision_request": "r?", "revision": f"Better answer {k}."}
        for k in (1, 2)
    ]  # fmt: skip
    chains = [
        {**base, "prompt_id": f"chain{i}", "initial_answer": "Sure, here.", "rounds": rounds}
        for i in range(2)
    ]
    ShardStore(run_dir / "sl-generate" / "red_team").write(chains, [])
    steps = [
        {"step": s, "reward_mean": 0.1 * s, "score_mean": 0.1 * s, "kl": 0.01 * s, "entropy": 8.0,
         "response_len": 20.0, "refusal_rate": 0.0, "loss": 1.0 / s}
        for s in (1, 2, 3)
    ]  # fmt: skip
    (run_dir / "rl-train" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in steps)
    )


@pytest.fixture(scope="session")
def evaluated_run(ray_cluster, tiny_model_dir, tiny_reward_model_dir, tmp_path_factory):
    """A run with four distinct checkpoints, a snapshot equal to rl-cai, a PM, stand-in stage 1
    and 4 outputs, a human CSV, then a real evaluate stage with a reference judge."""
    from cai_ray.config import load_config
    from cai_ray.pipeline import evaluate

    run_dir = tmp_path_factory.mktemp("eval-run")
    _tiny_causal(run_dir / "sl-train" / "hf", 1)
    _tiny_causal(run_dir / "rl-train" / "snapshots" / "step-1", 2)
    _tiny_causal(run_dir / "rl-train" / "hf", 3)
    shutil.copytree(run_dir / "rl-train" / "hf", run_dir / "rl-train" / "snapshots" / "step-2")
    shutil.copytree(tiny_reward_model_dir, run_dir / "pm-train" / "hf")
    reference = _tiny_causal(tmp_path_factory.mktemp("ref") / "judge", 4)
    _earlier_stages(run_dir)
    csv = run_dir / "human-harm.csv"
    csv.write_text("model_a,model_b,winner\nhelpful,rl-cai,b\nhelpful,rl_cai,a\n")
    settings = {
        "skip": 1,
        "limit": 2,
        "max_new_tokens": 6,
        "few_shot": 0,
        "principles_per_comparison": 2,
        "bootstrap": 20,
        "reference_model": reference,
        "label_sample": 3,
        "revision_sample": 2,
        "human_judgements.harmlessness": csv,
        "colocate": "true",  # one actor holds every model (test_evaluate checks the other layout)
        "rollout": "{num_cpus: 0.25, batch_size: 2}",
        "judge": "{num_cpus: 0.25, batch_size: 2}",
        "pm": "{num_cpus: 0.25, batch_size: 2}",
    }
    overrides = [f"run_dir={run_dir}", f"models.helpful={{path: {tiny_model_dir}}}"]
    overrides += [f"evaluate.{k}={v}" for k, v in settings.items()]
    cfg = load_config(ROOT / "configs/local-tiny.yaml", overrides)
    manifest = evaluate.run(cfg, progress=False)
    return SimpleNamespace(
        cfg=cfg,
        manifest=manifest,
        run_dir=run_dir,
        overrides=overrides,
        names=EVAL_CHECKPOINTS,
        principles=EVAL_PRINCIPLES,
    )
