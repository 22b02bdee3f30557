"""Position-wise feed-forward network."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class FFN(nn.Module):
    """Linear - activation - Linear; `swiglu` gates the activation with a second projection."""

    def __init__(self, d_model: int, d_inner: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, d_inner, bias=bias)
        if activation == "swiglu":
            self.gate = nn.Linear(d_model, d_inner, bias=bias)
        self.down = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(_ACTIVATIONS[self.activation](self.up(x)))
