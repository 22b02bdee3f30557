"""MoE lowerings for export: how an engine runs a MoE layer sparsely.

`ops` — standard ONNX operators. The eager MoE (planer.nn.moe) groups tokens
with a sort and Python-side split sizes, which a graph cannot hold; `OpsMoE`
expresses the same computation with data-dependent shapes that ONNX carries:
per expert, the slots routed to it are found with NonZero, their tokens
gathered, the expert run on those rows only, and the results written to their
slots. Every slot belongs to exactly one expert, so the writes never collide
and no scatter-add is needed (ONNX Runtime's ScatterND with reduction=add and
duplicate indices has given wrong results intermittently with 2 threads); the
k slots of a token are then summed with their gates.

`ort-moe` — ONNX Runtime's fused `com.microsoft::MoE` contrib op (softmax,
top-k, grouped expert GEMMs and the weighted combine in one kernel). Its GELU
is the tanh form, so it lowers networks whose activation is `gelu_tanh`,
`relu` or `silu` exactly and refuses exact `gelu` rather than change the
network's function silently.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from planer.errors import PlanerError
from planer.nn.moe import MoE

LOWERINGS = ("ops", "ort-moe")
_ORT_ACTIVATIONS = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}


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


class OrtMoE(nn.Module):
    """The MoE `moe` as one `com.microsoft::MoE` node; only meaningful while exporting."""

    def __init__(self, moe: MoE):
        super().__init__()
        first = moe.experts[0]
        if first.activation not in _ORT_ACTIVATIONS:
            raise PlanerError(
                f"the ort-moe lowering cannot run activation {first.activation!r} exactly (ONNX Runtime's fused "
                f"MoE has {', '.join(_ORT_ACTIVATIONS)}); use --lowering ops")
        self.router = moe.router
        self.top_k = moe.top_k
        self.activation = _ORT_ACTIVATIONS[first.activation]
        d_model, d_inner = first.up.in_features, first.up.out_features

        def stacked(get, shape) -> nn.Parameter:
            return nn.Parameter(torch.stack([get(e) if get(e) is not None else torch.zeros(shape)
                                             for e in moe.experts]).detach())

        self.fc1 = stacked(lambda e: e.up.weight, (d_inner, d_model))  # (E, inner, d): nn.Linear layout
        self.fc1_bias = stacked(lambda e: e.up.bias, (d_inner,))
        self.fc2 = stacked(lambda e: e.down.weight, (d_model, d_inner))
        self.fc2_bias = stacked(lambda e: e.down.bias, (d_model,))
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = torch.onnx.ops.symbolic(
            "com.microsoft::MoE", (x, self.router(x), self.fc1, self.fc1_bias, self.fc2, self.fc2_bias),
            {"k": self.top_k, "activation_type": self.activation,
             "normalize_routing_weights": int(self.top_k > 1)},  # planer renormalises only for k > 1
            dtype=x.dtype, shape=x.shape, version=1)
        return out.reshape(shape)


def lower(model: nn.Module, lowering: str) -> None:
    """Replace, in place, every MoE layer inside `model` by its `lowering` form."""
    if lowering not in LOWERINGS:
        raise PlanerError(f"unknown MoE lowering {lowering!r}; use one of {', '.join(LOWERINGS)}")
    form = OpsMoE if lowering == "ops" else OrtMoE
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE):
                setattr(parent, name, form(child))
