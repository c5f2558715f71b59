"""The project's own tokenizer: byte-level BPE trained locally, so no model hub is needed.

Byte-level means any text round-trips (unicode, code, emoji). The paper's transcript markers and
the multiple-choice options ` (A)` / ` (B)` are added tokens, so each is exactly one token and the
feedback scorer reads one log-probability per option (paper section 4.1).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CORPUS_PATH = Path(__file__).with_name("tokenizer_corpus.txt")
VOCAB_SIZE = 4096

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)
# Transcript layout of the paper (Anthropic hh-rlhf) and the multiple-choice option labels.
MARKER_TOKENS = (
    "\n\nHuman:",
    "\n\nAssistant:",
    "\n\nCritiqueRequest:",
    "\n\nCritique:",
    "\n\nRevisionRequest:",
    "\n\nRevision:",
    " (A)",
    " (B)",
)
# ChatML-style turns; the BOS comes from the tokenizer's post-processor, not the template, so a
# rendered chat prompt that is then encoded gets exactly one BOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(corpus: str | Path = CORPUS_PATH) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on the shipped corpus. Deterministic: same vocab on every build."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train(str(corpus))),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


@functools.lru_cache(maxsize=2)
def _train(corpus: str) -> str:
    """The trained tokenizer as JSON; cached because every preset build needs the same one."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE - len(MARKER_TOKENS),
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = Path(corpus).read_text(encoding="utf-8")
    # Paragraph-sized pieces keep training cheap; the text itself fixes the merges.
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    tok.add_tokens([AddedToken(m, normalized=False, special=False) for m in MARKER_TOKENS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tok.to_str()


def load_tokenizer(path: str | Path, *, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """The tokenizer saved in a model directory; left padding by default (batched generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), padding_side=padding_side)
    if tok.pad_token is None:
        # Llama-family tokenizers often lack one; EOS as pad is the usual choice for generation.
        tok.pad_token = tok.eos_token
    return tok


# Tokens that end an assistant turn in common chat templates (ChatML, Gemma, Llama 3).
_TURN_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<eos>", "</s>")


def stop_token_ids(tok, vocab_size: int | None = None) -> list[int]:
    """The EOS id, then each special token of the vocabulary that ends a chat turn.

    Special only: Gemma's `</s>` (id 212) is ordinary text (HTML strikethrough), and ids past
    the model's `vocab_size` are left out (transformers' byte-level GGUF tokenizer adds an
    `<|endoftext|>` the model cannot emit when the file lacks one).
    """
    vocab = tok.get_vocab()
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids += [vocab[t] for t in _TURN_END_TOKENS if t in special and vocab[t] not in ids]
    return [i for i in ids if vocab_size is None or i < vocab_size]
