"""MoE lowerings for export: how an engine runs a MoE layer sparsely.

The eager MoE (planer.nn.moe) groups tokens with a sort and Python-side split
sizes, which a graph cannot hold. `OpsMoE` expresses the same computation with
data-dependent shapes that ONNX carries: per expert, the slots routed to it are
found with NonZero, their tokens gathered, the expert run on those rows only,
and the results written to their slots. Every slot belongs to exactly one
expert, so the writes never collide and no scatter-add is needed (ONNX
Runtime's ScatterND with reduction=add and duplicate indices has given wrong
results intermittently with 2 threads); the k slots of a token are then summed
with their gates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from planer.nn.moe import MoE

LOWERINGS = ("ops",)


class OpsMoE(nn.Module):
    """The MoE `moe` (sharing its weights) in standard-ONNX-op form."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.router = moe.router
        self.experts = moe.experts
        self.top_k = moe.top_k
        self.route = moe.route
        self.aux_loss = torch.zeros(())  # inference graphs carry no balance loss

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        _, gates, ids = self.route(x)
        flat = ids.reshape(-1)
        slots = x.new_zeros(flat.shape[0], shape[-1])
        for e, expert in enumerate(self.experts):
            mine = torch.nonzero(flat == e)[:, 0]
            rows = x.index_select(0, torch.div(mine, self.top_k, rounding_mode="floor"))
            slots = slots.index_put((mine,), expert(rows))
        out = (slots.view(-1, self.top_k, shape[-1]) * gates.unsqueeze(-1)).sum(dim=1)
        return out.reshape(shape)


def lower(model: nn.Module, lowering: str) -> None:
    """Replace, in place, every MoE layer inside `model` by its `lowering` form."""
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown MoE lowering {lowering!r}; use one of {', '.join(LOWERINGS)}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE):
                setattr(parent, name, OpsMoE(child))
