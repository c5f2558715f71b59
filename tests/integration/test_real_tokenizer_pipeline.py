"""The whole pipeline on tiny random models over the real Qwen 3 and Gemma 3 tokenizers (issue 14).

Gemma runs in the chat format (its template writes `<bos>` and demands strict user/model
alternation), Qwen in the transcript format (no BOS at all, ` (A)` three tokens) and then Qwen
in the chat format with thinking turned off through `chat_template_kwargs` (CASES says how far
each goes). The checks are about tokens and text: one BOS, the option tokens that were scored,
no template error anywhere, no reasoning block in a revision, and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cai_ray.data.shards import ShardStore

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

POOL = "{size: 1, batch_size: 4, num_cpus: 0.5}"
FAST = [
    "data.limit=4",
    "generation.max_new_tokens=12",
    "sl_generate.rounds=2",
    "sl_generate.few_shot=1",
    "sl_generate.helpful_samples=1",
    f"sl_generate.rollout={POOL}",
    f"sl_generate.critique={POOL}",
    "sl_train.learner.num_ranks=1",
    "sl_train.learner.epochs=1",
    "sl_train.learner.max_seq_len=384",
    f"rl_pairs.rollout={POOL}",
    "rl_label.few_shot=1",
    f"rl_label.labeler={POOL}",
    "pm_train.learner.epochs=1",
    "rl_train.steps=2",
    "rl_train.prompts_per_step=2",
    "rl_train.group_size=2",
    "rl_train.policy.micro_batch_size=2",
    "rl_train.value.micro_batch_size=2",
    "rl_train.checkpoint_every=1",
    "rl_train.rollout={size: 1, num_cpus: 0.25}",
    "rl_train.reward_workers={size: 1, num_cpus: 0.25}",
    "rl_train.reference={size: 1, num_cpus: 0.25}",
    "evaluate.skip=0",
    "evaluate.limit=2",
    "evaluate.max_new_tokens=8",
    "evaluate.bootstrap=10",
]
# (tokenizer, format, chat-template arguments, last stage): Gemma's chat format through all seven
# stages; Qwen's transcript format through labelling (the stages that turn its text into prompts,
# options and SFT rows; PM and RL training read the same rows and cost minutes on a 151k vocab);
# Qwen's chat format through stage 2 (the template arguments reach every stage-1 prompt and the
# SFT rows).
CASES = {
    "gemma3-chat": ("gemma3", "chat", {}, "evaluate"),
    "qwen3-transcript": ("qwen3", "transcript", {}, "rl-label"),
    "qwen3-chat-no-thinking": ("qwen3", "chat", {"enable_thinking": False}, "sl-train"),
}


def _rows(run_dir: Path, folder: str) -> pd.DataFrame:
    table = ShardStore(run_dir / folder).read_table()
    return table.to_pandas() if table is not None else pd.DataFrame()


@pytest.fixture(scope="module", params=list(CASES))
def run(request, ray_cluster, real_tokenizer_dirs, tmp_path_factory):
    from cai_ray.config import load_config
    from cai_ray.pipeline.runner import run_pipeline
    from cai_ray.report import build_report

    name, fmt, kwargs, until = CASES[request.param]
    run_dir = tmp_path_factory.mktemp(request.param)
    model = {"preset": "tiny-1m", "tokenizer": str(real_tokenizer_dirs[name])}
    if kwargs:
        model["chat_template_kwargs"] = kwargs
    overrides = [f"run_dir={run_dir}", f"format={fmt}", f"models.helpful={json.dumps(model)}"]
    cfg = load_config(ROOT / "configs/local-tiny.yaml", [*overrides, *FAST])
    manifests = run_pipeline(cfg, until=until, progress=False)
    report = build_report(run_dir)
    return request.param, name, fmt, cfg, manifests, Path(report)


@pytest.fixture(scope="module")
def tokenizer(run):
    from cai_ray.models import load_tokenizer

    return load_tokenizer(Path(run[3].run_dir) / "sl-train" / "hf")


def _needs(run, stage: str) -> None:
    if stage not in run[4]:
        pytest.skip(f"case {run[0]} stops before {stage}")


def test_every_stage_finishes_and_the_report_is_written(run):
    case, _name, _fmt, _cfg, manifests, report = run
    stages = ["sl-generate", "sl-train", "rl-pairs", "rl-label", "pm-train", "rl-train", "evaluate"]
    assert list(manifests) == stages[: stages.index(CASES[case][3]) + 1]
    assert all(m["complete"] for m in manifests.values())
    red = manifests["sl-generate"]["outputs"]["red_team"]
    assert red["rows"] == 4 and not any("template" in r for r in red["reject_reasons"])
    assert manifests["sl-train"]["outputs"]["examples"] > 0
    assert report.is_file() and report.stat().st_size > 10_000


def test_template_arguments_reach_the_stage_1_prompts(run):
    """Qwen with thinking off: the critic's prompts carry the template's empty think block."""
    if not CASES[run[0]][2]:
        pytest.skip("no chat-template arguments in this case")
    from cai_ray.models import load_tokenizer

    run_dir = Path(run[3].run_dir)
    (model_dir,) = (run_dir / "models").iterdir()
    tok = load_tokenizer(model_dir)
    from cai_ray.data.conversation import PromptFormat

    fmt = PromptFormat("chat", CASES[run[0]][2]).with_tokenizer(tok)
    chains = _rows(run_dir, "sl-generate/red_team")
    prompt = fmt.render_messages(list(chains["messages"].iloc[0]))
    assert prompt.endswith("<think>\n\n</think>\n\n")


def test_revisions_are_text_without_reasoning_or_markers(run):
    run_dir = Path(run[3].run_dir)
    chains = _rows(run_dir, "sl-generate/red_team")
    assert len(chains) == 4
    for rounds in chains["rounds"]:
        assert len(rounds) == 2
        for rd in rounds:
            for text in (rd["critique"], rd["revision"]):
                assert text and "<think>" not in text and "</think>" not in text
                assert "\n\nHuman:" not in text and "<start_of_turn>" not in text


def test_rollouts_hold_one_bos_and_the_prompt_ends_on_the_generation_cue(run, tokenizer):
    _needs(run, "rl-train")
    _case, name, fmt, cfg, _manifests, _report = run
    rollouts = pd.read_parquet(
        next((Path(cfg.run_dir) / "rl-train" / "rollouts").glob("*.parquet"))
    )
    bos = tokenizer.bos_token_id
    for ids in rollouts["prompt_ids"]:
        ids = list(ids)
        if name == "gemma3":
            assert ids[0] == bos and ids.count(bos) == 1
        else:
            assert bos is None
        tail = tokenizer.decode(ids[-8:])
        if fmt == "transcript":
            assert tail.endswith("Assistant:")
        elif name == "gemma3":
            assert tail.endswith("<start_of_turn>model\n")


def test_labels_record_the_three_token_options_that_were_scored(run, tokenizer):
    _needs(run, "rl-label")
    run_dir = Path(run[3].run_dir)
    labels = _rows(run_dir, "rl-label/labels")
    assert len(labels) > 0
    want = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in (" (A)", " (B)")]
    for trace, split in zip(labels["trace"], labels["split_options"], strict=True):
        entries = json.loads(trace) if isinstance(trace, str) else list(trace)
        for entry in entries:
            scored = [[int(t) for t in ids] for ids in entry["option_token_ids"]]
            assert scored == want  # ▁( A ) and ▁( B ): three tokens each
        assert split  # reported as split in the trace and the manifest
