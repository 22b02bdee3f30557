"""Transformer-XL's ordered segment iterator.

The token sequence is cut into `batch` parallel streams (row b is the b-th
contiguous slice of the text); segment i of every stream is read at the same
step, so the memory a stream carries from segment i-1 really is its own past.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor


class Segments:
    def __init__(self, data: np.ndarray, batch: int, tgt_len: int, streams: slice = slice(None)):
        """`streams` keeps a share of the batch's streams (a data-parallel process reads its own)."""
        length = len(data) // batch
        if length < 2:
            raise ValueError(f"{len(data)} tokens are too few for {batch} streams")
        self.streams = torch.from_numpy(np.asarray(data[: length * batch], dtype=np.int64)).view(batch, length)[streams]
        self.tgt_len = tgt_len

    def __len__(self) -> int:
        """Segments per pass; the last one may be shorter than tgt_len."""
        return _per_pass(self.streams.shape[1], self.tgt_len)

    @property
    def tokens(self) -> int:
        """Predicted tokens per pass (all streams)."""
        return self.streams.shape[0] * (self.streams.shape[1] - 1)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """Inputs and next-token targets of segment i, each (batch, <=tgt_len)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.tgt_len
        end = min(start + self.tgt_len, self.streams.shape[1] - 1)
        return self.streams[:, start:end], self.streams[:, start + 1:end + 1]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self[i] for i in range(len(self)))


def read_spans(tokens: int, batch: int, tgt_len: int, steps: int) -> list[range]:
    """The positions, in a text of `tokens` tokens, that `steps` steps of its Segments(batch, tgt_len) read as
    inputs or targets: one range per stream (every stream whole once a pass is complete)."""
    length = tokens // batch
    read = length if steps >= _per_pass(length, tgt_len) else steps * tgt_len + 1 if steps else 0
    return [range(b * length, b * length + read) for b in range(batch)]


def unread_windows(tokens: int, read: Iterable[range], window: int, count: int) -> list[range]:
    """`count` windows of `window` positions of a text of `tokens` tokens that no range of `read` touches, spread
    evenly over the text (the whole text's variety, not one stretch's), in order; fewer where fewer fit."""
    windows, at = [], 0
    for span in sorted((r for r in read if len(r)), key=lambda r: r.start) + [range(tokens, tokens + 1)]:
        windows += [range(s, s + window) for s in range(at, span.start - window + 1, window)]
        at = max(at, span.stop)
    if len(windows) <= count:
        return windows
    return [windows[(2 * i + 1) * len(windows) // (2 * count)] for i in range(count)]


def _per_pass(length: int, tgt_len: int) -> int:
    """Segments in a pass over a stream of `length` tokens (each token but the first is a target once)."""
    return -(-(length - 1) // tgt_len)
