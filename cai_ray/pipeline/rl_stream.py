"""The RL loop's prompts: red-team and helpfulness sources mixed per step, resumable.

Each source is a Ray Data stream (`common.prompt_dataset`: read and parsed inside a Ray task) that
the loop pulls from step by step. A cursor counts the usable prompts taken in the current pass
(`epoch`, `offset`); a checkpoint stores both, and a resumed run reopens the stream and skips
`offset` prompts, so it continues with the prompt it would have used next. A source that runs
out starts its next pass. Unusable rows (parse rejects, prompts that do not fit the context)
are set aside with their reason and counted, once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from cai_ray.data.shards import KeyIndex
from cai_ray.errors import DataError
from cai_ray.pipeline.common import prompt_dataset, stream_with_timeout

Fits = Callable[[list[dict[str, str]]], bool]


def prompt_fits(tokenizer: Any, *, fmt: Any, budget: int) -> Fits:
    """Whether a conversation, rendered as the rollout workers render it, fits in `budget`
    tokens (the policy's context minus the tokens to generate)."""
    from cai_ray.data.conversation import PromptFormat
    from cai_ray.data.tokens import encode

    pf = PromptFormat.of(fmt).with_tokenizer(tokenizer)

    def fits(messages: list[dict[str, str]]) -> bool:
        return len(encode(tokenizer, pf.render_messages(messages))) <= budget

    return fits


class SourceCursor:
    """One source, read from a saved position; `take(k)` returns the next k prompt rows."""

    def __init__(
        self,
        name: str,
        spec: str,
        *,
        turns: str,
        limit: int | None,
        fits: Fits,
        timeout_s: float,
        epoch: int = 0,
        offset: int = 0,
    ):
        self.name, self.spec = name, spec
        self.turns, self.limit, self.fits, self.timeout_s = turns, limit, fits, timeout_s
        self.epoch, self.offset = epoch, offset
        self.rejects: dict[str, dict[str, Any]] = {}
        self._rows: Iterator[dict[str, Any]] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def take(self, k: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < k:
            if self._rows is None:
                self._rows = self._open(skip=self.offset)
            row = next(self._rows, None)
            if row is None:  # the pass is over: the next one starts from the top
                if self.offset == 0:
                    raise DataError(
                        f"prompt source {self.name!r} has no usable prompt "
                        f"({len(self.rejects)} set aside)",
                        where=self.spec,
                        hint="check the source and the rejects in rl-train/manifest.json",
                    )
                self.epoch, self.offset, self._rows = self.epoch + 1, 0, None
                continue
            self.offset += 1
            out.append(row)
        return out

    def _open(self, *, skip: int) -> Iterator[dict[str, Any]]:
        """Usable rows of one pass, after the first `skip` of them."""
        ds = prompt_dataset(
            self.spec, turns=self.turns, limit=self.limit, done=KeyIndex(), block_rows=64
        )
        batches = ds.iter_batches(batch_size=None, batch_format="pandas")
        seen = 0
        for batch in stream_with_timeout(batches, self.timeout_s, what=f"prompts {self.name}"):
            for row in batch.to_dict("records"):
                reason = row["reject"]
                messages = json.loads(row["messages"]) if not reason else []
                if not reason and not self.fits(messages):
                    reason = "prompt too long for the policy's context with max_new_tokens"
                if reason:
                    key = f"{row['source']}#{row['row']}"
                    self.rejects.setdefault(key, _reject(key, row, reason))
                    continue
                seen += 1
                if seen <= skip:
                    continue
                yield {
                    "prompt_id": row["prompt_id"],
                    "messages": messages,
                    "source": self.name,
                }


class PromptStream:
    """`take(n)`: round(n * helpful_fraction) helpfulness prompts, the rest red-team."""

    def __init__(self, cursors: dict[str, SourceCursor], *, helpful_fraction: float):
        self.cursors = cursors
        self.helpful_fraction = helpful_fraction

    def split(self, n: int) -> dict[str, int]:
        helpful = round(n * self.helpful_fraction)
        return {"red_team": n - helpful, "helpful": helpful}

    def take(self, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, k in self.split(n).items():
            if k:
                out.extend(self.cursors[name].take(k))
        return out

    def state(self) -> dict[str, dict[str, int]]:
        return {name: c.state() for name, c in self.cursors.items()}

    def rejects(self) -> list[dict[str, Any]]:
        return [r for c in self.cursors.values() for r in c.rejects.values()]


def _reject(key: str, row: dict[str, Any], reason: str) -> dict[str, Any]:
    return {
        "key": key,
        "source": row["source"],
        "row": int(row["row"]),
        "reason": reason,
        "prompt": str(row["prompt"])[:500],
    }
