"""The Transformer-XL evaluation of planer.train.evaluate, run in an engine on an exported LM (numpy only):
what the shipped graph scores, not what its PyTorch source scores.

The split is read as `batch` contiguous streams, segment by segment (as planer.data.Segments reads it), and
each segment is fed with the memories the graph returned for the previous one. A stream starts with empty
(zero-length) memories, which is exactly PyTorch's `mems=None`: attention over [memory; segment] then sees
the segment alone, and learned positions count from 0.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from planer.metrics import scores
from planer.runtime.engine import Engine, EngineError


def evaluate_engine(engine: Engine, data: np.ndarray, unit: str, *, d_model: int, tgt_len: int, mem_len: int,
                    batch: int = 8, max_tokens: int | None = None, show_progress: bool = False) -> dict[str, float]:
    """Score `data` with the LM in `engine`; the same dict as planer.train.evaluate.evaluate.

    `d_model` sizes the empty first memories (the engine interface names its inputs but not their shapes;
    every exported model ships with its arch.json). The graph keeps at most the memory it was exported
    with, so `mem_len` must not exceed that; max_tokens stops early (for quick checks).
    """
    length = len(data) // batch
    if length < 2:
        raise ValueError(f"{len(data)} tokens are too few for {batch} streams")
    streams = np.asarray(data[: length * batch], dtype=np.int64).reshape(batch, length)
    mem_names = [n for n in engine.input_names if n != "tokens"]
    mems = {n: np.zeros((batch, 0, d_model), np.float32) for n in mem_names}
    total, count = 0.0, 0
    starts = range(0, length - 1, tgt_len)
    for start in tqdm(starts, desc="evaluate", unit="segment", disable=not show_progress):
        end = min(start + tgt_len, length - 1)
        out = engine.run({"tokens": streams[:, start:end], **mems})
        want = min(mem_len, mems[mem_names[0]].shape[1] + end - start)
        for name in mem_names:
            new = out[f"new_{name}"]
            if new.shape[1] < want:
                # A silently shorter memory would score worse context, not fail.
                raise EngineError(f"the graph keeps {new.shape[1]} positions of memory where {want} were asked "
                                  f"(mem_len {mem_len}); export it with --mem-len {mem_len} or evaluate with less")
            mems[name] = new[:, new.shape[1] - want:]
        total += _summed_nll(out["logits"], streams[:, start + 1:end + 1])
        count += batch * (end - start)
        if max_tokens is not None and count >= max_tokens:
            break
    result = scores(total / count, unit)
    result["tokens"] = count
    return result


def _summed_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed cross-entropy in float64, one stream at a time so a word-level vocabulary's float64 copy of
    the logits stays one segment of one stream."""
    total = 0.0
    for row, target in zip(logits, targets):
        z = row.astype(np.float64)
        top = z.max(axis=-1)
        lse = top + np.log(np.exp(z - top[:, None]).sum(axis=-1))
        total += float((lse - z[np.arange(len(target)), target]).sum())
    return total
