"""The machine's measured matmul peak and model FLOP counts, shared by the benchmark scripts.

MFU = achieved model FLOP/s / the best matmul FLOP/s this machine reached in the same run (not
a datasheet number). FLOPs per token follow PaLM (Chowdhery et al. 2022, app. B): a forward is
2 N + 4 L H T per token (N non-embedding parameters plus the output head, L layers, H hidden
size, T the context attended to), training three times that (6 N + 12 L H T).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def matmul_peak(
    threads: int, *, dtype: torch.dtype = torch.float32, n: int = 1024, device: str = "cpu"
) -> float:
    """Best FLOP/s of an n x n matmul with `threads` torch threads (best of 20); on a CUDA
    device an 8192 x 8192 matmul, timed with synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cuda = str(device).startswith("cuda")
    n = 8192 if cuda and n == 1024 else n
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up (bf16 kernels are chosen on first use)
    best = float("inf")
    for _ in range(20):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(before)
    return 2 * n**3 / best


def model_shape(model_dir: Path) -> dict[str, int]:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers, ff = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * ff  # q, o, k, v, gate/up/down projections
    n = layers * per_layer + h * config["vocab_size"]  # + the output head's matmul
    return {"n": n, "layers": layers, "hidden": h}


def forward_flops_per_token(model_dir: Path, context: int) -> float:
    """Forward FLOPs of one token attending to `context` tokens: 2 N + 4 L H T."""
    s = model_shape(model_dir)
    return 2 * s["n"] + 4 * s["layers"] * s["hidden"] * context


def flops_per_token(model_dir: Path, seq_len: int) -> float:
    """Training FLOPs per token of a `seq_len` sequence: 6 N + 12 L H T."""
    return 3 * forward_flops_per_token(model_dir, seq_len)
