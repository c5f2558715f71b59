"""`cai-ray init-model`: write a tiny random-weight preset model as an HF directory."""

from __future__ import annotations

import argparse
import json

from cai_ray.models.presets import HEADS, PRESETS


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `init-model` command."""
    p = sub.add_parser(
        "init-model",
        help="build a tiny random-weight model (a preset) as a Hugging Face directory",
        description="Write a Llama-style model with random weights and the project's own tokenizer "
        "to OUT_DIR; AutoModelForCausalLM / AutoTokenizer (and vLLM) load it from the path.",
    )
    p.add_argument(
        "out_dir", metavar="OUT_DIR", help="directory to write (must be empty or absent)"
    )
    p.add_argument("--preset", required=True, help=f"model size: {', '.join(PRESETS)}")
    p.add_argument(
        "--head",
        choices=HEADS,
        default="causal",
        help="causal LM (policy, feedback model) or a 1-label classifier (reward model)",
    )
    p.add_argument("--seed", type=int, default=0, help="random-weight seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite OUT_DIR if it is not empty")
    p.set_defaults(func=_init_model)


def _init_model(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from cai_ray.models import count_parameters, get_preset, init_model

    get_preset(args.preset)  # an unknown name fails before transformers loads
    hf_logging.disable_progress_bar()
    path = init_model(
        args.preset, args.out_dir, head=args.head, seed=args.seed, overwrite=args.force
    )
    print(f"wrote {path}")
    print(f"  preset {args.preset}, head {args.head}, seed {args.seed}")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    print(f"  parameters {count_parameters(path):,}, vocab size {vocab}")
    return 0
