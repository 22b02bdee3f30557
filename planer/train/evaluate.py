"""Evaluation with the Transformer-XL protocol: the split is read in order as
`batch` streams, segment by segment, with the memory carried across segments,
so every token is scored once with up to mem_len tokens of real context."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from planer.data import Segments
from planer.metrics import headline, scores  # headline: its users import it from here too
from planer.nn import LM


@torch.no_grad()
def evaluate(model: LM, data: np.ndarray, unit: str, *, batch: int = 8, tgt_len: int | None = None,
             mem_len: int | None = None, max_tokens: int | None = None, progress: str | None = None
             ) -> dict[str, float]:
    """Score `data`; max_tokens stops early (for quick periodic checks). `progress` names a progress bar
    (a whole split takes minutes on a CPU)."""
    arch = model.arch
    tgt_len = tgt_len or arch.tgt_len
    mem_len = arch.mem_len if mem_len is None else mem_len
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    mems = None
    segments = Segments(data, batch, tgt_len)
    for x, y in tqdm(segments, desc=progress, disable=progress is None, unit="segment", dynamic_ncols=True,
                     leave=False):
        out = model(x, mems, mem_len)
        mems = out.mems
        total += F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1),
                                 reduction="sum").item()
        count += y.numel()
        if max_tokens is not None and count >= max_tokens:
            break
    model.train(was_training)
    result = scores(total / count, unit)
    result["tokens"] = count
    return result
