"""int8 blocks: ONNX Runtime's dynamic quantization, simulated in PyTorch.

planer ships an int8 block as `onnxruntime.quantization.quantize_dynamic(per_channel=True,
weight_type=QInt8)` makes it (planer.export.quantize): each weight matrix becomes int8 per output channel,
symmetric over the reduced range [-64, 64] (7 bits, so that the u8 x s8 products of CPUs without VNNI
cannot saturate), and each input of such a product is quantized afresh on every call to uint8 over
[min(x, 0), max(x, 0)] of the whole tensor (DynamicQuantizeLinear). The integer product is exact, so
rounding weights and inputs the same way here reproduces the engine's numbers: to 1e-7 on a random
network; on trained `tiny` an input on a rounding boundary can land one step apart and single logits
differ by up to 5e-2, while the loss agrees to 2e-6 (benchmarks/RESULTS.md, int8_gain and the int8 build).
Rounding is half to even, as ONNX's and torch.round's. Gradients pass straight through the rounding.

Only the projections of attention and FFN/expert blocks are quantized (`QLinear`); routers, norms, the
relative-position keys and the embedding stay in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHT_QMAX = 64  # ONNX Runtime's reduced int8 range for MatMulInteger weights
ACTIVATION_QMAX = 255  # uint8


def _straight_through(x: Tensor, rounded: Tensor) -> Tensor:
    return x + (rounded - x).detach()


def int8_weight(weight: Tensor) -> Tensor:
    """`weight` (out, in) rounded to int8 per output channel, symmetric, as ONNX Runtime stores it."""
    scale = weight.detach().abs().amax(dim=1, keepdim=True) / WEIGHT_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _straight_through(weight, torch.round(weight.detach() / scale).clamp(-WEIGHT_QMAX, WEIGHT_QMAX) * scale)


def uint8_activation(x: Tensor) -> Tensor:
    """`x` through ONNX's DynamicQuantizeLinear and back: uint8 per tensor over [min(x, 0), max(x, 0)]."""
    d = x.detach()
    lo, hi = d.min().clamp(max=0), d.max().clamp(min=0)
    scale = (hi - lo) / ACTIVATION_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero input stays zero
    zero = torch.round(-lo / scale).clamp(0, ACTIVATION_QMAX)
    q = (torch.round(d / scale) + zero).clamp(0, ACTIVATION_QMAX)
    return _straight_through(x, (q - zero) * scale)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, precision: str) -> Tensor:
    """F.linear computed in `precision` (fp32, or int8 as the engine runs it)."""
    if precision == "int8":
        x, weight = uint8_activation(x), int8_weight(weight)
    return F.linear(x, weight, bias)


class QLinear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that computes in `self.precision`."""

    precision = "fp32"

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.precision)


def set_precision(module: nn.Module, precision: str) -> None:
    """Compute every QLinear inside `module` in `precision`."""
    for m in module.modules():
        if isinstance(m, QLinear):
            m.precision = precision


@contextmanager
def computing(module: nn.Module, precision: str) -> Iterator[None]:
    """`module` computes in `precision` inside the block (the supernet's shared weights serve fp32 and int8
    candidates alike)."""
    layers = [m for m in module.modules() if isinstance(m, QLinear)]
    before = [m.precision for m in layers]
    set_precision(module, precision)
    try:
        yield
    finally:
        for m, p in zip(layers, before):
            m.precision = p


def quantized_linears(module: nn.Module) -> list[QLinear]:
    """The layers of `module` that compute in int8: the ones an export quantizes."""
    return [m for m in module.modules() if isinstance(m, QLinear) and m.precision == "int8"]
