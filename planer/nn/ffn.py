"""Position-wise feed-forward network."""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from planer.nn.quant import QLinear, linear

ACTIVATIONS = {  # elementwise; swiglu gates with a second projection instead
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-2's GELU, and the one fused MoE kernels implement
    "relu": F.relu,
    "silu": F.silu,
}


class FFN(nn.Module):
    """Linear - activation - Linear; `swiglu` gates the activation with a second projection."""

    def __init__(self, d_model: int, d_inner: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.activation = activation
        self.up = QLinear(d_model, d_inner, bias=bias)
        if activation == "swiglu":
            self.gate = QLinear(d_model, d_inner, bias=bias)
        self.down = QLinear(d_inner, d_model, bias=bias)

    def forward(self, x: Tensor, width: int | None = None) -> Tensor:
        """`width` runs only the first `width` hidden units (the search's narrower candidates share one FFN)."""
        up = _linear(self.up, x, width)
        hidden = F.silu(_linear(self.gate, x, width)) * up if self.activation == "swiglu" else \
            ACTIVATIONS[self.activation](up)
        if width is None:
            return self.down(hidden)
        return linear(hidden, self.down.weight[:, :width], self.down.bias, self.down.precision)


def _linear(layer: QLinear, x: Tensor, rows: int | None) -> Tensor:
    if rows is None:
        return layer(x)
    return linear(x, layer.weight[:rows], None if layer.bias is None else layer.bias[:rows], layer.precision)
