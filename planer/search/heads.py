"""Put each attention block's most important heads first.

Narrower attention candidates inherit the baseline's first heads (planer.search.supernet). Which
heads those are matters: cutting `tiny`'s first attention block to heads 0 and 1 of four scores 2.37
nats on validation data, to heads 0 and 3 1.64 (whole model: 1.51; benchmarks/RESULTS.md,
head_choice). `rank_heads` reorders the heads of every attention block, most important first, without
changing what the network computes, so that slicing the first h heads keeps the best h it can find.

Importance is measured, not guessed from weight norms: per block, heads are removed greedily (each step
the one whose removal raises the held-out loss least, with the block's other heads and every other
block intact), and the order is the reverse of removal. With grouped-query attention the unit is a key/value
head together with the query heads that read it, since a narrower candidate keeps whole groups.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from planer import distributed
from planer.nn import LM
from planer.nn.attention import Attention


@torch.no_grad()
def probe_loss(model: LM, probe: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Mean cross-entropy over consecutive segments (the first only fills the memory unless it is the only one)."""
    mems, total = None, 0.0
    for i, (x, y) in enumerate(probe):
        out = model(x, mems)
        mems = out.mems
        if i or len(probe) == 1:
            total += float(F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1)))
    return total / max(1, len(probe) - 1)


@torch.no_grad()
def rank_heads(model: LM, probe: Sequence[tuple[Tensor, Tensor]]) -> tuple[LM, list[list[int]]]:
    """A copy of `model` computing the same function, each attention block's key/value groups (heads, without
    grouped-query attention) ordered most important first by `probe_loss`; and each block's order."""
    model = copy.deepcopy(model).eval()
    orders = []
    for block in model.blocks:
        if block.kind != "attn":
            continue
        attn: Attention = block.f
        units = list(range(attn.kv_heads))
        removed: list[int] = []
        while len(units) > 1:
            losses = [_without(model, attn, removed + [u], probe) for u in units]
            removed.append(units.pop(min(range(len(units)), key=losses.__getitem__)))
        order = units + removed[::-1]
        _permute(attn, order)
        orders.append(order)
    return model, orders


@contextmanager
def cut_heads(attn: Attention, units: Iterable[int]) -> Iterator[None]:
    """Within the block, the query heads of these key/value groups contribute nothing (their output columns
    are zeroed), and are restored on leaving."""
    cols = attn.heads // attn.kv_heads * attn.head_dim  # output columns per group
    saved = attn.o.weight.detach().clone()
    with torch.no_grad():
        for u in units:
            attn.o.weight[:, u * cols:(u + 1) * cols] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            attn.o.weight.copy_(saved)


def _without(model: LM, attn: Attention, units: list[int], probe: Sequence[tuple[Tensor, Tensor]]) -> float:
    """probe_loss with the output of these key/value groups' query heads cut off."""
    with cut_heads(attn, units):
        return distributed.mean(probe_loss(model, probe))  # every rank ranks alike under torchrun


def _permute(attn: Attention, order: list[int]) -> None:
    """Reorder the key/value groups (and the query heads of each) of `attn`; the function is unchanged."""
    group, hd = attn.heads // attn.kv_heads, attn.head_dim
    heads = torch.tensor([u * group + i for u in order for i in range(group)])
    q_rows = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    kv = torch.tensor(order)
    attn.q.weight.copy_(attn.q.weight[q_rows])
    attn.o.weight.copy_(attn.o.weight[:, q_rows])
    k_v = attn.kv.weight.view(2, attn.kv_heads, hd, -1)
    k_v.copy_(k_v[:, kv])
    if attn.q.bias is not None:
        attn.q.bias.copy_(attn.q.bias[q_rows])
        kv_bias = attn.kv.bias.view(2, attn.kv_heads, hd)
        kv_bias.copy_(kv_bias[:, kv])
    if attn.pos == "relative":
        attn.r.weight.copy_(attn.r.weight[q_rows])
        attn.r_w_bias.copy_(attn.r_w_bias[heads])
        attn.r_r_bias.copy_(attn.r_r_bias[heads])
