"""PyTorch eager behind the engine interface: the reference every engine is compared with."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from planer.errors import PlanerError
from planer.nn import LM
from planer.nn.model import in_precision
from planer.nn.quant import quantized_linears
from planer.runtime import Engine
from planer.runtime.evaluate import evaluate_engine
from planer.runtime.feeds import example_feeds, input_names, output_names
from planer.train.evaluate import evaluate


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
    while a wrong graph is off by the order of the values themselves: 1e-3 of the scale. A network with int8
    blocks is checked by `verify` instead."""
    feeds = example_feeds(model.arch, batch, tgt_len, mem_len)
    got, want = engine.run(feeds), TorchEngine(model, mem_len=keep_len).run(feeds)
    diffs = {n: float(np.abs(got[n] - want[n]).max()) for n in want}
    for n, diff in diffs.items():
        scale = max(1.0, float(np.abs(want[n]).max()))
        if diff > 1e-3 * scale:
            raise PlanerError(f"the exported graph's {n} disagrees with PyTorch by {diff:.2e} (values up to "
                              f"{scale:.3g}); please report this")
    return max(diffs.values())


def quantized_agreement(model: LM, engine: Engine, data: np.ndarray, unit: str, *, batch: int = 4,
                        max_tokens: int = 4096, tolerance: float = 5e-3) -> float:
    """The relative difference between the engine's loss and PyTorch's simulation of it on the first
    `max_tokens` of `data` (real tokens, the Transformer-XL protocol); refuses a graph beyond `tolerance`.

    This, not `parity`, is what checks an int8 graph of a deep network: from random inputs its outputs part
    ways with the simulation by rounding alone (an input a float's width from a rounding boundary lands one
    step apart, and each block carries that on), until SmolLM2's 46 int8 blocks put the last memories 668 apart
    at a scale of 640, while its loss on real tokens agrees to 1e-3 (benchmarks/RESULTS.md, SmolLM2 2x build).
    A quantizer that rounds another way (per tensor, another range) moves the loss by more than `tolerance`."""
    arch = model.arch
    want = evaluate(model, data, unit, batch=batch, max_tokens=max_tokens)["loss"]
    got = evaluate_engine(engine, data, unit, d_model=arch.d_model, tgt_len=arch.tgt_len, mem_len=arch.mem_len,
                          batch=batch, max_tokens=max_tokens)["loss"]
    relative = abs(got - want) / abs(want)
    if relative > tolerance:
        raise PlanerError(f"the exported int8 graph's loss on the first {max_tokens} validation tokens is {got:.5f}, "
                          f"PyTorch's simulation of it {want:.5f} ({relative:.1e} apart, more than {tolerance:g}); "
                          "please report this")
    return relative


def verify(model: LM, engine: Engine, *, batch: int, tgt_len: int, mem_len: int, keep_len: int | None = None,
           twin: Engine | None = None, data: np.ndarray | None = None, unit: str = "byte") -> dict[str, float]:
    """What checks the exported graph of `model` (run by `engine`) against PyTorch, as latency.json records it;
    refuses a graph that fails. An fp32 graph: `parity` of its outputs. With int8 blocks: `parity` of the graph of
    its fp32 twin (`twin`, exported with the same options: the structure) and `quantized_agreement` of its loss on
    `data`, validation tokens (the int8 graph), since max-difference parity cannot tell a deep int8 network's
    rounding from a wrong graph."""
    shape = {"batch": batch, "tgt_len": tgt_len, "mem_len": mem_len, "keep_len": keep_len}
    if not quantized_linears(model):
        return {"parity_max_abs_diff": parity(model, engine, **shape)}
    if twin is None or data is None:
        raise ValueError("an int8 graph is verified with its fp32 twin's graph and validation tokens")
    return {"parity_max_abs_diff": parity(in_precision(model, "fp32"), twin, **shape),
            "int8_loss_relative_difference": quantized_agreement(model, engine, data, unit, batch=batch)}
