"""rl-train's folder: checkpoints of the whole loop, and the per-step rollout log.

```
rl-train/checkpoints/latest            the newest complete step, written last
rl-train/checkpoints/step-N/trainer_state.json   step, stream position, KL controller, counters
rl-train/policy/checkpoints/step-N/    the policy group's DeepSpeed state (weights, optimizer,
rl-train/value/checkpoints/step-N/     scheduler, RNG per rank); the critic's for PPO
rl-train/rollouts/step-N.parquet       every sample of step N: prompt, response, score, reward,
                                       KL, weight version
rl-train/snapshots/step-N/             the policy at step N as an HF dir (never pruned: stage 7
                                       compares checkpoints); rl-train/hf is the final policy
```
The loop's `latest` is written only after both groups saved step N, so a kill while saving
resumes from the step before.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from actors.learner.checkpoint import prune, read_latest, tag_for, write_latest, write_trainer_state

_ROLLOUT = re.compile(r"^step-(\d+)\.parquet$")


class RLCheckpoints:
    def __init__(self, stage_dir: Path, *, keep: int):
        self.dir = Path(stage_dir)
        self.keep = keep
        self.rollouts = self.dir / "rollouts"

    def latest(self) -> dict[str, Any] | None:
        """The state of the newest complete checkpoint (with its `tag`), or None."""
        return read_latest(self.dir)

    def save(self, step: int, state: dict[str, Any], groups: list[Any]) -> None:
        tag = tag_for(step)
        for group in groups:
            group.save(tag, state)
        (self.dir / "checkpoints" / tag).mkdir(parents=True, exist_ok=True)
        write_trainer_state(self.dir, tag, state)
        write_latest(self.dir, tag)
        prune(self.dir, keep=self.keep)

    def snapshot(self, step: int) -> Path:
        return self.dir / "snapshots" / tag_for(step)

    def write_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.rollouts.mkdir(parents=True, exist_ok=True)
        path = self.rollouts / f"step-{step:06d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)

    def drop_rollouts_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: their old logs go."""
        if not self.rollouts.is_dir():
            return
        for p in self.rollouts.iterdir():
            m = _ROLLOUT.match(p.name)
            if m and int(m.group(1)) > step:
                p.unlink()


def read_rollouts(stage_dir: str | Path) -> Any:
    """All logged samples as one pandas DataFrame (empty when none)."""
    import pandas as pd

    folder = Path(stage_dir) / "rollouts"
    files = sorted(folder.glob("step-*.parquet")) if folder.is_dir() else []
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
