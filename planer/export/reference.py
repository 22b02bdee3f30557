"""PyTorch eager behind the engine interface: the reference every engine is compared with."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from planer.errors import PlanerError
from planer.nn import LM
from planer.nn.quant import quantized_linears
from planer.runtime import Engine
from planer.runtime.feeds import example_feeds, input_names, output_names


class TorchEngine:
    """An LM run eagerly, with the same named inputs and outputs as its ONNX export."""

    name = "torch"

    def __init__(self, model: LM, *, threads: int | None = None, mem_len: int | None = None):
        self.model = model.eval()
        self.threads = threads
        self.mem_len = mem_len
        self.input_names = input_names(model.arch)
        self.output_names = output_names(model.arch)

    @torch.no_grad()
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.threads:
            torch.set_num_threads(self.threads)
        tokens = torch.from_numpy(feeds["tokens"])
        mems = [torch.from_numpy(feeds[n]) for n in self.input_names[1:]]
        out = self.model(tokens, mems, self.mem_len)
        return dict(zip(self.output_names, [out.logits.numpy(), *(m.numpy() for m in out.mems)]))

    def provenance(self) -> dict[str, Any]:
        return {"engine": self.name, "torch": torch.__version__, "threads": self.threads or torch.get_num_threads(),
                "machine": platform.machine()}


def parity(model: LM, engine: Engine, *, batch: int, tgt_len: int, mem_len: int, keep_len: int | None = None) -> float:
    """Max |engine - PyTorch| over every output on random inputs of memory length `mem_len`, for a graph
    that keeps `keep_len` (default: the architecture's) of memory; refuses a graph that disagrees.

    The refusal is relative to each output's scale: deep networks carry hidden states in the hundreds
    (SmolLM2's last memories reach ~330), where float32 summed in another order differs by ~1e-4 of that,
    while a wrong graph is off by the order of the values themselves: 1e-3 of the scale, 1e-2 with int8
    blocks (compared with PyTorch's simulation of them, planer.nn.quant)."""
    feeds = example_feeds(model.arch, batch, tgt_len, mem_len)
    got, want = engine.run(feeds), TorchEngine(model, mem_len=keep_len).run(feeds)
    diffs = {n: float(np.abs(got[n] - want[n]).max()) for n in want}
    # int8 blocks: an input on a rounding boundary can land one quantization step apart in the engine, and a
    # trained network carries that on (tiny, all int8: 1.4e-3 of the logits' scale); a wrong graph is still off
    # by the order of the values
    tolerance = 1e-2 if quantized_linears(model) else 1e-3
    for n, diff in diffs.items():
        scale = max(1.0, float(np.abs(want[n]).max()))
        if diff > tolerance * scale:
            raise PlanerError(f"the exported graph's {n} disagrees with PyTorch by {diff:.2e} (values up to "
                              f"{scale:.3g}); please report this")
    return max(diffs.values())
