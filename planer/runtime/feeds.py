"""The input/output signature of an exported planer LM, and example inputs for it (numpy only).

    tokens            int64 (batch, tgt_len)
    mem{i}            float32 (batch, mem_len, d_model), one per attention block, in block order
 -> logits            float32 (batch, tgt_len, vocab)
    new_mem{i}        float32 (batch, min(mem_len, mem + tgt_len), d_model)
"""

from __future__ import annotations

import numpy as np

from planer.arch import Architecture

# Graph metadata: the longest memory + segment a graph with relative-position attention accepts.
MAX_CONTEXT_KEY = "planer.max_context"


def input_names(arch: Architecture) -> list[str]:
    return ["tokens"] + [f"mem{i}" for i in range(len(arch.attn_positions))]


def output_names(arch: Architecture) -> list[str]:
    return ["logits"] + [f"new_mem{i}" for i in range(len(arch.attn_positions))]


def example_feeds(arch: Architecture, batch: int, tgt_len: int, mem_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens and memories of the given shape (memories at the scale of embedded inputs)."""
    rng = np.random.default_rng(seed)
    feeds = {"tokens": rng.integers(0, arch.vocab_size, size=(batch, tgt_len), dtype=np.int64)}
    for name in input_names(arch)[1:]:
        feeds[name] = rng.standard_normal((batch, mem_len, arch.d_model), dtype=np.float32)
    return feeds
