"""Text <-> tokens, one rule for every stage: prompts, SFT and DPO rows, PM inputs, rollouts.

Real tokenizers differ from the project's own in ways that silently change what a model reads:
- Gemma and Llama chat templates write `<bos>` into the rendered text, and their tokenizers add
  one more when encoding with special tokens (`<bos><bos><start_of_turn>user`). `encode` adds the
  tokenizer's special tokens only when the text does not already start with the BOS.
- A response follows its prompt the way sampling produced it. After a cue that ends in a visible
  character (the transcript's `Assistant:`) the model writes a leading space (`ĠI`, `▁I`); after a
  chat template's trailing newline it does not (`I`). `encode_response` applies that boundary and
  tokenizes prompt and response together, so training rows hold the tokens sampling would have.
- Reasoning models (Qwen 3) write `<think>...</think>` before the answer; `strip_reasoning`
  removes it from text that becomes a critique, a revision or a training target.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# `<think>...</think>` blocks (Qwen 3, DeepSeek-R1 style); an unclosed one runs to the end.
_REASONING = re.compile(r"<think>.*?(?:</think>|\Z)", flags=re.DOTALL)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as a model reads it: special tokens (BOS) added once, never twice."""
    return encode_batch(tokenizer, [text])[0]


def encode_batch(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """`encode` for many texts; texts that already start with the BOS are encoded as they are."""
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = [bool(bos) and t.startswith(bos) for t in texts]
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (False, True):
        idx = [i for i, h in enumerate(has_bos) if h == flag]
        if idx:
            ids = tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
            for i, row in zip(idx, ids, strict=True):
                out[i] = list(row)
    return out  # type: ignore[return-value]


def response_separator(prompt: str) -> str:
    """What sits between a prompt and the response the model writes after it: a space after a
    visible character (`Assistant:` -> ` I`), nothing after whitespace (a chat template's
    `<|im_start|>assistant\\n` -> `I`)."""
    return "" if not prompt or prompt[-1].isspace() else " "


def encode_response(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of `response` as sampled after `prompt`.

    The two are tokenized together, so the first response token is the one the model would
    have sampled (`ĠI` after `Assistant:`, `I` after `model\\n`); `response` is the cleaned text
    (surrounding whitespace is not content). When the tokenizer merges across the boundary, the
    prompt keeps its own tokens and the response is tokenized on its own.
    """
    prompt_ids = encode(tokenizer, prompt)
    body = response.strip()
    if not body:
        return prompt_ids, []
    text = response_separator(prompt) + body
    joint = encode(tokenizer, prompt + text)
    if joint[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, joint[len(prompt_ids) :]
    return prompt_ids, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def strip_reasoning(text: str) -> str:
    """`text` without `<think>...</think>` blocks: an unclosed block runs to the end, and a
    `</think>` with no opening tag (a template that opened the block in the prompt) ends one."""
    text = _REASONING.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text
