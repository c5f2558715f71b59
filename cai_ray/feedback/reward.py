"""`RewardScorer`: a preference model as a plain scorer.

Ray-free, so the RL loop's reward workers and the Serve reward deployment share it. The PM is a
value-head model or a `*ForSequenceClassification` with one label (`cai_ray.models.value_head`).
The score of a text is the head's output at the last non-pad token (paper section 4: the PM
assigns a scalar to a conversation ending in the assistant's response).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cai_ray.data.tokens import encode_batch
from cai_ray.errors import CaiRayError
from cai_ray.profiling import span

if TYPE_CHECKING:
    import torch


def pm_text(messages: Sequence[Mapping[str, str]], response: str) -> str:
    """The conversation ending in the response, as a PM reads it (hh-rlhf transcript layout)."""
    from cai_ray.data.conversation import Conversation

    convo = Conversation.from_messages(list(messages)).append("assistant", response)
    return convo.render_transcript(add_generation_prompt=False)


class RewardScorer:
    """The PM in `path` (`load_scalar_model`); `score(texts)` in batches. Consecutive texts
    that start alike (the RL loop's G answers to one prompt) run with their common prefix once
    (`share_prefix`, the default; `cai_ray.models.shared_prefix`)."""

    @span("load")
    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 2,
        batch_size: int = 8,
        share_prefix: bool = True,
    ):
        import torch

        from cai_ray.engines.hf import pick_device, pick_dtype
        from cai_ray.models import check_model_dir, load_tokenizer, model_id
        from cai_ray.models.value_head import load_scalar_model

        torch.set_num_threads(threads)
        model_dir = check_model_dir(path, head="classification")
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        # Right padding: the head reads the last non-pad token, found from the attention mask.
        self.tokenizer = load_tokenizer(model_dir, padding_side="right")
        model = load_scalar_model(model_dir, dtype=pick_dtype(dtype, self.device))
        self.model = model.to(self.device).eval()
        self.model_id = model_id(model_dir)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts as scored (BOS included)."""
        return [len(ids) for ids in encode_batch(self.tokenizer, list(texts))]

    @span("score:pm")
    def score(self, texts: Sequence[str], *, truncate: bool = False) -> list[float]:
        """One scalar per text, `batch_size` texts per forward. Over-long texts are an error,
        or with `truncate` keep their last tokens (the response, which the head reads)."""
        import torch

        encoded = encode_batch(self.tokenizer, list(texts))  # one BOS, as pm-train encodes
        if truncate:
            encoded = [ids[-self.max_context :] for ids in encoded]
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_context:
                raise CaiRayError(
                    f"text has {len(ids)} tokens; the preference model accepts {self.max_context}",
                    where=f"text {i}",
                    hint="shorten the conversation",
                )
        scores: list[float] = []
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            with torch.inference_mode():
                scores.extend(self._forward(chunk, pad).tolist())
        return scores

    def _forward(self, chunk: list[list[int]], pad: int) -> torch.Tensor:
        """The scores of one batch: consecutive texts that start alike (one conversation's
        answers) share one row, the conversation once (`shared_prefix`; the same scores)."""
        from cai_ray.feedback.pm_objective import pm_scores
        from cai_ray.models import shared_prefix

        if self.share_prefix:
            packed = shared_prefix.pack(chunk, shared_prefix.run_groups(chunk), pad_id=pad)
            batch = shared_prefix.to_batch(packed)
        else:
            ids, mask = shared_prefix.right_pad(chunk, pad_id=pad)  # (B, T)
            batch = {"input_ids": ids, "attention_mask": mask}
        return pm_scores(self.model, {k: v.to(self.device) for k, v in batch.items()})  # (B,)
