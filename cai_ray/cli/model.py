"""`cai-ray init-model`: write a model as an HF directory, a tiny random-weight preset (over the
project's tokenizer or a real one) or a real model imported from a GGUF file."""

from __future__ import annotations

import argparse
import json

from cai_ray.errors import ModelError
from cai_ray.models.presets import HEADS, PRESETS


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `init-model` command."""
    p = sub.add_parser(
        "init-model",
        help="build a tiny preset model, or import a GGUF file, as a Hugging Face directory",
        description="Write a Llama-style model with random weights (--preset) or a pretrained "
        "model converted from a GGUF file (--from-gguf) to OUT_DIR; AutoModelForCausalLM / "
        "AutoTokenizer (and vLLM) load it from the path.",
    )
    p.add_argument(
        "out_dir", metavar="OUT_DIR", help="directory to write (must be empty or absent)"
    )
    # Not an argparse mutually exclusive group: its message would not say what either one is.
    p.add_argument("--preset", help=f"random-weight model size: {', '.join(PRESETS)}")
    p.add_argument(
        "--from-gguf",
        metavar="FILE",
        help="import this .gguf file (dequantised) instead of building a preset",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="preset only: use the tokenizer (and chat template) in DIR instead of the project's",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="--from-gguf only: weight dtype to save (default float32)",
    )
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
    from cai_ray.models import count_parameters, get_preset, init_model

    _check_source(args)  # a wrong combination fails before transformers loads
    if args.from_gguf is not None:
        return _import_gguf(args)
    get_preset(args.preset)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = init_model(
        args.preset,
        args.out_dir,
        head=args.head,
        seed=args.seed,
        overwrite=args.force,
        tokenizer=args.tokenizer,
    )
    print(f"wrote {path}")
    print(f"  preset {args.preset}, head {args.head}, seed {args.seed}")
    if args.tokenizer is not None:
        print(f"  tokenizer from {args.tokenizer}")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    print(f"  parameters {count_parameters(path):,}, vocab size {vocab}")
    return 0


def _check_source(args: argparse.Namespace) -> None:
    """Exactly one of --preset / --from-gguf, and only the options that go with it."""
    if (args.preset is None) == (args.from_gguf is None):
        raise ModelError(
            "give exactly one of --preset NAME or --from-gguf FILE",
            hint=f"e.g. --preset tiny-1m ({', '.join(PRESETS)}) or --from-gguf model.gguf",
        )
    if args.from_gguf is not None:
        if args.tokenizer is not None:
            raise ModelError("--tokenizer goes with --preset; a GGUF file has its own tokenizer")
        if args.head != "causal":
            raise ModelError(
                "--from-gguf imports a causal LM; --head classification needs --preset"
            )
    elif args.dtype != "float32":
        raise ModelError("--dtype goes with --from-gguf; presets are saved in float32")


def _import_gguf(args: argparse.Namespace) -> int:
    from cai_ray.models import count_parameters
    from cai_ray.models.gguf import import_gguf

    path = import_gguf(args.from_gguf, args.out_dir, overwrite=args.force, dtype=args.dtype)
    config = json.loads((path / "config.json").read_text())
    print(f"wrote {path}")
    print(f"  from {args.from_gguf}: {', '.join(config.get('architectures') or ['?'])}")
    print(f"  parameters {count_parameters(path):,}, vocab size {config.get('vocab_size')}")
    return 0
