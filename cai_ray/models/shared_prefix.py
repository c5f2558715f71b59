"""Shared-prefix packing: sequences that start with the same tokens run as one row, prefix once.

A PM pair is one conversation with two answers; a GRPO group is one prompt with G samples. Run
as separate rows, every sequence recomputes the common prefix. Packed, a group is one row:
the prefix, then each sequence's own suffix (its "branch"), each branch at the position ids it
has on its own, under a 4D mask in which a token sees the prefix and the earlier tokens of its
own branch only. Causal attention makes a prefix token's hidden state independent of what
follows, so every token's hidden state, and so every loss and gradient, is the one of the
separate forward (to float rounding): the tests compare both on Llama, Qwen 3 and Gemma 3.
(Prefix sharing of this kind: the tree masks of RL and preference trainers in e.g. veRL and
OpenRLHF's shared-prompt modes; here on transformers' own 4D-mask input.)

The mask is built for the model's attention implementation (sdpa: boolean, eager: additive)
and for sliding-window layers (Gemma 3) their own mask, by position distance, as a dict by
layer type. Other implementations (flash-attention kernels take no 4D mask) fall back to
separate rows: `supported(model)` says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

MASKED_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class SharedPrefixBatch:
    """Packed rows and where each original sequence's tokens are in them.

    `input_ids`, `position_ids` (N, T); `branch` (N, T): 0 for a prefix token, k >= 1 for the
    k-th suffix of the row, -1 for padding. Sequence s's token t is at
    (`row[s]`, `index[s, t]`), for t < `lengths[s]` (`index` is 0 beyond).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    branch: torch.Tensor
    row: torch.Tensor  # (S,)
    index: torch.Tensor  # (S, L)
    lengths: torch.Tensor  # (S,)

    def columns(self, positions: torch.Tensor) -> torch.Tensor:
        """The packed columns of sequence positions `positions` (S, K), in rows `row`."""
        return torch.gather(self.index, 1, positions.clamp(min=0))  # (S, K)

    def gather(self, per_token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`per_token` (N, T, ...) read at sequence positions `positions` (S, K) -> (S, K, ...)."""
        return per_token[self.row[:, None], self.columns(positions)]

    def last_at(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of each sequence's last token: (S,), (S,)."""
        return self.row, self.columns((self.lengths - 1)[:, None])[:, 0]

    def last(self, per_token: torch.Tensor) -> torch.Tensor:
        """`per_token` (N, T, ...) at each sequence's last token -> (S, ...)."""
        return per_token[self.last_at()]

    def tokens(self) -> int:
        """Tokens the forward runs (padding excluded)."""
        return int((self.branch >= 0).sum())


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `seqs`."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


# What one query-key entry of attention costs against one token through the linear layers:
# 4 * hidden FLOPs per entry and layer against 2 * ~12 * hidden^2 per token and layer, i.e.
# 1 / (6 * hidden); a dense 4D mask computes every entry of the packed row. Taken at hidden 256,
# the smallest the project trains, so wider models (where attention costs relatively less) pack
# less eagerly than they could, never more.
ATTENTION_TOKENS = 6 * 256


def _row_cost(tokens: int, width: int) -> float:
    """The forward's cost of a row, in token-equivalents of the linear layers."""
    return tokens + width * width / ATTENTION_TOKENS


def pack(
    seqs: Sequence[Sequence[int]], groups: Sequence[Sequence[int]], *, pad_id: int
) -> SharedPrefixBatch:
    """Rows for groups of sequence indices (each sequence in one group): a row holds the
    group's common prefix once, then each member's remaining tokens. A member goes into the
    group's current row while that costs less than a row of its own (`_row_cost`: the attention
    of a packed row grows with the square of its width, so many long answers to one prompt
    split into several rows, and sequences with no common prefix stay apart). A member equal
    to the prefix (or a prefix of another member) has an empty branch."""
    rows: list[tuple[list[int], list[int], list[int]]] = []  # (ids, positions, branch)
    row = torch.zeros(len(seqs), dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    index = torch.zeros((len(seqs), int(lengths.max())), dtype=torch.long)
    seen = [False] * len(seqs)
    for members in groups:
        p = common_prefix([seqs[m] for m in members])
        ids: list[int] = []
        positions: list[int] = []
        branch: list[int] = []
        k = 0  # branches in the current row
        for m in members:
            if seen[m]:
                raise ValueError(f"sequence {m} is in two groups")
            seen[m] = True
            own = seqs[m][p:]
            alone = _row_cost(len(seqs[m]), len(seqs[m]))
            width = len(ids)
            added = _row_cost(len(own), width + len(own)) - _row_cost(0, width)
            if ids and added >= alone:  # close the row: this member starts the next one
                rows.append((ids, positions, branch))
                ids = []
            if not ids:
                ids, positions, branch, k = list(seqs[m][:p]), list(range(p)), [0] * p, 0
            k += 1
            row[m] = len(rows)
            index[m, :p] = torch.arange(p)
            index[m, p : len(seqs[m])] = torch.arange(len(ids), len(ids) + len(own))
            ids += own
            positions += range(p, len(seqs[m]))
            branch += [k] * len(own)
        rows.append((ids, positions, branch))
    if not all(seen):
        raise ValueError(f"sequence {seen.index(False)} is in no group")
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    branches = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, positions, branch) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        position_ids[i, :n] = torch.tensor(positions, dtype=torch.long)
        branches[i, :n] = torch.tensor(branch, dtype=torch.long)
    return SharedPrefixBatch(input_ids, position_ids, branches, row, index, lengths)


def right_pad(seqs: Sequence[Sequence[int]], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences as right-padded rows of their own: input_ids and attention_mask (S, L)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def run_groups(seqs: Sequence[Sequence[int]], *, min_shared: float = 0.5) -> list[list[int]]:
    """Consecutive sequences that share at least `min_shared` of the shorter one's tokens with
    the run's first (a prompt's G samples as the RL loop scores them), as groups for `pack`."""
    groups: list[list[int]] = []
    for i, seq in enumerate(seqs):
        if groups:
            first = seqs[groups[-1][0]]
            if common_prefix([first, seq]) >= min_shared * min(len(first), len(seq)) > 0:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def pair_groups(n: int) -> list[list[int]]:
    """Groups of a batch of 2n sequences laid out as n A-sides then n B-sides."""
    return [[i, n + i] for i in range(n)]


def _unwrapped(model: Any) -> Any:
    """The module under a DeepSpeed engine (whose own `config` is DeepSpeed's)."""
    return getattr(model, "module", model)


def supported(model: Any) -> bool:
    """Whether `model` takes the 4D masks of `attention_mask` (its attention implementation)."""
    config = getattr(_unwrapped(model), "config", None)
    return getattr(config, "_attn_implementation", None) in MASKED_IMPLEMENTATIONS


def attention_mask(packed: SharedPrefixBatch, model: Any, dtype: torch.dtype) -> Any:
    """The 4D mask (N, 1, T, T) for `model`'s attention; a dict by layer type for models with
    sliding-window layers. Query i sees key j iff j <= i, j is not padding, j is in the prefix
    or in i's own branch (and, on a sliding layer, i's position minus j's is under the window).
    A padding query sees itself (no empty softmax row); its output is never read."""
    config = _unwrapped(model).config
    b, pos = packed.branch, packed.position_ids
    width, device = b.shape[1], b.device
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    key = b[:, None, :]  # (N, 1, T)
    query = b[:, :, None]  # (N, T, 1)
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))  # (N, T, T)
    allowed |= torch.eye(width, dtype=torch.bool, device=device)
    impl = getattr(config, "_attn_implementation", None)

    def encode(m: torch.Tensor) -> torch.Tensor:
        m = m[:, None]  # (N, 1, T, T)
        if impl == "eager":
            out = torch.zeros(m.shape, dtype=dtype, device=device)
            return out.masked_fill_(~m, torch.finfo(dtype).min)
        return m

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = set(getattr(text, "layer_types", None) or ())
    if "sliding_attention" not in types:
        return encode(allowed)
    window = int(text.sliding_window)
    near = (pos[:, :, None] - pos[:, None, :]) < window  # (N, T, T)
    return {t: encode(allowed & near if t == "sliding_attention" else allowed) for t in types}


