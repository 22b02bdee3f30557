"""Put each FFN's most important hidden units first, judged by their activations.

Narrower FFN candidates keep an FFN's first units. Which units those are matters: Minitron (arXiv 2407.14679)
ranks units by their activations on calibration data rather than by weight norms, and that metric alone moved
its pruned model's loss from 8.73 to 7.18. A unit's importance here is its mean |activation| over calibration
tokens of the training split times the norm of its column of the down projection: what it adds to the block's
output on real inputs, not what its weights could add to any input.

`rank_units` reorders the units of every FFN block without changing what the network computes, so that slicing
the first w units keeps the w that carry the most.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from planer.nn import LM
from planer.nn.ffn import ACTIVATIONS, FFN


def hidden(ffn: FFN, h: Tensor) -> Tensor:
    """The FFN's hidden activations (..., d_inner) on its normalised input `h`: what the down projection reads."""
    up = ffn.up(h)
    return F.silu(ffn.gate(h)) * up if ffn.activation == "swiglu" else ACTIVATIONS[ffn.activation](up)


@torch.no_grad()
def unit_importance(model: LM, probe: Sequence[tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
    """Per FFN block (by block index), each unit's mean |activation| over the probe's tokens x the norm of its
    down-projection column."""
    sums: dict[int, Tensor] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        if block.kind != "ffn":
            continue

        def record(module: torch.nn.Module, args: tuple[Tensor, ...], i: int = i) -> None:
            act = hidden(module, args[0]).abs().reshape(-1, module.up.out_features)
            sums[i] = sums.get(i, 0) + act.sum(dim=0)

        hooks.append(block.f.register_forward_pre_hook(record))
    try:
        mems, tokens = None, 0
        for x, _ in probe:
            mems = model(x, mems).mems
            tokens += x.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return {i: s / max(tokens, 1) * model.blocks[i].f.down.weight.norm(dim=0) for i, s in sums.items()}


@torch.no_grad()
def rank_units(model: LM, probe: Sequence[tuple[Tensor, Tensor]]) -> LM:
    """A copy of `model` computing the same function, each FFN block's hidden units ordered by
    `unit_importance` on `probe`, most important first."""
    ranked = copy.deepcopy(model).eval()
    for i, importance in unit_importance(ranked, probe).items():
        permute_units(ranked.blocks[i].f, importance.argsort(descending=True))
    return ranked


@torch.no_grad()
def permute_units(ffn: FFN, order: Tensor) -> None:
    """Reorder the hidden units of `ffn` (up, gate and their biases by row, down by column); the function is
    unchanged."""
    for layer in (ffn.up, *([ffn.gate] if ffn.activation == "swiglu" else [])):
        layer.weight.copy_(layer.weight[order])
        if layer.bias is not None:
            layer.bias.copy_(layer.bias[order])
    ffn.down.weight.copy_(ffn.down.weight[:, order])
