"""Causal multi-head attention over [memory; segment].

Three position schemes share one module:
- `relative` (Transformer-XL): content and position scores with the global
  biases u, v and sinusoidal relative encodings, aligned by the pad-and-reshape
  shift, so a segment attends to its memory exactly as to its own past.
- `rotary` (Llama-style): rotary embeddings on queries and keys, optionally
  fewer key/value heads than query heads (grouped-query attention).
- `learned` (GPT-2): absolute positions added to the embeddings (planer.nn.model);
  attention itself is position-free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from planer.arch import Architecture, BlockSpec
from planer.nn.quant import QLinear


def sinusoid(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Transformer-XL's positional encoding: [sin | cos] of positions x inverse frequencies."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(x: Tensor) -> Tensor:
    """Align position scores so that out[..., i, j] uses distance (K - T + i - j).

    x[..., i, p] holds the score of query i against relative position row p,
    where row p encodes distance K-1-p. Entries with j > K - T + i are garbage
    and must be masked by the caller (they are the future).
    """
    b, h, t, k = x.shape
    padded = F.pad(x, (1, 0)).view(b, h, k + 1, t)
    return padded[:, :, 1:].reshape(b, h, t, k)


def rotate(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding on the last dim of x (B, H, L, D), halves-rotation convention."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, arch: Architecture, spec: BlockSpec, dropatt: float = 0.0):
        super().__init__()
        d = arch.d_model
        self.heads, self.head_dim, self.kv_heads = spec.heads, spec.head_dim, spec.n_kv_heads
        self.pos = arch.pos
        self.rope_base = arch.rope_base
        self.q = QLinear(d, self.heads * self.head_dim, bias=arch.attn_bias)
        self.kv = QLinear(d, 2 * self.kv_heads * self.head_dim, bias=arch.attn_bias)
        self.o = QLinear(self.heads * self.head_dim, d, bias=arch.attn_bias)
        if self.pos == "relative":
            self.r = nn.Linear(d, self.heads * self.head_dim, bias=False)
            self.register_buffer("r_table", None)  # set by freeze_positions, for export
            self.r_w_bias = nn.Parameter(torch.zeros(self.heads, self.head_dim))
            self.r_r_bias = nn.Parameter(torch.zeros(self.heads, self.head_dim))
        self.dropatt = nn.Dropout(dropatt)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def position_keys(self, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(heads, head_dim, k): the projected encodings of distances k-1, ..., 0 (relative positions)."""
        if self.r_table is not None:
            return self.r_table[:, :, self.r_table.shape[-1] - k:]
        distances = torch.arange(k - 1, -1, -1, device=device)
        r = self.r(sinusoid(distances, self.r.in_features).to(dtype))
        return r.view(k, self.heads, self.head_dim).permute(1, 2, 0)

    def freeze_positions(self, max_context: int) -> None:
        """For inference graphs: keep the position keys of up to `max_context` distances as a constant and
        drop the projection. They depend on the weights and the length only; recomputing them on every call
        (sinusoids and a projection of every distance) is a large share of a small model's attention in an
        engine (benchmarks/RESULTS.md, attention graph). Longer memory + segment no longer fits the graph."""
        with torch.no_grad():
            table = self.position_keys(max_context, self.r.weight.dtype, self.r.weight.device)
        self.register_buffer("r_table", table.contiguous(), persistent=False)
        del self.r

    @torch.no_grad()
    def as_linear(self) -> tuple[Tensor, Tensor | None]:
        """(weight (d, d), bias or None) of the map this attention computes when every token attends only to
        itself: softmax over one key is 1 whatever the positions, so out = O(V h). What a linear block that
        replaces it starts from (Puzzle, arXiv 2411.19146)."""
        group = self.heads // self.kv_heads  # query heads per kv head, in order, as forward repeats them
        d = self.kv.in_features
        value = self.kv.weight.view(2, self.kv_heads, self.head_dim, d)[1].repeat_interleave(group, dim=0)
        weight = self.o.weight @ value.reshape(self.heads * self.head_dim, d)
        if self.kv.bias is None:
            return weight, None
        value_bias = self.kv.bias.view(2, self.kv_heads, self.head_dim)[1].repeat_interleave(group, dim=0)
        return weight, self.o.bias + self.o.weight @ value_bias.reshape(-1)

    def forward(self, h: Tensor, tgt_len: int) -> Tensor:
        """h: normalised [memory; segment], (B, K, d). Returns the segment's output (B, T, d)."""
        b, k, _ = h.shape
        t = tgt_len
        m = k - t
        q = self.q(h[:, m:]).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        key, value = self.kv(h).view(b, k, 2, self.kv_heads, self.head_dim).unbind(2)
        key, value = key.transpose(1, 2), value.transpose(1, 2)

        # The scale goes on the queries (T x head_dim values per head), not on the scores (T x K), and the
        # position scores are a MatMul, not an einsum, which ONNX Runtime's CPU kernels run more slowly.
        if self.pos == "relative":
            content = ((q + self.r_w_bias[:, None]) * self.scale) @ key.transpose(-1, -2)
            position = ((q + self.r_r_bias[:, None]) * self.scale) @ self.position_keys(k, h.dtype, h.device)
            scores = content + rel_shift(position)
        else:
            if self.pos == "rotary":
                q = rotate(q, torch.arange(m, k, device=h.device), self.rope_base)
                key = rotate(key, torch.arange(k, device=h.device), self.rope_base)
            if self.kv_heads != self.heads:
                group = self.heads // self.kv_heads
                key = key.repeat_interleave(group, dim=1)
                value = value.repeat_interleave(group, dim=1)
            scores = (q * self.scale) @ key.transpose(-1, -2)

        future = torch.ones(t, k, dtype=torch.bool, device=h.device).triu(1 + m)
        scores = scores.masked_fill(future, float("-inf"))
        probs = self.dropatt(scores.softmax(dim=-1))
        out = (probs @ value).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.o(out)
