"""RLLearnerGroup: the learner group as the RL loop drives it, one call per loop phase.

`LearnerGroup.fit` owns an epoch loop over a fixed dataset (SFT, PM, DPO). In RL the driver owns
the loop instead: each step it sends fresh rows for a forward pass (`infer`: the policy's
log-probs, the critic's values), then for an update (`submit_update`), then asks for the weights
to sync to the rollout workers (`weights`), and says when to checkpoint (`save`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from actors.learner.group import LearnerGroup
from cai_ray.errors import CaiRayError


class Pending:
    """One call on every rank, already submitted; `result()` waits (with the step timeout)."""

    def __init__(self, group: LearnerGroup, refs: list[Any], pick: Callable[[list], Any], timeout):
        self._group, self._refs, self._pick, self._timeout = group, refs, pick, timeout

    def result(self) -> Any:
        return self._pick(self._group._gather(self._refs, timeout=self._timeout))


class RLLearnerGroup(LearnerGroup):
    """A learner group driven step by step. `extra_bundle` adds resources to each rank's
    bundle, so a rollout worker can be placed beside rank i (`placement: colocated`)."""

    def __init__(self, *args: Any, extra_bundle: dict[str, float] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._extra = dict(extra_bundle or {})

    @property
    def placement_group(self) -> Any:
        """The ranks' placement group (None in-process), for colocating other roles."""
        return self._pg

    def _bundle(self) -> dict[str, float]:
        base = super()._bundle()
        return {k: base.get(k, 0) + self._extra.get(k, 0) for k in {*base, *self._extra}}

    def start(self, total_steps: int, *, resume_tag: str | None = None) -> None:
        """Start the ranks (an LR schedule of `total_steps` optimizer steps); load a checkpoint."""
        try:
            self._start(total_steps, resume_tag=resume_tag)
        except BaseException:
            self.shutdown()
            raise

    def infer(self, rows: Sequence[dict[str, Any]]) -> list[Any]:
        """`objective.infer` over `rows`, split into equal shares (ZeRO-3 needs every rank to
        run the same forwards: short shares are padded with a repeated row, dropped after)."""
        world = len(self._handles)
        share = math.ceil(len(rows) / world)
        parts = []
        for r in range(world):
            part = list(rows[r * share : (r + 1) * share])
            parts.append(part + [rows[0]] * (share - len(part)))
        refs = [h.infer.remote(p) for h, p in zip(self._handles, parts, strict=True)]
        results = self._gather(refs)
        out: list[Any] = []
        for r, res in enumerate(results):
            out.extend(res[: max(0, min(share, len(rows) - r * share))])
        return out

    def submit_update(self, rows: Sequence[dict[str, Any]], *, epochs: int, seed: int) -> Pending:
        """Start `epochs` passes over `rows` (rank r trains on rows r, r + N, ...); returns the
        pending per-step metrics (group-wide, from rank 0)."""
        world = len(self._handles)
        refs = [
            h.update.remote(list(rows[r::world]), epochs=epochs, seed=seed)
            for r, h in enumerate(self._handles)
        ]
        steps = epochs * len(rows) // max(1, self.config.global_batch)
        return Pending(self, refs, lambda res: res[0], self.config.step_timeout_s * max(1, steps))

    def weights(self) -> Any:
        """The full weights, for `load_weights` on rollout workers: an ObjectRef (rank 0's
        result as numpy arrays, never fetched by the driver) or, in-process, the state dict
        itself."""
        if self._local:
            return self._handles[0].full_state_dict.remote()
        refs = [h.shipped_state_dict.remote() for h in self._handles]
        import ray

        timeout = self.config.step_timeout_s
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            raise CaiRayError(
                f"learner ranks did not hand over their weights within {timeout:g} s",
                hint="raise step_timeout_s, or check the ranks' logs",
            )
        self._gather(refs[1:])  # surfaces a failed rank; rank 0's tensors stay in the store
        return refs[0]

    # -- NCCL weight sync into vLLM engines (actors.learner.weight_sync) ------------------------------

    def weight_group_address(self) -> tuple[str, int]:
        return self._gather([self._handles[0].weight_group_address.remote()])[0]

    def open_weight_group(self, address: str, port: int, world_size: int) -> list[Any]:
        """Rank 0 joins the group the engines are joining; returns the broadcast metadata."""
        refs = [h.open_weight_group.remote(address, port, world_size) for h in self._handles]
        return self._gather(refs)[0]

    def broadcast_weights(self) -> None:
        self._gather([h.broadcast_weights.remote() for h in self._handles])

    def save(self, tag: str, state: dict[str, Any]) -> None:
        """Checkpoint `tag` on every rank (weights, optimizer, scheduler, RNG, `state`)."""
        self._gather([h.save.remote(tag, state=state) for h in self._handles])

    def save_hf(self, path: str | Path) -> None:
        """The model as an HF directory at `path`."""
        self._gather([h.save_hf.remote(Path(path)) for h in self._handles])
