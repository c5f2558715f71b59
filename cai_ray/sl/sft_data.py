"""SL-CAI training data (paper sec. 3): pick (prompt, revision) pairs, tokenize, pack, collate.

A stage-1 row holds one critique/revision chain: `prompt_id`, `prompt`, `messages` (the
conversation up to the assistant's turn), `initial_answer` and `rounds` (each with its
`revision`). The model input is rendered from `messages` elsewhere (transcript or chat format);
this module turns (rendered prompt, response) into token ids whose labels are IGNORE_INDEX on the
prompt, so only response tokens carry loss.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cai_ray.errors import ConfigError
from cai_ray.sl.losses import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

PairsMode = Literal["final", "all_rounds", "up_to"]
Truncation = Literal["left", "drop"]
CutTargets = Literal["drop", "keep"]
CUT_REASON = "cut at the token limit (finish reason 'length')"


@dataclass(frozen=True)
class SFTPair:
    """One training conversation: `messages` up to the assistant turn, then `response`."""

    prompt_id: str
    messages: tuple[Mapping[str, str], ...]
    response: str
    round: int | None = None  # 1-based revision round; None for helpfulness samples
    source: Literal["revision", "helpful"] = "revision"
    finished: bool = True  # False: sampling stopped at max_new_tokens (no EOS is trained)


@dataclass(frozen=True)
class Rejected:
    """A row or revision set aside, with the reason (counted in the stage manifest)."""

    prompt_id: str | None
    reason: str
    round: int | None = None


@dataclass
class Selection:
    pairs: list[SFTPair] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def select_sft_pairs(
    rows: Iterable[Mapping[str, Any]],
    *,
    mode: PairsMode = "final",
    up_to: int | None = None,
    cut: CutTargets = "drop",
) -> Selection:
    """Training pairs from critique/revision chains.

    `final`: the last revision of each chain; `all_rounds`: every revision; `up_to`: the
    revisions of rounds 1..`up_to` (the paper's SL-CAI-n; a shorter chain gives what it has).
    A revision cut at the token limit is set aside (`cut="drop"`) or kept as an unfinished
    target (`keep`: trained without EOS). Malformed rows and empty revisions are rejected with a
    reason, never dropped silently.
    """
    if mode not in ("final", "all_rounds", "up_to"):
        raise ConfigError(f"unknown pairs mode {mode!r}", hint="use final, all_rounds or up_to")
    if mode == "up_to" and (up_to is None or up_to < 1):
        raise ConfigError("pairs mode up_to needs up_to >= 1", where="up_to")
    out = Selection()
    for row in rows:
        prompt_id, messages, rounds, problem = _parse_row(row)
        if problem:
            out.rejected.append(Rejected(prompt_id, problem))
            continue
        if not rounds:
            out.rejected.append(Rejected(prompt_id, "no revision rounds"))
            continue
        numbered = list(enumerate(rounds, start=1))
        if mode == "final":
            numbered = numbered[-1:]
        elif mode == "up_to":
            numbered = numbered[:up_to]
        for number, rnd in numbered:
            revision = rnd.get("revision") if isinstance(rnd, Mapping) else None
            if not isinstance(revision, str) or not revision.strip():
                out.rejected.append(Rejected(prompt_id, "empty or missing revision", number))
                continue
            finished = rnd.get("revision_finish") != "length"
            if not finished and cut == "drop":
                out.rejected.append(Rejected(prompt_id, f"revision {CUT_REASON}", number))
                continue
            out.pairs.append(SFTPair(prompt_id, messages, revision, number, finished=finished))
    return out


def _parse_row(row: Mapping[str, Any]) -> tuple[str | None, tuple, list, str | None]:
    """(prompt_id, messages, rounds, problem); `problem` is None for a usable row."""
    raw_id = row.get("prompt_id")
    prompt_id = None if raw_id is None else str(raw_id)
    if prompt_id is None:
        return None, (), [], "missing prompt_id"
    messages = _as_list(row.get("messages"))
    if messages is None and isinstance(row.get("prompt"), str):
        # No conversation recorded: the prompt is one user turn.
        messages = [{"role": "user", "content": row["prompt"]}]
    if not messages or not all(_is_message(m) for m in messages):
        return prompt_id, (), [], "messages missing or not a list of {role, content}"
    rounds = _as_list(row.get("rounds"))
    if rounds is None:
        return prompt_id, (), [], "rounds missing or not a list"
    return prompt_id, tuple(dict(m) for m in messages), rounds, None


def _as_list(value: Any) -> list | None:
    # Parquet via pandas gives numpy object arrays where JSON gives lists.
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    return list(value) if isinstance(value, list | tuple) else None


def _is_message(m: Any) -> bool:
    return (
        isinstance(m, Mapping)
        and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str)
    )


def mix_helpful(
    pairs: Sequence[SFTPair], helpful: Sequence[SFTPair], *, ratio: float, seed: int = 0
) -> list[SFTPair]:
    """`pairs` plus round(ratio * len(pairs)) helpfulness samples drawn without replacement.

    Paper sec. 3.1: helpfulness samples keep the SL-CAI model helpful. When fewer are available
    than wanted, all are used (the caller compares lengths to report the shortfall).
    """
    want = round(ratio * len(pairs))
    if want >= len(helpful):
        chosen = list(helpful)
    else:
        chosen = random.Random(seed).sample(list(helpful), want)
    return [*pairs, *chosen]


def tokenize_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    max_seq_len: int,
    truncation: Truncation = "left",
    finished: bool = True,
) -> dict[str, list[int]] | str:
    """{input_ids, labels} for one example, or the reason it was set aside.

    The response is tokenized as the model samples it after `prompt` (`cai_ray.data.tokens`: one
    BOS, the leading space after `Assistant:` and none after a chat template's newline). A
    finished response ends with EOS so the model learns to stop; an unfinished one (cut at the
    token limit) does not. Over `max_seq_len`, `left` cuts the start of the prompt (keeping
    BOS); if the response alone leaves the prompt less than half the budget, the prompt keeps
    half and the response is cut at the end. `drop` rejects instead.
    """
    from cai_ray.data.tokens import encode_response

    prompt_ids, response_ids = encode_response(tokenizer, prompt, response)
    if not response_ids:
        return "empty response"
    if finished and tokenizer.eos_token_id is not None:
        response_ids.append(int(tokenizer.eos_token_id))
    total = len(prompt_ids) + len(response_ids)
    if total > max_seq_len:
        if truncation == "drop":
            return f"{total} tokens > max_seq_len {max_seq_len}"
        prompt_ids, response_ids = _truncate(
            prompt_ids, response_ids, budget=max_seq_len, bos=tokenizer.bos_token_id
        )
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {"input_ids": prompt_ids + response_ids, "labels": labels}


def _truncate(
    prompt: list[int], response: list[int], *, budget: int, bos: int | None
) -> tuple[list[int], list[int]]:
    keep_prompt = max(budget - len(response), min(len(prompt), budget // 2))
    keep_response = budget - keep_prompt
    if keep_prompt < len(prompt):
        head = [prompt[0]] if bos is not None and prompt and prompt[0] == bos else []
        tail = prompt[len(prompt) - (keep_prompt - len(head)) :] if keep_prompt > len(head) else []
        prompt = head + tail
    return prompt, response[:keep_response]


def build_sft_examples(
    tokenizer: Any,
    items: Iterable[tuple],
    *,
    max_seq_len: int,
    truncation: Truncation = "left",
) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """Tokenize (prompt_id, rendered prompt, response[, finished]) items into learner rows.

    Each row gets `idx` (0..N-1 over accepted rows): the learner group orders and shards by it.
    """
    examples: list[dict[str, Any]] = []
    rejected: list[Rejected] = []
    for prompt_id, prompt, response, *finished in items:
        ex = tokenize_example(
            tokenizer,
            prompt,
            response,
            max_seq_len=max_seq_len,
            truncation=truncation,
            finished=finished[0] if finished else True,
        )
        if isinstance(ex, str):
            rejected.append(Rejected(prompt_id, ex))
        else:
            examples.append({"idx": len(examples), **ex})
    return examples, rejected


def pack_examples(examples: Iterable[Mapping[str, Any]], *, max_seq_len: int) -> list[dict]:
    """Concatenate consecutive examples into rows of at most `max_seq_len` tokens.

    Each row carries `position_ids` restarting at 0 for every example: transformers turns the
    restarts into a block-diagonal causal mask (no attention across examples) when the forward
    pass has no attention_mask and no KV cache (`use_cache=False`), and the first token of every
    example is unlabelled, so no example is trained to follow another.
    """
    _check_packing_support()
    packs: list[dict] = []
    current: list[Mapping[str, Any]] = []
    length = 0
    for ex in examples:
        n = len(ex["input_ids"])
        if current and length + n > max_seq_len:
            packs.append(_pack(current, idx=len(packs)))
            current, length = [], 0
        current.append(ex)
        length += n
    if current:
        packs.append(_pack(current, idx=len(packs)))
    return packs


def _check_packing_support() -> None:
    try:
        import transformers.masking_utils as masking
    except ImportError:
        masking = None
    if not hasattr(masking, "find_packed_sequence_indices"):
        raise ConfigError(
            "packing needs a transformers version that reads packed position_ids "
            "(transformers.masking_utils.find_packed_sequence_indices)",
            where="learner.packing",
            hint="upgrade transformers, or set packing: false",
        )


def _pack(examples: Sequence[Mapping[str, Any]], *, idx: int) -> dict[str, Any]:
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        ids = [int(t) for t in ex["input_ids"]]
        lab = [int(t) for t in ex["labels"]]
        lab[0] = IGNORE_INDEX
        input_ids += ids
        labels += lab
        positions += range(len(ids))
    return {
        "idx": idx,
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "n_seqs": len(examples),
    }


def collate(rows: Sequence[Mapping[str, Any]], *, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors: input_ids, labels (B, T), attention_mask or position_ids,
    and num_tokens (the unpadded token count, for throughput).

    Packed rows (with `position_ids`) get no attention_mask: the padding continues as its own
    position run, so transformers masks it like one more packed sequence.
    """
    import numpy as np
    import torch

    lengths = [len(r["input_ids"]) for r in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    packed = "position_ids" in rows[0]
    extra = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        input_ids[i, :n] = torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))
        labels[i, :n] = torch.as_tensor(np.asarray(row["labels"], dtype=np.int64))
        if packed:
            extra[i, :n] = torch.as_tensor(np.asarray(row["position_ids"], dtype=np.int64))
            extra[i, n:] = torch.arange(width - n)
        else:
            extra[i, :n] = 1
    key = "position_ids" if packed else "attention_mask"
    num_tokens = torch.tensor(sum(lengths))
    return {"input_ids": input_ids, "labels": labels, key: extra, "num_tokens": num_tokens}
