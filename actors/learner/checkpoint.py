"""Checkpoint layout of a learner group's `out_dir`, and the per-rank state DeepSpeed does not keep.

```
out_dir/checkpoints/latest              the newest complete tag, written last and atomically
out_dir/checkpoints/step-<N>/           DeepSpeed state (model, optimizer, scheduler, client state)
                            rng/rank-<r>.pt   python/numpy/torch RNG of every rank
                            trainer_state.json step, epoch, data position, batch shape
                            hf/               the model as an HF directory (hf_checkpoints)
out_dir/hf/                             the final model (safetensors + tokenizer)
```
A checkpoint counts only once `latest` names it, so a run killed while saving resumes from the
previous one. Multi-node groups need `out_dir` on storage every node shares.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from cai_ray.errors import CaiRayError

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step-(\d+)$")


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step-{step}"


def write_latest(out_dir: str | Path, tag: str) -> None:
    """Mark `tag` complete: a rename, so readers see the old or the new tag, never half."""
    root = checkpoints_dir(out_dir)
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(tag + "\n")
    os.replace(tmp, root / LATEST)


def read_latest(out_dir: str | Path) -> dict[str, Any] | None:
    """The trainer state of the newest complete checkpoint (with its `tag`), or None."""
    root = checkpoints_dir(out_dir)
    latest = root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    state_path = root / tag / TRAINER_STATE
    if not state_path.is_file():
        raise CaiRayError(
            f"checkpoint {tag!r} named by {LATEST} has no {TRAINER_STATE}",
            where=str(root / tag),
            hint="delete the checkpoints folder to start over",
        )
    return {**json.loads(state_path.read_text()), "tag": tag}


def write_trainer_state(out_dir: str | Path, tag: str, state: dict[str, Any]) -> None:
    path = checkpoints_dir(out_dir) / tag / TRAINER_STATE
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def prune(out_dir: str | Path, *, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step folders; never the one `latest` names."""
    root = checkpoints_dir(out_dir)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))
    )
    removed = [p for _, p in steps[: max(0, len(steps) - keep)] if p.name != latest]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_path(out_dir: str | Path, tag: str, rank: int) -> Path:
    return checkpoints_dir(out_dir) / tag / "rng" / f"rank-{rank}.pt"