# -- as a learner batch (a dict of tensors) and the inputs of a forward ------------------------

FIELDS = ("input_ids", "position_ids", "branch", "seq_row", "seq_index", "seq_lengths")


def data_tokens(batch: dict[str, torch.Tensor] | Any) -> int:
    """A learner batch's sequences' tokens in full (a shared prefix counts once per sequence,
    as in separate rows), packed or right-padded."""
    if "seq_lengths" in batch:
        return int(batch["seq_lengths"].sum())
    return int(batch["attention_mask"].sum())


def to_batch(packed: SharedPrefixBatch) -> dict[str, torch.Tensor]:
    """The packed rows as entries of a learner batch (all tensors: the worker moves them)."""
    return dict(
        zip(
            FIELDS,
            (packed.input_ids, packed.position_ids, packed.branch, packed.row, packed.index,
             packed.lengths),
            strict=True,
        )
    )  # fmt: skip


def from_batch(batch: dict[str, torch.Tensor]) -> SharedPrefixBatch:
    return SharedPrefixBatch(*(batch[f] for f in FIELDS))


def forward_inputs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[dict, SharedPrefixBatch]:
    """The forward's inputs for a packed batch, and where each sequence's tokens are in its
    output. A model whose attention takes no 4D mask gets the sequences as separate rows."""
    packed = from_batch(batch)
    if supported(model):
        dtype = next(_unwrapped(model).parameters()).dtype
        mask = attention_mask(packed, model, dtype)
        inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids,
                  "attention_mask": mask}  # fmt: skip
        return inputs, packed
    return _separate(packed)


def _separate(packed: SharedPrefixBatch) -> tuple[dict, SharedPrefixBatch]:
    """The sequences as right-padded rows of their own (the fallback), located as such."""
    s, width = packed.index.shape
    cols = torch.arange(width, device=packed.index.device).expand(s, width)
    real = cols < packed.lengths[:, None]  # (S, L)
    ids = packed.input_ids[packed.row[:, None], packed.index].masked_fill(~real, 0)
    mask = real.long()
    located = SharedPrefixBatch(
        ids, cols.contiguous(), mask - 1, torch.arange(s, device=ids.device), cols, packed.lengths
    )
    return {"input_ids": ids, "attention_mask": mask}, located
